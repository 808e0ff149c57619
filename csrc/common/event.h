// EventCounter: a generation counter that one thread waits on and others bump.
//
// The transport's worker sleeps on one of these; the net's progress threads
// bump it when a request of the worker's comms completes, and callers bump it
// when they enqueue work. A waiter passes the value it saw before looking for
// work, so a bump between the look and the wait is never lost. notify() costs
// one atomic add unless someone is waiting (Dekker-style handshake on two
// seq_cst atomics).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace tcpx {

class EventCounter {
 public:
  uint64_t value() const { return seq_.load(std::memory_order_seq_cst); }

  void notify() {
    seq_.fetch_add(1, std::memory_order_seq_cst);
    if (waiters_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
  }

  // Blocks until value() != seen or `deadline` passes. Returns true if the
  // value changed.
  template <class TimePoint>
  bool waitUntil(uint64_t seen, TimePoint deadline) {
    if (value() != seen) return true;
    waiters_.fetch_add(1, std::memory_order_seq_cst);
    bool changed;
    {
      std::unique_lock<std::mutex> lk(mu_);
      changed = cv_.wait_until(lk, deadline, [&] { return value() != seen; });
    }
    waiters_.fetch_sub(1, std::memory_order_seq_cst);
    return changed;
  }

 private:
  std::atomic<uint64_t> seq_{0};
  std::atomic<int> waiters_{0};
  std::mutex mu_;
  std::condition_variable cv_;
};

}  // namespace tcpx

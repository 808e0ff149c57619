// Progress threads for the socket net: each owns an epoll set and drives the
// non-blocking sockets registered with it.
//
// A socket (a PollHandler) belongs to exactly one thread, which alone calls
// its onEvents(); other threads only change its interest with modify()
// (epoll_ctl is thread-safe). Removal is the delicate part: a thread may hold
// an event for a handler in the batch it is dispatching, so a handler is only
// freed after its thread has passed the end of that batch — runOn() from
// another thread, deferDelete() from the owning one.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "common/status.h"

namespace tcpx {

class PollHandler {
 public:
  virtual ~PollHandler() = default;
  // Called on the owning thread with the epoll event mask.
  virtual void onEvents(uint32_t events) = 0;
};

class ProgressEngine {
 public:
  explicit ProgressEngine(int nthreads);
  ~ProgressEngine();

  int numThreads() const { return static_cast<int>(threads_.size()); }
  // Round-robin choice of a thread for a new socket.
  int pickThread();

  // Registers `fd` with thread `t`. Thread-safe.
  tcpxResult_t add(int t, int fd, PollHandler* h, uint32_t events);
  // Changes the interest set of a registered fd. Thread-safe.
  tcpxResult_t modify(int t, int fd, PollHandler* h, uint32_t events);
  // Removes `fd` from thread t's epoll set (no wait; see runOn/deferDelete).
  void removeFd(int t, int fd);

  // Runs `fn` on thread t between two event batches and waits for it to
  // finish. Called on thread t itself, runs `fn` at once.
  void runOn(int t, std::function<void()> fn);
  // On the owning thread: deletes `h` once the current batch is dispatched.
  void deferDelete(int t, PollHandler* h);
  // Calls `fn` about every `periodMs` on thread t until removeTicker(id).
  int addTicker(int t, int periodMs, std::function<void()> fn);
  void removeTicker(int t, int id);

  // True when called from one of this engine's threads (index in *t).
  bool onThread(int* t) const;

 private:
  struct Thread;
  void loop(Thread* th);
  std::vector<std::unique_ptr<Thread>> threads_;
  std::atomic<unsigned> next_{0};
};

}  // namespace tcpx

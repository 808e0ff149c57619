// Shared helpers of the C++ tests: an in-memory Store, a loopback socket
// net, and a runner that executes one function per rank on its own thread
// (gloo's style: ranks as threads over loopback).
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "net/interfaces.h"
#include "net/socket_net.h"
#include "transport/communicator.h"
#include "transport/store.h"

namespace tcpx {
namespace testing {

// A Store shared by the rank threads of one test; keys get a per-group prefix.
class MemStore : public Store {
 public:
  explicit MemStore(std::string prefix = "") : prefix_(std::move(prefix)) {}
  MemStore(std::shared_ptr<MemStore> base, std::string prefix)
      : prefix_(std::move(prefix)), base_(std::move(base)) {}

  tcpxResult_t set(const std::string& key, const std::vector<uint8_t>& value) override {
    MemStore& b = root();
    std::lock_guard<std::mutex> lk(b.mu_);
    b.kv_[prefix_ + key] = value;
    b.cv_.notify_all();
    return tcpxSuccess;
  }
  tcpxResult_t get(const std::string& key, std::chrono::milliseconds timeout,
                   std::vector<uint8_t>* value) override {
    MemStore& b = root();
    std::unique_lock<std::mutex> lk(b.mu_);
    if (!b.cv_.wait_for(lk, timeout, [&] { return b.kv_.count(prefix_ + key) > 0; })) {
      setLastError("store get timed out: " + key);
      return tcpxTimeout;
    }
    *value = b.kv_[prefix_ + key];
    return tcpxSuccess;
  }

 private:
  MemStore& root() { return base_ ? *base_ : *this; }
  std::string prefix_;
  std::shared_ptr<MemStore> base_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::vector<uint8_t>> kv_;
};

// A socket net over loopback only; null (with a test failure) if it cannot be made.
inline std::unique_ptr<SocketNet> makeLoopbackNet(int nsocks = 2, int nthreads = 2,
                                                  size_t sliceBytes = 128 * 1024,
                                                  size_t inlineBytes = 16 * 1024,
                                                  int handshakeTimeoutMs = 30000) {
  SocketNetOptions o;
  if (findNetDevices("lo", "/sys", &o.devices) != tcpxSuccess) {
    ADD_FAILURE() << "no loopback device: " << lastError();
    return nullptr;
  }
  o.nsocks = nsocks;
  o.nthreads = nthreads;
  o.sliceBytes = sliceBytes;
  o.inlineBytes = inlineBytes;
  o.handshakeTimeoutMs = handshakeTimeoutMs;
  std::unique_ptr<SocketNet> net;
  if (SocketNet::create(o, &net) != tcpxSuccess) {
    ADD_FAILURE() << "SocketNet::create: " << lastError();
    return nullptr;
  }
  return net;
}

// Runs fn(rank) on n threads and joins them.
inline void runRanks(int n, const std::function<void(int)>& fn) {
  std::vector<std::thread> ts;
  for (int r = 0; r < n; r++) ts.emplace_back(fn, r);
  for (auto& t : ts) t.join();
}

// Builds the communicators of one group, one per rank, over `net`.
// With `stages`, rank r's communicator runs device schedules on stages[r].
inline std::vector<std::unique_ptr<Communicator>> makeGroup(
    Net* net, int n, size_t chunkBytes = 64 * 1024, int buffers = 4,
    std::chrono::milliseconds timeout = std::chrono::milliseconds(60000),
    const std::vector<std::shared_ptr<DeviceStage>>& stages = {}) {
  static int groupCounter = 0;
  auto store = std::make_shared<MemStore>();
  std::string name = "g" + std::to_string(groupCounter++);
  std::vector<std::unique_ptr<Communicator>> comms(static_cast<size_t>(n));
  runRanks(n, [&](int r) {
    CommOptions o;
    o.rank = r;
    o.nranks = n;
    o.timeout = timeout;
    o.name = name;
    o.store = store;
    o.net = net;
    o.chunkBytes = chunkBytes;
    o.buffers = buffers;
    if (!stages.empty()) o.stage = stages[static_cast<size_t>(r)];
    EXPECT_EQ(Communicator::create(o, &comms[static_cast<size_t>(r)]), tcpxSuccess)
        << lastError();
  });
  return comms;
}

// Enqueues `task` and waits for its outcome.
// A loopback net and an n-rank group on it (the net outlives the comms);
// with `stages`, a group of device communicators (makeGroup).
struct LoopbackGroup {
  LoopbackGroup(int n, size_t chunkBytes, int buffers, std::chrono::milliseconds timeout,
                const std::vector<std::shared_ptr<DeviceStage>>& stages = {})
      : net(makeLoopbackNet()) {
    if (net) comms = makeGroup(net.get(), n, chunkBytes, buffers, timeout, stages);
  }
  bool ok() const {
    if (!net) return false;
    for (auto& c : comms)
      if (!c) return false;
    return true;
  }
  std::unique_ptr<Net> net;
  std::vector<std::unique_ptr<Communicator>> comms;
};

// Enqueues `task`; the future gives its outcome.
inline std::future<TaskResult> startTask(Communicator& comm, std::shared_ptr<Task> task) {
  auto done = std::make_shared<std::promise<TaskResult>>();
  auto fut = done->get_future();
  task->onComplete = [done](const TaskResult& r) { done->set_value(r); };
  comm.enqueue(std::move(task));
  return fut;
}

inline TaskResult runTask(Communicator& comm, std::shared_ptr<Task> task) {
  auto done = std::make_shared<std::promise<TaskResult>>();
  auto fut = done->get_future();
  task->onComplete = [done](const TaskResult& r) { done->set_value(r); };
  comm.enqueue(task);
  return fut.get();
}

}  // namespace testing
}  // namespace tcpx

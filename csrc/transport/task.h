// Work handed to a Communicator: a collective (a schedule built when it
// starts) or one side of a point-to-point transfer. The communicator's worker
// thread runs tasks in issue order and calls onComplete exactly once, on the
// worker thread, with the outcome.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/status.h"
#include "common/types.h"
#include "transport/schedule.h"

namespace tcpx {

struct TaskResult {
  tcpxResult_t code = tcpxSuccess;
  std::string message;
  int srcRank = -1;  // receives: the rank the message came from (-1: none matched)
  bool ok() const { return code == tcpxSuccess; }
};

class Task {
 public:
  enum class Type : uint8_t { kCollective, kSend, kRecv };
  explicit Task(Type t) : type(t) {}
  virtual ~Task() = default;

  const Type type;
  // What the task is, for error messages: "all_reduce(float32, 1024 elements, SUM)".
  std::string description;
  // Limit from the start of execution; <= 0 means the communicator's default.
  std::chrono::milliseconds timeout{0};
  std::function<void(const TaskResult&)> onComplete;
  // Optional: polled by the worker before the task touches its buffers
  // (collectives, sends); the task starts once it returns true. The CUDA
  // path's sends use it for "the staging copy is done" (a flag the GPU
  // writes). It must not call CUDA (transport/stage.h says why).
  std::function<bool()> gate;
  // Collectives of a device communicator: the stage op (DeviceStage::launch)
  // whose kernel runs this task's device work; the task starts once that
  // kernel runs, and the communicator ends the op when the task completes,
  // however it ends. 0: none.
  uint64_t deviceOp = 0;
};

class CollectiveTask : public Task {
 public:
  CollectiveTask() : Task(Type::kCollective) {}
  // Runs on the worker when the task starts; fills the schedule and its
  // header, and may do local work first (copies, scaling). An error fails
  // the task without any message sent.
  std::function<tcpxResult_t(Schedule*)> build;
  // Runs on the worker after every step succeeded (e.g. AVG's division), on
  // the stage the schedule ran on (Schedule::stage; null: host memory, also
  // for a host-staged op of a CUDA communicator).
  std::function<tcpxResult_t(DeviceStage*)> finish;
};

// Point-to-point: `bytes` of `data` to/from `peer`, matched by (peer, tag)
// in issue order; the receiver also checks size and data type. A receive
// with peer kAnySource takes the first matching message from any rank.
class P2PTask : public Task {
 public:
  static constexpr int kAnySource = -1;
  explicit P2PTask(Type t) : Task(t) {}
  int peer = kAnySource;
  int srcRank = -1;  // receive: the rank the message came from, once matched
  int64_t tag = 0;
  void* data = nullptr;
  size_t bytes = 0;
  DataType dtype = DataType::kUInt8;
};

}  // namespace tcpx

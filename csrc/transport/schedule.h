// A collective algorithm as a schedule: a graph of steps (send a chunk to a
// peer, receive a chunk from a peer and copy or reduce it into place) with
// dependencies, which the communicator executes with as much overlap as the
// dependencies allow.
//
// Rules an algorithm must follow:
//  - every message is at most chunkBytes() long (it lands in one bounce buffer);
//  - the sends to one peer are executed in the order they were added, and so
//    are the receives from one peer; the peer's schedule must add the matching
//    steps in the same order;
//  - a step that overwrites memory another step reads (or sends) must depend
//    on it, and a send of data produced by a receive must depend on that receive.
// A step starts when all its dependencies are done: a send is done when the
// net no longer needs its buffer, a receive when its data is copied/reduced.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/types.h"
#include "transport/message.h"

namespace tcpx {

// The arithmetic of a reduce step, provided by the collectives layer so that
// the transport does not depend on it: dst[i] = dst[i] op src[i], `count` elements.
using ReduceFn = void (*)(void* dst, const void* src, size_t count, DataType dtype, RedOp op);

class Schedule {
 public:
  using StepId = uint32_t;
  enum class StepType : uint8_t { kSend, kRecvCopy, kRecvReduce };

  struct Step {
    StepType type;
    int peer;
    char* buf;     // send: source; receive: destination
    size_t bytes;  // message size; a receive requires exactly this many
  };

  Schedule(int rank, int nranks, size_t chunkBytes)
      : rank_(rank), nranks_(nranks), chunkBytes_(chunkBytes) {}

  int rank() const { return rank_; }
  int nranks() const { return nranks_; }
  // The largest message a step may carry.
  size_t chunkBytes() const { return chunkBytes_; }

  // The header that identifies this operation to peers (seq is set by the
  // communicator when the schedule runs).
  MsgHeader header;
  // Reduction used by recvReduce steps.
  ReduceFn reduceFn = nullptr;

  StepId send(int peer, const void* src, size_t bytes) {
    return add(StepType::kSend, peer, const_cast<void*>(src), bytes);
  }
  StepId recv(int peer, void* dst, size_t bytes) {
    return add(StepType::kRecvCopy, peer, dst, bytes);
  }
  StepId recvReduce(int peer, void* dst, size_t bytes) {
    return add(StepType::kRecvReduce, peer, dst, bytes);
  }
  // `step` may start only once `dependsOn` is done.
  void after(StepId step, StepId dependsOn) { edges_.push_back({dependsOn, step}); }

  size_t numSteps() const { return steps_.size(); }
  const Step& step(StepId id) const { return steps_[id]; }
  const std::vector<std::pair<StepId, StepId>>& edges() const { return edges_; }

 private:
  StepId add(StepType t, int peer, void* buf, size_t bytes) {
    steps_.push_back({t, peer, static_cast<char*>(buf), bytes});
    return static_cast<StepId>(steps_.size() - 1);
  }

  int rank_;
  int nranks_;
  size_t chunkBytes_;
  std::vector<Step> steps_;
  std::vector<std::pair<StepId, StepId>> edges_;  // (before, after)
};

}  // namespace tcpx

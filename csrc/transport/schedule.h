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
#include "transport/stage.h"

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
    uint32_t op;      // index of the header it carries (headerOf)
    int peer;
    char* buf;        // send: source; receive: destination
    size_t bytes;     // message size; a receive requires exactly this many
    const char* own;  // recvReduce: the left operand when it is not buf itself
  };

  Schedule(int rank, int nranks, size_t chunkBytes)
      : rank_(rank), nranks_(nranks), chunkBytes_(chunkBytes) {}

  int rank() const { return rank_; }
  int nranks() const { return nranks_; }
  // The largest message a step may carry.
  size_t chunkBytes() const { return chunkBytes_; }

  // The header that identifies this operation to peers. A step carries the
  // value `header` had when the step was added, so one schedule can hold
  // several operations (a coalesced batch) or give the messages of each
  // peer pair their own parameter hash (all-to-all's split sizes); the
  // receiving step checks the same header. seq is set by the communicator.
  MsgHeader header;
  // Reduction used by recvReduce steps.
  ReduceFn reduceFn = nullptr;
  // Mixed into every step's parameter hash: a coalesced batch's signature.
  uint16_t batchSalt = 0;
  // Non-null: the steps' buffers are device memory, staged through pinned
  // chunks and unpacked on this stage (transport/stage.h); reduceFn is then
  // unused. The communicator sets its own stage before build(); a build
  // with host buffers (barrier) resets it.
  DeviceStage* stage = nullptr;

  StepId send(int peer, const void* src, size_t bytes) {
    return add(StepType::kSend, peer, const_cast<void*>(src), bytes);
  }
  StepId recv(int peer, void* dst, size_t bytes) {
    return add(StepType::kRecvCopy, peer, dst, bytes);
  }
  // dst = own op message; without `own` (or own == dst), dst = dst op message.
  // Reading `own` lets an algorithm keep the caller's input unchanged without
  // copying it into the accumulation buffer first.
  StepId recvReduce(int peer, void* dst, size_t bytes, const void* own = nullptr) {
    StepId id = add(StepType::kRecvReduce, peer, dst, bytes);
    if (own != dst) steps_[id].own = static_cast<const char*>(own);
    return id;
  }
  // `step` may start only once `dependsOn` is done.
  void after(StepId step, StepId dependsOn) { edges_.push_back({dependsOn, step}); }

  size_t numSteps() const { return steps_.size(); }
  const Step& step(StepId id) const { return steps_[id]; }
  const MsgHeader& headerOf(StepId id) const { return headers_[steps_[id].op]; }
  // Sets the sequence number of every operation in the schedule.
  void setSeq(uint32_t seq) {
    header.seq = seq;
    for (MsgHeader& h : headers_) h.seq = seq;
  }
  const std::vector<std::pair<StepId, StepId>>& edges() const { return edges_; }

 private:
  StepId add(StepType t, int peer, void* buf, size_t bytes) {
    MsgHeader h = header;
    h.phash = static_cast<uint16_t>((h.phash ^ batchSalt) & 0xfff);
    if (headers_.empty() || !headers_.back().sameOp(h)) headers_.push_back(h);
    steps_.push_back({t, static_cast<uint32_t>(headers_.size() - 1), peer,
                      static_cast<char*>(buf), bytes, nullptr});
    return static_cast<StepId>(steps_.size() - 1);
  }

  int rank_;
  int nranks_;
  size_t chunkBytes_;
  std::vector<Step> steps_;
  std::vector<MsgHeader> headers_;
  std::vector<std::pair<StepId, StepId>> edges_;  // (before, after)
};

}  // namespace tcpx

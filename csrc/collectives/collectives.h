// Collective operations as communicator tasks: argument checks, algorithm
// choice, and the local steps around the schedule (copies, PREMUL_SUM's
// scaling, AVG's division).
//
// Every maker validates its arguments (tcpxInvalidArgument with a message
// that names the argument and what is allowed) and returns a task whose
// onComplete the caller sets before enqueueing it. Buffers must stay valid
// until onComplete has run. Sizes are element counts unless named bytes.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "common/param.h"
#include "common/status.h"
#include "common/types.h"
#include "transport/communicator.h"
#include "transport/task.h"

namespace tcpx {

// Algorithm selection, from TCPX_ALGO and TCPX_ALGO_THRESHOLD.
struct CollConfig {
  std::string allreduceAlgo;  // "", "ring" or "rd"
  std::string broadcastAlgo;  // "", "chain" or "tree"
  size_t threshold = 64 * 1024;  // bytes: at or below, latency-optimal algorithms
  static CollConfig fromParams(const Params& p);
};

// In-place all-reduce of `count` elements at `buf`. `premulFactor` is used by
// PREMUL_SUM only. Ring above cfg.threshold bytes, recursive doubling below.
tcpxResult_t makeAllreduce(const Communicator& comm, const CollConfig& cfg, void* buf,
                           size_t count, DataType dtype, RedOp op, double premulFactor,
                           std::shared_ptr<CollectiveTask>* out);

// In-place broadcast of `count` elements at `buf` from `root`.
tcpxResult_t makeBroadcast(const Communicator& comm, const CollConfig& cfg, void* buf,
                           size_t count, DataType dtype, int root,
                           std::shared_ptr<CollectiveTask>* out);

// All-gather: outputs[i] receives rank i's `count` elements; `input` is this
// rank's (it may alias outputs[rank]).
tcpxResult_t makeAllgather(const Communicator& comm, const void* input,
                           const std::vector<void*>& outputs, size_t count, DataType dtype,
                           std::shared_ptr<CollectiveTask>* out);

// Reduce to `root` of `count` elements at `buf`: the root's buffer receives
// the result (in place); the other ranks' buffers are only read. Tree at or
// below cfg.threshold bytes, chain above.
tcpxResult_t makeReduce(const Communicator& comm, const CollConfig& cfg, void* buf, size_t count,
                        DataType dtype, RedOp op, double premulFactor, int root,
                        std::shared_ptr<CollectiveTask>* out);

// Reduce-scatter: inputs[i] (`count` elements each, one per rank) is this
// rank's contribution to the block that rank i receives; `output` receives
// this rank's reduced block. Inputs are only read (they may alias each other
// but not the output). Ring algorithm.
tcpxResult_t makeReduceScatter(const Communicator& comm, const std::vector<const void*>& inputs,
                               void* output, size_t count, DataType dtype, RedOp op,
                               double premulFactor, std::shared_ptr<CollectiveTask>* out);

// All-to-all: sends[i] (sendCounts[i] elements) goes to rank i, recvs[i]
// (recvCounts[i] elements) comes from rank i; counts may differ per rank
// (uneven splits) and must agree pairwise between ranks. Send and receive
// buffers must not overlap. Pairwise exchange.
tcpxResult_t makeAlltoall(const Communicator& comm, const std::vector<const void*>& sends,
                          const std::vector<size_t>& sendCounts, const std::vector<void*>& recvs,
                          const std::vector<size_t>& recvCounts, DataType dtype,
                          std::shared_ptr<CollectiveTask>* out);

// Gather to `root`: on the root outputs[i] receives rank i's `count`
// elements (outputs is empty elsewhere); `input` is this rank's.
tcpxResult_t makeGather(const Communicator& comm, const void* input,
                        const std::vector<void*>& outputs, size_t count, DataType dtype, int root,
                        std::shared_ptr<CollectiveTask>* out);

// Scatter from `root`: on the root inputs[i] (`count` elements) goes to rank
// i (inputs is empty elsewhere); `output` receives this rank's block.
tcpxResult_t makeScatter(const Communicator& comm, const std::vector<const void*>& inputs,
                         void* output, size_t count, DataType dtype, int root,
                         std::shared_ptr<CollectiveTask>* out);

// One collective made of several (a coalesced batch): their steps share one
// schedule and one sequence number, so their messages overlap instead of
// running one operation after another. Each part keeps its own header, so a
// rank that coalesced differently gets a mismatch error. The parts must not
// touch overlapping memory (their local steps all run before any message).
// The composite's onComplete is the caller's; the parts' are not called.
tcpxResult_t makeCoalesced(const std::vector<std::shared_ptr<CollectiveTask>>& parts,
                           std::shared_ptr<CollectiveTask>* out);

// A collective that fails at once on this rank with `reason`: it takes the
// operation's place in the group's sequence, and the communicator tells
// every peer (one ABORT each), so the peers' side of the operation fails
// instead of waiting, and the group stays usable. For an op whose arguments
// were rejected on this rank only (e.g. a bad gather_list on the root).
tcpxResult_t makeFailed(const std::string& description, const std::string& reason,
                        std::shared_ptr<CollectiveTask>* out);

// Barrier: completes once every rank of the group has entered it.
tcpxResult_t makeBarrier(const Communicator& comm, std::shared_ptr<CollectiveTask>* out);

// Point-to-point send/recv of `count` elements with a user tag.
tcpxResult_t makeSend(const Communicator& comm, const void* data, size_t count, DataType dtype,
                      int peer, int64_t tag, std::shared_ptr<P2PTask>* out);
tcpxResult_t makeRecv(const Communicator& comm, void* data, size_t count, DataType dtype,
                      int peer, int64_t tag, std::shared_ptr<P2PTask>* out);
// A receive from whichever rank sends first with this tag (MPI_ANY_SOURCE);
// the task's srcRank says which.
tcpxResult_t makeRecvAnySource(const Communicator& comm, void* data, size_t count,
                               DataType dtype, int64_t tag, std::shared_ptr<P2PTask>* out);

}  // namespace tcpx

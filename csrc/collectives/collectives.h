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

// Barrier: completes once every rank of the group has entered it.
tcpxResult_t makeBarrier(const Communicator& comm, std::shared_ptr<CollectiveTask>* out);

// Point-to-point send/recv of `count` elements with a user tag.
tcpxResult_t makeSend(const Communicator& comm, const void* data, size_t count, DataType dtype,
                      int peer, int64_t tag, std::shared_ptr<P2PTask>* out);
tcpxResult_t makeRecv(const Communicator& comm, void* data, size_t count, DataType dtype,
                      int peer, int64_t tag, std::shared_ptr<P2PTask>* out);

}  // namespace tcpx

#include "collectives/collectives.h"

#include <cstring>

#include "collectives/algorithms.h"
#include "collectives/reduce.h"
#include "common/utils.h"

namespace tcpx {
namespace {

std::string describe(const char* op, DataType dtype, size_t count, const char* extra = nullptr) {
  return strFormat("%s(%s, %zu elements%s%s)", op, dataTypeName(dtype), count,
                   extra ? ", " : "", extra ? extra : "");
}

void reduceThunk(void* dst, const void* src, size_t count, DataType dtype, RedOp op) {
  reduceInto(dst, src, count, dtype, op);
}

tcpxResult_t checkRoot(const Communicator& comm, int root, const char* what) {
  if (root < 0 || root >= comm.nranks())
    TCPX_ERR(tcpxInvalidArgument, "%s: root rank %d is invalid: expected 0 <= root < %d", what,
             root, comm.nranks());
  return tcpxSuccess;
}

tcpxResult_t checkPeer(const Communicator& comm, int peer, const char* what) {
  if (peer < 0 || peer >= comm.nranks())
    TCPX_ERR(tcpxInvalidArgument, "%s: peer rank %d is invalid: expected 0 <= rank < %d", what,
             peer, comm.nranks());
  if (peer == comm.rank())
    TCPX_ERR(tcpxInvalidArgument, "%s: peer rank %d is this rank; sending to itself is not allowed",
             what, peer);
  return tcpxSuccess;
}

}  // namespace

CollConfig CollConfig::fromParams(const Params& p) {
  CollConfig c;
  c.allreduceAlgo = p.algoFor("allreduce");
  c.broadcastAlgo = p.algoFor("broadcast");
  c.threshold = p.algoThreshold;
  return c;
}

tcpxResult_t makeAllreduce(const Communicator& comm, const CollConfig& cfg, void* buf,
                           size_t count, DataType dtype, RedOp op, double premulFactor,
                           std::shared_ptr<CollectiveTask>* out) {
  if (!redOpSupported(op, dtype))
    TCPX_ERR(tcpxInvalidArgument, "all_reduce: ReduceOp.%s is not supported for %s tensors%s",
             redOpName(op), dataTypeName(dtype),
             isFloatingType(dtype) ? " (bitwise ops need integer or bool tensors)"
                                   : op == RedOp::kPremulSum
                                         ? " (PREMUL_SUM needs a floating-point tensor)"
                                         : "");
  const size_t esz = dataTypeSize(dtype);
  const size_t bytes = count * esz;
  const int n = comm.nranks();
  std::string algo = cfg.allreduceAlgo;
  if (algo.empty()) algo = (bytes <= cfg.threshold || count < static_cast<size_t>(n)) ? "rd" : "ring";
  auto t = std::make_shared<CollectiveTask>();
  t->description = describe("all_reduce", dtype, count, redOpName(op));
  char* p = static_cast<char*>(buf);
  uint8_t algoId = algo == "ring" ? kAllreduceRing : kAllreduceRd;
  t->build = [=](Schedule* s) -> tcpxResult_t {
    s->header.kind = OpKind::kAllreduce;
    s->header.algo = algoId;
    s->header.dtype = dtype;
    s->header.redop = op;
    s->header.phash = paramHash(count);
    s->reduceFn = reduceThunk;
    if (op == RedOp::kPremulSum) scaleInPlace(p, count, dtype, premulFactor);
    if (algoId == kAllreduceRing) buildRingAllreduce(s, p, count, esz);
    else buildRdAllreduce(s, p, count, esz);
    return tcpxSuccess;
  };
  if (op == RedOp::kAvg) {
    t->finish = [=]() -> tcpxResult_t {
      divideInPlace(p, count, dtype, n);
      return tcpxSuccess;
    };
  }
  *out = t;
  return tcpxSuccess;
}

tcpxResult_t makeBroadcast(const Communicator& comm, const CollConfig& cfg, void* buf,
                           size_t count, DataType dtype, int root,
                           std::shared_ptr<CollectiveTask>* out) {
  TCPX_CHECK(checkRoot(comm, root, "broadcast"));
  const size_t bytes = count * dataTypeSize(dtype);
  std::string algo = cfg.broadcastAlgo;
  if (algo.empty()) algo = bytes <= cfg.threshold ? "tree" : "chain";
  uint8_t algoId = algo == "tree" ? kBroadcastTree : kBroadcastChain;
  auto t = std::make_shared<CollectiveTask>();
  t->description = describe("broadcast", dtype, count, strFormat("root %d", root).c_str());
  char* p = static_cast<char*>(buf);
  t->build = [=](Schedule* s) -> tcpxResult_t {
    s->header.kind = OpKind::kBroadcast;
    s->header.algo = algoId;
    s->header.dtype = dtype;
    s->header.phash = paramHash(count, static_cast<uint64_t>(root));
    if (algoId == kBroadcastTree) buildTreeBroadcast(s, p, bytes, root);
    else buildChainBroadcast(s, p, bytes, root);
    return tcpxSuccess;
  };
  *out = t;
  return tcpxSuccess;
}

tcpxResult_t makeAllgather(const Communicator& comm, const void* input,
                           const std::vector<void*>& outputs, size_t count, DataType dtype,
                           std::shared_ptr<CollectiveTask>* out) {
  if (outputs.size() != static_cast<size_t>(comm.nranks()))
    TCPX_ERR(tcpxInvalidArgument,
             "all_gather: %zu output buffers given, expected one per rank (%d)", outputs.size(),
             comm.nranks());
  const size_t bytes = count * dataTypeSize(dtype);
  auto t = std::make_shared<CollectiveTask>();
  t->description = describe("all_gather", dtype, count);
  std::vector<char*> segs;
  for (void* o : outputs) segs.push_back(static_cast<char*>(o));
  const char* in = static_cast<const char*>(input);
  const int r = comm.rank();
  t->build = [=](Schedule* s) -> tcpxResult_t {
    s->header.kind = OpKind::kAllgather;
    s->header.algo = kAllgatherRing;
    s->header.dtype = dtype;
    s->header.phash = paramHash(count);
    if (bytes && segs[r] != in) memmove(segs[r], in, bytes);
    buildRingAllgather(s, segs, bytes);
    return tcpxSuccess;
  };
  *out = t;
  return tcpxSuccess;
}

tcpxResult_t makeBarrier(const Communicator& comm, std::shared_ptr<CollectiveTask>* out) {
  auto t = std::make_shared<CollectiveTask>();
  t->description = "barrier()";
  // One token and one sink byte per round, owned by the task.
  auto scratch = std::make_shared<std::vector<char>>(128, 0);
  t->build = [scratch](Schedule* s) -> tcpxResult_t {
    s->header.kind = OpKind::kBarrier;
    s->header.algo = kBarrierDissemination;
    s->header.dtype = DataType::kUInt8;
    buildDisseminationBarrier(s, scratch->data(), scratch->data() + 64);
    return tcpxSuccess;
  };
  (void)comm;
  *out = t;
  return tcpxSuccess;
}

tcpxResult_t makeSend(const Communicator& comm, const void* data, size_t count, DataType dtype,
                      int peer, int64_t tag, std::shared_ptr<P2PTask>* out) {
  TCPX_CHECK(checkPeer(comm, peer, "send"));
  auto t = std::make_shared<P2PTask>(Task::Type::kSend);
  t->peer = peer;
  t->tag = tag;
  t->data = const_cast<void*>(data);
  t->bytes = count * dataTypeSize(dtype);
  t->dtype = dtype;
  t->description = strFormat("send(%s, %zu elements, to rank %d, tag %lld)", dataTypeName(dtype),
                             count, peer, static_cast<long long>(tag));
  *out = t;
  return tcpxSuccess;
}

tcpxResult_t makeRecv(const Communicator& comm, void* data, size_t count, DataType dtype,
                      int peer, int64_t tag, std::shared_ptr<P2PTask>* out) {
  TCPX_CHECK(checkPeer(comm, peer, "recv"));
  auto t = std::make_shared<P2PTask>(Task::Type::kRecv);
  t->peer = peer;
  t->tag = tag;
  t->data = data;
  t->bytes = count * dataTypeSize(dtype);
  t->dtype = dtype;
  t->description = strFormat("recv(%s, %zu elements, from rank %d, tag %lld)",
                             dataTypeName(dtype), count, peer, static_cast<long long>(tag));
  *out = t;
  return tcpxSuccess;
}

}  // namespace tcpx

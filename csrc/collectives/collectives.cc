#include "collectives/collectives.h"

#include <cstring>
#include <mutex>
#include <utility>

#include "collectives/algorithms.h"
#include "collectives/reduce.h"
#include "common/utils.h"
#include "transport/message.h"

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

tcpxResult_t checkRedOp(RedOp op, DataType dtype, const char* what) {
  if (!redOpSupported(op, dtype))
    TCPX_ERR(tcpxInvalidArgument, "%s: ReduceOp.%s is not supported for %s tensors%s", what,
             redOpName(op), dataTypeName(dtype),
             isFloatingType(dtype) ? " (bitwise ops need integer or bool tensors)"
                                   : op == RedOp::kPremulSum
                                         ? " (PREMUL_SUM needs a floating-point tensor)"
                                         : "");
  return tcpxSuccess;
}

// Buffers of finished tasks kept for the next ones: a fresh 64 MiB buffer
// costs 16k page faults (the kernel zeroes every page on first touch) each
// time an op allocates it. Best fit among at most kMaxKept buffers of
// kMaxKeptBytes in all; a cached buffer serves requests of at least half
// its size.
class ScratchCache {
 public:
  static ScratchCache& get() {
    static auto* cache = new ScratchCache();  // never destroyed (used at exit)
    return *cache;
  }
  std::pair<AlignedBuf, size_t> take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      size_t best = kept_.size();
      for (size_t i = 0; i < kept_.size(); i++)
        if (kept_[i].second >= bytes && kept_[i].second / 2 <= bytes &&
            (best == kept_.size() || kept_[i].second < kept_[best].second))
          best = i;
      if (best < kept_.size()) {
        auto out = std::move(kept_[best]);
        kept_.erase(kept_.begin() + static_cast<long>(best));
        keptBytes_ -= out.second;
        return out;
      }
    }
    return {allocAligned(bytes), bytes};
  }
  void give(AlignedBuf buf, size_t bytes) {
    std::lock_guard<std::mutex> lk(mu_);
    if (!buf || bytes > kMaxKeptBytes) return;
    kept_.emplace_back(std::move(buf), bytes);
    keptBytes_ += bytes;
    // Over the limits: drop the oldest.
    while (kept_.size() > kMaxKept || keptBytes_ > kMaxKeptBytes) {
      keptBytes_ -= kept_.front().second;
      kept_.erase(kept_.begin());
    }
  }

 private:
  static constexpr size_t kMaxKept = 8;
  static constexpr size_t kMaxKeptBytes = size_t{1} << 30;
  std::mutex mu_;
  std::vector<std::pair<AlignedBuf, size_t>> kept_;
  size_t keptBytes_ = 0;
};

// Scratch memory a task allocates when it starts (not while it is queued)
// and keeps until it is destroyed: in-flight sends of a failed task may
// still read it, and the task outlives them (communicator's draining list).
// Host memory then goes back to the ScratchCache; device memory (a device
// schedule's) back to the stage's stream-ordered pool.
class Scratch {
 public:
  explicit Scratch(std::shared_ptr<DeviceStage> dev) : dev_(std::move(dev)) {}
  ~Scratch() {
    for (auto& b : bufs_) ScratchCache::get().give(std::move(b.first), b.second);
    for (void* p : devBufs_) dev_->freeDevice(p);
  }
  // Device scratch is allocated when the op is issued (see stage.h):
  // reserve() takes the sizes the build will ask for, in order.
  void reserve(const std::vector<size_t>& sizes) {
    if (!dev_) return;
    for (size_t b : sizes) reserved_.push_back(static_cast<char*>(dev_->allocDevice(b)));
    for (char* p : reserved_)
      if (p) devBufs_.push_back(p);
  }
  // nullptr when out of memory (then the build fails with tcpxSystemError).
  char* alloc(size_t bytes) {
    if (dev_) {
      if (next_ < reserved_.size()) return reserved_[next_++];
      void* p = dev_->allocDevice(bytes);
      if (p) devBufs_.push_back(p);
      return static_cast<char*>(p);
    }
    bufs_.push_back(ScratchCache::get().take(bytes));
    return bufs_.back().first.get();
  }

 private:
  std::shared_ptr<DeviceStage> dev_;
  std::vector<std::pair<AlignedBuf, size_t>> bufs_;
  std::vector<void*> devBufs_;
  std::vector<char*> reserved_;
  size_t next_ = 0;
};

// The local steps of a collective, around its messages: on host memory, or
// enqueued on the comm stream of `dev` for a device schedule (in stream
// order before the staging copies of the steps that follow).
tcpxResult_t localCopy(DeviceStage* dev, void* dst, const void* src, size_t bytes) {
  if (!bytes || dst == src) return tcpxSuccess;
  if (dev) return dev->copy(dst, src, bytes, /*serial=*/true);
  memmove(dst, src, bytes);
  return tcpxSuccess;
}

tcpxResult_t localScale(DeviceStage* dev, void* buf, size_t count, DataType dtype, double factor) {
  if (dev) return dev->scale(buf, count, dtype, roundedScaleFactor(factor, dtype));
  scaleInPlace(buf, count, dtype, factor);
  return tcpxSuccess;
}

tcpxResult_t localDivide(DeviceStage* dev, void* buf, size_t count, DataType dtype, int64_t n) {
  if (dev) return dev->divide(buf, count, dtype, n);
  divideInPlace(buf, count, dtype, n);
  return tcpxSuccess;
}

#define TCPX_ALLOC(var, scratch, bytes)                                                  \
  char* var = (scratch)->alloc(bytes);                                                   \
  if (!var)                                                                               \
    TCPX_ERR(tcpxSystemError, "out of memory for %s of scratch", formatBytes(bytes).c_str())

// PREMUL_SUM multiplies this rank's contribution before the sum; ops that
// must leave their input unchanged scale a copy (returned; else `in`).
tcpxResult_t premulInput(DeviceStage* dev, Scratch* scratch, const char* in, size_t count,
                         DataType dtype, RedOp op, double factor, const char** out) {
  *out = in;
  if (op != RedOp::kPremulSum || count == 0) return tcpxSuccess;
  const size_t bytes = count * dataTypeSize(dtype);
  TCPX_ALLOC(copy, scratch, bytes);
  TCPX_CHECK(localCopy(dev, copy, in, bytes));
  TCPX_CHECK(localScale(dev, copy, count, dtype, factor));
  *out = copy;
  return tcpxSuccess;
}

void setHeader(Schedule* s, OpKind kind, uint8_t algo, DataType dtype, RedOp op, uint16_t phash) {
  s->header.kind = kind;
  s->header.algo = algo;
  s->header.dtype = dtype;
  s->header.redop = op;
  s->header.phash = phash;
}

std::function<tcpxResult_t(DeviceStage*)> avgFinish(RedOp op, void* buf, size_t count,
                                                    DataType dtype, int n) {
  if (op != RedOp::kAvg) return nullptr;
  return [=](DeviceStage* dev) -> tcpxResult_t { return localDivide(dev, buf, count, dtype, n); };
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
  TCPX_CHECK(checkRedOp(op, dtype, "all_reduce"));
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
    setHeader(s, OpKind::kAllreduce, algoId, dtype, op, paramHash(count));
    s->reduceFn = reduceThunk;
    if (op == RedOp::kPremulSum) TCPX_CHECK(localScale(s->stage, p, count, dtype, premulFactor));
    if (algoId == kAllreduceRing) buildRingAllreduce(s, p, count, esz);
    else buildRdAllreduce(s, p, count, esz);
    return tcpxSuccess;
  };
  t->finish = avgFinish(op, p, count, dtype, n);
  *out = t;
  return tcpxSuccess;
}

tcpxResult_t makeReduce(const Communicator& comm, const CollConfig& cfg, void* buf, size_t count,
                        DataType dtype, RedOp op, double premulFactor, int root,
                        std::shared_ptr<CollectiveTask>* out) {
  TCPX_CHECK(checkRoot(comm, root, "reduce"));
  TCPX_CHECK(checkRedOp(op, dtype, "reduce"));
  const size_t esz = dataTypeSize(dtype);
  const size_t bytes = count * esz;
  const bool tree = bytes <= cfg.threshold;
  const uint8_t algoId = tree ? kReduceTree : kReduceChain;
  const bool isRoot = comm.rank() == root;
  auto t = std::make_shared<CollectiveTask>();
  t->description = describe("reduce", dtype, count,
                            strFormat("%s, root %d", redOpName(op), root).c_str());
  char* p = static_cast<char*>(buf);
  auto scratch = std::make_shared<Scratch>(comm.sharedStage());
  if (!isRoot) {
    std::vector<size_t> sizes;
    if (op == RedOp::kPremulSum && count) sizes.push_back(bytes);
    sizes.push_back(bytes);
    scratch->reserve(sizes);
  }
  t->build = [=](Schedule* s) -> tcpxResult_t {
    setHeader(s, OpKind::kReduce, algoId, dtype, op, paramHash(count, static_cast<uint64_t>(root)));
    s->reduceFn = reduceThunk;
    // The root reduces into its own buffer; the others keep theirs intact
    // and accumulate partial sums in scratch.
    const char* in = p;
    char* acc = p;
    if (isRoot) {
      if (op == RedOp::kPremulSum) TCPX_CHECK(localScale(s->stage, p, count, dtype, premulFactor));
    } else {
      TCPX_CHECK(premulInput(s->stage, scratch.get(), p, count, dtype, op, premulFactor, &in));
      TCPX_ALLOC(partial, scratch, bytes);
      acc = partial;
    }
    if (tree) buildTreeReduce(s, in, acc, bytes, esz, root);
    else buildChainReduce(s, in, acc, bytes, esz, root);
    return tcpxSuccess;
  };
  if (isRoot) t->finish = avgFinish(op, p, count, dtype, comm.nranks());
  *out = t;
  return tcpxSuccess;
}

tcpxResult_t makeReduceScatter(const Communicator& comm, const std::vector<const void*>& inputs,
                               void* output, size_t count, DataType dtype, RedOp op,
                               double premulFactor, std::shared_ptr<CollectiveTask>* out) {
  const int n = comm.nranks();
  const int r = comm.rank();
  if (inputs.size() != static_cast<size_t>(n))
    TCPX_ERR(tcpxInvalidArgument,
             "reduce_scatter: %zu input blocks given, expected one per rank (%d)", inputs.size(), n);
  TCPX_CHECK(checkRedOp(op, dtype, "reduce_scatter"));
  const size_t esz = dataTypeSize(dtype);
  const size_t segBytes = count * esz;
  auto t = std::make_shared<CollectiveTask>();
  t->description = describe("reduce_scatter", dtype, count, redOpName(op));
  char* o = static_cast<char*>(output);
  auto scratch = std::make_shared<Scratch>(comm.sharedStage());
  std::vector<const char*> ins;
  for (const void* i : inputs) ins.push_back(static_cast<const char*>(i));
  {
    std::vector<size_t> sizes;
    if (op == RedOp::kPremulSum && count) sizes.assign(static_cast<size_t>(n), segBytes);
    if (n > 1) sizes.push_back(segBytes * static_cast<size_t>(n));
    scratch->reserve(sizes);
  }
  t->build = [=](Schedule* s) -> tcpxResult_t {
    setHeader(s, OpKind::kReduceScatter, kReduceScatterRing, dtype, op, paramHash(count));
    s->reduceFn = reduceThunk;
    std::vector<const char*> in(ins);
    for (auto& i : in)
      TCPX_CHECK(premulInput(s->stage, scratch.get(), i, count, dtype, op, premulFactor, &i));
    if (n == 1) return localCopy(s->stage, o, in[0], segBytes);
    // Partial sums of the blocks that pass through this rank go to scratch;
    // the block this rank keeps accumulates in the output.
    TCPX_ALLOC(partials, scratch, segBytes * static_cast<size_t>(n));
    std::vector<char*> acc;
    for (int i = 0; i < n; i++) acc.push_back(i == r ? o : partials + static_cast<size_t>(i) * segBytes);
    buildRingReduceScatter(s, in, acc, segBytes, esz);
    return tcpxSuccess;
  };
  t->finish = avgFinish(op, o, count, dtype, n);
  *out = t;
  return tcpxSuccess;
}

tcpxResult_t makeAlltoall(const Communicator& comm, const std::vector<const void*>& sends,
                          const std::vector<size_t>& sendCounts, const std::vector<void*>& recvs,
                          const std::vector<size_t>& recvCounts, DataType dtype,
                          std::shared_ptr<CollectiveTask>* out) {
  const size_t n = static_cast<size_t>(comm.nranks());
  if (sends.size() != n || sendCounts.size() != n || recvs.size() != n || recvCounts.size() != n)
    TCPX_ERR(tcpxInvalidArgument,
             "all_to_all: %zu send and %zu receive blocks given, expected one per rank (%zu)",
             sends.size(), recvs.size(), n);
  const int r = comm.rank();
  if (sendCounts[r] != recvCounts[r])
    TCPX_ERR(tcpxInvalidArgument,
             "all_to_all: this rank sends itself %zu elements but expects to receive %zu",
             sendCounts[r], recvCounts[r]);
  const size_t esz = dataTypeSize(dtype);
  std::vector<const char*> sb;
  std::vector<char*> rb;
  std::vector<size_t> sBytes, rBytes;
  size_t total = 0;
  for (size_t i = 0; i < n; i++) {
    sb.push_back(static_cast<const char*>(sends[i]));
    rb.push_back(static_cast<char*>(recvs[i]));
    sBytes.push_back(sendCounts[i] * esz);
    rBytes.push_back(recvCounts[i] * esz);
    total += sendCounts[i];
  }
  auto t = std::make_shared<CollectiveTask>();
  t->description = describe("all_to_all", dtype, total);
  t->build = [=](Schedule* s) -> tcpxResult_t {
    setHeader(s, OpKind::kAlltoall, kAlltoallPairwise, dtype, RedOp::kSum, paramHash(n));
    TCPX_CHECK(localCopy(s->stage, rb[r], sb[r], sBytes[r]));
    buildPairwiseAlltoall(s, sb, sBytes, rb, rBytes);
    return tcpxSuccess;
  };
  *out = t;
  return tcpxSuccess;
}

tcpxResult_t makeGather(const Communicator& comm, const void* input,
                        const std::vector<void*>& outputs, size_t count, DataType dtype, int root,
                        std::shared_ptr<CollectiveTask>* out) {
  TCPX_CHECK(checkRoot(comm, root, "gather"));
  const bool isRoot = comm.rank() == root;
  if (isRoot && outputs.size() != static_cast<size_t>(comm.nranks()))
    TCPX_ERR(tcpxInvalidArgument, "gather: %zu output buffers given on the root, expected %d",
             outputs.size(), comm.nranks());
  const size_t bytes = count * dataTypeSize(dtype);
  std::vector<char*> outs;
  for (void* o : outputs) outs.push_back(static_cast<char*>(o));
  const char* in = static_cast<const char*>(input);
  auto t = std::make_shared<CollectiveTask>();
  t->description = describe("gather", dtype, count, strFormat("root %d", root).c_str());
  t->build = [=](Schedule* s) -> tcpxResult_t {
    setHeader(s, OpKind::kGather, kGatherDirect, dtype, RedOp::kSum,
              paramHash(count, static_cast<uint64_t>(root)));
    if (isRoot) TCPX_CHECK(localCopy(s->stage, outs[root], in, bytes));
    buildDirectGather(s, in, outs, bytes, root);
    return tcpxSuccess;
  };
  *out = t;
  return tcpxSuccess;
}

tcpxResult_t makeScatter(const Communicator& comm, const std::vector<const void*>& inputs,
                         void* output, size_t count, DataType dtype, int root,
                         std::shared_ptr<CollectiveTask>* out) {
  TCPX_CHECK(checkRoot(comm, root, "scatter"));
  const bool isRoot = comm.rank() == root;
  if (isRoot && inputs.size() != static_cast<size_t>(comm.nranks()))
    TCPX_ERR(tcpxInvalidArgument, "scatter: %zu input buffers given on the root, expected %d",
             inputs.size(), comm.nranks());
  const size_t bytes = count * dataTypeSize(dtype);
  std::vector<const char*> ins;
  for (const void* i : inputs) ins.push_back(static_cast<const char*>(i));
  char* o = static_cast<char*>(output);
  auto t = std::make_shared<CollectiveTask>();
  t->description = describe("scatter", dtype, count, strFormat("root %d", root).c_str());
  t->build = [=](Schedule* s) -> tcpxResult_t {
    setHeader(s, OpKind::kScatter, kScatterDirect, dtype, RedOp::kSum,
              paramHash(count, static_cast<uint64_t>(root)));
    if (isRoot) TCPX_CHECK(localCopy(s->stage, o, ins[root], bytes));
    buildDirectScatter(s, ins, o, bytes, root);
    return tcpxSuccess;
  };
  *out = t;
  return tcpxSuccess;
}

tcpxResult_t makeCoalesced(const std::vector<std::shared_ptr<CollectiveTask>>& parts,
                           std::shared_ptr<CollectiveTask>* out) {
  if (parts.empty()) TCPX_ERR(tcpxInvalidArgument, "coalesced: no operations to run");
  if (parts.size() == 1) {
    *out = parts[0];
    return tcpxSuccess;
  }
  auto t = std::make_shared<CollectiveTask>();
  std::string what;
  for (size_t i = 0; i < parts.size() && i < 3; i++) what += (i ? ", " : "") + parts[i]->description;
  if (parts.size() > 3) what += ", ...";
  t->description = strFormat("coalesced(%zu ops: %s)", parts.size(), what.c_str());
  // Every message of part i carries hash(number of parts, i): ranks whose
  // batches differ in length disagree on their very first message.
  t->build = [parts](Schedule* s) -> tcpxResult_t {
    for (size_t i = 0; i < parts.size(); i++) {
      auto& p = parts[i];
      s->batchSalt = paramHash(parts.size(), i + 1);
      s->header = MsgHeader();
      if (p->build) TCPX_CHECK(p->build(s));
    }
    return tcpxSuccess;
  };
  t->finish = [parts](DeviceStage* dev) -> tcpxResult_t {
    for (auto& p : parts)
      if (p->finish) TCPX_CHECK(p->finish(dev));
    return tcpxSuccess;
  };
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
    setHeader(s, OpKind::kBroadcast, algoId, dtype, RedOp::kSum,
              paramHash(count, static_cast<uint64_t>(root)));
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
    setHeader(s, OpKind::kAllgather, kAllgatherRing, dtype, RedOp::kSum, paramHash(count));
    TCPX_CHECK(localCopy(s->stage, segs[r], in, bytes));
    buildRingAllgather(s, segs, bytes);
    return tcpxSuccess;
  };
  *out = t;
  return tcpxSuccess;
}

tcpxResult_t makeFailed(const std::string& description, const std::string& reason,
                        std::shared_ptr<CollectiveTask>* out) {
  auto t = std::make_shared<CollectiveTask>();
  t->description = description;
  t->build = [reason](Schedule*) -> tcpxResult_t {
    TCPX_ERR(tcpxInvalidArgument, "%s", reason.c_str());
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
    setHeader(s, OpKind::kBarrier, kBarrierDissemination, DataType::kUInt8, RedOp::kSum, 0);
    s->stage = nullptr;  // its buffers are host memory, on every communicator
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

tcpxResult_t makeRecvAnySource(const Communicator& comm, void* data, size_t count,
                               DataType dtype, int64_t tag, std::shared_ptr<P2PTask>* out) {
  (void)comm;
  auto t = std::make_shared<P2PTask>(Task::Type::kRecv);
  t->peer = P2PTask::kAnySource;
  t->tag = tag;
  t->data = data;
  t->bytes = count * dataTypeSize(dtype);
  t->dtype = dtype;
  t->description = strFormat("recv(%s, %zu elements, from any rank, tag %lld)",
                             dataTypeName(dtype), count, static_cast<long long>(tag));
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

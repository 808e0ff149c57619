#include "c10d/ProcessGroupTCPX.hpp"

#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>

#include "common/logging.h"
#include "common/param.h"
#include "common/utils.h"
#include "net/net.h"

namespace tcpx {
namespace {

// The c10d Store through the core's Store interface.
class C10dStore : public Store {
 public:
  explicit C10dStore(c10::intrusive_ptr<c10d::Store> store) : store_(std::move(store)) {}

  tcpxResult_t set(const std::string& key, const std::vector<uint8_t>& value) override {
    try {
      store_->set(key, value);
    } catch (const std::exception& e) {
      TCPX_ERR(tcpxRemoteError, "store set('%s') failed: %s", key.c_str(), e.what());
    }
    return tcpxSuccess;
  }

  tcpxResult_t get(const std::string& key, std::chrono::milliseconds timeout,
                   std::vector<uint8_t>* value) override {
    try {
      store_->wait({key}, timeout);
      *value = store_->get(key);
    } catch (const std::exception& e) {
      std::string what = e.what();
      bool timedOut = toLower(what).find("timeout") != std::string::npos ||
                      toLower(what).find("timed out") != std::string::npos;
      TCPX_ERR(timedOut ? tcpxTimeout : tcpxRemoteError, "store get('%s') failed: %s",
               key.c_str(), what.c_str());
    }
    return tcpxSuccess;
  }

 private:
  c10::intrusive_ptr<c10d::Store> store_;
};

// Turns a failed status into the exception a Python user expects:
// ValueError for bad input, DistBackendError (a RuntimeError) for the rest.
[[noreturn]] void throwStatus(tcpxResult_t r, const std::string& msg) {
  if (r == tcpxInvalidArgument) TORCH_CHECK_VALUE(false, "tcpx: ", msg);
  C10_THROW_ERROR(DistBackendError, "tcpx: " + msg);
}

void check(tcpxResult_t r) {
  if (r != tcpxSuccess) throwStatus(r, lastError());
}

std::exception_ptr toException(const TaskResult& r) {
  try {
    throwStatus(r.code, r.message);
  } catch (...) {
    return std::current_exception();
  }
}

// Maps a tensor's dtype onto the core's. Reductions need a supported dtype;
// operations that only move bytes take any dtype (as raw bytes).
bool mapDtype(at::ScalarType t, DataType* out) {
  switch (t) {
    case at::kFloat: *out = DataType::kFloat32; return true;
    case at::kDouble: *out = DataType::kFloat64; return true;
    case at::kHalf: *out = DataType::kFloat16; return true;
    case at::kBFloat16: *out = DataType::kBFloat16; return true;
    case at::kChar: *out = DataType::kInt8; return true;
    case at::kShort: *out = DataType::kInt16; return true;
    case at::kInt: *out = DataType::kInt32; return true;
    case at::kLong: *out = DataType::kInt64; return true;
    case at::kByte: *out = DataType::kUInt8; return true;
    case at::kBool: *out = DataType::kBool; return true;
    default: return false;
  }
}

// Element type and count for a byte-moving operation.
void moveShape(const at::Tensor& t, DataType* dtype, size_t* count) {
  if (mapDtype(t.scalar_type(), dtype)) {
    *count = static_cast<size_t>(t.numel());
  } else if (t.is_complex()) {
    // complex64/complex128 travel as pairs of float32/float64.
    *dtype = t.scalar_type() == at::kComplexFloat ? DataType::kFloat32 : DataType::kFloat64;
    *count = static_cast<size_t>(t.numel()) * 2;
  } else {
    *dtype = DataType::kUInt8;
    *count = static_cast<size_t>(t.numel()) * t.element_size();
  }
}

void checkTensor(const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK_VALUE(t.defined(), "tcpx ", op, ": ", what, " is undefined");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "tcpx ", op, ": ", what,
                    " has layout ", t.layout(), "; only dense (strided) tensors are supported");
  TORCH_CHECK_VALUE(t.device().is_cpu(), "tcpx ", op, ": ", what, " is on device '",
                    t.device().str(),
                    "'; this build of the tcpx backend supports CPU tensors only");
}

void checkSingle(const std::vector<at::Tensor>& ts, const char* op) {
  TORCH_CHECK_VALUE(ts.size() == 1, "tcpx ", op,
                    ": expected exactly one tensor per process, got ", ts.size());
  checkTensor(ts[0], op, "tensor");
}

// A contiguous tensor to run the operation on, and (for outputs) what copies
// the result back into the user's non-contiguous tensor.
at::Tensor contiguousView(const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

RedOp mapRedOp(const c10d::ReduceOp& op, double* factor) {
  *factor = 1.0;
  switch (op.op_) {
    case c10d::ReduceOp::SUM: return RedOp::kSum;
    case c10d::ReduceOp::AVG: return RedOp::kAvg;
    case c10d::ReduceOp::PRODUCT: return RedOp::kProduct;
    case c10d::ReduceOp::MIN: return RedOp::kMin;
    case c10d::ReduceOp::MAX: return RedOp::kMax;
    case c10d::ReduceOp::BAND: return RedOp::kBand;
    case c10d::ReduceOp::BOR: return RedOp::kBor;
    case c10d::ReduceOp::BXOR: return RedOp::kBxor;
    case c10d::ReduceOp::PREMUL_SUM: {
      auto* sup = dynamic_cast<c10d::NCCLPreMulSumSupplement*>(op.supplement_.get());
      TORCH_CHECK_VALUE(sup, "tcpx all_reduce: PREMUL_SUM without its factor; create it with "
                             "torch.distributed._make_nccl_premul_sum(factor)");
      if (sup->tensor_factor.defined()) {
        TORCH_CHECK_VALUE(sup->tensor_factor.numel() == 1,
                          "tcpx all_reduce: PREMUL_SUM factor tensor must have one element");
        *factor = sup->tensor_factor.to(at::kCPU).to(at::kDouble).item<double>();
      } else {
        *factor = sup->double_factor;
      }
      return RedOp::kPremulSum;
    }
    default:
      TORCH_CHECK_VALUE(false, "tcpx all_reduce: unsupported ReduceOp ", static_cast<int>(op.op_),
                        " (allowed: SUM, AVG, PRODUCT, MIN, MAX, BAND, BOR, BXOR, PREMUL_SUM)");
  }
}

}  // namespace

// ---------------------------------------------------------------- WorkTCPX

WorkTCPX::WorkTCPX(int rank, c10d::OpType opType, const char* profilingTitle,
                   std::vector<at::Tensor> outputs, std::string description,
                   const std::optional<std::vector<at::Tensor>>& inputs)
    : c10d::Work(rank, opType, profilingTitle, inputs),
      outputs_(std::move(outputs)),
      description_(std::move(description)),
      future_(c10::make_intrusive<c10::ivalue::Future>(
          c10::ListType::create(c10::TensorType::get()))) {}

void WorkTCPX::complete(const TaskResult& result) {
  if (result.ok()) {
    try {
      if (postprocess) postprocess();
    } catch (...) {
      auto e = std::current_exception();
      future_->setError(e);
      finish(e);
      return;
    }
    future_->markCompleted(c10::IValue(outputs_));
    finish();
  } else {
    auto e = toException(result);
    future_->setError(e);
    finish(e);
  }
}

bool WorkTCPX::wait(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (timeout == kNoTimeout) {
    cv_.wait(lock, [&] { return completed_; });
  } else if (!cv_.wait_for(lock, timeout, [&] { return completed_; })) {
    C10_THROW_ERROR(DistBackendError,
                    c10::str("tcpx: wait() timed out after ", timeout.count(), " ms; ",
                             description_, " has not completed"));
  }
  if (exception_) std::rethrow_exception(exception_);
  return true;
}

int WorkTCPX::sourceRank() const {
  TORCH_CHECK(srcRank >= 0, "sourceRank() is only defined for recv work");
  return srcRank;
}

// ---------------------------------------------------------- ProcessGroupTCPX

ProcessGroupTCPX::ProcessGroupTCPX(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                   int size, std::chrono::milliseconds timeout,
                                   std::string groupName, std::vector<int64_t> globalRanks)
    : c10d::Backend(rank, size), timeout_(timeout), groupName_(std::move(groupName)) {
  const Params* params = nullptr;
  check(getParams(&params));
  TORCH_CHECK_VALUE(params->net == "socket", "tcpx: TCPX_NET=", params->net,
                    " is not available in this build (the NCCL net-plugin loader is not "
                    "implemented yet); use TCPX_NET=socket");
  static std::once_flag reserved;
  std::call_once(reserved, [&] {
    if (params->nchannels != 1 || !params->gpuNicMap.empty())
      TCPX_WARN("TCPX_NCHANNELS and TCPX_GPU_NIC_MAP are reserved for multi-NIC striping and "
                "have no effect in this build");
  });
  collConfig_ = CollConfig::fromParams(*params);
  if (!globalRanks.empty() && static_cast<size_t>(rank) < globalRanks.size())
    setLogRank(static_cast<int>(globalRanks[rank]));
  else
    setLogRank(rank);
  Net* net = nullptr;
  check(getSocketNet(&net));
  CommOptions o;
  o.rank = rank;
  o.nranks = size;
  o.timeout = timeout;
  o.name = groupName_.empty() ? "default" : groupName_;
  o.store = std::make_shared<C10dStore>(store);
  o.net = net;
  o.dev = 0;
  o.chunkBytes = params->chunkBytes;
  o.buffers = params->buffers;
  o.spinUs = params->spinUs;
  check(Communicator::create(o, &comm_));
  static std::once_flag printed;
  std::call_once(printed, [&] {
    TCPX_INFO(kLogInit, "torch_tcpx: %s", describeParams(*params).c_str());
  });
}

ProcessGroupTCPX::~ProcessGroupTCPX() {
  if (comm_) comm_->shutdown();
}

c10::intrusive_ptr<c10d::Backend::Options> ProcessGroupTCPX::getBackendOptions() {
  auto o = c10::make_intrusive<c10d::Backend::Options>("tcpx", timeout_);
  o->group_name = groupName_;
  return o;
}

std::chrono::milliseconds ProcessGroupTCPX::opTimeout(std::chrono::milliseconds requested) const {
  return requested == c10d::kUnsetTimeout || requested.count() <= 0 ? timeout_ : requested;
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::enqueue(std::shared_ptr<Task> task,
                                                         c10::intrusive_ptr<WorkTCPX> work,
                                                         std::chrono::milliseconds timeout,
                                                         std::vector<at::Tensor> keep) {
  task->timeout = timeout;
  // The task holds the work and the buffers the net reads or writes until the
  // communicator lets go of it (which, after a failure, can be after the work
  // completed); the work holds nothing of the task.
  task->onComplete = [work, keep = std::move(keep)](const TaskResult& r) { work->complete(r); };
  comm_->enqueue(std::move(task));
  return work;
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::allreduce(std::vector<at::Tensor>& tensors,
                                                           const c10d::AllreduceOptions& opts) {
  checkSingle(tensors, "all_reduce");
  at::Tensor& t = tensors[0];
  DataType dtype;
  TORCH_CHECK_VALUE(mapDtype(t.scalar_type(), &dtype), "tcpx all_reduce: dtype ",
                    t.scalar_type(),
                    " is not supported (allowed: float32, float64, float16, bfloat16, int8, "
                    "int16, int32, int64, uint8, bool)");
  double factor = 1.0;
  RedOp op = mapRedOp(opts.reduceOp, &factor);
  at::Tensor buf = contiguousView(t);
  std::shared_ptr<CollectiveTask> task;
  check(makeAllreduce(*comm_, collConfig_, buf.data_ptr(), static_cast<size_t>(buf.numel()),
                      dtype, op, factor, &task));
  auto work = c10::make_intrusive<WorkTCPX>(rank_, c10d::OpType::ALLREDUCE, "tcpx:all_reduce",
                                            tensors, task->description,
                                            std::optional<std::vector<at::Tensor>>(tensors));
  if (!buf.is_same(t)) work->postprocess = [t, buf]() mutable { t.copy_(buf); };
  return enqueue(task, work, opTimeout(opts.timeout), {buf});
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::broadcast(std::vector<at::Tensor>& tensors,
                                                           const c10d::BroadcastOptions& opts) {
  checkSingle(tensors, "broadcast");
  TORCH_CHECK_VALUE(opts.rootTensor == 0, "tcpx broadcast: rootTensor must be 0, got ",
                    opts.rootTensor);
  TORCH_CHECK_VALUE(opts.rootRank >= 0 && opts.rootRank < size_, "tcpx broadcast: root rank ",
                    opts.rootRank, " is invalid: expected 0 <= root < ", size_);
  at::Tensor& t = tensors[0];
  DataType dtype;
  size_t count;
  moveShape(t, &dtype, &count);
  at::Tensor buf = contiguousView(t);
  std::shared_ptr<CollectiveTask> task;
  check(makeBroadcast(*comm_, collConfig_, buf.data_ptr(), count, dtype,
                      static_cast<int>(opts.rootRank), &task));
  auto work = c10::make_intrusive<WorkTCPX>(rank_, c10d::OpType::BROADCAST, "tcpx:broadcast",
                                            tensors, task->description,
                                            std::optional<std::vector<at::Tensor>>(tensors));
  if (!buf.is_same(t)) work->postprocess = [t, buf]() mutable { t.copy_(buf); };
  return enqueue(task, work, opTimeout(opts.timeout), {buf});
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::allgather(
    std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
    const c10d::AllgatherOptions& opts) {
  checkSingle(inputs, "all_gather");
  TORCH_CHECK_VALUE(outputs.size() == 1, "tcpx all_gather: expected one output list, got ",
                    outputs.size());
  std::vector<at::Tensor>& outs = outputs[0];
  TORCH_CHECK_VALUE(outs.size() == static_cast<size_t>(size_), "tcpx all_gather: ", outs.size(),
                    " output tensors given, expected one per rank (", size_, ")");
  const at::Tensor& in = inputs[0];
  for (size_t i = 0; i < outs.size(); i++) {
    checkTensor(outs[i], "all_gather", "output tensor");
    TORCH_CHECK_VALUE(outs[i].numel() == in.numel() && outs[i].scalar_type() == in.scalar_type(),
                      "tcpx all_gather: output tensor ", i, " has ", outs[i].numel(),
                      " elements of ", outs[i].scalar_type(), "; the input has ", in.numel(),
                      " of ", in.scalar_type(), " (they must match)");
  }
  DataType dtype;
  size_t count;
  moveShape(in, &dtype, &count);
  at::Tensor inBuf = contiguousView(in);
  std::vector<at::Tensor> outBufs;
  std::vector<void*> ptrs;
  bool copyBack = false;
  for (auto& o : outs) {
    outBufs.push_back(o.is_contiguous() ? o : at::empty_like(o, at::MemoryFormat::Contiguous));
    copyBack |= !outBufs.back().is_same(o);
    ptrs.push_back(outBufs.back().data_ptr());
  }
  std::shared_ptr<CollectiveTask> task;
  check(makeAllgather(*comm_, inBuf.data_ptr(), ptrs, count, dtype, &task));
  auto work = c10::make_intrusive<WorkTCPX>(rank_, c10d::OpType::ALLGATHER, "tcpx:all_gather",
                                            outs, task->description,
                                            std::optional<std::vector<at::Tensor>>(inputs));
  if (copyBack) {
    std::vector<at::Tensor> users = outs;
    work->postprocess = [users, outBufs]() mutable {
      for (size_t i = 0; i < users.size(); i++)
        if (!outBufs[i].is_same(users[i])) users[i].copy_(outBufs[i]);
    };
  }
  std::vector<at::Tensor> keep = outBufs;
  keep.push_back(inBuf);
  return enqueue(task, work, opTimeout(opts.timeout), std::move(keep));
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::_allgather_base(
    at::Tensor& output, at::Tensor& input, const c10d::AllgatherOptions& opts) {
  checkTensor(input, "all_gather_into_tensor", "input");
  checkTensor(output, "all_gather_into_tensor", "output");
  TORCH_CHECK_VALUE(output.scalar_type() == input.scalar_type(),
                    "tcpx all_gather_into_tensor: output dtype ", output.scalar_type(),
                    " differs from input dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(output.numel() == input.numel() * size_,
                    "tcpx all_gather_into_tensor: output has ", output.numel(),
                    " elements, expected input size x world size = ", input.numel() * size_);
  DataType dtype;
  size_t count;
  moveShape(input, &dtype, &count);
  at::Tensor inBuf = contiguousView(input);
  at::Tensor outBuf = contiguousView(output);
  const size_t segBytes = count * dataTypeSize(dtype);
  std::vector<void*> ptrs;
  for (int i = 0; i < size_; i++)
    ptrs.push_back(static_cast<char*>(outBuf.data_ptr()) + static_cast<size_t>(i) * segBytes);
  std::shared_ptr<CollectiveTask> task;
  check(makeAllgather(*comm_, inBuf.data_ptr(), ptrs, count, dtype, &task));
  auto work = c10::make_intrusive<WorkTCPX>(
      rank_, c10d::OpType::_ALLGATHER_BASE, "tcpx:all_gather_into_tensor",
      std::vector<at::Tensor>{output}, task->description,
      std::optional<std::vector<at::Tensor>>(std::vector<at::Tensor>{input}));
  if (!outBuf.is_same(output)) {
    at::Tensor o = output;
    work->postprocess = [o, outBuf]() mutable { o.copy_(outBuf); };
  }
  return enqueue(task, work, opTimeout(opts.timeout), {inBuf, outBuf});
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::barrier(const c10d::BarrierOptions& opts) {
  std::shared_ptr<CollectiveTask> task;
  check(makeBarrier(*comm_, &task));
  auto work = c10::make_intrusive<WorkTCPX>(rank_, c10d::OpType::BARRIER, "tcpx:barrier",
                                            std::vector<at::Tensor>{}, task->description,
                                            std::nullopt);
  return enqueue(task, work, opTimeout(opts.timeout), {});
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::send(std::vector<at::Tensor>& tensors,
                                                      int dstRank, int tag) {
  checkSingle(tensors, "send");
  checkPeer(dstRank, "send", "destination");
  at::Tensor buf = contiguousView(tensors[0]);
  DataType dtype;
  size_t count;
  moveShape(buf, &dtype, &count);
  std::shared_ptr<P2PTask> task;
  check(makeSend(*comm_, buf.data_ptr(), count, dtype, dstRank, tag, &task));
  auto work = c10::make_intrusive<WorkTCPX>(rank_, c10d::OpType::SEND, "tcpx:send", tensors,
                                            task->description,
                                            std::optional<std::vector<at::Tensor>>(tensors));
  return enqueue(task, work, timeout_, {buf});
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::recv(std::vector<at::Tensor>& tensors,
                                                      int srcRank, int tag) {
  checkSingle(tensors, "recv");
  checkPeer(srcRank, "recv", "source");
  at::Tensor& t = tensors[0];
  at::Tensor buf = contiguousView(t);
  DataType dtype;
  size_t count;
  moveShape(buf, &dtype, &count);
  std::shared_ptr<P2PTask> task;
  check(makeRecv(*comm_, buf.data_ptr(), count, dtype, srcRank, tag, &task));
  auto work = c10::make_intrusive<WorkTCPX>(rank_, c10d::OpType::RECV, "tcpx:recv", tensors,
                                            task->description, std::nullopt);
  work->srcRank = srcRank;
  if (!buf.is_same(t)) work->postprocess = [t, buf]() mutable { t.copy_(buf); };
  return enqueue(task, work, timeout_, {buf});
}

void ProcessGroupTCPX::checkPeer(int peer, const char* op, const char* role) const {
  TORCH_CHECK_VALUE(peer >= 0 && peer < size_ && peer != rank_, "tcpx ", op, ": ", role,
                    " rank ", peer, " is invalid: expected another rank of the group, 0 <= rank < ",
                    size_, " and rank != ", rank_);
}

uint64_t ProcessGroupTCPX::getSequenceNumberForGroup() { return comm_->collectivesIssued(); }

void ProcessGroupTCPX::abort() {
  if (comm_) comm_->abort("ProcessGroupTCPX::abort() was called");
}

void ProcessGroupTCPX::shutdown() {
  if (comm_) comm_->shutdown();
}

}  // namespace tcpx

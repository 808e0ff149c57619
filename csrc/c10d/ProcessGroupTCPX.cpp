#include "c10d/ProcessGroupTCPX.hpp"

#include <pthread.h>

#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include <ATen/core/ivalue.h>
#include <c10/core/StreamGuard.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

#ifdef TCPX_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "transport/stage.h"
#endif

#include "common/logging.h"
#include "common/param.h"
#include "common/utils.h"
#include "net/interfaces.h"
#include "net/net.h"
#include "net/pairing.h"
#include "transport/relay.h"

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

// The core's element type for moving t's data, and how many of its
// elements make one of t's (complex: pairs of reals; other unknown dtypes:
// raw bytes).
size_t moveUnits(const at::Tensor& t, DataType* dtype) {
  if (mapDtype(t.scalar_type(), dtype)) return 1;
  if (t.is_complex()) {
    *dtype = t.scalar_type() == at::kComplexFloat ? DataType::kFloat32 : DataType::kFloat64;
    return 2;
  }
  *dtype = DataType::kUInt8;
  return static_cast<size_t>(t.element_size());
}

// Element type and count for a byte-moving operation.
void moveShape(const at::Tensor& t, DataType* dtype, size_t* count) {
  *count = static_cast<size_t>(t.numel()) * moveUnits(t, dtype);
}

// The device of the first tensor the running op checked: where the peers
// run it, so that a failed op's stand-in goes to the same communicator.
thread_local std::optional<c10::Device> opDevice;

void checkTensor(const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK_VALUE(t.defined(), "tcpx ", op, ": ", what, " is undefined");
  if (!opDevice) opDevice = t.device();
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "tcpx ", op, ": ", what,
                    " has layout ", t.layout(), "; only dense (strided) tensors are supported");
#ifdef TCPX_WITH_CUDA
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device().is_cuda(), "tcpx ", op, ": ", what,
                    " is on device '", t.device().str(),
                    "'; the tcpx backend supports CPU and CUDA tensors");
#else
  TORCH_CHECK_VALUE(t.device().is_cpu(), "tcpx ", op, ": ", what, " is on device '",
                    t.device().str(),
                    "'; this build of the tcpx backend supports CPU tensors only (it was built "
                    "without CUDA)");
#endif
}

void checkSingle(const std::vector<at::Tensor>& ts, const char* op) {
  TORCH_CHECK_VALUE(ts.size() == 1, "tcpx ", op,
                    ": expected exactly one tensor per process, got ", ts.size());
  checkTensor(ts[0], op, "tensor");
}

RedOp mapRedOp(const c10d::ReduceOp& op, double* factor, const char* opName = "all_reduce") {
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
      TORCH_CHECK_VALUE(sup, "tcpx ", opName, ": PREMUL_SUM without its factor; create it with "
                             "torch.distributed._make_nccl_premul_sum(factor)");
      if (sup->tensor_factor.defined()) {
        TORCH_CHECK_VALUE(sup->tensor_factor.numel() == 1, "tcpx ", opName,
                          ": PREMUL_SUM factor tensor must have one element");
        *factor = sup->tensor_factor.to(at::kCPU).to(at::kDouble).item<double>();
      } else {
        *factor = sup->double_factor;
      }
      return RedOp::kPremulSum;
    }
    default:
      TORCH_CHECK_VALUE(false, "tcpx ", opName, ": unsupported ReduceOp ", static_cast<int>(op.op_),
                        " (allowed: SUM, AVG, PRODUCT, MIN, MAX, BAND, BOR, BXOR, PREMUL_SUM)");
  }
}

// The core's data type for a reducing op, or ValueError.
DataType reduceType(const at::Tensor& t, const char* op) {
  DataType dtype;
  TORCH_CHECK_VALUE(mapDtype(t.scalar_type(), &dtype), "tcpx ", op, ": dtype ", t.scalar_type(),
                    " is not supported (allowed: float32, float64, float16, bfloat16, int8, "
                    "int16, int32, int64, uint8, bool)");
  return dtype;
}

// ValueError unless every tensor has `like`'s dtype and `numel` elements.
void checkSameShape(const std::vector<at::Tensor>& ts, const at::Tensor& like, int64_t numel,
                    const char* op, const char* what) {
  for (size_t i = 0; i < ts.size(); i++) {
    checkTensor(ts[i], op, what);
    TORCH_CHECK_VALUE(ts[i].scalar_type() == like.scalar_type() && ts[i].numel() == numel,
                      "tcpx ", op, ": ", what, " ", i, " has ", ts[i].numel(), " elements of ",
                      ts[i].scalar_type(), "; expected ", numel, " of ", like.scalar_type());
  }
}

using ByteRange = std::pair<uintptr_t, uintptr_t>;

ByteRange byteRange(const at::Tensor& contiguous) {
  auto b = reinterpret_cast<uintptr_t>(contiguous.data_ptr());
  return {b, b + static_cast<uintptr_t>(contiguous.nbytes())};
}

bool overlap(const ByteRange& a, const ByteRange& b) {
  return a.first < b.second && b.first < a.second;
}

}  // namespace

// Contiguous buffers that stand in for the user's tensors while an op runs:
// the tensor itself when it is contiguous (and, for outputs, overlaps none
// of `avoid`), else a contiguous copy; what the op writes is copied back
// into the user's tensor when the work succeeds.
class Staging {
 public:
  explicit Staging(const char* op) : op_(op) {}
  // Only read by the op.
  at::Tensor in(const at::Tensor& t) { return add(t.is_contiguous() ? t : t.contiguous()); }
  // Read and written (in-place ops).
  at::Tensor inout(const at::Tensor& t) {
    at::Tensor b = t.is_contiguous() ? t : t.contiguous();
    if (!b.is_same(t)) back_.emplace_back(t, b);
    return add(b);
  }
  // Only written; a fresh buffer when the tensor is not contiguous or
  // overlaps one of `avoid` (the op's inputs).
  at::Tensor out(const at::Tensor& t, const std::vector<at::Tensor>& avoid = {}) {
    bool clash = false;
    if (t.is_contiguous())
      for (const at::Tensor& a : avoid) clash |= t.numel() && a.numel() && overlap(byteRange(t), byteRange(a));
    if (t.is_contiguous() && !clash) return add(t);
    at::Tensor b = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
    back_.emplace_back(t, b);
    return add(b);
  }
  // Every buffer, to keep alive while the op runs.
  const std::vector<at::Tensor>& buffers() const { return bufs_; }
  // The device of every tensor of the op (CPU when there are none).
  c10::Device device() const { return device_ ? *device_ : c10::Device(c10::kCPU); }
  // Makes `work` copy the results back when it completes: on the host for
  // CPU tensors, on the completion stream after the op for CUDA tensors.
  void attach(WorkTCPX& work) const {
    if (back_.empty()) return;
    if (device().is_cuda()) {
      work.deviceAfter.insert(work.deviceAfter.end(), back_.begin(), back_.end());
      return;
    }
    work.postprocess = [back = back_]() mutable {
      for (auto& [user, buf] : back) user.copy_(buf);
    };
  }

 private:
  at::Tensor add(at::Tensor b) {
    if (!device_) device_ = b.device();
    TORCH_CHECK_VALUE(b.device() == *device_, "tcpx ", op_,
                      ": all tensors of one op must be on the same device; got ",
                      device_->str(), " and ", b.device().str());
    bufs_.push_back(b);
    return b;
  }
  const char* op_;
  std::optional<c10::Device> device_;
  std::vector<at::Tensor> bufs_;
  std::vector<std::pair<at::Tensor, at::Tensor>> back_;
};

namespace {

// The data pointers of `ts`, as the core's makers take them.
template <class P = void*>
std::vector<P> dataPtrs(const std::vector<at::Tensor>& ts) {
  std::vector<P> v;
  for (const at::Tensor& t : ts) v.push_back(t.data_ptr());
  return v;
}

// Raises ValueError unless every tensor of `lists` is on one device: the
// ops of a coalesced call complete as one Work, which runs on one stream.
void checkOneDevice(const char* op, std::initializer_list<const std::vector<at::Tensor>*> lists) {
  std::optional<c10::Device> first;
  for (const auto* l : lists)
    for (const at::Tensor& t : *l) {
      if (!first) first = t.device();
      TORCH_CHECK_VALUE(t.device() == *first, "tcpx ", op,
                        ": all tensors of one call must be on the same device; got ",
                        first->str(), " and ", t.device().str());
    }
}

// A pinned host tensor shaped like CUDA tensor `t` (from PyTorch's caching
// host allocator), through which a point-to-point message travels; `t`
// itself for a CPU tensor.
at::Tensor pinnedLike(const at::Tensor& t) {
  if (!t.is_cuda()) return t;
  return at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(true));
}

}  // namespace

// ------------------------------------------------------ coalesced batches

// The ops issued while a batch is open, and the Work that completes when
// all of them have (with the first error, if any).
struct ProcessGroupTCPX::Batch {
  std::mutex mu;
  size_t pending = 0;
  bool sealed = false;
  TaskResult first;
  std::vector<at::Tensor> outputs;
  c10::intrusive_ptr<WorkTCPX> work;

  std::vector<std::function<void()>> streamWaits;  // of its CUDA ops
  bool hostWait = false;

  void add(const WorkTCPX& w) {
    std::lock_guard<std::mutex> lk(mu);
    pending++;
    hostWait |= w.hostWait;
    auto outs = const_cast<WorkTCPX&>(w).result();
    outputs.insert(outputs.end(), outs.begin(), outs.end());
    streamWaits.insert(streamWaits.end(), w.streamWaits.begin(), w.streamWaits.end());
  }
  void done(const TaskResult& r) {
    c10::intrusive_ptr<WorkTCPX> fire;
    {
      std::lock_guard<std::mutex> lk(mu);
      if (!r.ok() && first.ok()) first = r;
      if (--pending == 0 && sealed) fire = work;
    }
    if (fire) fire->complete(first);
  }
  void seal(c10::intrusive_ptr<WorkTCPX> w) {
    {
      std::lock_guard<std::mutex> lk(mu);
      w->streamWaits = streamWaits;
      w->hostWait = hostWait;
      work = w;
      sealed = true;
      if (pending) return;
    }
    w->complete(first);
  }
};

// Wraps every op. When the outermost op raises (bad arguments), the other
// ranks may have issued it fine: a collective still takes its place in the
// group's sequence as a failed operation that tells the peers
// (enqueueFailed), and an open coalescing block ends (torch will not call
// endCoalescing); if that block had collected collectives, they count as one
// failed operation too, like the composite the other ranks run.
class ProcessGroupTCPX::OpGuard {
 public:
  OpGuard(ProcessGroupTCPX* pg, const char* op, bool collective)
      : pg_(pg), op_(op), collective_(collective), unwinding_(std::uncaught_exceptions()) {
    if (pg_->opDepth_++ == 0) opDevice.reset();
  }
  ~OpGuard() {
    const bool outermost = --pg_->opDepth_ == 0;
    if (!outermost || std::uncaught_exceptions() <= unwinding_) return;
    try {
      const bool collected = !pg_->pending_.empty();
      pg_->abandonCoalescing();
      if (collective_ || collected) pg_->enqueueFailed(op_);
    } catch (...) {  // never throw while unwinding
    }
  }

 private:
  ProcessGroupTCPX* pg_;
  const char* op_;
  bool collective_;
  int unwinding_;
};

// ---------------------------------------------------------------- WorkTCPX

WorkTCPX::WorkTCPX(int rank, c10d::OpType opType, const char* profilingTitle,
                   std::vector<at::Tensor> outputs, std::string description,
                   const std::optional<std::vector<at::Tensor>>& inputs)
    : c10d::Work(rank, opType, profilingTitle, inputs),
      outputs_(std::move(outputs)),
      description_(std::move(description)),
      future_(c10::make_intrusive<c10::ivalue::Future>(
          c10::ListType::create(c10::TensorType::get()))) {}

namespace {

// Threads that complete Works whose Future may have callbacks. One thread
// serves completions in order; when every thread is busy (a callback
// blocks, e.g. waiting for another collective) a new one starts, so a
// blocked callback never holds up later completions. Idle threads beyond
// the first exit after a while. Process-wide and never destroyed: detached
// threads may still be finishing callbacks at exit.
class CompletionThreads {
 public:
  static CompletionThreads& get() {
    static auto* instance = new CompletionThreads();
    return *instance;
  }

  void post(std::function<void()> fn) {
    std::lock_guard<std::mutex> lk(mu_);
    queue_.push_back(std::move(fn));
    if (idle_ == 0) {
      threads_++;
      std::thread([this] { run(); }).detach();
    } else {
      cv_.notify_one();
    }
  }

 private:
  void run() {
    pthread_setname_np(pthread_self(), "tcpx-complete");
    std::unique_lock<std::mutex> lk(mu_);
    while (true) {
      idle_++;
      bool got = cv_.wait_for(lk, std::chrono::seconds(30), [&] { return !queue_.empty(); });
      idle_--;
      if (!got && threads_ > 1) {
        threads_--;
        return;
      }
      if (queue_.empty()) continue;
      auto fn = std::move(queue_.front());
      queue_.pop_front();
      lk.unlock();
      fn();
      // Its captures (Works, tensors) go now, outside the lock: their
      // destructors may call CUDA, which can block for as long as another
      // thread sits in a synchronous CUDA call, and the communicator's
      // worker must never wait for that to post a completion.
      fn = nullptr;
      lk.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  int idle_ = 0;
  int threads_ = 0;
};

}  // namespace

void WorkTCPX::complete(const TaskResult& result) {
  if (result.srcRank >= 0) srcRank = result.srcRank;
  std::exception_ptr error;
  if (result.ok()) {
    try {
      if (postprocess) postprocess();
    } catch (...) {
      error = std::current_exception();
    }
  } else {
    error = toException(result);
  }
  // Called on the worker for CPU ops, and already on a completion thread for
  // CUDA ops (enqueue posts their whole completion: the worker never calls
  // CUDA, and a device Future records events). A Future handed out moves
  // completion to a completion thread, so its callbacks never run on the worker.
  bool inlineNow;
  {
    std::lock_guard<std::mutex> lk(futureMu_);
    inlineNow = !futureRequested_;
    completingInline_ = inlineNow;
  }
  if (inlineNow) {
    completeNow(error);
    {
      std::lock_guard<std::mutex> lk(futureMu_);
      completingInline_ = false;
    }
    futureCv_.notify_all();
    return;
  }
  auto self = c10::intrusive_ptr<WorkTCPX>::unsafe_reclaim_from_nonowning(this);
  CompletionThreads::get().post([self, error] { self->completeNow(error); });
}

void WorkTCPX::useDeviceFuture(c10::Device device) {
  future_ = c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()),
                                                     std::vector<c10::Device>{device});
}

void WorkTCPX::completeNow(std::exception_ptr error) {
  // A device Future records its events on the current stream: make that the
  // completion stream, whose event follows the op and its copies.
  c10::OptionalStreamGuard guard(completionStream);
  if (error) {
    future_->setError(error);
    finish(error);
  } else {
    future_->markCompleted(c10::IValue(outputs_));
    finish();
  }
}

bool WorkTCPX::wait(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (!streamWaits.empty() && !hostWait && timeout == kNoTimeout) {
    if (completed_ && exception_) std::rethrow_exception(exception_);
    lock.unlock();
    synchronize();
    return true;
  }
  if (timeout == kNoTimeout) {
    cv_.wait(lock, [&] { return completed_; });
  } else if (!cv_.wait_for(lock, timeout, [&] { return completed_; })) {
    C10_THROW_ERROR(DistBackendError,
                    c10::str("tcpx: wait() timed out after ", timeout.count(), " ms; ",
                             description_, " has not completed"));
  }
  if (exception_) std::rethrow_exception(exception_);
  lock.unlock();
  synchronize();
  return true;
}

void WorkTCPX::synchronize() {
  for (auto& w : streamWaits) w();
}

int WorkTCPX::sourceRank() const {
  TORCH_CHECK(srcRank >= 0, "sourceRank() is only defined for recv work");
  return srcRank;
}

// ---------------------------------------------------------- ProcessGroupTCPX

ProcessGroupTCPX::ProcessGroupTCPX(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                   int size, std::chrono::milliseconds timeout,
                                   std::string groupName, std::vector<int64_t> globalRanks)
    : c10d::Backend(rank, size),
      timeout_(timeout),
      groupName_(std::move(groupName)),
      globalRanks_(std::move(globalRanks)) {
  const Params* params = nullptr;
  check(getParams(&params));
  TORCH_CHECK_VALUE(params->net == "socket", "tcpx: TCPX_NET=", params->net,
                    " is not available in this build (the NCCL net-plugin loader is not "
                    "implemented yet); use TCPX_NET=socket");
  {
    // TCPX_GPU_NIC_MAP is checked now (syntax, interfaces that are devices
    // of the net), not only at the first CUDA op.
    std::map<int, std::string> gpuNicMap;
    check(parseGpuNicMap(params->gpuNicMap, &gpuNicMap));
    std::vector<NetInterface> devs;
    check(selectNetDevices(params->socketIfname, params->socketFamily, "/sys", &devs));
    std::vector<int> pairing(gpuNicMap.empty() ? 0 : gpuNicMap.rbegin()->first + 1, 0);
    check(applyGpuNicMap(gpuNicMap, devs, &pairing));
  }
  collConfig_ = CollConfig::fromParams(*params);
  if (!globalRanks_.empty() && static_cast<size_t>(rank) < globalRanks_.size())
    setLogRank(static_cast<int>(globalRanks_[rank]));
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
  // CPU tensors: channels start on a NIC spread by local rank (torchrun's
  // LOCAL_RANK); CUDA tensors on their GPU's NIC (commFor).
  int ndev = 1;
  check(net->devices(&ndev));
  const char* localRank = getenv("LOCAL_RANK");
  o.dev = std::max(0, nicForLocalRank(localRank ? atoi(localRank) : 0, ndev));
  o.chunkBytes = params->chunkBytes;
  o.buffers = params->buffers;
  o.spinUs = params->spinUs;
  store_ = store;
  commOptions_ = o;
  params_ = params;
  check(Communicator::create(o, &comm_));
  static std::once_flag printed;
  std::call_once(printed, [&] {
    TCPX_INFO(kLogInit, "torch_tcpx: %s", describeParams(*params).c_str());
  });
}

ProcessGroupTCPX::~ProcessGroupTCPX() {
  cuda_.reset();
  if (comm_) comm_->shutdown();
}

// ------------------------------------------------------------------- CUDA

#ifdef TCPX_WITH_CUDA
namespace {

// A CUDA event without timing (ATen's CUDAEvent would pull in the cuBLAS/
// cuSPARSE headers, which the compile-only check of CI does not have).
// Events come from an EventPool and go back to it, so that issuing an op
// rarely creates one.
class DeviceEvent {
 public:
  explicit DeviceEvent(cudaEvent_t ev) : ev_(ev) {}
  cudaEvent_t get() const { return ev_; }
  void record(const c10::cuda::CUDAStream& s) { C10_CUDA_CHECK(cudaEventRecord(ev_, s.stream())); }
  void block(const c10::cuda::CUDAStream& s) const {
    C10_CUDA_CHECK(cudaStreamWaitEvent(s.stream(), ev_, 0));
  }
 private:
  cudaEvent_t ev_ = nullptr;
};

class EventPool : public std::enable_shared_from_this<EventPool> {
 public:
  explicit EventPool(c10::DeviceIndex device) : device_(device) {}
  ~EventPool() {
    for (cudaEvent_t e : free_) cudaEventDestroy(e);
  }
  // Creates `n` events now (on the caller's thread, before any op waits).
  void reserve(int n) {
    c10::cuda::CUDAGuard g(device_);
    std::lock_guard<std::mutex> lk(mu_);
    for (int i = 0; i < n; i++) {
      cudaEvent_t ev;
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
      free_.push_back(ev);
    }
  }
  // Called on threads that issue ops; creates an event only when all are in use.
  std::shared_ptr<DeviceEvent> get() {
    cudaEvent_t ev = nullptr;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (!free_.empty()) {
        ev = free_.back();
        free_.pop_back();
      }
    }
    if (!ev) {
      c10::cuda::CUDAGuard g(device_);
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    }
    auto self = shared_from_this();
    return std::shared_ptr<DeviceEvent>(new DeviceEvent(ev), [self](DeviceEvent* e) {
      {
        std::lock_guard<std::mutex> lk(self->mu_);
        self->free_.push_back(e->get());
      }
      delete e;
    });
  }

 private:
  c10::DeviceIndex device_;
  std::mutex mu_;
  std::vector<cudaEvent_t> free_;
};

}  // namespace

// The CUDA side of a group: its communicator (device collectives through a
// stage), the streams ops run on, and the flags of point-to-point ops.
struct ProcessGroupTCPX::CudaState {
  // Flags live in one slab of mapped pinned memory; flag k uses word k mod
  // kFlags and waits for the value k (wrap-around order), so a word is
  // reused only after 2^20 later flags, long after its waiter has finished.
  static constexpr uint32_t kFlags = 1u << 20;

  c10::Device device;
  std::unique_ptr<Communicator> comm;
  c10::cuda::CUDAStream collStream;     // collectives' op kernels and copies back, in issue order
  c10::cuda::CUDAStream stagingStream;  // point-to-point sends: device -> pinned
  std::map<int, c10::cuda::CUDAStream> p2pStreams;  // completion of p2p ops, per peer
  std::shared_ptr<EventPool> events;
  uint32_t* flags = nullptr;
  uint32_t gen = 0;
  // Host relay slots (TCPX_CUDA_HOST_BYTES), in mapped pinned memory. A slot
  // comes back after kRelaySlots later relays: their kernels run after this
  // one's on the same stream, and the worker touches a slot only between
  // its relay's gate and its publish, so one slot would do; more are slack.
  static constexpr int kRelaySlots = 8;
  char* relay = nullptr;
  size_t relayStride = 0;
  unsigned relayNext = 0;

  void* relaySlot(size_t bytes) {
    if (!relay || relaySlotBytes(bytes) > relayStride) return nullptr;
    return relay + (relayNext++ % kRelaySlots) * relayStride;
  }

  CudaState(c10::Device d)
      : device(d),
        collStream(c10::cuda::getStreamFromPool(true, d.index())),
        stagingStream(c10::cuda::getStreamFromPool(true, d.index())),
        events(std::make_shared<EventPool>(d.index())) {
    events->reserve(256);
  }

  ~CudaState() {
    // Every task completes (its op kernel exits, its flag is set) before the worker stops.
    if (comm) comm->shutdown();
    comm.reset();
    if (flags) cudaFreeHost(flags);
    if (relay) cudaFreeHost(relay);
  }

  c10::cuda::CUDAStream p2pStream(int peer) {
    auto it = p2pStreams.find(peer);
    if (it == p2pStreams.end())
      it = p2pStreams.emplace(peer, c10::cuda::getStreamFromPool(true, device.index())).first;
    return it->second;
  }
};
#else
struct ProcessGroupTCPX::CudaState {
  std::unique_ptr<Communicator> comm;  // never created without CUDA
  void* relaySlot(size_t) { return nullptr; }
};
#endif

#ifdef TCPX_WITH_CUDA
namespace {
// The net device (NIC) that CUDA device `gpu`'s channels start on: PCI
// pairing over all of the process's GPUs, TCPX_GPU_NIC_MAP applied
// (net/pairing.h); 0 when the pairing knows nothing.
int cudaNic(int gpu, const Params& p) {
  std::vector<NetInterface> devs;
  check(selectNetDevices(p.socketIfname, p.socketFamily, "/sys", &devs));
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  std::vector<std::string> busIds;
  for (int i = 0; i < n; i++) {
    char id[32] = {};
    if (cudaDeviceGetPCIBusId(id, sizeof(id), i) != cudaSuccess) cudaGetLastError();
    busIds.emplace_back(id);
  }
  std::vector<int> pairing;
  check(pairGpusWithMap("/sys", busIds, devs, p.gpuNicMap, &pairing));
  const int nic = gpu >= 0 && gpu < static_cast<int>(pairing.size()) ? pairing[gpu] : -1;
  if (nic >= 0)
    TCPX_INFO(kLogInit | kLogNet, "GPU %d (%s): channels start on %s", gpu,
              busIds[gpu].c_str(), devs[nic].name.c_str());
  return std::max(0, nic);
}
}  // namespace
#endif

Communicator& ProcessGroupTCPX::commFor(const c10::Device& device, const char* op) {
  if (device.is_cpu()) return *comm_;
#ifdef TCPX_WITH_CUDA
  if (cuda_) {
    TORCH_CHECK_VALUE(cuda_->device == device, "tcpx ", op, ": tensors are on ", device.str(),
                      " but this process group's CUDA ops use ", cuda_->device.str(),
                      "; one process uses one GPU per group (call torch.cuda.set_device)");
    return *cuda_->comm;
  }
  // First CUDA op: the CUDA communicator bootstraps through its own keys of
  // the group's store, like NCCL's lazy communicator. Every rank of the
  // group must issue CUDA ops for it to be created.
  c10::cuda::CUDAGuard guard(device);
  auto state = std::make_unique<CudaState>(device);
  CommOptions o = commOptions_;
  o.name += "/cuda";
  o.chunkBytes = params_->cudaChunkBytes;
  o.buffers = params_->cudaBuffers;
  o.nsocks = params_->cudaNsocks;
  o.store = std::make_shared<C10dStore>(c10::make_intrusive<c10d::PrefixStore>("cuda", store_));
  o.dev = cudaNic(device.index(), *params_);
  check(createCudaStage(device.index(), params_->cudaBlocks, &o.stage));
  cudaError_t e = cudaHostAlloc(reinterpret_cast<void**>(&state->flags),
                                CudaState::kFlags * sizeof(uint32_t),
                                cudaHostAllocMapped | cudaHostAllocPortable);
  if (e != cudaSuccess)
    throwStatus(tcpxUnhandledCudaError,
                c10::str("allocating completion flags failed: ", cudaGetErrorString(e)));
  memset(state->flags, 0, CudaState::kFlags * sizeof(uint32_t));
  if (params_->cudaHostBytes > 0) {
    // The largest slot of any size up to TCPX_CUDA_HOST_BYTES (LL-mode slots
    // are larger than their bytes suggest).
    const size_t most = params_->cudaHostBytes;
    state->relayStride = std::max(relaySlotBytes(most), relaySlotBytes(std::min(most, kRelayLLMax)));
    e = cudaHostAlloc(reinterpret_cast<void**>(&state->relay),
                      CudaState::kRelaySlots * state->relayStride,
                      cudaHostAllocMapped | cudaHostAllocPortable);
    if (e != cudaSuccess)
      throwStatus(tcpxUnhandledCudaError,
                  c10::str("allocating host relay slots failed: ", cudaGetErrorString(e)));
    memset(state->relay, 0, CudaState::kRelaySlots * state->relayStride);
  }
  check(Communicator::create(o, &state->comm));
  cuda_ = std::move(state);
  return *cuda_->comm;
#else
  TORCH_CHECK_VALUE(false, "tcpx ", op, ": tensors on ", device.str(),
                    " need a CUDA build of torch_tcpx");
#endif
}

std::function<void()> ProcessGroupTCPX::prepareCuda(Task& task, WorkTCPX& work,
                                                    const std::vector<at::Tensor>& keep,
                                                    int peer) {
#ifdef TCPX_WITH_CUDA
  CudaState& cs = *cuda_;
  c10::cuda::CUDAGuard guard(cs.device);
  const c10::DeviceIndex dev = cs.device.index();
  const auto current = c10::cuda::getCurrentCUDAStream(dev);
  const bool collective = task.type == Task::Type::kCollective;
  // The op's stream: collectives run their op kernel there (launchCuda);
  // point-to-point ops wait there for the host's flag. Either way it
  // follows the caller's stream, then copies back into the user's tensors,
  // then the event that wait() makes the current stream wait for.
  c10::cuda::CUDAStream done = collective ? cs.collStream : cs.p2pStream(peer);
  auto ready = cs.events->get();
  ready->record(current);
  ready->block(done);
  if (!work.deviceBefore.empty()) {
    // Sends: device -> pinned on the staging stream, which never waits for
    // the network (so an earlier receive cannot hold a send back); the GPU
    // then sets a flag that opens the task's gate.
    ready->block(cs.stagingStream);
    c10::cuda::CUDAStreamGuard sg(cs.stagingStream);
    for (auto& [dst, src] : work.deviceBefore) {
      dst.copy_(src, /*non_blocking=*/true);
      c10::cuda::CUDACachingAllocator::recordStream(src.storage().data_ptr(), cs.stagingStream);
    }
    const uint32_t gen = ++cs.gen;
    uint32_t* staged = &cs.flags[gen % CudaState::kFlags];
    check(streamWriteFlag(staged, gen, cs.stagingStream.stream()));
    task.gate = [staged, gen] {
      return static_cast<int32_t>(__atomic_load_n(staged, __ATOMIC_ACQUIRE) - gen) >= 0;
    };
  }
  work.completionStream = done.unwrap();
  work.useDeviceFuture(cs.device);
  work.hostWait = params_->cudaWait == "host";  // TCPX_CUDA_WAIT=host: wait() also blocks the host
  auto end = cs.events->get();
  work.streamWaits.push_back([end, dev] { end->block(c10::cuda::getCurrentCUDAStream(dev)); });
  // The caching allocator must not hand these tensors' memory to anyone
  // before the op's stream has passed the op (they may be dropped right
  // after the call).
  auto record = [&](const at::Tensor& t) {
    if (t.is_cuda()) c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), done);
  };
  for (const at::Tensor& t : keep) record(t);
  for (auto& [dst, src] : work.deviceAfter) record(dst);  // user tensors the copies back write
  auto after = [after = work.deviceAfter, done, end, dev] {
    c10::cuda::CUDAGuard g(dev);
    c10::cuda::CUDAStreamGuard sg(done);
    for (auto [dst, src] : after) dst.copy_(src, /*non_blocking=*/true);
    end->record(done);
  };
  // wait() may have returned already: streams go on with undefined
  // outputs, so say it where a user will see it (ProcessGroupNCCL's
  // watchdog does the same), besides storing the error in the Work.
  auto inner = std::move(task.onComplete);
  auto warnFailed = [what = work.description()](const TaskResult& r) {
    if (!r.ok())
      TCPX_WARN("%s failed; its CUDA outputs are undefined: %s", what.c_str(), r.message.c_str());
  };
  if (collective && !work.relaySlot) {
    task.onComplete = [inner, warnFailed](const TaskResult& r) {
      warnFailed(r);
      if (inner) inner(r);
    };
    return after;
  }
  if (work.relaySlot) {
    // Host relay: one kernel on the op's stream stages the input into the
    // slot, opens the task's gate and waits for the result, which the
    // worker publishes when the op is over, also when it failed (else the
    // kernel would never return).
    const uint32_t gen = ++cs.gen;
    const size_t bytes = static_cast<size_t>(work.relayTensor.nbytes());
    void* data = work.relayTensor.data_ptr();
    void* slot = work.relaySlot;
    check(streamHostRelay(data, data, bytes, slot, gen, done.stream()));
    task.gate = [slot, bytes, gen] { return relayStaged(slot, bytes, gen); };
    after();
    TCPX_TRACE(kLogC10d, "CUDA relay issued (generation %u): %s", gen, work.description().c_str());
    task.onComplete = [inner, slot, bytes, gen, warnFailed](const TaskResult& r) {
      relayPublish(slot, bytes, gen);
      warnFailed(r);
      if (inner) inner(r);
    };
    return nullptr;
  }
  // Point-to-point: the op's stream waits for a flag the worker sets when
  // the op is over (the net moved pinned memory; no device work on the worker).
  const uint32_t gen = ++cs.gen;
  uint32_t* flag = &cs.flags[gen % CudaState::kFlags];
  check(streamWaitFlag(flag, gen, done.stream(), params_->cudaWait == "memop"));
  after();
  TCPX_TRACE(kLogC10d, "CUDA op issued (flag %u): %s", gen, work.description().c_str());
  // The flag goes first: completing the Work (its Future records events)
  // runs on a completion thread, never on the worker (WorkTCPX::complete).
  task.onComplete = [inner, flag, gen, warnFailed](const TaskResult& r) {
    __atomic_store_n(flag, gen, __ATOMIC_RELEASE);
    warnFailed(r);
    if (inner) inner(r);
  };
  return nullptr;
#else
  (void)task, (void)work, (void)keep, (void)peer;
  return nullptr;
#endif
}

void ProcessGroupTCPX::launchCuda(Task& task, const std::vector<std::function<void()>>& after) {
#ifdef TCPX_WITH_CUDA
  CudaState& cs = *cuda_;
  c10::cuda::CUDAGuard guard(cs.device);
  uint64_t op = 0;
  if (cs.comm->stage()->launch(cs.collStream.stream(), &op) != tcpxSuccess) {
    std::string msg = lastError();
    if (task.onComplete) task.onComplete(TaskResult{tcpxUnhandledCudaError, msg});
    throwStatus(tcpxUnhandledCudaError, msg);
  }
  task.deviceOp = op;
  TCPX_TRACE(kLogC10d, "CUDA op %llu launched: %s", static_cast<unsigned long long>(op),
             task.description.c_str());
  for (auto& f : after)
    if (f) f();
#else
  (void)task, (void)after;
#endif
}

c10::intrusive_ptr<c10d::Backend::Options> ProcessGroupTCPX::getBackendOptions() {
  auto o = c10::make_intrusive<c10d::Backend::Options>("tcpx", timeout_);
  o->group_name = groupName_;
  for (int64_t g : globalRanks_) o->global_ranks_in_group.push_back(static_cast<uint64_t>(g));
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
  const bool collect = coalescing_ && task->type == Task::Type::kCollective;
  std::vector<ByteRange> ranges;  // the memory a collected op touches
  if (collect)
    for (const at::Tensor& t : keep)
      if (t.numel()) ranges.push_back(byteRange(t));
  bool isCuda = false;
  for (const at::Tensor& t : keep) isCuda |= t.is_cuda();
  Communicator& comm = isCuda ? *cuda_->comm : *comm_;
  // The task holds the work and the buffers the net reads or writes until the
  // communicator lets go of it (which, after a failure, can be after the work
  // completed); the work holds nothing of the task.
  if (isCuda) {
    // CUDA: the worker never calls CUDA (transport/stage.h), and letting go
    // of a tensor or a Work may: the caching allocator records events when
    // a recorded tensor is freed. So the whole completion, and the last
    // references, move to a completion thread, and the task keeps nothing.
    task->onComplete = [work, keep, batches = batches_](const TaskResult& r) mutable {
      CompletionThreads::get().post(
          [work = std::move(work), keep = std::move(keep), batches = std::move(batches), r]() mutable {
            work->complete(r);
            for (auto& b : batches) b->done(r);
            keep.clear();
          });
    };
  } else {
    task->onComplete = [work, keep, batches = batches_](const TaskResult& r) {
      work->complete(r);
      for (auto& b : batches) b->done(r);
    };
  }
  std::function<void()> after;
  if (isCuda) {
    int peer = task->type == Task::Type::kCollective ? -1 : static_cast<P2PTask&>(*task).peer;
    after = prepareCuda(*task, *work, keep, peer);
  }
  for (auto& b : batches_) b->add(*work);
  if (collect) {
    // The parts of a composite all prepare before any message moves, so an
    // op that touches memory of a collected one starts a new composite; so
    // does one on the other communicator (CPU vs CUDA tensors).
    bool clash = pendingComm_ && pendingComm_ != &comm;
    for (auto& a : ranges)
      for (auto& b : pendingRanges_) clash |= overlap(a, b);
    if (clash) flushCoalesced();
    pending_.push_back(std::static_pointer_cast<CollectiveTask>(task));
    pendingRanges_.insert(pendingRanges_.end(), ranges.begin(), ranges.end());
    pendingComm_ = &comm;
    if (after) pendingAfter_.push_back(std::move(after));
    return work;
  }
  if (isCuda && task->type == Task::Type::kCollective && !work->relaySlot)
    launchCuda(*task, {after});
  comm.enqueue(std::move(task));
  return work;
}

void ProcessGroupTCPX::flushCoalesced() {
  if (pending_.empty()) return;
  std::vector<std::shared_ptr<CollectiveTask>> parts;
  parts.swap(pending_);
  pendingRanges_.clear();
  Communicator* comm = pendingComm_;
  pendingComm_ = nullptr;
  std::vector<std::function<void()>> after;
  after.swap(pendingAfter_);
  std::shared_ptr<CollectiveTask> task;
  check(makeCoalesced(parts, &task));
  if (parts.size() > 1) {
    for (auto& p : parts) task->timeout = std::max(task->timeout, p->timeout);
    task->onComplete = [parts](const TaskResult& r) {
      for (auto& p : parts) p->onComplete(r);
    };
  }
  if (comm->stage()) launchCuda(*task, after);
  comm->enqueue(std::move(task));
}

void ProcessGroupTCPX::startCoalescing() {
  TORCH_CHECK(!coalescing_, "tcpx: startCoalescing() called inside an open coalescing block");
  abandoned_.reset();
  coalescing_ = true;
  batches_.push_back(std::make_shared<Batch>());
}

void ProcessGroupTCPX::abandonCoalescing() {
  if (!coalescing_) return;
  coalescing_ = false;
  std::vector<std::shared_ptr<CollectiveTask>> parts;
  parts.swap(pending_);
  pendingRanges_.clear();
  pendingComm_ = nullptr;
  pendingAfter_.clear();
  std::vector<std::shared_ptr<Batch>> batches;
  batches.swap(batches_);
  TaskResult cancelled{tcpxInvalidArgument,
                       "cancelled: an op of the same coalescing block raised an error before "
                       "anything was sent"};
  for (auto& p : parts) p->onComplete(cancelled);
  for (auto& b : batches) {
    auto w = c10::make_intrusive<WorkTCPX>(rank_, c10d::OpType::COALESCED, "tcpx:coalesced",
                                           b->outputs, "abandoned coalescing block",
                                           std::nullopt);
    b->seal(w);
    if (!abandoned_) abandoned_ = w;
  }
}

void ProcessGroupTCPX::enqueueFailed(const char* op) {
  std::shared_ptr<CollectiveTask> task;
  check(makeFailed(c10::str(op, " (rejected on rank ", rank_, ")"),
                   c10::str(op, " raised an error for its arguments on rank ", rank_), &task));
  task->timeout = timeout_;
  task->onComplete = [](const TaskResult&) {};
  Communicator* comm = comm_.get();
  if (opDevice && opDevice->is_cuda()) {
    try {
      comm = &commFor(*opDevice, op);
    } catch (...) {  // another device than the group's: the peers cannot have run it either
    }
  }
  comm->enqueue(std::move(task));
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::endCoalescing() {
  if (!coalescing_ && abandoned_) {  // the block ended early (an op raised)
    auto w = abandoned_;
    abandoned_.reset();
    return w;
  }
  TORCH_CHECK(coalescing_ && !batches_.empty(),
              "tcpx: endCoalescing() called without startCoalescing()");
  flushCoalesced();
  coalescing_ = false;
  auto batch = batches_.back();
  batches_.pop_back();
  auto work = c10::make_intrusive<WorkTCPX>(rank_, c10d::OpType::COALESCED, "tcpx:coalesced",
                                            batch->outputs, "coalesced batch", std::nullopt);
  batch->seal(work);
  return work;
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::coalesce(c10d::OpType opType, const char* title,
                                                          const std::function<void()>& issue) {
  const bool outer = !coalescing_;
  coalescing_ = true;
  auto batch = std::make_shared<Batch>();
  batches_.push_back(batch);
  // If an op raises, its OpGuard ends the whole block (abandonCoalescing):
  // none of the collected ops runs, on any rank that fails the same way.
  issue();
  batches_.pop_back();
  if (outer) {
    flushCoalesced();
    coalescing_ = false;
  }
  auto work = c10::make_intrusive<WorkTCPX>(rank_, opType, title, batch->outputs,
                                            c10::str(title, " batch"), std::nullopt);
  batch->seal(work);
  return work;
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::allreduce(std::vector<at::Tensor>& tensors,
                                                           const c10d::AllreduceOptions& opts) {
  OpGuard guard(this, "all_reduce", true);
  checkSingle(tensors, "all_reduce");
  DataType dtype = reduceType(tensors[0], "all_reduce");
  double factor = 1.0;
  RedOp op = mapRedOp(opts.reduceOp, &factor);
  Staging st("all_reduce");
  at::Tensor buf = st.inout(tensors[0]);
  Communicator& comm = commFor(st.device(), "all_reduce");
  // Small CUDA tensors go through the host relay: one kernel stages them in
  // pinned memory, the CPU path reduces there, no op-kernel round trips.
  const size_t nbytes = static_cast<size_t>(buf.nbytes());
  void* slot = buf.is_cuda() && !coalescing_ && nbytes > 0 && nbytes <= params_->cudaHostBytes
                   ? cuda_->relaySlot(nbytes)
                   : nullptr;
  std::shared_ptr<CollectiveTask> task;
  check(makeAllreduce(comm, collConfig_, slot ? relayData(slot) : buf.data_ptr(),
                      static_cast<size_t>(buf.numel()), dtype, op, factor, &task));
  auto work = c10::make_intrusive<WorkTCPX>(rank_, c10d::OpType::ALLREDUCE, "tcpx:all_reduce",
                                            tensors, task->description,
                                            std::optional<std::vector<at::Tensor>>(tensors));
  work->relaySlot = slot;
  if (slot) work->relayTensor = buf;
  st.attach(*work);
  return enqueue(task, work, opTimeout(opts.timeout), st.buffers());
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::broadcast(std::vector<at::Tensor>& tensors,
                                                           const c10d::BroadcastOptions& opts) {
  OpGuard guard(this, "broadcast", true);
  checkSingle(tensors, "broadcast");
  TORCH_CHECK_VALUE(opts.rootTensor == 0, "tcpx broadcast: rootTensor must be 0, got ",
                    opts.rootTensor);
  TORCH_CHECK_VALUE(opts.rootRank >= 0 && opts.rootRank < size_, "tcpx broadcast: root rank ",
                    opts.rootRank, " is invalid: expected 0 <= root < ", size_);
  DataType dtype;
  size_t count;
  moveShape(tensors[0], &dtype, &count);
  Staging st("broadcast");
  at::Tensor buf = st.inout(tensors[0]);
  std::shared_ptr<CollectiveTask> task;
  check(makeBroadcast(commFor(st.device(), "broadcast"), collConfig_, buf.data_ptr(), count, dtype,
                      static_cast<int>(opts.rootRank), &task));
  auto work = c10::make_intrusive<WorkTCPX>(rank_, c10d::OpType::BROADCAST, "tcpx:broadcast",
                                            tensors, task->description,
                                            std::optional<std::vector<at::Tensor>>(tensors));
  st.attach(*work);
  return enqueue(task, work, opTimeout(opts.timeout), st.buffers());
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::allgather(
    std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
    const c10d::AllgatherOptions& opts) {
  OpGuard guard(this, "all_gather", true);
  checkSingle(inputs, "all_gather");
  TORCH_CHECK_VALUE(outputs.size() == 1, "tcpx all_gather: expected one output list, got ",
                    outputs.size());
  std::vector<at::Tensor>& outs = outputs[0];
  TORCH_CHECK_VALUE(outs.size() == static_cast<size_t>(size_), "tcpx all_gather: ", outs.size(),
                    " output tensors given, expected one per rank (", size_, ")");
  const at::Tensor& in = inputs[0];
  checkSameShape(outs, in, in.numel(), "all_gather", "output tensor");
  DataType dtype;
  size_t count;
  moveShape(in, &dtype, &count);
  Staging st("all_gather");
  at::Tensor inBuf = st.in(in);
  std::vector<at::Tensor> outBufs;
  for (const at::Tensor& o : outs) outBufs.push_back(st.out(o));
  std::shared_ptr<CollectiveTask> task;
  check(makeAllgather(commFor(st.device(), "all_gather"), inBuf.data_ptr(), dataPtrs(outBufs), count, dtype, &task));
  auto work = c10::make_intrusive<WorkTCPX>(rank_, c10d::OpType::ALLGATHER, "tcpx:all_gather",
                                            outs, task->description,
                                            std::optional<std::vector<at::Tensor>>(inputs));
  st.attach(*work);
  return enqueue(task, work, opTimeout(opts.timeout), st.buffers());
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::_allgather_base(
    at::Tensor& output, at::Tensor& input, const c10d::AllgatherOptions& opts) {
  OpGuard guard(this, "all_gather_into_tensor", true);
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
  Staging st("all_gather_into_tensor");
  at::Tensor inBuf = st.in(input);
  // In place (the input is this rank's block of the output) is allowed.
  at::Tensor outBuf = st.out(output);
  const size_t segBytes = count * dataTypeSize(dtype);
  std::vector<void*> ptrs;
  for (int i = 0; i < size_; i++)
    ptrs.push_back(static_cast<char*>(outBuf.data_ptr()) + static_cast<size_t>(i) * segBytes);
  std::shared_ptr<CollectiveTask> task;
  check(makeAllgather(commFor(st.device(), "all_gather_into_tensor"), inBuf.data_ptr(), ptrs, count, dtype, &task));
  auto work = c10::make_intrusive<WorkTCPX>(
      rank_, c10d::OpType::_ALLGATHER_BASE, "tcpx:all_gather_into_tensor",
      std::vector<at::Tensor>{output}, task->description,
      std::optional<std::vector<at::Tensor>>(std::vector<at::Tensor>{input}));
  st.attach(*work);
  return enqueue(task, work, opTimeout(opts.timeout), st.buffers());
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::allgather_coalesced(
    std::vector<std::vector<at::Tensor>>& outputLists, std::vector<at::Tensor>& inputs,
    const c10d::AllgatherOptions& opts) {
  OpGuard guard(this, "all_gather_coalesced", true);
  // outputLists[r][i] receives rank r's inputs[i] (one list per rank).
  TORCH_CHECK_VALUE(outputLists.size() == static_cast<size_t>(size_),
                    "tcpx all_gather_coalesced: ", outputLists.size(),
                    " output lists given, expected one per rank (", size_, ")");
  for (size_t r = 0; r < outputLists.size(); r++)
    TORCH_CHECK_VALUE(outputLists[r].size() == inputs.size(), "tcpx all_gather_coalesced: output list ",
                      r, " has ", outputLists[r].size(), " tensors, expected one per input (",
                      inputs.size(), ")");
  return coalesce(c10d::OpType::ALLGATHER_COALESCED, "tcpx:all_gather_coalesced", [&] {
    for (size_t i = 0; i < inputs.size(); i++) {
      std::vector<std::vector<at::Tensor>> outs(1);
      for (auto& list : outputLists) outs[0].push_back(list[i]);
      std::vector<at::Tensor> in{inputs[i]};
      allgather(outs, in, opts);
    }
  });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::allgather_into_tensor_coalesced(
    std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
    const c10d::AllgatherOptions& opts) {
  OpGuard guard(this, "all_gather_into_tensor_coalesced", true);
  TORCH_CHECK_VALUE(outputs.size() == inputs.size(), "tcpx all_gather_into_tensor_coalesced: ",
                    outputs.size(), " outputs for ", inputs.size(), " inputs (they must pair up)");
  checkOneDevice("all_gather_into_tensor_coalesced", {&outputs, &inputs});
  return coalesce(c10d::OpType::COALESCED, "tcpx:all_gather_into_tensor_coalesced", [&] {
    for (size_t i = 0; i < inputs.size(); i++) _allgather_base(outputs[i], inputs[i], opts);
  });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::allreduce_coalesced(
    std::vector<at::Tensor>& tensors, const c10d::AllreduceCoalescedOptions& opts) {
  OpGuard guard(this, "all_reduce_coalesced", true);
  checkOneDevice("all_reduce_coalesced", {&tensors});
  return coalesce(c10d::OpType::ALLREDUCE_COALESCED, "tcpx:all_reduce_coalesced", [&] {
    for (at::Tensor& t : tensors) {
      std::vector<at::Tensor> one{t};
      allreduce(one, opts);
    }
  });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::reduce_scatter_tensor_coalesced(
    std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
    const c10d::ReduceScatterOptions& opts) {
  OpGuard guard(this, "reduce_scatter_tensor_coalesced", true);
  TORCH_CHECK_VALUE(outputs.size() == inputs.size(), "tcpx reduce_scatter_tensor_coalesced: ",
                    outputs.size(), " outputs for ", inputs.size(), " inputs (they must pair up)");
  checkOneDevice("reduce_scatter_tensor_coalesced", {&outputs, &inputs});
  // (OpType::REDUCE_SCATTER_TENSOR_COALESCED does not exist in torch 2.11.)
  return coalesce(c10d::OpType::COALESCED,
                  "tcpx:reduce_scatter_tensor_coalesced", [&] {
                    for (size_t i = 0; i < inputs.size(); i++)
                      _reduce_scatter_base(outputs[i], inputs[i], opts);
                  });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::reduce(std::vector<at::Tensor>& tensors,
                                                        const c10d::ReduceOptions& opts) {
  OpGuard guard(this, "reduce", true);
  checkSingle(tensors, "reduce");
  TORCH_CHECK_VALUE(opts.rootTensor == 0, "tcpx reduce: rootTensor must be 0, got ",
                    opts.rootTensor);
  TORCH_CHECK_VALUE(opts.rootRank >= 0 && opts.rootRank < size_, "tcpx reduce: root rank ",
                    opts.rootRank, " is invalid: expected 0 <= root < ", size_);
  at::Tensor& t = tensors[0];
  DataType dtype = reduceType(t, "reduce");
  double factor = 1.0;
  RedOp op = mapRedOp(opts.reduceOp, &factor, "reduce");
  Staging st("reduce");
  at::Tensor buf = rank_ == opts.rootRank ? st.inout(t) : st.in(t);
  std::shared_ptr<CollectiveTask> task;
  check(makeReduce(commFor(st.device(), "reduce"), collConfig_, buf.data_ptr(), static_cast<size_t>(buf.numel()), dtype,
                   op, factor, static_cast<int>(opts.rootRank), &task));
  auto work = c10::make_intrusive<WorkTCPX>(rank_, c10d::OpType::REDUCE, "tcpx:reduce", tensors,
                                            task->description,
                                            std::optional<std::vector<at::Tensor>>(tensors));
  st.attach(*work);
  return enqueue(task, work, opTimeout(opts.timeout), st.buffers());
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::reduce_scatter(
    std::vector<at::Tensor>& outputs, std::vector<std::vector<at::Tensor>>& inputs,
    const c10d::ReduceScatterOptions& opts) {
  OpGuard guard(this, "reduce_scatter", true);
  checkSingle(outputs, "reduce_scatter");
  TORCH_CHECK_VALUE(inputs.size() == 1, "tcpx reduce_scatter: expected one input list, got ",
                    inputs.size());
  TORCH_CHECK_VALUE(inputs[0].size() == static_cast<size_t>(size_), "tcpx reduce_scatter: ",
                    inputs[0].size(), " input tensors given, expected one per rank (", size_, ")");
  at::Tensor& out = outputs[0];
  checkSameShape(inputs[0], out, out.numel(), "reduce_scatter", "input tensor");
  DataType dtype = reduceType(out, "reduce_scatter");
  double factor = 1.0;
  RedOp op = mapRedOp(opts.reduceOp, &factor, "reduce_scatter");
  Staging st("reduce_scatter");
  std::vector<at::Tensor> ins;
  for (const at::Tensor& i : inputs[0]) ins.push_back(st.in(i));
  // The output may be this rank's own input block, nothing else of the input.
  std::vector<at::Tensor> avoid;
  for (int i = 0; i < size_; i++)
    if (i != rank_ || !ins[i].is_same(out)) avoid.push_back(ins[i]);
  at::Tensor o = st.out(out, avoid);
  std::shared_ptr<CollectiveTask> task;
  check(makeReduceScatter(commFor(st.device(), "reduce_scatter"), dataPtrs<const void*>(ins), o.data_ptr(), static_cast<size_t>(o.numel()),
                          dtype, op, factor, &task));
  auto work = c10::make_intrusive<WorkTCPX>(rank_, c10d::OpType::REDUCE_SCATTER,
                                            "tcpx:reduce_scatter", outputs, task->description,
                                            std::optional<std::vector<at::Tensor>>(inputs[0]));
  st.attach(*work);
  return enqueue(task, work, opTimeout(opts.timeout), st.buffers());
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::_reduce_scatter_base(
    at::Tensor& output, at::Tensor& input, const c10d::ReduceScatterOptions& opts) {
  OpGuard guard(this, "reduce_scatter_tensor", true);
  checkTensor(input, "reduce_scatter_tensor", "input");
  checkTensor(output, "reduce_scatter_tensor", "output");
  TORCH_CHECK_VALUE(output.scalar_type() == input.scalar_type(),
                    "tcpx reduce_scatter_tensor: output dtype ", output.scalar_type(),
                    " differs from input dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(input.numel() == output.numel() * size_,
                    "tcpx reduce_scatter_tensor: input has ", input.numel(),
                    " elements, expected output size x world size = ", output.numel() * size_);
  DataType dtype = reduceType(output, "reduce_scatter_tensor");
  double factor = 1.0;
  RedOp op = mapRedOp(opts.reduceOp, &factor, "reduce_scatter_tensor");
  Staging st("reduce_scatter_tensor");
  at::Tensor in = st.in(input);
  const size_t count = static_cast<size_t>(output.numel());
  const size_t segBytes = count * input.element_size();
  std::vector<const void*> blocks;
  for (int i = 0; i < size_; i++)
    blocks.push_back(static_cast<const char*>(in.data_ptr()) + static_cast<size_t>(i) * segBytes);
  // In place (the output is this rank's block of the input) is allowed.
  bool ownBlock = output.is_contiguous() && output.data_ptr() == blocks[rank_];
  at::Tensor o = ownBlock ? output : st.out(output, {in});
  std::shared_ptr<CollectiveTask> task;
  check(makeReduceScatter(commFor(st.device(), "reduce_scatter_tensor"), blocks, o.data_ptr(), count, dtype, op, factor, &task));
  auto work = c10::make_intrusive<WorkTCPX>(
      rank_, c10d::OpType::_REDUCE_SCATTER_BASE, "tcpx:reduce_scatter_tensor",
      std::vector<at::Tensor>{output}, task->description,
      std::optional<std::vector<at::Tensor>>(std::vector<at::Tensor>{input}));
  st.attach(*work);
  std::vector<at::Tensor> keep = st.buffers();
  keep.push_back(o);
  return enqueue(task, work, opTimeout(opts.timeout), std::move(keep));
}

namespace {

// Split sizes of all_to_all_single along dim 0: empty = equal parts.
std::vector<size_t> splitCounts(const at::Tensor& t, const std::vector<int64_t>& splits, int n,
                                const char* which) {
  const int64_t rows = t.dim() ? t.size(0) : 0;
  std::vector<size_t> counts;
  if (splits.empty()) {
    TORCH_CHECK_VALUE(rows % n == 0, "tcpx all_to_all_single: ", which, " dim 0 (", rows,
                      ") is not divisible by the world size (", n,
                      "); pass split sizes for uneven splits");
    counts.assign(static_cast<size_t>(n), static_cast<size_t>(rows / n));
    return counts;
  }
  TORCH_CHECK_VALUE(splits.size() == static_cast<size_t>(n), "tcpx all_to_all_single: ", which,
                    " split sizes have ", splits.size(), " entries, expected one per rank (", n,
                    ")");
  int64_t sum = 0;
  for (int64_t v : splits) {
    TORCH_CHECK_VALUE(v >= 0, "tcpx all_to_all_single: ", which, " split size ", v,
                      " is negative");
    sum += v;
    counts.push_back(static_cast<size_t>(v));
  }
  TORCH_CHECK_VALUE(sum == rows, "tcpx all_to_all_single: ", which, " split sizes add up to ",
                    sum, " but the tensor's dim 0 is ", rows);
  return counts;
}

}  // namespace

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::alltoall_base(
    at::Tensor& output, at::Tensor& input, std::vector<int64_t>& outputSplitSizes,
    std::vector<int64_t>& inputSplitSizes, const c10d::AllToAllOptions& opts) {
  OpGuard guard(this, "all_to_all_single", true);
  checkTensor(input, "all_to_all_single", "input");
  checkTensor(output, "all_to_all_single", "output");
  TORCH_CHECK_VALUE(output.scalar_type() == input.scalar_type(),
                    "tcpx all_to_all_single: output dtype ", output.scalar_type(),
                    " differs from input dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(input.dim() >= 1 && output.dim() >= 1,
                    "tcpx all_to_all_single: input and output need at least one dimension");
  const int64_t inRow = input.size(0) ? input.numel() / input.size(0) : 0;
  const int64_t outRow = output.size(0) ? output.numel() / output.size(0) : 0;
  TORCH_CHECK_VALUE(input.size(0) == 0 || output.size(0) == 0 || inRow == outRow,
                    "tcpx all_to_all_single: input rows have ", inRow,
                    " elements but output rows have ", outRow, " (dims after 0 must match)");
  std::vector<size_t> sendRows = splitCounts(input, inputSplitSizes, size_, "input");
  std::vector<size_t> recvRows = splitCounts(output, outputSplitSizes, size_, "output");
  DataType dtype;
  const size_t rowUnits = static_cast<size_t>(std::max(inRow, outRow)) * moveUnits(input, &dtype);
  Staging st("all_to_all_single");
  at::Tensor in = st.in(input);
  at::Tensor o = st.out(output, {in});
  const size_t unitBytes = dataTypeSize(dtype);
  std::vector<const void*> sends;
  std::vector<void*> recvs;
  std::vector<size_t> sendCounts, recvCounts;
  size_t sOff = 0, rOff = 0;
  for (int i = 0; i < size_; i++) {
    sends.push_back(static_cast<const char*>(in.data_ptr()) + sOff * unitBytes);
    recvs.push_back(static_cast<char*>(o.data_ptr()) + rOff * unitBytes);
    sendCounts.push_back(sendRows[i] * rowUnits);
    recvCounts.push_back(recvRows[i] * rowUnits);
    sOff += sendCounts.back();
    rOff += recvCounts.back();
  }
  std::shared_ptr<CollectiveTask> task;
  check(makeAlltoall(commFor(st.device(), "all_to_all_single"), sends, sendCounts, recvs, recvCounts, dtype, &task));
  auto work = c10::make_intrusive<WorkTCPX>(
      rank_, c10d::OpType::ALLTOALL_BASE, "tcpx:all_to_all_single",
      std::vector<at::Tensor>{output}, task->description,
      std::optional<std::vector<at::Tensor>>(std::vector<at::Tensor>{input}));
  st.attach(*work);
  return enqueue(task, work, opTimeout(opts.timeout), st.buffers());
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::alltoall(std::vector<at::Tensor>& outputs,
                                                          std::vector<at::Tensor>& inputs,
                                                          const c10d::AllToAllOptions& opts) {
  OpGuard guard(this, "all_to_all", true);
  TORCH_CHECK_VALUE(inputs.size() == static_cast<size_t>(size_) &&
                        outputs.size() == static_cast<size_t>(size_),
                    "tcpx all_to_all: ", inputs.size(), " input and ", outputs.size(),
                    " output tensors given, expected one of each per rank (", size_, ")");
  for (int i = 0; i < size_; i++) {
    checkTensor(inputs[i], "all_to_all", "input tensor");
    checkTensor(outputs[i], "all_to_all", "output tensor");
    TORCH_CHECK_VALUE(inputs[i].scalar_type() == inputs[0].scalar_type() &&
                          outputs[i].scalar_type() == inputs[0].scalar_type(),
                      "tcpx all_to_all: every input and output tensor must have dtype ",
                      inputs[0].scalar_type(), "; tensor ", i, " has ", inputs[i].scalar_type(),
                      " / ", outputs[i].scalar_type());
  }
  TORCH_CHECK_VALUE(inputs[rank_].numel() == outputs[rank_].numel(), "tcpx all_to_all: input ",
                    rank_, " (to this rank itself) has ", inputs[rank_].numel(),
                    " elements but output ", rank_, " has ", outputs[rank_].numel());
  Staging st("all_to_all");
  std::vector<at::Tensor> ins, outs;
  for (const at::Tensor& i : inputs) ins.push_back(st.in(i));
  for (const at::Tensor& o : outputs) outs.push_back(st.out(o, ins));
  DataType dtype;
  std::vector<size_t> sendCounts, recvCounts;
  size_t count;
  for (int i = 0; i < size_; i++) {
    moveShape(ins[i], &dtype, &count);
    sendCounts.push_back(count);
    moveShape(outs[i], &dtype, &count);
    recvCounts.push_back(count);
  }
  std::shared_ptr<CollectiveTask> task;
  check(makeAlltoall(commFor(st.device(), "all_to_all"), dataPtrs<const void*>(ins), sendCounts, dataPtrs(outs), recvCounts, dtype, &task));
  auto work = c10::make_intrusive<WorkTCPX>(rank_, c10d::OpType::ALLTOALL, "tcpx:all_to_all",
                                            outputs, task->description,
                                            std::optional<std::vector<at::Tensor>>(inputs));
  st.attach(*work);
  return enqueue(task, work, opTimeout(opts.timeout), st.buffers());
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::gather(
    std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
    const c10d::GatherOptions& opts) {
  OpGuard guard(this, "gather", true);
  checkSingle(inputs, "gather");
  TORCH_CHECK_VALUE(opts.rootRank >= 0 && opts.rootRank < size_, "tcpx gather: root rank ",
                    opts.rootRank, " is invalid: expected 0 <= root < ", size_);
  const bool isRoot = rank_ == opts.rootRank;
  const at::Tensor& input = inputs[0];
  Staging st("gather");
  std::vector<at::Tensor> outs;
  if (isRoot) {
    TORCH_CHECK_VALUE(outputs.size() == 1 && outputs[0].size() == static_cast<size_t>(size_),
                      "tcpx gather: the root needs a gather_list of one tensor per rank (", size_,
                      "), got ", outputs.empty() ? 0 : outputs[0].size());
    checkSameShape(outputs[0], input, input.numel(), "gather", "gather_list tensor");
  } else {
    TORCH_CHECK_VALUE(outputs.empty() || (outputs.size() == 1 && outputs[0].empty()),
                      "tcpx gather: gather_list must be empty on non-root ranks");
  }
  at::Tensor in = st.in(input);
  if (isRoot)
    for (const at::Tensor& o : outputs[0]) outs.push_back(st.out(o, {in}));
  DataType dtype;
  size_t count;
  moveShape(in, &dtype, &count);
  std::shared_ptr<CollectiveTask> task;
  check(makeGather(commFor(st.device(), "gather"), in.data_ptr(), dataPtrs(outs), count, dtype,
                   static_cast<int>(opts.rootRank), &task));
  auto work = c10::make_intrusive<WorkTCPX>(
      rank_, c10d::OpType::GATHER, "tcpx:gather",
      isRoot ? outputs[0] : std::vector<at::Tensor>{}, task->description,
      std::optional<std::vector<at::Tensor>>(inputs));
  st.attach(*work);
  return enqueue(task, work, opTimeout(opts.timeout), st.buffers());
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::scatter(
    std::vector<at::Tensor>& outputs, std::vector<std::vector<at::Tensor>>& inputs,
    const c10d::ScatterOptions& opts) {
  OpGuard guard(this, "scatter", true);
  checkSingle(outputs, "scatter");
  TORCH_CHECK_VALUE(opts.rootRank >= 0 && opts.rootRank < size_, "tcpx scatter: root rank ",
                    opts.rootRank, " is invalid: expected 0 <= root < ", size_);
  const bool isRoot = rank_ == opts.rootRank;
  const at::Tensor& output = outputs[0];
  Staging st("scatter");
  std::vector<at::Tensor> ins;
  if (isRoot) {
    TORCH_CHECK_VALUE(inputs.size() == 1 && inputs[0].size() == static_cast<size_t>(size_),
                      "tcpx scatter: the root needs a scatter_list of one tensor per rank (",
                      size_, "), got ", inputs.empty() ? 0 : inputs[0].size());
    checkSameShape(inputs[0], output, output.numel(), "scatter", "scatter_list tensor");
    for (const at::Tensor& i : inputs[0]) ins.push_back(st.in(i));
  } else {
    TORCH_CHECK_VALUE(inputs.empty() || (inputs.size() == 1 && inputs[0].empty()),
                      "tcpx scatter: scatter_list must be empty on non-root ranks");
  }
  at::Tensor o = st.out(output, ins);
  DataType dtype;
  size_t count;
  moveShape(o, &dtype, &count);
  std::shared_ptr<CollectiveTask> task;
  check(makeScatter(commFor(st.device(), "scatter"), dataPtrs<const void*>(ins), o.data_ptr(), count, dtype,
                    static_cast<int>(opts.rootRank), &task));
  auto work = c10::make_intrusive<WorkTCPX>(
      rank_, c10d::OpType::SCATTER, "tcpx:scatter", outputs, task->description,
      isRoot ? std::optional<std::vector<at::Tensor>>(inputs[0]) : std::nullopt);
  st.attach(*work);
  return enqueue(task, work, opTimeout(opts.timeout), st.buffers());
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::barrier(const c10d::BarrierOptions& opts) {
  OpGuard guard(this, "barrier", true);
  std::shared_ptr<CollectiveTask> task;
  check(makeBarrier(*comm_, &task));
  auto work = c10::make_intrusive<WorkTCPX>(rank_, c10d::OpType::BARRIER, "tcpx:barrier",
                                            std::vector<at::Tensor>{}, task->description,
                                            std::nullopt);
  return enqueue(task, work, opTimeout(opts.timeout), {});
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::send(std::vector<at::Tensor>& tensors,
                                                      int dstRank, int tag) {
  OpGuard guard(this, "send", false);
  checkSingle(tensors, "send");
  checkPeer(dstRank, "send", "destination");
  Staging st("send");
  at::Tensor buf = st.in(tensors[0]);
  DataType dtype;
  size_t count;
  moveShape(buf, &dtype, &count);
  Communicator& comm = commFor(st.device(), "send");
  // CUDA: the message goes out of a pinned copy made on the device.
  at::Tensor wire = pinnedLike(buf);
  std::shared_ptr<P2PTask> task;
  check(makeSend(comm, wire.data_ptr(), count, dtype, dstRank, tag, &task));
  auto work = c10::make_intrusive<WorkTCPX>(rank_, c10d::OpType::SEND, "tcpx:send", tensors,
                                            task->description,
                                            std::optional<std::vector<at::Tensor>>(tensors));
  std::vector<at::Tensor> keep = st.buffers();
  if (!wire.is_same(buf)) {
    work->deviceBefore.emplace_back(wire, buf);
    keep.push_back(wire);
  }
  return enqueue(task, work, timeout_, std::move(keep));
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::recv(std::vector<at::Tensor>& tensors,
                                                      int srcRank, int tag) {
  OpGuard guard(this, "recv", false);
  checkSingle(tensors, "recv");
  checkPeer(srcRank, "recv", "source");
  Staging st("recv");
  at::Tensor buf = st.out(tensors[0]);
  DataType dtype;
  size_t count;
  moveShape(buf, &dtype, &count);
  Communicator& comm = commFor(st.device(), "recv");
  at::Tensor wire = pinnedLike(buf);  // CUDA: lands in pinned memory, then on the device
  std::shared_ptr<P2PTask> task;
  check(makeRecv(comm, wire.data_ptr(), count, dtype, srcRank, tag, &task));
  auto work = c10::make_intrusive<WorkTCPX>(rank_, c10d::OpType::RECV, "tcpx:recv", tensors,
                                            task->description, std::nullopt);
  work->srcRank = srcRank;
  return enqueueRecv(task, work, st, buf, wire);
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::recvAnysource(std::vector<at::Tensor>& tensors,
                                                               int tag) {
  OpGuard guard(this, "recv", false);
  checkSingle(tensors, "recv");
  at::Tensor& t = tensors[0];
  Staging st("recv");
  at::Tensor buf = st.out(t);
  DataType dtype;
  size_t count;
  moveShape(buf, &dtype, &count);
  Communicator& comm = commFor(st.device(), "recv");
  at::Tensor wire = pinnedLike(buf);
  std::shared_ptr<P2PTask> task;
  check(makeRecvAnySource(comm, wire.data_ptr(), count, dtype, tag, &task));
  auto work = c10::make_intrusive<WorkTCPX>(rank_, c10d::OpType::RECVANYSOURCE, "tcpx:recv",
                                            tensors, task->description, std::nullopt);
  return enqueueRecv(task, work, st, buf, wire);
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTCPX::enqueueRecv(std::shared_ptr<P2PTask> task,
                                                             c10::intrusive_ptr<WorkTCPX> work,
                                                             const Staging& st, const at::Tensor& buf,
                                                             const at::Tensor& wire) {
  std::vector<at::Tensor> keep = st.buffers();
  if (!wire.is_same(buf)) {
    work->deviceAfter.emplace_back(buf, wire);  // before the staging copy-back below
    keep.push_back(wire);
  }
  st.attach(*work);
  return enqueue(task, work, timeout_, std::move(keep));
}

c10::intrusive_ptr<c10d::Backend> ProcessGroupTCPX::split(
    const c10::intrusive_ptr<c10d::Store>& store, const std::vector<int>& ranks,
    const c10::intrusive_ptr<Options>& opts) {
  // `ranks` are ranks of this group; a rank outside them gets no backend.
  auto it = std::find(ranks.begin(), ranks.end(), rank_);
  if (it == ranks.end()) return nullptr;
  std::vector<int64_t> global;
  for (int r : ranks) {
    TORCH_CHECK_VALUE(r >= 0 && r < size_, "tcpx split: rank ", r,
                      " is not a rank of the parent group (size ", size_, ")");
    global.push_back(globalRanks_.empty() ? r : globalRanks_[r]);
  }
  auto timeout = opts && opts->timeout.count() > 0 ? opts->timeout : timeout_;
  std::string name = opts && !opts->group_name.empty() ? opts->group_name : groupName_ + ":split";
  // c10d splits once per device type the parent serves (cpu and cuda), each
  // time on the same store prefix: a second bootstrap there would collide
  // with the first, so the child made for the first is handed out again.
  static std::mutex mu;
  static std::map<std::string, c10::weak_intrusive_ptr<ProcessGroupTCPX>> children;
  std::lock_guard<std::mutex> lk(mu);
  auto found = children.find(name);
  if (found != children.end()) {
    if (auto child = found->second.lock()) return child;
  }
  auto child = c10::make_intrusive<ProcessGroupTCPX>(store, static_cast<int>(it - ranks.begin()),
                                                     static_cast<int>(ranks.size()), timeout,
                                                     name, global);
  children.erase(name);
  children.emplace(name, c10::weak_intrusive_ptr<ProcessGroupTCPX>(child));
  return child;
}

void ProcessGroupTCPX::checkPeer(int peer, const char* op, const char* role) const {
  TORCH_CHECK_VALUE(peer >= 0 && peer < size_ && peer != rank_, "tcpx ", op, ": ", role,
                    " rank ", peer, " is invalid: expected another rank of the group, 0 <= rank < ",
                    size_, " and rank != ", rank_);
}

void ProcessGroupTCPX::dumpState() {
  if (comm_) comm_->dumpState();
  if (cuda_ && cuda_->comm) cuda_->comm->dumpState();
}

DeviceBreakdown ProcessGroupTCPX::deviceBreakdown() const {
  return cuda_ && cuda_->comm ? cuda_->comm->deviceBreakdown() : DeviceBreakdown{};
}

uint64_t ProcessGroupTCPX::getSequenceNumberForGroup() {
  uint64_t n = comm_->collectivesIssued();
#ifdef TCPX_WITH_CUDA
  if (cuda_) n += cuda_->comm->collectivesIssued();
#endif
  return n;
}

void ProcessGroupTCPX::abort() {
#ifdef TCPX_WITH_CUDA
  if (cuda_) cuda_->comm->abort("ProcessGroupTCPX::abort() was called");
#endif
  if (comm_) comm_->abort("ProcessGroupTCPX::abort() was called");
}

void ProcessGroupTCPX::shutdown() {
#ifdef TCPX_WITH_CUDA
  if (cuda_) cuda_->comm->shutdown();
#endif
  if (comm_) comm_->shutdown();
}

}  // namespace tcpx

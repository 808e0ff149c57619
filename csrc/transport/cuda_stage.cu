// CudaStage: DeviceStage (transport/stage.h) on one CUDA device.
//
// What it must never do on the worker thread: wait for anything but its own
// comm stream (caller streams may wait on the worker, through
// streamWaitFlag), or call something that may synchronise the device or
// block while a kernel runs: cudaFree, cudaFreeHost, cudaHostUnregister,
// legacy-stream copies, creating streams or events (other projects saw
// stream creation block while a wait kernel runs: pmodels/yaksa#228), lazy
// module loading. Hence pinned memory is pooled and freed only in the
// destructor, events are created up front, every kernel is loaded at init,
// and device scratch comes from a stream-ordered memory pool of its own.
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <deque>
#include <map>
#include <mutex>
#include <vector>

#include "common/logging.h"
#include "transport/stage.h"
#include "transport/unpack.h"

namespace tcpx {
namespace {

#define TCPX_CUDA_CHECK(call)                                                                  \
  do {                                                                                         \
    cudaError_t tcpx_cuda_err_ = (call);                                                       \
    if (tcpx_cuda_err_ != cudaSuccess)                                                         \
      TCPX_ERR(tcpxUnhandledCudaError, "%s failed: %s", #call, cudaGetErrorString(tcpx_cuda_err_)); \
  } while (0)

constexpr size_t kPage = 4096;

// Switches the calling thread to `device` and back (methods that callers'
// threads use must not change their current device).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    if (prev_ != device) cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int now = -1;
    if (prev_ >= 0 && cudaGetDevice(&now) == cudaSuccess && now != prev_) cudaSetDevice(prev_);
  }

 private:
  int prev_ = -1;
};

// Page-sized loadMeta records covering `count` pages of a chunk (the same
// offset in the bounce buffer and the destination).
__global__ void pageMetasKernel(LoadMeta* metas, int count) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
    metas[i].srcOff = static_cast<uint32_t>(i * kPage);
    metas[i].len = static_cast<uint32_t>(kPage);
    metas[i].dstOff = static_cast<uint64_t>(i) * kPage;
  }
}

__global__ void waitFlagKernel(const volatile uint32_t* flag, uint32_t target) {
  while (static_cast<int32_t>(*flag - target) < 0) __nanosleep(1000);
  __threadfence_system();
}

class CudaStage final : public DeviceStage {
 public:
  explicit CudaStage(int device) : dev_(device) {}

  tcpxResult_t init(int priority) {
    TCPX_CUDA_CHECK(cudaSetDevice(dev_));
    TCPX_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, priority));
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = dev_;
    TCPX_CUDA_CHECK(cudaMemPoolCreate(&pool_, &props));
    uint64_t keep = UINT64_MAX;  // keep freed scratch for the next op
    TCPX_CUDA_CHECK(cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrReleaseThreshold, &keep));
    // Every kernel the stage (and a waiting stream) will launch, loaded now:
    // see preloadUnpackKernels.
    TCPX_CHECK(preloadUnpackKernels());
    cudaFuncAttributes attr;
    TCPX_CUDA_CHECK(cudaFuncGetAttributes(&attr, pageMetasKernel));
    TCPX_CUDA_CHECK(cudaFuncGetAttributes(&attr, waitFlagKernel));
    // Page records for the largest chunk TCPX_CHUNK_BYTES allows (256 MiB:
    // 1 MiB of records), so that the worker never allocates them later.
    TCPX_CHECK(ensureMetas(static_cast<int>((size_t{256} << 20) / kPage)));
    for (int i = 0; i < kEvents; i++) {
      cudaEvent_t ev;
      TCPX_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
      freeEvents_.push_back(ev);
    }
    TCPX_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return tcpxSuccess;
  }

  ~CudaStage() override {
    cudaSetDevice(dev_);
    if (metas_) cudaFreeAsync(metas_, stream_);
    if (stream_) cudaStreamSynchronize(stream_);
    for (auto& e : inflight_) cudaEventDestroy(e.second);
    for (cudaEvent_t e : freeEvents_) cudaEventDestroy(e);
    for (auto& kv : freeHost_)
      for (void* p : kv.second) cudaFreeHost(p);
    for (auto& kv : hostSize_)
      if (!kv.second.second) cudaFreeHost(kv.first);  // still handed out: freed anyway
    if (stream_) cudaStreamDestroy(stream_);
    if (pool_) cudaMemPoolDestroy(pool_);
  }

  int device() const override { return dev_; }
  void* stream() const override { return stream_; }

  void* allocHost(size_t bytes) override {
    std::lock_guard<std::mutex> lk(hostMu_);
    size_t size = bucket(bytes);
    auto& list = freeHost_[size];
    if (!list.empty()) {
      void* p = list.back();
      list.pop_back();
      hostSize_[p].second = false;
      return p;
    }
    DeviceGuard g(dev_);
    void* p = nullptr;
    // Portable: usable from every device; with unified addressing (every
    // 64-bit platform CUDA supports) the device reads it at the same address.
    if (cudaHostAlloc(&p, size, cudaHostAllocPortable | cudaHostAllocMapped) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    hostSize_[p] = {size, false};
    return p;
  }

  tcpxResult_t reserveHost(size_t bytes, int count) override {
    std::vector<void*> got;
    for (int i = 0; i < count; i++) {
      void* p = allocHost(bytes);
      if (!p) TCPX_ERR(tcpxSystemError, "out of pinned host memory (%zu bytes x %d)", bytes, count);
      got.push_back(p);
    }
    for (void* p : got) freeHost(p);
    return tcpxSuccess;
  }

  void freeHost(void* p) override {
    if (!p) return;
    std::lock_guard<std::mutex> lk(hostMu_);
    auto it = hostSize_.find(p);
    if (it == hostSize_.end() || it->second.second) return;
    it->second.second = true;
    freeHost_[it->second.first].push_back(p);
  }

  void* allocDevice(size_t bytes) override {
    void* p = nullptr;
    DeviceGuard g(dev_);
    if (cudaMallocFromPoolAsync(&p, std::max<size_t>(bytes, 1), pool_, stream_) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return p;
  }

  void freeDevice(void* p) override {
    if (!p) return;
    DeviceGuard g(dev_);
    cudaFreeAsync(p, stream_);
  }

  tcpxResult_t copy(void* dst, const void* src, size_t bytes) override {
    if (!bytes || dst == src) return tcpxSuccess;
    TCPX_CUDA_CHECK(cudaSetDevice(dev_));
    TCPX_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_));
    return tcpxSuccess;
  }

  tcpxResult_t unpack(void* dst, const void* own, const void* bounce, size_t bytes, bool reduce,
                      DataType dtype, RedOp op) override {
    if (!bytes) return tcpxSuccess;
    TCPX_CUDA_CHECK(cudaSetDevice(dev_));
    const int pages = static_cast<int>((bytes + kPage - 1) / kPage);
    TCPX_CHECK(ensureMetas(pages));
    if (!reduce) return unpackCopy(metas_, pages, bounce, dst, stream_, bytes);
    return unpackReduce(metas_, pages, bounce, dst, dtype, op, stream_, own, bytes);
  }

  tcpxResult_t record(uint64_t* ticket) override {
    TCPX_CUDA_CHECK(cudaSetDevice(dev_));
    cudaEvent_t ev;
    if (freeEvents_.empty()) {
      // Every ticket of kEvents is still pending: retire the oldest first
      // (tickets complete in order) rather than create an event now.
      TCPX_CUDA_CHECK(cudaEventSynchronize(inflight_.front().second));
      bool done;
      TCPX_CHECK(query(inflight_.front().first, &done));
    }
    ev = freeEvents_.back();
    freeEvents_.pop_back();
    TCPX_CUDA_CHECK(cudaEventRecord(ev, stream_));
    *ticket = ++recorded_;
    inflight_.emplace_back(*ticket, ev);
    return tcpxSuccess;
  }

  tcpxResult_t query(uint64_t ticket, bool* done) override {
    while (!inflight_.empty() && inflight_.front().first <= ticket) {
      cudaError_t e = cudaEventQuery(inflight_.front().second);
      if (e == cudaErrorNotReady) break;
      if (e != cudaSuccess)
        TCPX_ERR(tcpxUnhandledCudaError, "CUDA work of the comm stream failed: %s",
                 cudaGetErrorString(e));
      completed_ = inflight_.front().first;
      freeEvents_.push_back(inflight_.front().second);
      inflight_.pop_front();
    }
    if (inflight_.empty()) completed_ = recorded_;
    *done = ticket <= completed_;
    return tcpxSuccess;
  }

  tcpxResult_t synchronize() override {
    TCPX_CUDA_CHECK(cudaSetDevice(dev_));
    TCPX_CUDA_CHECK(cudaStreamSynchronize(stream_));
    bool done;
    return query(recorded_, &done);
  }

 private:
  // Pinned blocks come in power-of-two sizes from 64 KiB, so freed ones fit later requests.
  static size_t bucket(size_t bytes) {
    size_t b = 64 * 1024;
    while (b < bytes) b <<= 1;
    return b;
  }

  tcpxResult_t ensureMetas(int pages) {
    if (pages <= metaCount_) return tcpxSuccess;
    int want = std::max(pages, 2048);  // 8 MiB chunks, the plugin path's 2048 records
    LoadMeta* m = nullptr;
    TCPX_CUDA_CHECK(cudaMallocFromPoolAsync(reinterpret_cast<void**>(&m), want * sizeof(LoadMeta),
                                            pool_, stream_));
    pageMetasKernel<<<(want + 255) / 256, 256, 0, stream_>>>(m, want);
    TCPX_CUDA_CHECK(cudaGetLastError());
    if (metas_) cudaFreeAsync(metas_, stream_);  // stream order: after the unpacks that read it
    metas_ = m;
    metaCount_ = want;
    return tcpxSuccess;
  }

  // Tickets in flight at most: a few per bounce buffer and peer.
  static constexpr int kEvents = 4096;
  const int dev_;
  cudaStream_t stream_ = nullptr;
  cudaMemPool_t pool_ = nullptr;
  LoadMeta* metas_ = nullptr;
  int metaCount_ = 0;
  // Tickets: events recorded on the stream, oldest first.
  std::deque<std::pair<uint64_t, cudaEvent_t>> inflight_;
  std::vector<cudaEvent_t> freeEvents_;
  uint64_t recorded_ = 0, completed_ = 0;
  // Pinned memory: size and "is free" of every block, free blocks by size.
  std::mutex hostMu_;
  std::map<void*, std::pair<size_t, bool>> hostSize_;
  std::map<size_t, std::vector<void*>> freeHost_;
};

}  // namespace

tcpxResult_t createCudaStage(int device, int priority, std::shared_ptr<DeviceStage>* out) {
  auto s = std::make_shared<CudaStage>(device);
  TCPX_CHECK(s->init(priority));
  *out = s;
  return tcpxSuccess;
}

namespace {
// cuStreamWaitValue32 through the runtime's driver entry point (no link to libcuda).
using WaitValueFn = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
WaitValueFn waitValueFn() {
  static WaitValueFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", &f, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<WaitValueFn>(nullptr);
    }
    return reinterpret_cast<WaitValueFn>(f);
  }();
  return fn;
}
}  // namespace

tcpxResult_t streamWaitFlag(const volatile uint32_t* flag, uint32_t target, void* stream,
                            bool memop) {
  if (memop) {
    WaitValueFn fn = waitValueFn();
    if (!fn) TCPX_ERR(tcpxInvalidUsage, "cuStreamWaitValue32 is not available from this driver");
    void* devPtr = nullptr;
    if (cudaHostGetDevicePointer(&devPtr, const_cast<uint32_t*>(flag), 0) != cudaSuccess) {
      cudaGetLastError();
      TCPX_ERR(tcpxUnhandledCudaError, "the completion flag is not mapped pinned memory");
    }
    CUresult r = fn(static_cast<CUstream>(stream), reinterpret_cast<CUdeviceptr>(devPtr), target,
                    CU_STREAM_WAIT_VALUE_GEQ);
    if (r != CUDA_SUCCESS) TCPX_ERR(tcpxUnhandledCudaError, "cuStreamWaitValue32 failed: error %d", r);
    return tcpxSuccess;
  }
  waitFlagKernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(flag, target);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    TCPX_ERR(tcpxUnhandledCudaError, "launching the completion wait failed: %s", cudaGetErrorString(e));
  return tcpxSuccess;
}

}  // namespace tcpx

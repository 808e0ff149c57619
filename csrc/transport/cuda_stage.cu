// CudaStage: DeviceStage (transport/stage.h) on one CUDA device.
//
// An op's device work runs in one kernel (the op kernel), launched by the
// issuing thread on the op's stream. The worker talks to it through an op
// record in mapped pinned host memory: a ring of 64-byte commands that the
// kernel's blocks poll, and counters the kernel writes back (started, done,
// exited). The worker therefore never calls CUDA, which matters because a
// CUDA call may block while another thread of the process is inside a
// synchronous one that waits for the op (tests/cuda/test_stage.cu shows both
// a blocking copy and a first kernel launch doing that on H200). NCCL's
// proxy thread and kernels talk the same way, through host-memory FIFOs.
//
// Commands of one op are split over the kernel's blocks: a command is cut
// into 4 KiB pages (the loadMeta records of unpack.h for unpacks) and warp
// w of the grid moves pages w, w + warps, ... Blocks run ahead of each other;
// the worker orders dependent commands by tickets (a step waits for the
// tickets of its predecessors), and serial commands (the collectives' local
// steps) wait for everything before them and hold back everything after.
// Block 0 reports a command done once every block has finished its part.
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "common/logging.h"
#include "common/utils.h"
#include "transport/relay.h"
#include "transport/stage.h"
#include "transport/unpack.h"
#include "transport/unpack_device.cuh"

namespace tcpx {
namespace {

using namespace unpack_device;

#define TCPX_CUDA_CHECK(call)                                                                  \
  do {                                                                                         \
    cudaError_t tcpx_cuda_err_ = (call);                                                       \
    if (tcpx_cuda_err_ != cudaSuccess)                                                         \
      TCPX_ERR(tcpxUnhandledCudaError, "%s failed: %s", #call, cudaGetErrorString(tcpx_cuda_err_)); \
  } while (0)

constexpr size_t kPage = 4096;
constexpr int kOps = 128;          // op records: ops launched and not yet exited
constexpr int kRing = 512;         // commands in flight per op
constexpr int kOpThreads = 512;    // 16 warps per block
constexpr int kWarpsPerBlock = kOpThreads / kWarp;
constexpr uint64_t kIndexMask = (1u << 20) - 1;

enum CmdType : uint32_t { kCmdCopy = 1, kCmdUnpack, kCmdReduce, kCmdScale, kCmdDivide, kCmdEnd };
constexpr uint32_t kCmdSerial = 1;   // waits for every earlier command of the op
constexpr uint32_t kCmdHostDst = 2;  // writes pinned host memory (a system-scope fence after it)

// One command; `tag` is written last and names the op and the command's
// index, so that a slot left over from an earlier op or lap never matches.
struct alignas(64) Command {
  uint64_t tag;
  uint32_t type, flags;
  uint32_t dtype, redop;
  uint64_t dst, src, own;
  uint64_t bytes;  // scale/divide: elements
  union {
    double factor;
    int64_t divisor;
  } arg;
};
static_assert(sizeof(Command) == 64, "a command is one cache line");

__host__ __device__ inline uint64_t tagOf(uint64_t op, uint64_t index) {
  return (op << 20) | ((index + 1) & kIndexMask);
}

// Mapped pinned host memory, one per op record.
struct OpRecord {
  alignas(64) volatile uint64_t started;  // GPU: the op id, once its kernel runs
  alignas(64) volatile uint64_t done;     // GPU: commands of the op finished on every block
  alignas(64) volatile uint64_t exited;   // GPU: the op id, once no block reads the record
  Command ring[kRing];
};

// Device memory, one per op record: per-command arrivals of the blocks, and
// `done` again where the blocks read it cheaply (serial commands).
struct RecordState {
  unsigned int arrive[kRing];
  unsigned long long done;
};

__device__ __forceinline__ uint64_t loadAcquireSys(const volatile uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ uint4 loadVolatile16(const volatile void* p) {
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}
__device__ __forceinline__ void storeReleaseSys(volatile uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// ------------------------------------------------- element-wise commands

template <class T>
struct Conv {  // float/double/integers: computed in their own type
  using C = T;
  __device__ static C in(T v) { return v; }
  __device__ static T out(C v) { return v; }
};
template <>
struct Conv<__half> {
  using C = float;
  __device__ static float in(__half v) { return __half2float(v); }
  __device__ static __half out(float v) { return __float2half_rn(v); }
};
template <>
struct Conv<__nv_bfloat16> {
  using C = float;
  __device__ static float in(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 out(float v) { return __float2bfloat16_rn(v); }
};

// buf[i] *= factor, or buf[i] /= divisor, for the grid's share of `count`.
template <class T>
__device__ void scaleElements(T* buf, uint64_t count, double factor, int64_t divisor, bool divide) {
  using C = typename Conv<T>::C;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < count;
       i += stride) {
    if constexpr (std::is_integral<T>::value) {  // AVG only: truncating, in 64 bits
      buf[i] = static_cast<T>(static_cast<long long>(buf[i]) / divisor);
    } else {
      const C v = Conv<T>::in(buf[i]);
      buf[i] = Conv<T>::out(divide ? static_cast<C>(v / static_cast<C>(divisor))
                                   : static_cast<C>(v * static_cast<C>(factor)));
    }
  }
}

__device__ void scaleAs(const Command& c) {
  const bool divide = c.type == kCmdDivide;
  void* b = reinterpret_cast<void*>(c.dst);
  switch (static_cast<DataType>(c.dtype)) {
    case DataType::kFloat32: scaleElements(static_cast<float*>(b), c.bytes, c.arg.factor, c.arg.divisor, divide); break;
    case DataType::kFloat64: scaleElements(static_cast<double*>(b), c.bytes, c.arg.factor, c.arg.divisor, divide); break;
    case DataType::kFloat16: scaleElements(static_cast<__half*>(b), c.bytes, c.arg.factor, c.arg.divisor, divide); break;
    case DataType::kBFloat16: scaleElements(static_cast<__nv_bfloat16*>(b), c.bytes, c.arg.factor, c.arg.divisor, divide); break;
    case DataType::kInt8: scaleElements(static_cast<int8_t*>(b), c.bytes, 0.0, c.arg.divisor, true); break;
    case DataType::kInt16: scaleElements(static_cast<int16_t*>(b), c.bytes, 0.0, c.arg.divisor, true); break;
    case DataType::kInt32: scaleElements(static_cast<int32_t*>(b), c.bytes, 0.0, c.arg.divisor, true); break;
    case DataType::kInt64: scaleElements(static_cast<int64_t*>(b), c.bytes, 0.0, c.arg.divisor, true); break;
    case DataType::kUInt8: scaleElements(static_cast<uint8_t*>(b), c.bytes, 0.0, c.arg.divisor, true); break;
    case DataType::kBool: break;  // refused on the host
  }
}

// This block's part of command `c`.
__device__ void runCommand(const Command& c, const LoadMeta* pages) {
  const int lane = threadIdx.x % kWarp;
  const uint64_t warp = blockIdx.x * static_cast<uint64_t>(kWarpsPerBlock) + threadIdx.x / kWarp;
  const uint64_t warps = static_cast<uint64_t>(gridDim.x) * kWarpsPerBlock;
  char* dst = reinterpret_cast<char*>(c.dst);
  const char* src = reinterpret_cast<const char*>(c.src);
  switch (c.type) {
    case kCmdCopy: {  // any size: pages computed, not read
      const uint64_t n = (c.bytes + kPage - 1) / kPage;
      for (uint64_t p = warp; p < n; p += warps) {
        const uint64_t off = p * kPage;
        copyFragment(dst + off, src + off, static_cast<uint32_t>(c.bytes - off < kPage ? c.bytes - off : kPage), lane);
      }
      break;
    }
    case kCmdUnpack:
    case kCmdReduce: {  // the page records of a chunk, cut at its length
      const uint64_t n = (c.bytes + kPage - 1) / kPage;
      const char* own = c.own ? reinterpret_cast<const char*>(c.own) : dst;
      for (uint64_t p = warp; p < n; p += warps) {
        const LoadMeta m = loadMeta(pages + p, c.bytes);
        if (c.type == kCmdUnpack) copyFragment(dst + m.dstOff, src + m.srcOff, m.len, lane);
        else reduceFragmentAs(static_cast<DataType>(c.dtype), m, src, dst, own,
                              static_cast<RedOp>(c.redop), lane);
      }
      break;
    }
    case kCmdScale:
    case kCmdDivide: scaleAs(c); break;
  }
}

#ifdef TCPX_STAGE_TIMING
// tests/cuda/bench_stage.cu only: block 0's %globaltimer (ns) per command
// index: tag seen, command read, own part written, every block arrived.
__device__ unsigned long long gStageTimes[kRing][4];
__device__ __forceinline__ void stamp(uint64_t i, int k) {
  if (blockIdx.x == 0) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    gStageTimes[i % kRing][k] = t;
  }
}
#else
__device__ __forceinline__ void stamp(uint64_t, int) {}
#endif

// The op kernel: runs op `op`'s commands from `rec` until its END.
__global__ void __launch_bounds__(kOpThreads) opKernel(OpRecord* rec, RecordState* st, uint64_t op,
                                                       const LoadMeta* pages) {
  __shared__ Command cmd;
  if (blockIdx.x == 0 && threadIdx.x == 0) storeReleaseSys(&rec->started, op);
  uint64_t i = 0;
  for (;; i++) {
    if (threadIdx.x < kWarp) {  // warp 0 reads the command
      volatile Command* c = &rec->ring[i % kRing];
      if (threadIdx.x == 0) {
        const uint64_t want = tagOf(op, i);
        for (int spins = 0; loadAcquireSys(&c->tag) != want; spins++)
          if (spins > 16) __nanosleep(spins > 4096 ? 2000 : 100);
        stamp(i, 0);
      }
      __syncwarp();  // orders the lanes' loads after lane 0's acquire
      // The body in one instruction of four lanes (one PCIe round trip, ~4
      // us here): field by field took ten, and four loads of one thread four.
      if (threadIdx.x < 4)
        reinterpret_cast<uint4*>(&cmd)[threadIdx.x] =
            loadVolatile16(reinterpret_cast<const volatile uint4*>(c) + threadIdx.x);
      __syncwarp();
      if (threadIdx.x == 0) {
        stamp(i, 1);
        if (cmd.flags & kCmdSerial)
          while (*reinterpret_cast<volatile unsigned long long*>(&st->done) < i) __nanosleep(100);
      }
    }
    __syncthreads();
    if (cmd.type == kCmdEnd) break;
    runCommand(cmd, pages);
    __syncthreads();  // the block's part is written, and cmd may be reused
    if (threadIdx.x == 0) {
      // The block's writes before its arrival. Pinned memory (a staging copy
      // the host sends next) needs a system-scope fence; device memory is
      // read only by later commands and stream work, and block 0's release
      // of `done` at system scope carries it on (causality is transitive).
      if (cmd.flags & kCmdHostDst) __threadfence_system();
      else __threadfence();
      stamp(i, 2);
      atomicAdd(&st->arrive[i % kRing], 1u);
      if (blockIdx.x == 0) {
        volatile unsigned int* a = &st->arrive[i % kRing];
        while (*a < gridDim.x) {
        }
        // Acquire: the blocks' writes that their arrivals release are
        // ordered before the release of `done` below (cumulativity).
        __threadfence();
        stamp(i, 3);
        *a = 0;
        *reinterpret_cast<volatile unsigned long long*>(&st->done) = i + 1;
        storeReleaseSys(&rec->done, i + 1);
      }
    }
  }
  // END: the last block to get here resets the state for the record's next op.
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&st->arrive[i % kRing], 1u) == gridDim.x - 1) {
      st->arrive[i % kRing] = 0;
      *reinterpret_cast<volatile unsigned long long*>(&st->done) = 0;
      __threadfence_system();
      storeReleaseSys(&rec->exited, op);
    }
  }
}

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

__global__ void writeFlagKernel(volatile uint32_t* flag, uint32_t value) {
  __threadfence_system();
  *flag = value;
  __threadfence_system();
}

// Host relay (transport/relay.h). Block b stages bytes [b*B, (b+1)*B) of
// the input (B = kRelayBlockBytes; the last block the rest) and releases
// its header word; then reads the same range of the result.
constexpr int kRelayThreads = 256;

__device__ __forceinline__ uint32_t loadAcquireSys32(const volatile uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Copies bytes [begin, end) from `src` to `dst` with 16-byte vectors where
// both are 16-byte aligned at `begin`, else byte by byte.
__device__ __forceinline__ void relayCopy(char* dst, const char* src, size_t begin, size_t end) {
  if (((reinterpret_cast<uintptr_t>(src + begin) | reinterpret_cast<uintptr_t>(dst + begin)) & 15) == 0) {
    const size_t vecs = (end - begin) / 16;
    const uint4* s4 = reinterpret_cast<const uint4*>(src + begin);
    uint4* d4 = reinterpret_cast<uint4*>(dst + begin);
    for (size_t i = threadIdx.x; i < vecs; i += blockDim.x) d4[i] = s4[i];
    begin += vecs * 16;
  }
  for (size_t i = begin + threadIdx.x; i < end; i += blockDim.x) dst[i] = src[i];
}

__global__ void __launch_bounds__(kRelayThreads)
    hostRelayKernel(const char* src, char* dst, size_t bytes, char* slot, uint32_t gen) {
  volatile uint32_t* header = reinterpret_cast<volatile uint32_t*>(slot);
  char* data = slot + kRelayHeader;
  const size_t begin = blockIdx.x * kRelayBlockBytes;
  const size_t end = blockIdx.x + 1 == gridDim.x ? bytes : begin + kRelayBlockBytes;
  relayCopy(data, src, begin, end);
  __threadfence_system();  // the data before the gate, for the host
  __syncthreads();
  if (threadIdx.x == 0) header[blockIdx.x] = gen;
  if (relayLL(bytes)) {  // one block
    const char* ll = data + relayDataBytes(bytes);
    const bool vec = (reinterpret_cast<uintptr_t>(dst) & 7) == 0;
    for (size_t u = threadIdx.x; u < relayUnits(bytes); u += blockDim.x) {
      uint4 v = loadVolatile16(ll + u * 16);
      for (int spins = 0; v.y != gen || v.w != gen; spins++) {
        if (spins > 8) __nanosleep(100);
        v = loadVolatile16(ll + u * 16);
      }
      const size_t off = u * 8;
      if (vec && off + 8 <= bytes) {
        *reinterpret_cast<uint2*>(dst + off) = make_uint2(v.x, v.z);
      } else {
        const uint32_t words[2] = {v.x, v.z};
        const char* w = reinterpret_cast<const char*>(words);
        for (size_t i = 0; i < 8 && off + i < bytes; i++) dst[off + i] = w[i];
      }
    }
    return;
  }
  if (threadIdx.x == 0) {
    const volatile uint32_t* done = header + kRelayDoneOffset / 4;
    for (int spins = 0; loadAcquireSys32(done) != gen; spins++)
      if (spins > 8) __nanosleep(100);
  }
  __syncthreads();
  relayCopy(dst, data, begin, end);
}

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

// Pinned and device blocks come in power-of-two sizes, so freed ones fit later requests.
size_t bucket(size_t bytes, size_t least) {
  size_t b = least;
  while (b < bytes) b <<= 1;
  return b;
}

class CudaStage final : public DeviceStage {
 public:
  CudaStage(int device, int blocks) : dev_(device), blocks_(std::max(1, blocks)) {}

  tcpxResult_t init() {
    DeviceGuard g(dev_);
    // Every kernel loaded now, not at its first launch (lazy loading may
    // synchronise the context while an op kernel waits for the worker).
    TCPX_CHECK(preloadUnpackKernels());
    cudaFuncAttributes attr;
    TCPX_CUDA_CHECK(cudaFuncGetAttributes(&attr, opKernel));
    TCPX_CUDA_CHECK(cudaFuncGetAttributes(&attr, pageMetasKernel));
    TCPX_CUDA_CHECK(cudaFuncGetAttributes(&attr, waitFlagKernel));
    TCPX_CUDA_CHECK(cudaFuncGetAttributes(&attr, writeFlagKernel));
    TCPX_CUDA_CHECK(cudaFuncGetAttributes(&attr, hostRelayKernel));
    TCPX_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&recs_), sizeof(OpRecord) * kOps,
                                  cudaHostAllocMapped | cudaHostAllocPortable));
    memset(static_cast<void*>(recs_), 0, sizeof(OpRecord) * kOps);
    TCPX_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&states_), sizeof(RecordState) * kOps));
    TCPX_CUDA_CHECK(cudaMemset(states_, 0, sizeof(RecordState) * kOps));
    // Page records for the largest chunk TCPX_CHUNK_BYTES allows (256 MiB).
    metaCount_ = static_cast<int>((size_t{256} << 20) / kPage);
    TCPX_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&metas_), metaCount_ * sizeof(LoadMeta)));
    pageMetasKernel<<<(metaCount_ + 255) / 256, 256>>>(metas_, metaCount_);
    TCPX_CUDA_CHECK(cudaGetLastError());
    TCPX_CUDA_CHECK(cudaDeviceSynchronize());
    return tcpxSuccess;
  }

  ~CudaStage() override {
    // Kernels still reading a record must exit before its memory goes.
    bool clean = true;
    for (int r = 0; r < kOps; r++) {
      if (!slots_[r].op) continue;
      if (!slots_[r].ended) end(slots_[r].op);
      auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (recs_[r].exited != slots_[r].op && std::chrono::steady_clock::now() < deadline)
        std::this_thread::yield();
      clean &= recs_[r].exited == slots_[r].op;
    }
    if (!clean) {
      TCPX_WARN("CUDA stage: an op kernel did not exit; its memory is left allocated");
      return;
    }
    DeviceGuard g(dev_);
    cudaFree(metas_);
    cudaFree(states_);
    cudaFreeHost(recs_);
    for (auto& kv : freeDev_)
      for (void* p : kv.second) cudaFree(p);
    for (auto& kv : freeHost_)
      for (void* p : kv.second) cudaFreeHost(p);
    for (auto& kv : hostSize_)
      if (!kv.second.second) cudaFreeHost(kv.first);  // still handed out: freed anyway
  }

  int device() const override { return dev_; }

  // ------------------------------------------------------------- memory
  void* allocHost(size_t bytes) override {
    const size_t size = bucket(bytes, 64 * 1024);
    {
      std::lock_guard<std::mutex> lk(hostMu_);
      auto& list = freeHost_[size];
      if (!list.empty()) {
        void* p = list.back();
        list.pop_back();
        hostSize_[p].second = false;
        return p;
      }
      if (reserved_ && !warnedGrow_) {
        warnedGrow_ = true;
        TCPX_WARN("CUDA stage: the pinned pool is used up (a group of more than 17 ranks?); "
                  "allocating more from the communicator's thread can stall it behind a "
                  "synchronous CUDA call of another thread");
      }
    }
    // Outside the lock: the call may block, and workers take the lock (isPinned).
    DeviceGuard g(dev_);
    void* p = nullptr;
    // Portable: usable from every device; with unified addressing (every
    // 64-bit platform CUDA supports) the device reads it at the same address.
    if (cudaHostAlloc(&p, size, cudaHostAllocPortable | cudaHostAllocMapped) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    std::lock_guard<std::mutex> lk(hostMu_);
    hostSize_[p] = {size, false};
    return p;
  }

  tcpxResult_t reserveHost(size_t bytes, int count) override {
    {
      std::lock_guard<std::mutex> lk(hostMu_);
      reserved_ = false;  // allocating on purpose
    }
    std::vector<void*> got;
    for (int i = 0; i < count; i++) {
      void* p = allocHost(bytes);
      if (!p) TCPX_ERR(tcpxSystemError, "out of pinned host memory (%zu bytes x %d)", bytes, count);
      got.push_back(p);
    }
    for (void* p : got) freeHost(p);
    std::lock_guard<std::mutex> lk(hostMu_);
    reserved_ = true;
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
    const size_t size = bucket(std::max<size_t>(bytes, 1), 256);
    {
      std::lock_guard<std::mutex> lk(devMu_);
      auto& list = freeDev_[size];
      if (!list.empty()) {
        void* p = list.back();
        list.pop_back();
        return p;
      }
    }
    DeviceGuard g(dev_);
    void* p = nullptr;
    if (cudaMalloc(&p, size) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    std::lock_guard<std::mutex> lk(devMu_);
    devSize_[p] = size;
    return p;
  }

  void freeDevice(void* p) override {
    if (!p) return;
    std::lock_guard<std::mutex> lk(devMu_);
    auto it = devSize_.find(p);
    if (it != devSize_.end()) freeDev_[it->second].push_back(p);
  }

  // ---------------------------------------------------------------- ops
  tcpxResult_t launch(void* stream, uint64_t* op) override {
    int r = -1;
    while (true) {
      {
        std::lock_guard<std::mutex> lk(mu_);
        for (int k = 0; k < kOps && r < 0; k++) {
          int c = (nextRecord_ + k) % kOps;
          if (!slots_[c].op || (slots_[c].ended && recs_[c].exited == slots_[c].op)) r = c;
        }
        if (r >= 0) {
          nextRecord_ = (r + 1) % kOps;
          *op = (++serial_ << 8) | static_cast<uint64_t>(r);
          slots_[r] = Slot{*op, 0, false, false};
          recs_[r].done = 0;
          break;
        }
      }
      std::this_thread::yield();  // kOps ops in flight: wait for the oldest
    }
    DeviceGuard g(dev_);
    opKernel<<<blocks_, kOpThreads, 0, static_cast<cudaStream_t>(stream)>>>(&recs_[r], &states_[r],
                                                                           *op, metas_);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
      std::lock_guard<std::mutex> lk(mu_);
      slots_[r] = Slot{};
      TCPX_ERR(tcpxUnhandledCudaError, "launching the op kernel failed: %s", cudaGetErrorString(e));
    }
    return tcpxSuccess;
  }

  bool started(uint64_t op) override { return recs_[op & 0xff].started == op; }

  void bind(uint64_t op) override { bound_ = op; }

  tcpxResult_t end(uint64_t op) override {
    Command c{};
    c.type = kCmdEnd;
    {
      std::lock_guard<std::mutex> lk(mu_);
      Slot& s = slots_[op & 0xff];
      if (s.op != op || s.ended) TCPX_ERR(tcpxInternalError, "CUDA stage: op %llu ended twice", (unsigned long long)op);
      s.ended = true;
    }
    if (bound_ == op) bound_ = 0;
    return post(op, c);
  }

  // --------------------------------------------------------------- work
  tcpxResult_t copy(void* dst, const void* src, size_t bytes, bool serial) override {
    if (!bytes || dst == src) return tcpxSuccess;
    Command c{};
    c.type = kCmdCopy;
    c.flags = (serial ? kCmdSerial : 0) | (isPinned(dst) ? kCmdHostDst : 0);
    c.dst = reinterpret_cast<uint64_t>(dst);
    c.src = reinterpret_cast<uint64_t>(src);
    c.bytes = bytes;
    return postBound(c, serial);
  }

  tcpxResult_t unpack(void* dst, const void* own, const void* bounce, size_t bytes, bool reduce,
                      DataType dtype, RedOp op) override {
    if (!bytes) return tcpxSuccess;
    if (bytes > static_cast<size_t>(metaCount_) * kPage)
      TCPX_ERR(tcpxInvalidArgument, "unpack of %zu bytes: chunks are at most %zu bytes", bytes,
               static_cast<size_t>(metaCount_) * kPage);
    if (reduce && !redOpSupported(op, dtype))
      TCPX_ERR(tcpxInvalidArgument, "unpack: ReduceOp.%s is not supported for %s", redOpName(op),
               dataTypeName(dtype));
    Command c{};
    c.type = reduce ? kCmdReduce : kCmdUnpack;
    c.dtype = static_cast<uint32_t>(dtype);
    c.redop = static_cast<uint32_t>(op);
    c.dst = reinterpret_cast<uint64_t>(dst);
    c.src = reinterpret_cast<uint64_t>(bounce);
    c.own = reinterpret_cast<uint64_t>(own);
    c.bytes = bytes;
    return postBound(c, false);
  }

  tcpxResult_t scale(void* buf, size_t count, DataType dtype, double factor) override {
    if (!isFloating(dtype))
      TCPX_ERR(tcpxInternalError, "PREMUL_SUM scaling is not defined for %s", dataTypeName(dtype));
    Command c{};
    c.arg.factor = factor;
    return postElementwise(kCmdScale, buf, count, dtype, c);
  }

  tcpxResult_t divide(void* buf, size_t count, DataType dtype, int64_t divisor) override {
    if (dtype == DataType::kBool || divisor <= 0)
      TCPX_ERR(tcpxInternalError, "AVG by %lld is not defined for %s", (long long)divisor,
               dataTypeName(dtype));
    Command c{};
    c.arg.divisor = divisor;
    return postElementwise(kCmdDivide, buf, count, dtype, c);
  }

  tcpxResult_t record(uint64_t* ticket) override {
    if (!bound_) TCPX_ERR(tcpxInternalError, "CUDA stage: no op bound");
    std::lock_guard<std::mutex> lk(mu_);
    *ticket = slots_[bound_ & 0xff].posted;
    return tcpxSuccess;
  }

  tcpxResult_t query(uint64_t ticket, bool* done) override {
    *done = !bound_ || recs_[bound_ & 0xff].done >= ticket;
    return tcpxSuccess;
  }

  std::string describe(uint64_t op) override {
    const OpRecord& rec = recs_[op & 0xff];
    uint64_t posted;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (slots_[op & 0xff].op != op) return "op over";
      posted = slots_[op & 0xff].posted;
    }
    const bool started = rec.started == op, exited = rec.exited == op;
    return strFormat("op kernel %s, %llu of %llu commands done",
                     exited ? "exited" : started ? "running" : "not started (its stream has not reached it)",
                     static_cast<unsigned long long>(started ? rec.done : 0),
                     static_cast<unsigned long long>(posted));
  }

  tcpxResult_t synchronize() override {
    if (!bound_) return tcpxSuccess;
    uint64_t t;
    TCPX_CHECK(record(&t));
    while (recs_[bound_ & 0xff].done < t) std::this_thread::yield();
    return tcpxSuccess;
  }

 private:
  struct Slot {
    uint64_t op = 0;
    uint64_t posted = 0;      // commands given (END included)
    bool ended = false;
    bool serialNext = false;  // the next command waits for a serial one
  };

  // Whether p lies in one of the stage's pinned blocks.
  bool isPinned(const void* p) {
    std::lock_guard<std::mutex> lk(hostMu_);
    auto it = hostSize_.upper_bound(const_cast<void*>(p));
    if (it == hostSize_.begin()) return false;
    --it;
    return static_cast<const char*>(p) < static_cast<const char*>(it->first) + it->second.first;
  }

  static bool isFloating(DataType t) {
    return t == DataType::kFloat32 || t == DataType::kFloat64 || t == DataType::kFloat16 ||
           t == DataType::kBFloat16;
  }

  // A serial element-wise command (scale, divide) on `count` elements of buf;
  // `c` carries its argument.
  tcpxResult_t postElementwise(CmdType type, void* buf, size_t count, DataType dtype, Command& c) {
    if (!count) return tcpxSuccess;
    c.type = type;
    c.flags = kCmdSerial;
    c.dtype = static_cast<uint32_t>(dtype);
    c.dst = reinterpret_cast<uint64_t>(buf);
    c.bytes = count;
    return postBound(c, true);
  }

  tcpxResult_t postBound(Command& c, bool serial) {
    if (!bound_) TCPX_ERR(tcpxInternalError, "CUDA stage: device work outside an op");
    {
      std::lock_guard<std::mutex> lk(mu_);
      Slot& s = slots_[bound_ & 0xff];
      if (s.serialNext) c.flags |= kCmdSerial;
      s.serialNext = serial;
    }
    return post(bound_, c);
  }

  // Writes `c` into op's ring once its slot is free (the kernel runs once
  // the op is bound, so a full ring drains).
  tcpxResult_t post(uint64_t op, Command& c) {
    const int r = static_cast<int>(op & 0xff);
    uint64_t index;
    {
      std::lock_guard<std::mutex> lk(mu_);
      index = slots_[r].posted++;
    }
    while (recs_[r].done + kRing <= index) std::this_thread::yield();
    Command* slot = &recs_[r].ring[index % kRing];
    c.tag = 0;
    // The body first, the tag last with release order (x86 keeps store order;
    // the fence keeps the compiler from reordering).
    memcpy(reinterpret_cast<char*>(slot) + 8, reinterpret_cast<const char*>(&c) + 8,
           sizeof(Command) - 8);
    std::atomic_thread_fence(std::memory_order_release);
    __atomic_store_n(&slot->tag, tagOf(op, index), __ATOMIC_RELEASE);
    return tcpxSuccess;
  }

  const int dev_;
  const int blocks_;
  OpRecord* recs_ = nullptr;
  RecordState* states_ = nullptr;
  LoadMeta* metas_ = nullptr;
  int metaCount_ = 0;
  std::mutex mu_;  // slots_, nextRecord_, serial_
  Slot slots_[kOps];
  int nextRecord_ = 0;
  uint64_t serial_ = 0;
  std::atomic<uint64_t> bound_{0};  // worker only; atomic for end() from other threads
  // Pinned memory: size and "is free" of every block, free blocks by size.
  std::mutex hostMu_;
  std::map<void*, std::pair<size_t, bool>> hostSize_;
  std::map<size_t, std::vector<void*>> freeHost_;
  bool reserved_ = false, warnedGrow_ = false;  // the pool was reserved; growth was reported
  // Device scratch: size of every block, free blocks by size.
  std::mutex devMu_;
  std::map<void*, size_t> devSize_;
  std::map<size_t, std::vector<void*>> freeDev_;
};

}  // namespace

#ifdef TCPX_STAGE_TIMING
// The stamps of command indexes [0, n) of the last op (bench_stage.cu).
void stageTimes(unsigned long long (*out)[4], int n) {
  cudaMemcpyFromSymbol(out, gStageTimes, sizeof(unsigned long long) * 4 * std::min(n, kRing));
}
#endif

tcpxResult_t createCudaStage(int device, int blocks, std::shared_ptr<DeviceStage>* out) {
  auto s = std::make_shared<CudaStage>(device, blocks);
  TCPX_CHECK(s->init());
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

tcpxResult_t streamWriteFlag(volatile uint32_t* flag, uint32_t value, void* stream) {
  writeFlagKernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(flag, value);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    TCPX_ERR(tcpxUnhandledCudaError, "launching the flag write failed: %s", cudaGetErrorString(e));
  return tcpxSuccess;
}

tcpxResult_t streamHostRelay(const void* src, void* dst, size_t bytes, void* slot, uint32_t gen,
                             void* stream) {
  if (bytes == 0) TCPX_ERR(tcpxInvalidArgument, "a host relay needs at least one byte");
  if (reinterpret_cast<uintptr_t>(slot) & 15)
    TCPX_ERR(tcpxInvalidArgument, "the relay slot %p is not 16-byte aligned", slot);
  hostRelayKernel<<<relayBlocks(bytes), kRelayThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const char*>(src), static_cast<char*>(dst), bytes, static_cast<char*>(slot), gen);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    TCPX_ERR(tcpxUnhandledCudaError, "launching the host relay failed: %s", cudaGetErrorString(e));
  return tcpxSuccess;
}

}  // namespace tcpx

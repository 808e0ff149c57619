// Unpack kernels (see unpack.h). One warp per fragment record: fragments are
// at most a few KiB (4 KiB pages on the devmem path), so a warp-sized copy
// with the widest vector both addresses allow keeps every lane busy without
// cross-warp coordination, and a grid-stride loop covers any record count.
#include "transport/unpack.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>
#include <type_traits>

#include "common/types.h"

namespace tcpx {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // 8 warps per block

// One 16-byte load (the record is 16-byte aligned); the length is cut at
// `limit` bytes of the destination.
__device__ __forceinline__ LoadMeta loadMeta(const LoadMeta* m, uint64_t limit) {
  uint4 v = *reinterpret_cast<const uint4*>(m);
  LoadMeta r;
  r.srcOff = v.x;
  r.len = v.y;
  r.dstOff = static_cast<uint64_t>(v.z) | (static_cast<uint64_t>(v.w) << 32);
  if (r.dstOff >= limit) r.len = 0;
  else if (r.len > limit - r.dstOff) r.len = static_cast<uint32_t>(limit - r.dstOff);
  return r;
}

// Copies `len` bytes with vectors of V where dst and src share alignment:
// a byte-wise head up to V-alignment of dst, V-wide body, byte-wise tail.
template <class V>
__device__ __forceinline__ void copyVec(char* dst, const char* src, uint32_t len, int lane) {
  const uint32_t mis = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(dst) % sizeof(V));
  uint32_t head = mis ? static_cast<uint32_t>(sizeof(V)) - mis : 0;
  if (head > len) head = len;
  for (uint32_t i = lane; i < head; i += kWarp) dst[i] = src[i];
  const uint32_t n = (len - head) / sizeof(V);
  V* d = reinterpret_cast<V*>(dst + head);
  const V* s = reinterpret_cast<const V*>(src + head);
  for (uint32_t i = lane; i < n; i += kWarp) d[i] = s[i];
  for (uint32_t i = head + n * sizeof(V) + lane; i < len; i += kWarp) dst[i] = src[i];
}

__device__ __forceinline__ void copyFragment(char* dst, const char* src, uint32_t len, int lane) {
  const uintptr_t diff = reinterpret_cast<uintptr_t>(dst) ^ reinterpret_cast<uintptr_t>(src);
  if ((diff & 15) == 0) copyVec<uint4>(dst, src, len, lane);
  else if ((diff & 7) == 0) copyVec<uint2>(dst, src, len, lane);
  else if ((diff & 3) == 0) copyVec<uint32_t>(dst, src, len, lane);
  else copyVec<char>(dst, src, len, lane);
}

__global__ void unpackCopyKernel(const LoadMeta* metas, int count, const char* bounce, char* dst,
                                 uint64_t limit) {
  const int lane = threadIdx.x % kWarp;
  const int warps = gridDim.x * (blockDim.x / kWarp);
  for (int w = (blockIdx.x * blockDim.x + threadIdx.x) / kWarp; w < count; w += warps) {
    LoadMeta m = loadMeta(metas + w, limit);
    copyFragment(dst + m.dstOff, bounce + m.srcOff, m.len, lane);
  }
}

// ------------------------------------------------------------ reductions
// The arithmetic of collectives/reduce.h, per element on the device.

template <class T>
struct Arith {  // integers: wrap modulo 2^bits (computed unsigned)
  using U = typename std::make_unsigned<T>::type;
  __device__ static T apply(T a, T b, RedOp op) {
    const U ua = static_cast<U>(a), ub = static_cast<U>(b);
    switch (op) {
      case RedOp::kProduct: return static_cast<T>(static_cast<U>(ua * ub));
      case RedOp::kMin: return a < b ? a : b;
      case RedOp::kMax: return a > b ? a : b;
      case RedOp::kBand: return static_cast<T>(ua & ub);
      case RedOp::kBor: return static_cast<T>(ua | ub);
      case RedOp::kBxor: return static_cast<T>(ua ^ ub);
      default: return static_cast<T>(static_cast<U>(ua + ub));  // SUM, AVG
    }
  }
};

template <class F>
__device__ __forceinline__ F floatOp(F a, F b, RedOp op) {
  switch (op) {
    case RedOp::kProduct: return a * b;
    case RedOp::kMin: return ((a != a) | (a < b)) ? a : b;  // NaN propagates
    case RedOp::kMax: return ((a != a) | (a > b)) ? a : b;
    default: return a + b;  // SUM, AVG, PREMUL_SUM (scaling is separate)
  }
}

template <>
struct Arith<float> {
  __device__ static float apply(float a, float b, RedOp op) { return floatOp(a, b, op); }
};
template <>
struct Arith<double> {
  __device__ static double apply(double a, double b, RedOp op) { return floatOp(a, b, op); }
};
template <>
struct Arith<__half> {
  __device__ static __half apply(__half a, __half b, RedOp op) {
    return __float2half_rn(floatOp(__half2float(a), __half2float(b), op));
  }
};
template <>
struct Arith<__nv_bfloat16> {
  __device__ static __nv_bfloat16 apply(__nv_bfloat16 a, __nv_bfloat16 b, RedOp op) {
    return __float2bfloat16_rn(floatOp(__bfloat162float(a), __bfloat162float(b), op));
  }
};
struct Bool {};  // stored as one byte, 0 or 1
template <>
struct Arith<Bool> {
  __device__ static uint8_t apply(uint8_t a, uint8_t b, RedOp op) {
    const bool x = a != 0, y = b != 0;
    switch (op) {
      case RedOp::kProduct:
      case RedOp::kMin:
      case RedOp::kBand: return x && y;
      case RedOp::kBxor: return x != y;
      default: return x || y;  // SUM, MAX, BOR
    }
  }
};

template <class T>
struct Storage {
  using type = T;
};
template <>
struct Storage<Bool> {
  using type = uint8_t;
};

template <class T>
__global__ void unpackReduceKernel(const LoadMeta* metas, int count, const char* bounce, char* dst,
                                   const char* own, RedOp op, uint64_t limit) {
  using S = typename Storage<T>::type;
  const int lane = threadIdx.x % kWarp;
  const int warps = gridDim.x * (blockDim.x / kWarp);
  for (int w = (blockIdx.x * blockDim.x + threadIdx.x) / kWarp; w < count; w += warps) {
    LoadMeta m = loadMeta(metas + w, limit);
    S* d = reinterpret_cast<S*>(dst + m.dstOff);
    const S* o = reinterpret_cast<const S*>(own + m.dstOff);
    const char* src = bounce + m.srcOff;
    const uint32_t n = m.len / sizeof(S);
    uint32_t done = 0;
    // 16-byte vectors when all three addresses allow (the staging path's
    // page-aligned chunks into 16-byte aligned tensors): one load per lane
    // of each operand, kVec elements reduced in registers.
    constexpr uint32_t kVec = sizeof(uint4) / sizeof(S);
    if (((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(d) |
          reinterpret_cast<uintptr_t>(o)) % sizeof(uint4)) == 0) {
      const uint32_t nv = n / kVec;
      for (uint32_t i = lane; i < nv; i += kWarp) {
        uint4 a = reinterpret_cast<const uint4*>(o)[i];
        const uint4 b = reinterpret_cast<const uint4*>(src)[i];
        S* pa = reinterpret_cast<S*>(&a);
        const S* pb = reinterpret_cast<const S*>(&b);
#pragma unroll
        for (uint32_t k = 0; k < kVec; k++) pa[k] = Arith<T>::apply(pa[k], pb[k], op);
        reinterpret_cast<uint4*>(d)[i] = a;
      }
      done = nv * kVec;
    }
    const bool aligned = reinterpret_cast<uintptr_t>(src) % alignof(S) == 0;
    for (uint32_t i = done + lane; i < n; i += kWarp) {
      S v;
      if (aligned) v = reinterpret_cast<const S*>(src)[i];
      else memcpy(&v, src + i * sizeof(S), sizeof(S));  // devmem fragments: any alignment
      d[i] = Arith<T>::apply(o[i], v, op);
    }
  }
}

int blocksFor(int count) {
  const int warpsPerBlock = kThreads / kWarp;
  int blocks = (count + warpsPerBlock - 1) / warpsPerBlock;
  return blocks < 1 ? 1 : blocks;
}

}  // namespace

tcpxResult_t unpackCopy(const LoadMeta* metas, int count, const void* bounce, void* dst,
                        CUstream_st* stream, uint64_t limit) {
  if (count <= 0) return tcpxSuccess;
  unpackCopyKernel<<<blocksFor(count), kThreads, 0, stream>>>(
      metas, count, static_cast<const char*>(bounce), static_cast<char*>(dst), limit);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) TCPX_ERR(tcpxUnhandledCudaError, "unpack copy launch: %s", cudaGetErrorString(e));
  return tcpxSuccess;
}

tcpxResult_t unpackReduce(const LoadMeta* metas, int count, const void* bounce, void* dst,
                          DataType dtype, RedOp op, CUstream_st* stream, const void* own,
                          uint64_t limit) {
  if (!redOpSupported(op, dtype))
    TCPX_ERR(tcpxInvalidArgument, "unpack: ReduceOp.%s is not supported for %s", redOpName(op),
             dataTypeName(dtype));
  if (count <= 0) return tcpxSuccess;
  const char* b = static_cast<const char*>(bounce);
  char* d = static_cast<char*>(dst);
  const char* o = own ? static_cast<const char*>(own) : d;
  const int blocks = blocksFor(count);
#define TCPX_UNPACK_LAUNCH(T) unpackReduceKernel<T><<<blocks, kThreads, 0, stream>>>(metas, count, b, d, o, op, limit)
  switch (dtype) {
    case DataType::kFloat32: TCPX_UNPACK_LAUNCH(float); break;
    case DataType::kFloat64: TCPX_UNPACK_LAUNCH(double); break;
    case DataType::kFloat16: TCPX_UNPACK_LAUNCH(__half); break;
    case DataType::kBFloat16: TCPX_UNPACK_LAUNCH(__nv_bfloat16); break;
    case DataType::kInt8: TCPX_UNPACK_LAUNCH(int8_t); break;
    case DataType::kInt16: TCPX_UNPACK_LAUNCH(int16_t); break;
    case DataType::kInt32: TCPX_UNPACK_LAUNCH(int32_t); break;
    case DataType::kInt64: TCPX_UNPACK_LAUNCH(int64_t); break;
    case DataType::kUInt8: TCPX_UNPACK_LAUNCH(uint8_t); break;
    case DataType::kBool: TCPX_UNPACK_LAUNCH(Bool); break;
  }
#undef TCPX_UNPACK_LAUNCH
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) TCPX_ERR(tcpxUnhandledCudaError, "unpack reduce launch: %s", cudaGetErrorString(e));
  return tcpxSuccess;
}

tcpxResult_t preloadUnpackKernels() {
  cudaFuncAttributes attr;
  cudaError_t e = cudaFuncGetAttributes(&attr, unpackCopyKernel);
#define TCPX_UNPACK_PRELOAD(T) \
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, unpackReduceKernel<T>)
  TCPX_UNPACK_PRELOAD(float);
  TCPX_UNPACK_PRELOAD(double);
  TCPX_UNPACK_PRELOAD(__half);
  TCPX_UNPACK_PRELOAD(__nv_bfloat16);
  TCPX_UNPACK_PRELOAD(int8_t);
  TCPX_UNPACK_PRELOAD(int16_t);
  TCPX_UNPACK_PRELOAD(int32_t);
  TCPX_UNPACK_PRELOAD(int64_t);
  TCPX_UNPACK_PRELOAD(uint8_t);
  TCPX_UNPACK_PRELOAD(Bool);
#undef TCPX_UNPACK_PRELOAD
  if (e != cudaSuccess) TCPX_ERR(tcpxUnhandledCudaError, "loading the unpack kernels: %s", cudaGetErrorString(e));
  return tcpxSuccess;
}

}  // namespace tcpx

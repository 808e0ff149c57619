// Device code of the unpack stage (see unpack.h), shared by the unpack
// kernels and the op kernel of the CUDA stage (cuda_stage.cu). A warp moves
// one fragment: fragments are at most a few KiB (4 KiB pages), so a
// warp-sized copy with the widest vector both addresses allow keeps every
// lane busy without cross-warp coordination. nvcc only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>
#include <type_traits>

#include "common/types.h"
#include "transport/unpack.h"

namespace tcpx {
namespace unpack_device {

constexpr int kWarp = 32;
// Vectors per lane in flight: copies 8 (8 x 16 B x 32 lanes = one 4 KiB
// page), reductions 2 per operand (more spills registers in the op kernel,
// which has 128 per thread at 512 threads a block). Overridable at build
// time for tests/cuda/bench_stage.cu only.
#ifndef TCPX_COPY_UNROLL
#define TCPX_COPY_UNROLL 8
#endif
#ifndef TCPX_REDUCE_UNROLL
#define TCPX_REDUCE_UNROLL 2
#endif
constexpr int kUnroll = TCPX_COPY_UNROLL;
constexpr int kReduceUnroll = TCPX_REDUCE_UNROLL;

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
  // kUnroll loads issued before any store: a load from pinned host memory
  // is a PCIe round trip (~1-2 us), so one in flight per lane would make a
  // 4 KiB page cost eight of them; with 16-byte vectors a page is one batch.
  uint32_t i = lane;
  for (; i + (kUnroll - 1) * kWarp < n; i += kUnroll * kWarp) {
    V v[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; k++) v[k] = s[i + k * kWarp];
#pragma unroll
    for (int k = 0; k < kUnroll; k++) d[i + k * kWarp] = v[k];
  }
  for (; i < n; i += kWarp) d[i] = s[i];
  for (uint32_t i = head + n * sizeof(V) + lane; i < len; i += kWarp) dst[i] = src[i];
}

__device__ __forceinline__ void copyFragment(char* dst, const char* src, uint32_t len, int lane) {
  const uintptr_t diff = reinterpret_cast<uintptr_t>(dst) ^ reinterpret_cast<uintptr_t>(src);
  if ((diff & 15) == 0) copyVec<uint4>(dst, src, len, lane);
  else if ((diff & 7) == 0) copyVec<uint2>(dst, src, len, lane);
  else if ((diff & 3) == 0) copyVec<uint32_t>(dst, src, len, lane);
  else copyVec<char>(dst, src, len, lane);
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

// dst[k] = own[k] op fragment[k] for the fragment of `m` (see unpackReduce).
template <class T>
__device__ __forceinline__ void reduceFragment(const LoadMeta& m, const char* bounce, char* dst,
                                               const char* own, RedOp op, int lane) {
  using S = typename Storage<T>::type;
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
    const uint4* ov = reinterpret_cast<const uint4*>(o);
    const uint4* bv = reinterpret_cast<const uint4*>(src);
    uint4* dv = reinterpret_cast<uint4*>(d);
    // Every load of a batch issued before the first store (see copyVec).
    constexpr int kBatch = kReduceUnroll;
    uint32_t i = lane;
    for (; i < nv; i += kBatch * kWarp) {
      uint4 a[kBatch], b[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; u++) {
        const uint32_t j = i + u * kWarp;
        if (j < nv) {
          a[u] = ov[j];
          b[u] = bv[j];
        }
      }
#pragma unroll
      for (int u = 0; u < kBatch; u++) {
        const uint32_t j = i + u * kWarp;
        if (j >= nv) break;
        S* pa = reinterpret_cast<S*>(&a[u]);
        const S* pb = reinterpret_cast<const S*>(&b[u]);
#pragma unroll
        for (uint32_t k = 0; k < kVec; k++) pa[k] = Arith<T>::apply(pa[k], pb[k], op);
        dv[j] = a[u];
      }
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

// reduceFragment for a dtype known at run time (the op kernel's commands).
__device__ __forceinline__ void reduceFragmentAs(DataType dtype, const LoadMeta& m,
                                                 const char* bounce, char* dst, const char* own,
                                                 RedOp op, int lane) {
  switch (dtype) {
    case DataType::kFloat32: reduceFragment<float>(m, bounce, dst, own, op, lane); break;
    case DataType::kFloat64: reduceFragment<double>(m, bounce, dst, own, op, lane); break;
    case DataType::kFloat16: reduceFragment<__half>(m, bounce, dst, own, op, lane); break;
    case DataType::kBFloat16: reduceFragment<__nv_bfloat16>(m, bounce, dst, own, op, lane); break;
    case DataType::kInt8: reduceFragment<int8_t>(m, bounce, dst, own, op, lane); break;
    case DataType::kInt16: reduceFragment<int16_t>(m, bounce, dst, own, op, lane); break;
    case DataType::kInt32: reduceFragment<int32_t>(m, bounce, dst, own, op, lane); break;
    case DataType::kInt64: reduceFragment<int64_t>(m, bounce, dst, own, op, lane); break;
    case DataType::kUInt8: reduceFragment<uint8_t>(m, bounce, dst, own, op, lane); break;
    case DataType::kBool: reduceFragment<Bool>(m, bounce, dst, own, op, lane); break;
  }
}

}  // namespace unpack_device
}  // namespace tcpx

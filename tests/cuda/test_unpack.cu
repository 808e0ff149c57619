// GPU test of the unpack kernels (csrc/transport/unpack.{h,cu}) against a host
// reference. Fragment lists are shaped like the GPUDirect-TCPX plugin's: up to
// 2048 records of at most 4 KiB, arbitrary byte alignment of source and
// destination, in shuffled order, in device memory or mapped pinned host
// memory. Build and run on a GPU machine (tests skip without one):
//   nvcc -std=c++17 -O2 -arch=sm_90 -Icsrc tests/cuda/test_unpack.cu \
//     csrc/transport/unpack.cu csrc/common/*.cc -o /tmp/test_unpack && /tmp/test_unpack
// Exit status 0 = all passed; prints one line per case.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "common/types.h"
#include "cuda_check.h"
#include "transport/unpack.h"

using namespace tcpx;

namespace {




// A random fragment list: the destination [0, dstBytes) cut into pieces of
// 1..maxLen bytes (multiples of `unit`), some left out (gaps keep their old
// bytes), each read from a random place in the bounce buffer (any
// alignment unless alignSrc), in shuffled order.
std::vector<LoadMeta> makeMetas(std::mt19937_64& rng, int maxCount, uint32_t maxLen, size_t unit,
                                size_t bounceBytes, bool gaps, bool alignSrc, size_t* dstBytes) {
  std::vector<LoadMeta> v;
  uint64_t off = 0;
  while (static_cast<int>(v.size()) < maxCount) {
    uint32_t len = static_cast<uint32_t>((rng() % (maxLen / unit) + 1) * unit);
    bool skip = gaps && rng() % 5 == 0;
    if (!skip) {
      uint64_t src = rng() % (bounceBytes - len + 1);
      if (alignSrc) src -= src % unit;
      v.push_back({static_cast<uint32_t>(src), len, off});
    }
    off += len;
  }
  *dstBytes = off + 64;  // a guard after the last fragment
  std::shuffle(v.begin(), v.end(), rng);
  return v;
}

struct DeviceBuffers {
  char* bounce = nullptr;
  char* dst = nullptr;
  LoadMeta* metas = nullptr;
  bool mapped = false;
  ~DeviceBuffers() {
    cudaFree(bounce);
    cudaFree(dst);
    if (mapped) cudaFreeHost(metas);
    else cudaFree(metas);
  }
};

// Runs `launch` on device copies of bounce/dst/metas and returns the new dst.
std::vector<char> runOnDevice(const std::vector<char>& bounce, const std::vector<char>& dst,
                              const std::vector<LoadMeta>& metas, bool mappedMetas,
                              const std::function<tcpxResult_t(const LoadMeta*, const char*, char*)>& launch) {
  DeviceBuffers b;
  CUDA_OK(cudaMalloc(&b.bounce, bounce.size()));
  CUDA_OK(cudaMalloc(&b.dst, dst.size()));
  CUDA_OK(cudaMemcpy(b.bounce, bounce.data(), bounce.size(), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(b.dst, dst.data(), dst.size(), cudaMemcpyHostToDevice));
  size_t mb = std::max<size_t>(1, metas.size()) * sizeof(LoadMeta);
  const LoadMeta* devMetas;
  if (mappedMetas) {  // the plugin's netUnpackMeta lives in mapped pinned host memory
    b.mapped = true;
    CUDA_OK(cudaHostAlloc(&b.metas, mb, cudaHostAllocMapped));
    memcpy(b.metas, metas.data(), metas.size() * sizeof(LoadMeta));
    LoadMeta* p;
    CUDA_OK(cudaHostGetDevicePointer(&p, b.metas, 0));
    devMetas = p;
  } else {
    CUDA_OK(cudaMalloc(&b.metas, mb));
    CUDA_OK(cudaMemcpy(b.metas, metas.data(), metas.size() * sizeof(LoadMeta), cudaMemcpyHostToDevice));
    devMetas = b.metas;
  }
  if (launch(devMetas, b.bounce, b.dst) != tcpxSuccess) {
    report(false, "launch failed: " + lastError());
    return dst;
  }
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<char> out(dst.size());
  CUDA_OK(cudaMemcpy(out.data(), b.dst, dst.size(), cudaMemcpyDeviceToHost));
  return out;
}

void testCopy(std::mt19937_64& rng, int count, uint32_t maxLen, bool gaps, bool mapped, int dstShift) {
  const size_t bounceBytes = 8 << 20;
  std::vector<char> bounce(bounceBytes);
  for (auto& c : bounce) c = static_cast<char>(rng());
  size_t dstBytes;
  auto metas = makeMetas(rng, count, maxLen, 1, bounceBytes, gaps, false, &dstBytes);
  std::vector<char> dst(dstBytes + dstShift);
  for (auto& c : dst) c = static_cast<char>(rng());
  std::vector<char> want = dst;
  for (const LoadMeta& m : metas) memcpy(&want[dstShift + m.dstOff], &bounce[m.srcOff], m.len);
  auto got = runOnDevice(bounce, dst, metas, mapped, [&](const LoadMeta* dm, const char* db, char* dd) {
    return unpackCopy(dm, static_cast<int>(metas.size()), db, dd + dstShift, nullptr);
  });
  size_t bad = 0;
  while (bad < want.size() && got[bad] == want[bad]) bad++;
  report(bad == want.size(),
         "copy: " + std::to_string(metas.size()) + " fragments of <= " + std::to_string(maxLen) +
             " B" + (gaps ? ", gaps" : "") + (mapped ? ", metas in mapped host memory" : "") +
             ", dst +" + std::to_string(dstShift) +
             (bad == want.size() ? "" : " (first wrong byte at " + std::to_string(bad) + ")"));
}

// Host reference of one element, mirroring collectives/reduce.h.
template <class T>
T hostOp(T a, T b, RedOp op) {
  if constexpr (std::is_floating_point<T>::value) {
    switch (op) {
      case RedOp::kProduct: return a * b;
      case RedOp::kMin: return ((a != a) || (a < b)) ? a : b;
      case RedOp::kMax: return ((a != a) || (a > b)) ? a : b;
      default: return a + b;
    }
  } else {
    using U = typename std::make_unsigned<T>::type;
    U ua = static_cast<U>(a), ub = static_cast<U>(b);
    switch (op) {
      case RedOp::kProduct: return static_cast<T>(static_cast<U>(ua * ub));
      case RedOp::kMin: return a < b ? a : b;
      case RedOp::kMax: return a > b ? a : b;
      case RedOp::kBand: return static_cast<T>(ua & ub);
      case RedOp::kBor: return static_cast<T>(ua | ub);
      case RedOp::kBxor: return static_cast<T>(ua ^ ub);
      default: return static_cast<T>(static_cast<U>(ua + ub));
    }
  }
}

// Element reference for every dtype, on raw bytes.
void refElement(DataType t, RedOp op, char* d, const char* s) {
  switch (t) {
    case DataType::kFloat32: { float a, b; memcpy(&a, d, 4); memcpy(&b, s, 4); a = hostOp(a, b, op); memcpy(d, &a, 4); break; }
    case DataType::kFloat64: { double a, b; memcpy(&a, d, 8); memcpy(&b, s, 8); a = hostOp(a, b, op); memcpy(d, &a, 8); break; }
    case DataType::kFloat16: { __half a, b; memcpy(&a, d, 2); memcpy(&b, s, 2);
      __half r = __float2half_rn(hostOp(__half2float(a), __half2float(b), op)); memcpy(d, &r, 2); break; }
    case DataType::kBFloat16: { __nv_bfloat16 a, b; memcpy(&a, d, 2); memcpy(&b, s, 2);
      __nv_bfloat16 r = __float2bfloat16_rn(hostOp(__bfloat162float(a), __bfloat162float(b), op)); memcpy(d, &r, 2); break; }
    case DataType::kInt8: { int8_t a, b; memcpy(&a, d, 1); memcpy(&b, s, 1); a = hostOp(a, b, op); memcpy(d, &a, 1); break; }
    case DataType::kInt16: { int16_t a, b; memcpy(&a, d, 2); memcpy(&b, s, 2); a = hostOp(a, b, op); memcpy(d, &a, 2); break; }
    case DataType::kInt32: { int32_t a, b; memcpy(&a, d, 4); memcpy(&b, s, 4); a = hostOp(a, b, op); memcpy(d, &a, 4); break; }
    case DataType::kInt64: { int64_t a, b; memcpy(&a, d, 8); memcpy(&b, s, 8); a = hostOp(a, b, op); memcpy(d, &a, 8); break; }
    case DataType::kUInt8: { uint8_t a, b; memcpy(&a, d, 1); memcpy(&b, s, 1); a = hostOp(a, b, op); memcpy(d, &a, 1); break; }
    case DataType::kBool: {
      bool x = *d != 0, y = *s != 0;
      bool r = (op == RedOp::kProduct || op == RedOp::kMin || op == RedOp::kBand) ? (x && y)
               : op == RedOp::kBxor ? (x != y) : (x || y);
      *d = r ? 1 : 0;
      break;
    }
  }
}

// Values that keep float sums and products finite and exact enough to
// compare bit for bit (one rounding per element on both sides).
void fillValues(std::mt19937_64& rng, DataType t, std::vector<char>& buf) {
  const size_t esz = dataTypeSize(t);
  for (size_t i = 0; i + esz <= buf.size(); i += esz) {
    int v = static_cast<int>(rng() % 17) - 8;
    switch (t) {
      case DataType::kFloat32: { float f = v * 0.25f; memcpy(&buf[i], &f, 4); break; }
      case DataType::kFloat64: { double f = v * 0.125; memcpy(&buf[i], &f, 8); break; }
      case DataType::kFloat16: { __half h = __float2half_rn(v * 0.5f); memcpy(&buf[i], &h, 2); break; }
      case DataType::kBFloat16: { __nv_bfloat16 h = __float2bfloat16_rn(v * 0.5f); memcpy(&buf[i], &h, 2); break; }
      case DataType::kBool: buf[i] = static_cast<char>(rng() % 2); break;
      default: for (size_t k = 0; k < esz; k++) buf[i + k] = static_cast<char>(rng()); break;
    }
  }
}

void testReduce(std::mt19937_64& rng, DataType t, RedOp op, bool alignSrc) {
  const size_t esz = dataTypeSize(t);
  const size_t bounceBytes = 4 << 20;
  std::vector<char> bounce(bounceBytes);
  fillValues(rng, t, bounce);
  size_t dstBytes;
  auto metas = makeMetas(rng, 512, 4096, esz, bounceBytes, true, alignSrc, &dstBytes);
  std::vector<char> dst(dstBytes);
  fillValues(rng, t, dst);
  if (!alignSrc) {  // misaligned sources: shift the bounce contents by one byte
    for (auto& m : metas) m.srcOff = std::min<uint32_t>(m.srcOff + 1, bounceBytes - m.len);
    for (auto& m : metas) if (m.srcOff % esz == 0 && esz > 1 && m.srcOff + 1 + m.len <= bounceBytes) m.srcOff += 1;
  }
  std::vector<char> want = dst;
  for (const LoadMeta& m : metas)
    for (uint32_t k = 0; k < m.len; k += esz) refElement(t, op, &want[m.dstOff + k], &bounce[m.srcOff + k]);
  auto got = runOnDevice(bounce, dst, metas, false, [&](const LoadMeta* dm, const char* db, char* dd) {
    return unpackReduce(dm, static_cast<int>(metas.size()), db, dd, t, op, nullptr);
  });
  size_t bad = 0;
  while (bad < want.size() && got[bad] == want[bad]) bad++;
  report(bad == want.size(), std::string("reduce ") + dataTypeName(t) + " " + redOpName(op) +
                                 (alignSrc ? "" : ", misaligned sources") +
                                 (bad == want.size() ? "" : " (first wrong byte at " + std::to_string(bad) + ")"));
}

// The staging path's shape (transport/cuda_stage.cu): page records with
// equal source and destination offsets, a separate left operand (`own`),
// and a limit that cuts the last page; 16-byte aligned buffers, so the
// vectorised reduction runs. Bytes at and past the limit stay untouched.
void testStagingReduce(std::mt19937_64& rng, DataType t, RedOp op) {
  const size_t esz = dataTypeSize(t);
  const int pages = 33;
  const size_t limit = (pages - 1) * 4096 + 1000 / esz * esz;  // last page cut short
  const size_t bytes = pages * 4096;
  std::vector<char> bounce(bytes), own(bytes), dst(bytes);
  fillValues(rng, t, bounce);
  fillValues(rng, t, own);
  fillValues(rng, t, dst);
  std::vector<LoadMeta> metas;
  for (int i = 0; i < pages; i++) metas.push_back({static_cast<uint32_t>(i * 4096), 4096, i * 4096ull});
  std::vector<char> want = dst;
  for (size_t k = 0; k < limit; k += esz) {
    memcpy(&want[k], &own[k], esz);
    refElement(t, op, &want[k], &bounce[k]);
  }
  char *dB, *dO, *dD;
  LoadMeta* dM;
  CUDA_OK(cudaMalloc(&dB, bytes));
  CUDA_OK(cudaMalloc(&dO, bytes));
  CUDA_OK(cudaMalloc(&dD, bytes));
  CUDA_OK(cudaMalloc(&dM, metas.size() * sizeof(LoadMeta)));
  CUDA_OK(cudaMemcpy(dB, bounce.data(), bytes, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dO, own.data(), bytes, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dD, dst.data(), bytes, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dM, metas.data(), metas.size() * sizeof(LoadMeta), cudaMemcpyHostToDevice));
  bool launched = unpackReduce(dM, pages, dB, dD, t, op, nullptr, dO, limit) == tcpxSuccess;
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<char> got(bytes);
  CUDA_OK(cudaMemcpy(got.data(), dD, bytes, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaFree(dB));
  CUDA_OK(cudaFree(dO));
  CUDA_OK(cudaFree(dD));
  CUDA_OK(cudaFree(dM));
  size_t bad = 0;
  while (bad < want.size() && got[bad] == want[bad]) bad++;
  report(launched && bad == want.size(),
         std::string("reduce ") + dataTypeName(t) + " " + redOpName(op) +
             ", staging shape (own operand, cut last page, 16-byte vectors)" +
             (bad == want.size() ? "" : " (first wrong byte at " + std::to_string(bad) + ")"));
}

}  // namespace

int main() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    printf("SKIP: no CUDA device\n");
    return 0;
  }
  std::mt19937_64 rng(20261121);
  for (int count : {0, 1, 7, 300, kUnpackMaxMetas})
    for (bool mapped : {false, true}) testCopy(rng, count, 4096, false, mapped, 0);
  for (int shift : {1, 3, 8, 13}) testCopy(rng, kUnpackMaxMetas, 4096, true, false, shift);
  testCopy(rng, kUnpackMaxMetas, 17, true, false, 5);  // many tiny fragments
  for (int ti = 0; ti < kNumDataTypes; ti++) {
    DataType t = static_cast<DataType>(ti);
    for (int oi = 0; oi < kNumRedOps; oi++) {
      RedOp op = static_cast<RedOp>(oi);
      if (!redOpSupported(op, t)) continue;
      testReduce(rng, t, op, true);
      testStagingReduce(rng, t, op);
    }
    testReduce(rng, t, RedOp::kSum, false);
  }
  // An unsupported pair is rejected before any launch.
  report(unpackReduce(nullptr, 1, nullptr, nullptr, DataType::kFloat32, RedOp::kBand, nullptr) ==
             tcpxInvalidArgument,
         "reduce float32 BAND is rejected");
  printf("%s: %d failure(s)\n", testFailures() ? "FAILED" : "OK", testFailures());
  return testFailures() ? 1 : 0;
}

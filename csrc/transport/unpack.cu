// Unpack kernels (see unpack.h): one warp per fragment record
// (unpack_device.cuh), a grid-stride loop over any record count.
#include "transport/unpack.h"

#include "transport/unpack_device.cuh"

namespace tcpx {
namespace {

using namespace unpack_device;

constexpr int kThreads = 256;  // 8 warps per block

__global__ void unpackCopyKernel(const LoadMeta* metas, int count, const char* bounce, char* dst,
                                 uint64_t limit) {
  const int lane = threadIdx.x % kWarp;
  const int warps = gridDim.x * (blockDim.x / kWarp);
  for (int w = (blockIdx.x * blockDim.x + threadIdx.x) / kWarp; w < count; w += warps) {
    LoadMeta m = loadMeta(metas + w, limit);
    copyFragment(dst + m.dstOff, bounce + m.srcOff, m.len, lane);
  }
}

template <class T>
__global__ void unpackReduceKernel(const LoadMeta* metas, int count, const char* bounce, char* dst,
                                   const char* own, RedOp op, uint64_t limit) {
  const int lane = threadIdx.x % kWarp;
  const int warps = gridDim.x * (blockDim.x / kWarp);
  for (int w = (blockIdx.x * blockDim.x + threadIdx.x) / kWarp; w < count; w += warps)
    reduceFragment<T>(loadMeta(metas + w, limit), bounce, dst, own, op, lane);
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

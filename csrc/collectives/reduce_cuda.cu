// Scaling and division kernels for device schedules (see reduce_cuda.h).
#include "collectives/reduce_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

namespace tcpx {
namespace {

constexpr int kThreads = 256;

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

template <class T, class F>
__global__ void scaleKernel(T* buf, size_t count, F factor, bool divide) {
  using C = typename Conv<T>::C;
  const C f = static_cast<C>(factor);
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    if constexpr (std::is_integral<T>::value) {  // AVG only: truncating, in 64 bits
      buf[i] = static_cast<T>(static_cast<long long>(buf[i]) / static_cast<long long>(factor));
    } else {
      C v = Conv<T>::in(buf[i]);
      buf[i] = Conv<T>::out(divide ? static_cast<C>(v / f) : static_cast<C>(v * f));
    }
  }
}

int blocksFor(size_t count) {
  size_t b = (count + kThreads - 1) / kThreads;
  if (b > 4096) b = 4096;
  return b < 1 ? 1 : static_cast<int>(b);
}

template <class T, class F>
tcpxResult_t launch(void* buf, size_t count, F factor, bool divide, void* stream) {
  if (count == 0) return tcpxSuccess;
  scaleKernel<T, F><<<blocksFor(count), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<T*>(buf), count, factor, divide);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    TCPX_ERR(tcpxUnhandledCudaError, "%s kernel launch failed: %s", divide ? "AVG" : "PREMUL_SUM",
             cudaGetErrorString(e));
  return tcpxSuccess;
}

template <class T, class F>
cudaError_t preload() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, scaleKernel<T, F>);
}

}  // namespace

tcpxResult_t preloadScaleKernels() {
  cudaError_t errs[] = {preload<float, float>(),     preload<double, double>(),
                        preload<__half, float>(),    preload<__nv_bfloat16, float>(),
                        preload<double, double>(),   preload<int8_t, int64_t>(),
                        preload<int16_t, int64_t>(), preload<int32_t, int64_t>(),
                        preload<int64_t, int64_t>(), preload<uint8_t, int64_t>()};
  for (cudaError_t e : errs)
    if (e != cudaSuccess)
      TCPX_ERR(tcpxUnhandledCudaError, "loading the scaling kernels: %s", cudaGetErrorString(e));
  return tcpxSuccess;
}

tcpxResult_t scaleOnDevice(void* buf, size_t count, DataType dtype, double factor, void* stream) {
  switch (dtype) {
    case DataType::kFloat32: return launch<float>(buf, count, static_cast<float>(factor), false, stream);
    case DataType::kFloat64: return launch<double>(buf, count, factor, false, stream);
    case DataType::kFloat16: return launch<__half>(buf, count, static_cast<float>(factor), false, stream);
    case DataType::kBFloat16:
      return launch<__nv_bfloat16>(buf, count, static_cast<float>(factor), false, stream);
    default: break;
  }
  TCPX_ERR(tcpxInternalError, "PREMUL_SUM scaling is not defined for %s", dataTypeName(dtype));
}

tcpxResult_t divideOnDevice(void* buf, size_t count, DataType dtype, int64_t divisor, void* stream) {
  if (divisor <= 0) TCPX_ERR(tcpxInternalError, "AVG divisor %lld is not positive", (long long)divisor);
  switch (dtype) {
    case DataType::kFloat32: return launch<float>(buf, count, static_cast<float>(divisor), true, stream);
    case DataType::kFloat64: return launch<double>(buf, count, static_cast<double>(divisor), true, stream);
    case DataType::kFloat16: return launch<__half>(buf, count, static_cast<float>(divisor), true, stream);
    case DataType::kBFloat16:
      return launch<__nv_bfloat16>(buf, count, static_cast<float>(divisor), true, stream);
    case DataType::kInt8: return launch<int8_t>(buf, count, divisor, true, stream);
    case DataType::kInt16: return launch<int16_t>(buf, count, divisor, true, stream);
    case DataType::kInt32: return launch<int32_t>(buf, count, divisor, true, stream);
    case DataType::kInt64: return launch<int64_t>(buf, count, divisor, true, stream);
    case DataType::kUInt8: return launch<uint8_t>(buf, count, divisor, true, stream);
    case DataType::kBool: break;
  }
  TCPX_ERR(tcpxInternalError, "AVG is not defined for %s", dataTypeName(dtype));
}

}  // namespace tcpx

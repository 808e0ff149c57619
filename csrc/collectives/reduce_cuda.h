// CUDA versions of the local passes of collectives/reduce.h, for device
// schedules: PREMUL_SUM's scaling and AVG's division, enqueued on `stream`
// (a cudaStream_t, the stage's comm stream). Same arithmetic as the CPU
// versions: the factor is rounded to the element type first, half types
// compute in float and round to nearest even, integers divide truncating
// toward zero. Elementwise grid-stride kernels: these passes are memory
// bound and run once per op, not per chunk. CUDA builds only.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/status.h"
#include "common/types.h"

namespace tcpx {

// buf[i] *= factor; floating types only. `factor` is already rounded to the
// element type (as scaleInPlace does) and passed in double for float64.
tcpxResult_t scaleOnDevice(void* buf, size_t count, DataType dtype, double factor, void* stream);

// buf[i] /= divisor (> 0); every type but bool.
tcpxResult_t divideOnDevice(void* buf, size_t count, DataType dtype, int64_t divisor, void* stream);

// Loads these kernels into the current device's context now (see
// transport/unpack.h, preloadUnpackKernels, for why).
tcpxResult_t preloadScaleKernels();

}  // namespace tcpx

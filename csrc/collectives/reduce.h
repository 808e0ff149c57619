// CPU reduction kernels: the arithmetic of every reduce step on host memory.
//
// All functions work element-wise on `count` elements of `dtype` (sizes in
// elements, not bytes). Pointers need only the element's natural alignment.
// Integer arithmetic wraps modulo 2^bits (computed in unsigned types: no UB),
// bool follows common/types.h (SUM/MAX = OR, PRODUCT/MIN = AND, bitwise ops
// logical), float16/bfloat16 are computed in float and rounded to nearest-even
// once per call. Loops are written for the compiler's auto-vectoriser.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/types.h"

namespace tcpx {

// dst[i] = dst[i] op src[i]. AVG and PREMUL_SUM reduce as SUM: their scaling
// is a separate pass (scaleInPlace / divideInPlace). dst and src must not
// overlap unless equal.
void reduceInto(void* dst, const void* src, size_t count, DataType dtype,
                RedOp op);

// buf[i] = buf[i] * factor, for PREMUL_SUM (floating types only; the factor is
// rounded to the element type first, as NCCL does for its scalar argument).
void scaleInPlace(void* buf, size_t count, DataType dtype, double factor);

// The factor scaleInPlace multiplies by for `dtype` (rounded to the element
// type), for device kernels that must compute the same.
double roundedScaleFactor(double factor, DataType dtype);

// buf[i] = buf[i] / divisor, for AVG. Floating types divide in the element's
// precision (half types via float); integer types divide truncating toward
// zero (NCCL's ncclAvg on integers). divisor > 0. Not defined for bool.
void divideInPlace(void* buf, size_t count, DataType dtype, int64_t divisor);

// IEEE binary16 / bfloat16 <-> float conversions (round to nearest even;
// NaN stays NaN). Exposed for tests and for other host code of the core.
float halfToFloat(uint16_t h);
uint16_t floatToHalf(float f);
float bfloat16ToFloat(uint16_t b);
uint16_t floatToBfloat16(float f);

}  // namespace tcpx

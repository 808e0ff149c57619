// CPU reduction kernels. See reduce.h for the semantics.
//
// Shape of the code: every (type, op) pair is a template instantiation of one
// plain loop over __restrict__ pointers, chosen by a switch once per call, so
// that the compiler vectorises each loop on its own. Half types are widened
// to float, reduced and rounded back in the same loop (one rounding per
// element); float16 uses F16C instructions where the CPU has them.
//
// The build compiles the core at -O2, where g++ 12 only vectorises with its
// "very cheap" cost model (no loops that need a scalar epilogue or aliasing
// checks); this file is the hot loop of every reduce step, so it asks for -O3
// (after the includes, so that only this file's code is affected).
#include "collectives/reduce.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TCPX_HAVE_F16C_PATH 1
#endif

#include "common/logging.h"

#pragma GCC optimize("O3")

namespace tcpx {
namespace {

// ---------------------------------------------------------------------------
// Bit casts and scalar conversions (inline, branch-free: they also serve the
// portable block conversions, which the compiler vectorises).

inline uint32_t floatBits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bitsFloat(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// All-ones when `c` holds: selections by mask keep the conversions free of
// branches, which is what lets the compiler vectorise the block loops.
inline uint32_t maskIf(bool c) { return 0u - static_cast<uint32_t>(c); }

inline float halfToFloatInline(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;  // exponent and mantissa, sign removed
  const uint32_t isSub = maskIf(em < 0x0400u);
  // Normal: moving the 5-bit exponent into the float's field and adding
  // 127 - 15 to it rebiases it; the mantissa just shifts. Inf/NaN (exponent
  // 31) need exponent 255, i.e. 112 added once more; a NaN also gets the
  // quiet bit, as the hardware conversion does.
  const uint32_t normal = ((em << 13) + (112u << 23) + ((112u << 23) & maskIf(em >= 0x7C00u))) |
                          (0x00400000u & maskIf(em > 0x7C00u));
  // Subnormal (exponent 0): give it the exponent of the smallest normal
  // (2^-14), whose implicit leading 1 is then subtracted away in float
  // arithmetic; exact, and no float subnormal is ever touched.
  const uint32_t sub = floatBits(bitsFloat((em << 13) + (113u << 23)) - 6.103515625e-05f);
  return bitsFloat(sign | (sub & isSub) | (normal & ~isSub));
}

inline uint16_t floatToHalfInline(float f) {
  const uint32_t x = floatBits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7FFFFFFFu;
  // Normal halves (|f| >= 2^-14): rebias the exponent and round the 13 bits
  // that drop off to nearest even by adding 0xFFF plus the lowest kept bit; a
  // carry out of the mantissa correctly bumps the exponent.
  const uint32_t normal = (a + 0xFFFu + ((a >> 13) & 1u) - (112u << 23)) >> 13;
  // Subnormal halves: adding 0.5f puts |f| on a grid of 2^-24 (the half
  // subnormal step), so the FPU does the round-to-nearest-even; what is left
  // above 0.5f is the half's bit pattern (0x400 when it rounds up to normal).
  const uint32_t sub = floatBits(bitsFloat(a) + 0.5f) - 0x3F000000u;
  // NaN keeps its top payload bits and is forced quiet, so it stays a NaN
  // even when its payload lived only in the low bits.
  const uint32_t nan = 0x7E00u | ((a >> 13) & 0x3FFu);
  const uint32_t isNan = maskIf(a > 0x7F800000u);
  const uint32_t isInf = maskIf(a >= 0x477FF000u) & ~isNan;  // >= 65520 rounds to inf
  const uint32_t isNormal = maskIf(a >= 0x38800000u) & ~isInf & ~isNan;  // >= 2^-14
  const uint32_t isSub = ~(isNan | isInf | isNormal);
  const uint32_t mag = (nan & isNan) | (0x7C00u & isInf) | (normal & isNormal) | (sub & isSub);
  return static_cast<uint16_t>(sign | mag);
}

inline float bfloat16ToFloatInline(uint16_t b) {
  return bitsFloat(static_cast<uint32_t>(b) << 16);
}

inline uint16_t floatToBfloat16Inline(float f) {
  const uint32_t x = floatBits(f);
  // Round the low 16 bits to nearest even; overflow carries into inf, which
  // is the right answer. NaN is kept quiet (and so non-zero in the kept bits).
  const uint32_t rounded = (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
  const uint32_t nan = (x >> 16) | 0x0040u;
  return static_cast<uint16_t>((x & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

// A double rounded to float "to odd": truncated, with the last bit set when
// anything was lost. Rounding that once more to a format with at least two
// fewer bits (half, bfloat16) gives the correctly rounded result, which going
// through a round-to-nearest float would not (a value just above a half-way
// point can become exactly half-way and then round to even).
float doubleToFloatRoundOdd(double x) {
  float f = static_cast<float>(x);
  if (std::isnan(x) || static_cast<double>(f) == x) return f;
  if (std::fabs(static_cast<double>(f)) > std::fabs(x)) f = std::nextafter(f, 0.0f);
  return bitsFloat(floatBits(f) | 1u);
}

// ---------------------------------------------------------------------------
// Element operations. Integers compute in an unsigned type wide enough that
// C++'s promotion to int cannot overflow (uint16 * uint16 would, in int).

template <class T>
using WideUnsigned =
    typename std::conditional<(sizeof(T) < sizeof(unsigned)), unsigned,
                              typename std::make_unsigned<T>::type>::type;

template <class T>
struct FloatSum {
  static T apply(T a, T b) { return a + b; }
};
template <class T>
struct FloatProd {
  static T apply(T a, T b) { return a * b; }
};
// NaN wins, as in torch.minimum/maximum: `a != a` catches a NaN in a, and a
// NaN in b fails the comparison and so is selected. `|`, not `||`: no
// short-circuit branch for the vectoriser to trip on.
template <class T>
struct FloatMin {
  static T apply(T a, T b) { return ((a != a) | (a < b)) ? a : b; }
};
template <class T>
struct FloatMax {
  static T apply(T a, T b) { return ((a != a) | (a > b)) ? a : b; }
};

template <class T>
struct IntSum {
  static T apply(T a, T b) {
    using U = WideUnsigned<T>;
    return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));
  }
};
template <class T>
struct IntProd {
  static T apply(T a, T b) {
    using U = WideUnsigned<T>;
    return static_cast<T>(static_cast<U>(a) * static_cast<U>(b));
  }
};
template <class T>
struct IntMin {
  static T apply(T a, T b) { return a < b ? a : b; }
};
template <class T>
struct IntMax {
  static T apply(T a, T b) { return a > b ? a : b; }
};
template <class T>
struct IntAnd {
  static T apply(T a, T b) { return static_cast<T>(a & b); }
};
template <class T>
struct IntOr {
  static T apply(T a, T b) { return static_cast<T>(a | b); }
};
template <class T>
struct IntXor {
  static T apply(T a, T b) { return static_cast<T>(a ^ b); }
};

// Bool bytes: any non-zero byte is true; results are always 0 or 1.
struct BoolOr {
  static uint8_t apply(uint8_t a, uint8_t b) { return static_cast<uint8_t>((a | b) != 0); }
};
struct BoolAnd {
  static uint8_t apply(uint8_t a, uint8_t b) {
    return static_cast<uint8_t>((a != 0) & (b != 0));
  }
};
struct BoolXor {
  static uint8_t apply(uint8_t a, uint8_t b) {
    return static_cast<uint8_t>((a != 0) ^ (b != 0));
  }
};

// ---------------------------------------------------------------------------
// The loops.

template <class T, class Op>
void loop(T* __restrict__ d, const T* __restrict__ s, size_t n) {
  for (size_t i = 0; i < n; ++i) d[i] = Op::apply(d[i], s[i]);
}

// dst == src (allowed by the header): restrict would be a lie there.
template <class T, class Op>
void loopSelf(T* d, size_t n) {
  for (size_t i = 0; i < n; ++i) d[i] = Op::apply(d[i], d[i]);
}

template <class T, class Op>
void run(void* dst, const void* src, size_t n) {
  T* d = static_cast<T*>(dst);
  if (dst == src) {
    loopSelf<T, Op>(d, n);
  } else {
    loop<T, Op>(d, static_cast<const T*>(src), n);
  }
}

void badOp(DataType t, RedOp op) {
  // Callers check redOpSupported first; reaching this is a bug. Leave the
  // data alone rather than crash in the middle of a collective.
  TCPX_WARN("reduceInto: %s is not defined on %s; buffer left unchanged (internal error)",
            redOpName(op), dataTypeName(t));
}

template <class T>
void reduceFloat(void* d, const void* s, size_t n, DataType t, RedOp op) {
  switch (op) {
    case RedOp::kSum:
    case RedOp::kAvg:
    case RedOp::kPremulSum: return run<T, FloatSum<T>>(d, s, n);
    case RedOp::kProduct: return run<T, FloatProd<T>>(d, s, n);
    case RedOp::kMin: return run<T, FloatMin<T>>(d, s, n);
    case RedOp::kMax: return run<T, FloatMax<T>>(d, s, n);
    default: return badOp(t, op);
  }
}

template <class T>
void reduceInt(void* d, const void* s, size_t n, DataType t, RedOp op) {
  switch (op) {
    case RedOp::kSum:
    case RedOp::kAvg:
    case RedOp::kPremulSum: return run<T, IntSum<T>>(d, s, n);
    case RedOp::kProduct: return run<T, IntProd<T>>(d, s, n);
    case RedOp::kMin: return run<T, IntMin<T>>(d, s, n);
    case RedOp::kMax: return run<T, IntMax<T>>(d, s, n);
    case RedOp::kBand: return run<T, IntAnd<T>>(d, s, n);
    case RedOp::kBor: return run<T, IntOr<T>>(d, s, n);
    case RedOp::kBxor: return run<T, IntXor<T>>(d, s, n);
  }
  badOp(t, op);
}

void reduceBool(void* d, const void* s, size_t n, RedOp op) {
  switch (op) {
    case RedOp::kSum:
    case RedOp::kMax:
    case RedOp::kBor:
    case RedOp::kAvg:        // undefined on bool (never called): harmless OR
    case RedOp::kPremulSum:  // likewise
      return run<uint8_t, BoolOr>(d, s, n);
    case RedOp::kProduct:
    case RedOp::kMin:
    case RedOp::kBand: return run<uint8_t, BoolAnd>(d, s, n);
    case RedOp::kBxor: return run<uint8_t, BoolXor>(d, s, n);
  }
  badOp(DataType::kBool, op);
}

// ---------------------------------------------------------------------------
// Half types: one fused pass per element (widen both, operate in float, round
// once, store), so no temporary buffer round-trips through memory.

// The portable conversions vectorise well only with AVX2: SSE2 has no cheap
// narrowing of 32-bit lanes to 16 bits. Where the toolchain can (GNU ifunc),
// the half loops get an AVX2 clone chosen at load time.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define TCPX_AVX2_CLONE __attribute__((target_clones("avx2", "default")))
#else
#define TCPX_AVX2_CLONE
#endif

struct Fp16 {
  static float toFloat(uint16_t h) { return halfToFloatInline(h); }
  static uint16_t fromFloat(float f) { return floatToHalfInline(f); }
};
struct Bf16 {
  static float toFloat(uint16_t h) { return bfloat16ToFloatInline(h); }
  static uint16_t fromFloat(float f) { return floatToBfloat16Inline(f); }
};

template <class Conv, class Op>
TCPX_AVX2_CLONE void halfLoop(uint16_t* __restrict__ d, const uint16_t* __restrict__ s,
                              size_t n) {
  for (size_t i = 0; i < n; ++i)
    d[i] = Conv::fromFloat(Op::apply(Conv::toFloat(d[i]), Conv::toFloat(s[i])));
}

template <class Conv, class Op>
TCPX_AVX2_CLONE void halfLoopSelf(uint16_t* d, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    float x = Conv::toFloat(d[i]);
    d[i] = Conv::fromFloat(Op::apply(x, x));
  }
}

template <class Conv, class Op>
void runHalf(uint16_t* d, const uint16_t* s, size_t n) {
  if (d == s) {
    halfLoopSelf<Conv, Op>(d, n);
  } else {
    halfLoop<Conv, Op>(d, s, n);
  }
}

#ifdef TCPX_HAVE_F16C_PATH
// float16 on CPUs with F16C (every x86-64 of the last decade): the hardware
// converts 8 elements per instruction, rounding to nearest even like the
// portable code. Only called after the CPU check below.
#define TCPX_F16C __attribute__((target("avx,f16c")))

// The float ops on 8 lanes, with the scalar ops' semantics exactly: minps and
// maxps return their second operand when either is NaN, so a NaN in the
// first is put back under a mask (and/andnot/or: g++ 12 turns blendv into
// scalar branches here).
template <class Op>
struct Vec;
template <>
struct Vec<FloatSum<float>> {
  TCPX_F16C static __m256 apply(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
};
template <>
struct Vec<FloatProd<float>> {
  TCPX_F16C static __m256 apply(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
};
template <>
struct Vec<FloatMin<float>> {
  TCPX_F16C static __m256 apply(__m256 a, __m256 b) {
    __m256 nan = _mm256_cmp_ps(a, a, _CMP_UNORD_Q);
    return _mm256_or_ps(_mm256_and_ps(nan, a), _mm256_andnot_ps(nan, _mm256_min_ps(a, b)));
  }
};
template <>
struct Vec<FloatMax<float>> {
  TCPX_F16C static __m256 apply(__m256 a, __m256 b) {
    __m256 nan = _mm256_cmp_ps(a, a, _CMP_UNORD_Q);
    return _mm256_or_ps(_mm256_and_ps(nan, a), _mm256_andnot_ps(nan, _mm256_max_ps(a, b)));
  }
};

// No __restrict__: each step loads its 8 elements before storing them, so
// d == s is fine.
template <class Op>
TCPX_F16C void fp16LoopF16C(uint16_t* d, const uint16_t* s, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + i)));
    __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    __m128i r = _mm256_cvtps_ph(Vec<Op>::apply(a, b), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), r);
  }
  // The last < 8 elements: the portable loop rounds the same way.
  if (i < n) runHalf<Fp16, Op>(d + i, s + i, n - i);
}

std::atomic<bool> gF16cAllowed{true};

bool haveF16C() {
  static const bool have = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  }();
  return have && gF16cAllowed.load(std::memory_order_relaxed);
}
#endif

template <class Op>
void reduceHalfOp(uint16_t* d, const uint16_t* s, size_t n, DataType t) {
  if (t == DataType::kBFloat16) return runHalf<Bf16, Op>(d, s, n);
#ifdef TCPX_HAVE_F16C_PATH
  if (haveF16C()) return fp16LoopF16C<Op>(d, s, n);
#endif
  runHalf<Fp16, Op>(d, s, n);
}

void reduceHalf(void* dst, const void* src, size_t n, DataType t, RedOp op) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  const uint16_t* s = static_cast<const uint16_t*>(src);
  switch (op) {
    case RedOp::kSum:
    case RedOp::kAvg:
    case RedOp::kPremulSum: return reduceHalfOp<FloatSum<float>>(d, s, n, t);
    case RedOp::kProduct: return reduceHalfOp<FloatProd<float>>(d, s, n, t);
    case RedOp::kMin: return reduceHalfOp<FloatMin<float>>(d, s, n, t);
    case RedOp::kMax: return reduceHalfOp<FloatMax<float>>(d, s, n, t);
    default: return badOp(t, op);
  }
}

// ---------------------------------------------------------------------------
// Scaling passes.

template <class T>
void scaleLoop(T* __restrict__ d, size_t n, T f) {
  for (size_t i = 0; i < n; ++i) d[i] = d[i] * f;
}

template <class T>
void divideLoopFloat(T* __restrict__ d, size_t n, T divisor) {
  for (size_t i = 0; i < n; ++i) d[i] = d[i] / divisor;
}

// Integer division does not vectorise on x86; AVG on integers is rare, so a
// plain loop is enough. The quotient of a value of T by a positive int64 fits
// in T, and C++ division truncates toward zero.
template <class T>
void divideLoopInt(T* __restrict__ d, size_t n, int64_t divisor) {
  for (size_t i = 0; i < n; ++i)
    d[i] = static_cast<T>(static_cast<int64_t>(d[i]) / divisor);
}

// `x * f` (scale) or `x / f` (divide) on half-type elements, in float. These
// passes run once per AVG / PREMUL_SUM, so the portable loop is enough.
template <class Conv, bool kDivide>
TCPX_AVX2_CLONE void halfScaleLoop(uint16_t* __restrict__ d, size_t n, float f) {
  for (size_t i = 0; i < n; ++i) {
    float x = Conv::toFloat(d[i]);
    d[i] = Conv::fromFloat(kDivide ? x / f : x * f);
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Public entry points.

// Lets the tests run the portable float16 path on CPUs that have F16C (the
// path other architectures take). Deliberately not in reduce.h.
void setF16cEnabledForTesting(bool enabled) {
#ifdef TCPX_HAVE_F16C_PATH
  gF16cAllowed.store(enabled, std::memory_order_relaxed);
#else
  (void)enabled;
#endif
}

float halfToFloat(uint16_t h) { return halfToFloatInline(h); }
uint16_t floatToHalf(float f) { return floatToHalfInline(f); }
float bfloat16ToFloat(uint16_t b) { return bfloat16ToFloatInline(b); }
uint16_t floatToBfloat16(float f) { return floatToBfloat16Inline(f); }

void reduceInto(void* dst, const void* src, size_t count, DataType dtype, RedOp op) {
  if (count == 0) return;
  switch (dtype) {
    case DataType::kFloat32: return reduceFloat<float>(dst, src, count, dtype, op);
    case DataType::kFloat64: return reduceFloat<double>(dst, src, count, dtype, op);
    case DataType::kFloat16:
    case DataType::kBFloat16: return reduceHalf(dst, src, count, dtype, op);
    case DataType::kInt8: return reduceInt<int8_t>(dst, src, count, dtype, op);
    case DataType::kInt16: return reduceInt<int16_t>(dst, src, count, dtype, op);
    case DataType::kInt32: return reduceInt<int32_t>(dst, src, count, dtype, op);
    case DataType::kInt64: return reduceInt<int64_t>(dst, src, count, dtype, op);
    case DataType::kUInt8: return reduceInt<uint8_t>(dst, src, count, dtype, op);
    case DataType::kBool: return reduceBool(dst, src, count, op);
  }
  TCPX_WARN("reduceInto: unknown data type %d (internal error)", static_cast<int>(dtype));
}

void scaleInPlace(void* buf, size_t count, DataType dtype, double factor) {
  if (count == 0) return;
  switch (dtype) {
    case DataType::kFloat32:
      return scaleLoop<float>(static_cast<float*>(buf), count, static_cast<float>(factor));
    case DataType::kFloat64:
      return scaleLoop<double>(static_cast<double*>(buf), count, factor);
    case DataType::kFloat16: {
      float f = halfToFloatInline(floatToHalfInline(doubleToFloatRoundOdd(factor)));
      return halfScaleLoop<Fp16, false>(static_cast<uint16_t*>(buf), count, f);
    }
    case DataType::kBFloat16: {
      float f = bfloat16ToFloatInline(floatToBfloat16Inline(doubleToFloatRoundOdd(factor)));
      return halfScaleLoop<Bf16, false>(static_cast<uint16_t*>(buf), count, f);
    }
    default: break;
  }
  TCPX_WARN("scaleInPlace: not defined on %s; buffer left unchanged (internal error)",
            dataTypeName(dtype));
}

double roundedScaleFactor(double factor, DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32: return static_cast<float>(factor);
    case DataType::kFloat16:
      return halfToFloatInline(floatToHalfInline(doubleToFloatRoundOdd(factor)));
    case DataType::kBFloat16:
      return bfloat16ToFloatInline(floatToBfloat16Inline(doubleToFloatRoundOdd(factor)));
    default: return factor;
  }
}

void divideInPlace(void* buf, size_t count, DataType dtype, int64_t divisor) {
  if (count == 0) return;
  if (divisor <= 0) {
    TCPX_WARN("divideInPlace: divisor %lld is not positive; buffer left unchanged "
              "(internal error)", static_cast<long long>(divisor));
    return;
  }
  switch (dtype) {
    case DataType::kFloat32:
      return divideLoopFloat<float>(static_cast<float*>(buf), count,
                                    static_cast<float>(divisor));
    case DataType::kFloat64:
      return divideLoopFloat<double>(static_cast<double*>(buf), count,
                                     static_cast<double>(divisor));
    case DataType::kFloat16:
      return halfScaleLoop<Fp16, true>(static_cast<uint16_t*>(buf), count,
                                       static_cast<float>(divisor));
    case DataType::kBFloat16:
      return halfScaleLoop<Bf16, true>(static_cast<uint16_t*>(buf), count,
                                       static_cast<float>(divisor));
    case DataType::kInt8: return divideLoopInt<int8_t>(static_cast<int8_t*>(buf), count, divisor);
    case DataType::kInt16:
      return divideLoopInt<int16_t>(static_cast<int16_t*>(buf), count, divisor);
    case DataType::kInt32:
      return divideLoopInt<int32_t>(static_cast<int32_t*>(buf), count, divisor);
    case DataType::kInt64:
      return divideLoopInt<int64_t>(static_cast<int64_t*>(buf), count, divisor);
    case DataType::kUInt8:
      return divideLoopInt<uint8_t>(static_cast<uint8_t*>(buf), count, divisor);
    case DataType::kBool: break;
  }
  TCPX_WARN("divideInPlace: not defined on %s; buffer left unchanged (internal error)",
            dataTypeName(dtype));
}

}  // namespace tcpx

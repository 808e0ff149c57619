// Tests of collectives/reduce.h against references computed here, by other
// means than the code under test: integers in __int128 then wrapped, float32
// in double, float64 in __float128, half types decoded and rounded by a
// generic frexp/nearbyint routine (correct rounding of the exact result).
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "collectives/reduce.h"
#include "common/types.h"

namespace tcpx {

// reduce.cc: switches its F16C path off so that the portable float16 code
// (what CPUs without F16C run) is tested here too. Not in reduce.h.
void setF16cEnabledForTesting(bool enabled);

namespace {

#ifdef __SIZEOF_FLOAT128__
using Wide = __float128;  // 113-bit significand: double rounding via it is innocuous
#else
using Wide = long double;
#endif

// ---------------------------------------------------------------------------
// Reference encodings of binary16 (5 exponent bits, 10 mantissa bits) and
// bfloat16 (8, 7), written generically from the IEEE layout.

struct Format {
  int expBits;
  int mantBits;
  int bias() const { return (1 << (expBits - 1)) - 1; }
  uint32_t infBits() const { return ((1u << expBits) - 1) << mantBits; }
};
constexpr Format kHalf{5, 10};
constexpr Format kBf16{8, 7};

double refDecode(uint32_t bits, Format f) {
  const uint32_t mant = bits & ((1u << f.mantBits) - 1);
  const uint32_t e = (bits >> f.mantBits) & ((1u << f.expBits) - 1);
  const bool neg = (bits >> (f.mantBits + f.expBits)) & 1u;
  double v;
  if (e == (1u << f.expBits) - 1) {
    v = mant ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else if (e == 0) {
    v = std::ldexp(static_cast<double>(mant), 1 - f.bias() - f.mantBits);
  } else {
    v = std::ldexp(static_cast<double>(mant + (1u << f.mantBits)),
                   static_cast<int>(e) - f.bias() - f.mantBits);
  }
  return neg ? -v : v;
}

// Correctly rounded (to nearest, ties to even) encoding of `v`. NaN gives
// some NaN (the tests only ask isnan of it).
uint32_t refRound(double v, Format f) {
  const uint32_t signBit = 1u << (f.mantBits + f.expBits);
  if (std::isnan(v)) return f.infBits() | (1u << (f.mantBits - 1));
  const uint32_t sign = std::signbit(v) ? signBit : 0u;
  double a = std::fabs(v);
  if (a == 0) return sign;
  if (std::isinf(a)) return sign | f.infBits();
  int e2;
  std::frexp(a, &e2);  // a = m * 2^e2, m in [0.5, 1)
  int E = e2 - 1;      // a in [2^E, 2^(E+1))
  const int emin = 1 - f.bias();
  if (E < emin) E = emin;  // subnormal: fixed quantum
  // Significand scaled to an integer at this binade's quantum: exact scaling,
  // then the one rounding.
  double q = std::nearbyint(std::ldexp(a, f.mantBits - E));
  const double top = std::ldexp(1.0, f.mantBits + 1);
  if (q >= top) {
    q /= 2;  // rounded up into the next binade (q was exactly 2^(m+1))
    E += 1;
  }
  if (E > f.bias()) return sign | f.infBits();
  const uint32_t qi = static_cast<uint32_t>(q);
  if (qi < (1u << f.mantBits)) return sign | qi;  // subnormal (E == emin)
  return sign | (static_cast<uint32_t>(E + f.bias()) << f.mantBits) |
         (qi - (1u << f.mantBits));
}

bool refIsNan(uint32_t bits, Format f) {
  return (bits & f.infBits()) == f.infBits() && (bits & ((1u << f.mantBits) - 1)) != 0;
}

float bitsToFloat(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
uint64_t doubleToBits(double d) {
  uint64_t u;
  memcpy(&u, &d, 8);
  return u;
}

// ---------------------------------------------------------------------------
// Conversions.

TEST(ReduceConvert, HalfToFloatAllBitPatterns) {
  for (uint32_t h = 0; h < 65536; ++h) {
    float got = halfToFloat(static_cast<uint16_t>(h));
    double want = refDecode(h, kHalf);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got)) << std::hex << h;
      ASSERT_EQ(std::signbit(got), (h & 0x8000) != 0) << std::hex << h;
    } else {
      ASSERT_EQ(static_cast<double>(got), want) << std::hex << h;
      ASSERT_EQ(std::signbit(got), std::signbit(want)) << std::hex << h;
    }
  }
}

TEST(ReduceConvert, Bfloat16ToFloatAllBitPatterns) {
  for (uint32_t b = 0; b < 65536; ++b) {
    float got = bfloat16ToFloat(static_cast<uint16_t>(b));
    double want = refDecode(b, kBf16);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got)) << std::hex << b;
    } else {
      ASSERT_EQ(static_cast<double>(got), want) << std::hex << b;
      ASSERT_EQ(std::signbit(got), std::signbit(want)) << std::hex << b;
    }
  }
}

// Every finite value converts back to itself; NaNs stay NaN.
TEST(ReduceConvert, RoundTripAllBitPatterns) {
  for (uint32_t h = 0; h < 65536; ++h) {
    if (refIsNan(h, kHalf)) {
      ASSERT_TRUE(refIsNan(floatToHalf(static_cast<float>(refDecode(h, kHalf))), kHalf));
    } else {
      ASSERT_EQ(floatToHalf(static_cast<float>(refDecode(h, kHalf))), h) << std::hex << h;
    }
    if (refIsNan(h, kBf16)) {
      ASSERT_TRUE(refIsNan(floatToBfloat16(static_cast<float>(refDecode(h, kBf16))), kBf16));
    } else {
      ASSERT_EQ(floatToBfloat16(static_cast<float>(refDecode(h, kBf16))), h) << std::hex << h;
    }
  }
}

// Exactly half-way between two neighbours rounds to the even one; one float
// ulp either side rounds to the nearer one. Covers subnormals, binade
// boundaries and the overflow threshold (between max finite and "2^16").
void checkMidpoints(Format f, uint16_t (*conv)(float)) {
  const uint32_t lastFinite = f.infBits() - 1;
  for (uint32_t lo = 0; lo <= lastFinite; ++lo) {
    const uint32_t hi = lo + 1;  // hi == inf bits: the next binade's first value
    double vlo = refDecode(lo, f);
    double vhi = hi == f.infBits() ? std::ldexp(1.0, f.bias() + 1) : refDecode(hi, f);
    float mid = static_cast<float>((vlo + vhi) / 2);
    ASSERT_EQ(static_cast<double>(mid), (vlo + vhi) / 2);  // exact in float
    uint32_t even = (lo & 1) ? hi : lo;
    for (uint32_t sign : {0u, 1u << (f.expBits + f.mantBits)}) {
      float s = sign ? -1.0f : 1.0f;
      ASSERT_EQ(conv(s * mid), sign | even) << std::hex << lo;
      ASSERT_EQ(conv(s * std::nextafter(mid, 0.0f)), sign | lo) << std::hex << lo;
      ASSERT_EQ(conv(s * std::nextafter(mid, INFINITY)), sign | hi) << std::hex << lo;
    }
  }
}

TEST(ReduceConvert, HalfMidpointsRoundToNearestEven) { checkMidpoints(kHalf, floatToHalf); }
TEST(ReduceConvert, Bfloat16MidpointsRoundToNearestEven) {
  checkMidpoints(kBf16, floatToBfloat16);
}

TEST(ReduceConvert, RandomFloatsAgainstReference) {
  std::mt19937 rng(1234);
  for (int i = 0; i < 1000000; ++i) {
    uint32_t x = rng();
    float f = bitsToFloat(x);
    uint32_t wantH = refRound(static_cast<double>(f), kHalf);
    uint32_t wantB = refRound(static_cast<double>(f), kBf16);
    if (std::isnan(f)) {
      ASSERT_TRUE(refIsNan(floatToHalf(f), kHalf)) << std::hex << x;
      ASSERT_TRUE(refIsNan(floatToBfloat16(f), kBf16)) << std::hex << x;
    } else {
      ASSERT_EQ(floatToHalf(f), wantH) << std::hex << x;
      ASSERT_EQ(floatToBfloat16(f), wantB) << std::hex << x;
    }
  }
}

TEST(ReduceConvert, Specials) {
  EXPECT_EQ(floatToHalf(65504.0f), 0x7BFF);
  EXPECT_EQ(floatToHalf(std::nextafter(65520.0f, 0.0f)), 0x7BFF);
  EXPECT_EQ(floatToHalf(65520.0f), 0x7C00);  // tie with an odd max: up, to inf
  EXPECT_EQ(floatToHalf(1e10f), 0x7C00);
  EXPECT_EQ(floatToHalf(-FLT_MAX), 0xFC00);
  EXPECT_EQ(floatToHalf(INFINITY), 0x7C00);
  EXPECT_EQ(floatToHalf(-INFINITY), 0xFC00);
  EXPECT_EQ(floatToHalf(-0.0f), 0x8000);
  EXPECT_EQ(floatToHalf(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(floatToHalf(std::ldexp(1.0f, -25)), 0x0000);  // tie: to even (0)
  EXPECT_EQ(floatToHalf(std::ldexp(3.0f, -25)), 0x0002);  // tie: to even (2)
  EXPECT_EQ(floatToHalf(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001);
  EXPECT_EQ(floatToHalf(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(floatToHalf(std::ldexp(1023.5f, -24)), 0x0400);  // rounds up to min normal
  // NaNs whose payload sits only in bits that the conversion drops.
  EXPECT_TRUE(refIsNan(floatToHalf(bitsToFloat(0x7F800001u)), kHalf));
  EXPECT_TRUE(refIsNan(floatToHalf(bitsToFloat(0xFF800001u)), kHalf));
  EXPECT_TRUE(refIsNan(floatToBfloat16(bitsToFloat(0x7F800001u)), kBf16));
  EXPECT_TRUE(refIsNan(floatToBfloat16(bitsToFloat(0xFFC00000u)), kBf16));
  EXPECT_EQ(floatToBfloat16(FLT_MAX), 0x7F80);  // rounds past the largest bfloat16
  EXPECT_EQ(floatToBfloat16(-INFINITY), 0xFF80);
  EXPECT_EQ(floatToBfloat16(1.0f), 0x3F80);
  EXPECT_EQ(floatToBfloat16(bitsToFloat(0x3F808000u)), 0x3F80);  // tie, even down
  EXPECT_EQ(floatToBfloat16(bitsToFloat(0x3F818000u)), 0x3F82);  // tie, even up
  EXPECT_EQ(floatToBfloat16(bitsToFloat(0x00008000u)), 0x0000);  // subnormal tie
  EXPECT_EQ(floatToBfloat16(bitsToFloat(0x00018000u)), 0x0002);
  EXPECT_TRUE(std::isnan(halfToFloat(0x7C01)));
  EXPECT_TRUE(std::isinf(halfToFloat(0xFC00)));
  EXPECT_EQ(halfToFloat(0x0001), std::ldexp(1.0f, -24));
}

// ---------------------------------------------------------------------------
// Data generation.

const DataType kAllTypes[] = {DataType::kFloat32, DataType::kFloat64, DataType::kFloat16,
                              DataType::kBFloat16, DataType::kInt8,    DataType::kInt16,
                              DataType::kInt32,   DataType::kInt64,   DataType::kUInt8,
                              DataType::kBool};

// A float from a mix: mostly ordinary values of a few magnitudes (so sums
// round in interesting ways), some NaN, inf, zero, subnormal, any bit pattern.
template <class F, class U>
F genFloating(std::mt19937_64& rng) {
  switch (rng() % 20) {
    case 0: return std::numeric_limits<F>::quiet_NaN() * ((rng() & 1) ? -1 : 1);
    case 1: return std::numeric_limits<F>::infinity() * ((rng() & 1) ? -1 : 1);
    case 2: return (rng() & 1) ? F(0) : -F(0);
    case 3: return std::numeric_limits<F>::denorm_min() * static_cast<F>(rng() % 1000);
    case 4: {
      U u = static_cast<U>(rng());
      F f;
      memcpy(&f, &u, sizeof(f));
      return f;
    }
    default: {
      double m = std::ldexp(static_cast<double>(rng() >> 11), -53);  // [0, 1)
      int e = static_cast<int>(rng() % 41) - 20;
      return static_cast<F>(((rng() & 1) ? -1 : 1) * std::ldexp(m, e));
    }
  }
}

// Half-type bit patterns: any pattern, or exponents close together so that
// sums and products of pairs round non-trivially.
uint16_t genHalfBits(std::mt19937_64& rng, Format f) {
  uint64_t r = rng();
  if (r % 4 == 0) return static_cast<uint16_t>(r >> 8);
  uint32_t mid = static_cast<uint32_t>(f.bias());
  uint32_t e = mid - 3 + static_cast<uint32_t>((r >> 8) % 7);
  uint32_t mant = static_cast<uint32_t>(r >> 16) & ((1u << f.mantBits) - 1);
  uint32_t sign = static_cast<uint32_t>(r >> 40) & 1u;
  return static_cast<uint16_t>((sign << (f.expBits + f.mantBits)) | (e << f.mantBits) | mant);
}

template <class T>
T genInt(std::mt19937_64& rng) {
  switch (rng() % 8) {
    case 0: return std::numeric_limits<T>::min();
    case 1: return std::numeric_limits<T>::max();
    case 2: return static_cast<T>(static_cast<int>(rng() % 5) - 2);
    default: return static_cast<T>(rng());
  }
}

void genElement(DataType dt, std::mt19937_64& rng, void* p) {
  switch (dt) {
    case DataType::kFloat32: {
      float v = genFloating<float, uint32_t>(rng);
      memcpy(p, &v, 4);
      break;
    }
    case DataType::kFloat64: {
      double v = genFloating<double, uint64_t>(rng);
      memcpy(p, &v, 8);
      break;
    }
    case DataType::kFloat16: {
      uint16_t v = genHalfBits(rng, kHalf);
      memcpy(p, &v, 2);
      break;
    }
    case DataType::kBFloat16: {
      uint16_t v = genHalfBits(rng, kBf16);
      memcpy(p, &v, 2);
      break;
    }
    case DataType::kInt8: *static_cast<int8_t*>(p) = genInt<int8_t>(rng); break;
    case DataType::kInt16: {
      int16_t v = genInt<int16_t>(rng);
      memcpy(p, &v, 2);
      break;
    }
    case DataType::kInt32: {
      int32_t v = genInt<int32_t>(rng);
      memcpy(p, &v, 4);
      break;
    }
    case DataType::kInt64: {
      int64_t v = genInt<int64_t>(rng);
      memcpy(p, &v, 8);
      break;
    }
    case DataType::kUInt8: *static_cast<uint8_t*>(p) = genInt<uint8_t>(rng); break;
    case DataType::kBool: {
      static const uint8_t kBytes[] = {0, 1, 2, 255, 128, 0, 1, 17};
      *static_cast<uint8_t*>(p) = kBytes[rng() % 8];
      break;
    }
  }
}

// ---------------------------------------------------------------------------
// Reference element reductions. Each returns "" when `got` is right, else a
// description of the mismatch.

// The operation on exact (or correctly rounded wide) values. MIN/MAX
// propagate NaN, as torch.minimum/maximum do.
template <class W>
W refOp(W a, W b, RedOp op) {
  switch (op) {
    case RedOp::kProduct: return a * b;
    case RedOp::kMin:
      if (a != a || b != b) return std::numeric_limits<double>::quiet_NaN();
      return a < b ? a : b;
    case RedOp::kMax:
      if (a != a || b != b) return std::numeric_limits<double>::quiet_NaN();
      return a > b ? a : b;
    default: return a + b;  // SUM, AVG, PREMUL_SUM
  }
}

template <class T>
std::string str(T v) {
  return std::to_string(v);
}
std::string str(int8_t v) { return std::to_string(static_cast<int>(v)); }
std::string str(uint8_t v) { return std::to_string(static_cast<int>(v)); }

// Floating: `got` must equal the rounded reference bit for bit; NaN must be
// some NaN; MIN/MAX may pick either zero of an equal pair (compare values).
std::string compareFloating(double want, double got, RedOp op) {
  if (std::isnan(want)) return std::isnan(got) ? "" : "want NaN, got " + std::to_string(got);
  bool same = (op == RedOp::kMin || op == RedOp::kMax)
                  ? want == got
                  : doubleToBits(want) == doubleToBits(got);
  if (same) return "";
  char buf[128];
  snprintf(buf, sizeof(buf), "want %a, got %a", want, got);
  return buf;
}

template <class T>
std::string checkInt(const void* pa, const void* pb, const void* pg, RedOp op) {
  T a, b, g;
  memcpy(&a, pa, sizeof(T));
  memcpy(&b, pb, sizeof(T));
  memcpy(&g, pg, sizeof(T));
  __int128 wa = a, wb = b, r;
  // Bitwise ops on the two's complement patterns, zero-extended.
  uint64_t ua = 0, ub = 0;
  memcpy(&ua, pa, sizeof(T));
  memcpy(&ub, pb, sizeof(T));
  switch (op) {
    case RedOp::kProduct: r = wa * wb; break;
    case RedOp::kMin: r = wa < wb ? wa : wb; break;
    case RedOp::kMax: r = wa > wb ? wa : wb; break;
    case RedOp::kBand: r = static_cast<__int128>(ua & ub); break;
    case RedOp::kBor: r = static_cast<__int128>(ua | ub); break;
    case RedOp::kBxor: r = static_cast<__int128>(ua ^ ub); break;
    default: r = wa + wb; break;
  }
  // Wrap modulo 2^bits: keep the low bytes of the two's complement value.
  uint64_t low = static_cast<uint64_t>(static_cast<unsigned __int128>(r));
  T want;
  memcpy(&want, &low, sizeof(T));  // little-endian: the low bytes first
  if (want == g) return "";
  return "a=" + str(a) + " b=" + str(b) + " want " + str(want) + ", got " + str(g);
}

std::string checkBool(const void* pa, const void* pb, const void* pg, RedOp op) {
  uint8_t a = *static_cast<const uint8_t*>(pa), b = *static_cast<const uint8_t*>(pb);
  uint8_t g = *static_cast<const uint8_t*>(pg);
  bool ta = a != 0, tb = b != 0, w;
  switch (op) {
    case RedOp::kSum:
    case RedOp::kMax:
    case RedOp::kBor: w = ta || tb; break;
    case RedOp::kBxor: w = ta != tb; break;
    default: w = ta && tb; break;  // PRODUCT, MIN, BAND
  }
  if (g == (w ? 1 : 0)) return "";
  return "a=" + str(a) + " b=" + str(b) + " want " + std::to_string(w) + ", got byte " + str(g);
}

std::string checkElement(DataType dt, RedOp op, const void* a, const void* b, const void* g) {
  switch (dt) {
    case DataType::kFloat32: {
      float fa, fb, fg;
      memcpy(&fa, a, 4);
      memcpy(&fb, b, 4);
      memcpy(&fg, g, 4);
      // Double rounding exact -> double -> float is innocuous for + and x.
      float want = static_cast<float>(refOp<double>(fa, fb, op));
      return compareFloating(want, fg, op);
    }
    case DataType::kFloat64: {
      double fa, fb, fg;
      memcpy(&fa, a, 8);
      memcpy(&fb, b, 8);
      memcpy(&fg, g, 8);
      double want;
      if (op == RedOp::kMin || op == RedOp::kMax) {
        want = refOp<double>(fa, fb, op);
      } else {
        want = static_cast<double>(refOp<Wide>(static_cast<Wide>(fa), static_cast<Wide>(fb), op));
      }
      return compareFloating(want, fg, op);
    }
    case DataType::kFloat16:
    case DataType::kBFloat16: {
      Format f = dt == DataType::kFloat16 ? kHalf : kBf16;
      uint16_t ha, hb, hg;
      memcpy(&ha, a, 2);
      memcpy(&hb, b, 2);
      memcpy(&hg, g, 2);
      double exact = refOp<double>(refDecode(ha, f), refDecode(hb, f), op);
      uint32_t want = refRound(exact, f);
      if (refIsNan(want, f)) return refIsNan(hg, f) ? "" : "want NaN, got bits " + str(hg);
      std::string r = compareFloating(refDecode(want, f), refDecode(hg, f), op);
      if (!r.empty()) r += " (bits " + str(ha) + " op " + str(hb) + ")";
      return r;
    }
    case DataType::kInt8: return checkInt<int8_t>(a, b, g, op);
    case DataType::kInt16: return checkInt<int16_t>(a, b, g, op);
    case DataType::kInt32: return checkInt<int32_t>(a, b, g, op);
    case DataType::kInt64: return checkInt<int64_t>(a, b, g, op);
    case DataType::kUInt8: return checkInt<uint8_t>(a, b, g, op);
    case DataType::kBool: return checkBool(a, b, g, op);
  }
  return "unknown dtype";
}

std::vector<RedOp> opsFor(DataType dt) {
  std::vector<RedOp> ops = {RedOp::kSum, RedOp::kProduct, RedOp::kMin, RedOp::kMax};
  if (!isFloatingType(dt)) {
    ops.push_back(RedOp::kBand);
    ops.push_back(RedOp::kBor);
    ops.push_back(RedOp::kBxor);
  }
  if (dt != DataType::kBool) ops.push_back(RedOp::kAvg);        // reduces as SUM
  if (isFloatingType(dt)) ops.push_back(RedOp::kPremulSum);    // likewise
  return ops;
}

// One case: buffers of count + 2 guard elements, the data `offset` elements
// in (offset 1 makes them unaligned for anything wider than one element).
void runCase(DataType dt, RedOp op, size_t count, size_t offset, bool self,
             std::mt19937_64& rng) {
  const size_t es = dataTypeSize(dt);
  const size_t total = count + offset + 2;
  std::vector<uint64_t> dstStore(total + 1), srcStore(total + 1);
  uint8_t* dstBase = reinterpret_cast<uint8_t*>(dstStore.data());
  uint8_t* srcBase = reinterpret_cast<uint8_t*>(srcStore.data());
  for (size_t i = 0; i < total; ++i) {
    genElement(dt, rng, dstBase + i * es);
    genElement(dt, rng, srcBase + i * es);
  }
  std::vector<uint8_t> before(dstBase, dstBase + total * es);
  uint8_t* d = dstBase + offset * es;
  const uint8_t* s = self ? d : srcBase + offset * es;
  const std::vector<uint8_t> srcCopy(s, s + count * es);
  reduceInto(d, s, count, dt, op);
  int failures = 0;
  for (size_t i = 0; i < count && failures < 5; ++i) {
    const uint8_t* a = before.data() + (offset + i) * es;
    const uint8_t* b = self ? a : srcCopy.data() + i * es;
    std::string why = checkElement(dt, op, a, b, d + i * es);
    if (!why.empty()) {
      ADD_FAILURE() << dataTypeName(dt) << " " << redOpName(op) << " count=" << count
                    << " offset=" << offset << (self ? " dst==src" : "") << " element " << i
                    << ": " << why;
      failures++;
    }
  }
  // Nothing outside [offset, offset + count) is touched, nor the source.
  EXPECT_EQ(0, memcmp(dstBase, before.data(), offset * es));
  EXPECT_EQ(0, memcmp(d + count * es, before.data() + (offset + count) * es, 2 * es));
  if (!self) {
    EXPECT_TRUE(std::equal(srcCopy.begin(), srcCopy.end(), s));
  }
}

TEST(ReduceInto, EveryTypeAndOpAgainstReference) {
  std::mt19937_64 rng(42);
  const size_t counts[] = {0, 1, 2, 7, 8, 15, 16, 17, 31, 33, 255, 1023, 1024, 1025, 2049, 4099};
  for (DataType dt : kAllTypes) {
    for (RedOp op : opsFor(dt)) {
      for (size_t count : counts) {
        for (size_t offset : {0, 1}) runCase(dt, op, count, offset, false, rng);
      }
    }
  }
}

TEST(ReduceInto, Float16PortablePath) {
  std::mt19937_64 rng(43);
  setF16cEnabledForTesting(false);
  for (RedOp op : opsFor(DataType::kFloat16)) {
    for (size_t count : {1, 7, 8, 33, 1025}) {
      for (size_t offset : {0, 1}) runCase(DataType::kFloat16, op, count, offset, false, rng);
    }
    runCase(DataType::kFloat16, op, 100, 1, true, rng);
  }
  setF16cEnabledForTesting(true);
}

TEST(ReduceInto, DstEqualsSrc) {
  std::mt19937_64 rng(7);
  for (DataType dt : kAllTypes) {
    for (RedOp op : opsFor(dt)) {
      for (size_t count : {1, 9, 1500}) runCase(dt, op, count, 1, true, rng);
    }
  }
}

TEST(ReduceInto, IntegerWraparound) {
  int8_t a8[] = {127, -128, 100, -1};
  int8_t b8[] = {1, -1, 100, 1};
  reduceInto(a8, b8, 4, DataType::kInt8, RedOp::kSum);
  EXPECT_EQ(a8[0], -128);
  EXPECT_EQ(a8[1], 127);
  EXPECT_EQ(a8[2], -56);
  EXPECT_EQ(a8[3], 0);

  uint8_t u[] = {200, 16, 255};
  uint8_t v[] = {100, 16, 255};
  reduceInto(u, v, 3, DataType::kUInt8, RedOp::kProduct);
  EXPECT_EQ(u[0], (200 * 100) % 256);
  EXPECT_EQ(u[1], 0);
  EXPECT_EQ(u[2], 1);

  int16_t a16[] = {-32768, 181};
  int16_t b16[] = {-1, 182};
  reduceInto(a16, b16, 2, DataType::kInt16, RedOp::kProduct);  // 181*182 = 32942
  EXPECT_EQ(a16[0], -32768);
  EXPECT_EQ(a16[1], 32942 - 65536);

  int32_t a32[] = {INT32_MAX, INT32_MIN};
  int32_t b32[] = {INT32_MAX, -1};
  reduceInto(a32, b32, 2, DataType::kInt32, RedOp::kSum);
  EXPECT_EQ(a32[0], -2);
  EXPECT_EQ(a32[1], INT32_MAX);

  int64_t a64[] = {INT64_MIN, INT64_MAX};
  int64_t b64[] = {-1, 2};
  reduceInto(a64, b64, 2, DataType::kInt64, RedOp::kProduct);
  EXPECT_EQ(a64[0], INT64_MIN);
  EXPECT_EQ(a64[1], -2);

  uint8_t m[] = {200, 3};
  uint8_t n[] = {100, 250};
  reduceInto(m, n, 2, DataType::kUInt8, RedOp::kMin);  // unsigned comparison
  EXPECT_EQ(m[0], 100);
  EXPECT_EQ(m[1], 3);
}

TEST(ReduceInto, FloatMinMaxPropagateNaN) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (RedOp op : {RedOp::kMin, RedOp::kMax}) {
    float a[] = {nan, 1.0f, nan, -INFINITY, 2.0f};
    float b[] = {1.0f, nan, nan, nan, 3.0f};
    reduceInto(a, b, 5, DataType::kFloat32, op);
    EXPECT_TRUE(std::isnan(a[0]));
    EXPECT_TRUE(std::isnan(a[1]));
    EXPECT_TRUE(std::isnan(a[2]));
    EXPECT_TRUE(std::isnan(a[3]));
    EXPECT_EQ(a[4], op == RedOp::kMin ? 2.0f : 3.0f);

    uint16_t h[] = {0x7E00, 0x3C00};  // NaN, 1.0
    uint16_t g[] = {0x3C00, 0x7E00};
    reduceInto(h, g, 2, DataType::kFloat16, op);
    EXPECT_TRUE(refIsNan(h[0], kHalf));
    EXPECT_TRUE(refIsNan(h[1], kHalf));
    uint16_t bb[] = {0x7FC0, 0x3F80};
    uint16_t bc[] = {0x3F80, 0x7FC0};
    reduceInto(bb, bc, 2, DataType::kBFloat16, op);
    EXPECT_TRUE(refIsNan(bb[0], kBf16));
    EXPECT_TRUE(refIsNan(bb[1], kBf16));
    double d[] = {1.0, std::nan("")};
    double e[] = {std::nan(""), 1.0};
    reduceInto(d, e, 2, DataType::kFloat64, op);
    EXPECT_TRUE(std::isnan(d[0]));
    EXPECT_TRUE(std::isnan(d[1]));
  }
}

TEST(ReduceInto, BoolTreatsAnyNonZeroByteAsTrue) {
  const uint8_t vals[] = {0, 1, 2, 255};
  struct Case {
    RedOp op;
    bool (*f)(bool, bool);
  };
  const Case cases[] = {
      {RedOp::kSum, [](bool x, bool y) { return x || y; }},
      {RedOp::kMax, [](bool x, bool y) { return x || y; }},
      {RedOp::kBor, [](bool x, bool y) { return x || y; }},
      {RedOp::kProduct, [](bool x, bool y) { return x && y; }},
      {RedOp::kMin, [](bool x, bool y) { return x && y; }},
      {RedOp::kBand, [](bool x, bool y) { return x && y; }},
      {RedOp::kBxor, [](bool x, bool y) { return x != y; }},
  };
  for (const Case& c : cases) {
    uint8_t a[16], b[16];
    for (int i = 0; i < 16; ++i) {
      a[i] = vals[i / 4];
      b[i] = vals[i % 4];
    }
    reduceInto(a, b, 16, DataType::kBool, c.op);
    for (int i = 0; i < 16; ++i) {
      uint8_t want = c.f(vals[i / 4] != 0, vals[i % 4] != 0) ? 1 : 0;
      EXPECT_EQ(a[i], want) << redOpName(c.op) << " " << int(vals[i / 4]) << ","
                            << int(vals[i % 4]);
    }
  }
}

TEST(ReduceInto, BitwiseOpOnFloatLeavesDataAlone) {
  // Callers reject these (redOpSupported); the kernel must not crash.
  float a[] = {1.5f, -2.0f, 3.0f};
  float b[] = {4.0f, 5.0f, 6.0f};
  for (RedOp op : {RedOp::kBand, RedOp::kBor, RedOp::kBxor}) {
    reduceInto(a, b, 3, DataType::kFloat32, op);
    EXPECT_EQ(a[0], 1.5f);
    EXPECT_EQ(a[1], -2.0f);
    EXPECT_EQ(a[2], 3.0f);
    uint16_t h[] = {0x3C00};
    uint16_t g[] = {0x4000};
    reduceInto(h, g, 1, DataType::kFloat16, op);
    EXPECT_EQ(h[0], 0x3C00);
  }
}

// ---------------------------------------------------------------------------
// scaleInPlace / divideInPlace.

TEST(ScaleInPlace, FloatingTypesAgainstReference) {
  std::mt19937_64 rng(99);
  const double factors[] = {0.5, 3.0, 0.1, -1.7, 1e-3, 1.0 / 3.0, 1e30, 0.0, 1.0 / 7.0};
  for (double factor : factors) {
    for (size_t count : {1, 5, 100, 2500}) {
      std::vector<float> f32(count);
      std::vector<double> f64(count);
      std::vector<uint16_t> h(count), bf(count);
      for (size_t i = 0; i < count; ++i) {
        f32[i] = genFloating<float, uint32_t>(rng);
        f64[i] = genFloating<double, uint64_t>(rng);
        h[i] = genHalfBits(rng, kHalf);
        bf[i] = genHalfBits(rng, kBf16);
      }
      auto f32In = f32;
      auto f64In = f64;
      auto hIn = h;
      auto bfIn = bf;
      scaleInPlace(f32.data(), count, DataType::kFloat32, factor);
      scaleInPlace(f64.data(), count, DataType::kFloat64, factor);
      scaleInPlace(h.data(), count, DataType::kFloat16, factor);
      scaleInPlace(bf.data(), count, DataType::kBFloat16, factor);
      const double fFactor = static_cast<float>(factor);  // the factor in float32
      const double hFactor = refDecode(refRound(factor, kHalf), kHalf);
      const double bFactor = refDecode(refRound(factor, kBf16), kBf16);
      for (size_t i = 0; i < count; ++i) {
        SCOPED_TRACE("factor " + std::to_string(factor) + " element " + std::to_string(i));
        // Products of two floats are exact in double: one rounding.
        float w32 = static_cast<float>(static_cast<double>(f32In[i]) * fFactor);
        ASSERT_EQ(compareFloating(w32, f32[i], RedOp::kSum), "");
        double w64 = static_cast<double>(static_cast<Wide>(f64In[i]) * static_cast<Wide>(factor));
        ASSERT_EQ(compareFloating(w64, f64[i], RedOp::kSum), "");
        uint32_t wh = refRound(refDecode(hIn[i], kHalf) * hFactor, kHalf);
        if (refIsNan(wh, kHalf)) {
          ASSERT_TRUE(refIsNan(h[i], kHalf));
        } else {
          ASSERT_EQ(h[i], wh) << std::hex << hIn[i];
        }
        uint32_t wb = refRound(refDecode(bfIn[i], kBf16) * bFactor, kBf16);
        if (refIsNan(wb, kBf16)) {
          ASSERT_TRUE(refIsNan(bf[i], kBf16));
        } else {
          ASSERT_EQ(bf[i], wb) << std::hex << bfIn[i];
        }
      }
    }
  }
}

// The factor is rounded once, straight from double: a value just above a
// half-way point must round up even though float32 cannot hold the excess.
TEST(ScaleInPlace, FactorRoundedOnceFromDouble) {
  uint16_t h[] = {0x3C00};  // 1.0
  scaleInPlace(h, 1, DataType::kFloat16, 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40));
  EXPECT_EQ(h[0], 0x3C01);
  uint16_t b[] = {0x3F80};  // 1.0
  scaleInPlace(b, 1, DataType::kBFloat16, 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40));
  EXPECT_EQ(b[0], 0x3F81);
  uint16_t h2[] = {0x3C00};
  scaleInPlace(h2, 1, DataType::kFloat16, 1.0 + std::ldexp(1.0, -11));  // exact tie: even
  EXPECT_EQ(h2[0], 0x3C00);
}

TEST(DivideInPlace, FloatingTypesAgainstReference) {
  std::mt19937_64 rng(5);
  for (int64_t divisor : {1, 2, 3, 5, 7, 8, 16, 1000}) {
    const size_t count = 1500;
    std::vector<float> f32(count);
    std::vector<double> f64(count);
    std::vector<uint16_t> h(count), bf(count);
    for (size_t i = 0; i < count; ++i) {
      f32[i] = genFloating<float, uint32_t>(rng);
      f64[i] = genFloating<double, uint64_t>(rng);
      h[i] = genHalfBits(rng, kHalf);
      bf[i] = genHalfBits(rng, kBf16);
    }
    auto f32In = f32;
    auto f64In = f64;
    auto hIn = h;
    auto bfIn = bf;
    divideInPlace(f32.data(), count, DataType::kFloat32, divisor);
    divideInPlace(f64.data(), count, DataType::kFloat64, divisor);
    divideInPlace(h.data(), count, DataType::kFloat16, divisor);
    divideInPlace(bf.data(), count, DataType::kBFloat16, divisor);
    const double dd = static_cast<double>(divisor);
    for (size_t i = 0; i < count; ++i) {
      SCOPED_TRACE("divisor " + std::to_string(divisor) + " element " + std::to_string(i));
      ASSERT_EQ(compareFloating(static_cast<float>(f32In[i] / dd), f32[i], RedOp::kSum), "");
      double w64 = static_cast<double>(static_cast<Wide>(f64In[i]) / static_cast<Wide>(dd));
      ASSERT_EQ(compareFloating(w64, f64[i], RedOp::kSum), "");
      uint32_t wh = refRound(refDecode(hIn[i], kHalf) / dd, kHalf);
      if (refIsNan(wh, kHalf)) {
        ASSERT_TRUE(refIsNan(h[i], kHalf));
      } else {
        ASSERT_EQ(h[i], wh) << std::hex << hIn[i];
      }
      uint32_t wb = refRound(refDecode(bfIn[i], kBf16) / dd, kBf16);
      if (refIsNan(wb, kBf16)) {
        ASSERT_TRUE(refIsNan(bf[i], kBf16));
      } else {
        ASSERT_EQ(bf[i], wb) << std::hex << bfIn[i];
      }
    }
  }
}

template <class T>
void checkIntDivide(DataType dt, std::mt19937_64& rng) {
  for (int64_t divisor : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{7}, int64_t{8},
                          int64_t{127}, int64_t{1000}, INT64_MAX}) {
    std::vector<T> v(301);
    for (T& x : v) x = genInt<T>(rng);
    auto in = v;
    divideInPlace(v.data() + 1, v.size() - 2, dt, divisor);  // guards at both ends
    EXPECT_EQ(v.front(), in.front());
    EXPECT_EQ(v.back(), in.back());
    for (size_t i = 1; i + 1 < v.size(); ++i) {
      __int128 x = in[i];
      __int128 q = (x < 0 ? -x : x) / divisor;  // truncation toward zero
      if (x < 0) q = -q;
      ASSERT_EQ(static_cast<__int128>(v[i]), q)
          << dataTypeName(dt) << " " << str(in[i]) << " / " << divisor;
    }
  }
}

TEST(DivideInPlace, IntegersTruncateTowardZero) {
  std::mt19937_64 rng(11);
  checkIntDivide<int8_t>(DataType::kInt8, rng);
  checkIntDivide<int16_t>(DataType::kInt16, rng);
  checkIntDivide<int32_t>(DataType::kInt32, rng);
  checkIntDivide<int64_t>(DataType::kInt64, rng);
  checkIntDivide<uint8_t>(DataType::kUInt8, rng);
  int32_t a[] = {-7, 7, -1, INT32_MIN};
  divideInPlace(a, 4, DataType::kInt32, 2);
  EXPECT_EQ(a[0], -3);
  EXPECT_EQ(a[1], 3);
  EXPECT_EQ(a[2], 0);
  EXPECT_EQ(a[3], INT32_MIN / 2);
  uint8_t u[] = {255, 200};
  divideInPlace(u, 2, DataType::kUInt8, 2);  // unsigned, not -1 / 2
  EXPECT_EQ(u[0], 127);
  EXPECT_EQ(u[1], 100);
}

}  // namespace
}  // namespace tcpx

// Data types and reduction operations of the core.
//
// The core does not include torch: these small enums are its vocabulary, and
// csrc/c10d/ maps at::ScalarType and c10d::ReduceOp onto them. The numeric
// values travel in message headers (transport/message.h), so they are part of
// the wire protocol: append, never renumber.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tcpx {

enum class DataType : uint8_t {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
  kInt8 = 4,
  kInt16 = 5,
  kInt32 = 6,
  kInt64 = 7,
  kUInt8 = 8,
  kBool = 9,
};
constexpr int kNumDataTypes = 10;

// SUM, AVG, PRODUCT, MIN, MAX, BAND, BOR, BXOR, PREMUL_SUM: the c10d set.
// On kBool, SUM and MAX are logical OR, PRODUCT and MIN logical AND (what a
// reduction of truth values means); AVG and PREMUL_SUM are undefined there.
enum class RedOp : uint8_t {
  kSum = 0,
  kAvg = 1,
  kProduct = 2,
  kMin = 3,
  kMax = 4,
  kBand = 5,
  kBor = 6,
  kBxor = 7,
  kPremulSum = 8,
};
constexpr int kNumRedOps = 9;

// Size of one element in bytes.
inline size_t dataTypeSize(DataType t) {
  switch (t) {
    case DataType::kFloat64:
    case DataType::kInt64:
      return 8;
    case DataType::kFloat32:
    case DataType::kInt32:
      return 4;
    case DataType::kFloat16:
    case DataType::kBFloat16:
    case DataType::kInt16:
      return 2;
    case DataType::kInt8:
    case DataType::kUInt8:
    case DataType::kBool:
      return 1;
  }
  return 0;
}

inline bool isFloatingType(DataType t) {
  return t == DataType::kFloat32 || t == DataType::kFloat64 ||
         t == DataType::kFloat16 || t == DataType::kBFloat16;
}

inline bool isIntegerType(DataType t) {
  return t == DataType::kInt8 || t == DataType::kInt16 ||
         t == DataType::kInt32 || t == DataType::kInt64 ||
         t == DataType::kUInt8;
}

// Lower-case names as torch prints them ("float32", "bfloat16", ...).
const char* dataTypeName(DataType t);
// "SUM", "AVG", ... as c10d's ReduceOp prints them.
const char* redOpName(RedOp op);

// Whether `op` is defined on `t` (bitwise ops need integers or bool; AVG and
// PREMUL_SUM need numbers, not bool). The c10d layer turns `false` into a
// ValueError before anything is enqueued.
bool redOpSupported(RedOp op, DataType t);

}  // namespace tcpx

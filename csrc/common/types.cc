#include "common/types.h"

namespace tcpx {

const char* dataTypeName(DataType t) {
  switch (t) {
    case DataType::kFloat32: return "float32";
    case DataType::kFloat64: return "float64";
    case DataType::kFloat16: return "float16";
    case DataType::kBFloat16: return "bfloat16";
    case DataType::kInt8: return "int8";
    case DataType::kInt16: return "int16";
    case DataType::kInt32: return "int32";
    case DataType::kInt64: return "int64";
    case DataType::kUInt8: return "uint8";
    case DataType::kBool: return "bool";
  }
  return "unknown";
}

const char* redOpName(RedOp op) {
  switch (op) {
    case RedOp::kSum: return "SUM";
    case RedOp::kAvg: return "AVG";
    case RedOp::kProduct: return "PRODUCT";
    case RedOp::kMin: return "MIN";
    case RedOp::kMax: return "MAX";
    case RedOp::kBand: return "BAND";
    case RedOp::kBor: return "BOR";
    case RedOp::kBxor: return "BXOR";
    case RedOp::kPremulSum: return "PREMUL_SUM";
  }
  return "UNKNOWN";
}

bool redOpSupported(RedOp op, DataType t) {
  switch (op) {
    case RedOp::kSum:
    case RedOp::kProduct:
    case RedOp::kMin:
    case RedOp::kMax:
      return true;
    case RedOp::kBand:
    case RedOp::kBor:
    case RedOp::kBxor:
      return !isFloatingType(t);
    case RedOp::kAvg:
      // Integers: the wrapped sum divided by the world size, truncating, as
      // NCCL's ncclAvg does. Bool has no average.
      return t != DataType::kBool;
    case RedOp::kPremulSum:
      return isFloatingType(t);
  }
  return false;
}

}  // namespace tcpx

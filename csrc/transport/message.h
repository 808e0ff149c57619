// The header every collective message carries, packed into the net's 64-bit
// tag (the socket net transmits it; test() reports the sender's).
//
// It lets the receiver check that both ranks run the same operation before
// touching the data: ranks that disagree on the collective, its data type,
// reduce op, element count, root or algorithm get an error that names the
// difference, never silently mixed data. The sequence number also lets a
// rank recognise leftovers of an operation that failed (they are dropped)
// and messages of the next one (they wait).
//
// Layout (bit ranges of the 64-bit tag):
//   0-31 seq    collective sequence number in the group (mod 2^32)
//  32-37 kind   OpKind
//  38-40 algo   algorithm id within the kind
//  41-44 dtype  common/types.h DataType
//  45-48 redop  common/types.h RedOp
//  49-60 phash  12-bit hash of the element count, root and other parameters
//  61-63 flags  kMsgAbort: "I failed this operation; stop waiting for me"
#pragma once

#include <cstdint>
#include <string>

#include "common/types.h"

namespace tcpx {

enum class OpKind : uint8_t {
  kNone = 0,
  kAllreduce = 1,
  kBroadcast = 2,
  kAllgather = 3,
  kBarrier = 4,
  kReduce = 5,
  kReduceScatter = 6,
  kAlltoall = 7,
  kGather = 8,
  kScatter = 9,
  kP2P = 63,  // point-to-point stream (not a collective)
};

const char* opKindName(OpKind k);

constexpr uint8_t kMsgAbort = 1;

struct MsgHeader {
  uint32_t seq = 0;
  OpKind kind = OpKind::kNone;
  uint8_t algo = 0;
  DataType dtype = DataType::kFloat32;
  RedOp redop = RedOp::kSum;
  uint16_t phash = 0;  // 12 bits used
  uint8_t flags = 0;   // 3 bits used

  uint64_t pack() const {
    return static_cast<uint64_t>(seq) | (static_cast<uint64_t>(kind) & 0x3f) << 32 |
           (static_cast<uint64_t>(algo) & 0x7) << 38 |
           (static_cast<uint64_t>(dtype) & 0xf) << 41 |
           (static_cast<uint64_t>(redop) & 0xf) << 45 |
           (static_cast<uint64_t>(phash) & 0xfff) << 49 |
           (static_cast<uint64_t>(flags) & 0x7) << 61;
  }
  static MsgHeader unpack(uint64_t t) {
    MsgHeader h;
    h.seq = static_cast<uint32_t>(t);
    h.kind = static_cast<OpKind>((t >> 32) & 0x3f);
    h.algo = static_cast<uint8_t>((t >> 38) & 0x7);
    h.dtype = static_cast<DataType>((t >> 41) & 0xf);
    h.redop = static_cast<RedOp>((t >> 45) & 0xf);
    h.phash = static_cast<uint16_t>((t >> 49) & 0xfff);
    h.flags = static_cast<uint8_t>((t >> 61) & 0x7);
    return h;
  }
  // Same operation (everything but seq and flags)?
  bool sameOp(const MsgHeader& o) const {
    return kind == o.kind && algo == o.algo && dtype == o.dtype && redop == o.redop &&
           phash == o.phash;
  }
};

// 12-bit hash of the parameters that must agree across ranks but do not fit
// the header whole (element count, root, ...).
uint16_t paramHash(uint64_t a, uint64_t b = 0, uint64_t c = 0);

// Signed distance seq - cur in sequence space (handles wrap-around).
inline int32_t seqDiff(uint32_t seq, uint32_t cur) { return static_cast<int32_t>(seq - cur); }

// Explains how `got` differs from `expected` ("the peer runs broadcast, this
// rank allreduce"; "the element count or root differs"...).
std::string describeMismatch(const MsgHeader& expected, const MsgHeader& got);

}  // namespace tcpx

#include "transport/message.h"

#include "common/utils.h"

namespace tcpx {

const char* opKindName(OpKind k) {
  switch (k) {
    case OpKind::kNone: return "none";
    case OpKind::kAllreduce: return "all_reduce";
    case OpKind::kBroadcast: return "broadcast";
    case OpKind::kAllgather: return "all_gather";
    case OpKind::kBarrier: return "barrier";
    case OpKind::kReduce: return "reduce";
    case OpKind::kReduceScatter: return "reduce_scatter";
    case OpKind::kAlltoall: return "all_to_all";
    case OpKind::kGather: return "gather";
    case OpKind::kScatter: return "scatter";
    case OpKind::kP2P: return "send/recv";
  }
  return "unknown";
}

uint16_t paramHash(uint64_t a, uint64_t b, uint64_t c) {
  // splitmix64 finaliser over the three words; any 12 bits of it will do.
  uint64_t x = a * 0x9e3779b97f4a7c15ULL ^ (b + 0x632be59bd9b4e019ULL) * 0xbf58476d1ce4e5b9ULL ^
               (c + 0x85ebca6b) * 0x94d049bb133111ebULL;
  x ^= x >> 31;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 29;
  return static_cast<uint16_t>(x & 0xfff);
}

std::string describeMismatch(const MsgHeader& e, const MsgHeader& g) {
  if (e.kind != g.kind)
    return strFormat("the peer runs %s where this rank runs %s", opKindName(g.kind),
                     opKindName(e.kind));
  if (e.dtype != g.dtype)
    return strFormat("the peer's tensor is %s, this rank's %s", dataTypeName(g.dtype),
                     dataTypeName(e.dtype));
  if (e.redop != g.redop)
    return strFormat("the peer reduces with %s, this rank with %s", redOpName(g.redop),
                     redOpName(e.redop));
  if (e.algo != g.algo)
    return "the peer chose another algorithm: its message size (element count) differs, or "
           "TCPX_ALGO/TCPX_ALGO_THRESHOLD differ between ranks";
  // A coalesced batch mixes its length into every message's hash
  // (makeCoalesced), so batches of different lengths end up here too.
  if (e.phash != g.phash)
    return "the element count (tensor size) or the root differs, or the ranks coalesced "
           "different numbers of operations";
  return "the operations differ";
}

}  // namespace tcpx

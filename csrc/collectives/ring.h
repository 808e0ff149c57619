// The rounds of a ring algorithm, shared by ring all-reduce and ring
// reduce-scatter.
//
// The data is n segments, each cut into chunks of at most chunkBytes()
// (whole elements). A round sends one segment to the successor and receives
// one from the predecessor, reducing or copying it into place. Every chunk
// depends only on the same chunk of earlier rounds, so consecutive rounds
// overlap (pipelining), and every message is checked by the transport.
#pragma once

#include <cstddef>
#include <vector>

#include "collectives/algorithms.h"

namespace tcpx {

class RingPass {
 public:
  // Segment i: `in[i]` is this rank's contribution (read, never written
  // unless it equals `acc[i]`), `acc[i]` where the segment accumulates;
  // both `bytes[i]` long. A chunk is sent from `in` until something has been
  // received into it, from `acc` afterwards.
  RingPass(Schedule* s, std::vector<const char*> in, std::vector<char*> acc,
           std::vector<size_t> bytes, size_t esz);

  // Sends segment `sseg` to the successor, receives segment `rseg` from the
  // predecessor (reduce: acc = current value op message; else a copy).
  void round(int sseg, int rseg, bool reduce);

 private:
  struct Chunk {
    size_t off, len;                     // bytes within the segment
    Schedule::StepId lastRecv, lastSend;  // kNone until there is one
  };
  static constexpr Schedule::StepId kNone = ~Schedule::StepId(0);

  Schedule* s_;
  int next_, prev_;
  std::vector<const char*> in_;
  std::vector<char*> acc_;
  std::vector<std::vector<Chunk>> chunks_;
};

}  // namespace tcpx

#include "collectives/ring.h"

namespace tcpx {

RingPass::RingPass(Schedule* s, std::vector<const char*> in, std::vector<char*> acc,
                   std::vector<size_t> bytes, size_t esz)
    : s_(s),
      next_((s->rank() + 1) % s->nranks()),
      prev_((s->rank() + s->nranks() - 1) % s->nranks()),
      in_(std::move(in)),
      acc_(std::move(acc)),
      chunks_(bytes.size()) {
  const size_t cb = std::max<size_t>(1, s->chunkBytes() / esz) * esz;
  for (size_t seg = 0; seg < bytes.size(); seg++)
    forEachChunk(bytes[seg], cb, [&](size_t off, size_t len) {
      chunks_[seg].push_back({off, len, kNone, kNone});
    });
}

void RingPass::round(int sseg, int rseg, bool reduce) {
  // A chunk goes out only after the last receive into it; a receive into a
  // chunk waits for the last send from it (the send reads what it overwrites).
  for (Chunk& c : chunks_[sseg]) {
    const char* src = c.lastRecv == kNone ? in_[sseg] + c.off : acc_[sseg] + c.off;
    Schedule::StepId id = s_->send(next_, src, c.len);
    if (c.lastRecv != kNone) s_->after(id, c.lastRecv);
    c.lastSend = id;
  }
  for (Chunk& c : chunks_[rseg]) {
    char* dst = acc_[rseg] + c.off;
    Schedule::StepId id;
    if (reduce) id = s_->recvReduce(prev_, dst, c.len, c.lastRecv == kNone ? in_[rseg] + c.off : dst);
    else id = s_->recv(prev_, dst, c.len);
    if (c.lastSend != kNone) s_->after(id, c.lastSend);
    c.lastRecv = id;  // (receives from the predecessor already run in order)
  }
}

}  // namespace tcpx

// Pipelined chain broadcast: root -> root+1 -> ... -> root-1.
//
// Each rank forwards chunk c as soon as it has it, so after the pipeline
// fills every link is busy and the message crosses each link once.
// Cost: n-1 + chunks-1 chunk times; S bytes sent per rank (the last sends none).
#include "collectives/algorithms.h"

namespace tcpx {

void buildChainBroadcast(Schedule* s, char* buf, size_t bytes, int root) {
  const int n = s->nranks();
  const int r = s->rank();
  if (n == 1) return;
  const int pos = (r - root + n) % n;
  const int prev = (r + n - 1) % n;
  const int next = (r + 1) % n;
  const size_t cb = s->chunkBytes();
  // At least one message, even for an empty buffer.
  for (size_t off = 0; off < bytes || off == 0; off += cb) {
    size_t len = std::min(cb, bytes - off);
    if (pos == 0) {
      s->send(next, buf + off, len);
      continue;
    }
    auto got = s->recv(prev, buf + off, len);
    if (pos < n - 1) s->after(s->send(next, buf + off, len), got);
  }
}

}  // namespace tcpx

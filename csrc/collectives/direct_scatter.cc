// Direct scatter: the root sends every rank its block, all peers at once.
//
// As for the gather, the root must send (n-1) * S bytes whatever the
// algorithm, so a tree would save messages but not time where bandwidth
// matters, and the direct form has a single round of latency.
// Cost: 1 round (+ chunks-1 pipelined); the root sends (n-1) * S bytes, the
// others receive S.
#include "collectives/algorithms.h"

namespace tcpx {

void buildDirectScatter(Schedule* s, const std::vector<const char*>& inputs, char* out,
                        size_t bytes, int root) {
  const int n = s->nranks();
  const int r = s->rank();
  const size_t cb = s->chunkBytes();
  if (r != root) {
    forEachChunk(bytes, cb, [&](size_t off, size_t len) { s->recv(root, out + off, len); });
    return;
  }
  for (int p = 0; p < n; p++) {
    if (p == root) continue;
    forEachChunk(bytes, cb, [&](size_t off, size_t len) { s->send(p, inputs[p] + off, len); });
  }
}

}  // namespace tcpx

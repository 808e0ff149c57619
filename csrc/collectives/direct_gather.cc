// Direct gather: every rank sends its block straight to the root, which
// receives from all peers at once.
//
// A tree would cut the root's message count to log2 n but not its bytes:
// the root must receive (n-1) * S bytes whatever
// the algorithm, so for the sizes where bandwidth matters the direct form is
// already optimal, and it has a single round of latency.
// Cost: 1 round (+ chunks-1 pipelined); the root receives (n-1) * S bytes,
// the others send S.
#include "collectives/algorithms.h"

namespace tcpx {

void buildDirectGather(Schedule* s, const char* in, const std::vector<char*>& outputs,
                       size_t bytes, int root) {
  const int n = s->nranks();
  const int r = s->rank();
  const size_t cb = s->chunkBytes();
  if (r != root) {
    forEachChunk(bytes, cb, [&](size_t off, size_t len) { s->send(root, in + off, len); });
    return;
  }
  for (int p = 0; p < n; p++) {
    if (p == root) continue;
    forEachChunk(bytes, cb, [&](size_t off, size_t len) { s->recv(p, outputs[p] + off, len); });
  }
}

}  // namespace tcpx

// Pipelined chain reduce: root+n-1 -> root+n-2 -> ... -> root+1 -> root.
//
// The mirror of the chain broadcast: the last rank of the chain sends its
// contribution, every other rank reduces what arrives from its successor
// into its own contribution, chunk by chunk, and forwards the partial sum.
// After the pipeline fills every link is busy.
// Cost: n-1 + chunks-1 chunk times; S bytes sent per rank (the root sends none).
#include "collectives/algorithms.h"

namespace tcpx {

void buildChainReduce(Schedule* s, const char* in, char* acc, size_t bytes, size_t esz,
                      int root) {
  const int n = s->nranks();
  const int r = s->rank();
  if (n == 1) return;
  const int pos = (r - root + n) % n;
  const int towardRoot = (r + n - 1) % n;
  const int fromLeaf = (r + 1) % n;
  const size_t cb = std::max<size_t>(1, s->chunkBytes() / esz) * esz;
  forEachChunk(bytes, cb, [&](size_t off, size_t len) {
    if (pos == n - 1) {
      s->send(towardRoot, in + off, len);
      return;
    }
    auto got = s->recvReduce(fromLeaf, acc + off, len, in + off);
    if (pos > 0) s->after(s->send(towardRoot, acc + off, len), got);
  });
}

}  // namespace tcpx

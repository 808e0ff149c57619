// Binomial-tree reduce, pipelined by chunks: the mirror of the tree broadcast.
//
// The tree is binomialTree(). A rank reduces its children's partial sums
// into its own contribution (smallest subtree first: it finishes first),
// always in the same order, so floating-point results do not depend on
// arrival order, then sends the sum to its parent.
// Cost: ceil(log2 n) rounds; S bytes sent per rank.
#include "collectives/algorithms.h"

namespace tcpx {

void buildTreeReduce(Schedule* s, const char* in, char* acc, size_t bytes, size_t esz, int root) {
  if (s->nranks() == 1) return;
  int parent;
  std::vector<int> children;
  binomialTree(s->nranks(), s->rank(), root, &parent, &children);
  std::reverse(children.begin(), children.end());  // smallest subtree first
  const size_t cb = std::max<size_t>(1, s->chunkBytes() / esz) * esz;
  forEachChunk(bytes, cb, [&](size_t off, size_t len) {
    const char* sum = in + off;  // where this chunk's partial sum is
    Schedule::StepId last = 0;
    bool any = false;
    for (int c : children) {
      auto id = s->recvReduce(c, acc + off, len, sum);
      if (any) s->after(id, last);
      last = id;
      any = true;
      sum = acc + off;
    }
    if (parent >= 0) {
      auto id = s->send(parent, sum, len);
      if (any) s->after(id, last);
    }
  });
}

}  // namespace tcpx

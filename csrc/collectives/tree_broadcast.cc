// Binomial-tree broadcast, pipelined by chunks.
//
// The tree is binomialTree() (the root's children are all powers of two
// below n). Children of larger subtrees are served first (smallest offset
// first). Cost: ceil(log2 n) rounds; the root sends S*ceil(log2 n) bytes.
#include "collectives/algorithms.h"

namespace tcpx {

void binomialTree(int n, int rank, int root, int* parent, std::vector<int>* children) {
  const int v = (rank - root + n) % n;
  *parent = -1;
  int top = 1;  // smallest power of two above v's highest set bit
  if (v > 0) {
    int h = 1;
    while (h * 2 <= v) h *= 2;
    *parent = ((v - h) + root) % n;
    top = h * 2;
  }
  children->clear();
  // In increasing m: child v+m heads a subtree of about n/(2m) ranks.
  for (int m = top; v + m < n; m *= 2) children->push_back((v + m + root) % n);
}

void buildTreeBroadcast(Schedule* s, char* buf, size_t bytes, int root) {
  if (s->nranks() == 1) return;
  int parent;
  std::vector<int> children;  // deepest subtrees first: they get each chunk first
  binomialTree(s->nranks(), s->rank(), root, &parent, &children);
  const size_t cb = s->chunkBytes();
  forEachChunk(bytes, cb, [&](size_t off, size_t len) {
    Schedule::StepId got = 0;
    if (parent >= 0) got = s->recv(parent, buf + off, len);
    for (int c : children) {
      auto id = s->send(c, buf + off, len);
      if (parent >= 0) s->after(id, got);
    }
  });
}

}  // namespace tcpx

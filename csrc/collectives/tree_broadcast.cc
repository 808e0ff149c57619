// Binomial-tree broadcast, pipelined by chunks.
//
// With v = (rank - root) mod n, a rank's parent is v with its highest set bit
// cleared, and its children are v + 2^j for every 2^j above v's highest bit
// (the root's are all powers of two below n). Children of larger subtrees are
// served first (smallest offset first). Cost: ceil(log2 n) rounds; the root sends S*ceil(log2 n) bytes.
#include "collectives/algorithms.h"

namespace tcpx {

void buildTreeBroadcast(Schedule* s, char* buf, size_t bytes, int root) {
  const int n = s->nranks();
  const int r = s->rank();
  if (n == 1) return;
  const int v = (r - root + n) % n;
  int parent = -1;
  int top = 1;  // smallest power of two above v's highest set bit
  if (v > 0) {
    int h = 1;
    while (h * 2 <= v) h *= 2;
    parent = ((v - h) + root) % n;
    top = h * 2;
  }
  std::vector<int> children;
  // In increasing m: child v+m heads a subtree of about n/(2m) ranks, so the
  // deepest subtrees get each chunk first.
  for (int m = top; v + m < n; m *= 2) children.push_back((v + m + root) % n);
  const size_t cb = s->chunkBytes();
  // At least one message, even for an empty buffer.
  for (size_t off = 0; off < bytes || off == 0; off += cb) {
    size_t len = std::min(cb, bytes - off);
    Schedule::StepId got = 0;
    if (parent >= 0) got = s->recv(parent, buf + off, len);
    for (int c : children) {
      auto id = s->send(c, buf + off, len);
      if (parent >= 0) s->after(id, got);
    }
  }
}

}  // namespace tcpx

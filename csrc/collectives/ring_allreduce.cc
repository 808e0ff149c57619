// Ring all-reduce: reduce-scatter then all-gather around the ring.
//
// The buffer is split into n segments. In reduce-scatter round k (0..n-2) a
// rank sends segment r-k to its successor and reduces segment r-k-1 arriving
// from its predecessor; afterwards it owns the fully reduced segment r+1. In
// all-gather round k it forwards segment r+1-k and stores segment r-k.
// Cost: 2(n-1) rounds, 2(n-1)/n * S bytes sent per rank (bandwidth-optimal).
#include "collectives/ring.h"

namespace tcpx {

void splitEven(size_t count, int n, int i, size_t* off, size_t* len) {
  size_t base = count / static_cast<size_t>(n);
  size_t extra = count % static_cast<size_t>(n);
  size_t ui = static_cast<size_t>(i);
  *off = ui * base + std::min(ui, extra);
  *len = base + (ui < extra ? 1 : 0);
}

void buildRingAllreduce(Schedule* s, char* buf, size_t count, size_t esz) {
  const int n = s->nranks();
  const int r = s->rank();
  if (n == 1) return;
  std::vector<const char*> in;
  std::vector<char*> acc;
  std::vector<size_t> bytes;
  for (int seg = 0; seg < n; seg++) {
    size_t off, len;
    splitEven(count, n, seg, &off, &len);
    in.push_back(buf + off * esz);
    acc.push_back(buf + off * esz);
    bytes.push_back(len * esz);
  }
  auto mod = [n](int x) { return ((x % n) + n) % n; };
  RingPass ring(s, in, acc, bytes, esz);
  for (int k = 0; k < n - 1; k++) ring.round(mod(r - k), mod(r - k - 1), /*reduce=*/true);
  for (int k = 0; k < n - 1; k++) ring.round(mod(r + 1 - k), mod(r - k), /*reduce=*/false);
}

}  // namespace tcpx

// Ring reduce-scatter.
//
// Segment i ends reduced on rank i. In round k (0..n-2) a rank sends its
// partial sum of segment r-k-1 to its successor and reduces segment r-k-2
// arriving from its predecessor into its own contribution; the last round
// delivers segment r. The first segment a rank sends is its plain input, so
// the input is never written (partial sums go to `acc`).
// Cost: n-1 rounds, (n-1)/n * S bytes sent per rank (S = the whole input;
// bandwidth-optimal, the first half of ring all-reduce).
#include "collectives/ring.h"

namespace tcpx {

void buildRingReduceScatter(Schedule* s, const std::vector<const char*>& in,
                            const std::vector<char*>& acc, size_t segBytes, size_t esz) {
  const int n = s->nranks();
  const int r = s->rank();
  if (n == 1) return;
  auto mod = [n](int x) { return ((x % n) + n) % n; };
  RingPass ring(s, in, acc, std::vector<size_t>(static_cast<size_t>(n), segBytes), esz);
  for (int k = 0; k < n - 1; k++) ring.round(mod(r - k - 1), mod(r - k - 2), /*reduce=*/true);
}

}  // namespace tcpx

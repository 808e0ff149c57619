// Ring all-gather.
//
// Round k (0..n-2): send block r-k to the successor, store block r-k-1 from
// the predecessor. A received chunk is forwarded as soon as it has arrived.
// Cost: n-1 rounds, (n-1) * segBytes sent per rank (bandwidth-optimal).
#include "collectives/algorithms.h"

namespace tcpx {

void buildRingAllgather(Schedule* s, const std::vector<char*>& segs, size_t segBytes) {
  const int n = s->nranks();
  const int r = s->rank();
  if (n == 1) return;
  const int next = (r + 1) % n;
  const int prev = (r + n - 1) % n;
  const size_t cb = s->chunkBytes();
  const size_t nchunks = std::max<size_t>(1, (segBytes + cb - 1) / cb);  // >= 1 message
  auto mod = [n](int x) { return ((x % n) + n) % n; };
  std::vector<std::vector<Schedule::StepId>> recvd(static_cast<size_t>(n));
  for (int k = 0; k < n - 1; k++) {
    int sseg = mod(r - k), rseg = mod(r - k - 1);
    for (size_t c = 0; c < nchunks; c++) {
      size_t off = c * cb, len = std::min(cb, segBytes - off);
      auto id = s->send(next, segs[sseg] + off, len);
      if (k > 0) s->after(id, recvd[sseg][c]);
    }
    for (size_t c = 0; c < nchunks; c++) {
      size_t off = c * cb, len = std::min(cb, segBytes - off);
      recvd[rseg].push_back(s->recv(prev, segs[rseg] + off, len));
    }
  }
}

}  // namespace tcpx

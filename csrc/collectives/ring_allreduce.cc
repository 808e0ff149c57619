// Ring all-reduce: reduce-scatter then all-gather around the ring.
//
// The buffer is split into n segments. In reduce-scatter round k (0..n-2) a
// rank sends segment r-k to its successor and reduces segment r-k-1 arriving
// from its predecessor; afterwards it owns the fully reduced segment r+1. In
// all-gather round k it forwards segment r+1-k and stores segment r-k.
// Each segment moves in chunks, and every chunk depends only on the same
// chunk of the previous round, so the rounds overlap (pipelining).
// Cost: 2(n-1) rounds, 2(n-1)/n * S bytes sent per rank (bandwidth-optimal).
#include "collectives/algorithms.h"

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
  const int next = (r + 1) % n;
  const int prev = (r + n - 1) % n;
  const size_t chunkElems = std::max<size_t>(1, s->chunkBytes() / esz);
  auto mod = [n](int x) { return ((x % n) + n) % n; };

  // Chunks of each segment: element offset and length.
  struct Chunk {
    size_t off, len;
  };
  std::vector<std::vector<Chunk>> chunks(static_cast<size_t>(n));
  for (int seg = 0; seg < n; seg++) {
    size_t off, len;
    splitEven(count, n, seg, &off, &len);
    for (size_t c = 0; c < len; c += chunkElems)
      chunks[seg].push_back({off + c, std::min(chunkElems, len - c)});
    if (len == 0) chunks[seg].push_back({off, 0});  // still one (empty) message
  }
  auto ptr = [&](const Chunk& c) { return buf + c.off * esz; };
  const size_t none = SIZE_MAX;
  // Step ids by segment and chunk: the last reduce into a chunk, the last send from it.
  std::vector<std::vector<size_t>> lastRecv(n), lastSend(n);
  for (int seg = 0; seg < n; seg++) {
    lastRecv[seg].assign(chunks[seg].size(), none);
    lastSend[seg].assign(chunks[seg].size(), none);
  }

  // One round: send segment sseg to the successor and receive segment rseg
  // from the predecessor (reduced into place in reduce-scatter, copied in
  // all-gather). A chunk goes out only after the last receive into it, and a
  // receive into a chunk waits for the last send from it.
  auto round = [&](int sseg, int rseg, bool reduce) {
    for (size_t c = 0; c < chunks[sseg].size(); c++) {
      const Chunk& ch = chunks[sseg][c];
      auto id = s->send(next, ptr(ch), ch.len * esz);
      if (lastRecv[sseg][c] != none) s->after(id, static_cast<Schedule::StepId>(lastRecv[sseg][c]));
      lastSend[sseg][c] = id;
    }
    for (size_t c = 0; c < chunks[rseg].size(); c++) {
      const Chunk& ch = chunks[rseg][c];
      auto id = reduce ? s->recvReduce(prev, ptr(ch), ch.len * esz)
                       : s->recv(prev, ptr(ch), ch.len * esz);
      if (lastSend[rseg][c] != none) s->after(id, static_cast<Schedule::StepId>(lastSend[rseg][c]));
      lastRecv[rseg][c] = id;
    }
  };
  for (int k = 0; k < n - 1; k++) round(mod(r - k), mod(r - k - 1), /*reduce=*/true);
  for (int k = 0; k < n - 1; k++) round(mod(r + 1 - k), mod(r - k), /*reduce=*/false);
}

}  // namespace tcpx

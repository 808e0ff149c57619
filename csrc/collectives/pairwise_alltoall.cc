// Pairwise-exchange all-to-all (Thakur, Rabenseifner & Gropp, "Optimization
// of collective communication operations in MPICH", IJHPCA 2005).
//
// Round k (1..n-1): send the block for rank r+k, receive the block of rank
// r-k. Receives are all posted at once (they only need bounce buffers);
// sends of round k wait until round k-1's are in the net, so each rank
// streams to one peer at a time instead of all peers competing for its link.
// Cost: n-1 rounds; each rank sends the sum of its blocks to others.
#include "collectives/algorithms.h"
#include "transport/message.h"

namespace tcpx {

void buildPairwiseAlltoall(Schedule* s, const std::vector<const char*>& sendBlocks,
                           const std::vector<size_t>& sendBytes,
                           const std::vector<char*>& recvBlocks,
                           const std::vector<size_t>& recvBytes) {
  const int n = s->nranks();
  const int r = s->rank();
  if (n == 1) return;
  const size_t cb = s->chunkBytes();
  bool first = true;
  Schedule::StepId lastSend = 0;
  for (int k = 1; k < n; k++) {
    const int to = (r + k) % n;
    const int from = (r - k + n) % n;
    // Both ends hash (bytes, source, destination) of the pair's transfer.
    s->header.phash = paramHash(sendBytes[to], static_cast<uint64_t>(r), static_cast<uint64_t>(to));
    // The sends to one peer go in order, so the round's first send waiting
    // for the previous round's last one orders the whole round.
    bool head = true;
    forEachChunk(sendBytes[to], cb, [&](size_t off, size_t len) {
      auto id = s->send(to, sendBlocks[to] + off, len);
      if (head && !first) s->after(id, lastSend);
      head = false;
      lastSend = id;
    });
    first = false;
    s->header.phash =
        paramHash(recvBytes[from], static_cast<uint64_t>(from), static_cast<uint64_t>(r));
    forEachChunk(recvBytes[from], cb, [&](size_t off, size_t len) {
      s->recv(from, recvBlocks[from] + off, len);
    });
  }
}

}  // namespace tcpx

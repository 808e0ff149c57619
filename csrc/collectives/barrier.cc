// Dissemination barrier (Hensgen, Finkel & Manber, "Two algorithms for barrier
// synchronization", IJPP 1988).
//
// In round k a rank sends one byte to rank+2^k and waits for one from
// rank-2^k; the next round's signal goes out only after that. After
// ceil(log2 n) rounds every rank has heard, transitively, from every other.
// The receives are chained too: a round's signal must vouch for every round
// before it, not only the last one.
// Cost: ceil(log2 n) rounds of 1-byte messages.
#include "collectives/algorithms.h"

namespace tcpx {

void buildDisseminationBarrier(Schedule* s, char* token, char* sink) {
  const int n = s->nranks();
  const int r = s->rank();
  Schedule::StepId lastRecv = 0;
  int round = 0;
  for (int dist = 1; dist < n; dist *= 2, round++) {
    auto sent = s->send((r + dist) % n, token + round, 1);
    if (round > 0) s->after(sent, lastRecv);
    auto got = s->recv((r - dist % n + n) % n, sink + round, 1);
    if (round > 0) s->after(got, lastRecv);
    lastRecv = got;
  }
}

}  // namespace tcpx

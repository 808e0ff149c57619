// Recursive-doubling all-reduce, for small messages.
//
// With p the largest power of two <= n and rem = n - p: ranks below 2*rem
// pair up first (even rank sends its data to the odd one and sits out), which
// leaves p participants. In round k each participant exchanges its whole
// buffer with the participant whose index differs in bit k and reduces what
// it receives. Both partners compute a op b with the same two operands, and
// IEEE + and * are commutative, so every rank ends with bit-identical data.
// Finally the odd ranks hand the result back to their even partners.
// Cost: log2(p) rounds (+2 when n is not a power of two), S*log2(p) bytes per rank.
#include "collectives/algorithms.h"

namespace tcpx {

void buildRdAllreduce(Schedule* s, char* buf, size_t count, size_t esz) {
  const int n = s->nranks();
  const int r = s->rank();
  if (n == 1) return;
  int p = 1;
  while (p * 2 <= n) p *= 2;
  const int rem = n - p;
  const size_t chunkElems = std::max<size_t>(1, s->chunkBytes() / esz);
  std::vector<std::pair<size_t, size_t>> chunks;  // element offset, length
  for (size_t c = 0; c < count; c += chunkElems) chunks.push_back({c, std::min(chunkElems, count - c)});
  if (count == 0) chunks.push_back({0, 0});  // still one (empty) message per round
  auto ptr = [&](size_t i) { return buf + chunks[i].first * esz; };
  auto len = [&](size_t i) { return chunks[i].second * esz; };
  const size_t none = SIZE_MAX;
  std::vector<size_t> lastWrite(chunks.size(), none), lastRead(chunks.size(), none);

  auto sendAll = [&](int peer) {
    for (size_t i = 0; i < chunks.size(); i++) {
      auto id = s->send(peer, ptr(i), len(i));
      if (lastWrite[i] != none) s->after(id, static_cast<Schedule::StepId>(lastWrite[i]));
      lastRead[i] = id;
    }
  };
  auto recvAll = [&](int peer, bool reduce) {
    for (size_t i = 0; i < chunks.size(); i++) {
      auto id = reduce ? s->recvReduce(peer, ptr(i), len(i)) : s->recv(peer, ptr(i), len(i));
      // The chunk may still be going out to the partner: wait for that send.
      if (lastRead[i] != none) s->after(id, static_cast<Schedule::StepId>(lastRead[i]));
      if (lastWrite[i] != none) s->after(id, static_cast<Schedule::StepId>(lastWrite[i]));
      lastWrite[i] = id;
    }
  };

  int newRank;
  if (r < 2 * rem) {
    if (r % 2 == 0) {
      // Folded into r+1: contribute, then wait for the result.
      sendAll(r + 1);
      recvAll(r + 1, false);
      return;
    }
    recvAll(r - 1, true);
    newRank = r / 2;
  } else {
    newRank = r - rem;
  }
  for (int mask = 1; mask < p; mask <<= 1) {
    int newPeer = newRank ^ mask;
    int peer = newPeer < rem ? newPeer * 2 + 1 : newPeer + rem;
    sendAll(peer);
    recvAll(peer, true);
  }
  if (r < 2 * rem) sendAll(r - 1);
}

}  // namespace tcpx

// Collective algorithms as schedules (transport/schedule.h), one file each.
//
// Every algorithm sends the same number of messages whatever the size (an
// empty piece still travels as a 0-byte message): ranks that disagree on the
// size then always meet a message whose header tells them so, even a rank
// whose own tensor is empty.
//
// Notation in the cost lines: n ranks, S bytes per rank, C the chunk size,
// alpha the per-message latency. "Steps" counts sequential message rounds;
// "bytes" what each rank sends. Every algorithm pipelines by chunks of at most
// schedule->chunkBytes(): a chunk moves on as soon as it has arrived, so the
// rounds of large messages overlap.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "transport/schedule.h"

namespace tcpx {

// Algorithm ids carried in the message header (append, never renumber).
enum AllreduceAlgo : uint8_t { kAllreduceRing = 0, kAllreduceRd = 1 };
enum BroadcastAlgo : uint8_t { kBroadcastChain = 0, kBroadcastTree = 1 };
enum AllgatherAlgo : uint8_t { kAllgatherRing = 0 };
enum BarrierAlgo : uint8_t { kBarrierDissemination = 0 };

// Ring all-reduce (reduce-scatter then all-gather around the ring; Patarasuk &
// Yuan, "Bandwidth optimal all-reduce algorithms for clusters of
// workstations", JPDC 2009). In place on `buf` (`count` elements of `esz` bytes).
// Steps 2(n-1); bytes 2(n-1)/n * S: bandwidth-optimal.
void buildRingAllreduce(Schedule* s, char* buf, size_t count, size_t esz);

// Recursive-doubling all-reduce (Thakur, Rabenseifner & Gropp, "Optimization of
// collective communication operations in MPICH", IJHPCA 2005), with the
// non-power-of-two ranks folded into a neighbour first. In place.
// Steps log2(n) (+2 when n is not a power of two); bytes S*log2(n):
// latency-optimal, for small messages.
void buildRdAllreduce(Schedule* s, char* buf, size_t count, size_t esz);

// Ring all-gather: segs[i] is rank i's block (`segBytes` each); this rank's
// own block must already be in segs[rank]. Steps n-1; bytes (n-1)/n * nS.
void buildRingAllgather(Schedule* s, const std::vector<char*>& segs, size_t segBytes);

// Pipelined chain broadcast from `root` (root -> root+1 -> ...): every link
// carries the message once, so throughput is one link's.
// Steps n-1 + chunks-1; bytes S (the last rank sends nothing).
void buildChainBroadcast(Schedule* s, char* buf, size_t bytes, int root);

// Binomial-tree broadcast from `root`, pipelined by chunks.
// Steps ceil(log2 n); bytes up to S*ceil(log2 n) at the root: for small messages.
void buildTreeBroadcast(Schedule* s, char* buf, size_t bytes, int root);

// Dissemination barrier (Hensgen, Finkel & Manber 1988): in round k each rank
// signals rank+2^k and waits for rank-2^k. Steps ceil(log2 n); 1 byte each.
// `token` and `sink` are 1-byte scratch buffers per round (ceil(log2 n) each).
void buildDisseminationBarrier(Schedule* s, char* token, char* sink);

// Segment i of a count split in n near-equal parts: [*off, *off + *len).
void splitEven(size_t count, int n, int i, size_t* off, size_t* len);

}  // namespace tcpx

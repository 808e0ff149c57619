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
enum ReduceAlgo : uint8_t { kReduceChain = 0, kReduceTree = 1 };
enum ReduceScatterAlgo : uint8_t { kReduceScatterRing = 0 };
enum AlltoallAlgo : uint8_t { kAlltoallPairwise = 0 };
enum GatherAlgo : uint8_t { kGatherDirect = 0 };
enum ScatterAlgo : uint8_t { kScatterDirect = 0 };

// Calls fn(offset, length) for the chunks of a `bytes`-long buffer cut at
// `chunk` bytes: at least one call, with length 0 for an empty buffer (every
// algorithm sends a message even for an empty piece).
template <class Fn>
void forEachChunk(size_t bytes, size_t chunk, Fn fn) {
  size_t off = 0;
  do {
    size_t len = std::min(chunk, bytes - off);
    fn(off, len);
    off += len;
  } while (off < bytes);
}

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

// Ring reduce-scatter: segment i (`segBytes`, whole elements of `esz`) ends
// reduced on rank i. in[i] is this rank's contribution to segment i (read
// only), acc[i] where partial sums of it accumulate; acc[rank] receives the
// result. Steps n-1; bytes (n-1)/n * nS (S = segBytes): bandwidth-optimal.
void buildRingReduceScatter(Schedule* s, const std::vector<const char*>& in,
                            const std::vector<char*>& acc, size_t segBytes, size_t esz);

// Pipelined chain reduce to `root` (root+n-1 -> ... -> root+1 -> root): each
// rank reduces the partial sum from its successor into its own contribution
// `in` and forwards it. `acc` receives the partial sums (on the root: the
// result; it may equal `in` there). Steps n-1 + chunks-1; bytes S per rank.
void buildChainReduce(Schedule* s, const char* in, char* acc, size_t bytes, size_t esz,
                      int root);

// Binomial-tree reduce to `root` (the mirror of the tree broadcast), for
// small messages: children's partial sums are reduced in a fixed order, so
// the result does not depend on arrival order. Same in/acc contract as the
// chain. Steps ceil(log2 n); bytes S per rank (the root receives up to
// S*ceil(log2 n)).
void buildTreeReduce(Schedule* s, const char* in, char* acc, size_t bytes, size_t esz, int root);

// Pairwise-exchange all-to-all (Thakur, Rabenseifner & Gropp 2005): in round
// k (1..n-1) a rank sends sendBlocks[r+k] and receives recvBlocks[r-k]; a
// round's sends start once the previous round's are in the net, so a rank
// streams to one peer at a time. Blocks may differ in size (uneven splits):
// each pair's messages carry a hash of that pair's byte count, so ranks that
// disagree on a split get a mismatch error. The own block is not touched
// (the caller copies it). Steps n-1; bytes (n-1)/n * S when blocks are equal.
void buildPairwiseAlltoall(Schedule* s, const std::vector<const char*>& sendBlocks,
                           const std::vector<size_t>& sendBytes,
                           const std::vector<char*>& recvBlocks,
                           const std::vector<size_t>& recvBytes);

// Direct gather to `root`: every rank sends its block to the root, which
// receives all of them at once into outputs[i] (its own block is copied by
// the caller). Steps 1 + chunks-1; the root receives (n-1) * S bytes, which
// bounds any gather.
void buildDirectGather(Schedule* s, const char* in, const std::vector<char*>& outputs,
                       size_t bytes, int root);

// Direct scatter from `root`: the mirror of the direct gather; inputs[i]
// goes to rank i (the root's own block is copied by the caller).
void buildDirectScatter(Schedule* s, const std::vector<const char*>& inputs, char* out,
                        size_t bytes, int root);

// The binomial tree rooted at `root` that the tree broadcast and reduce
// share: with v = (rank - root) mod n, the parent is v without its highest
// set bit (-1 for the root) and the children are v + 2^j for every 2^j
// above that bit, in increasing order (largest subtree first).
void binomialTree(int n, int rank, int root, int* parent, std::vector<int>* children);

// Segment i of a count split in n near-equal parts: [*off, *off + *len).
void splitEven(size_t count, int n, int i, size_t* off, size_t* len);

}  // namespace tcpx

// Host relay for small CUDA collectives (TCPX_CUDA_HOST_BYTES).
//
// An op of a few KiB spends its time in fixed costs, not in moving bytes:
// with the op kernel, each staging copy and each unpack is a command the
// worker posts and the kernel reads from host memory (a round trip of
// ~26-30 us on H200 VMs, docs/performance.md). The relay has one kernel
// per op and no commands:
//   1. the kernel's blocks copy the device input into the data area of a
//      slot of mapped pinned memory, each block then releasing its word of
//      the slot's header (together: the task's gate, relayStaged());
//   2. the worker runs the collective on the data area with the CPU path
//      (host memory, host reductions) and publishes the result
//      (relayPublish());
//   3. the kernel waits for it and copies it into the device output.
// Step 3 has two forms. Up to kRelayLLMax bytes the result is published in
// "LL" lines: each 8-byte line holds 4 data bytes and a 4-byte flag, the
// op's generation (NCCL's LL protocol, src/device/prims_ll.h), and every
// thread polls its own lines, so data and readiness come in one PCIe read.
// Above it, where a thread would poll many lines one after another, the
// result stays in the data area and one `done` word says it is there; each
// block polls that word, then reads the data at PCIe bandwidth.
//
// Slot layout for an op of `bytes`: a 256-byte header (staged[b] for block
// b at offset 4b, done at offset 128), the data area (relayDataBytes), then,
// in LL mode, the LL area (relayLLBytes: 16-byte units {d0, f0, d1, f1},
// one vector load on the GPU, 8 data bytes each).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "common/status.h"

#ifdef __CUDACC__
#define TCPX_HOST_DEVICE __host__ __device__
#else
#define TCPX_HOST_DEVICE
#endif

namespace tcpx {

constexpr size_t kRelayLLMax = 4096;         // LL mode up to this many bytes
constexpr size_t kRelayBlockBytes = 32768;   // bytes one block stages and reads
constexpr int kRelayMaxBlocks = 32;
constexpr size_t kRelayHeader = 256;
constexpr size_t kRelayDoneOffset = 128;

TCPX_HOST_DEVICE inline bool relayLL(size_t bytes) { return bytes <= kRelayLLMax; }
TCPX_HOST_DEVICE inline int relayBlocks(size_t bytes) {
  const size_t b = (bytes + kRelayBlockBytes - 1) / kRelayBlockBytes;
  return b < 1 ? 1 : b > kRelayMaxBlocks ? kRelayMaxBlocks : static_cast<int>(b);
}
TCPX_HOST_DEVICE inline size_t relayUnits(size_t bytes) { return (bytes + 7) / 8; }
TCPX_HOST_DEVICE inline size_t relayDataBytes(size_t bytes) { return (bytes + 15) / 16 * 16; }
TCPX_HOST_DEVICE inline size_t relayLLBytes(size_t bytes) {
  return relayLL(bytes) ? relayUnits(bytes) * 16 : 0;
}
TCPX_HOST_DEVICE inline size_t relaySlotBytes(size_t bytes) {
  return kRelayHeader + relayDataBytes(bytes) + relayLLBytes(bytes);
}
// Where the collective runs: the slot's data area.
inline char* relayData(void* slot) { return static_cast<char*>(slot) + kRelayHeader; }

// Host side of step 1: true once every block has staged its part for `gen`.
inline bool relayStaged(const void* slot, size_t bytes, uint32_t gen) {
  const uint32_t* staged = static_cast<const uint32_t*>(slot);
  for (int b = 0; b < relayBlocks(bytes); b++)
    if (__atomic_load_n(&staged[b], __ATOMIC_ACQUIRE) != gen) return false;
  return true;
}

// Host side of step 2: publishes the data area's `bytes` as the result of
// generation `gen`. LL mode: each line is one aligned 64-bit store, so a
// reader never sees a line's flag without its data (bytes past the end in
// the last unit are zero). Flag mode: a release store of `done` after the
// data. No CUDA call: runs on the communicator's worker.
inline void relayPublish(void* slot, size_t bytes, uint32_t gen) {
  char* data = relayData(slot);
  if (!relayLL(bytes)) {
    __atomic_store_n(reinterpret_cast<uint32_t*>(static_cast<char*>(slot) + kRelayDoneOffset), gen,
                     __ATOMIC_RELEASE);
    return;
  }
  uint64_t* line = reinterpret_cast<uint64_t*>(data + relayDataBytes(bytes));
  const size_t lines = relayUnits(bytes) * 2;
  for (size_t i = 0; i < lines; i++) {
    uint32_t word = 0;
    const size_t off = i * 4;
    if (off < bytes) memcpy(&word, data + off, bytes - off < 4 ? bytes - off : 4);
    const uint64_t v = static_cast<uint64_t>(word) | (static_cast<uint64_t>(gen) << 32);
    __atomic_store_n(&line[i], v, __ATOMIC_RELAXED);
  }
  __atomic_thread_fence(__ATOMIC_RELEASE);
}

// Device side (CUDA builds): enqueues on `stream` (a cudaStream_t) the relay
// kernel of generation `gen` for an op of `bytes` (> 0) from device memory
// `src` to device memory `dst` (they may be the same; any alignment)
// through `slot` (mapped pinned memory of relaySlotBytes(bytes), 16-byte
// aligned): steps 1 and 3 above. The kernel returns only after
// relayPublish(slot, bytes, gen), so the host must publish every launched
// relay, also when the op fails (the output is then undefined).
// Generations of one slot must differ from their predecessors'. Errors:
// tcpxInvalidArgument (bytes 0, slot misaligned), tcpxUnhandledCudaError.
tcpxResult_t streamHostRelay(const void* src, void* dst, size_t bytes, void* slot, uint32_t gen,
                             void* stream);

}  // namespace tcpx

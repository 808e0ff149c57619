// DeviceStage: the GPU side of a communicator whose tensors live in CUDA
// memory, seen by the transport and the collectives without CUDA types.
//
// With a stage, a schedule's buffers are device pointers. The communicator
// then moves every chunk through pinned host memory (DESIGN.md, transport/):
//   send:    device -> pinned chunk (copy on the comm stream), a ticket tells
//            the worker when the copy is done, then the net sends the chunk;
//   receive: the net lands the chunk in a pinned bounce buffer, the unpack
//            stage (transport/unpack.h, the loadMeta format) copies it into
//            place or reduces it into place on the comm stream; the step is
//            done, and the bounce buffer free again, once its ticket is.
// Chunks of different steps and peers are in flight at once, so device
// copies, the net and unpacks overlap. Everything the stage enqueues goes on
// one stream (the comm stream) and never waits for anything outside it, so
// the worker can always wait for it: ops are ordered after the caller's
// work by a gate the worker polls (Task::gate), not by stream waits.
//
// Work methods (copy, unpack, record, query, synchronize) are called from
// the communicator's worker thread only; the memory methods from any thread.
// Implemented with CUDA in transport/cuda_stage.cu.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "common/status.h"
#include "common/types.h"

namespace tcpx {

class DeviceStage {
 public:
  virtual ~DeviceStage() = default;

  // The CUDA device index the stage works on.
  virtual int device() const = 0;

  // Pinned host memory the device can read and write (bounce buffers,
  // staging chunks), from a pool that keeps freed blocks: freeing real pinned
  // memory synchronises the device, which the worker must never do while a
  // caller's stream waits for it. nullptr when out of memory.
  virtual void* allocHost(size_t bytes) = 0;
  virtual void freeHost(void* p) = 0;
  // Puts `count` blocks of `bytes` in the pool now. Allocating pinned memory
  // may serialise the device's streams (CUDA's implicit synchronisation),
  // which must not happen while a stream waits for the worker: the
  // communicator reserves what its collectives need when it is created.
  virtual tcpxResult_t reserveHost(size_t bytes, int count) = 0;
  // Device scratch memory (partial sums), allocated and freed in the comm
  // stream's order (a stream-ordered pool: no device synchronisation).
  // Collectives allocate it when the op is issued, on the caller's thread,
  // so the worker never waits for an allocation.
  virtual void* allocDevice(size_t bytes) = 0;
  virtual void freeDevice(void* p) = 0;
  // The comm stream (a cudaStream_t), for kernels of the layers above
  // (collectives' scaling) that must run in the stage's order.
  virtual void* stream() const = 0;

  // ---- work enqueued on the comm stream, in call order ----
  // dst <- src, `bytes` (device<->device, device<->pinned host). The
  // regions must be equal (nothing to do) or not overlap.
  virtual tcpxResult_t copy(void* dst, const void* src, size_t bytes) = 0;
  // The unpack stage for one received chunk of `bytes` in pinned `bounce`:
  // reduce == false: dst <- bounce; reduce == true: dst <- own op bounce,
  // element-wise in dtype (own == nullptr means dst).
  virtual tcpxResult_t unpack(void* dst, const void* own, const void* bounce, size_t bytes,
                              bool reduce, DataType dtype, RedOp op) = 0;
  // A ticket for everything enqueued so far; tickets complete in order.
  virtual tcpxResult_t record(uint64_t* ticket) = 0;
  // Non-blocking: *done once the ticket's work has finished. A CUDA error
  // (a faulting kernel) is returned as tcpxUnhandledCudaError.
  virtual tcpxResult_t query(uint64_t ticket, bool* done) = 0;
  // Blocks until everything enqueued so far has finished (failure paths).
  virtual tcpxResult_t synchronize() = 0;
};

// A stage on CUDA device `device`, with a new non-blocking comm stream of
// the given priority (cudaStreamCreateWithPriority). Fails with
// tcpxUnhandledCudaError when CUDA is unusable. CUDA builds only.
tcpxResult_t createCudaStage(int device, int priority, std::shared_ptr<DeviceStage>* out);

// Makes `stream` (a cudaStream_t) wait until the 32-bit word at `flag`
// (mapped pinned host memory, written by the host) reaches `target`, in
// wrap-around order ((int32_t)(*flag - target) >= 0): how a caller's stream
// waits for an operation that only the host knows has finished, without
// blocking the host. memop == false: a one-thread kernel polls the word
// (UCC's "kernel" stream task mode); true: the driver's stream memory
// operation cuStreamWaitValue32 (GEQ, the same wrap-around order; no SM is
// held), or tcpxInvalidUsage where the driver does not offer it.
// createCudaStage loads the kernel, so that no stream waits before it is.
tcpxResult_t streamWaitFlag(const volatile uint32_t* flag, uint32_t target, void* stream,
                            bool memop = false);

}  // namespace tcpx

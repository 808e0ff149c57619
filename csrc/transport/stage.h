// DeviceStage: the GPU side of a communicator whose tensors live in CUDA
// memory, seen by the transport and the collectives without CUDA types.
//
// With a stage, a schedule's buffers are device pointers. The communicator
// then moves every chunk through pinned host memory (DESIGN.md, transport/):
//   send:    device -> pinned chunk (a copy on the device), a ticket tells
//            the worker when the copy is done, then the net sends the chunk;
//   receive: the net lands the chunk in a pinned bounce buffer, the unpack
//            stage (transport/unpack.h, the loadMeta format) copies it into
//            place or reduces it into place; the step is done, and the
//            bounce buffer free again, once its ticket is.
// Chunks of different steps and peers are in flight at once, so device
// copies, the net and unpacks overlap.
//
// The worker never calls CUDA. A CUDA call can block while another thread of
// the process sits in a synchronous one (a pageable copy, a lazily loaded
// kernel) that waits for the very op the worker is running: measured on
// H200, tests/cuda/test_stage.cu. So the device work of an op is done by a
// kernel that the issuing thread launches on the op's stream (launch());
// the worker hands it work through a command ring in mapped host memory
// (copy, unpack, scale, divide) and reads tickets back from the same memory,
// like NCCL's proxy and its kernels. The kernel exits once the op is over
// (end()), so stream order alone tells later work on that stream that the
// op is done.
//
// Threads: launch() and allocDevice() on the issuing thread; the work
// methods (bind .. synchronize) on the communicator's worker thread only;
// started(), end() and the memory methods from any thread.
// Implemented with CUDA in transport/cuda_stage.cu.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "common/status.h"
#include "common/types.h"

namespace tcpx {

class DeviceStage {
 public:
  virtual ~DeviceStage() = default;

  // The CUDA device index the stage works on.
  virtual int device() const = 0;

  // ---- memory ----
  // Pinned host memory the device can read and write (bounce buffers,
  // staging chunks), from a pool that keeps freed blocks: allocating or
  // freeing pinned memory may synchronise the device. Taken from the pool
  // when it has a block of that size; else allocated (a CUDA call: the
  // communicator reserves what 16 peers need when it is created, so
  // that the worker rarely gets here). nullptr when out of memory.
  virtual void* allocHost(size_t bytes) = 0;
  virtual void freeHost(void* p) = 0;
  // Puts `count` blocks of `bytes` in the pool now.
  virtual tcpxResult_t reserveHost(size_t bytes, int count) = 0;
  // Device scratch memory (partial sums), allocated when an op is issued
  // (collectives reserve it then, on the issuing thread) and given back
  // to a cache, not to CUDA, once the op no longer uses it: freeing needs no
  // CUDA call. nullptr when out of memory.
  virtual void* allocDevice(size_t bytes) = 0;
  virtual void freeDevice(void* p) = 0;

  // ---- ops ----
  // Issuing thread: enqueues on `stream` (a cudaStream_t) the kernel that
  // will run one op's device work, and returns the op's id (> 0). The kernel
  // starts when the stream reaches it (after the caller's work) and holds
  // the stream until end(op). tcpxUnhandledCudaError if the launch fails;
  // blocks while every op record is in use (kOps ops in flight).
  virtual tcpxResult_t launch(void* stream, uint64_t* op) = 0;
  // True once op's kernel runs: the stream reached the op, so the op's
  // tensors hold the caller's data.
  virtual bool started(uint64_t op) = 0;
  // Worker: the work calls below go to op (0: none; they then fail).
  virtual void bind(uint64_t op) = 0;
  // Exactly once per launched op, after the last work call for it (or
  // without any): the kernel finishes what it was given and exits.
  virtual tcpxResult_t end(uint64_t op) = 0;

  // ---- work of the bound op, run by its kernel in call order ----
  // dst <- src, `bytes` (device<->device, device<->pinned host). The
  // regions must be equal (nothing to do) or not overlap. serial: waits
  // for everything before it and holds back everything after (the local
  // steps of collectives, whose results later steps read without a ticket).
  virtual tcpxResult_t copy(void* dst, const void* src, size_t bytes, bool serial) = 0;
  // The unpack stage for one received chunk of `bytes` in pinned `bounce`:
  // reduce == false: dst <- bounce; reduce == true: dst <- own op bounce,
  // element-wise in dtype (own == nullptr means dst).
  virtual tcpxResult_t unpack(void* dst, const void* own, const void* bounce, size_t bytes,
                              bool reduce, DataType dtype, RedOp op) = 0;
  // buf[i] *= factor (floating types; PREMUL_SUM) and buf[i] /= divisor
  // (every type but bool; AVG), with collectives/reduce.h's arithmetic:
  // half types compute in float, integers divide truncating toward zero.
  // Both wait for everything before them and hold back everything after.
  virtual tcpxResult_t scale(void* buf, size_t count, DataType dtype, double factor) = 0;
  virtual tcpxResult_t divide(void* buf, size_t count, DataType dtype, int64_t divisor) = 0;
  // A ticket for everything given so far; tickets complete in order.
  virtual tcpxResult_t record(uint64_t* ticket) = 0;
  // Non-blocking: *done once the ticket's work has finished.
  virtual tcpxResult_t query(uint64_t ticket, bool* done) = 0;
  // Waits until everything given so far has finished (failure paths).
  virtual tcpxResult_t synchronize() = 0;

  // For error messages: op's progress ("kernel running, 3 of 5 commands done").
  virtual std::string describe(uint64_t op) = 0;
};

// A stage on CUDA device `device` whose op kernels run `blocks` thread
// blocks (TCPX_CUDA_BLOCKS). Fails with tcpxUnhandledCudaError when CUDA is
// unusable. CUDA builds only.
tcpxResult_t createCudaStage(int device, int blocks, std::shared_ptr<DeviceStage>* out);

// Makes `stream` (a cudaStream_t) write `value` to the 32-bit word at `flag`
// (mapped pinned host memory) once the work before it on the stream is
// done; the host reads the word to learn that without a CUDA call.
tcpxResult_t streamWriteFlag(volatile uint32_t* flag, uint32_t value, void* stream);

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

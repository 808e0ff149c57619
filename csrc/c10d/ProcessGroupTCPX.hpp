// ProcessGroupTCPX: the c10d::Backend that PyTorch sees as "tcpx".
//
// Each call validates its tensors (bad input raises ValueError before
// anything is sent, so the group stays usable), maps torch's types onto the
// core's, builds a task (csrc/collectives) and enqueues it on the group's
// Communicator. Operations run asynchronously, in issue order, on the
// communicator's worker thread; the returned WorkTCPX completes its Future
// with the output tensors, or stores the error, which wait() rethrows.
//
// CUDA tensors (CUDA builds) run on a second Communicator, created at the
// group's first CUDA op, whose collectives work on device buffers through a
// DeviceStage (transport/stage.h). Stream semantics are ProcessGroupNCCL's:
// an op starts once the caller's current stream has reached it (an event the
// worker polls), its device work runs on the stage's comm stream, and the
// Work's completion is an event on a completion stream, behind a kernel that
// waits for the host to say the op is done (streamWaitFlag). wait() makes the
// caller's current stream wait for that event without blocking the host.
//
// The contract followed is c10d's Backend/Work (torch/csrc/distributed/c10d/
// Backend.hpp, Work.hpp; ../shared/reference/c10d-backend.md), modelled on
// ProcessGroupGloo for CPU tensors and ProcessGroupNCCL for CUDA tensors.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <c10/core/Stream.h>

#include "collectives/collectives.h"
#include "transport/communicator.h"

namespace tcpx {

class Staging;  // ProcessGroupTCPX.cpp: contiguous stand-ins for the user's tensors

// A Work whose outcome is set once, on the communicator's worker thread.
class WorkTCPX : public c10d::Work {
 public:
  WorkTCPX(int rank, c10d::OpType opType, const char* profilingTitle,
           std::vector<at::Tensor> outputs, std::string description,
           const std::optional<std::vector<at::Tensor>>& inputs);

  // Copies results back into non-contiguous user tensors (run before completion).
  std::function<void()> postprocess;
  // For recv: the rank the message came from.
  int srcRank = -1;

  // ---- CUDA ops (set at issue, before the op is enqueued) ----
  // Copies on the device around the op: into pinned buffers before it
  // (point-to-point sends) and back into the user's tensors after it
  // (non-contiguous outputs, receives), as (destination, source).
  std::vector<std::pair<at::Tensor, at::Tensor>> deviceBefore, deviceAfter;
  // Make the current stream wait for the op's completion event(s).
  std::vector<std::function<void()>> streamWaits;
  // The stream on which the completion event is recorded: the Future
  // records its own events there when it completes.
  std::optional<c10::Stream> completionStream;
  // TCPX_CUDA_WAIT=host: wait() blocks the host until the op is done.
  bool hostWait = false;
  // A small CUDA collective through the host relay (transport/relay.h):
  // `relayTensor` (contiguous, on the device) is staged into `relaySlot`
  // (mapped pinned memory) where the CPU path runs; no op kernel.
  void* relaySlot = nullptr;
  at::Tensor relayTensor;
  // Replaces the Future with one that knows `device` (CUDA stream semantics
  // for then() callbacks and value()).
  void useDeviceFuture(c10::Device device);

  // Called by the worker with the task's outcome. Copies results back at
  // once; completing the Work and its Future (which runs the Future's
  // callbacks) happens there too, unless someone has asked for the Future:
  // then on a completion thread, because a callback may issue another op on
  // this group and wait for it (PowerSGD's hook does), which would deadlock
  // the worker that has to run that op.
  void complete(const TaskResult& result);

  // CPU ops: blocks until done, rethrows a failure. CUDA ops: makes the
  // current stream wait for completion and returns at once (rethrowing a
  // failure already known); with a timeout, also blocks the host until the
  // op is done or the timeout passes (DistBackendError), like ProcessGroupNCCL.
  bool wait(std::chrono::milliseconds timeout = kNoTimeout) override;
  void synchronize() override;
  std::vector<at::Tensor> result() override { return outputs_; }
  // Once a Future was handed out, completion runs on a completion thread, so
  // that its callbacks never run on the network thread; a completion already
  // under way on that thread finishes first (callbacks added afterwards run
  // at once on the caller's thread).
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override {
    std::unique_lock<std::mutex> lk(futureMu_);
    futureRequested_ = true;
    futureCv_.wait(lk, [&] { return !completingInline_; });
    return future_;
  }
  int sourceRank() const override;
  const std::string& description() const { return description_; }

 private:
  void completeNow(std::exception_ptr error);

  std::mutex futureMu_;
  std::condition_variable futureCv_;
  bool futureRequested_ = false;   // getFuture() was called
  bool completingInline_ = false;  // complete() is completing on its own thread
  std::vector<at::Tensor> outputs_;
  std::string description_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

class ProcessGroupTCPX : public c10d::Backend {
 public:
  // Bootstraps through `store` (already private to the group). Raises
  // ValueError for bad TCPX_* configuration, DistBackendError when the
  // bootstrap fails (e.g. rank 0 never publishes within `timeout`).
  ProcessGroupTCPX(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                   std::chrono::milliseconds timeout, std::string groupName,
                   std::vector<int64_t> globalRanks);
  ~ProcessGroupTCPX() override;

  const std::string getBackendName() const override { return "tcpx"; }
  c10::intrusive_ptr<c10d::Backend::Options> getBackendOptions() override;
  void setTimeout(std::chrono::milliseconds timeout) override { timeout_ = timeout; }

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs,
                                           const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather_coalesced(
      std::vector<std::vector<at::Tensor>>& outputLists, std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(
      std::vector<at::Tensor>& tensors, const c10d::AllreduceCoalescedOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce(std::vector<at::Tensor>& tensors,
                                        const c10d::ReduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter(std::vector<at::Tensor>& outputs,
                                                std::vector<std::vector<at::Tensor>>& inputs,
                                                const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(
      at::Tensor& output, at::Tensor& input, const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& output, at::Tensor& input,
                                               std::vector<int64_t>& outputSplitSizes,
                                               std::vector<int64_t>& inputSplitSizes,
                                               const c10d::AllToAllOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> alltoall(std::vector<at::Tensor>& outputs,
                                          std::vector<at::Tensor>& inputs,
                                          const c10d::AllToAllOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> gather(std::vector<std::vector<at::Tensor>>& outputs,
                                        std::vector<at::Tensor>& inputs,
                                        const c10d::GatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> scatter(std::vector<at::Tensor>& outputs,
                                         std::vector<std::vector<at::Tensor>>& inputs,
                                         const c10d::ScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& tensors, int dstRank,
                                      int tag) override;
  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& tensors, int srcRank,
                                      int tag) override;
  c10::intrusive_ptr<c10d::Work> recvAnysource(std::vector<at::Tensor>& tensors,
                                               int tag) override;

  // Coalescing (ProcessGroupNCCL's contract): between startCoalescing and
  // endCoalescing, collectives are collected instead of started and then run
  // as one operation (one schedule, one sequence number: their messages
  // overlap, so a batch of k small ops costs about one op's round trips, not
  // k). Point-to-point ops start at once as usual. endCoalescing returns a
  // Work that completes when every op of the batch has; each op's own Work
  // completes too. Used by _coalescing_manager and batch_isend_irecv.
  bool supportsCoalescing() const override { return true; }
  void startCoalescing() override;
  c10::intrusive_ptr<c10d::Work> endCoalescing() override;

  // split_group: a new backend over `ranks` (global ranks of the parent's
  // world, this rank among them), bootstrapped through `store`.
  bool supportsSplitting() const override { return true; }
  c10::intrusive_ptr<c10d::Backend> split(const c10::intrusive_ptr<c10d::Store>& store,
                                          const std::vector<int>& ranks,
                                          const c10::intrusive_ptr<Options>& opts) override;

  // Time breakdown of this group's CUDA collectives so far (transport's
  // DeviceBreakdown; all zero before the first CUDA op).
  DeviceBreakdown deviceBreakdown() const;
  // Logs the state of both communicators' workers (Communicator::dumpState).
  void dumpState();

  uint64_t getSequenceNumberForGroup() override;
  void setSequenceNumberForGroup() override {}  // every rank starts at 0 already
  void abort() override;
  void shutdown() override;

 private:
  struct Batch;
  class OpGuard;
  struct CudaState;
  // The communicator for an op on tensors of `device` (CPU, or CUDA: created
  // at the first use; all CUDA ops of a group must use one device). Raises
  // ValueError for another device.
  Communicator& commFor(const c10::Device& device, const char* op);
  // Sets up a CUDA op on the streams: ordering after the caller's stream,
  // staging of sends, completion flag waits (point-to-point), copies back,
  // the completion event. For a collective, returns what must follow its op
  // kernel on the collective stream (launchCuda runs it).
  std::function<void()> prepareCuda(Task& task, WorkTCPX& work,
                                    const std::vector<at::Tensor>& keep, int peer);
  // Launches the op kernel of a CUDA collective on the collective stream
  // (transport/stage.h), then `after`; on a launch error the task fails and
  // the error is raised.
  void launchCuda(Task& task, const std::vector<std::function<void()>>& after);
  // An op raised while coalescing: torch will not call endCoalescing, so
  // the block ends here; collected collectives are cancelled (never sent)
  // and the batch Works fail. Point-to-point ops already issued go on.
  void abandonCoalescing();
  // Keeps the group in step after `op` raised on this rank (see makeFailed).
  void enqueueFailed(const char* op);
  int opDepth_ = 0;  // ops on the stack (a *_coalesced op calls others)
  // Runs `issue` (which issues several ops) as one coalesced batch and
  // returns the batch's Work; inside an open coalescing block the ops join it.
  c10::intrusive_ptr<c10d::Work> coalesce(c10d::OpType opType, const char* title,
                                          const std::function<void()>& issue);
  // Starts the collectives collected so far as one composite operation.
  void flushCoalesced();

  // Enqueues `task`, completing `work` from the worker; `keep` are the
  // buffers the task reads or writes (kept alive as long as the task).
  c10::intrusive_ptr<c10d::Work> enqueue(std::shared_ptr<Task> task,
                                         c10::intrusive_ptr<WorkTCPX> work,
                                         std::chrono::milliseconds timeout,
                                         std::vector<at::Tensor> keep);
  // A receive's enqueue: for CUDA, the message lands in pinned `wire` and is
  // copied into `buf` on the device after the op.
  c10::intrusive_ptr<c10d::Work> enqueueRecv(std::shared_ptr<P2PTask> task,
                                             c10::intrusive_ptr<WorkTCPX> work,
                                             const Staging& st, const at::Tensor& buf,
                                             const at::Tensor& wire);
  std::chrono::milliseconds opTimeout(std::chrono::milliseconds requested) const;
  // ValueError unless `peer` is another rank of the group.
  void checkPeer(int peer, const char* op, const char* role) const;

  std::unique_ptr<Communicator> comm_;
  std::unique_ptr<CudaState> cuda_;  // after the first CUDA op
  c10::intrusive_ptr<c10d::Store> store_;
  CommOptions commOptions_;          // the CPU communicator's, the base of the CUDA one's
  const Params* params_ = nullptr;  // the process's TCPX_* settings (never freed)
  CollConfig collConfig_;
  std::chrono::milliseconds timeout_;
  std::string groupName_;
  std::vector<int64_t> globalRanks_;

  // Coalescing state (touched only by the thread that issues ops).
  bool coalescing_ = false;
  std::vector<std::shared_ptr<Batch>> batches_;           // open batches, outermost first
  std::vector<std::shared_ptr<CollectiveTask>> pending_;  // collectives not started yet
  Communicator* pendingComm_ = nullptr;                   // the communicator they run on
  std::vector<std::function<void()>> pendingAfter_;       // CUDA: their prepareCuda results
  std::vector<std::pair<uintptr_t, uintptr_t>> pendingRanges_;  // memory they touch
  c10::intrusive_ptr<WorkTCPX> abandoned_;  // the Work of a block that abandonCoalescing ended
};

}  // namespace tcpx

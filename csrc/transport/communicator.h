// Communicator: one process group's view of its peers.
//
// Bootstrap goes through the group's Store only: rank 0 publishes a random
// group secret (and the group-wide chunk size), every rank listens on its net
// device and publishes its handle. Connections are made lazily, when an
// algorithm first needs a peer: each ordered pair of ranks gets a collective
// connection and, when used, a point-to-point one.
//
// A worker thread executes tasks in issue order. Collectives run one at a
// time; each receives its messages into bounce buffers (TCPX_BUFFERS of
// TCPX_CHUNK_BYTES per peer, always posted), checks every message's header
// (transport/message.h) and then copies or reduces it into place. Point-to-
// point transfers progress concurrently with collectives, on their own
// connections, with unexpected messages buffered until their receive arrives.
//
// Failures:
//  - a disagreement between ranks (other op, size, dtype...) fails the
//    operation on the rank that sees it; that rank tells its peers with an
//    ABORT message, which fails the operation there too. The message streams
//    stay in step (leftovers of a failed operation are dropped by sequence
//    number), so the group stays usable;
//  - a lost connection or a timeout cannot be repaired: the communicator
//    aborts (closes every connection, so that peers notice at once) and every
//    later task fails with the original cause.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/event.h"
#include "common/status.h"
#include "net/net.h"
#include "transport/stage.h"
#include "transport/store.h"
#include "transport/task.h"

namespace tcpx {

struct CommOptions {
  int rank = 0;
  int nranks = 1;
  std::chrono::milliseconds timeout{30 * 60 * 1000};  // default per-task timeout
  std::string name = "default";                       // group name, for logs
  std::shared_ptr<Store> store;
  Net* net = nullptr;
  int dev = 0;
  size_t chunkBytes = 512 * 1024;  // rank 0's value is adopted by the group
  int buffers = 8;                 // bounce buffers per peer
  int nsocks = 0;                  // data sockets per connection; 0: the net's default
  int spinUs = 0;                  // busy-poll before sleeping
  // Set: collectives run on device buffers through this stage, and the
  // bounce buffers are pinned host memory from it (transport/stage.h).
  std::shared_ptr<DeviceStage> stage;
};

// Where the time of device collectives went, summed over the collectives
// run so far (microseconds). A stage is "busy" while at least one of its
// items is in flight: device -> pinned staging copies (from enqueue until the
// worker sees the ticket done), sends in the net (posted until done), unpacks
// (enqueued until done). When the stages overlap, their busy times add up
// to more than the wall time: busy sum - wall = time saved by overlap.
struct DeviceBreakdown {
  uint64_t ops = 0;
  double wallUs = 0, stagingUs = 0, netUs = 0, unpackUs = 0;
};

class Communicator {
 public:
  // Bootstraps (secret, listen, publish). Fails with the Store's or the
  // net's error (e.g. tcpxTimeout if rank 0 never publishes the secret).
  static tcpxResult_t create(const CommOptions& opts, std::unique_ptr<Communicator>* out);
  // Shuts down (waits for queued tasks, bounded by their timeouts).
  ~Communicator();

  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return opts_.rank; }
  int nranks() const { return opts_.nranks; }
  size_t chunkBytes() const { return chunkBytes_; }
  const std::string& name() const { return opts_.name; }
  // The device stage of a CUDA communicator, else nullptr.
  DeviceStage* stage() const { return opts_.stage.get(); }
  const std::shared_ptr<DeviceStage>& sharedStage() const { return opts_.stage; }

  // Queues `task`; never blocks. On an aborted communicator the task fails
  // at once (onComplete runs on the caller's thread then).
  void enqueue(std::shared_ptr<Task> task);
  // Fails everything queued or running with `why`, closes every connection.
  void abort(const std::string& why);
  // Lets queued tasks finish, then closes every connection and stops the worker.
  void shutdown();
  // Collectives issued so far (the group's sequence number).
  uint64_t collectivesIssued() const;
  // Non-empty once the communicator has aborted: the cause.
  std::string abortReason() const;
  // Time breakdown of the device collectives that completed so far.
  DeviceBreakdown deviceBreakdown() const;
  // Diagnostics for a hang: logs (WARN) how long ago the worker last looped,
  // and asks it to log what it is waiting for (which it does unless stuck).
  void dumpState();

 private:
  explicit Communicator(const CommOptions& opts);
  tcpxResult_t bootstrap();

  struct Impl;
  CommOptions opts_;
  size_t chunkBytes_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tcpx

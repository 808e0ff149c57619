#include "transport/communicator.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <list>
#include <map>
#include <set>

#include <pthread.h>

#include "common/logging.h"
#include "common/utils.h"

namespace tcpx {
namespace {

constexpr int kCollLink = 0;  // connection index of collective traffic
constexpr int kP2PLink = 1;   // connection index of point-to-point traffic
constexpr int kNumLinks = 2;
constexpr uint32_t kBootstrapVersion = 1;
// Longest sleep of the worker when nothing is due: housekeeping cadence.
constexpr auto kMaxSleep = std::chrono::milliseconds(100);
// Sleep while a connection is being made (connect() progresses when called).
constexpr auto kConnectPoll = std::chrono::microseconds(200);

// What rank 0 publishes for the group (Store key "tcpx/boot").
struct WireBoot {
  uint32_t version;
  uint32_t reserved;
  uint64_t chunkBytes;
  uint8_t secret[kGroupSecretBytes];
};

// First message of every point-to-point transfer; the payload (if any) follows.
constexpr uint32_t kP2PMagic = 0x50325058;  // "XP2P"
struct WireP2P {
  int64_t tag;
  uint64_t bytes;
  uint32_t dtype;
  uint32_t magic;
};

std::string handleKey(int rank) { return strFormat("tcpx/handle/%d", rank); }

}  // namespace

struct Communicator::Impl {
  // ---- state shared with callers (guarded by mu) ----
  mutable std::mutex mu;
  std::deque<std::shared_ptr<Task>> incoming;
  bool stopping = false;
  std::string aborted;  // non-empty once aborted: the cause
  std::string abortRequest;  // set by abort(), acted on by the worker
  uint64_t collectivesIssued = 0;
  DeviceBreakdown breakdown;  // device collectives completed so far
  std::condition_variable stopped;
  bool workerDone = false;

  // ---- worker-only state ----
  CommOptions opts;
  Net* net = nullptr;
  size_t chunkBytes = 0;
  uint8_t secret[kGroupSecretBytes] = {};
  void* listenComm = nullptr;
  EventCounter events;
  std::thread worker;
  bool abortedLocal = false;  // worker's copy of "aborted" (no lock needed)

  struct Link {
    void* sendComm = nullptr;
    void* recvComm = nullptr;
    NetHandle handle{};
    bool haveHandle = false;
    bool connecting = false;
    std::string recvError;  // the receive side of this link failed
  };

  static constexpr Schedule::StepId kNoStep = UINT32_MAX;
  // A receive posted on a collective connection, in net order. It lands in
  // a bounce buffer (slot >= 0) or, once the operation's first message from
  // that peer has been checked, straight in a copy step's destination.
  enum HolderState : uint8_t { kHolderPosted, kHolderArrived, kHolderFailed };
  struct Holder {
    int slot = -1;                    // bounce buffer index, or -1: direct
    Schedule::StepId step = kNoStep;  // direct: the step whose destination it is
    char* buf = nullptr;
    size_t capacity = 0;
    void* req = nullptr;
    HolderState state = kHolderPosted;
    size_t size = 0;
    uint64_t tag = 0;
    std::shared_ptr<Task> keep;       // direct: keeps the destination alive
  };

  struct P2PSendOp {
    std::shared_ptr<P2PTask> task;
    WireP2P hdr{};
    void* hdrReq = nullptr;
    void* payReq = nullptr;
    bool posted = false;
    int pendingReqs = 0;
    Clock::time_point deadline;
  };
  struct Unexpected {
    int64_t tag = 0;
    DataType dtype = DataType::kUInt8;
    uint64_t bytes = 0;
    std::vector<char> data;
    bool complete = false;
    uint64_t arrival = 0;  // arrival order over all peers (any-source matching)
    std::shared_ptr<P2PTask> waiter;
    Clock::time_point waiterDeadline;
  };
  struct PostedRecv {
    std::shared_ptr<P2PTask> task;
    Clock::time_point deadline;
  };
  enum P2PRecvState : uint8_t { kP2PIdle, kP2PHeader, kP2PPayload };

  struct Peer {
    Link links[kNumLinks];
    // Collective receives in net order (front = next message), and the
    // bounce buffers they may use.
    std::deque<Holder> holders;
    std::vector<AlignedBuf> slots;
    std::vector<int> freeSlots;
    // Point-to-point, send side: operations in issue order.
    std::deque<std::unique_ptr<P2PSendOp>> p2pSends;
    // Point-to-point, receive side.
    P2PRecvState p2pState = kP2PIdle;
    void* p2pReq = nullptr;
    WireP2P p2pHdr{};
    std::shared_ptr<P2PTask> p2pTarget;       // receive being filled
    Clock::time_point p2pTargetDeadline;
    std::string p2pTargetError;               // set when the message does not fit it
    std::vector<char> p2pDiscard;
    std::list<Unexpected> unexpected;
    std::list<Unexpected>::iterator p2pUx;    // unexpected entry being filled
    bool p2pIntoUx = false;
  };
  std::vector<Peer> peers;
  // Point-to-point receives waiting for a message, in posting order; a
  // message matches the oldest one for its source (or any source) and tag,
  // as MPI's ordering rule says.
  std::deque<PostedRecv> recvPosted;
  uint64_t arrivals = 0;

  // Collectives.
  // A send in flight. Device schedules first copy the chunk into a pinned
  // buffer (`pinned`, done when `ticket` is); req is null until the net has it.
  struct InflightSend {
    Schedule::StepId step;
    void* req = nullptr;
    void* pinned = nullptr;
    uint64_t ticket = 0;
    bool staged = false;  // the staging copy was seen done
  };
  // A received chunk being unpacked on the device; its bounce buffer is
  // busy until the ticket is done.
  struct Unpacking {
    Schedule::StepId step;
    int slot;
    uint64_t ticket;
  };
  struct PeerSteps {
    int peer;
    std::vector<Schedule::StepId> sends, recvs;
    size_t sendNext = 0, recvNext = 0;
    std::deque<InflightSend> inflight;
    std::deque<Unpacking> unpacking;
  };
  // Time during which a count of in-flight items was above zero.
  struct BusyClock {
    int inFlight = 0;
    Clock::time_point since;
    Clock::duration busy{};
    void add(int delta) {
      auto now = Clock::now();
      if (inFlight == 0 && delta > 0) since = now;
      inFlight += delta;
      if (inFlight == 0 && delta < 0) busy += now - since;
    }
    double us() const { return std::chrono::duration<double, std::micro>(busy).count(); }
  };
  struct ActiveColl {
    std::shared_ptr<CollectiveTask> task;
    Clock::time_point started = Clock::now();
    BusyClock staging, sending, unpacking;  // device schedules
    Schedule sched;
    uint32_t seq = 0;
    Clock::time_point deadline;
    std::chrono::milliseconds timeout{0};
    std::vector<uint32_t> waiting;
    std::vector<uint32_t> succStart;
    std::vector<Schedule::StepId> succ;
    std::vector<PeerSteps> peerSteps;
    size_t remaining = 0;
    bool finishing = false;     // device: finish() enqueued, waiting for finishTicket
    uint64_t finishTicket = 0;
    ActiveColl(int r, int n, size_t c) : sched(r, n, c) {}
  };
  std::deque<std::shared_ptr<CollectiveTask>> collQueue;
  std::unique_ptr<ActiveColl> active;
  uint32_t curSeq = 0;  // seq of the running collective, or of the next one
  // Set during a loop iteration when something waits on the device (a gate,
  // a staging copy, an unpack): the worker then polls instead of sleeping.
  bool pollDevice = false;
  DeviceStage* stage() const { return opts.stage.get(); }

  // TCPX_SPIN_US applies around short collectives only (the last one and
  // the running one under kSpinOpLimit): a wake-up (5-10 us) matters to an
  // op of tens of us, while a worker spinning through a bulk op competes
  // with the progress threads (measured in docs/performance.md).
  static constexpr std::chrono::microseconds kSpinOpLimit{500};
  Clock::duration lastCollTime{};
  bool spinAllowed(Clock::time_point now) const {
    if (active && now - active->started > kSpinOpLimit) return false;
    return lastCollTime < kSpinOpLimit;
  }

  // Sends of failed operations still in the net; the task reference keeps
  // their buffers alive until the net lets go.
  struct Draining {
    void* req;
    std::shared_ptr<Task> task;
    std::shared_ptr<std::string> payload;
    void* pinned = nullptr;  // staging chunk to give back to the stage
  };
  std::vector<Draining> draining;
  // ABORT messages waiting for a connection.
  struct PendingAbort {
    int peer;
    uint64_t tag;
    std::shared_ptr<std::string> payload;
  };
  std::vector<PendingAbort> pendingAborts;

  // ---------------------------------------------------------------------
  std::chrono::milliseconds taskTimeout(const Task& t) const {
    return t.timeout.count() > 0 ? t.timeout : opts.timeout;
  }

  std::string who() const {
    return strFormat("rank %d of group '%s'", opts.rank, opts.name.c_str());
  }

  void complete(const std::shared_ptr<Task>& t, tcpxResult_t code, const std::string& msg) {
    TaskResult r;
    r.code = code;
    r.message = msg;
    if (t->type == Task::Type::kRecv) r.srcRank = static_cast<const P2PTask&>(*t).srcRank;
    endDeviceOp(*t);
    if (t->onComplete) t->onComplete(r);
  }

  // The op kernel of a device task exits once everything given to it has run.
  void endDeviceOp(Task& t) {
    if (!t.deviceOp || !stage()) return;
    if (stage()->end(t.deviceOp) != tcpxSuccess)
      TCPX_WARN("%s: %s", who().c_str(), lastError().c_str());
    t.deviceOp = 0;
  }

  // Says once when the next collective has waited long for its GPU stream:
  // a hang there is outside the network (a stream blocked by the caller).
  Clock::time_point heldSince{};
  void warnIfHeldBack(const Task& t) {
    auto now = Clock::now();
    if (heldSince == Clock::time_point{}) heldSince = now;
    if (heldSince == Clock::time_point::max() || now - heldSince < std::chrono::seconds(10)) return;
    heldSince = Clock::time_point::max();
    TCPX_WARN("%s: %s has waited 10 s for the GPU to reach it (%s)", who().c_str(),
              t.description.c_str(),
              t.deviceOp && stage() ? stage()->describe(t.deviceOp).c_str() : "its gate is closed");
  }

  // A task may touch its buffers: its gate is open and its op kernel runs.
  bool mayStart(const Task& t) const {
    if (t.gate && !t.gate()) return false;
    return !t.deviceOp || !stage() || stage()->started(t.deviceOp);
  }

  // ---------------------------------------------------------------- queue
  bool takeIncoming() {
    std::deque<std::shared_ptr<Task>> batch;
    {
      std::lock_guard<std::mutex> lk(mu);
      batch.swap(incoming);
    }
    for (auto& t : batch) {
      if (t->type == Task::Type::kCollective) {
        collQueue.push_back(std::static_pointer_cast<CollectiveTask>(t));
      } else if (t->type == Task::Type::kSend) {
        auto p = std::static_pointer_cast<P2PTask>(t);
        auto op = std::make_unique<P2PSendOp>();
        op->task = p;
        op->hdr = WireP2P{p->tag, p->bytes, static_cast<uint32_t>(p->dtype), kP2PMagic};
        op->deadline = Clock::now() + taskTimeout(*p);
        peers[p->peer].p2pSends.push_back(std::move(op));
      } else {
        startRecv(std::static_pointer_cast<P2PTask>(t));
      }
    }
    return !batch.empty();
  }

  // ---------------------------------------------------------- connections
  // 1: connected; 0: in progress; -1: failed (the communicator aborted).
  int ensureSend(int p, int li) {
    Link& l = peers[p].links[li];
    if (l.sendComm) return 1;
    if (abortedLocal) return -1;
    if (!l.haveHandle) {
      std::vector<uint8_t> v;
      tcpxResult_t r = opts.store->get(handleKey(p), opts.timeout, &v);
      if (r != tcpxSuccess) {
        hardFail(tcpxRemoteError, strFormat("could not read rank %d's connection handle from the store: %s", p,
                           lastError().c_str()));
        return -1;
      }
      if (v.size() != kNetHandlePublicBytes) {
        hardFail(tcpxRemoteError, strFormat("rank %d's connection handle has %zu bytes, expected %d", p, v.size(),
                           kNetHandlePublicBytes));
        return -1;
      }
      memset(l.handle.bytes, 0, sizeof(l.handle.bytes));
      memcpy(l.handle.bytes, v.data(), v.size());
      l.haveHandle = true;
      l.connecting = true;
    }
    NetConnectInfo info;
    memcpy(info.secret, secret, kGroupSecretBytes);
    info.srcRank = static_cast<uint32_t>(opts.rank);
    info.dstRank = static_cast<uint32_t>(p);
    info.connIndex = static_cast<uint32_t>(li);
    info.nsocks = static_cast<uint32_t>(opts.nsocks);
    void* comm = nullptr;
    tcpxResult_t r = net->connect(opts.dev, &l.handle, info, &events, opts.timeout.count(), &comm);
    if (r != tcpxSuccess) {
      l.connecting = false;
      hardFail(tcpxRemoteError, strFormat("cannot connect to rank %d: %s", p, lastError().c_str()));
      return -1;
    }
    if (!comm) return 0;
    l.sendComm = comm;
    l.connecting = false;
    TCPX_INFO(kLogTransport, "%s: connected to rank %d (%s)", who().c_str(), p,
              li == kCollLink ? "collectives" : "point-to-point");
    return 1;
  }

  bool anyConnecting() const {
    for (const Peer& pr : peers)
      for (const Link& l : pr.links)
        if (l.connecting) return true;
    return false;
  }

  bool progressConnects() {
    bool progressed = false;
    for (size_t p = 0; p < peers.size() && !abortedLocal; p++)
      for (int li = 0; li < kNumLinks && !abortedLocal; li++)
        if (peers[p].links[li].connecting && ensureSend(static_cast<int>(p), li) == 1)
          progressed = true;
    // ABORT messages that were waiting for a connection.
    std::set<int> waitingPeers;
    for (const PendingAbort& pa : pendingAborts) waitingPeers.insert(pa.peer);
    for (int p : waitingPeers) {
      if (abortedLocal) break;
      if (ensureSend(p, kCollLink) != 1) continue;
      flushPendingAborts(p);
      progressed = true;
    }
    return progressed;
  }

  bool pollAccept() {
    bool progressed = false;
    while (listenComm && !abortedLocal) {
      void* rc = nullptr;
      NetConnectInfo pi;
      if (net->accept(listenComm, &events, &rc, &pi) != tcpxSuccess || !rc) break;
      progressed = true;
      int src = static_cast<int>(pi.srcRank);
      if (src < 0 || src >= opts.nranks || src == opts.rank || pi.connIndex >= kNumLinks ||
          peers[src].links[pi.connIndex].recvComm) {
        TCPX_WARN("%s: closing an unexpected connection (claims rank %u, index %u)", who().c_str(),
                  pi.srcRank, pi.connIndex);
        net->closeRecv(rc);
        continue;
      }
      Peer& peer = peers[src];
      peer.links[pi.connIndex].recvComm = rc;
      TCPX_INFO(kLogTransport, "%s: accepted %s connection from rank %d", who().c_str(),
                pi.connIndex == kCollLink ? "collective" : "point-to-point", src);
      if (pi.connIndex == kCollLink) {
        for (int i = 0; i < opts.buffers; i++) {
          peer.slots.push_back(allocBounce());
          if (!peer.slots.back()) {
            hardFail(tcpxSystemError, "out of memory for bounce buffers");
            return true;
          }
          peer.freeSlots.push_back(i);
        }
        while (static_cast<int>(peer.holders.size()) < opts.buffers) postTail(src);
      }
    }
    return progressed;
  }

  // A bounce buffer: pinned (from the stage) on a device communicator, so
  // that unpack kernels read it directly.
  AlignedBuf allocBounce() {
    if (!stage()) return allocAligned(chunkBytes);
    // The stage owns pinned memory; the no-op deleter leaves it there
    // (freeing pinned memory synchronises the device; the stage frees it last).
    return AlignedBuf(static_cast<char*>(stage()->allocHost(chunkBytes)), [](char*) {});
  }

  // Posts the next receive on p's collective connection. It lands straight
  // in the destination when the message it will match is known: the running
  // collective has already taken a checked message from p with the same
  // header (so everything behind it belongs to this operation, in schedule
  // order, and has its sizes), the step is a plain copy, and the step may
  // write now. Otherwise: a bounce buffer.
  void postTail(int p) {
    Peer& peer = peers[p];
    Link& l = peer.links[kCollLink];
    Holder h;
    if (active && !active->sched.stage) {
      const PeerSteps* ps = findSteps(p);
      size_t idx = ps ? ps->recvNext + peer.holders.size() : 0;
      if (ps && ps->recvNext > 0 && idx < ps->recvs.size()) {
        Schedule::StepId st = ps->recvs[idx];
        const Schedule::Step& step = active->sched.step(st);
        const Schedule::Step& checked = active->sched.step(ps->recvs[ps->recvNext - 1]);
        if (step.type == Schedule::StepType::kRecvCopy && active->waiting[st] == 0 &&
            step.op == checked.op) {
          h.step = st;
          h.buf = step.buf;
          h.capacity = step.bytes;
          h.keep = active->task;
        }
      }
    }
    if (h.step == kNoStep) {
      if (peer.freeSlots.empty()) return;  // cannot happen: one slot per holder at most
      h.slot = peer.freeSlots.back();
      peer.freeSlots.pop_back();
      h.buf = peer.slots[h.slot].get();
      h.capacity = chunkBytes;
    }
    if (!l.recvError.empty()) {
      h.state = kHolderFailed;
    } else {
      void* data = h.buf;
      size_t size = h.capacity;
      uint64_t tag = 0;
      void* mh = nullptr;
      if (net->irecv(l.recvComm, 1, &data, &size, &tag, &mh, &h.req) != tcpxSuccess || !h.req) {
        l.recvError = lastError().empty() ? "receive could not be posted" : lastError();
        h.req = nullptr;
        h.state = kHolderFailed;
      }
    }
    peer.holders.push_back(std::move(h));
  }

  // Retires the front holder (its message consumed or dropped) and posts the
  // next. keepSlot: its bounce buffer stays busy (an unpack reads it) until
  // releaseSlot.
  void popHead(int p, bool keepSlot = false) {
    Peer& peer = peers[p];
    Holder& h = peer.holders.front();
    if (h.slot >= 0 && !keepSlot) peer.freeSlots.push_back(h.slot);
    peer.holders.pop_front();
    postTail(p);
  }
  void releaseSlot(int p, int slot) {
    peers[p].freeSlots.push_back(slot);
    postTail(p);
  }

  const PeerSteps* findSteps(int p) const {
    if (!active) return nullptr;
    for (const PeerSteps& ps : active->peerSteps)
      if (ps.peer == p) return &ps;
    return nullptr;
  }

  // Tests the posted collective receives of every peer; drops leftovers of
  // failed operations at the front of each queue.
  bool pollArrivals() {
    bool progressed = false;
    for (size_t p = 0; p < peers.size() && !abortedLocal; p++) {
      Peer& peer = peers[p];
      Link& l = peer.links[kCollLink];
      if (!l.recvComm) continue;
      for (Holder& h : peer.holders) {
        if (h.state != kHolderPosted) continue;
        int done = 0;
        size_t size = 0;
        uint64_t tag = 0;
        tcpxResult_t r = net->test(h.req, &done, &size, &tag);
        if (r != tcpxSuccess) {
          h.req = nullptr;
          h.state = kHolderFailed;
          if (l.recvError.empty()) {
            l.recvError = lastError();
            TCPX_INFO(kLogTransport, "%s: collective connection from rank %zu lost: %s",
                      who().c_str(), p, l.recvError.c_str());
          }
          progressed = true;
          continue;
        }
        if (!done) continue;
        h.req = nullptr;
        h.state = kHolderArrived;
        h.size = size;
        h.tag = tag;
        progressed = true;
      }
      // Leftovers of operations this rank has finished (failed ones) are dropped.
      while (!peer.holders.empty() && peer.holders.front().state == kHolderArrived) {
        MsgHeader h = MsgHeader::unpack(peer.holders.front().tag);
        if (h.kind == OpKind::kP2P || seqDiff(h.seq, curSeq) >= 0) break;
        TCPX_TRACE(kLogTransport, "%s: dropping a leftover message of collective #%u from rank %zu",
                   who().c_str(), h.seq, p);
        popHead(static_cast<int>(p));
        progressed = true;
      }
    }
    return progressed;
  }

  // ----------------------------------------------------------- collectives
  void startCollective() {
    auto task = collQueue.front();
    collQueue.pop_front();
    active = std::make_unique<ActiveColl>(opts.rank, opts.nranks, chunkBytes);
    ActiveColl& a = *active;
    a.task = task;
    a.seq = curSeq;
    a.timeout = taskTimeout(*task);
    a.deadline = Clock::now() + a.timeout;
    // A task without an op kernel (a host-staged CUDA op, a failed one) runs
    // on host memory even on a CUDA communicator.
    a.sched.stage = task->deviceOp ? stage() : nullptr;
    if (a.sched.stage) a.sched.stage->bind(task->deviceOp);
    tcpxResult_t r = task->build ? task->build(&a.sched) : tcpxSuccess;
    if (r != tcpxSuccess) {
      // Peers may wait for this rank's part of the operation (or have sent
      // it theirs): one ABORT each, carrying the reason, fails it there too,
      // and every rank's sequence number moves on in step.
      std::string msg = lastError();
      if (a.sched.stage) a.sched.stage->synchronize();  // local device work of the build
      MsgHeader h;
      h.seq = a.seq;
      h.flags = kMsgAbort;
      auto payload = abortPayload(msg);
      for (int p = 0; p < opts.nranks; p++)
        if (p != opts.rank) queueAbort(p, h.pack(), payload);
      endActive(r, msg);
      return;
    }
    a.sched.setSeq(a.seq);
    size_t n = a.sched.numSteps();
    a.remaining = n;
    a.waiting.assign(n, 0);
    a.succStart.assign(n + 1, 0);
    for (auto& e : a.sched.edges()) {
      a.waiting[e.second]++;
      a.succStart[e.first + 1]++;
    }
    for (size_t i = 0; i < n; i++) a.succStart[i + 1] += a.succStart[i];
    a.succ.resize(a.sched.edges().size());
    std::vector<uint32_t> fill(a.succStart.begin(), a.succStart.end() - 1);
    for (auto& e : a.sched.edges()) a.succ[fill[e.first]++] = e.second;
    std::map<int, size_t> index;
    for (Schedule::StepId s = 0; s < n; s++) {
      const Schedule::Step& st = a.sched.step(s);
      if (st.peer < 0 || st.peer >= opts.nranks || st.peer == opts.rank ||
          st.bytes > chunkBytes) {
        std::string msg = strFormat(
            "internal error: %s built a step with peer %d and %zu bytes (chunk %zu)",
            task->description.c_str(), st.peer, st.bytes, chunkBytes);
        endActive(tcpxInternalError, msg);
        return;
      }
      auto it = index.find(st.peer);
      if (it == index.end()) {
        it = index.emplace(st.peer, a.peerSteps.size()).first;
        a.peerSteps.push_back(PeerSteps{st.peer, {}, {}, 0, 0, {}, {}});
      }
      PeerSteps& ps = a.peerSteps[it->second];
      if (st.type == Schedule::StepType::kSend) ps.sends.push_back(s);
      else ps.recvs.push_back(s);
    }
    TCPX_TRACE(kLogColl, "%s: start %s #%u: %zu steps with %zu peers", who().c_str(),
               task->description.c_str(), a.seq, n, a.peerSteps.size());
  }

  void stepDone(Schedule::StepId s) {
    ActiveColl& a = *active;
    a.remaining--;
    for (uint32_t i = a.succStart[s]; i < a.succStart[s + 1]; i++) a.waiting[a.succ[i]]--;
  }

  std::string collName() const {
    return strFormat("%s #%u", active->task->description.c_str(), active->seq);
  }

  bool progressCollective() {
    bool progressed = false;
    if (!active && !collQueue.empty()) {
      if (!mayStart(*collQueue.front())) {
        pollDevice = true;
        warnIfHeldBack(*collQueue.front());
        return progressed;
      }
      heldSince = {};
      startCollective();
      progressed = true;
    }
    if (!active || abortedLocal) return progressed;
    ActiveColl& a = *active;
    if (a.finishing) return pollFinishing() || progressed;
    DeviceStage* dev = a.sched.stage;
    const size_t maxInflight = static_cast<size_t>(opts.buffers);
    for (size_t pi = 0; pi < a.peerSteps.size(); pi++) {
      PeerSteps& ps = a.peerSteps[pi];
      int p = ps.peer;
      // Staged chunks whose device copy is done go to the net, in order.
      if (dev) {
        for (InflightSend& f : ps.inflight) {
          if (f.req) continue;
          bool ready = false;
          if (dev->query(f.ticket, &ready) != tcpxSuccess) {
            failOnDevice();
            return true;
          }
          if (!ready) {
            pollDevice = true;
            break;
          }
          if (!f.staged) {
            a.staging.add(-1);
            f.staged = true;
          }
          const Schedule::Step& st = a.sched.step(f.step);
          TCPX_TRACE(kLogTransport, "%s: step %u staged, sending %zu bytes to rank %d", who().c_str(),
                     f.step, st.bytes, p);
          if (!postSend(p, f.step, f.pinned, st.bytes, &f.req)) return true;
          if (!f.req) break;
          a.sending.add(1);
          progressed = true;
        }
      }
      // Sends the net has finished with.
      while (!ps.inflight.empty() && ps.inflight.front().req) {
        int done = 0;
        size_t size;
        uint64_t tag;
        tcpxResult_t r = net->test(ps.inflight.front().req, &done, &size, &tag);
        if (r != tcpxSuccess) {
          ps.inflight.front().req = nullptr;
          hardFail(tcpxRemoteError, strFormat("%s: sending to rank %d failed: %s", collName().c_str(), p,
                             lastError().c_str()));
          return true;
        }
        if (!done) break;
        TCPX_TRACE(kLogTransport, "%s: step %u sent (to rank %d)", who().c_str(),
                   ps.inflight.front().step, p);
        if (ps.inflight.front().pinned) {
          dev->freeHost(ps.inflight.front().pinned);
          a.sending.add(-1);
        }
        stepDone(ps.inflight.front().step);
        ps.inflight.pop_front();
        progressed = true;
      }
      // New sends, in order.
      while (ps.sendNext < ps.sends.size() && ps.inflight.size() < maxInflight) {
        Schedule::StepId s = ps.sends[ps.sendNext];
        if (a.waiting[s] > 0) break;
        int c = ensureSend(p, kCollLink);
        if (c < 0) return true;
        if (c == 0) break;
        if (!pendingAborts.empty()) flushPendingAborts(p);
        const Schedule::Step& st = a.sched.step(s);
        InflightSend f{s};
        if (dev) {
          // Device -> pinned on the comm stream; the net gets it once the ticket is done.
          f.pinned = dev->allocHost(chunkBytes);
          if (!f.pinned) {
            failActive(tcpxSystemError, strFormat("%s: out of pinned memory for staging", collName().c_str()));
            return true;
          }
          if (dev->copy(f.pinned, st.buf, st.bytes, /*serial=*/false) != tcpxSuccess ||
              dev->record(&f.ticket) != tcpxSuccess) {
            dev->freeHost(f.pinned);
            failOnDevice();
            return true;
          }
          a.staging.add(1);
          TCPX_TRACE(kLogTransport, "%s: step %u staging %zu bytes", who().c_str(), s, st.bytes);
          pollDevice = true;
        } else {
          if (!postSend(p, s, st.buf, st.bytes, &f.req)) return true;
          if (!f.req) break;
        }
        ps.inflight.push_back(f);
        ps.sendNext++;
        progressed = true;
      }
      // Receives, in order, from the bounce buffers.
      Peer& peer = peers[p];
      while (ps.recvNext < ps.recvs.size()) {
        Schedule::StepId s = ps.recvs[ps.recvNext];
        if (a.waiting[s] > 0) break;
        Link& l = peer.links[kCollLink];
        if (peer.holders.empty()) break;
        Holder& slot = peer.holders.front();
        if (slot.state != kHolderArrived) {
          if (!l.recvError.empty()) {
            hardFail(tcpxRemoteError, strFormat("%s: connection from rank %d lost: %s", collName().c_str(), p,
                               l.recvError.c_str()));
            return true;
          }
          break;
        }
        const Schedule::Step& st = a.sched.step(s);
        const MsgHeader& want = a.sched.headerOf(s);
        MsgHeader h = MsgHeader::unpack(slot.tag);
        std::string err;
        tcpxResult_t code = tcpxInvalidUsage;
        if (h.kind == OpKind::kP2P) {
          hardFail(tcpxRemoteError, strFormat("protocol error: point-to-point message on the collective "
                             "connection from rank %d", p));
          return true;
        } else if (seqDiff(h.seq, a.seq) > 0) {
          err = strFormat(
              "collective mismatch with rank %d in %s: rank %d has moved on to collective #%u "
              "while this rank still expects data for this one (the ranks issued different "
              "collectives or different roots)",
              p, collName().c_str(), p, h.seq);
        } else if (h.flags & kMsgAbort) {
          std::string reason(slot.buf, std::min(slot.size, slot.capacity));
          err = strFormat("%s failed on a peer: %s", collName().c_str(), reason.c_str());
          code = tcpxRemoteError;
        } else if (!h.sameOp(want)) {
          err = strFormat("collective mismatch with rank %d in %s: %s", p, collName().c_str(),
                          describeMismatch(want, h).c_str());
        } else if (slot.size != st.bytes) {
          err = strFormat(
              "size mismatch with rank %d in %s: received %zu bytes where this rank expects %zu "
              "bytes; the tensors differ in size between ranks",
              p, collName().c_str(), slot.size, st.bytes);
        }
        if (!err.empty()) {
          failActive(code, err);
          return true;
        }
        if (slot.slot < 0) {
          // Received in place; by construction it is this very step's message.
          if (slot.step != s) {
            hardFail(tcpxInternalError,
                     strFormat("%s: a direct receive from rank %d matched step %u, expected %u",
                               collName().c_str(), p, slot.step, s));
            return true;
          }
        } else if (dev) {
          // The unpack stage: copy or reduce into place on the comm stream;
          // the step is done (and the bounce buffer free) once it has run.
          TCPX_TRACE(kLogTransport, "%s: step %u arrived (from rank %d), unpacking", who().c_str(), s, p);
          Unpacking u{s, slot.slot, 0};
          if (dev->unpack(st.buf, st.own, slot.buf, st.bytes,
                          st.type == Schedule::StepType::kRecvReduce, want.dtype,
                          want.redop) != tcpxSuccess ||
              dev->record(&u.ticket) != tcpxSuccess) {
            failOnDevice();
            return true;
          }
          ps.unpacking.push_back(u);
          a.unpacking.add(1);
          ps.recvNext++;
          popHead(p, /*keepSlot=*/true);
          pollDevice = true;
          progressed = true;
          continue;
        } else if (st.type == Schedule::StepType::kRecvCopy) {
          if (st.bytes) memcpy(st.buf, slot.buf, st.bytes);
        } else {
          size_t esz = dataTypeSize(want.dtype);
          if (st.own && st.bytes) memcpy(st.buf, st.own, st.bytes);
          a.sched.reduceFn(st.buf, slot.buf, st.bytes / esz, want.dtype, want.redop);
        }
        ps.recvNext++;
        popHead(p);
        stepDone(s);
        progressed = true;
      }
      // Unpacks that have run.
      while (!ps.unpacking.empty()) {
        bool ready = false;
        if (dev->query(ps.unpacking.front().ticket, &ready) != tcpxSuccess) {
          failOnDevice();
          return true;
        }
        if (!ready) {
          pollDevice = true;
          break;
        }
        Unpacking u = ps.unpacking.front();
        ps.unpacking.pop_front();
        a.unpacking.add(-1);
        TCPX_TRACE(kLogTransport, "%s: step %u unpacked (from rank %d)", who().c_str(), u.step, p);
        releaseSlot(p, u.slot);
        stepDone(u.step);
        progressed = true;
      }
    }
    if (active && active->remaining == 0) finishActive();
    return progressed;
  }

  // A stage call of the running collective failed (lastError() says how).
  void failOnDevice() {
    failActive(tcpxUnhandledCudaError, strFormat("%s: %s", collName().c_str(), lastError().c_str()));
  }

  // Posts a collective send of `bytes` at `buf` for step s; false if the
  // communicator aborted (req stays null when the net is busy: try again).
  bool postSend(int p, Schedule::StepId s, void* buf, size_t bytes, void** req) {
    ActiveColl& a = *active;
    tcpxResult_t r = net->isend(peers[p].links[kCollLink].sendComm, buf, bytes,
                                a.sched.headerOf(s).pack(), nullptr, req);
    if (r != tcpxSuccess) {
      *req = nullptr;
      hardFail(tcpxRemoteError, strFormat("%s: sending to rank %d failed: %s", collName().c_str(), p,
                                          lastError().c_str()));
      return false;
    }
    return true;
  }

  // Every step is done: run finish(); a device schedule completes only once
  // the comm stream has run everything it enqueued (finish() may add work).
  void finishActive() {
    ActiveColl& a = *active;
    tcpxResult_t r = a.task->finish ? a.task->finish(a.sched.stage) : tcpxSuccess;
    if (r == tcpxSuccess && a.sched.stage) {
      r = a.sched.stage->record(&a.finishTicket);
      if (r == tcpxSuccess) {
        a.finishing = true;
        pollFinishing();
        return;
      }
    }
    std::string msg = r == tcpxSuccess ? "" : lastError();
    if (r != tcpxSuccess && a.sched.stage) a.sched.stage->synchronize();
    endActive(r, msg);
  }

  // The running collective is over: the next one may start.
  void endActive(tcpxResult_t r, const std::string& msg) {
    auto task = active->task;
    lastCollTime = Clock::now() - active->started;
    active.reset();
    curSeq++;
    complete(task, r, msg);
  }

  bool pollFinishing() {
    ActiveColl& a = *active;
    bool ready = false;
    tcpxResult_t r = a.sched.stage->query(a.finishTicket, &ready);
    if (r == tcpxSuccess && !ready) {
      pollDevice = true;
      return false;
    }
    std::string msg = r == tcpxSuccess ? "" : lastError();
    if (r == tcpxSuccess) {
      double wall = std::chrono::duration<double, std::micro>(Clock::now() - a.started).count();
      TCPX_TRACE(kLogColl,
                 "%s: %s done in %.0f us: staging copies busy %.0f us, sends %.0f us, unpacks %.0f us",
                 who().c_str(), collName().c_str(), wall, a.staging.us(), a.sending.us(),
                 a.unpacking.us());
      std::lock_guard<std::mutex> lk(mu);
      breakdown.ops++;
      breakdown.wallUs += wall;
      breakdown.stagingUs += a.staging.us();
      breakdown.netUs += a.sending.us();
      breakdown.unpackUs += a.unpacking.us();
    }
    endActive(r, msg);
    return true;
  }

  // The running collective failed on this rank. Every peer still expecting
  // messages from this rank in this operation gets exactly that many ABORT
  // messages (the first carries the reason): its receives, some of which may
  // already point into its tensors, then match one for one and the streams
  // stay in step. Other connected peers get one ABORT, in case they see the
  // operation differently. In-flight sends move to the draining list, which
  // keeps the task (and its tensors) alive until the net lets go.
  void failActive(tcpxResult_t code, const std::string& msg) {
    ActiveColl& a = *active;
    TCPX_INFO(kLogColl, "%s: %s", who().c_str(), msg.c_str());
    auto task = a.task;
    auto payload = abortPayload(msg);
    static const auto kEmpty = std::make_shared<std::string>();
    MsgHeader h = a.sched.header;
    h.flags = kMsgAbort;
    std::set<int> told;
    // Device work in flight (staging copies, unpacks) must finish before the
    // task's buffers and the bounce buffers it reads can be let go.
    if (a.sched.stage) a.sched.stage->synchronize();
    for (auto& ps : a.peerSteps) {
      size_t unposted = 0;
      for (auto& f : ps.inflight) {
        if (f.req) {
          draining.push_back({f.req, task, nullptr, f.pinned});
        } else {
          unposted++;
          a.sched.stage->freeHost(f.pinned);
        }
      }
      ps.inflight.clear();
      for (auto& u : ps.unpacking) releaseSlot(ps.peer, u.slot);
      ps.unpacking.clear();
      size_t remaining = ps.sends.size() - ps.sendNext + unposted;
      for (size_t i = 0; i < remaining; i++) queueAbort(ps.peer, h.pack(), i == 0 ? payload : kEmpty);
      ps.sendNext = ps.sends.size();
      if (remaining) told.insert(ps.peer);
    }
    for (size_t p = 0; p < peers.size(); p++)
      if (peers[p].links[kCollLink].sendComm && !told.count(static_cast<int>(p)))
        queueAbort(static_cast<int>(p), h.pack(), payload);
    endActive(code, msg);
  }

  // The reason an ABORT carries: "rank R: why", cut to fit a bounce buffer.
  std::shared_ptr<std::string> abortPayload(const std::string& why) const {
    auto payload = std::make_shared<std::string>(strFormat("rank %d: %s", opts.rank, why.c_str()));
    if (payload->size() > chunkBytes) payload->resize(chunkBytes);
    return payload;
  }

  void queueAbort(int p, uint64_t tag, const std::shared_ptr<std::string>& payload) {
    if (peers[p].links[kCollLink].sendComm && !hasPendingAborts(p)) {
      postAbort(p, tag, payload, nullptr);
      return;
    }
    pendingAborts.push_back({p, tag, payload});
    ensureSend(p, kCollLink);  // starts connecting if needed
  }

  bool hasPendingAborts(int p) const {
    for (const PendingAbort& pa : pendingAborts)
      if (pa.peer == p) return true;
    return false;
  }

  // ABORTs queued for p go out before anything else sent to p.
  void flushPendingAborts(int p) {
    for (size_t i = 0; i < pendingAborts.size();) {
      if (pendingAborts[i].peer != p) {
        i++;
        continue;
      }
      postAbort(p, pendingAborts[i].tag, pendingAborts[i].payload, nullptr);
      pendingAborts.erase(pendingAborts.begin() + static_cast<long>(i));
    }
  }

  void postAbort(int p, uint64_t tag, const std::shared_ptr<std::string>& payload,
                 const std::shared_ptr<Task>& task) {
    void* req = nullptr;
    if (net->isend(peers[p].links[kCollLink].sendComm, payload->data(), payload->size(), tag,
                   nullptr, &req) == tcpxSuccess &&
        req) {
      draining.push_back({req, task, payload});
    }
  }

  bool progressDraining() {
    bool progressed = false;
    for (size_t i = 0; i < draining.size();) {
      int done = 0;
      size_t size;
      uint64_t tag;
      tcpxResult_t r = net->test(draining[i].req, &done, &size, &tag);
      if (r != tcpxSuccess || done) {
        if (draining[i].pinned) stage()->freeHost(draining[i].pinned);
        draining[i] = draining.back();
        draining.pop_back();
        progressed = true;
      } else {
        i++;
      }
    }
    return progressed;
  }

  // ------------------------------------------------------- point-to-point
  static std::string p2pMismatch(const P2PTask& t, int peer, int64_t tag, DataType dtype,
                                 uint64_t bytes) {
    if (bytes != t.bytes)
      return strFormat(
          "size mismatch in recv from rank %d (tag %lld): the peer sent %llu bytes, this recv "
          "expects %zu bytes",
          peer, static_cast<long long>(tag), static_cast<unsigned long long>(bytes), t.bytes);
    if (dtype != t.dtype)
      return strFormat("dtype mismatch in recv from rank %d (tag %lld): the peer sent %s, this "
                       "recv expects %s",
                       peer, static_cast<long long>(tag), dataTypeName(dtype),
                       dataTypeName(t.dtype));
    return "";
  }

  void startRecv(const std::shared_ptr<P2PTask>& t) {
    // A message that arrived before this receive? From a given source the
    // first with the tag; from any source the earliest arrival.
    int from = -1;
    std::list<Unexpected>::iterator found;
    for (size_t p = 0; p < peers.size(); p++) {
      if (t->peer >= 0 && static_cast<int>(p) != t->peer) continue;
      for (auto it = peers[p].unexpected.begin(); it != peers[p].unexpected.end(); ++it) {
        if (it->tag != t->tag || it->waiter) continue;
        if (from < 0 || it->arrival < found->arrival) {
          from = static_cast<int>(p);
          found = it;
        }
        break;
      }
    }
    if (from >= 0) {
      t->srcRank = from;
      if (!found->complete) {
        found->waiter = t;
        found->waiterDeadline = Clock::now() + taskTimeout(*t);
        return;
      }
      finishFromUnexpected(from, t, *found);
      peers[from].unexpected.erase(found);
      return;
    }
    if (t->peer >= 0) {
      const std::string& err = peers[t->peer].links[kP2PLink].recvError;
      if (!err.empty()) {
        complete(t, tcpxRemoteError,
                 strFormat("recv from rank %d: connection lost: %s", t->peer, err.c_str()));
        return;
      }
    }
    recvPosted.push_back({t, Clock::now() + taskTimeout(*t)});
  }

  static std::string sourceName(int peer) {
    return peer >= 0 ? strFormat("rank %d", peer) : std::string("any rank");
  }

  void finishFromUnexpected(int p, const std::shared_ptr<P2PTask>& t, Unexpected& u) {
    std::string err = p2pMismatch(*t, p, u.tag, u.dtype, u.bytes);
    if (!err.empty()) {
      complete(t, tcpxInvalidUsage, err);
      return;
    }
    if (u.bytes) memcpy(t->data, u.data.data(), u.bytes);
    complete(t, tcpxSuccess, "");
  }

  bool progressP2PSends(int p) {
    bool progressed = false;
    Peer& peer = peers[p];
    for (auto& op : peer.p2pSends) {
      if (op->posted) continue;
      if (!mayStart(*op->task)) {
        pollDevice = true;
        break;  // later sends to p wait behind it: order is kept
      }
      int c = ensureSend(p, kP2PLink);
      if (c <= 0) break;  // connecting (or aborted); later ops wait behind it
      void* sc = peer.links[kP2PLink].sendComm;
      if (net->isend(sc, &op->hdr, sizeof(op->hdr), MsgHeader{0, OpKind::kP2P}.pack(), nullptr,
                     &op->hdrReq) != tcpxSuccess ||
          (op->task->bytes &&
           net->isend(sc, op->task->data, op->task->bytes, MsgHeader{0, OpKind::kP2P}.pack(),
                      nullptr, &op->payReq) != tcpxSuccess)) {
        hardFail(tcpxRemoteError, strFormat("send to rank %d failed: %s", p, lastError().c_str()));
        return true;
      }
      op->posted = true;
      op->pendingReqs = op->task->bytes ? 2 : 1;
      progressed = true;
    }
    while (!peer.p2pSends.empty() && peer.p2pSends.front()->posted) {
      P2PSendOp& op = *peer.p2pSends.front();
      for (void** req : {&op.hdrReq, &op.payReq}) {
        if (!*req) continue;
        int done = 0;
        size_t size;
        uint64_t tag;
        if (net->test(*req, &done, &size, &tag) != tcpxSuccess) {
          *req = nullptr;
          hardFail(tcpxRemoteError, strFormat("send to rank %d failed: %s", p, lastError().c_str()));
          return true;
        }
        if (done) {
          *req = nullptr;
          op.pendingReqs--;
        }
      }
      if (op.pendingReqs > 0) break;
      auto task = op.task;
      peer.p2pSends.pop_front();
      complete(task, tcpxSuccess, "");
      progressed = true;
    }
    return progressed;
  }

  void p2pLinkFailed(int p, const std::string& err) {
    Peer& peer = peers[p];
    peer.links[kP2PLink].recvError = err;
    // Receives from p fail; any-source ones may still be served by others.
    for (auto it = recvPosted.begin(); it != recvPosted.end();) {
      if (it->task->peer != p) {
        ++it;
        continue;
      }
      auto t = it->task;
      it = recvPosted.erase(it);
      complete(t, tcpxRemoteError,
               strFormat("recv from rank %d: connection lost: %s", p, err.c_str()));
    }
    if (peer.p2pTarget) {
      auto t = peer.p2pTarget;
      peer.p2pTarget.reset();
      complete(t, tcpxRemoteError,
               strFormat("recv from rank %d: connection lost: %s", p, err.c_str()));
    }
    // Messages that arrived whole stay receivable (the peer may have sent
    // them and closed in order); partly arrived ones are lost.
    for (auto it = peer.unexpected.begin(); it != peer.unexpected.end();) {
      if (it->complete) {
        ++it;
        continue;
      }
      if (it->waiter)
        complete(it->waiter, tcpxRemoteError,
                 strFormat("recv from rank %d: connection lost: %s", p, err.c_str()));
      it = peer.unexpected.erase(it);
    }
    peer.p2pIntoUx = false;
    peer.p2pState = kP2PIdle;
  }

  bool progressP2PRecv(int p) {
    Peer& peer = peers[p];
    Link& l = peer.links[kP2PLink];
    if (!l.recvComm || !l.recvError.empty()) return false;
    bool progressed = false;
    for (int iter = 0; iter < 64; iter++) {
      if (peer.p2pState == kP2PIdle) {
        void* data = &peer.p2pHdr;
        size_t size = sizeof(WireP2P);
        uint64_t tag = 0;
        void* mh = nullptr;
        if (net->irecv(l.recvComm, 1, &data, &size, &tag, &mh, &peer.p2pReq) != tcpxSuccess) {
          p2pLinkFailed(p, lastError());
          return true;
        }
        if (!peer.p2pReq) return progressed;
        peer.p2pState = kP2PHeader;
      }
      int done = 0;
      size_t size = 0;
      uint64_t tag = 0;
      if (net->test(peer.p2pReq, &done, &size, &tag) != tcpxSuccess) {
        peer.p2pReq = nullptr;
        p2pLinkFailed(p, lastError());
        return true;
      }
      if (!done) return progressed;
      peer.p2pReq = nullptr;
      progressed = true;
      if (peer.p2pState == kP2PHeader) {
        const WireP2P& h = peer.p2pHdr;
        if (size != sizeof(WireP2P) || h.magic != kP2PMagic || h.dtype >= kNumDataTypes) {
          hardFail(tcpxRemoteError, strFormat("protocol error: bad point-to-point header from rank %d", p));
          return true;
        }
        DataType dtype = static_cast<DataType>(h.dtype);
        // Match the oldest posted receive for this source (or any) and tag.
        peer.p2pTarget.reset();
        peer.p2pTargetError.clear();
        peer.p2pIntoUx = false;
        for (auto it = recvPosted.begin(); it != recvPosted.end(); ++it) {
          if (it->task->tag != h.tag || (it->task->peer >= 0 && it->task->peer != p)) continue;
          peer.p2pTarget = it->task;
          peer.p2pTarget->srcRank = p;
          peer.p2pTargetDeadline = it->deadline;
          recvPosted.erase(it);
          break;
        }
        void* dst = nullptr;
        if (peer.p2pTarget) {
          peer.p2pTargetError = p2pMismatch(*peer.p2pTarget, p, h.tag, dtype, h.bytes);
          if (peer.p2pTargetError.empty()) {
            dst = peer.p2pTarget->data;
          } else {
            peer.p2pDiscard.resize(h.bytes);
            dst = peer.p2pDiscard.data();
          }
        } else {
          peer.unexpected.emplace_back();
          peer.p2pUx = std::prev(peer.unexpected.end());
          peer.p2pIntoUx = true;
          peer.p2pUx->tag = h.tag;
          peer.p2pUx->arrival = arrivals++;
          peer.p2pUx->dtype = dtype;
          peer.p2pUx->bytes = h.bytes;
          peer.p2pUx->data.resize(h.bytes);
          dst = peer.p2pUx->data.data();
        }
        if (h.bytes == 0) {
          finishP2PMessage(p);
          peer.p2pState = kP2PIdle;
          continue;
        }
        size_t bytes = h.bytes;
        uint64_t t = 0;
        void* mh = nullptr;
        if (net->irecv(l.recvComm, 1, &dst, &bytes, &t, &mh, &peer.p2pReq) != tcpxSuccess ||
            !peer.p2pReq) {
          p2pLinkFailed(p, lastError());
          return true;
        }
        peer.p2pState = kP2PPayload;
      } else {
        finishP2PMessage(p);
        peer.p2pState = kP2PIdle;
      }
    }
    return progressed;
  }

  void finishP2PMessage(int p) {
    Peer& peer = peers[p];
    if (peer.p2pTarget) {
      auto t = peer.p2pTarget;
      peer.p2pTarget.reset();
      if (peer.p2pTargetError.empty()) complete(t, tcpxSuccess, "");
      else complete(t, tcpxInvalidUsage, peer.p2pTargetError);
      peer.p2pDiscard.clear();
      peer.p2pDiscard.shrink_to_fit();
      return;
    }
    if (peer.p2pIntoUx) {
      // A receive that came while the payload was arriving waits on the
      // entry (startRecv); progressP2P hands it over.
      peer.p2pUx->complete = true;
      peer.p2pIntoUx = false;
    }
  }

  bool progressP2P() {
    bool progressed = false;
    for (size_t p = 0; p < peers.size() && !abortedLocal; p++) {
      Peer& peer = peers[p];
      if (!peer.p2pSends.empty()) progressed |= progressP2PSends(static_cast<int>(p));
      if (abortedLocal) break;
      progressed |= progressP2PRecv(static_cast<int>(p));
      // Receives attached to unexpected messages still arriving.
      for (auto it = peer.unexpected.begin(); it != peer.unexpected.end();) {
        if (it->complete && it->waiter) {
          auto t = it->waiter;
          it->waiter.reset();
          finishFromUnexpected(static_cast<int>(p), t, *it);
          it = peer.unexpected.erase(it);
          progressed = true;
        } else {
          ++it;
        }
      }
    }
    return progressed;
  }

  // --------------------------------------------------------------- timeouts
  std::string waitingFor() const {
    const ActiveColl& a = *active;
    for (const PeerSteps& ps : a.peerSteps) {
      if (ps.recvNext < ps.recvs.size() && a.waiting[ps.recvs[ps.recvNext]] == 0)
        return strFormat("waiting for data from rank %d", ps.peer);
      if (ps.sendNext < ps.sends.size() && a.waiting[ps.sends[ps.sendNext]] == 0)
        return peers[ps.peer].links[kCollLink].sendComm
                   ? strFormat("waiting to send to rank %d", ps.peer)
                   : strFormat("waiting to connect to rank %d", ps.peer);
      if (!ps.inflight.empty()) return strFormat("waiting for a send to rank %d to drain", ps.peer);
      if (!ps.unpacking.empty()) return strFormat("waiting for the GPU to unpack data from rank %d", ps.peer);
    }
    if (a.sched.stage && a.task->deviceOp)
      return strFormat("waiting for peers or the GPU: %s", a.sched.stage->describe(a.task->deviceOp).c_str());
    return "waiting for peers";
  }

  void checkTimeouts() {
    auto now = Clock::now();
    if (active && now > active->deadline) {
      hardFail(tcpxTimeout, strFormat("%s timed out after %lld ms (%s); the communicator is aborted",
                         collName().c_str(), static_cast<long long>(active->timeout.count()),
                         waitingFor().c_str()));
      return;
    }
    expireRecvs(now);
    for (size_t p = 0; p < peers.size() && !abortedLocal; p++) {
      Peer& peer = peers[p];
      for (auto& op : peer.p2pSends) {
        if (now > op->deadline) {
          hardFail(tcpxTimeout, strFormat("send to rank %zu (tag %lld, %zu bytes) timed out; the communicator "
                             "is aborted",
                             p, static_cast<long long>(op->task->tag), op->task->bytes));
          return;
        }
      }
      if (peer.p2pTarget && now > peer.p2pTargetDeadline) {
        hardFail(tcpxTimeout, strFormat("recv from rank %zu (tag %lld) timed out while its data was arriving; "
                           "the communicator is aborted",
                           p, static_cast<long long>(peer.p2pTarget->tag)));
        return;
      }
      for (auto& u : peer.unexpected) {
        if (u.waiter && now > u.waiterDeadline) {
          hardFail(tcpxTimeout, strFormat("recv from rank %zu (tag %lld) timed out while its data was "
                             "arriving; the communicator is aborted",
                             p, static_cast<long long>(u.tag)));
          return;
        }
      }
    }
  }

  // A receive that no message has matched yet can simply fail.
  void expireRecvs(Clock::time_point now) {
    for (auto it = recvPosted.begin(); it != recvPosted.end();) {
      if (now > it->deadline) {
        auto t = it->task;
        it = recvPosted.erase(it);
        complete(t, tcpxTimeout,
                 strFormat("recv from %s (tag %lld, %zu bytes) timed out after %lld ms: "
                           "no matching send arrived",
                           sourceName(t->peer).c_str(), static_cast<long long>(t->tag), t->bytes,
                           static_cast<long long>(taskTimeout(*t).count())));
      } else {
        ++it;
      }
    }
  }

  Clock::time_point nextWake() const {
    auto now = Clock::now();
    auto t = now + kMaxSleep;
    if (active) t = std::min(t, active->deadline);
    for (const Peer& peer : peers) {
      for (auto& op : peer.p2pSends) t = std::min(t, op->deadline);
      if (peer.p2pTarget) t = std::min(t, peer.p2pTargetDeadline);
    }
    for (auto& pr : recvPosted) t = std::min(t, pr.deadline);
    if (anyConnecting() || !pendingAborts.empty())
      t = std::min(t, now + std::chrono::duration_cast<Clock::duration>(kConnectPoll));
    return t;
  }

  bool idle() const {
    if (active || !collQueue.empty()) return false;
    for (const Peer& peer : peers)
      if (!peer.p2pSends.empty() || peer.p2pTarget) return false;
    return true;
  }

  // --------------------------------------------------------------- aborting
  // Unrecoverable: close every connection (peers notice at once), fail all work.
  void hardFail(tcpxResult_t code, const std::string& why) {
    if (abortedLocal) return;
    abortedLocal = true;
    TCPX_WARN("%s aborted: %s", who().c_str(), why.c_str());
    // No task may complete while the GPU still works on its buffers.
    if (stage()) stage()->synchronize();
    closeConnections();
    {
      // Before any callback runs: an enqueue() from a callback (or from a
      // thread it wakes) must fail at once, not queue a task nothing serves.
      std::lock_guard<std::mutex> lk(mu);
      aborted = why;
    }
    failEverything(code, strFormat("%s (TCPX communicator of %s aborted)", why.c_str(),
                                   who().c_str()));
    std::lock_guard<std::mutex> lk(mu);
    stopped.notify_all();
  }

  // Closes every comm, then frees the requests they failed.
  void closeConnections() {
    for (size_t p = 0; p < peers.size(); p++) {
      Peer& peer = peers[p];
      for (Link& l : peer.links) {
        if (l.connecting) net->connectAbandon(&l.handle);
        l.connecting = false;
        if (l.sendComm) net->closeSend(l.sendComm);
        if (l.recvComm) net->closeRecv(l.recvComm);
        l.sendComm = l.recvComm = nullptr;
        if (l.recvError.empty()) l.recvError = "closed";
      }
    }
    if (listenComm) net->closeListen(listenComm);
    listenComm = nullptr;
    auto drop = [&](void*& req) {
      if (!req) return;
      int done;
      size_t s;
      uint64_t t;
      net->test(req, &done, &s, &t);
      req = nullptr;
    };
    for (Peer& peer : peers) {
      for (Holder& h : peer.holders) drop(h.req);
      peer.holders.clear();
      peer.slots.clear();
      peer.freeSlots.clear();
      drop(peer.p2pReq);
      for (auto& op : peer.p2pSends) {
        drop(op->hdrReq);
        drop(op->payReq);
      }
    }
    if (active)
      for (auto& ps : active->peerSteps)
        for (auto& f : ps.inflight) {
          drop(f.req);
          if (f.pinned) stage()->freeHost(f.pinned);
          f.pinned = nullptr;
        }
    for (auto& d : draining) {
      drop(d.req);
      if (d.pinned) stage()->freeHost(d.pinned);
    }
    draining.clear();
    pendingAborts.clear();
  }

  void failEverything(tcpxResult_t code, const std::string& msg) {
    std::vector<std::shared_ptr<Task>> tasks;
    if (active) {
      tasks.push_back(active->task);
      active.reset();
    }
    for (auto& t : collQueue) tasks.push_back(t);
    collQueue.clear();
    for (auto& pr : recvPosted) tasks.push_back(pr.task);
    recvPosted.clear();
    for (Peer& peer : peers) {
      for (auto& op : peer.p2pSends) tasks.push_back(op->task);
      peer.p2pSends.clear();
      if (peer.p2pTarget) tasks.push_back(peer.p2pTarget);
      peer.p2pTarget.reset();
      for (auto& u : peer.unexpected)
        if (u.waiter) tasks.push_back(u.waiter);
      peer.unexpected.clear();
    }
    {
      std::lock_guard<std::mutex> lk(mu);
      for (auto& t : incoming) tasks.push_back(t);
      incoming.clear();
    }
    for (auto& t : tasks) complete(t, code, msg);
  }

  // ---------------------------------------------------------------- worker
  // dumpState(): the worker's last loop, and a request to log its state.
  std::atomic<int64_t> lastLoopNs{0};
  std::atomic<bool> dumpRequested{false};

  void logState() {
    std::string s = active ? strFormat("running %s (%s)", collName().c_str(), waitingFor().c_str())
                           : std::string("no collective running");
    if (!collQueue.empty()) {
      const Task& t = *collQueue.front();
      s += strFormat("; %zu queued, the next: %s (%s)", collQueue.size(), t.description.c_str(),
                     mayStart(t) ? "may start"
                     : t.deviceOp && stage() ? stage()->describe(t.deviceOp).c_str()
                                             : "its gate is closed");
    }
    TCPX_WARN("%s: state: %s", who().c_str(), s.c_str());
  }

  void loop() {
    pthread_setname_np(pthread_self(), "tcpx-worker");
    auto lastProgress = Clock::now();
    while (true) {
      lastLoopNs = Clock::now().time_since_epoch().count();
      if (dumpRequested.exchange(false)) logState();
      uint64_t seen = events.value();
      std::string abortReq;
      {
        std::lock_guard<std::mutex> lk(mu);
        abortReq = abortRequest;
      }
      if (!abortReq.empty() && !abortedLocal) hardFail(tcpxRemoteError, abortReq);
      pollDevice = false;
      bool progressed = takeIncoming();
      if (!abortedLocal) {
        progressed |= pollAccept();
        progressed |= progressConnects();
        progressed |= pollArrivals();
        progressed |= progressCollective();
        if (!abortedLocal) progressed |= progressP2P();
      }
      if (!abortedLocal) progressed |= progressDraining();
      if (!abortedLocal) checkTimeouts();
      bool stop;
      {
        std::lock_guard<std::mutex> lk(mu);
        stop = stopping && incoming.empty() && (abortedLocal || idle());
      }
      if (stop) break;
      auto now = Clock::now();
      if (progressed) {
        lastProgress = now;
        continue;
      }
      if (opts.spinUs > 0 && now - lastProgress < std::chrono::microseconds(opts.spinUs) &&
          spinAllowed(now))
        continue;
      if (pollDevice) {
        // Waiting for the GPU: nothing will bump `events` when it is done.
        std::this_thread::yield();
        continue;
      }
      events.waitUntil(seen, nextWake());
    }
    // Shutting down: receives nothing can satisfy any more fail; then close.
    std::deque<PostedRecv> posted;
    posted.swap(recvPosted);
    for (auto& pr : posted)
      complete(pr.task, tcpxInvalidUsage,
               strFormat("recv from %s (tag %lld) cancelled: the process group was shut "
                         "down before a matching send arrived",
                         sourceName(pr.task->peer).c_str(), static_cast<long long>(pr.task->tag)));
    closeConnections();
    std::lock_guard<std::mutex> lk(mu);
    workerDone = true;
    stopped.notify_all();
  }
};

// ---------------------------------------------------------------------------

Communicator::Communicator(const CommOptions& opts)
    : opts_(opts), chunkBytes_(opts.chunkBytes), impl_(new Impl()) {}

tcpxResult_t Communicator::create(const CommOptions& opts, std::unique_ptr<Communicator>* out) {
  if (opts.nranks < 1 || opts.rank < 0 || opts.rank >= opts.nranks)
    TCPX_ERR(tcpxInvalidArgument, "rank %d / world size %d are invalid", opts.rank, opts.nranks);
  if (!opts.store || !opts.net) TCPX_ERR(tcpxInvalidArgument, "a store and a net are required");
  if (opts.buffers < 2) TCPX_ERR(tcpxInvalidArgument, "at least 2 bounce buffers are required");
  std::unique_ptr<Communicator> comm(new Communicator(opts));
  TCPX_CHECK(comm->bootstrap());
  if (opts.stage) {
    // Bounce buffers and send staging chunks of up to 16 peers (every peer
    // of a node-sized group: all_to_all talks to all), now: pinned memory
    // allocated later, on the worker, may block it behind a caller's
    // synchronous CUDA call (transport/stage.h).
    int peers = std::min(opts.nranks - 1, 16);
    TCPX_CHECK(opts.stage->reserveHost(comm->chunkBytes_, peers * opts.buffers * 2));
  }
  *out = std::move(comm);
  return tcpxSuccess;
}

tcpxResult_t Communicator::bootstrap() {
  Impl& im = *impl_;
  im.opts = opts_;
  im.net = opts_.net;
  im.peers = std::vector<Impl::Peer>(static_cast<size_t>(opts_.nranks));
  // Rank 0 decides the group secret and the chunk size for everyone: a chunk
  // size that differed between ranks would make every message a mismatch.
  WireBoot boot{};
  if (opts_.rank == 0) {
    boot.version = kBootstrapVersion;
    boot.chunkBytes = opts_.chunkBytes;
    randomBytes(boot.secret, sizeof(boot.secret));
    std::vector<uint8_t> v(sizeof(boot));
    memcpy(v.data(), &boot, sizeof(boot));
    TCPX_CHECK(opts_.store->set("tcpx/boot", v));
  } else {
    std::vector<uint8_t> v;
    tcpxResult_t r = opts_.store->get("tcpx/boot", opts_.timeout, &v);
    if (r != tcpxSuccess)
      TCPX_ERR(r, "rank %d could not read the group's bootstrap record from the store: %s",
               opts_.rank, lastError().c_str());
    if (v.size() != sizeof(boot)) TCPX_ERR(tcpxRemoteError, "bootstrap record has a bad size");
    memcpy(&boot, v.data(), sizeof(boot));
    if (boot.version != kBootstrapVersion)
      TCPX_ERR(tcpxRemoteError,
               "rank 0 runs bootstrap protocol %u, this rank %u: mixed torch_tcpx versions",
               boot.version, kBootstrapVersion);
    if (boot.chunkBytes != opts_.chunkBytes)
      TCPX_WARN("TCPX_CHUNK_BYTES differs from rank 0's (%llu here, %llu there): using rank 0's",
                static_cast<unsigned long long>(opts_.chunkBytes),
                static_cast<unsigned long long>(boot.chunkBytes));
  }
  chunkBytes_ = boot.chunkBytes;
  im.chunkBytes = chunkBytes_;
  memcpy(im.secret, boot.secret, sizeof(im.secret));

  if (opts_.nranks > 1) {
    NetListenInfo li;
    memcpy(li.secret, im.secret, sizeof(li.secret));
    li.rank = static_cast<uint32_t>(opts_.rank);
    li.events = &im.events;
    NetHandle handle;
    TCPX_CHECK(im.net->listen(opts_.dev, li, &handle, &im.listenComm));
    std::vector<uint8_t> v(handle.bytes, handle.bytes + kNetHandlePublicBytes);
    tcpxResult_t r = opts_.store->set(handleKey(opts_.rank), v);
    if (r != tcpxSuccess) {
      im.net->closeListen(im.listenComm);
      im.listenComm = nullptr;
      return r;
    }
  }
  TCPX_INFO(kLogInit, "group '%s': rank %d of %d ready (chunk %zu bytes, %d bounce buffers per peer)",
            opts_.name.c_str(), opts_.rank, opts_.nranks, chunkBytes_, opts_.buffers);
  im.worker = std::thread([this] { impl_->loop(); });
  return tcpxSuccess;
}

Communicator::~Communicator() { shutdown(); }

void Communicator::enqueue(std::shared_ptr<Task> task) {
  std::string abortMsg;
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    if (impl_->aborted.empty() && !impl_->stopping) {
      if (task->type == Task::Type::kCollective) impl_->collectivesIssued++;
      impl_->incoming.push_back(std::move(task));
    } else if (!impl_->aborted.empty()) {
      abortMsg = strFormat("TCPX communicator of rank %d of group '%s' was aborted earlier: %s",
                           opts_.rank, opts_.name.c_str(), impl_->aborted.c_str());
    } else {
      abortMsg = "the process group is shutting down";
    }
  }
  if (!abortMsg.empty()) {
    TaskResult r;
    r.code = tcpxRemoteError;
    r.message = abortMsg;
    if (task->deviceOp && opts_.stage) opts_.stage->end(task->deviceOp);  // its kernel must exit
    if (task->onComplete) task->onComplete(r);
    return;
  }
  impl_->events.notify();
}

void Communicator::abort(const std::string& why) {
  Impl* im = impl_.get();
  {
    std::lock_guard<std::mutex> lk(im->mu);
    if (!im->aborted.empty() || im->workerDone) return;
    im->abortRequest = why.empty() ? "aborted by the user" : why;
  }
  im->events.notify();
  // The worker owns the connections; wait until it has closed them (it may
  // be inside a bounded Store lookup).
  std::unique_lock<std::mutex> lk(im->mu);
  im->stopped.wait(lk, [&] { return !im->aborted.empty() || im->workerDone; });
}

void Communicator::shutdown() {
  Impl* im = impl_.get();
  {
    std::lock_guard<std::mutex> lk(im->mu);
    im->stopping = true;
  }
  im->events.notify();
  if (im->worker.joinable()) im->worker.join();
}

uint64_t Communicator::collectivesIssued() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->collectivesIssued;
}

void Communicator::dumpState() {
  const int64_t last = impl_->lastLoopNs.load();
  const double ago = (std::chrono::steady_clock::now().time_since_epoch().count() - last) / 1e6;
  TCPX_WARN("rank %d of group '%s': worker last looped %.1f ms ago", opts_.rank, opts_.name.c_str(), ago);
  impl_->dumpRequested = true;
  impl_->events.notify();
}

DeviceBreakdown Communicator::deviceBreakdown() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->breakdown;
}

std::string Communicator::abortReason() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->aborted;
}

}  // namespace tcpx

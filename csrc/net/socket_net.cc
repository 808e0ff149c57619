// The socket net (see socket_net.h for the protocol).
//
// Locking: each comm has one mutex guarding its request bookkeeping and
// interest flags. Payload bytes move without it: a data socket that has taken
// a slice owns that slice (counted in the request's slicesInFlight) until the
// slice is done, so no one completes or frees the request meanwhile.
#include "net/socket_net.h"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <set>

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "common/logging.h"
#include "common/param.h"
#include "common/utils.h"
#include "net/tcp_info.h"

namespace tcpx {
namespace {

constexpr uint64_t kWireMagic = 0x314b434f53585043ULL;  // "CPXSOCK1" read little-endian
constexpr uint32_t kWireVersion = 2;  // 2: handles list several NICs
constexpr uint64_t kConnectStageMarker = 0x6e6e6f4358504354ULL;

// ---------------------------------------------------------------------------
// Wire formats. Both ends are assumed to share endianness (x86-64/aarch64 are
// little-endian); the magic would not match otherwise.

union WireAddr {
  sockaddr sa;
  sockaddr_in in4;
  sockaddr_in6 in6;
};

// Public part of a NetHandle, written by listen(): where the listener can be
// reached. With several devices it listens on the wildcard address, and the
// handle lists the address of each of its first kHandleNics devices (same
// port; `addr` is device 0, `more` the next ones' 16 address bytes), so that
// a connection's channels can reach it on every NIC.
constexpr int kHandleNics = 4;
constexpr size_t kChannelSliceBytes = 64 * 1024;  // slice cap of multi-channel connections
struct WireHandle {
  uint64_t magic;
  uint32_t version;
  uint32_t addrLen;
  WireAddr addr;
  uint8_t naddrs;  // 1..kHandleNics
  uint8_t reserved[3];
  uint8_t more[kHandleNics - 1][16];
};
static_assert(sizeof(WireHandle) <= kNetHandlePublicBytes, "handle too large");

// Device `d`'s address with `port` (network byte order).
WireAddr deviceAddr(const NetInterface& d, uint16_t port) {
  WireAddr a{};
  memcpy(&a, &d.addr, std::min<size_t>(d.addrLen, sizeof(a)));
  if (a.sa.sa_family == AF_INET6) a.in6.sin6_port = port;
  else a.in4.sin_port = port;
  return a;
}

// Address i of a handle (0 <= i < naddrs), with the handle's port.
WireAddr handleAddr(const WireHandle& wh, int i) {
  WireAddr a = wh.addr;
  if (i == 0) return a;
  if (a.sa.sa_family == AF_INET6) memcpy(&a.in6.sin6_addr, wh.more[i - 1], 16);
  else memcpy(&a.in4.sin_addr, wh.more[i - 1], 4);
  return a;
}

// Private part of a NetHandle on the connecting side: connect() progress.
struct ConnectState;
struct HandleStage {
  uint64_t marker;
  ConnectState* state;
};
static_assert(kNetHandlePublicBytes + sizeof(HandleStage) <= kNetHandleMaxSize, "stage");

enum SockKind : uint8_t { kCtrlSock = 0, kDataSock = 1 };

// First bytes on every socket, connector -> listener.
struct WireHello {
  uint64_t magic;
  uint32_t version;
  uint8_t kind;    // SockKind
  uint8_t index;   // data socket index
  uint8_t nsocks;  // data sockets of the connection
  uint8_t reserved0;
  uint64_t connId;  // random; groups the sockets of one connection
  uint8_t secret[kGroupSecretBytes];
  uint32_t srcRank;
  uint32_t dstRank;
  uint32_t connIndex;
  uint32_t reserved1;
};
static_assert(sizeof(WireHello) == 56, "hello layout");

enum AckStatus : uint32_t {
  kAckOk = 0,
  kAckBadVersion = 1,
  kAckBadSecret = 2,
  kAckWrongRank = 3,
  kAckMalformed = 4,
};

const char* ackStatusText(uint32_t s) {
  switch (s) {
    case kAckOk: return "accepted";
    case kAckBadVersion: return "protocol version mismatch";
    case kAckBadSecret: return "wrong group secret (a process of another job or group)";
    case kAckWrongRank: return "the listener is not the rank this connection was meant for";
    case kAckMalformed: return "malformed handshake";
    default: return "unknown reason";
  }
}

// Listener -> connector, on the control socket, once the whole connection passed.
struct WireAck {
  uint32_t magicLow;  // low 32 bits of kWireMagic
  uint32_t status;    // AckStatus
};

// One per message on the control socket, sender -> receiver.
struct WireCtrl {
  uint64_t seq;
  uint64_t tag;
  uint64_t size;
  uint64_t inlineBytes;  // == size when the payload follows on the control socket, else 0
  uint64_t check;        // seq ^ size ^ magic: catches a desynchronised stream
};

// One per slice on a data socket.
struct WireSlice {
  uint64_t seq;
  uint64_t offset;
  uint64_t len;
};

// ---------------------------------------------------------------------------
// Socket helpers.

void setNoDelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

// Fixed socket buffers instead of the kernel's autotuning (which grows a
// loopback receive buffer to tcp_rmem's maximum, 6-32 MiB): what a socket
// holds in flight then stays in the last-level cache. Accepted sockets
// inherit the listener's. Failure is not an error: the kernel keeps its own.
void setBufferSizes(int fd, size_t bytes) {
  if (bytes == 0) return;
  int v = static_cast<int>(std::min<size_t>(bytes, INT_MAX / 2));
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof(v));
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &v, sizeof(v));
}

std::string peerString(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "unknown peer";
  return sockaddrToString(reinterpret_cast<sockaddr*>(&ss), len);
}

bool wouldBlock(int e) { return e == EAGAIN || e == EWOULDBLOCK; }

// ---------------------------------------------------------------------------
// Requests.

enum ReqState : int { kReqPending = 0, kReqDone = 1, kReqFailed = 2 };

struct SocketRequest {
  bool isSend = true;
  std::atomic<int> state{kReqPending};
  tcpxResult_t errorCode = tcpxSuccess;
  std::string error;
  uint64_t seq = 0;
  uint64_t tag = 0;
  size_t size = 0;  // send: bytes to send; recv: bytes the sender sent (once ctrlSeen)
  int slicesInFlight = 0;
  // send side
  const char* sdata = nullptr;
  size_t assigned = 0;  // bytes handed to data sockets
  size_t written = 0;   // payload bytes handed to the kernel
  uint64_t ctrlEnd = 0; // end of its header (+ inline payload) in the control stream
  bool ctrlDone = false;  // header (+ inline payload) handed to the kernel
  // receive side
  char* rdata = nullptr;
  size_t capacity = 0;
  size_t consumed = 0;  // payload bytes read (including discarded ones)
  bool ctrlSeen = false;
};

// ---------------------------------------------------------------------------
// Comms.

class CommBase;

// One socket of a comm, registered with one progress thread.
class SockHandler : public PollHandler {
 public:
  SockHandler(CommBase* comm, int fd, int thread, int index)
      : comm_(comm), fd_(fd), thread_(thread), index_(index) {}
  void onEvents(uint32_t events) override;

  CommBase* comm_;
  int fd_;
  int thread_;
  int index_;  // -1 control, else data socket index
  bool detached = false;  // removed from epoll (after failure or EOF)
  uint32_t interest = 0;  // current epoll interest (guarded by comm mutex)
  // Send-side data socket: the slice being written.
  SocketRequest* sreq = nullptr;
  WireSlice sliceHdr{};
  size_t sliceSent = 0;  // header + payload bytes written
  // Receive-side data socket: the slice being read.
  WireSlice rhdr{};
  size_t rhdrGot = 0;
  SocketRequest* rreq = nullptr;
  size_t rdone = 0;  // payload bytes of the slice read
  bool paused = false;
  bool writing = false;  // send side: a thread is writing slices on this socket
  bool eof = false;
  std::atomic<uint64_t> slices{0};  // send side: slices taken (socketStats)
  // Send side, several channels: this socket's delivery rate (bytes/s, 0
  // while unknown), and whether it turned down a slice (see laterThanBest).
  std::atomic<uint64_t> rateBps{0};
  bool declined = false;  // guarded by the comm mutex
};

class CommBase {
 public:
  CommBase(SocketNet* net, EventCounter* events) : net_(net), events_(events) {}
  virtual ~CommBase() = default;
  virtual void onSockEvents(SockHandler* h, uint32_t events) = 0;

  // Fails the comm: every request not done fails with `msg` once no socket
  // holds a slice of it; the sockets are shut down so that their threads wake
  // and let go of their slices. Caller holds mu_.
  void failLocked(tcpxResult_t code, const std::string& msg) {
    if (failed_) return;
    failed_ = true;
    failCode_ = code;
    failMsg_ = msg;
    TCPX_INFO(kLogNet, "socket comm %p failed: %s", static_cast<void*>(this), msg.c_str());
    for (auto& s : socks_) shutdown(s->fd_, SHUT_RDWR);
    failIdleRequestsLocked();
  }

  void failIdleRequestsLocked() {
    for (auto it = pending_.begin(); it != pending_.end();) {
      SocketRequest* r = *it;
      if (r->slicesInFlight == 0) {
        finishLocked(r, failCode_, failMsg_);
        it = pending_.erase(it);
      } else {
        ++it;
      }
    }
    notify_ = true;
  }

  // Marks `r` done (code == success) or failed. Caller holds mu_ and removes
  // `r` from pending_ itself.
  void finishLocked(SocketRequest* r, tcpxResult_t code, const std::string& msg) {
    r->errorCode = code;
    if (code != tcpxSuccess) {
      r->error = msg;
      r->state.store(kReqFailed, std::memory_order_release);
    } else {
      r->state.store(kReqDone, std::memory_order_release);
    }
    notify_ = true;
  }

  void removePendingLocked(SocketRequest* r) {
    auto it = std::find(pending_.begin(), pending_.end(), r);
    if (it != pending_.end()) pending_.erase(it);
  }

  // Bumps the owner's event counter if anything completed; call without mu_.
  void flushNotify() {
    EventCounter* ev = nullptr;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (notify_) ev = events_;
      notify_ = false;
    }
    if (ev) ev->notify();
  }

  void setInterestLocked(SockHandler* h, uint32_t ev) {
    if (h->detached || h->interest == ev) return;
    h->interest = ev;
    net_->engine()->modify(h->thread_, h->fd_, h, ev);
  }

  // Called on the socket's own thread: stop watching it (fd stays open until close).
  void detachLocked(SockHandler* h) {
    if (h->detached) return;
    h->detached = true;
    net_->engine()->removeFd(h->thread_, h->fd_);
  }

  tcpxResult_t registerSockets() {
    for (auto& s : socks_) {
      s->interest = initialInterest();
      TCPX_CHECK(net_->engine()->add(s->thread_, s->fd_, s.get(), s->interest));
    }
    return tcpxSuccess;
  }

  virtual uint32_t initialInterest() const = 0;

  // Unregisters every socket (waiting for its thread), closes the fds and
  // fails what is left. Afterwards no thread touches this comm.
  void closeAll(const char* why) {
    ProgressEngine* eng = net_->engine();
    if (tickerId_ >= 0) {  // returns once a tick running now has finished
      eng->removeTicker(tickerThread_, tickerId_);
      tickerId_ = -1;
    }
    for (auto& s : socks_) {
      SockHandler* h = s.get();
      eng->runOn(h->thread_, [this, h] {
        std::lock_guard<std::mutex> lk(mu_);
        if (!h->detached) {
          h->detached = true;
          net_->engine()->removeFd(h->thread_, h->fd_);
        }
        if (h->sreq) {
          h->sreq->slicesInFlight--;
          h->sreq = nullptr;
        }
        if (h->rreq) {
          h->rreq->slicesInFlight--;
          h->rreq = nullptr;
        }
      });
    }
    for (auto& s : socks_) close(s->fd_);
    std::lock_guard<std::mutex> lk(mu_);
    if (!failed_) {
      failed_ = true;
      failCode_ = tcpxInvalidUsage;
      failMsg_ = why;
    }
    for (SocketRequest* r : pending_) finishLocked(r, failCode_, failMsg_);
    pending_.clear();
  }

  SocketNet* net_;
  EventCounter* events_;
  std::mutex mu_;
  std::vector<std::unique_ptr<SockHandler>> socks_;  // [0] control, then data
  std::vector<SocketRequest*> pending_;              // requests not yet done
  bool failed_ = false;
  int tickerId_ = -1;  // SendComm with several channels (startTicker)
  int tickerThread_ = 0;
  tcpxResult_t failCode_ = tcpxSuccess;
  std::string failMsg_;
  bool notify_ = false;
  std::string peer_;       // "rank 3 (10.0.0.3:41234)" for messages
  uint64_t nextSeq_ = 0;   // next message sequence number
};

void SockHandler::onEvents(uint32_t events) {
  comm_->onSockEvents(this, events);
  comm_->flushNotify();
}

// ----------------------------- send side -----------------------------------

class SendComm : public CommBase {
 public:
  using CommBase::CommBase;

  // Several channels: every 2 ms the sockets that turned a slice down
  // (laterThanBest) look again, since acknowledgements alone wake nobody:
  // without it, sockets that had all turned one down with work queued
  // stalled the connection (measured, tests/python/test_multinic_netns.py).
  // A 64 KiB slice takes 2.6 ms at 200 Mbit/s. The ticker runs while the
  // comm lives: one wake-up of a progress thread per 2 ms.
  void startTicker() {
    tickerThread_ = socks_.back()->thread_;
    tickerId_ = net_->engine()->addTicker(tickerThread_, 2, [this] {
      std::lock_guard<std::mutex> lk(mu_);
      if (!failed_) rearmDeclinedLocked();
    });
  }

  uint32_t initialInterest() const override { return EPOLLIN | EPOLLRDHUP; }

  tcpxResult_t isend(const void* data, size_t size, uint64_t tag, SocketRequest** out) {
    const SocketNetOptions& o = net_->options();
    std::unique_lock<std::mutex> lk(mu_);
    if (failed_) {
      setLastError(failMsg_);
      return failCode_;
    }
    auto* r = new SocketRequest();
    r->isSend = true;
    r->seq = nextSeq_++;
    r->tag = tag;
    r->size = size;
    r->sdata = static_cast<const char*>(data);
    bool inl = size <= o.inlineBytes;
    WireCtrl c{r->seq, tag, size, inl ? size : 0, r->seq ^ size ^ kWireMagic};
    const char* cb = reinterpret_cast<const char*>(&c);
    ctrlOut_.insert(ctrlOut_.end(), cb, cb + sizeof(c));
    ctrlQueued_ += sizeof(c) + (inl ? size : 0);
    r->ctrlEnd = ctrlQueued_;
    ctrlWait_.push_back(r);
    pending_.push_back(r);
    if (inl) {
      // Small payloads are copied behind their header, so the receiver gets
      // header and data in one read; the request completes when those bytes
      // are in the kernel (usually in this very call).
      ctrlOut_.insert(ctrlOut_.end(), r->sdata, r->sdata + size);
      r->written = size;
    } else {
      // The caller writes what the kernel takes right away (kick()); only
      // the rest wakes the progress threads.
      queue_.push_back(r);
    }
    flushCtrlLocked();
    *out = r;
    return tcpxSuccess;
  }

  // Writes queued control bytes; arms EPOLLOUT on the control socket if some remain.
  void flushCtrlLocked() {
    SockHandler* h = socks_[0].get();
    while (ctrlOff_ < ctrlOut_.size()) {
      ssize_t n = send(h->fd_, ctrlOut_.data() + ctrlOff_, ctrlOut_.size() - ctrlOff_,
                       MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        ctrlOff_ += static_cast<size_t>(n);
        ctrlSent_ += static_cast<uint64_t>(n);
        ctrlProgressLocked();
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && wouldBlock(errno)) {
        setInterestLocked(h, EPOLLOUT | EPOLLIN | EPOLLRDHUP);
        return;
      }
      failLocked(tcpxRemoteError, strFormat("send to %s failed: %s", peer_.c_str(),
                                             n < 0 ? strerror(errno) : "connection closed"));
      return;
    }
    ctrlOut_.clear();
    ctrlOff_ = 0;
    setInterestLocked(h, EPOLLIN | EPOLLRDHUP);
  }

  // Requests whose control bytes are now all in the kernel.
  void ctrlProgressLocked() {
    if (failed_) {  // failed requests belong to the caller now
      ctrlWait_.clear();
      return;
    }
    while (!ctrlWait_.empty() && ctrlWait_.front()->ctrlEnd <= ctrlSent_) {
      SocketRequest* r = ctrlWait_.front();
      ctrlWait_.pop_front();
      r->ctrlDone = true;
      maybeCompleteLocked(r);
    }
  }

  // A send is complete once header and payload have been handed to the
  // kernel: from then on an orderly close still delivers it.
  void maybeCompleteLocked(SocketRequest* r) {
    if (!r->ctrlDone || r->written < r->size || r->slicesInFlight > 0) return;
    if (r->state.load() != kReqPending) return;
    finishLocked(r, tcpxSuccess, "");
    removePendingLocked(r);
  }

  // The receiver never writes after the handshake: readability means EOF or error.
  void checkPeerClosedLocked(SockHandler* h) {
    char b;
    ssize_t n = recv(h->fd_, &b, 1, MSG_DONTWAIT | MSG_PEEK);
    if (n == 0) {
      failLocked(tcpxRemoteError, strFormat("%s closed the connection", peer_.c_str()));
    } else if (n < 0 && !wouldBlock(errno) && errno != EINTR) {
      failLocked(tcpxRemoteError, strFormat("connection to %s failed: %s", peer_.c_str(),
                                             strerror(errno)));
    } else if (n > 0) {
      failLocked(tcpxInternalError,
                 strFormat("unexpected bytes from receiver %s on a send connection", peer_.c_str()));
    }
  }

  // Drops a slice held by `h` after a failure. Caller holds mu_.
  void dropSliceLocked(SockHandler* h) {
    if (!h->sreq) return;
    SocketRequest* r = h->sreq;
    h->sreq = nullptr;
    r->slicesInFlight--;
    if (r->slicesInFlight == 0 && r->state.load() == kReqPending) {
      finishLocked(r, failCode_, failMsg_);
      removePendingLocked(r);
    }
  }

  void onSockEvents(SockHandler* h, uint32_t ev) override {
    std::unique_lock<std::mutex> lk(mu_);
    if (h->detached) return;
    if (!failed_ && (ev & (EPOLLERR | EPOLLHUP | EPOLLRDHUP | EPOLLIN))) checkPeerClosedLocked(h);
    if (failed_ || (ev & (EPOLLERR | EPOLLHUP))) {
      if (!failed_)
        failLocked(tcpxRemoteError, strFormat("connection to %s broke", peer_.c_str()));
      dropSliceLocked(h);
      detachLocked(h);
      return;
    }
    if (!(ev & EPOLLOUT)) return;
    if (h->index_ < 0) {
      flushCtrlLocked();
      return;
    }
    lk.unlock();
    writeSlices(h);
  }

  // After isend, on the caller's thread: writes queued slices on an idle data
  // socket now. A message the kernel takes whole never wakes a progress thread.
  void kick() {
    // One idle socket takes what the kernel accepts; with channels, a socket
    // with a slice's bytes unsent takes no more, so the next idle one gets
    // the rest.
    for (size_t i = 1; i < socks_.size(); i++) {
      SockHandler* h = socks_[i].get();
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (failed_ || !queueHasWorkLocked()) return;
        if (h->sreq || h->writing || h->detached) continue;
      }
      writeSlices(h);
      if (!multiChannel_) return;
    }
  }

  // Channels over several NICs: a data socket takes a new slice only while
  // fewer than one slice's bytes wait unsent in its kernel queue
  // (SIOCOUTQNSD), and TCP_NOTSENT_LOWAT makes EPOLLOUT wait for that too.
  // A slow NIC's sockets then hold a bounded backlog, and the other NICs
  // take the rest of a message instead of waiting behind it. Off (no limit)
  // with one NIC.
  bool multiChannel_ = false;
  size_t sliceBytes_ = net_->options().sliceBytes;  // this connection's slice size (smaller with channels)
  bool backlogged(const SockHandler* h) const {
    if (!multiChannel_) return false;
    int unsent = 0;
    return ioctl(h->fd_, SIOCOUTQNSD, &unsent) == 0 && static_cast<size_t>(unsent) >= sliceBytes_;
  }

  bool queueHasWorkLocked() {
    while (!queue_.empty() && queue_.front()->assigned >= queue_.front()->size) queue_.pop_front();
    return !queue_.empty();
  }

  // Arms EPOLLOUT on every data socket that holds no slice, so that the
  // progress threads spread queued slices over them.
  void armIdleLocked() {
    for (size_t i = 1; i < socks_.size(); i++) {
      SockHandler* s = socks_[i].get();
      if (!s->sreq && !s->writing && !s->declined) setInterestLocked(s, EPOLLOUT | EPOLLIN | EPOLLRDHUP);
    }
  }

  // Data socket: writes slices until the kernel pushes back, a byte budget is
  // spent (fairness between sockets) or nothing is queued. Called by the
  // socket's progress thread on EPOLLOUT or by kick(); `writing` keeps it to
  // one writer at a time. On the way out the socket is armed for EPOLLOUT
  // exactly when work is left, and idle sockets are armed while slices wait.
  void writeSlices(SockHandler* h) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (h->writing || h->detached || failed_) return;
      h->writing = true;
    }
    const bool declined = writeSlicesOwned(h);
    std::lock_guard<std::mutex> lk(mu_);
    h->writing = false;
    if (failed_ || h->detached) return;
    bool queued = queueHasWorkLocked();
    // A socket that turned a slice down waits, without EPOLLOUT (it is
    // writable, so that would spin), until another one finishes a slice or
    // the comm's ticker fires.
    h->declined = declined && queued;
    setInterestLocked(h, (h->sreq || (queued && !h->declined)) ? EPOLLOUT | EPOLLIN | EPOLLRDHUP
                                                               : EPOLLIN | EPOLLRDHUP);
    if (queued) armIdleLocked();
  }

  // Several channels: whether socket `h` would finish a new slice of `len`
  // bytes later than the best other data socket, by more than one slice of
  // its own time. Each socket's finish time is (bytes it holds unacknowledged
  // + len) / its delivery rate: earliest-finish-time assignment, so that a
  // NIC at a quarter of the others' rate holds a quarter of their backlog
  // and a message's last slices do not wait behind it. False while rates
  // are unknown. Refreshes h's rate from TCP_INFO.
  bool laterThanBest(SockHandler* h, size_t len) {
    TcpRate tr;
    if (readTcpRate(h->fd_, &tr) && tr.deliveryBps > 0) {
      // An app-limited sample only says the path is at least that fast.
      uint64_t old = h->rateBps.load(std::memory_order_relaxed);
      if (!tr.appLimited || tr.deliveryBps > old)
        h->rateBps.store(old ? (3 * old + tr.deliveryBps) / 4 : tr.deliveryBps,
                         std::memory_order_relaxed);
    }
    const uint64_t rate = h->rateBps.load(std::memory_order_relaxed);
    if (!rate) return false;
    int held = 0;
    if (ioctl(h->fd_, SIOCOUTQ, &held) != 0) return false;
    const double mine = static_cast<double>(held) / static_cast<double>(rate);
    double best = -1;
    for (size_t i = 1; i < socks_.size(); i++) {
      SockHandler* o = socks_[i].get();
      const uint64_t r = o->rateBps.load(std::memory_order_relaxed);
      int q = 0;
      if (o == h || !r || ioctl(o->fd_, SIOCOUTQ, &q) != 0) continue;
      const double t = static_cast<double>(q + len) / static_cast<double>(r);
      if (best < 0 || t < best) best = t;
    }
    return best >= 0 && mine > best;
  }

  // Another socket finished a slice, or the ticker fired: the sockets that
  // turned one down look again.
  void rearmDeclinedLocked() {
    for (size_t i = 1; i < socks_.size(); i++) {
      SockHandler* s = socks_[i].get();
      if (!s->declined) continue;
      s->declined = false;
      if (!s->writing && !s->detached) setInterestLocked(s, EPOLLOUT | EPOLLIN | EPOLLRDHUP);
    }
  }

  // Returns true when h turned a slice down (laterThanBest).
  bool writeSlicesOwned(SockHandler* h) {
    const size_t sliceBytes = sliceBytes_;
    size_t budget = 4 * sliceBytes;
    while (budget > 0) {
      if (!h->sreq) {
        if (backlogged(h)) return false;  // writeSlices arms EPOLLOUT
        if (multiChannel_ && laterThanBest(h, sliceBytes)) return true;
        std::lock_guard<std::mutex> lk(mu_);
        if (failed_ || !queueHasWorkLocked()) return false;
        SocketRequest* r = queue_.front();
        size_t len = std::min(sliceBytes, r->size - r->assigned);
        h->sreq = r;
        h->sliceHdr = WireSlice{r->seq, r->assigned, len};
        h->sliceSent = 0;
        h->slices.fetch_add(1, std::memory_order_relaxed);
        r->assigned += len;
        r->slicesInFlight++;
        if (r->assigned >= r->size) queue_.pop_front();
      }
      SocketRequest* r = h->sreq;
      const size_t hdrLen = sizeof(WireSlice);
      const size_t total = hdrLen + h->sliceHdr.len;
      iovec iov[2];
      int niov = 0;
      if (h->sliceSent < hdrLen) {
        iov[niov].iov_base = reinterpret_cast<char*>(&h->sliceHdr) + h->sliceSent;
        iov[niov].iov_len = hdrLen - h->sliceSent;
        niov++;
        iov[niov].iov_base = const_cast<char*>(r->sdata + h->sliceHdr.offset);
        iov[niov].iov_len = h->sliceHdr.len;
        niov++;
      } else {
        size_t done = h->sliceSent - hdrLen;
        iov[niov].iov_base = const_cast<char*>(r->sdata + h->sliceHdr.offset + done);
        iov[niov].iov_len = h->sliceHdr.len - done;
        niov++;
      }
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = static_cast<size_t>(niov);
      ssize_t n = sendmsg(h->fd_, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (wouldBlock(errno)) return false;  // writeSlices arms EPOLLOUT
        std::lock_guard<std::mutex> lk(mu_);
        failLocked(tcpxRemoteError,
                   strFormat("send to %s failed: %s", peer_.c_str(), strerror(errno)));
        dropSliceLocked(h);
        detachLocked(h);
        return false;
      }
      h->sliceSent += static_cast<size_t>(n);
      budget -= std::min(budget, static_cast<size_t>(n));
      if (h->sliceSent < total) continue;
      std::lock_guard<std::mutex> lk(mu_);
      h->sreq = nullptr;
      r->slicesInFlight--;
      r->written += h->sliceHdr.len;
      if (multiChannel_) rearmDeclinedLocked();
      if (failed_) {
        // The comm failed (e.g. the receiver closed after reading this very
        // message) while this last slice was being written: a send whose
        // bytes all reached the kernel is complete, as on the normal path.
        if (r->slicesInFlight == 0 && r->state.load() == kReqPending) {
          const bool whole = r->ctrlDone && r->written >= r->size;
          finishLocked(r, whole ? tcpxSuccess : failCode_, whole ? "" : failMsg_);
          removePendingLocked(r);
        }
        return false;
      }
      maybeCompleteLocked(r);
    }
    return false;
  }

 private:
  std::vector<char> ctrlOut_;
  size_t ctrlOff_ = 0;
  uint64_t ctrlQueued_ = 0;  // control-stream bytes queued since the start
  uint64_t ctrlSent_ = 0;    // control-stream bytes handed to the kernel
  std::deque<SocketRequest*> ctrlWait_;  // requests whose control bytes are not all sent
  std::deque<SocketRequest*> queue_;  // requests with bytes not yet handed to a socket
};

// ----------------------------- receive side --------------------------------

class RecvComm : public CommBase {
 public:
  using CommBase::CommBase;

  uint32_t initialInterest() const override { return EPOLLIN | EPOLLRDHUP; }

  tcpxResult_t irecv(void* data, size_t capacity, SocketRequest** out) {
    std::unique_lock<std::mutex> lk(mu_);
    if (failed_) {
      setLastError(failMsg_);
      return failCode_;
    }
    if (peerClosed_) return irecvAfterCloseLocked(data, capacity, out);
    auto* r = new SocketRequest();
    r->isSend = false;
    r->seq = nextSeq_++;
    r->rdata = static_cast<char*>(data);
    r->capacity = capacity;
    pending_.push_back(r);
    window_.push_back(r);
    auto early = early_.find(r->seq);
    if (early != early_.end()) {
      EarlyCtrl& e = early->second;
      r->ctrlSeen = true;
      r->tag = e.tag;
      r->size = e.size;
      size_t n = std::min(e.data.size(), capacity);
      if (n) memcpy(r->rdata, e.data.data(), n);
      r->consumed += e.data.size();
      early_.erase(early);
      maybeCompleteLocked(r);
    }
    for (size_t i = 1; i < socks_.size(); i++) {
      SockHandler* h = socks_[i].get();
      if (h->paused && h->rhdr.seq == r->seq) {
        h->paused = false;
        setInterestLocked(h, EPOLLIN | EPOLLRDHUP);
      }
    }
    *out = r;
    lk.unlock();
    flushNotify();
    return tcpxSuccess;
  }

  void onSockEvents(SockHandler* h, uint32_t ev) override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (h->detached) return;
      if (failed_ || (ev & (EPOLLERR | EPOLLHUP))) {
        if (!failed_)
          failLocked(tcpxRemoteError, strFormat("connection from %s broke", peer_.c_str()));
        dropSliceLocked(h);
        detachLocked(h);
        return;
      }
    }
    if (h->index_ < 0) readCtrl(h);
    else readSlices(h);
  }

 private:
  struct EarlyCtrl {
    uint64_t tag = 0;
    size_t size = 0;
    std::vector<char> data;  // inline payload received before the irecv
  };

  SocketRequest* lookupLocked(uint64_t seq) {
    if (seq < windowBase_ || seq >= windowBase_ + window_.size()) return nullptr;
    return window_[seq - windowBase_];
  }

  void maybeCompleteLocked(SocketRequest* r) {
    if (!r->ctrlSeen || r->consumed < r->size || r->slicesInFlight > 0) return;
    if (r->state.load() != kReqPending) return;
    // Once finished, test() on the owner's thread may free r at any time.
    const uint64_t seq = r->seq;
    finishLocked(r, tcpxSuccess, "");
    removePendingLocked(r);
    // Retire completed requests from the front of the window.
    if (seq >= windowBase_ && seq < windowBase_ + window_.size())
      window_[seq - windowBase_] = nullptr;
    while (!window_.empty() && window_.front() == nullptr) {
      window_.pop_front();
      windowBase_++;
    }
  }

  void dropSliceLocked(SockHandler* h) {
    if (!h->rreq) return;
    SocketRequest* r = h->rreq;
    h->rreq = nullptr;
    r->slicesInFlight--;
    if (failed_ && r->slicesInFlight == 0 && r->state.load() == kReqPending) {
      finishLocked(r, failCode_, failMsg_);
      removePendingLocked(r);
    }
  }

  // A socket reached EOF. Once every socket has, the sender closed in order
  // and everything it sent has been read: posted receives that are still
  // incomplete can never complete and fail; messages that arrived whole
  // (inline ones waiting in early_) can still be received.
  void onEofLocked(SockHandler* h, bool midMessage) {
    h->eof = true;
    detachLocked(h);
    if (midMessage) {
      failLocked(tcpxRemoteError,
                 strFormat("%s closed the connection in the middle of a message", peer_.c_str()));
      return;
    }
    for (auto& s : socks_)
      if (!s->eof) return;
    peerClosed_ = true;
    std::string msg = strFormat("%s closed the connection", peer_.c_str());
    for (auto it = pending_.begin(); it != pending_.end();) {
      SocketRequest* r = *it;
      if (r->slicesInFlight == 0) {
        finishLocked(r, tcpxRemoteError, msg);
        it = pending_.erase(it);
      } else {
        ++it;
      }
    }
    window_.clear();
  }

  tcpxResult_t irecvAfterCloseLocked(void* data, size_t capacity, SocketRequest** out) {
    auto* r = new SocketRequest();
    r->isSend = false;
    r->seq = nextSeq_++;
    r->rdata = static_cast<char*>(data);
    r->capacity = capacity;
    auto e = early_.find(r->seq);
    if (e != early_.end() && e->second.data.size() == e->second.size) {
      r->ctrlSeen = true;
      r->tag = e->second.tag;
      r->size = e->second.size;
      size_t n = std::min(e->second.data.size(), capacity);
      if (n) memcpy(r->rdata, e->second.data.data(), n);
      r->consumed = r->size;
      early_.erase(e);
      finishLocked(r, tcpxSuccess, "");
    } else {
      finishLocked(r, tcpxRemoteError, strFormat("%s closed the connection", peer_.c_str()));
    }
    *out = r;
    return tcpxSuccess;
  }

  void protocolErrorLocked(const std::string& what) {
    failLocked(tcpxInternalError,
               strFormat("protocol error on the connection from %s: %s", peer_.c_str(),
                         what.c_str()));
  }

  // Control socket: headers and inline payloads, read in large gulps.
  void readCtrl(SockHandler* h) {
    for (int iter = 0; iter < 64; iter++) {
      if (inFill_ == inBuf_.size()) break;  // cannot happen: consumed below
      ssize_t n = recv(h->fd_, inBuf_.data() + inFill_, inBuf_.size() - inFill_, MSG_DONTWAIT);
      std::lock_guard<std::mutex> lk(mu_);
      if (n == 0) {
        onEofLocked(h, inFill_ > inStart_ || inlineLeft_ > 0);
        return;
      }
      if (n < 0) {
        if (errno == EINTR) continue;
        if (wouldBlock(errno)) return;
        failLocked(tcpxRemoteError,
                   strFormat("receive from %s failed: %s", peer_.c_str(), strerror(errno)));
        detachLocked(h);
        return;
      }
      inFill_ += static_cast<size_t>(n);
      parseCtrlLocked();
      if (failed_) {
        detachLocked(h);
        return;
      }
      // Keep the unparsed tail at the front.
      if (inStart_ > 0) {
        memmove(inBuf_.data(), inBuf_.data() + inStart_, inFill_ - inStart_);
        inFill_ -= inStart_;
        inStart_ = 0;
      }
    }
  }

  void parseCtrlLocked() {
    // After a failure, requests in window_ may already be freed by test().
    if (failed_) return;
    while (inStart_ < inFill_) {
      size_t avail = inFill_ - inStart_;
      if (inlineLeft_ > 0) {
        size_t k = std::min(avail, inlineLeft_);
        deliverInlineLocked(inBuf_.data() + inStart_, k);
        inStart_ += k;
        inlineLeft_ -= k;
        if (inlineLeft_ == 0) endCtrlMessageLocked();
        continue;
      }
      if (avail < sizeof(WireCtrl)) return;
      WireCtrl c;
      memcpy(&c, inBuf_.data() + inStart_, sizeof(c));
      inStart_ += sizeof(c);
      if (c.check != (c.seq ^ c.size ^ kWireMagic) || c.seq != ctrlSeq_ ||
          (c.inlineBytes != 0 && c.inlineBytes != c.size)) {
        protocolErrorLocked(strFormat("bad control header (seq %llu, expected %llu)",
                                      static_cast<unsigned long long>(c.seq),
                                      static_cast<unsigned long long>(ctrlSeq_)));
        return;
      }
      ctrlSeq_++;
      curSeq_ = c.seq;
      curInlineOff_ = 0;
      SocketRequest* r = lookupLocked(c.seq);
      if (r) {
        r->ctrlSeen = true;
        r->tag = c.tag;
        r->size = c.size;
      } else {
        EarlyCtrl& e = early_[c.seq];
        e.tag = c.tag;
        e.size = c.size;
        e.data.reserve(c.inlineBytes);
      }
      inlineLeft_ = c.inlineBytes;
      if (inlineLeft_ == 0) endCtrlMessageLocked();
    }
  }

  void deliverInlineLocked(const char* p, size_t k) {
    SocketRequest* r = lookupLocked(curSeq_);
    if (r) {
      if (curInlineOff_ < r->capacity) {
        size_t n = std::min(k, r->capacity - curInlineOff_);
        memcpy(r->rdata + curInlineOff_, p, n);
      }
      r->consumed += k;
    } else {
      auto& d = early_[curSeq_].data;
      d.insert(d.end(), p, p + k);
    }
    curInlineOff_ += k;
  }

  void endCtrlMessageLocked() {
    SocketRequest* r = lookupLocked(curSeq_);
    if (r) maybeCompleteLocked(r);
  }

  // Data socket: slice header, then payload straight into the posted buffer.
  void readSlices(SockHandler* h) {
    static thread_local std::vector<char> discard(256 * 1024);
    const size_t budgetMax = 4 * net_->options().sliceBytes;
    size_t budget = budgetMax;
    while (budget > 0) {
      if (!h->rreq) {
        if (h->rhdrGot < sizeof(WireSlice)) {
          ssize_t n = recv(h->fd_, reinterpret_cast<char*>(&h->rhdr) + h->rhdrGot,
                           sizeof(WireSlice) - h->rhdrGot, MSG_DONTWAIT);
          if (n <= 0) {
            if (n < 0 && errno == EINTR) continue;
            if (n < 0 && wouldBlock(errno)) return;
            std::lock_guard<std::mutex> lk(mu_);
            if (n == 0) onEofLocked(h, h->rhdrGot > 0);
            else {
              failLocked(tcpxRemoteError,
                         strFormat("receive from %s failed: %s", peer_.c_str(), strerror(errno)));
              detachLocked(h);
            }
            return;
          }
          h->rhdrGot += static_cast<size_t>(n);
          if (h->rhdrGot < sizeof(WireSlice)) continue;
        }
        std::lock_guard<std::mutex> lk(mu_);
        if (failed_) return;
        SocketRequest* r = lookupLocked(h->rhdr.seq);
        if (!r) {
          if (h->rhdr.seq < windowBase_) {
            protocolErrorLocked("slice for a message already complete");
            detachLocked(h);
            return;
          }
          // Its receive is not posted yet: stop reading this socket until it is.
          h->paused = true;
          setInterestLocked(h, 0);
          return;
        }
        h->rreq = r;
        h->rdone = 0;
        r->slicesInFlight++;
      }
      SocketRequest* r = h->rreq;
      const uint64_t off = h->rhdr.offset + h->rdone;
      const size_t left = h->rhdr.len - h->rdone;
      char* dst;
      size_t want;
      if (off < r->capacity) {
        dst = r->rdata + off;
        want = std::min<size_t>(left, r->capacity - off);
      } else {
        // Beyond the posted buffer: the sender sent more than was asked for.
        // Drain it so the stream stays in step; test() reports the full size.
        dst = discard.data();
        want = std::min(left, discard.size());
      }
      ssize_t n = want ? recv(h->fd_, dst, want, MSG_DONTWAIT) : 0;
      if (n <= 0 && want) {
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && wouldBlock(errno)) return;
        std::lock_guard<std::mutex> lk(mu_);
        if (n == 0) {
          dropSliceLocked(h);
          onEofLocked(h, true);
        } else {
          failLocked(tcpxRemoteError,
                     strFormat("receive from %s failed: %s", peer_.c_str(), strerror(errno)));
          dropSliceLocked(h);
          detachLocked(h);
        }
        return;
      }
      h->rdone += static_cast<size_t>(n);
      budget -= std::min(budget, static_cast<size_t>(n));
      if (h->rdone < h->rhdr.len) continue;
      std::lock_guard<std::mutex> lk(mu_);
      h->rreq = nullptr;
      h->rhdrGot = 0;
      r->slicesInFlight--;
      r->consumed += h->rhdr.len;
      if (failed_) {
        if (r->slicesInFlight == 0 && r->state.load() == kReqPending) {
          finishLocked(r, failCode_, failMsg_);
          removePendingLocked(r);
        }
        return;
      }
      maybeCompleteLocked(r);
    }
  }

  std::deque<SocketRequest*> window_;  // posted, indexed by seq - windowBase_; null once done
  uint64_t windowBase_ = 0;
  std::map<uint64_t, EarlyCtrl> early_;  // control headers that came before their irecv
  bool peerClosed_ = false;               // every socket reached EOF at a message boundary
  // Control stream parsing state (control socket thread only, under mu_).
  std::vector<char> inBuf_ = std::vector<char>(64 * 1024);
  size_t inStart_ = 0, inFill_ = 0;
  size_t inlineLeft_ = 0;
  size_t curInlineOff_ = 0;
  uint64_t curSeq_ = 0;
  uint64_t ctrlSeq_ = 0;  // next expected control sequence number
};

// ----------------------------- listen side ---------------------------------

class ListenComm;

// An accepted socket whose handshake has not finished.
class PendingSock : public PollHandler {
 public:
  PendingSock(ListenComm* lc, int fd) : lc_(lc), fd_(fd), start_(Clock::now()) {}
  ~PendingSock() override {
    if (fd_ >= 0) close(fd_);
  }
  void onEvents(uint32_t events) override;

  ListenComm* lc_;
  int fd_;
  Clock::time_point start_;
  WireHello hello{};
  size_t got = 0;
};

class ListenComm : public PollHandler {
 public:
  ListenComm(SocketNet* net, int fd, int thread, const NetListenInfo& info, std::string addr)
      : net_(net), fd_(fd), thread_(thread), info_(info), addr_(std::move(addr)) {}

  // Listening socket readable: accept everything pending.
  void onEvents(uint32_t) override {
    while (true) {
      sockaddr_storage ss{};
      socklen_t len = sizeof(ss);
      int fd = accept4(fd_, reinterpret_cast<sockaddr*>(&ss), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR) continue;
        if (!wouldBlock(errno) && errno != ECONNABORTED)
          TCPX_WARN("accept on %s failed: %s", addr_.c_str(), strerror(errno));
        return;
      }
      setNoDelay(fd);
      auto* ps = new PendingSock(this, fd);
      pending_.insert(ps);
      if (net_->engine()->add(thread_, fd, ps, EPOLLIN | EPOLLRDHUP) != tcpxSuccess) {
        pending_.erase(ps);
        delete ps;
      }
    }
  }

  // On the listen thread: a pending socket finished reading its hello.
  void onHello(PendingSock* ps) {
    const WireHello& h = ps->hello;
    std::string from = peerString(ps->fd_);
    uint32_t status = kAckOk;
    if (h.magic != kWireMagic) {
      TCPX_WARN("rejected a connection from %s to %s: not a torch_tcpx handshake", from.c_str(),
                addr_.c_str());
      dropPending(ps, false, kAckMalformed);
      return;
    }
    if (h.version != kWireVersion) status = kAckBadVersion;
    else if (memcmp(h.secret, info_.secret, kGroupSecretBytes) != 0) status = kAckBadSecret;
    else if (h.dstRank != info_.rank) status = kAckWrongRank;
    else if (h.nsocks == 0 || (h.kind == kDataSock && h.index >= h.nsocks) || h.kind > kDataSock)
      status = kAckMalformed;
    if (status != kAckOk) {
      TCPX_WARN("rejected a connection from %s (claiming rank %u) to rank %u at %s: %s",
                from.c_str(), h.srcRank, info_.rank, addr_.c_str(), ackStatusText(status));
      rejected_.insert(h.connId);
      failAssembly(h.connId, status);
      dropPending(ps, true, status);
      return;
    }
    if (rejected_.count(h.connId)) {
      dropPending(ps, true, kAckMalformed);
      return;
    }
    Assembly& a = assemblies_[h.connId];
    if (a.fds.empty()) {
      a.fds.assign(1 + h.nsocks, -1);
      a.first = h;
      a.start = ps->start_;
    }
    size_t slot = h.kind == kCtrlSock ? 0 : 1 + h.index;
    if (a.first.nsocks != h.nsocks || a.first.srcRank != h.srcRank ||
        a.first.connIndex != h.connIndex || slot >= a.fds.size() || a.fds[slot] >= 0) {
      TCPX_WARN("rejected a connection from %s: inconsistent handshake within connection %llx",
                from.c_str(), static_cast<unsigned long long>(h.connId));
      rejected_.insert(h.connId);
      failAssembly(h.connId, kAckMalformed);
      dropPending(ps, true, kAckMalformed);
      return;
    }
    // Hand the fd over from the pending socket to the assembly.
    net_->engine()->removeFd(thread_, ps->fd_);
    a.fds[slot] = ps->fd_;
    a.count++;
    ps->fd_ = -1;
    pending_.erase(ps);
    net_->engine()->deferDelete(thread_, ps);
    if (a.count == a.fds.size()) completeAssembly(h.connId);
  }

  void dropPending(PendingSock* ps, bool sendNack, uint32_t status) {
    if (sendNack) {
      WireAck ack{static_cast<uint32_t>(kWireMagic), status};
      ssize_t r = send(ps->fd_, &ack, sizeof(ack), MSG_NOSIGNAL | MSG_DONTWAIT);
      (void)r;
    }
    net_->engine()->removeFd(thread_, ps->fd_);
    pending_.erase(ps);
    net_->engine()->deferDelete(thread_, ps);
  }

  void failAssembly(uint64_t connId, uint32_t status) {
    auto it = assemblies_.find(connId);
    if (it == assemblies_.end()) return;
    for (size_t i = 0; i < it->second.fds.size(); i++) {
      int fd = it->second.fds[i];
      if (fd < 0) continue;
      if (i == 0) {
        WireAck ack{static_cast<uint32_t>(kWireMagic), status};
        ssize_t r = send(fd, &ack, sizeof(ack), MSG_NOSIGNAL | MSG_DONTWAIT);
        (void)r;
      }
      close(fd);
    }
    assemblies_.erase(it);
  }

  void completeAssembly(uint64_t connId);

  // Periodic sweep: drop handshakes that take too long (a stray client, a
  // half-open connection) so they cannot pile up.
  void tick() {
    auto now = Clock::now();
    auto limit = std::chrono::milliseconds(net_->options().handshakeTimeoutMs);
    std::vector<PendingSock*> stale;
    for (PendingSock* ps : pending_)
      if (now - ps->start_ > limit) stale.push_back(ps);
    for (PendingSock* ps : stale) {
      TCPX_WARN("dropped a connection from %s to %s: no handshake within %d ms",
                peerString(ps->fd_).c_str(), addr_.c_str(), net_->options().handshakeTimeoutMs);
      dropPending(ps, false, kAckMalformed);
    }
    std::vector<uint64_t> staleIds;
    for (auto& kv : assemblies_)
      if (now - kv.second.start > limit) staleIds.push_back(kv.first);
    for (uint64_t id : staleIds) {
      TCPX_WARN("dropped an incomplete connection from rank %u to %s: not all sockets arrived",
                assemblies_[id].first.srcRank, addr_.c_str());
      failAssembly(id, kAckMalformed);
    }
    if (rejected_.size() > 4096) rejected_.clear();
  }

  // Called on the listen thread when closing: frees everything it owns.
  void teardown() {
    net_->engine()->removeFd(thread_, fd_);
    close(fd_);
    for (PendingSock* ps : pending_) {
      net_->engine()->removeFd(thread_, ps->fd_);
      net_->engine()->deferDelete(thread_, ps);
    }
    pending_.clear();
    std::vector<uint64_t> ids;
    for (auto& kv : assemblies_) ids.push_back(kv.first);
    for (uint64_t id : ids) failAssembly(id, kAckMalformed);
  }

  struct Assembly {
    std::vector<int> fds;  // [0] control, then data
    size_t count = 0;
    WireHello first{};
    Clock::time_point start;
  };
  struct Ready {
    RecvComm* comm;
    NetConnectInfo info;
  };

  SocketNet* net_;
  int fd_;
  int thread_;
  NetListenInfo info_;
  std::string addr_;
  int tickerId_ = 0;
  std::set<PendingSock*> pending_;
  std::map<uint64_t, Assembly> assemblies_;
  std::set<uint64_t> rejected_;
  std::mutex readyMu_;  // ready_ is read by accept() on other threads
  std::deque<Ready> ready_;
};

void PendingSock::onEvents(uint32_t events) {
  while (got < sizeof(hello)) {
    ssize_t n = recv(fd_, reinterpret_cast<char*>(&hello) + got, sizeof(hello) - got, MSG_DONTWAIT);
    if (n > 0) {
      got += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && wouldBlock(errno) && !(events & (EPOLLHUP | EPOLLERR))) return;
    // EOF or error before a full handshake: a probe or a client that gave up.
    TCPX_INFO(kLogNet, "connection from %s closed before its handshake",
              peerString(fd_).c_str());
    lc_->dropPending(this, false, kAckMalformed);
    return;
  }
  lc_->onHello(this);
}

void ListenComm::completeAssembly(uint64_t connId) {
  Assembly a = assemblies_[connId];
  assemblies_.erase(connId);
  ProgressEngine* eng = net_->engine();
  auto* rc = new RecvComm(net_, info_.events);
  std::string from = peerString(a.fds[0]);
  rc->peer_ = strFormat("rank %u (%s)", a.first.srcRank, from.c_str());
  for (size_t i = 0; i < a.fds.size(); i++) {
    int t = eng->pickThread();
    rc->socks_.push_back(std::make_unique<SockHandler>(rc, a.fds[i], t, static_cast<int>(i) - 1));
  }
  // Acknowledge before registering: the sender starts sending only after the
  // ack, and our threads must not read the sockets before the comm is whole.
  WireAck ack{static_cast<uint32_t>(kWireMagic), kAckOk};
  ssize_t w = send(a.fds[0], &ack, sizeof(ack), MSG_NOSIGNAL | MSG_DONTWAIT);
  if (w != static_cast<ssize_t>(sizeof(ack)) || rc->registerSockets() != tcpxSuccess) {
    TCPX_WARN("could not complete the connection from %s", rc->peer_.c_str());
    for (int fd : a.fds) close(fd);
    rc->socks_.clear();
    delete rc;
    return;
  }
  NetConnectInfo info;
  memcpy(info.secret, a.first.secret, kGroupSecretBytes);
  info.srcRank = a.first.srcRank;
  info.dstRank = a.first.dstRank;
  info.connIndex = a.first.connIndex;
  TCPX_INFO(kLogNet, "accepted connection %u from %s with %zu data sockets", info.connIndex,
            rc->peer_.c_str(), a.fds.size() - 1);
  {
    std::lock_guard<std::mutex> lk(readyMu_);
    ready_.push_back({rc, info});
  }
  if (info_.events) info_.events->notify();
}

// ----------------------------- connect side --------------------------------

struct ConnectState {
  struct Sock {
    int fd = -1;
    int stage = 0;  // 0 connecting, 1 sending hello, 2 hello sent
    size_t helloSent = 0;
    WireAddr remote{};  // the listener's address on this socket's channel
    WireAddr local{};   // bound before connecting when the net has several NICs
    bool bindLocal = false;
  };
  socklen_t addrLen = 0;
  int channels = 1;
  size_t socketBufferBytes = 0;  // SocketNetOptions::socketBufferBytes
  std::vector<Sock> socks;  // [0] control
  WireHello hello{};
  WireAck ack{};
  size_t ackGot = 0;
  Clock::time_point start;
  Clock::time_point nextAttempt;
  int refusedRetries = 0;
  std::string target;
  std::string lastError;

  ~ConnectState() {
    for (auto& s : socks)
      if (s.fd >= 0) close(s.fd);
  }
};

tcpxResult_t startSocket(ConnectState* st, ConnectState::Sock* s) {
  s->fd = socket(s->remote.sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  TCPX_SYSCHECK(s->fd, "socket");
  setNoDelay(s->fd);
  setBufferSizes(s->fd, st->socketBufferBytes);
  s->stage = 0;
  s->helloSent = 0;
  // The source address picks the NIC where routing is per interface (as on
  // GCP's multi-NIC VMs, one subnet per NIC).
  if (s->bindLocal && bind(s->fd, &s->local.sa, st->addrLen) != 0) {
    int e = errno;
    close(s->fd);
    s->fd = -1;
    TCPX_ERR(tcpxSystemError, "binding a socket to %s for %s failed: %s",
             sockaddrToString(&s->local.sa, st->addrLen).c_str(), st->target.c_str(), strerror(e));
  }
  int r = ::connect(s->fd, &s->remote.sa, st->addrLen);
  if (r == 0) s->stage = 1;
  else if (errno != EINPROGRESS) {
    int e = errno;
    close(s->fd);
    s->fd = -1;
    st->lastError = strerror(e);
    if (e == ECONNREFUSED || e == EAGAIN || e == ETIMEDOUT) return tcpxInProgress;
    TCPX_ERR(tcpxSystemError, "connect to %s failed: %s", st->target.c_str(), strerror(e));
  }
  return tcpxSuccess;
}

// One step of a connection attempt. tcpxInProgress: call again.
tcpxResult_t progressConnect(ConnectState* st, int64_t timeoutMs) {
  auto now = Clock::now();
  bool pastDeadline = now - st->start > std::chrono::milliseconds(timeoutMs);
  bool allSent = true;
  for (auto& s : st->socks) {
    if (s.fd < 0) {
      if (now < st->nextAttempt) {
        allSent = false;
        continue;
      }
      tcpxResult_t r = startSocket(st, &s);
      if (r == tcpxInProgress) {
        // Refused: the listener may be saturated. Retry briefly; a peer
        // that keeps refusing is gone (its listener was closed).
        if (++st->refusedRetries > 50 || pastDeadline) {
          TCPX_ERR(tcpxRemoteError, "connection to %s refused: %s (is the peer still running?)",
                   st->target.c_str(), st->lastError.c_str());
        }
        st->nextAttempt = now + std::chrono::milliseconds(std::min(200, 5 * st->refusedRetries));
        allSent = false;
        continue;
      }
      TCPX_CHECK(r);
    }
    if (s.stage == 0) {
      pollfd p{s.fd, POLLOUT, 0};
      int pr = poll(&p, 1, 0);
      if (pr == 0) {
        allSent = false;
        continue;
      }
      int err = 0;
      socklen_t len = sizeof(err);
      getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) {
        close(s.fd);
        s.fd = -1;
        st->lastError = strerror(err);
        if (++st->refusedRetries > 50 || pastDeadline) {
          TCPX_ERR(tcpxRemoteError, "connection to %s failed: %s (is the peer still running?)",
                   st->target.c_str(), strerror(err));
        }
        st->nextAttempt = now + std::chrono::milliseconds(std::min(200, 5 * st->refusedRetries));
        allSent = false;
        continue;
      }
      s.stage = 1;
    }
    if (s.stage == 1) {
      WireHello h = st->hello;
      size_t idx = static_cast<size_t>(&s - st->socks.data());
      h.kind = idx == 0 ? kCtrlSock : kDataSock;
      h.index = static_cast<uint8_t>(idx == 0 ? 0 : idx - 1);
      ssize_t n = send(s.fd, reinterpret_cast<char*>(&h) + s.helloSent, sizeof(h) - s.helloSent,
                       MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0 && !wouldBlock(errno) && errno != EINTR) {
        TCPX_ERR(tcpxRemoteError, "handshake with %s failed: %s", st->target.c_str(),
                 strerror(errno));
      }
      if (n > 0) s.helloSent += static_cast<size_t>(n);
      if (s.helloSent == sizeof(h)) s.stage = 2;
      else allSent = false;
    }
  }
  if (!allSent) {
    if (pastDeadline)
      TCPX_ERR(tcpxTimeout, "connection to %s not established within %lld ms (%s)",
               st->target.c_str(), static_cast<long long>(timeoutMs), st->lastError.c_str());
    return tcpxInProgress;
  }
  // All hellos out: wait for the listener's verdict on the control socket.
  int fd = st->socks[0].fd;
  while (st->ackGot < sizeof(WireAck)) {
    ssize_t n = recv(fd, reinterpret_cast<char*>(&st->ack) + st->ackGot,
                     sizeof(WireAck) - st->ackGot, MSG_DONTWAIT);
    if (n > 0) {
      st->ackGot += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && wouldBlock(errno)) {
      if (pastDeadline)
        TCPX_ERR(tcpxTimeout, "%s did not acknowledge the connection within %lld ms",
                 st->target.c_str(), static_cast<long long>(timeoutMs));
      return tcpxInProgress;
    }
    TCPX_ERR(tcpxRemoteError, "%s closed the connection during the handshake%s",
             st->target.c_str(), n == 0 ? "" : strerror(errno));
  }
  if (st->ack.magicLow != static_cast<uint32_t>(kWireMagic))
    TCPX_ERR(tcpxRemoteError, "%s answered the handshake with garbage", st->target.c_str());
  if (st->ack.status != kAckOk)
    TCPX_ERR(tcpxRemoteError, "%s rejected the connection: %s", st->target.c_str(),
             ackStatusText(st->ack.status));
  return tcpxSuccess;
}

}  // namespace

// ---------------------------------------------------------------------------
// SocketNet

SocketNet::SocketNet(const SocketNetOptions& opts) : opts_(opts) {}

SocketNet::~SocketNet() { engine_.reset(); }

tcpxResult_t SocketNet::create(const SocketNetOptions& opts, std::unique_ptr<SocketNet>* out) {
  if (opts.devices.empty()) TCPX_ERR(tcpxInvalidArgument, "socket net needs at least one device");
  if (opts.nsocks < 1 || opts.nsocks > 64)
    TCPX_ERR(tcpxInvalidArgument, "nsocks=%d is invalid: expected [1, 64]", opts.nsocks);
  if (opts.nthreads < 1 || opts.nthreads > 64)
    TCPX_ERR(tcpxInvalidArgument, "nthreads=%d is invalid: expected [1, 64]", opts.nthreads);
  if (opts.sliceBytes == 0) TCPX_ERR(tcpxInvalidArgument, "sliceBytes must be > 0");
  std::unique_ptr<SocketNet> net(new SocketNet(opts));
  net->engine_ = std::make_unique<ProgressEngine>(opts.nthreads);
  *out = std::move(net);
  return tcpxSuccess;
}

tcpxResult_t SocketNet::devices(int* ndev) {
  *ndev = static_cast<int>(opts_.devices.size());
  return tcpxSuccess;
}

tcpxResult_t SocketNet::getProperties(int dev, NetProperties* props) {
  if (dev < 0 || dev >= static_cast<int>(opts_.devices.size()))
    TCPX_ERR(tcpxInvalidArgument, "device %d does not exist (socket net has %zu)", dev,
             opts_.devices.size());
  const NetInterface& d = opts_.devices[dev];
  NetProperties p;
  p.name = d.name;
  p.pciPath = d.pciPath;
  p.guid = static_cast<uint64_t>(dev);
  p.ptrSupport = kPtrHost;
  p.speedMbps = d.speedMbps;
  p.latencyUs = 0.f;
  p.maxRecvs = 1;
  p.numaNode = d.numaNode;
  p.address = d.addrString;
  *props = p;
  return tcpxSuccess;
}

std::vector<SocketStats> SocketNet::socketStats(void* comm, bool send) {
  CommBase* c = send ? static_cast<CommBase*>(static_cast<SendComm*>(comm))
                     : static_cast<CommBase*>(static_cast<RecvComm*>(comm));
  std::vector<SocketStats> out;
  for (auto& h : c->socks_) {
    SocketStats st;
    WireAddr a{};
    socklen_t len = sizeof(a);
    if (getsockname(h->fd_, &a.sa, &len) == 0) st.local = sockaddrToString(&a.sa, len);
    len = sizeof(a);
    if (getpeername(h->fd_, &a.sa, &len) == 0) st.peer = sockaddrToString(&a.sa, len);
    st.index = h->index_;
    st.slices = h->slices.load(std::memory_order_relaxed);
    len = sizeof(st.sndbuf);
    getsockopt(h->fd_, SOL_SOCKET, SO_SNDBUF, &st.sndbuf, &len);
    len = sizeof(st.rcvbuf);
    getsockopt(h->fd_, SOL_SOCKET, SO_RCVBUF, &st.rcvbuf, &len);
    out.push_back(st);
  }
  return out;
}

int SocketNet::channels() const {
  if (opts_.nchannels > 0) return opts_.nchannels;
  return std::max(1, std::min<int>(kHandleNics, static_cast<int>(opts_.devices.size())));
}

tcpxResult_t SocketNet::listen(int dev, const NetListenInfo& info, NetHandle* handle,
                               void** listenComm) {
  if (dev < 0 || dev >= static_cast<int>(opts_.devices.size()))
    TCPX_ERR(tcpxInvalidArgument, "device %d does not exist (socket net has %zu)", dev,
             opts_.devices.size());
  const NetInterface& d = opts_.devices[dev];
  WireAddr addr = deviceAddr(d, 0);
  socklen_t addrLen = d.addr.ss_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
  // Several devices: one listening socket for all of them (the wildcard
  // address of the family), so that every channel of a connection can
  // arrive on its own NIC and still be grouped with the others by connId.
  const int naddrs = std::min<int>(kHandleNics, static_cast<int>(opts_.devices.size()));
  if (naddrs > 1) {
    if (addr.sa.sa_family == AF_INET6) addr.in6.sin6_addr = in6addr_any;
    else addr.in4.sin_addr.s_addr = htonl(INADDR_ANY);
  }
  int fd = socket(addr.sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  TCPX_SYSCHECK(fd, "socket");
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  setBufferSizes(fd, opts_.socketBufferBytes);
  if (bind(fd, &addr.sa, addrLen) != 0 || ::listen(fd, 16384) != 0) {
    int e = errno;
    close(fd);
    TCPX_ERR(tcpxSystemError, "cannot listen on %s (%s): %s", d.name.c_str(),
             d.addrString.c_str(), strerror(e));
  }
  socklen_t len = sizeof(addr);
  getsockname(fd, &addr.sa, &len);
  std::string where = sockaddrToString(&addr.sa, len);
  int t = engine_->pickThread();
  auto* lc = new ListenComm(this, fd, t, info, where);
  tcpxResult_t r = engine_->add(t, fd, lc, EPOLLIN);
  if (r != tcpxSuccess) {
    close(fd);
    delete lc;
    return r;
  }
  lc->tickerId_ = engine_->addTicker(t, 250, [lc] { lc->tick(); });
  memset(handle->bytes, 0, sizeof(handle->bytes));
  WireHandle wh{};
  wh.magic = kWireMagic;
  wh.version = kWireVersion;
  wh.addrLen = len;
  wh.addr = addr;
  wh.naddrs = static_cast<uint8_t>(naddrs);
  if (naddrs > 1) {
    // Device i's address with the listening port, in device order.
    const uint16_t port = addr.sa.sa_family == AF_INET6 ? addr.in6.sin6_port : addr.in4.sin_port;
    wh.addr = deviceAddr(opts_.devices[0], port);
    for (int i = 1; i < naddrs; i++) {
      const sockaddr_storage& a = opts_.devices[i].addr;
      if (a.ss_family == AF_INET6)
        memcpy(wh.more[i - 1], &reinterpret_cast<const sockaddr_in6&>(a).sin6_addr, 16);
      else
        memcpy(wh.more[i - 1], &reinterpret_cast<const sockaddr_in&>(a).sin_addr, 4);
    }
  }
  memcpy(handle->bytes, &wh, sizeof(wh));
  TCPX_INFO(kLogNet, "rank %u listening on %s (%s%s)", info.rank, where.c_str(), d.name.c_str(),
            naddrs > 1 ? strFormat(" and %d more devices", naddrs - 1).c_str() : "");
  *listenComm = lc;
  return tcpxSuccess;
}

tcpxResult_t SocketNet::connect(int dev, NetHandle* handle, const NetConnectInfo& info,
                                EventCounter* events, int64_t timeoutMs, void** sendComm) {
  *sendComm = nullptr;
  HandleStage stage;
  memcpy(&stage, handle->bytes + kNetHandlePublicBytes, sizeof(stage));
  ConnectState* st = stage.marker == kConnectStageMarker ? stage.state : nullptr;
  if (!st) {
    WireHandle wh;
    memcpy(&wh, handle->bytes, sizeof(wh));
    if (wh.magic != kWireMagic || wh.version != kWireVersion || wh.addrLen == 0 ||
        wh.addrLen > sizeof(WireAddr) || wh.naddrs < 1 || wh.naddrs > kHandleNics) {
      TCPX_ERR(tcpxInvalidArgument,
               "connection handle for rank %u is not a socket-net handle of this version",
               info.dstRank);
    }
    if (dev < 0 || dev >= static_cast<int>(opts_.devices.size()))
      TCPX_ERR(tcpxInvalidArgument, "device %d does not exist (socket net has %zu)", dev,
               opts_.devices.size());
    // Channels: channel c on local device (dev + c) mod ndev and the
    // listener's device of the same index, so that ethK talks to the peer's
    // ethK. The connection's data sockets (at least one per channel) are
    // dealt over the channels: data socket i is on channel i mod nch. Slices
    // go to whichever data socket has room, so a slower NIC simply carries
    // fewer of them. The control socket rides channel 0. The data sockets
    // travel in the hello: the acceptor takes whatever count the connector
    // chose.
    const int ndev = static_cast<int>(opts_.devices.size());
    const int nch = info.nchannels ? static_cast<int>(info.nchannels) : channels();
    const int want = info.nsocks ? static_cast<int>(info.nsocks) : opts_.nsocks;
    if (want < 1 || want > 64) TCPX_ERR(tcpxInvalidArgument, "nsocks=%d is invalid: expected [1, 64]", want);
    if (nch < 1 || nch > 32) TCPX_ERR(tcpxInvalidArgument, "nchannels=%d is invalid: expected [1, 32]", nch);
    const int nsocks = std::max(want, nch);
    st = new ConnectState();
    st->addrLen = wh.addrLen;
    st->channels = nch;
    st->socketBufferBytes = opts_.socketBufferBytes;
    st->target = strFormat("rank %u (%s)", info.dstRank, sockaddrToString(&wh.addr.sa, wh.addrLen).c_str());
    st->socks.resize(1 + static_cast<size_t>(nsocks));
    for (size_t i = 0; i < st->socks.size(); i++) {
      const int c = i == 0 ? 0 : static_cast<int>(i - 1) % nch;
      const int local = (dev + c) % ndev;
      ConnectState::Sock& sk = st->socks[i];
      sk.remote = handleAddr(wh, local % wh.naddrs);
      sk.bindLocal = ndev > 1;
      sk.local = deviceAddr(opts_.devices[local], 0);
    }
    st->hello.magic = kWireMagic;
    st->hello.version = kWireVersion;
    st->hello.nsocks = static_cast<uint8_t>(nsocks);
    randomBytes(&st->hello.connId, sizeof(st->hello.connId));
    memcpy(st->hello.secret, info.secret, kGroupSecretBytes);
    st->hello.srcRank = info.srcRank;
    st->hello.dstRank = info.dstRank;
    st->hello.connIndex = info.connIndex;
    st->start = Clock::now();
    st->nextAttempt = st->start;
    stage.marker = kConnectStageMarker;
    stage.state = st;
    memcpy(handle->bytes + kNetHandlePublicBytes, &stage, sizeof(stage));
  }
  tcpxResult_t r = progressConnect(st, timeoutMs);
  if (r == tcpxInProgress) return tcpxSuccess;
  // Finished, one way or the other: the handle's stage is consumed.
  memset(handle->bytes + kNetHandlePublicBytes, 0, sizeof(HandleStage));
  if (r != tcpxSuccess) {
    delete st;
    return r;
  }
  auto* sc = new SendComm(this, events);
  sc->peer_ = st->target;
  if (st->channels > 1) {
    // Channels over NICs of different speeds: small slices and a small send
    // buffer per data socket bound how long a slice waits on a slow NIC
    // (its backlog in time is 4 slices / its rate), so the messages behind
    // it are not held up. Measured on 4 x 200 Mbit/s links with one at a
    // quarter (tests/python/test_multinic_netns.py, 2-core VM): 512 KiB
    // slices and the kernel's send buffer 31-43 MB/s of the 81 the links
    // carry; 64 KiB slices and a 256 KiB send buffer 66-72 MB/s (2 to 8
    // slices of send buffer, 32-128 KiB slices: the same within the noise).
    sc->sliceBytes_ = std::min<size_t>(opts_.sliceBytes, kChannelSliceBytes);
    sc->multiChannel_ = true;
    const int lowat = static_cast<int>(sc->sliceBytes_);
    const int sndbuf = static_cast<int>(4 * sc->sliceBytes_);
    for (size_t i = 1; i < st->socks.size(); i++) {
      setsockopt(st->socks[i].fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof(lowat));
      setsockopt(st->socks[i].fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    }
  }
  for (size_t i = 0; i < st->socks.size(); i++) {
    sc->socks_.push_back(std::make_unique<SockHandler>(sc, st->socks[i].fd,
                                                       engine_->pickThread(),
                                                       static_cast<int>(i) - 1));
    st->socks[i].fd = -1;  // now owned by the comm
  }
  delete st;
  r = sc->registerSockets();
  if (r != tcpxSuccess) {
    sc->closeAll("registration failed");
    delete sc;
    return r;
  }
  if (sc->multiChannel_) sc->startTicker();
  TCPX_INFO(kLogNet, "connected to %s (connection %u, %d data sockets, %d channels from device %d)",
            sc->peer_.c_str(), info.connIndex, static_cast<int>(sc->socks_.size()) - 1,
            info.nchannels ? static_cast<int>(info.nchannels) : channels(), dev);
  *sendComm = sc;
  return tcpxSuccess;
}

void SocketNet::connectAbandon(NetHandle* handle) {
  HandleStage stage;
  memcpy(&stage, handle->bytes + kNetHandlePublicBytes, sizeof(stage));
  if (stage.marker != kConnectStageMarker) return;
  delete stage.state;
  memset(handle->bytes + kNetHandlePublicBytes, 0, sizeof(HandleStage));
}

tcpxResult_t SocketNet::accept(void* listenComm, EventCounter* events, void** recvComm,
                               NetConnectInfo* peer) {
  auto* lc = static_cast<ListenComm*>(listenComm);
  *recvComm = nullptr;
  std::lock_guard<std::mutex> lk(lc->readyMu_);
  if (lc->ready_.empty()) return tcpxSuccess;
  ListenComm::Ready r = lc->ready_.front();
  lc->ready_.pop_front();
  if (events) {
    std::lock_guard<std::mutex> clk(r.comm->mu_);
    r.comm->events_ = events;
  }
  *recvComm = r.comm;
  if (peer) *peer = r.info;
  return tcpxSuccess;
}

tcpxResult_t SocketNet::regMr(void*, void* data, size_t, int type, void** mhandle) {
  if (type != kPtrHost)
    TCPX_ERR(tcpxInvalidArgument,
             "the socket net moves host memory only (pointer type %d); CUDA buffers must be "
             "staged through host memory",
             type);
  *mhandle = data;
  return tcpxSuccess;
}

tcpxResult_t SocketNet::deregMr(void*, void*) { return tcpxSuccess; }

tcpxResult_t SocketNet::isend(void* sendComm, const void* data, size_t size, uint64_t tag,
                              void*, void** request) {
  SocketRequest* r = nullptr;
  auto* comm = static_cast<SendComm*>(sendComm);
  TCPX_CHECK(comm->isend(data, size, tag, &r));
  comm->kick();
  comm->flushNotify();
  *request = r;
  return tcpxSuccess;
}

tcpxResult_t SocketNet::irecv(void* recvComm, int n, void** data, const size_t* sizes,
                              const uint64_t*, void**, void** request) {
  if (n != 1) TCPX_ERR(tcpxInvalidArgument, "socket net takes one receive at a time (n=%d)", n);
  SocketRequest* r = nullptr;
  TCPX_CHECK(static_cast<RecvComm*>(recvComm)->irecv(data[0], sizes[0], &r));
  *request = r;
  return tcpxSuccess;
}

tcpxResult_t SocketNet::iflush(void*, int, void**, const size_t*, void**, void** request) {
  *request = nullptr;  // host memory needs no flush
  return tcpxSuccess;
}

tcpxResult_t SocketNet::test(void* request, int* done, size_t* size, uint64_t* tag) {
  auto* r = static_cast<SocketRequest*>(request);
  int s = r->state.load(std::memory_order_acquire);
  if (s == kReqPending) {
    *done = 0;
    return tcpxSuccess;
  }
  *done = 1;
  if (size) *size = r->size;
  if (tag) *tag = r->tag;
  if (s == kReqFailed) {
    tcpxResult_t code = r->errorCode;
    setLastError(r->error);
    delete r;
    return code;
  }
  delete r;
  return tcpxSuccess;
}

namespace {
tcpxResult_t closeComm(CommBase* c, const char* why) {
  c->closeAll(why);
  c->flushNotify();
  delete c;
  return tcpxSuccess;
}
}  // namespace

tcpxResult_t SocketNet::closeSend(void* sendComm) {
  return closeComm(static_cast<SendComm*>(sendComm), "the send connection was closed locally");
}

tcpxResult_t SocketNet::closeRecv(void* recvComm) {
  return closeComm(static_cast<RecvComm*>(recvComm), "the receive connection was closed locally");
}

tcpxResult_t SocketNet::closeListen(void* listenComm) {
  auto* lc = static_cast<ListenComm*>(listenComm);
  engine_->removeTicker(lc->thread_, lc->tickerId_);
  engine_->runOn(lc->thread_, [lc] { lc->teardown(); });
  std::deque<ListenComm::Ready> ready;
  {
    std::lock_guard<std::mutex> lk(lc->readyMu_);
    ready.swap(lc->ready_);
  }
  for (auto& r : ready) closeRecv(r.comm);
  // Pending sockets are deleted by the listen thread after its batch; make
  // sure that batch is over before the listen comm they point to goes.
  engine_->runOn(lc->thread_, [] {});
  delete lc;
  return tcpxSuccess;
}

tcpxResult_t SocketNet::irecvConsumed(void*, int, void*) { return tcpxSuccess; }

tcpxResult_t getSocketNet(Net** out) {
  // Never destroyed: progress threads may still run while static objects are
  // torn down at exit, and the process's exit ends them anyway.
  static SocketNet* net = nullptr;
  static tcpxResult_t status = tcpxSuccess;
  static std::string error;
  static std::once_flag once;
  std::call_once(once, [] {
    const Params* p = nullptr;
    status = getParams(&p);
    if (status != tcpxSuccess) {
      error = lastError();
      return;
    }
    SocketNetOptions o;
    status = selectNetDevices(p->socketIfname, p->socketFamily, "/sys", &o.devices);
    if (status != tcpxSuccess) {
      error = lastError();
      return;
    }
    o.nsocks = p->nsocks;
    o.nthreads = p->nthreads;
    o.sliceBytes = p->sliceBytes;
    o.inlineBytes = p->inlineBytes;
    o.socketBufferBytes = p->socketBufferBytes == kSocketBufferAuto
                              ? autoSocketBufferBytes(static_cast<int>(o.devices.size()))
                              : p->socketBufferBytes;
    o.nchannels = p->nchannels;
    std::unique_ptr<SocketNet> created;
    status = SocketNet::create(o, &created);
    if (status != tcpxSuccess) {
      error = lastError();
      return;
    }
    net = created.release();
    std::string devs;
    for (auto& d : o.devices) devs += strFormat(" %s(%s)", d.name.c_str(), d.addrString.c_str());
    TCPX_INFO(kLogInit | kLogNet,
              "socket net: devices%s; %d channels of %d data sockets per connection, %d threads, "
              "socket buffers %s",
              devs.c_str(), net->channels(), o.nsocks, o.nthreads,
              o.socketBufferBytes ? strFormat("%zu B", o.socketBufferBytes).c_str() : "autotuned");
  });
  if (status != tcpxSuccess) {
    setLastError(error);
    return status;
  }
  *out = net;
  return tcpxSuccess;
}

}  // namespace tcpx

// Tests of the socket net (net/socket_net.h) through the Net interface:
// connection setup and handshake checks, message matching, striping over
// data sockets, truncation, >2 GiB messages, many concurrent connections,
// and failure / close behaviour. Peers are threads of this process over
// loopback; every test builds its own SocketNet. All payloads are generated
// by the test (seeded pseudo-random bytes) and compared against that source.
// Every wait is bounded: a stuck request fails the test instead of hanging.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <new>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/event.h"
#include "common/status.h"
#include "common/utils.h"
#include "net/interfaces.h"
#include "net/net.h"
#include "net/socket_net.h"
#include "test_util.h"

namespace tcpx {
namespace {

using SteadyClock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr auto kWait = seconds(20);  // bound of every wait on the net

// ---------------------------------------------------------------------------
// Helpers.

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Pseudo-random bytes determined by `seed` (so content identifies a message).
void fillPattern(void* buf, size_t n, uint64_t seed) {
  auto* p = static_cast<uint8_t*>(buf);
  size_t i = 0;
  uint64_t s = splitmix64(seed);
  for (; i + 8 <= n; i += 8) {
    uint64_t v = splitmix64(s + i);
    memcpy(p + i, &v, 8);
  }
  uint64_t v = splitmix64(s + i);
  for (size_t k = 0; i < n; i++, k++) p[i] = static_cast<uint8_t>(v >> (8 * k));
}

std::vector<uint8_t> pattern(size_t n, uint64_t seed) {
  std::vector<uint8_t> v(n);
  fillPattern(v.data(), n, seed);
  return v;
}

// Index of the first differing byte, or -1.
long long firstDiff(const uint8_t* a, const uint8_t* b, size_t n) {
  if (n == 0 || memcmp(a, b, n) == 0) return -1;
  for (size_t i = 0; i < n; i++)
    if (a[i] != b[i]) return static_cast<long long>(i);
  return -1;
}

void setSecret(uint8_t* s, uint8_t seed) {
  for (int i = 0; i < kGroupSecretBytes; i++) s[i] = static_cast<uint8_t>(seed * 31 + i * 7 + 1);
}

// A listener's handshake data: the group secret made from `secretSeed` and
// the listener's rank.
NetListenInfo listenInfo(uint8_t secretSeed, uint32_t rank) {
  NetListenInfo li;
  setSecret(li.secret, secretSeed);
  li.rank = rank;
  return li;
}

// What a connector sends: the group secret made from `secretSeed` (as in
// listenInfo()), its rank, the rank it means to reach, and which of the
// pair's connections this is.
NetConnectInfo connectInfo(uint8_t secretSeed, uint32_t srcRank, uint32_t dstRank,
                           uint32_t connIndex) {
  NetConnectInfo ci;
  setSecret(ci.secret, secretSeed);
  ci.srcRank = srcRank;
  ci.dstRank = dstRank;
  ci.connIndex = connIndex;
  return ci;
}

std::unique_ptr<SocketNet> makeNet(int nsocks, size_t sliceBytes, size_t inlineBytes,
                                   int handshakeTimeoutMs = 30000, int nthreads = 2) {
  return testing::makeLoopbackNet(nsocks, nthreads, sliceBytes, inlineBytes, handshakeTimeoutMs);
}

// A thread joined when it goes out of scope, so that a failed ASSERT in the
// test body cannot leave a joinable std::thread behind (std::terminate).
class ScopedThread {
 public:
  template <class F>
  explicit ScopedThread(F&& f) : t_(std::forward<F>(f)) {}
  ~ScopedThread() { join(); }
  void join() {
    if (t_.joinable()) t_.join();
  }

 private:
  std::thread t_;
};

// What became of a request.
struct Outcome {
  bool finished = false;  // test() reported done (or failed) within the bound
  tcpxResult_t rc = tcpxSuccess;
  size_t size = 0;
  uint64_t tag = 0;
  std::string error;
};

std::string describe(const Outcome& o) {
  if (!o.finished) return "still pending after the wait bound";
  return std::string("rc=") + resultName(o.rc) + " size=" + std::to_string(o.size) +
         " tag=" + std::to_string(o.tag) + (o.error.empty() ? "" : " error='" + o.error + "'");
}

// Success when the request finished without error; otherwise the failure
// says how it ended (describe()).
::testing::AssertionResult succeeded(const Outcome& o) {
  if (o.finished && o.rc == tcpxSuccess) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << describe(o);
}

// Receive `r` delivered message `want`, sent with `tag`, into `got`: checks
// the tag and the bytes, and says which differ. (Whether the receive
// succeeded is checked apart, with succeeded().)
::testing::AssertionResult delivered(const Outcome& r, const std::vector<uint8_t>& got,
                                     const std::vector<uint8_t>& want, uint64_t tag) {
  if (got.size() < want.size())
    return ::testing::AssertionFailure() << "receive buffer smaller than the message";
  std::string why;
  if (r.tag != tag)
    why = "tag " + std::to_string(r.tag) + ", sent with " + std::to_string(tag) + "; ";
  long long diff = firstDiff(got.data(), want.data(), want.size());
  if (diff >= 0) why += "bytes differ from offset " + std::to_string(diff);
  if (why.empty()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << why;
}

// Polls test() until the request is done or failed, or `bound` passes.
// `ev` (the comm's EventCounter) lets it sleep between polls.
Outcome waitRequest(Net* net, void* req, EventCounter* ev,
                    SteadyClock::duration bound = kWait) {
  Outcome o;
  auto deadline = SteadyClock::now() + bound;
  while (true) {
    uint64_t seen = ev ? ev->value() : 0;
    int done = 0;
    size_t size = ~size_t{0};
    uint64_t tag = ~uint64_t{0};
    tcpxResult_t rc = net->test(req, &done, &size, &tag);
    if (rc != tcpxSuccess) {
      o.finished = true;
      o.rc = rc;
      o.error = lastError();
      return o;
    }
    if (done) {
      o.finished = true;
      o.size = size;
      o.tag = tag;
      return o;
    }
    auto now = SteadyClock::now();
    if (now >= deadline) return o;
    if (ev) ev->waitUntil(seen, std::min(deadline, now + milliseconds(2)));
    else std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

// A test() poll that does not wait: true if the request is still pending.
// (When it is not, it has been freed by test(); *out says how it ended.)
bool stillPending(Net* net, void* req, Outcome* out) {
  int done = 0;
  size_t size = 0;
  uint64_t tag = 0;
  tcpxResult_t rc = net->test(req, &done, &size, &tag);
  if (rc == tcpxSuccess && !done) return true;
  out->finished = true;
  out->rc = rc;
  out->size = size;
  out->tag = tag;
  if (rc != tcpxSuccess) out->error = lastError();
  return false;
}

// isend/irecv may answer with a null request ("retry"): retry, bounded.
tcpxResult_t postSend(Net* net, void* comm, const void* data, size_t size, uint64_t tag,
                      void** req) {
  auto deadline = SteadyClock::now() + kWait;
  while (true) {
    *req = nullptr;
    tcpxResult_t r = net->isend(comm, data, size, tag, nullptr, req);
    if (r != tcpxSuccess || *req) return r;
    if (SteadyClock::now() > deadline) {
      setLastError("isend kept returning a null request");
      return tcpxTimeout;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

tcpxResult_t postRecv(Net* net, void* comm, void* data, size_t capacity, void** req) {
  auto deadline = SteadyClock::now() + kWait;
  while (true) {
    *req = nullptr;
    void* ptrs[1] = {data};
    size_t sizes[1] = {capacity};
    uint64_t tags[1] = {0};
    void* mh[1] = {nullptr};
    tcpxResult_t r = net->irecv(comm, 1, ptrs, sizes, tags, mh, req);
    if (r != tcpxSuccess || *req) return r;
    if (SteadyClock::now() > deadline) {
      setLastError("irecv kept returning a null request");
      return tcpxTimeout;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

// Calls connect() with the same handle until it yields a comm, fails, or the
// bound passes (then it gives the attempt up and returns tcpxTimeout).
tcpxResult_t connectLoop(Net* net, NetHandle* handle, const NetConnectInfo& info,
                         EventCounter* ev, void** sendComm, int64_t timeoutMs = 15000,
                         SteadyClock::duration bound = kWait, int dev = 0) {
  auto deadline = SteadyClock::now() + bound;
  *sendComm = nullptr;
  while (true) {
    tcpxResult_t r = net->connect(dev, handle, info, ev, timeoutMs, sendComm);
    if (r != tcpxSuccess || *sendComm) return r;
    if (SteadyClock::now() > deadline) {
      net->connectAbandon(handle);
      setLastError("test bound: connect() neither succeeded nor failed");
      return tcpxTimeout;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

// Calls accept() until it yields a comm or the bound passes (null comm then).
tcpxResult_t acceptLoop(Net* net, void* listenComm, EventCounter* ev, void** recvComm,
                        NetConnectInfo* peer, SteadyClock::duration bound = kWait) {
  auto deadline = SteadyClock::now() + bound;
  *recvComm = nullptr;
  while (true) {
    tcpxResult_t r = net->accept(listenComm, ev, recvComm, peer);
    if (r != tcpxSuccess || *recvComm) return r;
    if (SteadyClock::now() > deadline) return tcpxSuccess;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

// listen() on device 0 of `net`; a null `net` (makeNet failed) fails too.
::testing::AssertionResult listenOn(Net* net, const NetListenInfo& li, NetHandle* handle,
                                    void** listenComm) {
  if (!net) return ::testing::AssertionFailure() << "no net to listen on";
  tcpxResult_t r = net->listen(0, li, handle, listenComm);
  if (r != tcpxSuccess)
    return ::testing::AssertionFailure() << "listen: " << resultName(r) << " " << lastError();
  return ::testing::AssertionSuccess();
}

// One more connection to an open listener, made in turn on this thread:
// connectLoop() with a copy of `handle`, then acceptLoop() on `listenComm`
// (neither with an EventCounter). Gives both comms and what accept() said
// of the connector; fails naming the step that did, a connection that was
// not accepted within the bound included.
::testing::AssertionResult connectAccept(Net* net, const NetHandle& handle,
                                         const NetConnectInfo& info, void* listenComm,
                                         void** sendComm, void** recvComm, NetConnectInfo* peer) {
  NetHandle h = handle;
  tcpxResult_t r = connectLoop(net, &h, info, nullptr, sendComm);
  if (r != tcpxSuccess)
    return ::testing::AssertionFailure() << "connect: " << resultName(r) << " " << lastError();
  r = acceptLoop(net, listenComm, nullptr, recvComm, peer);
  if (r != tcpxSuccess)
    return ::testing::AssertionFailure() << "accept: " << resultName(r) << " " << lastError();
  if (!*recvComm) return ::testing::AssertionFailure() << "connection not accepted";
  return ::testing::AssertionSuccess();
}

// One connection: listener (rank 0) and connector (rank 1), set up by two
// threads. Closes whatever is still open when it goes.
struct Link {
  Net* net = nullptr;      // listening / receiving side
  Net* sendNet = nullptr;  // connecting / sending side (net unless given)
  void* listen = nullptr;
  void* send = nullptr;
  void* recv = nullptr;
  NetHandle handle{};
  NetConnectInfo sent{};   // what the connector sent
  NetConnectInfo peer{};   // what accept() returned
  int dev = 0;             // the connector's first device
  EventCounter sendEv, recvEv, listenEv;

  ~Link() {
    if (send) sendNet->closeSend(send);
    if (recv) net->closeRecv(recv);
    if (listen) net->closeListen(listen);
  }
};

// Sets up `l` over `net`; ASSERTs (in the caller) through the returned flag.
// A null `net` (makeNet failed) fails it.
::testing::AssertionResult openLink(Net* net, Link* l, uint32_t srcRank = 1,
                                    uint32_t dstRank = 0, uint32_t connIndex = 0,
                                    Net* sendNet = nullptr, uint32_t nsocks = 0) {
  l->net = net;
  l->sendNet = sendNet ? sendNet : net;
  NetListenInfo li = listenInfo(7, dstRank);
  li.events = &l->listenEv;
  ::testing::AssertionResult listening = listenOn(net, li, &l->handle, &l->listen);
  if (!listening) return listening;
  l->sent = connectInfo(7, srcRank, dstRank, connIndex);
  l->sent.nsocks = nsocks;
  tcpxResult_t crc = tcpxSuccess, arc = tcpxSuccess;
  std::string cerr;
  std::thread connector([&] {
    crc = connectLoop(l->sendNet, &l->handle, l->sent, &l->sendEv, &l->send, 15000, kWait, l->dev);
    if (crc != tcpxSuccess) cerr = lastError();
  });
  arc = acceptLoop(net, l->listen, &l->recvEv, &l->recv, &l->peer);
  connector.join();
  if (crc != tcpxSuccess || !l->send)
    return ::testing::AssertionFailure() << "connect: " << resultName(crc) << " " << cerr;
  if (arc != tcpxSuccess || !l->recv)
    return ::testing::AssertionFailure() << "accept: " << resultName(arc) << " " << lastError();
  return ::testing::AssertionSuccess();
}

// One message `src` from `sendComm` to `recvComm`, the receive's capacity
// being dst's size: posts the receive and then the send (the send first with
// `sendFirst`), then waits for the send and then the receive; *so and *ro say
// how they ended. Fails, naming the call, if a post fails (nothing is waited
// for then).
::testing::AssertionResult transferOne(Net* sendNet, void* sendComm, EventCounter* sendEv,
                                       Net* recvNet, void* recvComm, EventCounter* recvEv,
                                       const std::vector<uint8_t>& src, std::vector<uint8_t>* dst,
                                       uint64_t tag, Outcome* so, Outcome* ro,
                                       bool sendFirst = false) {
  void* sq = nullptr;
  void* rq = nullptr;
  for (bool sendNow : {sendFirst, !sendFirst}) {
    tcpxResult_t r = sendNow ? postSend(sendNet, sendComm, src.data(), src.size(), tag, &sq)
                             : postRecv(recvNet, recvComm, dst->data(), dst->size(), &rq);
    if (r != tcpxSuccess)
      return ::testing::AssertionFailure()
             << (sendNow ? "isend: " : "irecv: ") << resultName(r) << " " << lastError();
  }
  *so = waitRequest(sendNet, sq, sendEv);
  *ro = waitRequest(recvNet, rq, recvEv);
  return ::testing::AssertionSuccess();
}

// The same over `l`, with its EventCounters.
::testing::AssertionResult transferOne(Link& l, const std::vector<uint8_t>& src,
                                       std::vector<uint8_t>* dst, uint64_t tag, Outcome* so,
                                       Outcome* ro) {
  return transferOne(l.sendNet, l.send, &l.sendEv, l.net, l.recv, &l.recvEv, src, dst, tag, so,
                     ro);
}

// Messages of each size in turn over `l` (a pattern seeded by seedBase +
// size, tag `tag`): both requests succeed and the data arrive intact.
::testing::AssertionResult transferSizes(Link& l, std::initializer_list<size_t> sizes,
                                         uint64_t seedBase, uint64_t tag) {
  for (size_t size : sizes) {
    std::vector<uint8_t> src = pattern(size, seedBase + size), dst(size, 0xEE);
    Outcome so, ro;
    ::testing::AssertionResult r = transferOne(l, src, &dst, tag, &so, &ro);
    if (r) r = succeeded(so);
    if (r) r = succeeded(ro);
    if (r) r = delivered(ro, dst, src, tag);
    if (!r) return r << " (size " << size << ")";
  }
  return ::testing::AssertionSuccess();
}

// Listening sockets of this process (found through /proc/self/fd): lets a
// test reach a listener's port with a raw client without knowing the handle.
std::set<int> listeningFds() {
  std::set<int> out;
  DIR* d = opendir("/proc/self/fd");
  if (!d) return out;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    int fd = atoi(e->d_name);
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
    int acc = 0;
    socklen_t len = sizeof(acc);
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &len) == 0 && acc) out.insert(fd);
  }
  closedir(d);
  return out;
}

// A blocking raw TCP client connected to `addr`.
int rawConnect(const sockaddr_storage& addr, socklen_t len) {
  int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (connect(fd, reinterpret_cast<const sockaddr*>(&addr), len) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Waits (bounded) until the peer closes `fd`: true on EOF or reset.
bool waitPeerClosed(int fd, SteadyClock::duration bound) {
  auto deadline = SteadyClock::now() + bound;
  char buf[256];
  while (SteadyClock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    int pr = poll(&p, 1, 50);
    if (pr <= 0) continue;
    ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (n == 0) return true;
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return true;
    // Bytes (a nack): keep reading until the close.
  }
  return false;
}

// A receive on a comm whose peer is gone fails: irecv() refuses it, or
// test() reports an error containing `what`.
void expectReceiveFails(Net* net, void* recvComm, const char* what) {
  char buf[64];
  void* ptrs[1] = {buf};
  size_t sizes[1] = {sizeof(buf)};
  uint64_t tags[1] = {0};
  void* mh[1] = {nullptr};
  void* req = nullptr;
  tcpxResult_t rc = net->irecv(recvComm, 1, ptrs, sizes, tags, mh, &req);
  std::string err = lastError();
  if (rc == tcpxSuccess && req) {
    Outcome o = waitRequest(net, req, nullptr);
    ASSERT_TRUE(o.finished) << "receive on a closed connection still pending";
    rc = o.rc;
    err = o.error;
  }
  EXPECT_NE(rc, tcpxSuccess) << "receive on a closed connection succeeded";
  EXPECT_NE(err.find(what), std::string::npos) << "error: " << err;
}

// Blocks progress thread `t` of `net` until release() (bounded), so a test
// can make a receiver fall behind deterministically.
class ThreadBlocker {
 public:
  ThreadBlocker(SocketNet* net, int t) {
    th_ = std::thread([this, net, t] {
      net->engine()->runOn(t, [this] {
        std::unique_lock<std::mutex> lk(mu_);
        entered_ = true;
        cv_.notify_all();
        cv_.wait_for(lk, seconds(30), [this] { return released_; });
      });
    });
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait_for(lk, seconds(10), [this] { return entered_; });
  }
  bool blocked() {
    std::lock_guard<std::mutex> lk(mu_);
    return entered_;
  }
  void release() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      released_ = true;
      cv_.notify_all();
    }
    if (th_.joinable()) th_.join();
  }
  ~ThreadBlocker() { release(); }

 private:
  std::thread th_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool entered_ = false, released_ = false;
};

// ---------------------------------------------------------------------------
// Options and argument checks.

TEST(SocketNet, CreateRejectsInvalidOptions) {
  SocketNetOptions base;
  ASSERT_EQ(findNetDevices("lo", "/sys", &base.devices), tcpxSuccess) << lastError();
  std::unique_ptr<SocketNet> net;
  {
    SocketNetOptions o = base;
    o.devices.clear();
    EXPECT_EQ(SocketNet::create(o, &net), tcpxInvalidArgument) << "no devices";
  }
  for (int n : {0, 65, -1}) {
    SocketNetOptions o = base;
    o.nsocks = n;
    EXPECT_EQ(SocketNet::create(o, &net), tcpxInvalidArgument) << "nsocks " << n;
  }
  for (int n : {0, 65}) {
    SocketNetOptions o = base;
    o.nthreads = n;
    EXPECT_EQ(SocketNet::create(o, &net), tcpxInvalidArgument) << "nthreads " << n;
  }
  {
    SocketNetOptions o = base;
    o.sliceBytes = 0;
    EXPECT_EQ(SocketNet::create(o, &net), tcpxInvalidArgument) << "sliceBytes 0";
  }
  {
    SocketNetOptions o = base;
    o.nsocks = 64;
    o.nthreads = 1;
    EXPECT_EQ(SocketNet::create(o, &net), tcpxSuccess) << lastError();
  }
}

TEST(SocketNet, DevicesPropertiesAndArgumentChecks) {
  auto net = makeNet(3, 64 * 1024, 4 * 1024);
  ASSERT_NE(net, nullptr);
  int ndev = 0;
  ASSERT_EQ(net->devices(&ndev), tcpxSuccess);
  EXPECT_EQ(ndev, 1);
  NetProperties p;
  ASSERT_EQ(net->getProperties(0, &p), tcpxSuccess);
  EXPECT_EQ(p.name, "lo");
  EXPECT_EQ(p.ptrSupport, kPtrHost);
  EXPECT_EQ(p.maxRecvs, 1);
  EXPECT_FALSE(p.address.empty());
  EXPECT_EQ(net->getProperties(1, &p), tcpxInvalidArgument);
  EXPECT_EQ(net->getProperties(-1, &p), tcpxInvalidArgument);
  NetHandle h{};
  void* lc = nullptr;
  NetListenInfo li;
  EXPECT_EQ(net->listen(1, li, &h, &lc), tcpxInvalidArgument);

  // A handle that no listener wrote.
  NetHandle bogus;
  memset(bogus.bytes, 0, sizeof(bogus.bytes));
  NetConnectInfo ci;
  void* sc = nullptr;
  EXPECT_EQ(net->connect(0, &bogus, ci, nullptr, 1000, &sc), tcpxInvalidArgument);
  EXPECT_EQ(sc, nullptr);

  Link l;
  ASSERT_TRUE(openLink(net.get(), &l));
  char buf[16];
  void* mh = nullptr;
  EXPECT_EQ(net->regMr(l.send, buf, sizeof(buf), kPtrHost, &mh), tcpxSuccess);
  EXPECT_EQ(net->deregMr(l.send, mh), tcpxSuccess);
  EXPECT_EQ(net->regMr(l.send, buf, sizeof(buf), kPtrCuda, &mh), tcpxInvalidArgument);
  // Grouped receives are not supported by the socket net.
  void* ptrs[2] = {buf, buf + 8};
  size_t sizes[2] = {8, 8};
  uint64_t tags[2] = {0, 0};
  void* mhs[2] = {nullptr, nullptr};
  void* req = nullptr;
  EXPECT_EQ(net->irecv(l.recv, 2, ptrs, sizes, tags, mhs, &req), tcpxInvalidArgument);
  // iflush has nothing to do for host memory.
  req = reinterpret_cast<void*>(1);
  EXPECT_EQ(net->iflush(l.recv, 1, ptrs, sizes, mhs, &req), tcpxSuccess);
  EXPECT_EQ(req, nullptr);
}

// ---------------------------------------------------------------------------
// 1. Connection setup and basic transfers.

TEST(SocketNet, ConnectAcceptReturnsPeerInfo) {
  auto net = makeNet(3, 64 * 1024, 4 * 1024);
  Link l;
  ASSERT_TRUE(openLink(net.get(), &l, /*srcRank=*/5, /*dstRank=*/2, /*connIndex=*/77));
  EXPECT_EQ(l.peer.srcRank, 5u);
  EXPECT_EQ(l.peer.dstRank, 2u);
  EXPECT_EQ(l.peer.connIndex, 77u);
  EXPECT_EQ(memcmp(l.peer.secret, l.sent.secret, kGroupSecretBytes), 0);
  // The handle's stage bytes are consumed once connect() finished: the
  // public part is still usable by another connector.
  NetConnectInfo ci = l.sent;
  ci.connIndex = 78;
  void* sc2 = nullptr;
  void* rc2 = nullptr;
  NetConnectInfo peer2;
  ASSERT_TRUE(connectAccept(net.get(), l.handle, ci, l.listen, &sc2, &rc2, &peer2))
      << "second connection";
  EXPECT_EQ(peer2.connIndex, 78u);
  EXPECT_EQ(net->closeSend(sc2), tcpxSuccess);
  EXPECT_EQ(net->closeRecv(rc2), tcpxSuccess);
}

// Sends each size from one thread and receives it on another, with the
// receive posted at the exact size and then with room to spare.
TEST(SocketNet, SendRecvSizes) {
  const size_t kSlice = 64 * 1024, kInline = 4 * 1024;
  auto net = makeNet(3, kSlice, kInline);
  Link l;
  ASSERT_TRUE(openLink(net.get(), &l));
  const std::vector<size_t> sizes = {0,           1,          kInline - 1,           kInline,
                                     kInline + 1, kSlice - 1, kSlice,                kSlice + 1,
                                     kSlice * 3 + 17,         5 * 1024 * 1024 + 3};
  const size_t kGuard = 1000;
  int msg = 0;
  for (int extra : {0, 1}) {
    for (size_t size : sizes) {
      const uint64_t seed = 1000 + static_cast<uint64_t>(msg);
      const uint64_t tag = 0xF00D000000000000ULL | (static_cast<uint64_t>(msg) << 20) | 0xABC;
      msg++;
      std::vector<uint8_t> src = pattern(size, seed);
      const size_t capacity = size + (extra ? kGuard : 0);
      std::vector<uint8_t> dst(size + kGuard, 0xEE);
      Outcome so, ro;
      std::thread sender([&] {
        void* req = nullptr;
        ASSERT_EQ(postSend(net.get(), l.send, src.data(), size, tag, &req), tcpxSuccess)
            << lastError();
        so = waitRequest(net.get(), req, &l.sendEv);
      });
      std::thread receiver([&] {
        void* req = nullptr;
        ASSERT_EQ(postRecv(net.get(), l.recv, dst.data(), capacity, &req), tcpxSuccess)
            << lastError();
        ro = waitRequest(net.get(), req, &l.recvEv);
      });
      sender.join();
      receiver.join();
      ASSERT_TRUE(succeeded(so)) << "send of " << size;
      EXPECT_EQ(so.size, size) << "send size reported";
      ASSERT_TRUE(succeeded(ro)) << "recv of " << size;
      EXPECT_EQ(ro.size, size) << "recv reports the sender's size (capacity " << capacity << ")";
      EXPECT_EQ(ro.tag, tag) << "recv reports the sender's 64-bit tag, size " << size;
      EXPECT_EQ(firstDiff(dst.data(), src.data(), size), -1) << "payload of size " << size;
      for (size_t i = size; i < dst.size(); i++)
        ASSERT_EQ(dst[i], 0xEE) << "byte " << i << " past the message of " << size << " written";
    }
  }
}


// The same over IPv6 loopback (::1), where the host has it.
TEST(SocketNet, Ipv6Loopback) {
  SocketNetOptions o;
  std::vector<NetInterface> v6;
  if (listInterfaces(IfnameFilter::parse("=lo"), AF_INET6, /*includeLoopback=*/true, "/sys", &v6) !=
          tcpxSuccess ||
      v6.empty() || v6[0].addr.ss_family != AF_INET6)
    GTEST_SKIP() << "no IPv6 address on lo";
  o.devices = v6;
  o.nsocks = 3;
  o.sliceBytes = 32 * 1024;
  o.inlineBytes = 1024;
  std::unique_ptr<SocketNet> net;
  ASSERT_EQ(SocketNet::create(o, &net), tcpxSuccess) << lastError();
  Link l;
  ASSERT_TRUE(openLink(net.get(), &l, 4, 0, 9));
  EXPECT_EQ(l.peer.srcRank, 4u);
  EXPECT_EQ(l.peer.connIndex, 9u);
  for (size_t size : {size_t{0}, size_t{1024}, size_t{1025}, size_t{1} << 20}) {
    std::vector<uint8_t> src = pattern(size, size), dst(size, 0);
    Outcome so, ro;
    ASSERT_TRUE(transferOne(l, src, &dst, size, &so, &ro));
    ASSERT_TRUE(succeeded(so));
    ASSERT_TRUE(succeeded(ro));
    EXPECT_EQ(ro.size, size);
    EXPECT_TRUE(delivered(ro, dst, src, size)) << "size " << size;
  }
}

// ---------------------------------------------------------------------------
// 2. Ordering.

struct Msg {
  size_t size;
  uint64_t tag;
  uint64_t seed;
};

// Sizes: a mix of tiny, inline and multi-slice messages.
std::vector<Msg> makeMessages(int n, size_t inlineBytes, size_t sliceBytes, uint64_t seed) {
  std::vector<Msg> m;
  uint64_t s = seed;
  for (int i = 0; i < n; i++) {
    s = splitmix64(s);
    size_t size;
    switch (i % 5) {
      case 0: size = s % 64; break;                                   // tiny
      case 1: size = s % (inlineBytes + 1); break;                    // inline
      case 2: size = inlineBytes + 1 + s % (2 * sliceBytes); break;   // 1-3 slices
      case 3: size = 3 * sliceBytes + s % (4 * sliceBytes); break;    // many slices
      default: size = (s & 1) ? inlineBytes : inlineBytes + 1; break; // the edge
    }
    m.push_back({size, (static_cast<uint64_t>(0xFEED) << 48) | static_cast<uint64_t>(i),
                 seed * 100000 + static_cast<uint64_t>(i)});
  }
  return m;
}

// The checks once every message of `msgs` was sent from src[i] and received
// into dst[i]: send i and receive i succeeded, and receive i got message i
// (its size, its tag, its bytes). Stops at the first fatal failure, as the
// calling test (which ends with these checks) would.
void checkAllDelivered(const std::vector<Msg>& msgs, const std::vector<Outcome>& so,
                       const std::vector<Outcome>& ro,
                       const std::vector<std::vector<uint8_t>>& src,
                       const std::vector<std::vector<uint8_t>>& dst) {
  for (size_t i = 0; i < msgs.size(); i++) {
    ASSERT_TRUE(succeeded(so[i])) << "send " << i;
    ASSERT_TRUE(succeeded(ro[i])) << "recv " << i;
    EXPECT_EQ(ro[i].size, msgs[i].size) << "message " << i;
    EXPECT_EQ(ro[i].tag, msgs[i].tag) << "message " << i << " matched out of order";
    ASSERT_EQ(firstDiff(dst[i].data(), src[i].data(), msgs[i].size), -1)
        << "payload of message " << i << " (size " << msgs[i].size << ")";
  }
}

// Posts all of one side before any of the other, then checks every message
// matched the receive of the same index.
void runOrdering(bool sendsFirst) {
  const size_t kSlice = 64 * 1024, kInline = 4 * 1024;
  auto net = makeNet(3, kSlice, kInline);
  Link l;
  ASSERT_TRUE(openLink(net.get(), &l));
  const int kN = 200;
  std::vector<Msg> msgs = makeMessages(kN, kInline, kSlice, sendsFirst ? 11 : 12);
  std::vector<std::vector<uint8_t>> src(kN), dst(kN);
  for (int i = 0; i < kN; i++) {
    src[i] = pattern(msgs[i].size, msgs[i].seed);
    dst[i].assign(msgs[i].size, 0xEE);
  }
  std::atomic<bool> firstPosted{false};
  auto waitFirst = [&] {
    auto deadline = SteadyClock::now() + kWait;
    while (!firstPosted.load() && SteadyClock::now() < deadline)
      std::this_thread::sleep_for(milliseconds(1));
    return firstPosted.load();
  };
  std::vector<Outcome> so(kN), ro(kN);
  std::thread sender([&] {
    if (!sendsFirst) ASSERT_TRUE(waitFirst()) << "receiver never posted";
    std::vector<void*> reqs(kN);
    for (int i = 0; i < kN; i++)
      ASSERT_EQ(postSend(net.get(), l.send, src[i].data(), msgs[i].size, msgs[i].tag, &reqs[i]),
                tcpxSuccess)
          << "isend " << i << ": " << lastError();
    if (sendsFirst) firstPosted = true;
    for (int i = 0; i < kN; i++) so[i] = waitRequest(net.get(), reqs[i], &l.sendEv);
  });
  std::thread receiver([&] {
    if (sendsFirst) ASSERT_TRUE(waitFirst()) << "sender never posted";
    std::vector<void*> reqs(kN);
    for (int i = 0; i < kN; i++)
      ASSERT_EQ(postRecv(net.get(), l.recv, dst[i].data(), msgs[i].size, &reqs[i]), tcpxSuccess)
          << "irecv " << i << ": " << lastError();
    if (!sendsFirst) firstPosted = true;
    for (int i = 0; i < kN; i++) ro[i] = waitRequest(net.get(), reqs[i], &l.recvEv);
  });
  sender.join();
  receiver.join();
  checkAllDelivered(msgs, so, ro, src, dst);
}

TEST(SocketNet, OrderingSendsPostedBeforeReceives) { runOrdering(true); }
TEST(SocketNet, OrderingReceivesPostedBeforeSends) { runOrdering(false); }

// Inline payloads larger than the receiver's 64 KiB control buffer span
// several reads, so receives get posted while a payload is half in; sizes
// alternate with sliced messages and receives are posted at a random pace.
TEST(SocketNet, LargeInlinePayloadsWithRandomReceivePace) {
  const size_t kSlice = 32 * 1024, kInline = 300 * 1024;
  auto net = makeNet(2, kSlice, kInline);
  Link l;
  ASSERT_TRUE(openLink(net.get(), &l));
  const int kN = 60;
  std::vector<Msg> msgs;
  uint64_t s = 99;
  for (int i = 0; i < kN; i++) {
    s = splitmix64(s);
    size_t size = (i % 3 == 2) ? kInline + 1 + s % (3 * kSlice) : 60 * 1024 + s % (kInline - 60 * 1024 + 1);
    msgs.push_back({size, 0xAB00000000000000ULL + static_cast<uint64_t>(i), 5000 + static_cast<uint64_t>(i)});
  }
  std::vector<std::vector<uint8_t>> src(kN), dst(kN);
  for (int i = 0; i < kN; i++) {
    src[i] = pattern(msgs[i].size, msgs[i].seed);
    dst[i].assign(msgs[i].size, 0xEE);
  }
  std::vector<Outcome> so(kN), ro(kN);
  std::thread sender([&] {
    std::vector<void*> reqs(kN);
    for (int i = 0; i < kN; i++)
      ASSERT_EQ(postSend(net.get(), l.send, src[i].data(), msgs[i].size, msgs[i].tag, &reqs[i]),
                tcpxSuccess);
    for (int i = 0; i < kN; i++) so[i] = waitRequest(net.get(), reqs[i], &l.sendEv);
  });
  std::thread receiver([&] {
    uint64_t r = 7;
    std::vector<std::pair<int, void*>> open;  // receives left in flight
    for (int i = 0; i < kN; i++) {
      r = splitmix64(r);
      std::this_thread::sleep_for(std::chrono::microseconds(r % 800));  // pace only
      void* req = nullptr;
      ASSERT_EQ(postRecv(net.get(), l.recv, dst[i].data(), msgs[i].size, &req), tcpxSuccess);
      if (r & 1) ro[i] = waitRequest(net.get(), req, &l.recvEv);
      else {
        // Leave it in flight while the next one is posted.
        open.push_back({i, req});
        if (i == kN - 1 || open.size() > 3) {
          for (auto& p : open) ro[p.first] = waitRequest(net.get(), p.second, &l.recvEv);
          open.clear();
        }
      }
    }
  });
  sender.join();
  receiver.join();
  checkAllDelivered(msgs, so, ro, src, dst);
}


// The two ends need not share options: the receiver follows what the
// sender's headers say (socket count, inline size, slice size).
TEST(SocketNet, MismatchedOptionsInteroperate) {
  auto rnet = makeNet(1, 1024 * 1024, 64 * 1024);
  auto snet = makeNet(5, 8 * 1024, 100);
  ASSERT_NE(rnet, nullptr);
  ASSERT_NE(snet, nullptr);
  Link l;
  ASSERT_TRUE(openLink(rnet.get(), &l, 1, 0, 0, snet.get()));
  const std::vector<size_t> sizes = {0, 100, 101, 8 * 1024 * 5 + 1, 64 * 1024, 64 * 1024 + 1,
                                     3 * 1024 * 1024 + 11};
  for (size_t i = 0; i < sizes.size(); i++) {
    std::vector<uint8_t> src = pattern(sizes[i], 8000 + i), dst(sizes[i], 0xEE);
    Outcome so, ro;
    ASSERT_TRUE(transferOne(l, src, &dst, 70 + i, &so, &ro));
    ASSERT_TRUE(succeeded(so));
    ASSERT_TRUE(succeeded(ro));
    EXPECT_EQ(ro.size, sizes[i]);
    EXPECT_TRUE(delivered(ro, dst, src, 70 + i)) << "size " << sizes[i];
  }
}

// A connection's own socket count (NetConnectInfo::nsocks, what the CUDA
// communicator asks for) differs from both nets' defaults: messages cut into
// slices over its sockets arrive whole; a count over 64 is refused.
TEST(SocketNet, PerConnectionSocketCount) {
  auto rnet = makeNet(1, 64 * 1024, 1024);
  auto snet = makeNet(2, 64 * 1024, 1024);
  ASSERT_NE(rnet, nullptr);
  ASSERT_NE(snet, nullptr);
  Link l;
  ASSERT_TRUE(openLink(rnet.get(), &l, 1, 0, 0, snet.get(), /*nsocks=*/6));
  EXPECT_TRUE(transferSizes(l, {0, 1000, 6 * 64 * 1024 + 7, size_t{5} << 20}, 9100, 90));
  NetConnectInfo info = connectInfo(7, 1, 0, 1);
  info.nsocks = 65;
  NetHandle handle = l.handle;
  EventCounter ev;
  void* comm = nullptr;
  EXPECT_EQ(connectLoop(snet.get(), &handle, info, &ev, &comm), tcpxInvalidArgument);
  EXPECT_EQ(comm, nullptr);
  EXPECT_NE(lastError().find("nsocks=65"), std::string::npos) << lastError();
}

// TCPX_SOCKET_BUFFER_BYTES: every socket of a connection, on both ends (the
// accepted ones inherit the listener's), has the fixed buffers, which the
// kernel reports doubled and capped by net.core.{w,r}mem_max; messages far
// larger than them arrive intact.
TEST(SocketNet, FixedSocketBuffers) {
  const long want = 96 * 1024;
  long wmax = -1, rmax = -1;
  ASSERT_TRUE(readIntFile("/proc/sys/net/core/wmem_max", &wmax));
  ASSERT_TRUE(readIntFile("/proc/sys/net/core/rmem_max", &rmax));
  ASSERT_GT(wmax, 0);
  ASSERT_GT(rmax, 0);
  SocketNetOptions o;
  ASSERT_EQ(findNetDevices("lo", "/sys", &o.devices), tcpxSuccess) << lastError();
  o.nsocks = 3;
  o.socketBufferBytes = static_cast<size_t>(want);
  std::unique_ptr<SocketNet> snet, rnet;
  ASSERT_EQ(SocketNet::create(o, &snet), tcpxSuccess) << lastError();
  ASSERT_EQ(SocketNet::create(o, &rnet), tcpxSuccess) << lastError();
  Link l;
  ASSERT_TRUE(openLink(rnet.get(), &l, 1, 0, 0, snet.get()));
  ASSERT_TRUE(transferSizes(l, {1, 3000, size_t{5} << 20}, 9500, 93));
  const int sndbuf = static_cast<int>(2 * std::min(want, wmax));
  const int rcvbuf = static_cast<int>(2 * std::min(want, rmax));
  const std::vector<SocketStats> sent = snet->socketStats(l.send, true);
  const std::vector<SocketStats> recvd = rnet->socketStats(l.recv, false);
  ASSERT_EQ(sent.size(), 4u);  // control + 3 data sockets
  ASSERT_EQ(recvd.size(), 4u);
  for (const auto* side : {&sent, &recvd}) {
    for (const SocketStats& st : *side) {
      EXPECT_EQ(st.sndbuf, sndbuf) << (side == &sent ? "sender" : "receiver") << " socket " << st.index;
      EXPECT_EQ(st.rcvbuf, rcvbuf) << (side == &sent ? "sender" : "receiver") << " socket " << st.index;
    }
  }
}

// A net over `ndev` devices of loopback standing in for NICs: 127.0.0.1 as
// "lo", 127.0.0.2 as "lo-b", ... (all of 127/8 is local).
std::unique_ptr<SocketNet> makeMultiDeviceNet(int ndev, int nsocks, int nchannels) {
  SocketNetOptions o;
  std::vector<NetInterface> lo;
  if (findNetDevices("lo", "/sys", &lo) != tcpxSuccess || lo.empty()) {
    ADD_FAILURE() << "no loopback device: " << lastError();
    return nullptr;
  }
  for (int d = 0; d < ndev; d++) {
    NetInterface n = lo[0];
    if (d > 0) {
      n.name = "lo-" + std::string(1, static_cast<char>('a' + d));
      n.addrString = "127.0.0." + std::to_string(d + 1);
      inet_pton(AF_INET, n.addrString.c_str(), &reinterpret_cast<sockaddr_in&>(n.addr).sin_addr);
    }
    o.devices.push_back(n);
  }
  o.nsocks = nsocks;
  o.nchannels = nchannels;
  o.sliceBytes = 64 * 1024;
  std::unique_ptr<SocketNet> net;
  if (SocketNet::create(o, &net) != tcpxSuccess) {
    ADD_FAILURE() << "SocketNet::create: " << lastError();
    return nullptr;
  }
  return net;
}

std::string hostOf(const std::string& addrPort) { return addrPort.substr(0, addrPort.rfind(':')); }

// Channels over two devices: the connector starts on its device 1, so its
// control socket and channel 0 go 127.0.0.2 -> 127.0.0.2 and channel 1
// 127.0.0.1 -> 127.0.0.1 (each NIC talks to the peer's NIC of the same
// index); data socket i is on channel i mod 2; messages of many slices
// arrive intact, and every slice went out on some socket. (Which channel
// takes how many depends on their speed; loopback has no speed to tell, so
// the balance is shown by tests/python/test_multinic_netns.py on
// rate-limited links.)
TEST(SocketNet, ChannelsSpreadOverDevices) {
  auto rnet = makeMultiDeviceNet(2, 4, 0);
  auto snet = makeMultiDeviceNet(2, 4, 0);
  ASSERT_NE(rnet, nullptr);
  ASSERT_NE(snet, nullptr);
  EXPECT_EQ(snet->channels(), 2);  // TCPX_NCHANNELS unset: one channel per device
  Link l;
  l.dev = 1;
  ASSERT_TRUE(openLink(rnet.get(), &l, 1, 0, 0, snet.get()));
  ASSERT_TRUE(transferSizes(l, {0, 1000, (size_t{3} << 20) + 5}, 9300, 91));
  const std::vector<SocketStats> socks = snet->socketStats(l.send, true);
  ASSERT_EQ(socks.size(), 5u);  // control + 4 data sockets dealt over 2 channels
  EXPECT_EQ(socks[0].index, -1);
  EXPECT_EQ(hostOf(socks[0].local), "127.0.0.2");
  EXPECT_EQ(hostOf(socks[0].peer), "127.0.0.2");
  uint64_t perChannel[2] = {0, 0};
  for (size_t i = 1; i < socks.size(); i++) {
    const int channel = socks[i].index % 2;
    const std::string want = channel == 0 ? "127.0.0.2" : "127.0.0.1";
    EXPECT_EQ(hostOf(socks[i].local), want) << "data socket " << socks[i].index;
    EXPECT_EQ(hostOf(socks[i].peer), want) << "data socket " << socks[i].index;
    perChannel[channel] += socks[i].slices;
  }
  EXPECT_EQ(perChannel[0] + perChannel[1], ((size_t{3} << 20) + 5 + 64 * 1024 - 1) / (64 * 1024));
  // The receiver sees the same pairs of addresses, from its side.
  std::multiset<std::string> sent, received;
  for (const SocketStats& st : socks) sent.insert(st.local + ">" + st.peer);
  for (const SocketStats& st : rnet->socketStats(l.recv, false)) received.insert(st.peer + ">" + st.local);
  EXPECT_EQ(sent, received);
}

// A listener with one device and a connector with three: every channel
// goes to the listener's one address; an explicit channel count beats the
// default; every channel gets a data socket even when TCPX_NSOCKS is lower.
TEST(SocketNet, ChannelsToASingleDeviceListener) {
  auto rnet = makeMultiDeviceNet(1, 6, 0);
  auto snet = makeMultiDeviceNet(3, 6, 0);
  ASSERT_NE(rnet, nullptr);
  ASSERT_NE(snet, nullptr);
  EXPECT_EQ(rnet->channels(), 1);
  EXPECT_EQ(snet->channels(), 3);
  Link l;
  ASSERT_TRUE(openLink(rnet.get(), &l, 1, 0, 0, snet.get()));
  ASSERT_TRUE(transferSizes(l, {1 << 20}, 9400, 92));
  const std::vector<SocketStats> socks = snet->socketStats(l.send, true);
  ASSERT_EQ(socks.size(), 7u);
  for (const SocketStats& st : socks) EXPECT_EQ(hostOf(st.peer), "127.0.0.1") << st.index;
  for (size_t i = 1; i < socks.size(); i++)
    EXPECT_EQ(hostOf(socks[i].local), "127.0.0." + std::to_string(1 + socks[i].index % 3)) << i;

  NetConnectInfo info = connectInfo(7, 1, 0, 1);
  info.nchannels = 1;
  NetHandle handle = l.handle;
  void* comm = nullptr;
  void* recv = nullptr;
  NetConnectInfo peer;
  ASSERT_TRUE(connectAccept(snet.get(), handle, info, l.listen, &comm, &recv, &peer));
  std::vector<SocketStats> one = snet->socketStats(comm, true);
  EXPECT_EQ(one.size(), 7u);  // control + 6 data sockets, all on channel 0
  for (const SocketStats& st : one) EXPECT_EQ(hostOf(st.local), "127.0.0.1") << st.index;
  snet->closeSend(comm);
  rnet->closeRecv(recv);

  info.nchannels = 5;
  info.nsocks = 2;
  ASSERT_TRUE(connectAccept(snet.get(), handle, info, l.listen, &comm, &recv, &peer));
  std::vector<SocketStats> five = snet->socketStats(comm, true);
  ASSERT_EQ(five.size(), 6u);  // control + one data socket per channel
  for (size_t i = 1; i < five.size(); i++)
    EXPECT_EQ(hostOf(five[i].local), "127.0.0." + std::to_string(1 + five[i].index % 5 % 3)) << i;
  snet->closeSend(comm);
  rnet->closeRecv(recv);
}

// Receives of capacity 0 with no buffer at all, and sends of 0 bytes from a
// null pointer: sizes are still reported and the stream stays in step.
TEST(SocketNet, ZeroCapacityNullBuffers) {
  auto net = makeNet(3, 16 * 1024, 1024);
  Link l;
  ASSERT_TRUE(openLink(net.get(), &l));
  const std::vector<size_t> sizes = {0, 500, 1024, 1025, 100 * 1024 + 3};
  std::vector<std::vector<uint8_t>> src;
  std::vector<void*> sq, rq;
  for (size_t i = 0; i < sizes.size(); i++) {
    src.push_back(pattern(sizes[i], 12000 + i));
    void* r = nullptr;
    ASSERT_EQ(postRecv(net.get(), l.recv, nullptr, 0, &r), tcpxSuccess);
    rq.push_back(r);
    ASSERT_EQ(postSend(net.get(), l.send, sizes[i] ? src[i].data() : nullptr, sizes[i], 90 + i, &r),
              tcpxSuccess);
    sq.push_back(r);
  }
  // Then a normal message: it must arrive intact.
  std::vector<uint8_t> last = pattern(50 * 1024, 13000), dlast(last.size(), 0);
  void* rl = nullptr;
  void* sl = nullptr;
  ASSERT_EQ(postRecv(net.get(), l.recv, dlast.data(), dlast.size(), &rl), tcpxSuccess);
  ASSERT_EQ(postSend(net.get(), l.send, last.data(), last.size(), 99, &sl), tcpxSuccess);
  for (size_t i = 0; i < sizes.size(); i++) {
    Outcome o = waitRequest(net.get(), rq[i], &l.recvEv);
    ASSERT_TRUE(succeeded(o)) << "recv " << i;
    EXPECT_EQ(o.size, sizes[i]);
    EXPECT_EQ(o.tag, 90 + i);
    Outcome so = waitRequest(net.get(), sq[i], &l.sendEv);
    EXPECT_TRUE(succeeded(so));
  }
  Outcome o = waitRequest(net.get(), rl, &l.recvEv);
  ASSERT_TRUE(succeeded(o));
  EXPECT_TRUE(delivered(o, dlast, last, 99));
  Outcome so = waitRequest(net.get(), sl, &l.sendEv);
  EXPECT_TRUE(succeeded(so));
}

// Two ranks as threads, each sending to the other over its own connection
// at the same time (both directions through one SocketNet).
TEST(SocketNet, BidirectionalStreams) {
  const size_t kSlice = 32 * 1024, kInline = 2 * 1024;
  auto net = makeNet(2, kSlice, kInline);
  Link ab, ba;
  ASSERT_TRUE(openLink(net.get(), &ab, /*src=*/0, /*dst=*/1));
  ASSERT_TRUE(openLink(net.get(), &ba, /*src=*/1, /*dst=*/0));
  const int kN = 60;
  testing::runRanks(2, [&](int r) {
    Link& out = r == 0 ? ab : ba;
    Link& in = r == 0 ? ba : ab;
    std::vector<Msg> mine = makeMessages(kN, kInline, kSlice, 40 + static_cast<uint64_t>(r));
    std::vector<Msg> theirs = makeMessages(kN, kInline, kSlice, 40 + static_cast<uint64_t>(1 - r));
    std::vector<std::vector<uint8_t>> src(kN), dst(kN);
    std::vector<void*> sq(kN), rq(kN);
    for (int i = 0; i < kN; i++) {
      src[i] = pattern(mine[i].size, mine[i].seed);
      dst[i].assign(theirs[i].size, 0xEE);
    }
    for (int i = 0; i < kN; i++) {
      ASSERT_EQ(postSend(net.get(), out.send, src[i].data(), mine[i].size, mine[i].tag, &sq[i]), tcpxSuccess);
      ASSERT_EQ(postRecv(net.get(), in.recv, dst[i].data(), theirs[i].size, &rq[i]), tcpxSuccess);
    }
    for (int i = 0; i < kN; i++) {
      Outcome so = waitRequest(net.get(), sq[i], &out.sendEv);
      ASSERT_TRUE(succeeded(so)) << "rank " << r << " send " << i;
      Outcome ro = waitRequest(net.get(), rq[i], &in.recvEv);
      ASSERT_TRUE(succeeded(ro)) << "rank " << r << " recv " << i;
      EXPECT_EQ(ro.tag, theirs[i].tag);
      std::vector<uint8_t> want = pattern(theirs[i].size, theirs[i].seed);
      ASSERT_EQ(firstDiff(dst[i].data(), want.data(), want.size()), -1) << "rank " << r << " message " << i;
    }
  });
}

// ---------------------------------------------------------------------------
// 3. Receives posted late / early.

// Sends complete first (inline ones at once; small sliced ones once their
// slices sit in the kernel's socket buffers), then the receives are posted:
// the receiver has buffered the control headers and paused the data sockets.
TEST(SocketNet, ReceivePostedAfterSendCompleted) {
  const size_t kSlice = 16 * 1024, kInline = 4 * 1024;
  auto net = makeNet(3, kSlice, kInline);
  Link l;
  ASSERT_TRUE(openLink(net.get(), &l));
  // The sliced bytes (~53 KB) stay below what even one socket buffers by
  // default (tcp_rmem 128 KiB), so the sends complete with no receive posted.
  const std::vector<size_t> sizes = {0, 1, kInline, kInline + 1, 2 * kSlice + 5, 17, kSlice + 17};
  for (int round = 0; round < 3; round++) {
    std::vector<std::vector<uint8_t>> src, dst;
    std::vector<uint64_t> tags;
    for (size_t i = 0; i < sizes.size(); i++) {
      src.push_back(pattern(sizes[i], 300 + round * 10 + i));
      dst.emplace_back(sizes[i], 0xEE);
      tags.push_back((uint64_t{1} << 63) | (round * 100 + i));
    }
    std::thread sender([&] {
      std::vector<void*> reqs(sizes.size());
      for (size_t i = 0; i < sizes.size(); i++)
        ASSERT_EQ(postSend(net.get(), l.send, src[i].data(), sizes[i], tags[i], &reqs[i]), tcpxSuccess);
      for (size_t i = 0; i < sizes.size(); i++) {
        Outcome o = waitRequest(net.get(), reqs[i], &l.sendEv);
        ASSERT_TRUE(succeeded(o))
            << "send " << i << " (size " << sizes[i] << ") did not complete with no receive posted";
      }
    });
    sender.join();  // the synchronisation: every send is complete
    if (::testing::Test::HasFatalFailure()) return;
    // Give the receiver's progress threads a moment to read what arrived, so
    // that the buffered-header path is taken (correctness does not depend on it).
    std::this_thread::sleep_for(milliseconds(20));
    for (size_t i = 0; i < sizes.size(); i++) {
      void* req = nullptr;
      ASSERT_EQ(postRecv(net.get(), l.recv, dst[i].data(), sizes[i], &req), tcpxSuccess);
      Outcome o = waitRequest(net.get(), req, &l.recvEv);
      ASSERT_TRUE(succeeded(o)) << "recv " << i;
      EXPECT_EQ(o.size, sizes[i]);
      EXPECT_TRUE(delivered(o, dst[i], src[i], tags[i])) << "message " << i;
    }
  }
}

// A large send posted well before its receive: it stalls on TCP backpressure
// and resumes when the receive is posted.
TEST(SocketNet, LargeSendStallsUntilReceivePosted) {
  const size_t kSlice = 64 * 1024, kInline = 4 * 1024;
  auto net = makeNet(3, kSlice, kInline);
  Link l;
  ASSERT_TRUE(openLink(net.get(), &l));
  const size_t size = 5 * 1024 * 1024 + 3;
  std::vector<uint8_t> small = pattern(100, 1), big = pattern(size, 2);
  void* r0 = nullptr;
  void* r1 = nullptr;
  ASSERT_EQ(postSend(net.get(), l.send, small.data(), small.size(), 10, &r0), tcpxSuccess);
  ASSERT_EQ(postSend(net.get(), l.send, big.data(), size, 11, &r1), tcpxSuccess);
  Outcome o0 = waitRequest(net.get(), r0, &l.sendEv);
  ASSERT_TRUE(succeeded(o0));
  // Let the big send run into backpressure (it cannot finish without a
  // receive unless the kernel buffers 5 MiB; either way the data must match).
  Outcome o1;
  bool pending = true;
  auto until = SteadyClock::now() + milliseconds(100);
  while (SteadyClock::now() < until && (pending = stillPending(net.get(), r1, &o1)))
    std::this_thread::sleep_for(milliseconds(5));
  std::vector<uint8_t> d0(100, 0xEE), d1(size, 0xEE);
  void* q0 = nullptr;
  void* q1 = nullptr;
  ASSERT_EQ(postRecv(net.get(), l.recv, d0.data(), d0.size(), &q0), tcpxSuccess);
  ASSERT_EQ(postRecv(net.get(), l.recv, d1.data(), d1.size(), &q1), tcpxSuccess);
  if (pending) o1 = waitRequest(net.get(), r1, &l.sendEv);
  ASSERT_TRUE(succeeded(o1));
  Outcome p0 = waitRequest(net.get(), q0, &l.recvEv);
  Outcome p1 = waitRequest(net.get(), q1, &l.recvEv);
  ASSERT_TRUE(succeeded(p0));
  ASSERT_TRUE(succeeded(p1));
  EXPECT_TRUE(delivered(p0, d0, small, 10));
  EXPECT_TRUE(delivered(p1, d1, big, 11));
  EXPECT_EQ(p1.size, size);
}

// Receives posted long before the sends: they stay pending, then complete
// with the right data once the sender sends.
TEST(SocketNet, ReceivePostedLongBeforeSend) {
  const size_t kSlice = 64 * 1024, kInline = 4 * 1024;
  auto net = makeNet(3, kSlice, kInline);
  Link l;
  ASSERT_TRUE(openLink(net.get(), &l));
  const std::vector<size_t> sizes = {0, 1, kInline, kInline + 1, kSlice * 3 + 17, 5 * 1024 * 1024 + 3};
  std::vector<std::vector<uint8_t>> src, dst;
  for (size_t i = 0; i < sizes.size(); i++) {
    src.push_back(pattern(sizes[i], 700 + i));
    dst.emplace_back(sizes[i], 0xEE);
  }
  std::vector<void*> rq(sizes.size());
  for (size_t i = 0; i < sizes.size(); i++)
    ASSERT_EQ(postRecv(net.get(), l.recv, dst[i].data(), sizes[i], &rq[i]), tcpxSuccess);
  // Nothing was sent: nothing completes.
  auto until = SteadyClock::now() + milliseconds(50);
  while (SteadyClock::now() < until) {
    Outcome o;
    ASSERT_TRUE(stillPending(net.get(), rq[0], &o)) << "receive completed with nothing sent: " << describe(o);
    std::this_thread::sleep_for(milliseconds(5));
  }
  std::vector<Outcome> so(sizes.size());
  std::thread sender([&] {
    for (size_t i = 0; i < sizes.size(); i++) {
      void* req = nullptr;
      ASSERT_EQ(postSend(net.get(), l.send, src[i].data(), sizes[i], 40 + i, &req), tcpxSuccess);
      so[i] = waitRequest(net.get(), req, &l.sendEv);
    }
  });
  std::vector<Outcome> ro(sizes.size());
  for (size_t i = 0; i < sizes.size(); i++) ro[i] = waitRequest(net.get(), rq[i], &l.recvEv);
  sender.join();
  for (size_t i = 0; i < sizes.size(); i++) {
    ASSERT_TRUE(succeeded(so[i])) << "send " << i;
    ASSERT_TRUE(succeeded(ro[i])) << "recv " << i;
    EXPECT_EQ(ro[i].size, sizes[i]);
    EXPECT_TRUE(delivered(ro[i], dst[i], src[i], 40 + i)) << "message " << i;
  }
}

// ---------------------------------------------------------------------------
// 4. Truncation.

struct TruncCase {
  size_t size;
  size_t capacity;
};

// Each truncated message is followed by one of normal size: the stream must
// stay in step. `receivesFirst` posts all receives before any send; otherwise
// all sends are posted (and the inline ones complete) before the receives.
void runTruncation(bool receivesFirst) {
  const size_t kSlice = 64 * 1024, kInline = 4 * 1024;
  auto net = makeNet(3, kSlice, kInline);
  Link l;
  ASSERT_TRUE(openLink(net.get(), &l));
  const std::vector<TruncCase> cases = {
      {1000, 10},                             // inline, cut
      {kInline, 0},                           // inline, nothing kept
      {kInline + 1, kInline},                 // sliced, one byte dropped
      {kSlice * 3 + 17, kSlice},              // sliced, cut at a slice boundary
      {kSlice * 3 + 17, 0},                   // sliced, nothing kept
      {5 * 1024 * 1024 + 3, 100 * 1024 + 7},  // many slices, cut inside one
      {1, 0},
  };
  const size_t kGuard = 64;
  struct Item {
    size_t size, capacity;
    uint64_t tag;
    std::vector<uint8_t> src, dst;
  };
  std::vector<Item> items;
  int k = 0;
  for (const TruncCase& c : cases) {
    for (int follow = 0; follow < 2; follow++, k++) {
      Item it;
      it.size = follow ? (k % 2 ? 3000 : kSlice + 5) : c.size;
      it.capacity = follow ? it.size : c.capacity;
      it.tag = 0x7700000000000000ULL + static_cast<uint64_t>(k);
      it.src = pattern(it.size, 900 + static_cast<uint64_t>(k));
      it.dst.assign(it.capacity + kGuard, 0xEE);
      items.push_back(std::move(it));
    }
  }
  const size_t n = items.size();
  std::vector<void*> sreq(n), rreq(n);
  auto postRecvs = [&] {
    for (size_t i = 0; i < n; i++)
      ASSERT_EQ(postRecv(net.get(), l.recv, items[i].dst.data(), items[i].capacity, &rreq[i]),
                tcpxSuccess);
  };
  auto postSends = [&] {
    for (size_t i = 0; i < n; i++)
      ASSERT_EQ(postSend(net.get(), l.send, items[i].src.data(), items[i].size, items[i].tag, &sreq[i]),
                tcpxSuccess);
  };
  if (receivesFirst) {
    postRecvs();
    postSends();
  } else {
    postSends();
    // Give the inline headers a moment to arrive unmatched (not needed for correctness).
    std::this_thread::sleep_for(milliseconds(20));
    postRecvs();
  }
  if (::testing::Test::HasFatalFailure()) return;
  std::vector<Outcome> so(n);
  ScopedThread sw([&] {
    for (size_t i = 0; i < n; i++) so[i] = waitRequest(net.get(), sreq[i], &l.sendEv);
  });
  for (size_t i = 0; i < n; i++) {
    const Item& it = items[i];
    Outcome o = waitRequest(net.get(), rreq[i], &l.recvEv);
    ASSERT_TRUE(succeeded(o))
        << "recv " << i << " (size " << it.size << ", capacity " << it.capacity << ")";
    EXPECT_EQ(o.size, it.size) << "recv " << i << " reports the sender's full size";
    EXPECT_EQ(o.tag, it.tag) << "recv " << i << ": stream out of step";
    EXPECT_EQ(firstDiff(it.dst.data(), it.src.data(), std::min(it.size, it.capacity)), -1)
        << "recv " << i << " kept bytes";
    for (size_t b = it.capacity; b < it.dst.size(); b++)
      ASSERT_EQ(it.dst[b], 0xEE) << "recv " << i << " wrote past its capacity at " << b;
  }
  sw.join();
  for (size_t i = 0; i < n; i++)
    EXPECT_TRUE(succeeded(so[i])) << "send " << i;
}

TEST(SocketNet, TruncationReceivesPostedFirst) { runTruncation(true); }
TEST(SocketNet, TruncationSendsPostedFirst) { runTruncation(false); }

// ---------------------------------------------------------------------------
// 5. Handshake checks.

// A connector with wrong credentials is told why; the listener never
// accepts it, and later connects with the right ones work.
void runRejection(bool wrongSecret) {
  auto net = makeNet(3, 64 * 1024, 4 * 1024);
  NetHandle handle;
  void* lc = nullptr;
  ASSERT_TRUE(listenOn(net.get(), listenInfo(1, /*rank=*/3), &handle, &lc));

  for (int attempt = 0; attempt < 2; attempt++) {
    NetHandle h = handle;
    NetConnectInfo bad = connectInfo(wrongSecret ? 2 : 1, /*srcRank=*/9,
                                     /*dstRank=*/wrongSecret ? 3 : 4, /*connIndex=*/1);
    void* sc = nullptr;
    tcpxResult_t rc = connectLoop(net.get(), &h, bad, nullptr, &sc);
    std::string err = lastError();
    EXPECT_NE(rc, tcpxSuccess) << "connect with a wrong " << (wrongSecret ? "secret" : "dstRank")
                               << " succeeded";
    EXPECT_NE(rc, tcpxTimeout) << "connect neither failed nor succeeded: " << err;
    EXPECT_EQ(sc, nullptr);
    EXPECT_NE(err.find("rejected"), std::string::npos) << "error: " << err;
    if (sc) net->closeSend(sc);
  }
  // Nothing reaches accept() (give the listener a moment to misbehave).
  void* rc0 = nullptr;
  NetConnectInfo p0;
  ASSERT_EQ(acceptLoop(net.get(), lc, nullptr, &rc0, &p0, milliseconds(200)), tcpxSuccess);
  EXPECT_EQ(rc0, nullptr) << "a rejected connection was accepted (srcRank " << p0.srcRank << ")";
  if (rc0) net->closeRecv(rc0);

  // The right credentials still work on the same listener.
  void* sc = nullptr;
  void* rc = nullptr;
  NetConnectInfo peer;
  ASSERT_TRUE(connectAccept(net.get(), handle, connectInfo(1, /*src=*/8, /*dst=*/3, /*conn=*/2), lc,
                            &sc, &rc, &peer));
  EXPECT_EQ(peer.srcRank, 8u);
  EXPECT_EQ(peer.connIndex, 2u);
  std::vector<uint8_t> src = pattern(200 * 1024 + 1, 55), dst(src.size(), 0);
  Outcome so, ro;
  ASSERT_TRUE(
      transferOne(net.get(), sc, nullptr, net.get(), rc, nullptr, src, &dst, 123, &so, &ro));
  EXPECT_TRUE(succeeded(so));
  EXPECT_TRUE(succeeded(ro));
  EXPECT_TRUE(delivered(ro, dst, src, 123));
  // And only that one connection was ever accepted.
  void* extra = nullptr;
  ASSERT_EQ(net->accept(lc, nullptr, &extra, &peer), tcpxSuccess);
  EXPECT_EQ(extra, nullptr);
  net->closeSend(sc);
  net->closeRecv(rc);
  net->closeListen(lc);
}

TEST(SocketNet, HandshakeRejectsWrongSecret) { runRejection(true); }
TEST(SocketNet, HandshakeRejectsWrongDstRank) { runRejection(false); }

// Raw TCP clients (a port scanner, a stray process) at the listener: garbage,
// silence past the handshake timeout, a partial hello. The listener closes
// them, never accepts them, and keeps serving real connections meanwhile.
// The listener's port is found as the listening socket that listen() added
// to this process (/proc/self/fd), not from the handle's private layout.
TEST(SocketNet, RawClientsAreDroppedWithoutDisturbingOthers) {
  auto net = makeNet(2, 64 * 1024, 4 * 1024, /*handshakeTimeoutMs=*/300);
  ASSERT_NE(net, nullptr);
  std::set<int> before = listeningFds();
  NetHandle handle;
  void* lc = nullptr;
  ASSERT_TRUE(listenOn(net.get(), listenInfo(4, /*rank=*/0), &handle, &lc));
  std::set<int> after = listeningFds();
  std::vector<int> added;
  for (int fd : after)
    if (!before.count(fd)) added.push_back(fd);
  if (added.size() != 1) {
    net->closeListen(lc);
    GTEST_SKIP() << "could not identify the listening socket (" << added.size() << " candidates)";
  }
  sockaddr_storage addr{};
  socklen_t alen = sizeof(addr);
  ASSERT_EQ(getsockname(added[0], reinterpret_cast<sockaddr*>(&addr), &alen), 0);

  // Silent client: connected, says nothing.
  int silent = rawConnect(addr, alen);
  ASSERT_GE(silent, 0) << strerror(errno);
  // Garbage client: a hello-sized block of junk.
  int junk = rawConnect(addr, alen);
  ASSERT_GE(junk, 0);
  std::vector<uint8_t> garbage(56, 0x5A);
  ASSERT_EQ(send(junk, garbage.data(), garbage.size(), MSG_NOSIGNAL), 56);
  // Partial client: a few bytes, then gone.
  int partial = rawConnect(addr, alen);
  ASSERT_GE(partial, 0);
  ASSERT_EQ(send(partial, garbage.data(), 20, MSG_NOSIGNAL), 20);
  close(partial);

  // A real connection while the silent one is still pending.
  void* sc = nullptr;
  void* rc = nullptr;
  NetConnectInfo peer;
  ASSERT_TRUE(connectAccept(net.get(), handle, connectInfo(4, /*src=*/1, /*dst=*/0, /*conn=*/5), lc,
                            &sc, &rc, &peer));
  EXPECT_EQ(peer.connIndex, 5u);

  EXPECT_TRUE(waitPeerClosed(junk, seconds(5))) << "the listener kept a garbage connection open";
  EXPECT_TRUE(waitPeerClosed(silent, seconds(5)))
      << "the listener kept a silent connection open past the handshake timeout";
  close(junk);
  close(silent);

  std::vector<uint8_t> src = pattern(100 * 1024, 77), dst(src.size(), 0);
  Outcome so, ro;
  ASSERT_TRUE(transferOne(net.get(), sc, nullptr, net.get(), rc, nullptr, src, &dst, 9, &so, &ro,
                          /*sendFirst=*/true));
  EXPECT_TRUE(succeeded(so));
  EXPECT_TRUE(succeeded(ro));
  EXPECT_EQ(firstDiff(dst.data(), src.data(), src.size()), -1);
  void* extra = nullptr;
  ASSERT_EQ(acceptLoop(net.get(), lc, nullptr, &extra, &peer, milliseconds(100)), tcpxSuccess);
  EXPECT_EQ(extra, nullptr) << "a raw client was accepted";
  net->closeSend(sc);
  net->closeRecv(rc);
  net->closeListen(lc);
}

// A connect() to a listener that is gone fails within its timeout.
TEST(SocketNet, ConnectToClosedListenerFails) {
  auto net = makeNet(2, 64 * 1024, 4 * 1024);
  NetHandle handle;
  void* lc = nullptr;
  ASSERT_TRUE(listenOn(net.get(), NetListenInfo(), &handle, &lc));
  ASSERT_EQ(net->closeListen(lc), tcpxSuccess);
  NetConnectInfo ci;
  void* sc = nullptr;
  auto t0 = SteadyClock::now();
  tcpxResult_t rc = connectLoop(net.get(), &handle, ci, nullptr, &sc, /*timeoutMs=*/300, seconds(15));
  std::string err = lastError();
  EXPECT_NE(rc, tcpxSuccess);
  EXPECT_EQ(err.find("test bound"), std::string::npos) << "connect() did not give up by itself";
  EXPECT_EQ(sc, nullptr);
  EXPECT_LT(SteadyClock::now() - t0, seconds(10)) << "took too long to give up";
  // Refused past the deadline: reported as a remote error (net.h speaks of
  // tcpxTimeout for attempts past the deadline; either says "gave up").
  EXPECT_TRUE(rc == tcpxRemoteError || rc == tcpxTimeout) << resultName(rc) << ": " << err;
}


// A listener whose progress thread does not answer (stalled here on
// purpose): connect() gives up at its timeout with tcpxTimeout instead of
// waiting forever; once the listener runs again, a new connect works, and
// anything the listener assembled from the abandoned attempt is dead.
TEST(SocketNet, ConnectTimesOutWhenListenerStalls) {
  auto lnet = makeNet(2, 64 * 1024, 4 * 1024, 30000, /*nthreads=*/1);
  auto cnet = makeNet(2, 64 * 1024, 4 * 1024);
  ASSERT_NE(lnet, nullptr);
  ASSERT_NE(cnet, nullptr);
  NetHandle handle;
  void* lc = nullptr;
  ASSERT_TRUE(listenOn(lnet.get(), NetListenInfo(), &handle, &lc));
  NetConnectInfo ci;
  ci.connIndex = 1;
  {
    ThreadBlocker stall(lnet.get(), 0);
    ASSERT_TRUE(stall.blocked());
    NetHandle h = handle;
    void* sc = nullptr;
    auto t0 = SteadyClock::now();
    tcpxResult_t rc = connectLoop(cnet.get(), &h, ci, nullptr, &sc, /*timeoutMs=*/300, seconds(10));
    std::string err = lastError();
    EXPECT_EQ(rc, tcpxTimeout) << err;
    EXPECT_EQ(err.find("test bound"), std::string::npos) << "connect() did not give up by itself";
    EXPECT_EQ(sc, nullptr);
    EXPECT_LT(SteadyClock::now() - t0, seconds(5));
    if (sc) cnet->closeSend(sc);
  }
  NetHandle h = handle;
  ci.connIndex = 2;
  void* sc = nullptr;
  ASSERT_EQ(connectLoop(cnet.get(), &h, ci, nullptr, &sc), tcpxSuccess) << lastError();
  void* good = nullptr;
  auto deadline = SteadyClock::now() + kWait;
  while (!good && SteadyClock::now() < deadline) {
    void* rc = nullptr;
    NetConnectInfo peer;
    ASSERT_EQ(acceptLoop(lnet.get(), lc, nullptr, &rc, &peer), tcpxSuccess);
    ASSERT_NE(rc, nullptr) << "the new connection was not accepted";
    if (peer.connIndex == 2) {
      good = rc;
    } else {
      EXPECT_EQ(peer.connIndex, 1u);
      expectReceiveFails(lnet.get(), rc, "");
      lnet->closeRecv(rc);
    }
  }
  ASSERT_NE(good, nullptr);
  std::vector<uint8_t> src = pattern(300 * 1024, 5), dst(src.size(), 0);
  Outcome so, ro;
  ASSERT_TRUE(
      transferOne(cnet.get(), sc, nullptr, lnet.get(), good, nullptr, src, &dst, 3, &so, &ro));
  EXPECT_TRUE(succeeded(so));
  EXPECT_TRUE(succeeded(ro));
  EXPECT_EQ(firstDiff(dst.data(), src.data(), src.size()), -1);
  cnet->closeSend(sc);
  lnet->closeRecv(good);
  lnet->closeListen(lc);
}

// connectAbandon() in the middle of a connect frees it. If every hello went
// out before the abandon, the listener may still complete and offer the
// connection; then it must be a dead one (its first receive fails).
TEST(SocketNet, ConnectAbandonMidway) {
  auto net = makeNet(2, 64 * 1024, 4 * 1024, /*handshakeTimeoutMs=*/300);
  NetHandle handle;
  void* lc = nullptr;
  ASSERT_TRUE(listenOn(net.get(), NetListenInfo(), &handle, &lc));
  NetHandle h = handle;
  NetConnectInfo ci;
  void* sc = nullptr;
  ASSERT_EQ(net->connect(0, &h, ci, nullptr, 10000, &sc), tcpxSuccess);
  if (sc) {
    net->closeSend(sc);  // connected in one call: nothing to abandon
  } else {
    net->connectAbandon(&h);
    net->connectAbandon(&h);  // a second call is harmless
  }
  void* rc = nullptr;
  NetConnectInfo peer;
  ASSERT_EQ(acceptLoop(net.get(), lc, nullptr, &rc, &peer, milliseconds(500)), tcpxSuccess);
  if (rc && !sc) {
    EXPECT_EQ(peer.connIndex, ci.connIndex);
    expectReceiveFails(net.get(), rc, "");  // "closed" or "broke": any error
  }
  if (rc) net->closeRecv(rc);
  // The same public handle connects afresh.
  ASSERT_TRUE(connectAccept(net.get(), handle, ci, lc, &sc, &rc, &peer));
  net->closeSend(sc);
  net->closeRecv(rc);
  net->closeListen(lc);
}

// ---------------------------------------------------------------------------
// 6. Many concurrent connections.

TEST(SocketNet, ManyConcurrentConnections) {
  const size_t kSlice = 32 * 1024, kInline = 4 * 1024, kMsg = 100 * 1024;
  auto net = makeNet(2, kSlice, kInline, 30000, /*nthreads=*/3);
  const int kThreads = 8, kPerThread = 8, kConns = kThreads * kPerThread, kMsgs = 3;
  NetHandle handle;
  void* lc = nullptr;
  ASSERT_TRUE(listenOn(net.get(), listenInfo(9, /*rank=*/0), &handle, &lc));
  auto seedOf = [](uint32_t src, uint32_t conn, int m) {
    return (uint64_t{src} << 32) | (uint64_t{conn} << 8) | static_cast<uint64_t>(m);
  };
  auto tagOf = [](uint32_t src, uint32_t conn, int m) {
    return 0xC0DE000000000000ULL | (uint64_t{src} << 24) | (uint64_t{conn} << 8) | static_cast<uint64_t>(m);
  };
  std::atomic<int> sendFailures{0};
  std::mutex closeMu;
  std::vector<void*> toClose;
  std::vector<std::unique_ptr<ScopedThread>> senders;
  for (int t = 0; t < kThreads; t++) {
    senders.push_back(std::make_unique<ScopedThread>([&, t] {
      const uint32_t src = 100 + static_cast<uint32_t>(t);
      std::vector<NetHandle> hs(kPerThread, handle);  // one handle object per connection
      std::vector<void*> scs(kPerThread, nullptr);
      std::vector<NetConnectInfo> infos(kPerThread);
      for (int c = 0; c < kPerThread; c++)
        infos[c] = connectInfo(9, src, /*dstRank=*/0, static_cast<uint32_t>(c * 3 + 1));
      // Drive all of this thread's connects together.
      auto deadline = SteadyClock::now() + kWait;
      int up = 0;
      while (up < kPerThread && SteadyClock::now() < deadline) {
        for (int c = 0; c < kPerThread; c++) {
          if (scs[c]) continue;
          tcpxResult_t r = net->connect(0, &hs[c], infos[c], nullptr, 15000, &scs[c]);
          if (r != tcpxSuccess) {
            ADD_FAILURE() << "thread " << t << " connect " << c << ": " << lastError();
            sendFailures++;
            return;
          }
          if (scs[c]) up++;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
      if (up < kPerThread) {
        ADD_FAILURE() << "thread " << t << ": only " << up << " connections up";
        for (int c = 0; c < kPerThread; c++)
          if (!scs[c]) net->connectAbandon(&hs[c]);
        sendFailures++;
      }
      std::vector<std::vector<uint8_t>> bufs;
      std::vector<void*> reqs;
      bufs.reserve(kPerThread * kMsgs);
      for (int c = 0; c < kPerThread; c++) {
        if (!scs[c]) continue;
        for (int m = 0; m < kMsgs; m++) {
          bufs.push_back(pattern(kMsg, seedOf(src, infos[c].connIndex, m)));
          void* req = nullptr;
          if (postSend(net.get(), scs[c], bufs.back().data(), kMsg, tagOf(src, infos[c].connIndex, m),
                       &req) != tcpxSuccess) {
            ADD_FAILURE() << "isend: " << lastError();
            sendFailures++;
            continue;
          }
          reqs.push_back(req);
        }
      }
      for (void* req : reqs) {
        Outcome o = waitRequest(net.get(), req, nullptr);
        if (!(o.finished && o.rc == tcpxSuccess)) {
          ADD_FAILURE() << "thread " << t << " send: " << describe(o);
          sendFailures++;
        }
      }
      // Closed by the main thread once the receiver has everything.
      std::lock_guard<std::mutex> lk(closeMu);
      for (void* sc : scs)
        if (sc) toClose.push_back(sc);
    }));
  }
  // Receiver: accept all, post receives on each as it arrives, then check.
  struct Accepted {
    void* rc;
    NetConnectInfo peer;
    std::vector<std::vector<uint8_t>> dst;
    std::vector<void*> reqs;
  };
  std::vector<Accepted> acc;
  acc.reserve(kConns);
  auto deadline = SteadyClock::now() + kWait;
  while (static_cast<int>(acc.size()) < kConns && SteadyClock::now() < deadline) {
    void* rc = nullptr;
    NetConnectInfo peer;
    tcpxResult_t ar = net->accept(lc, nullptr, &rc, &peer);
    if (ar != tcpxSuccess) {
      ADD_FAILURE() << "accept: " << lastError();
      break;
    }
    if (!rc) {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      continue;
    }
    acc.push_back({rc, peer, {}, {}});
    Accepted& a = acc.back();
    for (int m = 0; m < kMsgs; m++) {
      a.dst.emplace_back(kMsg + 16, 0xEE);
      void* req = nullptr;
      EXPECT_EQ(postRecv(net.get(), rc, a.dst.back().data(), kMsg + 16, &req), tcpxSuccess);
      a.reqs.push_back(req);
    }
  }
  EXPECT_EQ(static_cast<int>(acc.size()), kConns) << "connections accepted";
  std::set<std::pair<uint32_t, uint32_t>> seen;
  for (Accepted& a : acc) {
    EXPECT_EQ(a.peer.dstRank, 0u);
    EXPECT_TRUE(seen.insert({a.peer.srcRank, a.peer.connIndex}).second)
        << "connection (" << a.peer.srcRank << ", " << a.peer.connIndex << ") accepted twice";
    for (int m = 0; m < kMsgs; m++) {
      ASSERT_NE(a.reqs[m], nullptr);
      Outcome o = waitRequest(net.get(), a.reqs[m], nullptr);
      ASSERT_TRUE(succeeded(o))
          << "recv from (" << a.peer.srcRank << ", " << a.peer.connIndex << ") #" << m;
      EXPECT_EQ(o.size, kMsg);
      EXPECT_EQ(o.tag, tagOf(a.peer.srcRank, a.peer.connIndex, m))
          << "message attributed to the wrong connection";
      std::vector<uint8_t> want = pattern(kMsg, seedOf(a.peer.srcRank, a.peer.connIndex, m));
      EXPECT_EQ(firstDiff(a.dst[m].data(), want.data(), kMsg), -1)
          << "payload from (" << a.peer.srcRank << ", " << a.peer.connIndex << ") #" << m;
    }
  }
  for (auto& t : senders) t->join();
  EXPECT_EQ(sendFailures.load(), 0);
  for (void* sc : toClose) net->closeSend(sc);
  for (Accepted& a : acc) net->closeRecv(a.rc);
  net->closeListen(lc);
}

// ---------------------------------------------------------------------------
// 7. Sizes past 2 GiB (and 32-bit offsets).

TEST(SocketNet, MessageLargerThan2GiB) {
  const size_t kSize = (size_t{2} << 30) + 4099;
  std::unique_ptr<uint8_t[]> src(new (std::nothrow) uint8_t[kSize]);
  std::unique_ptr<uint8_t[]> dst(new (std::nothrow) uint8_t[kSize]);
  if (!src || !dst) GTEST_SKIP() << "cannot allocate 2 x " << kSize << " bytes";
  // A cheap pattern: every 8-byte word holds its own index scrambled (so a
  // slice landing at a wrong offset shows), the first and last 64 KiB random.
  const size_t words = kSize / 8;
  auto* w = reinterpret_cast<uint64_t*>(src.get());
  for (size_t i = 0; i < words; i++) w[i] = (i * 0x9E3779B97F4A7C15ULL) ^ 0x5555;
  for (size_t i = words * 8; i < kSize; i++) src[i] = static_cast<uint8_t>(i);
  fillPattern(src.get(), 64 * 1024, 31337);
  fillPattern(src.get() + kSize - 64 * 1024, 64 * 1024, 31338);

  auto net = makeNet(4, 1024 * 1024, 16 * 1024);
  Link l;
  ASSERT_TRUE(openLink(net.get(), &l));
  const uint64_t tag = 0x8000000080000001ULL;
  Outcome so, ro;
  ScopedThread sender([&] {
    void* req = nullptr;
    ASSERT_EQ(postSend(net.get(), l.send, src.get(), kSize, tag, &req), tcpxSuccess) << lastError();
    so = waitRequest(net.get(), req, &l.sendEv, seconds(180));
  });
  void* req = nullptr;
  ASSERT_EQ(postRecv(net.get(), l.recv, dst.get(), kSize, &req), tcpxSuccess) << lastError();
  ro = waitRequest(net.get(), req, &l.recvEv, seconds(180));
  sender.join();
  ASSERT_TRUE(succeeded(so));
  ASSERT_TRUE(succeeded(ro));
  EXPECT_EQ(so.size, kSize);
  EXPECT_EQ(ro.size, kSize) << "64-bit size reported by test()";
  EXPECT_EQ(ro.tag, tag);
  EXPECT_EQ(firstDiff(dst.get(), src.get(), 64 * 1024), -1) << "first 64 KiB";
  EXPECT_EQ(firstDiff(dst.get() + kSize - 64 * 1024, src.get() + kSize - 64 * 1024, 64 * 1024), -1)
      << "last 64 KiB";
  EXPECT_EQ(firstDiff(dst.get(), src.get(), kSize), -1) << "whole message";
}

// ---------------------------------------------------------------------------
// 8. Peer close.

// Runs fn on a helper thread; aborts the run if it does not return in `bound`
// (a hung close would otherwise hang the whole suite).
void runWithin(SteadyClock::duration bound, const char* what, const std::function<void()>& fn) {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::thread t([&] {
    fn();
    std::lock_guard<std::mutex> lk(mu);
    done = true;
    cv.notify_all();
  });
  std::unique_lock<std::mutex> lk(mu);
  if (!cv.wait_for(lk, bound, [&] { return done; })) {
    fprintf(stderr, "FATAL: %s did not return within the bound; aborting\n", what);
    fflush(stderr);
    std::abort();
  }
  lk.unlock();
  t.join();
}

// Runs `close` within the bound (as runWithin(), `what` naming it) and says
// how it went.
::testing::AssertionResult closeWithin(const char* what,
                                       const std::function<tcpxResult_t()>& close) {
  tcpxResult_t r = tcpxSuccess;
  std::string err;
  runWithin(kWait, what, [&] {
    r = close();
    if (r != tcpxSuccess) err = lastError();
  });
  if (r == tcpxSuccess) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << resultName(r) << " " << err;
}

// Closes l's send (receive) comm within the bound and takes it off the Link.
::testing::AssertionResult closeSendWithin(Link& l, const char* what = "closeSend") {
  void* comm = l.send;
  l.send = nullptr;
  return closeWithin(what, [&] { return l.sendNet->closeSend(comm); });
}

::testing::AssertionResult closeRecvWithin(Link& l, const char* what = "closeRecv") {
  void* comm = l.recv;
  l.recv = nullptr;
  return closeWithin(what, [&] { return l.net->closeRecv(comm); });
}

// Posts a send of each of `msgs` on `l` (tags firstTag, firstTag + 1, ...),
// all before waiting, then waits for each in turn; fails naming the first
// that could not be posted or did not succeed.
::testing::AssertionResult sendAll(Link& l, const std::vector<const std::vector<uint8_t>*>& msgs,
                                   uint64_t firstTag) {
  std::vector<void*> reqs(msgs.size(), nullptr);
  for (size_t i = 0; i < msgs.size(); i++) {
    tcpxResult_t r =
        postSend(l.sendNet, l.send, msgs[i]->data(), msgs[i]->size(), firstTag + i, &reqs[i]);
    if (r != tcpxSuccess)
      return ::testing::AssertionFailure()
             << "isend " << i << ": " << resultName(r) << " " << lastError();
  }
  std::vector<Outcome> out;
  for (void* req : reqs) out.push_back(waitRequest(l.sendNet, req, &l.sendEv));
  for (size_t i = 0; i < out.size(); i++)
    if (!succeeded(out[i]))
      return ::testing::AssertionFailure() << "send " << i << ": " << describe(out[i]);
  return ::testing::AssertionSuccess();
}

// The receiver closes while a send that cannot complete is in flight: the
// send fails (rather than hanging), and later sends on the comm fail too.
TEST(SocketNet, ReceiverCloseFailsInFlightSend) {
  auto net = makeNet(2, 1024 * 1024, 16 * 1024);
  Link l;
  ASSERT_TRUE(openLink(net.get(), &l));
  // 256 MiB with no receive posted: far more than two sockets can buffer.
  const size_t kBig = 256u << 20;
  std::unique_ptr<uint8_t[]> big(new (std::nothrow) uint8_t[kBig]);
  if (!big) GTEST_SKIP() << "cannot allocate " << kBig;
  memset(big.get(), 0x3C, kBig);
  void* sreq = nullptr;
  ASSERT_EQ(postSend(net.get(), l.send, big.get(), kBig, 1, &sreq), tcpxSuccess);
  Outcome early;
  auto until = SteadyClock::now() + milliseconds(200);
  while (SteadyClock::now() < until) {
    ASSERT_TRUE(stillPending(net.get(), sreq, &early))
        << "a 256 MiB send finished with no receive posted: " << describe(early);
    std::this_thread::sleep_for(milliseconds(10));
  }
  EXPECT_TRUE(closeRecvWithin(l));
  Outcome o = waitRequest(net.get(), sreq, &l.sendEv);
  ASSERT_TRUE(o.finished) << "the send was still pending 20 s after the receiver closed";
  EXPECT_NE(o.rc, tcpxSuccess) << "a send whose receiver closed before reading it succeeded";
  // The comm is broken: a new send fails at once or through test().
  char b[8] = {};
  void* r2 = nullptr;
  tcpxResult_t rc = net->isend(l.send, b, sizeof(b), 2, nullptr, &r2);
  if (rc == tcpxSuccess) {
    ASSERT_NE(r2, nullptr);
    // An inline send may count as done once queued; a sliced one must fail.
    Outcome o2 = waitRequest(net.get(), r2, &l.sendEv);
    EXPECT_TRUE(o2.finished) << describe(o2);
    void* r3 = nullptr;
    rc = net->isend(l.send, big.get(), 1 << 20, 3, nullptr, &r3);
    if (rc == tcpxSuccess) {
      Outcome o3 = waitRequest(net.get(), r3, &l.sendEv);
      EXPECT_TRUE(o3.finished && o3.rc != tcpxSuccess) << "send on a broken comm: " << describe(o3);
    }
  }
  EXPECT_TRUE(closeSendWithin(l));
}

// The receiver closes while a large matched transfer is under way: both
// requests end (either way) within the bound, and the net no longer writes
// into the receive buffer once closeRecv() returned.
TEST(SocketNet, ReceiverCloseDuringActiveTransfer) {
  auto net = makeNet(3, 256 * 1024, 16 * 1024);
  Link l;
  ASSERT_TRUE(openLink(net.get(), &l));
  const size_t kBig = 64u << 20;
  std::vector<uint8_t> src = pattern(kBig, 4242), dst(kBig, 0);
  void* rreq = nullptr;
  void* sreq = nullptr;
  ASSERT_EQ(postRecv(net.get(), l.recv, dst.data(), kBig, &rreq), tcpxSuccess);
  ASSERT_EQ(postSend(net.get(), l.send, src.data(), kBig, 5, &sreq), tcpxSuccess);
  // Close while it is (most likely) under way; either outcome is accepted.
  std::this_thread::sleep_for(milliseconds(5));
  EXPECT_TRUE(closeRecvWithin(l));
  Outcome ro = waitRequest(net.get(), rreq, nullptr, seconds(1));
  EXPECT_TRUE(ro.finished) << "receive still pending after its comm was closed";
  if (ro.finished && ro.rc == tcpxSuccess) EXPECT_EQ(firstDiff(dst.data(), src.data(), kBig), -1);
  memset(dst.data(), 0x11, kBig);
  Outcome so = waitRequest(net.get(), sreq, &l.sendEv);
  EXPECT_TRUE(so.finished) << "send still pending 20 s after the receiver closed";
  for (size_t i = 0; i < kBig; i += 4096)
    ASSERT_EQ(dst[i], 0x11) << "receive buffer written at " << i << " after closeRecv returned";
}

// The sender sends two messages and closes; the receives were posted before:
// both arrive intact, and a third receive fails with a "closed" error.
TEST(SocketNet, SenderCloseAfterTwoMessagesReceivesPostedFirst) {
  auto net = makeNet(3, 64 * 1024, 4 * 1024);
  Link l;
  ASSERT_TRUE(openLink(net.get(), &l));
  std::vector<uint8_t> a = pattern(1000, 1), b = pattern(1024 * 1024 + 5, 2);
  std::vector<uint8_t> da(a.size(), 0), db(b.size(), 0), dc(100, 0);
  void* q[3];
  ASSERT_EQ(postRecv(net.get(), l.recv, da.data(), da.size(), &q[0]), tcpxSuccess);
  ASSERT_EQ(postRecv(net.get(), l.recv, db.data(), db.size(), &q[1]), tcpxSuccess);
  ASSERT_EQ(postRecv(net.get(), l.recv, dc.data(), dc.size(), &q[2]), tcpxSuccess);
  ASSERT_TRUE(sendAll(l, {&a, &b}, /*firstTag=*/100));
  EXPECT_TRUE(closeSendWithin(l));
  Outcome r0 = waitRequest(net.get(), q[0], &l.recvEv);
  Outcome r1 = waitRequest(net.get(), q[1], &l.recvEv);
  Outcome r2 = waitRequest(net.get(), q[2], &l.recvEv);
  ASSERT_TRUE(succeeded(r0));
  ASSERT_TRUE(succeeded(r1));
  EXPECT_TRUE(delivered(r0, da, a, 100));
  EXPECT_TRUE(delivered(r1, db, b, 101));
  ASSERT_TRUE(r2.finished) << "third receive still pending 20 s after the sender closed";
  EXPECT_NE(r2.rc, tcpxSuccess);
  EXPECT_NE(r2.error.find("closed"), std::string::npos) << "error: " << r2.error;
  // Further receives fail too (at once or through test()).
  expectReceiveFails(net.get(), l.recv, "closed");
}

// The sender sends two inline messages and closes; the receiver posts its
// receives only after its comm noticed the close (the comm's EventCounter is
// bumped when the connection fails; nothing else bumps it here). Both
// messages arrived whole before the close, so both must still be delivered,
// as TCP delivers bytes sent before a close; a third receive fails.
TEST(SocketNet, SenderCloseThenReceivesPostedLateInline) {
  auto net = makeNet(3, 64 * 1024, 4 * 1024);
  Link l;
  ASSERT_TRUE(openLink(net.get(), &l));
  std::vector<uint8_t> a = pattern(1000, 11), b = pattern(4096, 12);
  uint64_t seen = l.recvEv.value();
  ASSERT_TRUE(sendAll(l, {&a, &b}, /*firstTag=*/200));
  EXPECT_TRUE(closeSendWithin(l));
  bool noticed = l.recvEv.waitUntil(seen, SteadyClock::now() + seconds(5));
  std::vector<uint8_t> da(a.size(), 0), db(b.size(), 0);
  void* q0 = nullptr;
  void* q1 = nullptr;
  tcpxResult_t p0 = postRecv(net.get(), l.recv, da.data(), da.size(), &q0);
  ASSERT_EQ(p0, tcpxSuccess) << "irecv of a message that arrived before the close was refused ("
                             << (noticed ? "after" : "maybe before")
                             << " the receiver noticed the close): " << lastError();
  ASSERT_EQ(postRecv(net.get(), l.recv, db.data(), db.size(), &q1), tcpxSuccess) << lastError();
  Outcome r0 = waitRequest(net.get(), q0, &l.recvEv), r1 = waitRequest(net.get(), q1, &l.recvEv);
  ASSERT_TRUE(succeeded(r0));
  ASSERT_TRUE(succeeded(r1));
  EXPECT_TRUE(delivered(r0, da, a, 200));
  EXPECT_TRUE(delivered(r1, db, b, 201));
  expectReceiveFails(net.get(), l.recv, "closed");
}

// Same with a sliced message whose slices wait in the kernel buffers of
// paused data sockets when the receives are posted.
TEST(SocketNet, SenderCloseThenReceivesPostedLateSliced) {
  auto net = makeNet(3, 16 * 1024, 4 * 1024);
  Link l;
  ASSERT_TRUE(openLink(net.get(), &l));
  std::vector<uint8_t> a = pattern(1000, 21), b = pattern(40 * 1024 + 3, 22);
  ASSERT_TRUE(sendAll(l, {&a, &b}, /*firstTag=*/300));
  EXPECT_TRUE(closeSendWithin(l));
  std::this_thread::sleep_for(milliseconds(50));  // let the receiver see the EOFs (not needed for correctness)
  std::vector<uint8_t> da(a.size(), 0), db(b.size(), 0);
  void* q0 = nullptr;
  void* q1 = nullptr;
  ASSERT_EQ(postRecv(net.get(), l.recv, da.data(), da.size(), &q0), tcpxSuccess) << lastError();
  ASSERT_EQ(postRecv(net.get(), l.recv, db.data(), db.size(), &q1), tcpxSuccess) << lastError();
  Outcome r0 = waitRequest(net.get(), q0, &l.recvEv), r1 = waitRequest(net.get(), q1, &l.recvEv);
  ASSERT_TRUE(succeeded(r0));
  ASSERT_TRUE(succeeded(r1));
  EXPECT_EQ(firstDiff(da.data(), a.data(), a.size()), -1);
  EXPECT_EQ(firstDiff(db.data(), b.data(), b.size()), -1);
  expectReceiveFails(net.get(), l.recv, "closed");
}

// A burst of inline sends (each reported complete as soon as it is queued)
// while the receiver is stalled, then closeSend() right away: every message
// reported complete must still reach the receiver, whose receives are all
// posted in advance. The receiver runs on its own SocketNet with one
// progress thread, blocked during the burst so the sender's socket buffers
// fill up and the rest stays queued in the sender.
TEST(SocketNet, SenderCloseAfterBurstDeliversEverything) {
  // Contract: a send that test() reported complete is delivered even if the
  // sender closes right after. With the receiver stalled, only the sends that
  // fit in the kernel's buffers complete; the sender then closes with the
  // rest pending. Every completed one must arrive; the rest fail on both sides.
  const size_t kInline = 1024 * 1024;
  auto rnet = makeNet(2, 64 * 1024, kInline, 30000, /*nthreads=*/1);
  auto snet = makeNet(2, 64 * 1024, kInline);
  ASSERT_NE(rnet, nullptr);
  ASSERT_NE(snet, nullptr);
  Link l;
  ASSERT_TRUE(openLink(rnet.get(), &l, 1, 0, 0, snet.get()));
  const int kN = 16;  // 16 MiB of inline payload
  std::vector<std::vector<uint8_t>> src(kN), dst(kN);
  std::vector<void*> rq(kN), sq(kN);
  for (int i = 0; i < kN; i++) {
    src[i] = pattern(kInline, 6000 + static_cast<uint64_t>(i));
    dst[i].assign(kInline, 0);
    ASSERT_EQ(postRecv(rnet.get(), l.recv, dst[i].data(), kInline, &rq[i]), tcpxSuccess);
  }
  std::vector<bool> sentOk(kN, false);
  {
    ThreadBlocker stall(rnet.get(), 0);
    ASSERT_TRUE(stall.blocked()) << "could not stall the receiver's progress thread";
    for (int i = 0; i < kN; i++)
      ASSERT_EQ(postSend(snet.get(), l.send, src[i].data(), kInline, static_cast<uint64_t>(i), &sq[i]),
                tcpxSuccess);
    // Whatever completes now is in the sender's kernel buffers.
    for (int i = 0; i < kN; i++) {
      Outcome o = waitRequest(snet.get(), sq[i], &l.sendEv, std::chrono::milliseconds(200));
      sq[i] = o.finished ? nullptr : sq[i];
      sentOk[i] = o.finished && o.rc == tcpxSuccess;
      if (!o.finished) break;
    }
    EXPECT_TRUE(closeSendWithin(l));
  }
  for (int i = 0; i < kN; i++) {
    if (!sq[i]) continue;  // already tested
    Outcome o = waitRequest(snet.get(), sq[i], nullptr, seconds(1));
    ASSERT_TRUE(o.finished) << "send " << i << " still pending after closeSend";
    sentOk[i] = o.rc == tcpxSuccess;
  }
  int completed = 0;
  for (int i = 0; i < kN; i++) {
    Outcome o = waitRequest(rnet.get(), rq[i], &l.recvEv);
    ASSERT_TRUE(o.finished) << "receive " << i << " still pending after the sender closed";
    if (!sentOk[i]) continue;
    completed++;
    ASSERT_EQ(o.rc, tcpxSuccess) << "send " << i << " completed but its message was lost: "
                                 << o.error;
    EXPECT_TRUE(delivered(o, dst[i], src[i], static_cast<uint64_t>(i))) << "message " << i;
  }
  EXPECT_GT(completed, 0) << "no send completed before the close: the test proves nothing";
}

// ---------------------------------------------------------------------------
// 9. Closing comms with requests pending.

TEST(SocketNet, CloseSendWithPendingRequests) {
  auto net = makeNet(2, 64 * 1024, 4 * 1024);
  Link l;
  ASSERT_TRUE(openLink(net.get(), &l));
  std::vector<uint8_t> small = pattern(100, 1);
  const size_t kBig = 16u << 20;
  std::vector<uint8_t> big = pattern(kBig, 2);
  std::vector<void*> reqs(4);
  ASSERT_EQ(postSend(net.get(), l.send, small.data(), small.size(), 0, &reqs[0]), tcpxSuccess);
  for (int i = 1; i < 4; i++)
    ASSERT_EQ(postSend(net.get(), l.send, big.data(), kBig, static_cast<uint64_t>(i), &reqs[i]), tcpxSuccess);
  EXPECT_TRUE(closeSendWithin(l, "closeSend with pending sends"));
  // The net lets go of the send buffers once closeSend() returned.
  memset(big.data(), 0, kBig);
  for (int i = 1; i < 4; i++) {
    Outcome o = waitRequest(net.get(), reqs[i], nullptr, seconds(1));
    ASSERT_TRUE(o.finished) << "send " << i << " still pending after closeSend";
    EXPECT_NE(o.rc, tcpxSuccess) << "a send cut off by closeSend succeeded";
  }
  // The inline one completed when it was queued.
  Outcome o0 = waitRequest(net.get(), reqs[0], nullptr, seconds(1));
  EXPECT_TRUE(o0.finished) << describe(o0);
  // The receiver: the first message may arrive, the cut-off one fails.
  std::vector<uint8_t> d0(100), d1(kBig);
  void* q0 = nullptr;
  void* q1 = nullptr;
  ASSERT_EQ(postRecv(net.get(), l.recv, d0.data(), d0.size(), &q0), tcpxSuccess);
  tcpxResult_t p1 = postRecv(net.get(), l.recv, d1.data(), d1.size(), &q1);
  Outcome r0 = waitRequest(net.get(), q0, &l.recvEv);
  EXPECT_TRUE(r0.finished) << "receive still pending after the sender closed";
  if (r0.finished && r0.rc == tcpxSuccess) EXPECT_EQ(firstDiff(d0.data(), small.data(), 100), -1);
  if (p1 == tcpxSuccess) {
    Outcome r1 = waitRequest(net.get(), q1, &l.recvEv);
    ASSERT_TRUE(r1.finished) << "receive of a cut-off message still pending after the sender closed";
    EXPECT_NE(r1.rc, tcpxSuccess) << "a message cut off by closeSend was received whole";
  }
}

TEST(SocketNet, CloseRecvWithPendingRequests) {
  auto net = makeNet(2, 64 * 1024, 4 * 1024);
  Link l;
  ASSERT_TRUE(openLink(net.get(), &l));
  const std::vector<size_t> sizes = {100, 64 * 1024 * 3, 8u << 20};
  std::vector<std::vector<uint8_t>> dst;
  std::vector<void*> rq(sizes.size());
  for (size_t i = 0; i < sizes.size(); i++) {
    dst.emplace_back(sizes[i], 0x22);
    ASSERT_EQ(postRecv(net.get(), l.recv, dst[i].data(), sizes[i], &rq[i]), tcpxSuccess);
  }
  EXPECT_TRUE(closeRecvWithin(l, "closeRecv with pending receives"));
  for (size_t i = 0; i < sizes.size(); i++) {
    Outcome o = waitRequest(net.get(), rq[i], nullptr, seconds(1));
    ASSERT_TRUE(o.finished) << "receive " << i << " still pending after closeRecv";
    EXPECT_NE(o.rc, tcpxSuccess) << "receive " << i << " succeeded with nothing sent";
  }
  // Sending now fails (the peer is gone) and never touches the closed receive buffers.
  std::vector<uint8_t> src = pattern(8u << 20, 3);
  for (size_t i = 0; i < sizes.size(); i++) {
    void* req = nullptr;
    tcpxResult_t rc = net->isend(l.send, src.data(), sizes[i], i, nullptr, &req);
    if (rc != tcpxSuccess) break;  // the comm already knows
    Outcome o = waitRequest(net.get(), req, &l.sendEv);
    ASSERT_TRUE(o.finished) << "send " << i << " to a closed receiver still pending";
    if (sizes[i] > 4 * 1024 * 2 * 64) EXPECT_NE(o.rc, tcpxSuccess) << "8 MiB sent to a closed receiver";
  }
  std::this_thread::sleep_for(milliseconds(20));
  for (size_t i = 0; i < sizes.size(); i++)
    for (size_t b = 0; b < sizes[i]; b += 512)
      ASSERT_EQ(dst[i][b], 0x22) << "closed receive " << i << " written at " << b;
}

// Connections that completed their handshake but were never accepted are
// closed with the listener; their senders fail rather than hang.
TEST(SocketNet, CloseListenWithUnacceptedConnections) {
  auto net = makeNet(2, 64 * 1024, 4 * 1024);
  NetHandle handle;
  void* lc = nullptr;
  ASSERT_TRUE(listenOn(net.get(), NetListenInfo(), &handle, &lc));
  std::vector<void*> scs;
  for (uint32_t c = 0; c < 3; c++) {
    NetHandle h = handle;
    NetConnectInfo ci;
    ci.connIndex = c;
    void* sc = nullptr;
    ASSERT_EQ(connectLoop(net.get(), &h, ci, nullptr, &sc), tcpxSuccess) << lastError();
    scs.push_back(sc);
  }
  // The last connection may still be completing on the listener side when
  // its connector has the ack; closeListen must cope either way.
  runWithin(kWait, "closeListen", [&] { EXPECT_EQ(net->closeListen(lc), tcpxSuccess); });
  std::vector<uint8_t> src = pattern(8u << 20, 4);
  for (void* sc : scs) {
    void* req = nullptr;
    tcpxResult_t rc = net->isend(sc, src.data(), src.size(), 0, nullptr, &req);
    if (rc == tcpxSuccess) {
      Outcome o = waitRequest(net.get(), req, nullptr);
      ASSERT_TRUE(o.finished) << "send to a closed listener's connection still pending";
      EXPECT_NE(o.rc, tcpxSuccess) << "8 MiB sent to a connection nobody accepted";
    }
    runWithin(kWait, "closeSend", [&] { net->closeSend(sc); });
  }
}

}  // namespace
}  // namespace tcpx

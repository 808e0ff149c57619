// bench_net: the socket net alone, two processes over loopback, both sending
// and receiving at once (the traffic of a 2-rank ring all_reduce), from host
// memory. It gives the net's ceiling on a machine, the number that the CUDA
// path (staging copies, PCIe, kernels on top of the same net) is measured
// against in docs/performance.md.
//
//   cmake --build build/core --target bench_net   (or, where GoogleTest is absent:)
//   g++ -O2 -std=c++17 -pthread -Icsrc benchmarks/bench_net.cc \
//       csrc/common/*.cc csrc/net/*.cc -o bench_net
//   ./bench_net [--nsocks 8] [--nthreads 8] [--chunk 8M] [--depth 4]
//               [--working 64M] [--bytes 4G] [--slice 128K] [--rounds 3]
//               [--sockbuf 0 (TCPX_SOCKET_BUFFER_BYTES; 0: autotuning)]
//
// Each process posts up to `depth` sends and `depth` receives of `chunk`
// bytes at a time and reposts as they complete, until `bytes` have gone each
// way. The buffers rotate through `working` bytes per direction, so a
// working set larger than the last-level cache makes every byte come from
// and go to DRAM, as the pinned chunk buffers of the CUDA path do. Output:
// one line per round with the time and GB/s (10^9 bytes/s) per direction,
// the slower of the two processes.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/event.h"
#include "common/status.h"
#include "net/interfaces.h"
#include "net/socket_net.h"

namespace {

using tcpx::tcpxResult_t;
using tcpx::tcpxSuccess;

struct Args {
  int nsocks = 8, nthreads = 8, depth = 4, rounds = 3;
  size_t chunk = 8u << 20, working = 64u << 20, bytes = 4ull << 30, slice = 128u << 10;
  size_t sockbuf = 0;  // SocketNetOptions::socketBufferBytes
};

size_t parseSize(const char* s) {
  char* end = nullptr;
  double v = strtod(s, &end);
  switch (*end) {
    case 'K': case 'k': v *= 1024; break;
    case 'M': case 'm': v *= 1024 * 1024; break;
    case 'G': case 'g': v *= 1024.0 * 1024 * 1024; break;
    default: break;
  }
  return static_cast<size_t>(v);
}

#define DIE_IF(cond, ...)                 \
  do {                                    \
    if (cond) {                           \
      fprintf(stderr, __VA_ARGS__);       \
      fprintf(stderr, "\n");              \
      exit(1);                            \
    }                                     \
  } while (0)
#define NET_OK(call) DIE_IF((call) != tcpxSuccess, "%s failed: %s", #call, tcpx::lastError().c_str())

void writeAll(int fd, const void* p, size_t n) {
  DIE_IF(write(fd, p, n) != static_cast<ssize_t>(n), "pipe write failed");
}
void readAll(int fd, void* p, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = read(fd, static_cast<char*>(p) + got, n - got);
    DIE_IF(r <= 0, "pipe read failed");
    got += static_cast<size_t>(r);
  }
}

// One process: `rank` 0 or 1; `toPeer`/`fromPeer` are pipes for handles,
// start signals and timings.
void runRank(int rank, const Args& a, int toPeer, int fromPeer, int report) {
  tcpx::SocketNetOptions o;
  NET_OK(tcpx::findNetDevices("lo", "/sys", &o.devices));
  o.nsocks = a.nsocks;
  o.nthreads = a.nthreads;
  o.sliceBytes = a.slice;
  o.nchannels = 1;
  o.socketBufferBytes = a.sockbuf;
  std::unique_ptr<tcpx::SocketNet> net;
  NET_OK(tcpx::SocketNet::create(o, &net));

  tcpx::EventCounter events;  // bumped by the progress threads: the loop sleeps like the worker
  tcpx::NetListenInfo li;
  li.events = &events;
  li.rank = static_cast<uint32_t>(rank);
  tcpx::NetHandle mine{}, theirs{};
  void* listenComm = nullptr;
  NET_OK(net->listen(0, li, &mine, &listenComm));
  writeAll(toPeer, &mine, sizeof(mine));
  readAll(fromPeer, &theirs, sizeof(theirs));

  tcpx::NetConnectInfo ci;
  ci.srcRank = static_cast<uint32_t>(rank);
  ci.dstRank = static_cast<uint32_t>(1 - rank);
  void *sendComm = nullptr, *recvComm = nullptr;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!sendComm || !recvComm) {
    if (!sendComm) NET_OK(net->connect(0, &theirs, ci, &events, 30000, &sendComm));
    if (!recvComm) {
      tcpx::NetConnectInfo peer;
      NET_OK(net->accept(listenComm, &events, &recvComm, &peer));
    }
    DIE_IF(std::chrono::steady_clock::now() > deadline, "connection setup timed out");
  }

  const size_t slots = std::max<size_t>(1, a.working / a.chunk);
  std::vector<char> sendBuf(slots * a.chunk), recvBuf(slots * a.chunk);
  for (size_t i = 0; i < sendBuf.size(); i += 4096) sendBuf[i] = static_cast<char>(i >> 12);
  memset(recvBuf.data(), 0, recvBuf.size());  // touch: no page faults while timed
  void *smh = nullptr, *rmh = nullptr;
  NET_OK(net->regMr(sendComm, sendBuf.data(), sendBuf.size(), tcpx::kPtrHost, &smh));
  NET_OK(net->regMr(recvComm, recvBuf.data(), recvBuf.size(), tcpx::kPtrHost, &rmh));

  const size_t nchunks = (a.bytes + a.chunk - 1) / a.chunk;
  for (int round = 0; round < a.rounds + 1; round++) {  // round 0 warms up
    char go = 1;
    writeAll(toPeer, &go, 1);
    readAll(fromPeer, &go, 1);
    auto t0 = std::chrono::steady_clock::now();
    std::vector<void*> sreq(a.depth, nullptr), rreq(a.depth, nullptr);
    size_t sposted = 0, rposted = 0, sdone = 0, rdone = 0;
    while (sdone < nchunks || rdone < nchunks) {
      const uint64_t seen = events.value();
      const size_t before = sdone + rdone;
      for (int k = 0; k < a.depth; k++) {
        if (!sreq[k] && sposted < nchunks) {
          char* p = sendBuf.data() + (sposted % slots) * a.chunk;
          NET_OK(net->isend(sendComm, p, a.chunk, sposted, smh, &sreq[k]));
          if (sreq[k]) sposted++;
        }
        if (!rreq[k] && rposted < nchunks) {
          void* p = recvBuf.data() + (rposted % slots) * a.chunk;
          size_t sz = a.chunk;
          uint64_t tag = rposted;
          NET_OK(net->irecv(recvComm, 1, &p, &sz, &tag, &rmh, &rreq[k]));
          if (rreq[k]) rposted++;
        }
        int done = 0;
        size_t size = 0;
        uint64_t tag = 0;
        if (sreq[k]) {
          NET_OK(net->test(sreq[k], &done, &size, &tag));
          if (done) sreq[k] = nullptr, sdone++;
        }
        if (rreq[k]) {
          NET_OK(net->test(rreq[k], &done, &size, &tag));
          if (done) rreq[k] = nullptr, rdone++;
        }
      }
      if (sdone + rdone == before)
        events.waitUntil(seen, std::chrono::steady_clock::now() + std::chrono::milliseconds(10));
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (round > 0) writeAll(report, &s, sizeof(s));
  }
  net->closeSend(sendComm);
  net->closeRecv(recvComm);
  net->closeListen(listenComm);
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    const char* v = argv[i + 1];
    if (k == "--nsocks") a.nsocks = atoi(v);
    else if (k == "--nthreads") a.nthreads = atoi(v);
    else if (k == "--depth") a.depth = atoi(v);
    else if (k == "--rounds") a.rounds = atoi(v);
    else if (k == "--chunk") a.chunk = parseSize(v);
    else if (k == "--working") a.working = parseSize(v);
    else if (k == "--bytes") a.bytes = parseSize(v);
    else if (k == "--slice") a.slice = parseSize(v);
    else if (k == "--sockbuf") a.sockbuf = parseSize(v);
    else DIE_IF(true, "unknown option %s (see the header of bench_net.cc)", k.c_str());
  }
  DIE_IF(a.depth < 1 || a.depth > 64 || a.chunk == 0 || a.rounds < 1, "bad arguments");
  int p01[2], p10[2], rep[2];
  DIE_IF(pipe(p01) || pipe(p10) || pipe(rep), "pipe failed");
  pid_t child = fork();
  DIE_IF(child < 0, "fork failed");
  if (child == 0) {
    runRank(1, a, p10[1], p01[0], rep[1]);
    _exit(0);
  }
  runRank(0, a, p01[1], p10[0], rep[1]);
  int status = 0;
  waitpid(child, &status, 0);
  DIE_IF(!WIFEXITED(status) || WEXITSTATUS(status) != 0, "rank 1 failed");
  printf("bench_net nsocks=%d nthreads=%d chunk=%zu depth=%d working=%zu slice=%zu sockbuf=%zu "
         "bytes=%zu\n", a.nsocks, a.nthreads, a.chunk, a.depth, a.working, a.slice, a.sockbuf, a.bytes);
  for (int r = 0; r < a.rounds; r++) {
    double t[2];
    readAll(rep[0], &t[0], sizeof(double));
    readAll(rep[0], &t[1], sizeof(double));
    double s = std::max(t[0], t[1]);
    printf("round %d: %.1f ms, %.2f GB/s each way\n", r, s * 1e3,
           static_cast<double>((a.bytes + a.chunk - 1) / a.chunk * a.chunk) / s / 1e9);
  }
  return 0;
}

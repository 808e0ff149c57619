// The Net interface: NCCL net-plugin semantics (ncclNet_v7_t, see
// ../shared/reference/ncclnet-abi.md and NVIDIA/nccl net_v7.h) as a C++
// interface, so that the built-in socket net and a dlopen'ed NCCL plugin look
// the same to the transport.
//
// What callers rely on, as in NCCL:
//  - listen() writes an opaque handle (at most 128 bytes) that is published
//    out of band (torch_tcpx: through the c10d Store);
//  - connect()/accept() never block: they succeed with a null comm until the
//    connection is up and are called again; connect() keeps its progress in
//    the handle's private bytes, so the caller passes the same handle object;
//  - isend()/irecv() may succeed with a null request ("no resources, retry");
//  - messages on one comm are matched in order; test() reports completion.
//
// Extensions over v7, which a plugin adapter maps down (tags truncated to int,
// credentials ignored, the event counter polled):
//  - sizes are 64-bit (v9 has size_t too);
//  - tags are 64-bit and test() reports the tag the sender used: the
//    transport puts its message header there (transport/message.h);
//  - listen()/connect() carry the handshake credentials (group secret, ranks,
//    connection index) and accept() returns the peer's;
//  - comms take an EventCounter that is bumped whenever one of their requests
//    completes or a connection arrives, so the caller can sleep instead of
//    polling.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "common/event.h"
#include "common/status.h"

namespace tcpx {

constexpr int kNetHandleMaxSize = 128;  // NCCL_NET_HANDLE_MAXSIZE
constexpr int kPtrHost = 0x1;           // NCCL_PTR_HOST
constexpr int kPtrCuda = 0x2;           // NCCL_PTR_CUDA
constexpr int kPtrDmabuf = 0x4;         // NCCL_PTR_DMABUF
constexpr int kGroupSecretBytes = 16;

enum class NetDeviceType : int { kHost = 0, kUnpack = 1 };  // NCCL_NET_DEVICE_*

// ncclNetProperties_v7_t plus what the socket net knows of an interface.
struct NetProperties {
  std::string name;       // "eth1"
  std::string pciPath;    // sysfs path of the NIC, "" when virtual
  uint64_t guid = 0;
  int ptrSupport = kPtrHost;
  int speedMbps = 0;      // link speed, Mb/s; 0 when unknown
  int port = 0;
  float latencyUs = 0.f;
  int maxComms = 65536;
  int maxRecvs = 1;       // grouped receives a device takes (irecv n)
  NetDeviceType netDeviceType = NetDeviceType::kHost;
  int netDeviceVersion = 0;
  int numaNode = -1;
  std::string address;    // "10.0.0.2" (socket net only)
};

// The opaque connection handle published by a listener. The first
// kNetHandlePublicBytes are what the listener wrote and the peer reads; the
// rest is scratch space for connect() progress on the connecting side.
constexpr int kNetHandlePublicBytes = 96;
struct NetHandle {
  alignas(8) uint8_t bytes[kNetHandleMaxSize];
};

// Who is listening: checked against every incoming handshake.
struct NetListenInfo {
  uint8_t secret[kGroupSecretBytes] = {};  // the group's secret (from the Store)
  uint32_t rank = 0;                       // this rank; handshakes must name it as dstRank
  EventCounter* events = nullptr;          // bumped when a connection is ready to accept
};

// Who is connecting: sent in the handshake and returned by accept().
struct NetConnectInfo {
  uint8_t secret[kGroupSecretBytes] = {};
  uint32_t srcRank = 0;    // the connecting rank
  uint32_t dstRank = 0;    // the rank it means to reach
  uint32_t connIndex = 0;  // which of the pair's connections (collective, p2p, channel...)
  uint32_t nsocks = 0;     // data sockets (at least one per channel), 1-64; 0: the net's default
  uint32_t nchannels = 0;  // channels over the net's devices, 1-32; 0: the net's default
};

class Net {
 public:
  virtual ~Net() = default;

  virtual const char* name() const = 0;
  virtual tcpxResult_t devices(int* ndev) = 0;
  virtual tcpxResult_t getProperties(int dev, NetProperties* props) = 0;

  // Starts listening on device `dev`; fills `handle`.
  virtual tcpxResult_t listen(int dev, const NetListenInfo& info, NetHandle* handle,
                              void** listenComm) = 0;
  // Non-blocking: *sendComm stays null until the connection is up. Call again
  // with the same `handle` object. `deadline` bounds retries of refused or
  // timed-out attempts; past it connect() fails with tcpxTimeout.
  virtual tcpxResult_t connect(int dev, NetHandle* handle, const NetConnectInfo& info,
                               EventCounter* events, int64_t timeoutMs,
                               void** sendComm) = 0;
  // Gives up a connect() in progress on `handle` (frees what it holds).
  virtual void connectAbandon(NetHandle* handle) {}
  // Non-blocking: returns the next fully established incoming connection, or
  // a null *recvComm if none is ready. `peer` receives the handshake's info.
  virtual tcpxResult_t accept(void* listenComm, EventCounter* events, void** recvComm,
                              NetConnectInfo* peer) = 0;

  virtual tcpxResult_t regMr(void* comm, void* data, size_t size, int type,
                             void** mhandle) = 0;
  virtual tcpxResult_t deregMr(void* comm, void* mhandle) = 0;

  virtual tcpxResult_t isend(void* sendComm, const void* data, size_t size, uint64_t tag,
                             void* mhandle, void** request) = 0;
  // Grouped receives (n > 1) only where maxRecvs allows; the socket net takes n == 1.
  virtual tcpxResult_t irecv(void* recvComm, int n, void** data, const size_t* sizes,
                             const uint64_t* tags, void** mhandles, void** request) = 0;
  virtual tcpxResult_t iflush(void* recvComm, int n, void** data, const size_t* sizes,
                              void** mhandles, void** request) = 0;
  // *done = 1 once complete; then `size` is the byte count the sender sent
  // (for a receive it may exceed the posted size: the excess was discarded)
  // and `tag` the sender's tag. A completed request is freed by test(); a
  // failed one returns its error and is freed too.
  virtual tcpxResult_t test(void* request, int* done, size_t* size, uint64_t* tag) = 0;

  // Closing a comm with requests in flight fails them (test() returns the
  // error and frees them); after close returns, the net no longer touches
  // their buffers.
  virtual tcpxResult_t closeSend(void* sendComm) = 0;
  virtual tcpxResult_t closeRecv(void* recvComm) = 0;
  virtual tcpxResult_t closeListen(void* listenComm) = 0;
  virtual tcpxResult_t irecvConsumed(void* recvComm, int n, void* request) = 0;
};

// The process's socket net (created on first use; lives until exit).
tcpxResult_t getSocketNet(Net** net);

}  // namespace tcpx

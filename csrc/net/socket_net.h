// The built-in socket net: NCCL's net semantics over plain TCP sockets.
//
// Devices are network interfaces (net/interfaces.h). A connection is one
// control socket plus `nsocks` data sockets, all opened by the sender:
//  - the control socket carries one 40-byte header per message (sequence
//    number, tag, size) and, for messages up to `inlineBytes`, the payload;
//  - larger payloads are cut into slices of `sliceBytes`, each sent with a
//    24-byte header (sequence number, offset, length) on whichever data socket
//    is free first, so a slow flow simply takes fewer slices;
//  - with several devices (NICs), a connection has channels: channel c on
//    the connector's device (dev + c) mod ndev and the listener's device of
//    the same index, the data sockets (at least one per channel) dealt over
//    them; slices going to whichever socket has room balances the NICs by
//    their speed;
//  - the receiver reads a slice straight into the posted buffer at its offset;
//    a slice of a message whose receive is not posted yet pauses its socket
//    (TCP backpressure) until the receive arrives.
// Every socket opens with a handshake (magic, protocol version, group secret,
// ranks, connection id); the listener answers the control socket with an
// acknowledgement only when all sockets of the connection have passed, and
// closes (and logs) anything else without disturbing other connections.
// Progress threads (net/progress.h) drive all sockets with epoll; connect()
// progresses in the caller's calls, as NCCL's contract allows.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "net/interfaces.h"
#include "net/net.h"
#include "net/progress.h"

namespace tcpx {

struct SocketNetOptions {
  std::vector<NetInterface> devices;
  int nsocks = 2;                  // data sockets per connection (at least one per channel), [1, 64]
  int nthreads = 2;                // progress threads
  size_t sliceBytes = 128 * 1024;  // unit of striping over data sockets
  size_t inlineBytes = 16 * 1024;  // messages up to this size ride the control socket
  size_t socketBufferBytes = 0;    // SO_SNDBUF/SO_RCVBUF of every socket; 0: the kernel's autotuning
  int nchannels = 0;               // channels per connection (0: one per device, at most 4)
  int handshakeTimeoutMs = 30000;  // an incoming socket must finish its handshake in this time
};

// One socket of a comm, for diagnostics and tests (SocketNet::socketStats).
struct SocketStats {
  int index = -1;       // -1: control socket, else data socket index
  std::string local;    // "addr:port" of this end
  std::string peer;     // "addr:port" of the other end
  uint64_t slices = 0;  // send side: slices this socket has taken
  int sndbuf = 0;       // SO_SNDBUF and SO_RCVBUF as the kernel reports them (bytes,
  int rcvbuf = 0;       // twice what was set, for its bookkeeping)
};

class SocketNet : public Net {
 public:
  // Builds a socket net over `opts.devices` (at least one).
  static tcpxResult_t create(const SocketNetOptions& opts, std::unique_ptr<SocketNet>* out);
  ~SocketNet() override;

  const char* name() const override { return "socket"; }
  tcpxResult_t devices(int* ndev) override;
  tcpxResult_t getProperties(int dev, NetProperties* props) override;
  tcpxResult_t listen(int dev, const NetListenInfo& info, NetHandle* handle,
                      void** listenComm) override;
  tcpxResult_t connect(int dev, NetHandle* handle, const NetConnectInfo& info,
                       EventCounter* events, int64_t timeoutMs, void** sendComm) override;
  void connectAbandon(NetHandle* handle) override;
  tcpxResult_t accept(void* listenComm, EventCounter* events, void** recvComm,
                      NetConnectInfo* peer) override;
  tcpxResult_t regMr(void* comm, void* data, size_t size, int type, void** mhandle) override;
  tcpxResult_t deregMr(void* comm, void* mhandle) override;
  tcpxResult_t isend(void* sendComm, const void* data, size_t size, uint64_t tag,
                     void* mhandle, void** request) override;
  tcpxResult_t irecv(void* recvComm, int n, void** data, const size_t* sizes,
                     const uint64_t* tags, void** mhandles, void** request) override;
  tcpxResult_t iflush(void* recvComm, int n, void** data, const size_t* sizes,
                      void** mhandles, void** request) override;
  tcpxResult_t test(void* request, int* done, size_t* size, uint64_t* tag) override;
  tcpxResult_t closeSend(void* sendComm) override;
  tcpxResult_t closeRecv(void* recvComm) override;
  tcpxResult_t closeListen(void* listenComm) override;
  tcpxResult_t irecvConsumed(void* recvComm, int n, void* request) override;

  const SocketNetOptions& options() const { return opts_; }
  // Channels a connection gets when NetConnectInfo::nchannels is 0: the
  // option, or one per device up to the 4 NICs a handle can list.
  int channels() const;
  // The sockets of a send (send = true) or receive comm: addresses and, on
  // the send side, how many slices each has taken.
  std::vector<SocketStats> socketStats(void* comm, bool send);
  ProgressEngine* engine() { return engine_.get(); }

 private:
  explicit SocketNet(const SocketNetOptions& opts);
  SocketNetOptions opts_;
  std::unique_ptr<ProgressEngine> engine_;
};

}  // namespace tcpx

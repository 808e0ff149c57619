// Configuration: every TCPX_* environment variable, read and validated in one
// place. docs/configuration.md documents each knob; keep the two in step.
//
// A bad value is an error that names the variable, the value and what is
// allowed; it surfaces as a ValueError from init_process_group.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "common/logging.h"
#include "common/status.h"

namespace tcpx {

constexpr size_t kSocketBufferAuto = ~size_t{0};  // TCPX_SOCKET_BUFFER_BYTES unset

struct Params {
  LogLevel debug = LogLevel::kWarn;         // TCPX_DEBUG
  uint32_t debugSubsys = kLogAll;           // TCPX_DEBUG_SUBSYS
  std::string net = "socket";               // TCPX_NET: socket | plugin
  std::string netPlugin;                    // TCPX_NET_PLUGIN: path of an NCCL net plugin
  std::string socketIfname;                 // TCPX_SOCKET_IFNAME (NCCL_SOCKET_IFNAME syntax)
  int socketFamily = 0;                     // TCPX_SOCKET_FAMILY: AF_INET | AF_INET6 | unset (0)
  int nsocks = 2;                           // TCPX_NSOCKS: data sockets per connection
  int nthreads = 1;                         // TCPX_NTHREADS: socket progress threads per process (default: autoThreads)
  int nchannels = 0;                        // TCPX_NCHANNELS: channels per peer connection over the NICs (0: one per NIC, at most 4)
  size_t chunkBytes = 512 * 1024;           // TCPX_CHUNK_BYTES: pipeline chunk = bounce buffer size
  // The CUDA tensors' communicator: every chunk costs the op kernel a
  // command round trip over PCIe (~25 us), which 512 KiB chunks cannot
  // amortise, and its host only moves bytes (no reductions), so it gains
  // from more sockets (docs/performance.md, 2 x H200). TCPX_CHUNK_BYTES,
  // TCPX_BUFFERS and TCPX_NSOCKS set both.
  size_t cudaChunkBytes = 8 * 1024 * 1024;
  int cudaBuffers = 4;  // 32 MiB in flight per peer, 64 MiB pinned
  int cudaNsocks = 16;  // with 16 progress threads: docs/performance.md, issue 4, fifth measurement
  // TCPX_CUDA_HOST_BYTES (0-1 MiB): CUDA all_reduces up to this size go
  // through the host relay (transport/relay.h): one kernel, the CPU path
  // on pinned memory, no op-kernel round trips. 0 turns it off.
  size_t cudaHostBytes = 512 * 1024;
  int buffers = 8;                          // TCPX_BUFFERS: bounce buffers per peer connection
  size_t sliceBytes = 512 * 1024;           // TCPX_SLICE_BYTES: unit a message is cut into across data sockets
  // TCPX_SOCKET_BUFFER_BYTES: SO_SNDBUF and SO_RCVBUF of every socket (the
  // kernel doubles the value and caps it at net.core.{w,r}mem_max); 0 leaves
  // the kernel's autotuning. Unset: autoSocketBufferBytes.
  size_t socketBufferBytes = kSocketBufferAuto;
  size_t inlineBytes = 16 * 1024;           // TCPX_INLINE_BYTES: messages up to this size ride the control socket
  std::string algo;                         // TCPX_ALGO: "" (auto), "ring", "allreduce:rd,broadcast:chain", ...
  size_t algoThreshold = 64 * 1024;         // TCPX_ALGO_THRESHOLD: at or below, latency-optimal algorithms
  int spinUs = 0;                           // TCPX_SPIN_US: busy-poll before blocking, microseconds (default: autoSpinUs)
  std::string gpuNicMap;                    // TCPX_GPU_NIC_MAP (multi-NIC pairing override)
  std::string cudaWait = "kernel";          // TCPX_CUDA_WAIT: kernel | memop | host
  int cudaBlocks = 8;                       // TCPX_CUDA_BLOCKS: thread blocks of a CUDA op kernel

  // The algorithm TCPX_ALGO forces for collective `coll` ("allreduce",
  // "broadcast", ...), or "" when it is left to size-based choice.
  std::string algoFor(const std::string& coll) const;
};

// Parses the variables through `getenvFn` (getenv in production, a map in
// tests). On error, returns tcpxInvalidArgument with the message recorded.
tcpxResult_t parseParams(const std::function<const char*(const char*)>& getenvFn,
                         Params* out);

// The process's parameters, parsed from the environment on first use. A parse
// error is remembered and returned (with its message) on every call.
tcpxResult_t getParams(const Params** out);

// Default progress threads per process: half the cores available to each
// local rank, between 1 and 8; 16 where a rank has 16 cores or more. Measured
// (docs/performance.md): on a 2-core machine extra threads only add context
// switches when ranks outnumber cores; on 2 x H200 hosts (16 cores per rank)
// the CUDA all_reduce's 16 sockets need a thread each.
int autoThreads(int cpus, int localWorldSize);

// Default TCPX_SOCKET_BUFFER_BYTES for a socket net over `ndevices` NICs.
// One: 256 KiB. The kernel's autotuning lets a loopback socket grow to
// tcp_rmem's maximum (6-32 MiB), so what is in flight leaves the last-level
// cache; fixed buffers were 10-50% faster on 2 x H200 (docs/performance.md,
// fourth measurement), and the kernel's doubling leaves a 512 KiB window,
// 5 GB/s per socket at a 100 us round trip. Several: 0 (autotuning): on
// the four rate-limited links of tests/python/test_multinic_netns.py, whose
// queues lengthen the round trip, the fixed window lost 1-5% (5 pairs).
size_t autoSocketBufferBytes(int ndevices);

// Default TCPX_SPIN_US: 50 us where each local rank has at least 4 cores,
// else 0. The worker busy-polls that long after its last progress instead
// of sleeping, which saves a wake-up per message: a 1 KiB CUDA all_reduce
// took 25 us instead of 32-35 us on 2 x H200 (16 cores per rank). The
// progress threads do not spin: spinning them as well measured lower
// all_reduce bandwidth at 256 MiB (15.5-15.7 against 16.4-19.2 GB/s). On a
// 2-core machine with 2 ranks, spinning (worker and progress threads,
// 100 us) took the cores that the other threads needed: a CPU 1 KiB
// all_reduce went from 68 to 220 us. docs/performance.md.
int autoSpinUs(int cpus, int localWorldSize);

// "TCPX_NSOCKS=2,cuda:8 TCPX_NTHREADS=2 ...": one NAME=value token per knob
// (no spaces in a value; where CUDA tensors have their own default,
// "value,cuda:value"), for the INFO line at init and torch_tcpx.config().
std::string describeParams(const Params& p);

// Parses "4096", "512K", "4M", "1G" (binary multiples). False if malformed.
bool parseSize(const std::string& s, uint64_t* out);

}  // namespace tcpx

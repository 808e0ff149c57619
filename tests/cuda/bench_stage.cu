// Microbenchmark of the CUDA stage's op kernel (csrc/transport/cuda_stage.cu)
// on one GPU, without the network: what one command costs, by kind and size.
//   latency:   one command, then wait for its ticket (the worker's view of a
//              small op's staging copy or unpack), median of kReps;
//   bandwidth: `count` commands given back to back, then one ticket.
// Commands: device -> pinned copy (staging a send), pinned -> device unpack
// (a receive), pinned -> device reduce into device memory (a reduce step),
// and staging copies alternating with unpacks (both directions of PCIe).
// Build and run on a GPU machine:
//   nvcc -std=c++17 -O2 -arch=sm_90 -Icsrc tests/cuda/bench_stage.cu csrc/transport/cuda_stage.cu \
//     csrc/transport/unpack.cu csrc/common/*.cc -o /tmp/bench_stage && /tmp/bench_stage [blocks...]
// Prints one table per block count (TCPX_CUDA_BLOCKS), times in µs, GB/s = 1e9 B/s.
// Then the host relay (transport/relay.h) with this thread as a worker that
// answers at once: µs per relay for kRelays relays back to back (the
// device-side floor of a small all_reduce without its network), against the
// same round trip by copy engines (D->H copy, flag kernel, flag wait, H->D
// copy), and the host's time to enqueue one.
// Built with -DTCPX_STAGE_TIMING (both files), it also splits the median
// latency with block 0's %globaltimer stamps: read = tag seen to command
// read, work = to its own part written and fenced, gather = to every block
// arrived; host = the rest of the round trip (post to tag seen, done
// written to the host seeing it).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "cuda_check.h"
#include "transport/relay.h"
#include "transport/stage.h"

using namespace tcpx;

#ifdef TCPX_STAGE_TIMING
namespace tcpx {
void stageTimes(unsigned long long (*out)[4], int n);
}
#endif

namespace {

#ifdef TCPX_STAGE_TIMING
constexpr bool kTiming = true;
#else
constexpr bool kTiming = false;
#endif
constexpr int kReps = 21;  // latency samples per row (their stamps: command indexes 0..20)

using Clock = std::chrono::steady_clock;

double usSince(Clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
}

// kMixed: staging copies and unpacks alternating (the i-th command of a
// row is a copy when i is even), as a ring's worker posts them; its GB/s
// counts both directions of PCIe together.
enum class Kind { kStage, kUnpack, kReduce, kMixed };
const char* kindName(Kind k) {
  switch (k) {
    case Kind::kStage: return "copy device->pinned";
    case Kind::kUnpack: return "unpack pinned->device";
    case Kind::kReduce: return "reduce pinned+device";
    case Kind::kMixed: return "copy, unpack alternating";
  }
  return "?";
}

tcpxResult_t give(DeviceStage& s, Kind k, void* dev, void* pinned, size_t bytes, int i) {
  if (k == Kind::kMixed) k = i % 2 ? Kind::kUnpack : Kind::kStage;
  switch (k) {
    case Kind::kStage: return s.copy(pinned, dev, bytes, false);
    case Kind::kUnpack: return s.unpack(dev, nullptr, pinned, bytes, false, DataType::kFloat32, RedOp::kSum);
    case Kind::kReduce: return s.unpack(dev, nullptr, pinned, bytes, true, DataType::kFloat32, RedOp::kSum);
    case Kind::kMixed: break;
  }
  return tcpxInternalError;
}

void run(int blocks) {
  std::shared_ptr<DeviceStage> stage;
  TCPX_OK(createCudaStage(0, blocks, &stage));
  DeviceStage& s = *stage;
  const size_t maxBytes = size_t{4} << 20;
  const int count = 64;  // commands per bandwidth measurement
  // Device memory and pinned chunks, all set up before the op kernel runs:
  // this thread then plays the worker, which makes no CUDA call.
  void* dev;
  CUDA_OK(cudaMalloc(&dev, maxBytes * count));
  CUDA_OK(cudaMemset(dev, 0, maxBytes * count));
  std::vector<void*> pinned;
  for (int i = 0; i < count; i++) pinned.push_back(s.allocHost(maxBytes));
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CUDA_OK(cudaDeviceSynchronize());
  printf("\n# op kernel, %d blocks\n", blocks);
  printf("# %-22s %10s %9s %14s %14s %12s%s\n", "command", "bytes", "start", "latency (us)",
         "stream (us)", "GB/s", kTiming ? "   read   work gather   host" : "");
  for (Kind k : {Kind::kStage, Kind::kUnpack, Kind::kReduce, Kind::kMixed}) {
    for (size_t bytes : {size_t{4}, size_t{65536}, size_t{524288}, size_t{4} << 20}) {
      // One op per row: its command indexes start at 0 (the stamps' slots).
      uint64_t op;
      auto t0 = Clock::now();
      TCPX_OK(s.launch(stream, &op));
      while (!s.started(op)) std::this_thread::yield();
      const double startUs = usSince(t0);
      s.bind(op);
      std::vector<double> lat;
      for (int rep = 0; rep < kReps; rep++) {
        uint64_t t;
        auto t1 = Clock::now();
        TCPX_OK(give(s, k, dev, pinned[0], bytes, rep));
        TCPX_OK(s.record(&t));
        waitTicket(s, t);
        lat.push_back(usSince(t1));
      }
      const std::vector<double> lat0 = lat;
      std::nth_element(lat.begin(), lat.begin() + lat.size() / 2, lat.end());
      uint64_t t;
      auto t2 = Clock::now();
      for (int i = 0; i < count; i++)
        TCPX_OK(give(s, k, static_cast<char*>(dev) + i * bytes, pinned[i], bytes, i));
      TCPX_OK(s.record(&t));
      waitTicket(s, t);
      const double us = usSince(t2) / count;
      TCPX_OK(s.end(op));
      CUDA_OK(cudaStreamSynchronize(stream));
      printf("  %-22s %10zu %9.1f %14.1f %14.1f %12.2f", kindName(k), bytes, startUs,
             lat[lat.size() / 2], us, bytes / us / 1e3);
#ifdef TCPX_STAGE_TIMING
      unsigned long long st[kReps][4];
      stageTimes(st, kReps);
      std::vector<double> part[4];
      for (int r = 0; r < kReps; r++) {
        for (int j = 0; j < 3; j++) part[j].push_back((st[r][j + 1] - st[r][j]) / 1e3);
        part[3].push_back(lat0[r] - (st[r][3] - st[r][0]) / 1e3);
      }
      for (auto& v : part) {
        std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
        printf(" %6.1f", v[v.size() / 2]);
      }
#endif
      printf("\n");
    }
  }
  for (void* p : pinned) s.freeHost(p);
  CUDA_OK(cudaStreamDestroy(stream));
  CUDA_OK(cudaFree(dev));
}

// One relay round trip, `kRelays` back to back: kind 0 = relay kernel,
// 1 = copy engines with a flag kernel and a cuStreamWaitValue32 wait,
// 2 = copy engines with flag kernels both ways. The host answers each as
// soon as it sees the gate. Returns {µs per round trip, µs to enqueue one}.
std::pair<double, double> relayRun(int kind, size_t bytes, cudaStream_t stream, char* dev,
                                   char* slab, uint32_t* flags, uint32_t* gen) {
  constexpr int kRelays = 200;
  const size_t stride = relaySlotBytes(1 << 20);
  std::vector<char> result(bytes);
  CUDA_OK(cudaStreamSynchronize(stream));
  const uint32_t first = *gen + 1;
  auto t0 = Clock::now();
  for (int k = 0; k < kRelays; k++) {
    const uint32_t g = ++*gen;
    char* slot = slab + (k % 4) * stride;
    uint32_t* staged = &flags[(2 * g) % 4096];
    if (kind == 0) {
      TCPX_OK(streamHostRelay(dev, dev, bytes, slot, g, stream));
    } else {
      CUDA_OK(cudaMemcpyAsync(slot, dev, bytes, cudaMemcpyDeviceToHost, stream));
      TCPX_OK(streamWriteFlag(staged, g, stream));
      TCPX_OK(streamWaitFlag(&flags[(2 * g + 1) % 4096], g, stream, kind == 1));
      CUDA_OK(cudaMemcpyAsync(dev, slot, bytes, cudaMemcpyHostToDevice, stream));
    }
  }
  const double enqueue = usSince(t0) / kRelays;
  for (int k = 0; k < kRelays; k++) {
    const uint32_t g = first + k;
    char* slot = slab + (k % 4) * stride;
    if (kind == 0) {
      while (!relayStaged(slot, bytes, g)) {
      }
      memcpy(result.data(), relayData(slot), bytes);  // what a worker's reduction reads
      relayPublish(slot, bytes, g);
    } else {
      while (*reinterpret_cast<volatile uint32_t*>(&flags[(2 * g) % 4096]) != g) {
      }
      memcpy(result.data(), slot, bytes);
      __atomic_store_n(&flags[(2 * g + 1) % 4096], g, __ATOMIC_RELEASE);
    }
  }
  CUDA_OK(cudaStreamSynchronize(stream));
  return {usSince(t0) / kRelays, enqueue};
}

void relayBench() {
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::shared_ptr<DeviceStage> stage;  // loads the flag kernels
  TCPX_OK(createCudaStage(0, 1, &stage));
  char *slab, *dev;
  uint32_t* flags;
  CUDA_OK(cudaHostAlloc(reinterpret_cast<void**>(&slab), 4 * relaySlotBytes(1 << 20), cudaHostAllocMapped));
  CUDA_OK(cudaHostAlloc(reinterpret_cast<void**>(&flags), 4096 * 4, cudaHostAllocMapped));
  memset(flags, 0, 4096 * 4);
  CUDA_OK(cudaMalloc(&dev, 1 << 20));
  CUDA_OK(cudaMemset(dev, 1, 1 << 20));
  uint32_t gen = 0;
  printf("\nhost relay, round trips back to back, host answering at once (µs per round trip / µs to enqueue one)\n");
  printf("%10s %18s %24s %24s\n", "bytes", "relay kernel", "copies+flag memop wait", "copies+flag kernels");
  for (size_t bytes : {4, 1024, 4096, 8192, 16384, 65536, 262144, 1048576}) {
    double t[3][2];
    for (int kind = 0; kind < 3; kind++) {
      relayRun(kind, bytes, stream, dev, slab, flags, &gen);  // warm-up
      auto r = relayRun(kind, bytes, stream, dev, slab, flags, &gen);
      t[kind][0] = r.first;
      t[kind][1] = r.second;
    }
    printf("%10zu %10.1f / %5.1f %16.1f / %5.1f %16.1f / %5.1f\n", bytes, t[0][0], t[0][1], t[1][0],
           t[1][1], t[2][0], t[2][1]);
  }
  CUDA_OK(cudaFree(dev));
  CUDA_OK(cudaFreeHost(slab));
  CUDA_OK(cudaFreeHost(flags));
  CUDA_OK(cudaStreamDestroy(stream));
}

}  // namespace

int main(int argc, char** argv) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    printf("SKIP: no CUDA device\n");
    return 0;
  }
  CUDA_OK(cudaSetDevice(0));
  std::vector<int> blocks;
  for (int i = 1; i < argc; i++) blocks.push_back(atoi(argv[i]));
  if (blocks.empty()) blocks = {1, 4, 8, 16};
  for (int b : blocks) run(b);
  relayBench();
  return 0;
}

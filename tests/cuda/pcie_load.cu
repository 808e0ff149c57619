// pcie_load: the host-memory traffic of one GPU's staging, without the
// network. Copy engines move chunks device -> pinned and pinned -> device at
// the same time, `rate` GB/s (10^9 B/s) each way (0: as fast as they go),
// through `working` MiB of pinned memory per direction, for `secs` seconds.
// Run beside bench_net (scripts/bench_host_memory.sh), it shows how much of
// the loopback net's rate is left once the GPUs' staging traffic shares the
// host's memory with it, as it does in a CUDA all_reduce between two GPUs
// of one host (docs/performance.md, issue 4, fifth measurement).
//   nvcc -O2 -std=c++17 -Icsrc tests/cuda/pcie_load.cu -o pcie_load
//   ./pcie_load <gpu> <rate GB/s each way, 0 = full speed> <secs> [working MiB, default 64]
// Prints the rate reached each way. Exit status 1 on bad arguments, 2 on a CUDA error.
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "cuda_check.h"

int main(int argc, char** argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s <gpu> <rate GB/s each way, 0 = full speed> <secs> [working MiB]\n", argv[0]);
    return 1;
  }
  const int gpu = atoi(argv[1]);
  const double rate = atof(argv[2]), secs = atof(argv[3]);
  const size_t chunk = size_t{8} << 20;  // the CUDA communicators' chunk
  const size_t working = (argc > 4 ? static_cast<size_t>(atol(argv[4])) : 64) << 20;
  if (rate < 0 || secs <= 0 || working < chunk) {
    fprintf(stderr, "rate must be >= 0, secs > 0, working >= 8 MiB\n");
    return 1;
  }
  CUDA_OK(cudaSetDevice(gpu));
  char *dev, *toHost, *fromHost;
  CUDA_OK(cudaMalloc(&dev, 2 * chunk));
  CUDA_OK(cudaHostAlloc(&toHost, working, cudaHostAllocPortable));
  CUDA_OK(cudaHostAlloc(&fromHost, working, cudaHostAllocPortable));
  cudaStream_t d2h, h2d;
  CUDA_OK(cudaStreamCreateWithFlags(&d2h, cudaStreamNonBlocking));
  CUDA_OK(cudaStreamCreateWithFlags(&h2d, cudaStreamNonBlocking));
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  auto next = t0;
  // With a rate: one chunk each way per period, paced against the start.
  const auto period = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(rate > 0 ? chunk / (rate * 1e9) : 0));
  size_t moved = 0, off = 0;
  while (std::chrono::duration<double>(Clock::now() - t0).count() < secs) {
    CUDA_OK(cudaMemcpyAsync(toHost + off, dev, chunk, cudaMemcpyDeviceToHost, d2h));
    CUDA_OK(cudaMemcpyAsync(dev + chunk, fromHost + off, chunk, cudaMemcpyHostToDevice, h2d));
    CUDA_OK(cudaStreamSynchronize(d2h));
    CUDA_OK(cudaStreamSynchronize(h2d));
    moved += chunk;
    off = (off + chunk) % (working / chunk * chunk);
    if (rate > 0) std::this_thread::sleep_until(next += period);
  }
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  printf("pcie_load gpu %d: %.1f GB/s each way for %.1f s\n", gpu, moved / s / 1e9, s);
  return 0;
}

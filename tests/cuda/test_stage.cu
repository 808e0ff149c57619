// GPU test of CudaStage (csrc/transport/cuda_stage.cu) and streamWaitFlag,
// without torch: the staging copies and unpacks a communicator issues,
// checked against host references, and the completion wait a caller's
// stream uses, in the situations the backend creates:
//   - a "worker" thread stages and unpacks while another stream waits on a
//     host flag (streamWaitFlag) that the worker sets at the end;
//   - meanwhile the main thread blocks in a synchronous copy on the legacy
//     default stream behind that wait (what `t.cpu()` after a non-blocking
//     wait() does).
// A watchdog turns a hang into a FAIL with the phase that hung.
// Build and run on a GPU machine:
//   nvcc -std=c++17 -O2 -arch=sm_90 -Icsrc tests/cuda/test_stage.cu csrc/transport/cuda_stage.cu \
//     csrc/transport/unpack.cu csrc/common/*.cc -o /tmp/test_stage && /tmp/test_stage
// Exit status 0 = all passed.
#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

#include "cuda_check.h"
#include "transport/stage.h"

using namespace tcpx;

namespace {

std::atomic<const char*> phase{"start"};

#define TCPX_OK(x)                                                                      \
  do {                                                                                  \
    if ((x) != tcpxSuccess) {                                                           \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, lastError().c_str()); \
      exit(2);                                                                          \
    }                                                                                   \
  } while (0)


void waitTicket(DeviceStage& s, uint64_t t) {
  bool done = false;
  while (!done) TCPX_OK(s.query(t, &done));
}

// Staging round trip: device -> pinned (copy), pinned -> device (unpack copy
// and unpack reduce with a separate `own`), for sizes around page edges.
void testRoundTrip(DeviceStage& s) {
  phase = "round trip";
  for (size_t bytes : {size_t{4}, size_t{4096}, size_t{4100}, size_t{512 * 1024}, size_t{524288 + 12}}) {
    size_t n = bytes / 4;
    std::vector<float> a(n), b(n), want(n);
    for (size_t i = 0; i < n; i++) {
      a[i] = static_cast<float>(i % 1000);
      b[i] = static_cast<float>((i * 7) % 333);
      want[i] = a[i] + b[i];
    }
    float *da, *dOwn, *dOut;
    CUDA_OK(cudaMalloc(&da, bytes));
    CUDA_OK(cudaMalloc(&dOwn, bytes));
    CUDA_OK(cudaMalloc(&dOut, bytes + 64));
    CUDA_OK(cudaMemcpy(da, a.data(), bytes, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(dOwn, b.data(), bytes, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemset(dOut, 0x7f, bytes + 64));
    auto* pinned = static_cast<float*>(s.allocHost(bytes));
    uint64_t t;
    TCPX_OK(s.copy(pinned, da, bytes));
    TCPX_OK(s.record(&t));
    waitTicket(s, t);
    report(memcmp(pinned, a.data(), bytes) == 0, "stage copy device->pinned " + std::to_string(bytes));
    TCPX_OK(s.unpack(dOut, nullptr, pinned, bytes, false, DataType::kFloat32, RedOp::kSum));
    TCPX_OK(s.record(&t));
    waitTicket(s, t);
    std::vector<float> got(n + 16);
    CUDA_OK(cudaMemcpy(got.data(), dOut, bytes + 64, cudaMemcpyDeviceToHost));
    bool tail = true;
    for (size_t i = 0; i < 64; i++) tail &= reinterpret_cast<unsigned char*>(got.data())[bytes + i] == 0x7f;
    report(memcmp(got.data(), a.data(), bytes) == 0 && tail,
           "stage unpack copy " + std::to_string(bytes) + " (nothing written past the end)");
    TCPX_OK(s.unpack(dOut, dOwn, pinned, bytes, true, DataType::kFloat32, RedOp::kSum));
    TCPX_OK(s.record(&t));
    waitTicket(s, t);
    CUDA_OK(cudaMemcpy(got.data(), dOut, bytes, cudaMemcpyDeviceToHost));
    report(memcmp(got.data(), want.data(), bytes) == 0, "stage unpack reduce own+bounce " + std::to_string(bytes));
    s.freeHost(pinned);
    CUDA_OK(cudaFree(da));
    CUDA_OK(cudaFree(dOwn));
    CUDA_OK(cudaFree(dOut));
  }
}

// The backend's completion path under a blocking caller.
void testFlagWait(DeviceStage& s, bool callerBlocks) {
  phase = callerBlocks ? "flag wait, caller in a blocking copy" : "flag wait";
  const size_t bytes = 4 << 20;
  float *dev, *dst;
  CUDA_OK(cudaMalloc(&dev, bytes));
  CUDA_OK(cudaMalloc(&dst, bytes));
  CUDA_OK(cudaMemset(dev, 0, bytes));
  uint32_t* flags;
  CUDA_OK(cudaHostAlloc(reinterpret_cast<void**>(&flags), 64, cudaHostAllocMapped | cudaHostAllocPortable));
  memset(flags, 0, 64);
  cudaStream_t done;
  CUDA_OK(cudaStreamCreateWithFlags(&done, cudaStreamNonBlocking));
  cudaEvent_t end;
  CUDA_OK(cudaEventCreateWithFlags(&end, cudaEventDisableTiming));
  TCPX_OK(streamWaitFlag(&flags[1], 1, done));
  CUDA_OK(cudaEventRecord(end, done));
  CUDA_OK(cudaStreamWaitEvent(cudaStreamLegacy, end, 0));
  std::atomic<bool> workerDone{false};
  std::thread worker([&] {
    // What the communicator's worker does for one op: staging copies and
    // unpacks with tickets, then the completion flag.
    void* pinned = s.allocHost(512 * 1024);
    for (int i = 0; i < 16; i++) {
      uint64_t t;
      TCPX_OK(s.copy(pinned, reinterpret_cast<char*>(dev) + i * 256 * 1024, 256 * 1024));
      TCPX_OK(s.record(&t));
      waitTicket(s, t);
      TCPX_OK(s.unpack(reinterpret_cast<char*>(dst) + i * 256 * 1024, nullptr, pinned, 256 * 1024,
                       true, DataType::kFloat32, RedOp::kSum));
      TCPX_OK(s.record(&t));
      waitTicket(s, t);
    }
    s.freeHost(pinned);
    __atomic_store_n(&flags[1], 1u, __ATOMIC_RELEASE);
    workerDone = true;
  });
  std::vector<float> host(bytes / 4);
  if (callerBlocks) {
    // t.cpu() after a non-blocking wait(): a synchronous copy on the legacy
    // stream, which waits behind `end`, while the worker still works.
    CUDA_OK(cudaMemcpy(host.data(), dst, bytes, cudaMemcpyDeviceToHost));
  } else {
    while (!workerDone) std::this_thread::yield();
    CUDA_OK(cudaStreamSynchronize(cudaStreamLegacy));
  }
  worker.join();
  report(cudaEventQuery(end) == cudaSuccess, std::string("completion event after the flag: ") + phase.load());
  CUDA_OK(cudaEventDestroy(end));
  CUDA_OK(cudaStreamDestroy(done));
  CUDA_OK(cudaFreeHost(flags));
  CUDA_OK(cudaFree(dev));
  CUDA_OK(cudaFree(dst));
}

}  // namespace

int main() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    printf("SKIP: no CUDA device\n");
    return 0;
  }
  std::thread([] {
    std::this_thread::sleep_for(std::chrono::seconds(60));
    printf("FAIL hang in phase '%s' (watchdog, 60 s)\n", phase.load());
    fflush(stdout);
    _exit(3);
  }).detach();
  CUDA_OK(cudaSetDevice(0));
  std::shared_ptr<DeviceStage> stage;
  TCPX_OK(createCudaStage(0, 0, &stage));
  TCPX_OK(stage->reserveHost(512 * 1024, 8));
  testRoundTrip(*stage);
  testFlagWait(*stage, false);
  testFlagWait(*stage, true);
  printf("%s: %d failure(s)\n", testFailures() ? "FAILED" : "OK", testFailures());
  return testFailures() ? 1 : 0;
}

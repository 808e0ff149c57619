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
#include <signal.h>
#include <sys/wait.h>
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

// What the caller's thread does while a stream waits on the host flag and
// the worker stages and unpacks: each may serialise the device (CUDA's
// implicit synchronisation, lazy module loading), which would deadlock the
// design. Each scenario runs in its own process with a time limit.
enum class Caller { kFlagOnly, kYield, kBlockingCopy, kMalloc, kHostAlloc, kFirstLaunch };
struct Scenario {
  Caller caller;
  bool memop;  // cuStreamWaitValue32 instead of the wait kernel
};
const char* callerName(Caller c) {
  switch (c) {
    case Caller::kFlagOnly: return "no device work, flag set at once (is the flag seen?)";
    case Caller::kYield: return "caller idle";
    case Caller::kBlockingCopy: return "caller in a blocking copy behind the wait";
    case Caller::kMalloc: return "caller in cudaMalloc";
    case Caller::kHostAlloc: return "caller in cudaHostAlloc";
    case Caller::kFirstLaunch: return "caller launches a kernel for the first time";
  }
  return "?";
}

__global__ void neverLaunchedBefore(float* p) { p[threadIdx.x] += 1.0f; }

// The backend's completion path: returns normally, or hangs (the parent kills it).
void flagWaitScenario(Caller caller, bool memop) {
  std::shared_ptr<DeviceStage> stagePtr;
  TCPX_OK(createCudaStage(0, 0, &stagePtr));
  DeviceStage& s = *stagePtr;
  TCPX_OK(s.reserveHost(512 * 1024, 4));
  const size_t bytes = 4 << 20;
  float *dev, *dst;
  CUDA_OK(cudaMalloc(&dev, bytes));
  CUDA_OK(cudaMalloc(&dst, bytes));
  CUDA_OK(cudaMemset(dev, 0, bytes));
  CUDA_OK(cudaDeviceSynchronize());
  uint32_t* flags;
  CUDA_OK(cudaHostAlloc(reinterpret_cast<void**>(&flags), 64, cudaHostAllocMapped | cudaHostAllocPortable));
  memset(flags, 0, 64);
  cudaStream_t done;
  CUDA_OK(cudaStreamCreateWithFlags(&done, cudaStreamNonBlocking));
  cudaEvent_t end;
  CUDA_OK(cudaEventCreateWithFlags(&end, cudaEventDisableTiming));
  TCPX_OK(streamWaitFlag(&flags[1], 1, done, memop));
  CUDA_OK(cudaEventRecord(end, done));
  CUDA_OK(cudaStreamWaitEvent(cudaStreamLegacy, end, 0));
  std::atomic<bool> go{false}, workerDone{false};
  std::thread worker([&] {
    while (!go) std::this_thread::yield();
    if (caller == Caller::kFlagOnly) {
      __atomic_store_n(&flags[1], 1u, __ATOMIC_RELEASE);
      workerDone = true;
      return;
    }
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
  switch (caller) {
    case Caller::kFlagOnly:
    case Caller::kYield:
      go = true;
      while (!workerDone) std::this_thread::yield();
      break;
    case Caller::kBlockingCopy:
      go = true;
      CUDA_OK(cudaMemcpy(host.data(), dst, bytes, cudaMemcpyDeviceToHost));
      break;
    case Caller::kMalloc: {
      void* p;
      CUDA_OK(cudaMalloc(&p, 256 << 20));
      go = true;
      CUDA_OK(cudaMalloc(&p, 256 << 20));
      break;
    }
    case Caller::kHostAlloc: {
      void* p;
      CUDA_OK(cudaHostAlloc(&p, 64 << 20, cudaHostAllocDefault));
      go = true;
      CUDA_OK(cudaHostAlloc(&p, 64 << 20, cudaHostAllocDefault));
      break;
    }
    case Caller::kFirstLaunch: {
      float* p;
      CUDA_OK(cudaMalloc(&p, 1024));
      neverLaunchedBefore<<<1, 32, 0, done>>>(p);
      CUDA_OK(cudaGetLastError());
      go = true;
      break;
    }
  }
  worker.join();
  CUDA_OK(cudaStreamSynchronize(cudaStreamLegacy));
  CUDA_OK(cudaStreamSynchronize(done));
  if (cudaEventQuery(end) != cudaSuccess) exit(4);
  exit(0);
}

// Runs the scenario in a child process; a child that runs past 20 s hung.
void testFlagWait(Scenario sc) {
  const Caller caller = sc.caller;
  const std::string how = sc.memop ? " [cuStreamWaitValue32]" : " [wait kernel]";
  fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) flagWaitScenario(caller, sc.memop);
  int status = 0;
  for (int i = 0; i < 200; i++) {
    if (waitpid(pid, &status, WNOHANG) == pid) {
      report(WIFEXITED(status) && WEXITSTATUS(status) == 0,
             std::string("completion flag wait") + how + ", " + callerName(caller) +
                 (WIFEXITED(status) ? " (exit " + std::to_string(WEXITSTATUS(status)) + ")" : " (crashed)"));
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // polling a child, not synchronising
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  report(false, std::string("completion flag wait") + how + ", " + callerName(caller) +
                    ": HANG (killed after 20 s)");
}

}  // namespace

int main() {
  // The scenarios fork before this process touches CUDA (a child cannot use
  // a CUDA context inherited from its parent).
  const Scenario scenarios[] = {
      {Caller::kFlagOnly, false},     {Caller::kYield, false},     {Caller::kBlockingCopy, false},
      {Caller::kMalloc, false},       {Caller::kHostAlloc, false}, {Caller::kFirstLaunch, false},
      {Caller::kFlagOnly, true},      {Caller::kYield, true},      {Caller::kBlockingCopy, true}};
  for (const Scenario& sc : scenarios) {
    if (access("/dev/nvidiactl", F_OK) != 0) break;
    testFlagWait(sc);
  }
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
  printf("%s: %d failure(s)\n", testFailures() ? "FAILED" : "OK", testFailures());
  return testFailures() ? 1 : 0;
}

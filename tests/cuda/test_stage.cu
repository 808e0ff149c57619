// GPU test of CudaStage (csrc/transport/cuda_stage.cu), streamWaitFlag and
// streamWriteFlag, without torch: the work a communicator gives an op kernel
// (staging copies, unpacks, scaling), checked against host references, and
// the situations the backend creates:
//   - a "worker" thread feeds an op kernel (no CUDA call on that thread)
//     while the stream behind the kernel is what the caller waits for;
//   - meanwhile the main thread blocks in a synchronous copy on the legacy
//     default stream behind the op (what `t.cpu()` after a non-blocking
//     wait() does), allocates, or launches a kernel for the first time.
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
#include "transport/relay.h"
#include "transport/stage.h"

using namespace tcpx;

namespace {

std::atomic<const char*> phase{"start"};



void waitStarted(DeviceStage& s, uint64_t op) {
  while (!s.started(op)) std::this_thread::yield();
}

// Staging round trip inside one op: device -> pinned (copy), pinned ->
// device (unpack copy, unpack reduce with a separate `own`), for sizes
// around page edges; then serial copies, PREMUL_SUM scaling and AVG
// division in the kernel's order. The op's stream finishes once it ends.
void testRoundTrip(DeviceStage& s, cudaStream_t stream) {
  phase = "round trip";
  // Everything CUDA is set up before the op's kernel runs: this thread
  // plays the worker then, which must not wait for the device.
  const std::vector<size_t> sizes = {4, 4096, 4100, 512 * 1024, 524288 + 12};
  struct Buffers {
    std::vector<float> a, b, want, got;
    float *da, *dOwn, *dOut, *pinned, *back;
  };
  std::vector<Buffers> bufs(sizes.size());
  for (size_t k = 0; k < sizes.size(); k++) {
    const size_t bytes = sizes[k], n = bytes / 4;
    Buffers& B = bufs[k];
    B.a.resize(n), B.b.resize(n), B.want.resize(n), B.got.resize(n + 16);
    for (size_t i = 0; i < n; i++) {
      B.a[i] = static_cast<float>(i % 1000);
      B.b[i] = static_cast<float>((i * 7) % 333);
      B.want[i] = B.a[i] + B.b[i];
    }
    CUDA_OK(cudaMalloc(&B.da, bytes));
    CUDA_OK(cudaMalloc(&B.dOwn, bytes));
    CUDA_OK(cudaMalloc(&B.dOut, bytes + 64));
    CUDA_OK(cudaMemcpy(B.da, B.a.data(), bytes, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(B.dOwn, B.b.data(), bytes, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemset(B.dOut, 0x7f, bytes + 64));
    CUDA_OK(cudaDeviceSynchronize());  // the op's non-blocking stream does not wait for these
    B.pinned = static_cast<float*>(s.allocHost(bytes + 64));
    B.back = static_cast<float*>(s.allocHost(bytes + 64));
  }
  CUDA_OK(cudaDeviceSynchronize());
  uint64_t op;
  TCPX_OK(s.launch(stream, &op));
  waitStarted(s, op);
  s.bind(op);
  auto run = [&](auto&& enqueue) {  // one step, then its ticket
    uint64_t t;
    TCPX_OK(enqueue());
    TCPX_OK(s.record(&t));
    waitTicket(s, t);
  };
  for (size_t k = 0; k < sizes.size(); k++) {
    const size_t bytes = sizes[k], n = bytes / 4;
    Buffers& B = bufs[k];
    const std::string sz = std::to_string(bytes);
    run([&] { return s.copy(B.pinned, B.da, bytes, false); });
    report(memcmp(B.pinned, B.a.data(), bytes) == 0, "stage copy device->pinned " + sz);
    run([&] { return s.unpack(B.dOut, nullptr, B.pinned, bytes, false, DataType::kFloat32, RedOp::kSum); });
    // Read back through the op itself: device -> pinned (bytes + 64).
    float* back = B.back;
    run([&] { return s.copy(back, B.dOut, bytes + 64, false); });
    bool tail = true;
    for (size_t i = 0; i < 64; i++) tail &= reinterpret_cast<unsigned char*>(back)[bytes + i] == 0x7f;
    report(memcmp(back, B.a.data(), bytes) == 0 && tail,
           "stage unpack copy " + sz + " (nothing written past the end)");
    run([&] { return s.unpack(B.dOut, B.dOwn, B.pinned, bytes, true, DataType::kFloat32, RedOp::kSum); });
    run([&] { return s.copy(back, B.dOut, bytes, false); });
    report(memcmp(back, B.want.data(), bytes) == 0, "stage unpack reduce own+bounce " + sz);
    // Serial steps: copy a -> out, scale by 0.5, divide by 4, then a
    // staging copy that must see all of it (no ticket in between).
    TCPX_OK(s.copy(B.dOut, B.da, bytes, true));
    TCPX_OK(s.scale(B.dOut, n, DataType::kFloat32, 0.5));
    TCPX_OK(s.divide(B.dOut, n, DataType::kFloat32, 4));
    run([&] { return s.copy(back, B.dOut, bytes, false); });
    bool ok = true;
    for (size_t i = 0; i < n; i++) ok &= back[i] == B.a[i] * 0.5f / 4.0f;
    report(ok, "serial copy, scale, divide, then staging copy " + sz);
  }
  TCPX_OK(s.end(op));
  CUDA_OK(cudaStreamSynchronize(stream));
  report(true, "op kernel exits after end()");
  for (Buffers& B : bufs) {
    s.freeHost(B.pinned);
    s.freeHost(B.back);
    CUDA_OK(cudaFree(B.da));
    CUDA_OK(cudaFree(B.dOwn));
    CUDA_OK(cudaFree(B.dOut));
  }
}

// Ops launched ahead and served in order, more ops than op records (their
// reuse), and an op ended before its kernel starts.
void testManyOps(DeviceStage& s, cudaStream_t stream) {
  phase = "many ops";
  int* counter;
  CUDA_OK(cudaMalloc(&counter, 4 * 1000));
  CUDA_OK(cudaMemset(counter, 0, 4 * 1000));
  std::vector<int> one(1000, 1);
  int* ones;
  CUDA_OK(cudaMalloc(&ones, 4 * 1000));
  CUDA_OK(cudaMemcpy(ones, one.data(), 4 * 1000, cudaMemcpyHostToDevice));
  CUDA_OK(cudaDeviceSynchronize());
  for (int round = 0; round < 100; round++) {
    uint64_t ops[3];
    for (uint64_t& op : ops) TCPX_OK(s.launch(stream, &op));
    for (uint64_t op : ops) {
      waitStarted(s, op);
      s.bind(op);
      // counter += ones, as an unpack reduce from device memory
      TCPX_OK(s.unpack(counter, nullptr, ones, 4 * 1000, true, DataType::kInt32, RedOp::kSum));
      TCPX_OK(s.end(op));
    }
  }
  uint64_t early;
  TCPX_OK(s.launch(stream, &early));
  TCPX_OK(s.end(early));
  CUDA_OK(cudaStreamSynchronize(stream));
  std::vector<int> got(1000);
  CUDA_OK(cudaMemcpy(got.data(), counter, 4 * 1000, cudaMemcpyDeviceToHost));
  bool ok = true;
  for (int v : got) ok &= v == 300;
  report(ok, "300 ops through 128 op records, each adding 1 (got " + std::to_string(got[0]) + ")");
  CUDA_OK(cudaFree(counter));
  CUDA_OK(cudaFree(ones));
}

// Commands posted back to back without waiting, staging copies (device ->
// pinned) alternating with unpack reduces (pinned -> device) of other
// buffers, as the worker posts them for a ring. Every ticket is checked the moment it completes:
// the staging copies it covers must be visible in pinned memory by then
// (tickets complete in command order); the reduces are checked at the end.
void testPipelined(DeviceStage& s, cudaStream_t stream) {
  phase = "pipelined";
  const int chunks = 48;
  const size_t bytes = 1 << 20, n = bytes / 4;
  std::vector<float*> src(chunks), dst(chunks), own(chunks), staged(chunks), bounce(chunks);
  std::vector<std::vector<float>> want(chunks), in(chunks);
  for (int k = 0; k < chunks; k++) {
    in[k].resize(n);
    want[k].resize(n);
    std::vector<float> o(n), b(n);
    for (size_t i = 0; i < n; i++) {
      in[k][i] = static_cast<float>((i * 13 + k) % 2003);
      o[i] = static_cast<float>((i + 7 * k) % 511);
      b[i] = static_cast<float>((i * 3 + k) % 97);
      want[k][i] = o[i] + b[i];
    }
    CUDA_OK(cudaMalloc(&src[k], bytes));
    CUDA_OK(cudaMalloc(&dst[k], bytes));
    CUDA_OK(cudaMalloc(&own[k], bytes));
    CUDA_OK(cudaMemcpy(src[k], in[k].data(), bytes, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(own[k], o.data(), bytes, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemset(dst[k], 0xff, bytes));
    staged[k] = static_cast<float*>(s.allocHost(bytes));
    bounce[k] = static_cast<float*>(s.allocHost(bytes));
    memset(staged[k], 0xff, bytes);
    memcpy(bounce[k], b.data(), bytes);
  }
  CUDA_OK(cudaDeviceSynchronize());
  uint64_t op;
  TCPX_OK(s.launch(stream, &op));
  waitStarted(s, op);
  s.bind(op);
  std::vector<uint64_t> copyTicket(chunks);
  for (int k = 0; k < chunks; k++) {
    TCPX_OK(s.copy(staged[k], src[k], bytes, false));
    TCPX_OK(s.record(&copyTicket[k]));
    TCPX_OK(s.unpack(dst[k], own[k], bounce[k], bytes, true, DataType::kFloat32, RedOp::kSum));
  }
  uint64_t last;
  TCPX_OK(s.record(&last));
  bool inOrder = true;
  for (int k = 0; k < chunks; k++) {
    waitTicket(s, copyTicket[k]);
    for (int j = 0; j <= k; j++)  // everything up to this ticket is there
      inOrder &= memcmp(staged[j], in[j].data(), bytes) == 0;
  }
  waitTicket(s, last);
  TCPX_OK(s.end(op));
  CUDA_OK(cudaStreamSynchronize(stream));
  report(inOrder, "48 staging copies, each visible when its ticket completes");
  bool reduced = true;
  std::vector<float> got(n);
  for (int k = 0; k < chunks; k++) {
    CUDA_OK(cudaMemcpy(got.data(), dst[k], bytes, cudaMemcpyDeviceToHost));
    reduced &= memcmp(got.data(), want[k].data(), bytes) == 0;
    s.freeHost(staged[k]);
    s.freeHost(bounce[k]);
    CUDA_OK(cudaFree(src[k]));
    CUDA_OK(cudaFree(dst[k]));
    CUDA_OK(cudaFree(own[k]));
  }
  report(reduced, "48 unpack reduces posted between them");
}

// Host relay (transport/relay.h): this thread plays the worker, which sees
// the gate, transforms the staged bytes (b -> 255 - b, so a kernel that
// copied its input through would fail) and publishes them. Sizes around
// lines and units, up to the 1 MiB limit; sources and destinations at
// offsets 0, 1, 4 and 8 (the kernel's vector and byte paths), in place
// and not; relays back to back on one slot and on a ring of slots.
void testHostRelay(cudaStream_t stream) {
  phase = "host relay";
  const std::vector<size_t> sizes = {1, 3, 4, 7, 8, 9, 16, 1000, 1024, 4097, 65536, 65539, 1 << 20};
  const size_t maxBytes = 1 << 20;
  char* slab;
  const int kSlots = 3;
  const size_t stride = relaySlotBytes(maxBytes);
  CUDA_OK(cudaHostAlloc(reinterpret_cast<void**>(&slab), kSlots * stride, cudaHostAllocMapped));
  memset(slab, 0, kSlots * stride);
  char *dSrc, *dDst;
  CUDA_OK(cudaMalloc(&dSrc, maxBytes + 64));
  CUDA_OK(cudaMalloc(&dDst, maxBytes + 64));
  uint32_t gen = 0;
  int cases = 0;
  bool ok = true;
  std::string firstBad;
  for (size_t bytes : sizes) {
    for (int srcOff : {0, 1, 4, 8}) {
      for (bool inPlace : {true, false}) {
        const int dstOff = inPlace ? srcOff : (srcOff + 4) % 16;
        std::vector<uint8_t> in(bytes), want(bytes), got(bytes);
        for (size_t i = 0; i < bytes; i++) in[i] = static_cast<uint8_t>((i * 131 + bytes) % 251);
        for (size_t i = 0; i < bytes; i++) want[i] = static_cast<uint8_t>(255 - in[i]);
        char* src = dSrc + srcOff;
        char* dst = inPlace ? src : dDst + dstOff;
        // On the relay's stream: a pageable cudaMemcpy may return before its
        // DMA is done, and a non-blocking stream does not wait for it.
        CUDA_OK(cudaMemcpyAsync(src, in.data(), bytes, cudaMemcpyHostToDevice, stream));
        CUDA_OK(cudaMemsetAsync(dDst, 0x5a, maxBytes + 64, stream));
        char* slot = slab + (cases % kSlots) * stride;
        gen++;
        TCPX_OK(streamHostRelay(src, dst, bytes, slot, gen, stream));
        while (!relayStaged(slot, bytes, gen)) std::this_thread::yield();
        char* data = relayData(slot);
        for (size_t i = 0; i < bytes; i++) data[i] = static_cast<char>(255 - static_cast<uint8_t>(data[i]));
        relayPublish(slot, bytes, gen);
        CUDA_OK(cudaStreamSynchronize(stream));
        CUDA_OK(cudaMemcpy(got.data(), dst, bytes, cudaMemcpyDeviceToHost));
        bool good = got == want;
        if (!inPlace) {  // nothing written around the destination
          uint8_t around[2];
          if (dstOff > 0) {
            CUDA_OK(cudaMemcpy(around, dst - 1, 1, cudaMemcpyDeviceToHost));
            good &= around[0] == 0x5a;
          }
          CUDA_OK(cudaMemcpy(around + 1, dst + bytes, 1, cudaMemcpyDeviceToHost));
          good &= around[1] == 0x5a;
        }
        if (!good && firstBad.empty())
          firstBad = std::to_string(bytes) + " bytes, src offset " + std::to_string(srcOff) +
                     (inPlace ? ", in place" : ", dst offset " + std::to_string(dstOff));
        ok &= good;
        cases++;
      }
    }
  }
  report(ok, std::to_string(cases) + " relays (sizes 1 B-1 MiB, offsets 0/1/4/8, in place or not) " +
                 "match the host's transform" + (firstBad.empty() ? "" : "; first wrong: " + firstBad));
  // Back to back: 200 relays queued before the host answers the first, on
  // a ring of slots, each adding its index to a 1 KiB int32 buffer.
  const int kRelays = 200, n = 256;
  std::vector<int32_t> zero(n, 0);
  CUDA_OK(cudaMemcpyAsync(dSrc, zero.data(), n * 4, cudaMemcpyHostToDevice, stream));
  const uint32_t first = gen + 1;
  for (int k = 0; k < kRelays; k++) {
    gen++;
    TCPX_OK(streamHostRelay(dSrc, dSrc, n * 4, slab + (k % kSlots) * stride, gen, stream));
  }
  for (int k = 0; k < kRelays; k++) {
    const uint32_t g = first + k;
    char* slot = slab + (k % kSlots) * stride;
    while (!relayStaged(slot, n * 4, g)) std::this_thread::yield();
    int32_t* v = reinterpret_cast<int32_t*>(relayData(slot));
    for (int i = 0; i < n; i++) v[i] += k + i;
    relayPublish(slot, n * 4, g);
  }
  CUDA_OK(cudaStreamSynchronize(stream));
  std::vector<int32_t> sum(n);
  CUDA_OK(cudaMemcpy(sum.data(), dSrc, n * 4, cudaMemcpyDeviceToHost));
  bool chain = true;
  for (int i = 0; i < n; i++) chain &= sum[i] == kRelays * (kRelays - 1) / 2 + kRelays * i;
  report(chain, "200 relays of 1 KiB queued back to back on 3 slots, each adding to the last one's result");
  CUDA_OK(cudaFree(dSrc));
  CUDA_OK(cudaFree(dDst));
  CUDA_OK(cudaFreeHost(slab));
}

// What the caller's thread does while the op (or a flag wait) is pending:
// each of these may serialise the device or take a lock the worker would
// need, which must not keep the op from finishing.
enum class Caller { kYield, kBlockingCopy, kMalloc, kHostAlloc, kFirstLaunch };
enum class Wait { kOpKernel, kFlagKernel, kFlagMemop };
struct Scenario {
  Caller caller;
  Wait wait;
};
const char* callerName(Caller c) {
  switch (c) {
    case Caller::kYield: return "caller idle";
    case Caller::kBlockingCopy: return "caller in a blocking copy behind the op";
    case Caller::kMalloc: return "caller in cudaMalloc";
    case Caller::kHostAlloc: return "caller in cudaHostAlloc";
    case Caller::kFirstLaunch: return "caller launches a kernel for the first time";
  }
  return "?";
}
const char* waitName(Wait w) {
  switch (w) {
    case Wait::kOpKernel: return "[op kernel fed by the worker]";
    case Wait::kFlagKernel: return "[flag wait kernel]";
    case Wait::kFlagMemop: return "[flag wait cuStreamWaitValue32]";
  }
  return "?";
}

__global__ void neverLaunchedBefore(float* p) { p[threadIdx.x] += 1.0f; }

// Returns normally with the right data, or hangs (the parent kills it).
void scenario(Scenario sc) {
  std::shared_ptr<DeviceStage> stagePtr;
  TCPX_OK(createCudaStage(0, 8, &stagePtr));
  DeviceStage& s = *stagePtr;
  TCPX_OK(s.reserveHost(256 * 1024, 4));
  const size_t bytes = 4 << 20, n = bytes / 4;
  std::vector<float> pattern(n);
  for (size_t i = 0; i < n; i++) pattern[i] = static_cast<float>(i % 4099);
  float *dev, *dst;
  CUDA_OK(cudaMalloc(&dev, bytes));
  CUDA_OK(cudaMalloc(&dst, bytes));
  CUDA_OK(cudaMemcpy(dev, pattern.data(), bytes, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(dst, 0, bytes));
  CUDA_OK(cudaDeviceSynchronize());
  uint32_t* flags;
  CUDA_OK(cudaHostAlloc(reinterpret_cast<void**>(&flags), 64, cudaHostAllocMapped | cudaHostAllocPortable));
  memset(flags, 0, 64);
  cudaStream_t done;
  CUDA_OK(cudaStreamCreateWithFlags(&done, cudaStreamNonBlocking));
  cudaEvent_t end;
  CUDA_OK(cudaEventCreateWithFlags(&end, cudaEventDisableTiming));
  uint64_t op = 0;
  if (sc.wait == Wait::kOpKernel) TCPX_OK(s.launch(done, &op));
  else TCPX_OK(streamWaitFlag(&flags[1], 1, done, sc.wait == Wait::kFlagMemop));
  CUDA_OK(cudaEventRecord(end, done));
  CUDA_OK(cudaStreamWaitEvent(cudaStreamLegacy, end, 0));
  std::atomic<bool> go{false};
  // The worker: no CUDA call, as in the communicator.
  std::thread worker([&] {
    while (!go) std::this_thread::yield();
    if (sc.wait != Wait::kOpKernel) {
      // A point-to-point op: the net moved pinned memory; the flag says so.
      __atomic_store_n(&flags[1], 1u, __ATOMIC_RELEASE);
      return;
    }
    waitStarted(s, op);
    s.bind(op);
    void* pinned = s.allocHost(256 * 1024);
    for (int i = 0; i < 16; i++) {
      uint64_t t;
      TCPX_OK(s.copy(pinned, reinterpret_cast<char*>(dev) + i * 256 * 1024, 256 * 1024, false));
      TCPX_OK(s.record(&t));
      waitTicket(s, t);
      TCPX_OK(s.unpack(reinterpret_cast<char*>(dst) + i * 256 * 1024, nullptr, pinned, 256 * 1024,
                       true, DataType::kFloat32, RedOp::kSum));
      TCPX_OK(s.record(&t));
      waitTicket(s, t);
    }
    s.freeHost(pinned);
    TCPX_OK(s.end(op));
  });
  std::vector<float> host(n);
  bool copied = false;
  switch (sc.caller) {
    case Caller::kYield: go = true; break;
    case Caller::kBlockingCopy:
      go = true;
      CUDA_OK(cudaMemcpy(host.data(), dst, bytes, cudaMemcpyDeviceToHost));
      copied = true;
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
      go = true;
      neverLaunchedBefore<<<1, 32>>>(p);
      CUDA_OK(cudaGetLastError());
      break;
    }
  }
  worker.join();
  CUDA_OK(cudaStreamSynchronize(cudaStreamLegacy));
  CUDA_OK(cudaStreamSynchronize(done));
  if (cudaEventQuery(end) != cudaSuccess) exit(4);
  if (sc.wait == Wait::kOpKernel) {
    if (!copied) CUDA_OK(cudaMemcpy(host.data(), dst, bytes, cudaMemcpyDeviceToHost));
    if (memcmp(host.data(), pattern.data(), bytes) != 0) exit(5);  // dst = 0 + pattern
  }
  exit(0);
}

// Runs the scenario in a child process; a child that runs past 20 s hung.
void testScenario(Scenario sc) {
  const std::string name = std::string(waitName(sc.wait)) + " " + callerName(sc.caller);
  fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) scenario(sc);
  int status = 0;
  for (int i = 0; i < 200; i++) {
    if (waitpid(pid, &status, WNOHANG) == pid) {
      report(WIFEXITED(status) && WEXITSTATUS(status) == 0,
             name + (WIFEXITED(status) ? " (exit " + std::to_string(WEXITSTATUS(status)) + ")" : " (crashed)"));
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // polling a child, not synchronising
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  report(false, name + ": HANG (killed after 20 s)");
}

}  // namespace

int main() {
  // The scenarios fork before this process touches CUDA (a child cannot use
  // a CUDA context inherited from its parent).
  const Caller callers[] = {Caller::kYield, Caller::kBlockingCopy, Caller::kMalloc,
                            Caller::kHostAlloc, Caller::kFirstLaunch};
  if (access("/dev/nvidiactl", F_OK) == 0) {
    for (Caller c : callers) testScenario({c, Wait::kOpKernel});
    for (Wait w : {Wait::kFlagKernel, Wait::kFlagMemop})
      for (Caller c : {Caller::kYield, Caller::kBlockingCopy, Caller::kFirstLaunch}) testScenario({c, w});
  }
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    printf("SKIP: no CUDA device\n");
    return 0;
  }
  std::thread([] {
    std::this_thread::sleep_for(std::chrono::seconds(150));
    printf("FAIL hang in phase '%s' (watchdog, 150 s)\n", phase.load());
    fflush(stdout);
    _exit(3);
  }).detach();
  CUDA_OK(cudaSetDevice(0));
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::shared_ptr<DeviceStage> stage;
  TCPX_OK(createCudaStage(0, 8, &stage));
  TCPX_OK(stage->reserveHost(512 * 1024, 8));
  testRoundTrip(*stage, stream);
  testManyOps(*stage, stream);
  testPipelined(*stage, stream);
  testHostRelay(stream);
  printf("%s: %d failure(s)\n", testFailures() ? "FAILED" : "OK", testFailures());
  return testFailures() ? 1 : 0;
}

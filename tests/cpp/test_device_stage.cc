// The communicator's device path (transport/stage.h) without a GPU: a fake
// stage whose "device memory" is host memory and whose op "kernel" runs the
// given copies and unpacks later, one per query and out of order (serial
// items excepted), the way the op kernel's blocks run behind the worker and
// ahead of each other. Every collective then goes through the staged sends
// (copy to a pinned chunk, send once its ticket is done), the unpack stage
// (copy or reduce into place once its ticket is done), the finishing ticket
// and the op's start, with ranks as threads over loopback.
//
// References are plain loops over the inputs (small integers in float32, so
// every sum is exact whatever the order).
#include <atomic>
#include <cstring>
#include <deque>
#include <future>
#include <random>
#include <set>

#include "collectives/collectives.h"
#include "collectives/reduce.h"
#include "test_util.h"
#include "transport/relay.h"
#include "transport/stage.h"

namespace tcpx {
namespace {

using testing::runRanks;
using testing::startTask;

// A stream that lags: work runs only when the worker queries (one item per
// query), so tickets are really pending for a while.
class FakeStage : public DeviceStage {
 public:
  ~FakeStage() override {
    for (void* p : host_) free(p);
  }
  int device() const override { return 0; }

  void* allocHost(size_t bytes) override {
    std::lock_guard<std::mutex> lk(mu_);
    void* p = malloc(bytes);
    host_.insert(p);
    hostAllocs_++;
    return p;
  }
  void freeHost(void* p) override {
    std::lock_guard<std::mutex> lk(mu_);
    if (host_.erase(p)) free(p);
  }
  tcpxResult_t reserveHost(size_t, int count) override {
    reserved_ += count;
    return tcpxSuccess;
  }
  void* allocDevice(size_t bytes) override { return malloc(bytes ? bytes : 1); }
  void freeDevice(void* p) override { free(p); }

  // Ops: the kernel "runs" unless held; work outside a bound op is refused.
  tcpxResult_t launch(void*, uint64_t* op) override {
    std::lock_guard<std::mutex> lk(mu_);
    *op = ++launched_;
    return tcpxSuccess;
  }
  bool started(uint64_t) override { return !held_; }
  void bind(uint64_t op) override {
    std::lock_guard<std::mutex> lk(mu_);
    bound_ = op;
    serialNext_ = false;
  }
  tcpxResult_t end(uint64_t op) override {
    std::lock_guard<std::mutex> lk(mu_);
    if (op == 0 || op > launched_ || !ended_.insert(op).second) badEnds_++;
    if (bound_ == op) bound_ = 0;
    return tcpxSuccess;
  }

  tcpxResult_t copy(void* dst, const void* src, size_t bytes, bool serial) override {
    std::lock_guard<std::mutex> lk(mu_);
    TCPX_CHECK(checkBound());
    add([=] { memmove(dst, src, bytes); }, serial);
    copies_++;
    return tcpxSuccess;
  }
  tcpxResult_t scale(void* buf, size_t count, DataType dtype, double factor) override {
    std::lock_guard<std::mutex> lk(mu_);
    TCPX_CHECK(checkBound());
    add([=] { scaleInPlace(buf, count, dtype, factor); }, true);
    return tcpxSuccess;
  }
  tcpxResult_t divide(void* buf, size_t count, DataType dtype, int64_t divisor) override {
    std::lock_guard<std::mutex> lk(mu_);
    TCPX_CHECK(checkBound());
    add([=] { divideInPlace(buf, count, dtype, divisor); }, true);
    return tcpxSuccess;
  }
  tcpxResult_t unpack(void* dst, const void* own, const void* bounce, size_t bytes, bool reduce,
                      DataType dtype, RedOp op) override {
    std::lock_guard<std::mutex> lk(mu_);
    TCPX_CHECK(checkBound());
    add([=] {
      if (!reduce) {
        memcpy(dst, bounce, bytes);
        return;
      }
      if (own && own != dst) memcpy(dst, own, bytes);
      reduceInto(dst, bounce, bytes / dataTypeSize(dtype), dtype, op);
    }, false);
    unpacks_++;
    return tcpxSuccess;
  }
  tcpxResult_t record(uint64_t* ticket) override {
    std::lock_guard<std::mutex> lk(mu_);
    *ticket = base_ + items_.size();
    return tcpxSuccess;
  }
  tcpxResult_t query(uint64_t ticket, bool* done) override {
    std::lock_guard<std::mutex> lk(mu_);
    if (!items_.empty()) runOne();
    *done = base_ >= ticket;
    return tcpxSuccess;
  }
  std::string describe(uint64_t) override { return "fake"; }
  tcpxResult_t synchronize() override {
    std::lock_guard<std::mutex> lk(mu_);
    while (!items_.empty()) runOne();
    return tcpxSuccess;
  }

  void hold(bool h) { held_ = h; }
  // Every launched op ended exactly once.
  bool opsBalanced() {
    std::lock_guard<std::mutex> lk(mu_);
    return badEnds_ == 0 && ended_.size() == launched_;
  }
  uint64_t launched() {
    std::lock_guard<std::mutex> lk(mu_);
    return launched_;
  }
  int copies() const { return copies_; }
  int unpacks() const { return unpacks_; }
  int reserved() const { return reserved_; }
  size_t pending() {
    std::lock_guard<std::mutex> lk(mu_);
    return items_.size();
  }

 private:
  tcpxResult_t checkBound() {
    if (!bound_) TCPX_ERR(tcpxInternalError, "fake stage: device work outside an op");
    return tcpxSuccess;
  }
  // Work given to the op "kernel". Items run out of order, as the kernel's
  // blocks run ahead of each other, except serial ones (and the item after
  // one), which wait for every earlier item; so the communicator must order
  // dependent work by tickets, as it must on the GPU.
  struct Item {
    std::function<void()> fn;
    bool serial;
    bool done = false;
  };
  void add(std::function<void()> fn, bool serial) {
    items_.push_back(Item{std::move(fn), serial || serialNext_});
    serialNext_ = serial;
  }
  void runOne() {
    std::vector<size_t> runnable;
    bool allBeforeDone = true;
    for (size_t i = 0; i < items_.size(); i++) {
      if (items_[i].done) continue;
      if (items_[i].serial) {
        if (allBeforeDone) runnable.push_back(i);
        break;  // nothing after a pending serial item runs
      }
      runnable.push_back(i);
      allBeforeDone = false;
    }
    Item& it = items_[runnable[rng_() % runnable.size()]];
    it.fn();
    it.done = true;
    while (!items_.empty() && items_.front().done) {
      items_.pop_front();
      base_++;  // tickets up to here are done (the kernel's `done`)
    }
  }
  std::mutex mu_;
  std::deque<Item> items_;
  uint64_t base_ = 0;  // items before items_ (all run)
  bool serialNext_ = false;
  std::mt19937 rng_{20261121};
  std::set<void*> host_;
  uint64_t launched_ = 0;
  std::set<uint64_t> ended_;
  int badEnds_ = 0;
  std::atomic<bool> held_{false};
  std::atomic<uint64_t> bound_{0};
  std::atomic<int> copies_{0}, unpacks_{0}, reserved_{0}, hostAllocs_{0};
};

constexpr size_t kChunk = 1024;
constexpr int kBuffers = 4;

std::vector<std::shared_ptr<FakeStage>> fakeStages(int n) {
  std::vector<std::shared_ptr<FakeStage>> v;
  for (int r = 0; r < n; r++) v.push_back(std::make_shared<FakeStage>());
  return v;
}

// A loopback group whose rank r runs device schedules on stages[r].
struct StagedGroup {
  explicit StagedGroup(int n)
      : stages(fakeStages(n)),
        group(n, kChunk, kBuffers, std::chrono::milliseconds(15000),
              {stages.begin(), stages.end()}),
        comms(group.comms) {}
  bool ok() const { return group.ok(); }
  std::vector<std::shared_ptr<FakeStage>> stages;
  testing::LoopbackGroup group;
  std::vector<std::unique_ptr<Communicator>>& comms;
};

// Issues `task` as c10d does for CUDA tensors: with an op of the rank's stage.
std::future<TaskResult> issue(Communicator& comm, std::shared_ptr<Task> task) {
  uint64_t op = 0;
  EXPECT_EQ(comm.stage()->launch(nullptr, &op), tcpxSuccess);
  task->deviceOp = op;
  return startTask(comm, task);
}

TaskResult run(Communicator& comm, std::shared_ptr<Task> task) { return issue(comm, task).get(); }

// Rank r's element i: a small integer, so float sums are exact.
float input(int r, size_t i) { return static_cast<float>((r * 7 + static_cast<int>(i % 113)) % 61); }

std::vector<float> inputs(int r, size_t n) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; i++) v[i] = input(r, i);
  return v;
}

class DeviceStageTest : public ::testing::TestWithParam<int> {};

// Sizes: below the latency threshold (recursive doubling, tree), one chunk,
// and many chunks (ring, chain), with a partial last chunk.
const size_t kCounts[] = {1, 3, 255, 256, 5000};

// all_reduce of rank inputs, element i, as plain float arithmetic (PREMUL_SUM
// with factor 0.5; AVG: the exact sum divided once, as the backend does).
float allreduceRef(RedOp op, int n, size_t i) {
  float acc = op == RedOp::kMax ? -1e30f : 0.f;
  for (int q = 0; q < n; q++) {
    const float v = op == RedOp::kPremulSum ? 0.5f * input(q, i) : input(q, i);
    acc = op == RedOp::kMax ? std::max(acc, v) : acc + v;
  }
  return op == RedOp::kAvg ? acc / static_cast<float>(n) : acc;
}

const RedOp kAllreduceOps[] = {RedOp::kSum, RedOp::kMax, RedOp::kAvg, RedOp::kPremulSum};

// Every op of kAllreduceOps at every count of kCounts on every rank of g,
// checked against allreduceRef; withOp: issued with an op of the stage (as
// c10d issues CUDA collectives), else without (a host-staged CUDA op).
void runAllreduces(StagedGroup& g, int n, bool withOp) {
  CollConfig cfg;
  cfg.threshold = 512;
  runRanks(n, [&](int r) {
    for (size_t count : kCounts) {
      for (RedOp op : kAllreduceOps) {
        std::vector<float> buf = inputs(r, count);
        std::shared_ptr<CollectiveTask> t;
        ASSERT_EQ(makeAllreduce(*g.comms[r], cfg, buf.data(), count, DataType::kFloat32, op, 0.5, &t),
                  tcpxSuccess);
        TaskResult res = withOp ? run(*g.comms[r], t) : startTask(*g.comms[r], t).get();
        ASSERT_TRUE(res.ok()) << res.message;
        for (size_t i = 0; i < count; i++)
          ASSERT_EQ(buf[i], allreduceRef(op, n, i))
              << redOpName(op) << " rank " << r << " count " << count << " i " << i;
      }
    }
  });
}

// SUM and MAX, and AVG and PREMUL_SUM, whose division and scaling are serial
// items (the out-of-order fake runs them after everything before them).
TEST_P(DeviceStageTest, AllreduceMatchesReference) {
  const int n = GetParam();
  StagedGroup g(n);
  ASSERT_TRUE(g.ok());
  runAllreduces(g, n, /*withOp=*/true);
  // Every byte went through the stage: staged sends and unpacks were used.
  for (auto& s : g.stages) {
    EXPECT_GT(s->copies(), 0);
    EXPECT_GT(s->unpacks(), 0);
    EXPECT_EQ(s->pending(), 0u) << "device work left behind after the ops completed";
    EXPECT_EQ(s->reserved(), std::min(n - 1, 16) * kBuffers * 2);
    EXPECT_TRUE(s->opsBalanced()) << "an op kernel would not exit";
  }
  // The breakdown counts every device collective, and the lagging stream
  // kept staging copies and unpacks in flight for a while.
  for (auto& c : g.comms) {
    DeviceBreakdown b = c->deviceBreakdown();
    EXPECT_EQ(b.ops, std::size(kCounts) * std::size(kAllreduceOps));
    EXPECT_GT(b.wallUs, 0);
    EXPECT_GT(b.stagingUs, 0);
    EXPECT_GT(b.netUs, 0);
    EXPECT_GT(b.unpackUs, 0);
    EXPECT_LE(b.stagingUs, b.wallUs * 1.001);
  }
}

// A task without an op kernel on a device communicator (a small CUDA
// all_reduce staged whole through pinned memory by c10d) runs on host
// memory: CPU reductions, AVG's division and PREMUL_SUM's scaling on the
// host, and nothing is posted to the stage.
TEST_P(DeviceStageTest, TaskWithoutOpRunsOnHostMemory) {
  const int n = GetParam();
  StagedGroup g(n);
  ASSERT_TRUE(g.ok());
  runAllreduces(g, n, /*withOp=*/false);
  for (auto& s : g.stages) {
    EXPECT_EQ(s->copies(), 0);
    EXPECT_EQ(s->unpacks(), 0);
    EXPECT_EQ(s->pending(), 0u);
    EXPECT_TRUE(s->opsBalanced());
  }
}

TEST_P(DeviceStageTest, DataMovementAndReductionsMatchReference) {
  const int n = GetParam();
  StagedGroup g(n);
  ASSERT_TRUE(g.ok());
  CollConfig cfg;
  const size_t count = 700;  // several chunks of 1 KiB
  runRanks(n, [&](int r) {
    Communicator& c = *g.comms[r];
    std::shared_ptr<CollectiveTask> t;
    // broadcast from the last rank
    std::vector<float> b = inputs(r, count);
    ASSERT_EQ(makeBroadcast(c, cfg, b.data(), count, DataType::kFloat32, n - 1, &t), tcpxSuccess);
    ASSERT_TRUE(run(c, t).ok());
    for (size_t i = 0; i < count; i++) ASSERT_EQ(b[i], input(n - 1, i));
    // all_gather
    std::vector<float> in = inputs(r, count), out(count * n, -1.f);
    std::vector<void*> outs;
    for (int q = 0; q < n; q++) outs.push_back(out.data() + q * count);
    ASSERT_EQ(makeAllgather(c, in.data(), outs, count, DataType::kFloat32, &t), tcpxSuccess);
    ASSERT_TRUE(run(c, t).ok());
    for (int q = 0; q < n; q++)
      for (size_t i = 0; i < count; i++) ASSERT_EQ(out[q * count + i], input(q, i));
    // reduce_scatter: block q of rank r's input is input(r, q*count + i);
    // PREMUL_SUM scales a copy of the input (serial items), which stays intact
    for (RedOp op : {RedOp::kSum, RedOp::kPremulSum}) {
      std::vector<float> full = inputs(r, count * n), mine(count, -1.f);
      std::vector<const void*> blocks;
      for (int q = 0; q < n; q++) blocks.push_back(full.data() + q * count);
      ASSERT_EQ(makeReduceScatter(c, blocks, mine.data(), count, DataType::kFloat32, op, 0.5, &t),
                tcpxSuccess);
      ASSERT_TRUE(run(c, t).ok());
      for (size_t i = 0; i < count; i++)
        ASSERT_EQ(mine[i], allreduceRef(op, n, r * count + i)) << "reduce_scatter rank " << r << " i " << i;
      for (size_t i = 0; i < count * n; i++) ASSERT_EQ(full[i], input(r, i)) << "input modified";
    }
    // reduce to rank 0 (chain above the threshold)
    std::vector<float> red = inputs(r, count);
    ASSERT_EQ(makeReduce(c, cfg, red.data(), count, DataType::kFloat32, RedOp::kSum, 1.0, 0, &t),
              tcpxSuccess);
    ASSERT_TRUE(run(c, t).ok());
    for (size_t i = 0; i < count; i++) {
      float want = 0;
      for (int q = 0; q < n; q++) want += input(q, i);
      ASSERT_EQ(red[i], r == 0 ? want : input(r, i));
    }
    // all_to_all: rank r sends block q = r*100+q+i to rank q
    std::vector<float> sbuf(count * n), rbuf(count * n, -1.f);
    std::vector<const void*> sends;
    std::vector<void*> recvs;
    for (int q = 0; q < n; q++) {
      for (size_t i = 0; i < count; i++) sbuf[q * count + i] = static_cast<float>(r * 100 + q + i % 7);
      sends.push_back(sbuf.data() + q * count);
      recvs.push_back(rbuf.data() + q * count);
    }
    std::vector<size_t> counts(n, count);
    ASSERT_EQ(makeAlltoall(c, sends, counts, recvs, counts, DataType::kFloat32, &t), tcpxSuccess);
    ASSERT_TRUE(run(c, t).ok());
    for (int q = 0; q < n; q++)
      for (size_t i = 0; i < count; i++)
        ASSERT_EQ(rbuf[q * count + i], static_cast<float>(q * 100 + r + i % 7));
  });
}

// A task does not start before its op kernel runs (the caller's stream has
// reached the op), and then completes normally.
TEST_P(DeviceStageTest, TaskWaitsForItsKernel) {
  const int n = GetParam();
  StagedGroup g(n);
  ASSERT_TRUE(g.ok());
  CollConfig cfg;
  std::vector<std::vector<float>> bufs(n);
  std::vector<std::future<TaskResult>> futs(n);
  g.stages[0]->hold(true);
  std::atomic<int> polls{0};
  for (int r = 0; r < n; r++) {
    bufs[r] = inputs(r, 300);
    std::shared_ptr<CollectiveTask> t;
    ASSERT_EQ(makeAllreduce(*g.comms[r], cfg, bufs[r].data(), 300, DataType::kFloat32, RedOp::kSum,
                            1.0, &t),
              tcpxSuccess);
    if (r == 0) t->gate = [&] { return ++polls > 0; };  // counts the worker's polls; always open
    futs[r] = issue(*g.comms[r], t);
  }
  // Rank 0's part cannot have run: its buffer is unchanged and nobody is done.
  while (polls.load() < 3) std::this_thread::yield();
  for (int r = 0; r < n; r++)
    EXPECT_EQ(futs[r].wait_for(std::chrono::seconds(0)), std::future_status::timeout);
  for (size_t i = 0; i < 300; i++) ASSERT_EQ(bufs[0][i], input(0, i));
  g.stages[0]->hold(false);
  for (int r = 0; r < n; r++) {
    TaskResult res = futs[r].get();
    ASSERT_TRUE(res.ok()) << res.message;
    for (size_t i = 0; i < 300; i++) {
      float want = 0;
      for (int q = 0; q < n; q++) want += input(q, i);
      ASSERT_EQ(bufs[r][i], want);
    }
  }
  for (auto& s : g.stages) EXPECT_TRUE(s->opsBalanced());
}

// A size mismatch fails the op on the staged path too (in-flight staging
// copies and unpacks are drained first), and the group stays usable.
TEST_P(DeviceStageTest, MismatchFailsAndGroupStaysUsable) {
  const int n = GetParam();
  StagedGroup g(n);
  ASSERT_TRUE(g.ok());
  CollConfig cfg;
  runRanks(n, [&](int r) {
    size_t count = r == 0 ? 3000 : 2000;
    std::vector<float> buf = inputs(r, count);
    std::shared_ptr<CollectiveTask> t;
    ASSERT_EQ(makeAllreduce(*g.comms[r], cfg, buf.data(), count, DataType::kFloat32, RedOp::kSum,
                            1.0, &t),
              tcpxSuccess);
    TaskResult res = run(*g.comms[r], t);
    EXPECT_FALSE(res.ok()) << "rank " << r << ": a size mismatch went unnoticed";
    std::vector<float> ok = inputs(r, 600);
    ASSERT_EQ(makeAllreduce(*g.comms[r], cfg, ok.data(), 600, DataType::kFloat32, RedOp::kSum, 1.0, &t),
              tcpxSuccess);
    res = run(*g.comms[r], t);
    ASSERT_TRUE(res.ok()) << res.message;
    for (size_t i = 0; i < 600; i++) {
      float want = 0;
      for (int q = 0; q < n; q++) want += input(q, i);
      ASSERT_EQ(ok[i], want);
    }
  });
  for (auto& s : g.stages) EXPECT_TRUE(s->opsBalanced()) << "a failed op's kernel would not exit";
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, DeviceStageTest, ::testing::Values(2, 3, 5));

// The host relay's slot (transport/relay.h), read back the way the relay
// kernel reads it. LL mode: 16-byte units {d0, f0, d1, f1} after the data
// area, little-endian, 4 data bytes per line, the flag the generation;
// sizes cover a partial line, a partial unit and whole units. Flag mode:
// the data stay in place and the done word at offset 128 is the
// generation. The gate needs every block's header word.
TEST(HostRelay, PublishWritesTheSlotLayout) {
  for (size_t bytes : {1, 3, 4, 5, 8, 12, 16, 1000, 1024, 4096, 4097, 100000}) {
    std::vector<uint8_t> slot(relaySlotBytes(bytes) + 16, 0xee);  // a canary past the end
    std::vector<uint8_t> data(bytes);
    for (size_t i = 0; i < bytes; i++) data[i] = static_cast<uint8_t>(i * 7 + 1);
    memcpy(slot.data() + 256, data.data(), bytes);
    const bool ll = bytes <= 4096;
    ASSERT_EQ(relaySlotBytes(bytes), 256 + (bytes + 15) / 16 * 16 + (ll ? (bytes + 7) / 8 * 16 : 0));
    relayPublish(slot.data(), bytes, 0xabcd1234u);
    auto word = [&](size_t off) {
      const uint8_t* p = &slot[off];
      return p[0] | p[1] << 8 | p[2] << 16 | static_cast<uint32_t>(p[3]) << 24;
    };
    EXPECT_EQ(word(128), ll ? 0xeeeeeeeeu : 0xabcd1234u) << bytes << " bytes";
    EXPECT_EQ(memcmp(slot.data() + 256, data.data(), bytes), 0) << bytes << " bytes";
    if (ll) {
      const size_t area = 256 + (bytes + 15) / 16 * 16;
      for (size_t line = 0; line < (bytes + 7) / 8 * 2; line++) {
        EXPECT_EQ(word(area + line * 8 + 4), 0xabcd1234u) << bytes << " bytes, line " << line;
        for (int b = 0; b < 4; b++) {
          const size_t off = line * 4 + b;
          EXPECT_EQ(slot[area + line * 8 + b], off < bytes ? data[off] : 0) << bytes << " bytes, byte " << off;
        }
      }
    }
    for (size_t i = relaySlotBytes(bytes); i < slot.size(); i++) ASSERT_EQ(slot[i], 0xee) << bytes << " bytes";
  }
}

TEST(HostRelay, GateWaitsForEveryBlock) {
  const size_t bytes = 3 * 32768 + 1;  // four blocks
  std::vector<uint32_t> header(64, 0);
  for (int b = 0; b < 4; b++) {
    EXPECT_FALSE(relayStaged(header.data(), bytes, 7)) << b << " blocks staged";
    header[b] = 7;
  }
  EXPECT_TRUE(relayStaged(header.data(), bytes, 7));
  EXPECT_FALSE(relayStaged(header.data(), bytes, 8));
  EXPECT_TRUE(relayStaged(header.data(), 100, 7));  // one block
}

}  // namespace
}  // namespace tcpx

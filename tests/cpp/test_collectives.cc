// reduce, reduce_scatter, all_to_all, gather, scatter, coalesced batches and
// any-source receives through Communicator over loopback, ranks as threads.
//
// References are computed here with plain loops over the inputs, never with
// the code under test: float32 inputs are small integers (and halves), so
// sums are exact whatever the order; int32 and uint8 sums wrap modulo 2^bits
// (computed in unsigned arithmetic); bfloat16 is decoded by hand and
// compared with a tolerance.
//
// Each world size gets one group, and every rank thread issues the whole
// list of cases in the same order. Checks are non-fatal so that a rank whose
// check fails still issues the remaining collectives (the others would
// otherwise wait for it); a task that hangs is bounded by the group timeout.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <future>
#include <limits>
#include <set>
#include <sstream>

#include "collectives/collectives.h"
#include "test_util.h"

namespace tcpx {
namespace {

using testing::makeGroup;
using testing::makeLoopbackNet;
using testing::runRanks;
using testing::runTask;
using testing::startTask;

using Comms = std::vector<std::unique_ptr<Communicator>>;

// Small chunks, so that a few thousand bytes already make several messages.
constexpr size_t kChunk = 1024;
constexpr int kBuffers = 4;
// A hang fails the task (and the communicator) after this, not the test run.
constexpr std::chrono::milliseconds kGroupTimeout{15000};
constexpr double kPremul = 0.5;

Comms makeComms(Net* net, int n) {
  Comms comms = makeGroup(net, n, kChunk, kBuffers, kGroupTimeout);
  for (auto& c : comms) EXPECT_NE(c, nullptr);
  return comms;
}

bool allCreated(const Comms& comms) {
  for (auto& c : comms)
    if (!c) return false;
  return true;
}

// A loopback net and an n-rank group on it, with this file's chunk size.
struct TestGroup : testing::LoopbackGroup {
  explicit TestGroup(int n) : LoopbackGroup(n, kChunk, kBuffers, kGroupTimeout) {}
};


const char* dtName(DataType t) {
  switch (t) {
    case DataType::kFloat32: return "float32";
    case DataType::kInt32: return "int32";
    case DataType::kUInt8: return "uint8";
    case DataType::kBFloat16: return "bfloat16";
    case DataType::kInt64: return "int64";
    default: return "?";
  }
}
const char* opName(RedOp op) {
  switch (op) {
    case RedOp::kSum: return "SUM";
    case RedOp::kMax: return "MAX";
    case RedOp::kAvg: return "AVG";
    case RedOp::kPremulSum: return "PREMUL_SUM";
    default: return "?";
  }
}
size_t elemSize(DataType t) {
  switch (t) {
    case DataType::kFloat32:
    case DataType::kInt32: return 4;
    case DataType::kUInt8: return 1;
    case DataType::kBFloat16: return 2;
    case DataType::kInt64: return 8;
    default: return 0;
  }
}

// ---------------------------------------------------------------------------
// Inputs and references.

uint32_t mix(int r, int b, size_t i) {
  uint64_t x = static_cast<uint64_t>(r) * 0x9E3779B97F4A7C15ULL ^
               static_cast<uint64_t>(b + 1) * 0xC2B2AE3D27D4EB4FULL ^
               static_cast<uint64_t>(i + 7) * 0x165667B19E3779F9ULL;
  x ^= x >> 29;
  x *= 0xBF58476D1CE4E5B9ULL;
  x ^= x >> 32;
  return static_cast<uint32_t>(x);
}

// bfloat16 by hand: round to nearest even (no NaNs here), decode by shifting.
uint16_t toBf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float fromBf16(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// Element i of block b of rank r's input.
float f32In(int r, int b, size_t i) {
  return static_cast<float>(static_cast<int>((i * 7 + static_cast<size_t>(r) * 13 +
                                              static_cast<size_t>(b) * 5) % 23) - 11);
}
int32_t i32In(int r, int b, size_t i) {
  uint32_t u = mix(r, b, i) | 0x40000000u;  // large magnitudes: sums wrap
  int32_t v;
  memcpy(&v, &u, 4);
  return v;
}
uint8_t u8In(int r, int b, size_t i) { return static_cast<uint8_t>(mix(r, b, i) | 0x80u); }
uint16_t bf16In(int r, int b, size_t i) {
  return toBf16(static_cast<float>(static_cast<int>(mix(r, b, i) % 2001) - 1000) / 64.0f +
                0.01f * static_cast<float>(r));
}
int64_t i64In(int r, int b, size_t i) {
  return static_cast<int64_t>(r) * 1000000007LL + static_cast<int64_t>(b) * 1000003LL +
         static_cast<int64_t>(i) - 5000;
}

void fillInput(DataType dt, int r, int b, char* buf, size_t count) {
  for (size_t i = 0; i < count; i++) {
    switch (dt) {
      case DataType::kFloat32: {
        float v = f32In(r, b, i);
        memcpy(buf + 4 * i, &v, 4);
        break;
      }
      case DataType::kInt32: {
        int32_t v = i32In(r, b, i);
        memcpy(buf + 4 * i, &v, 4);
        break;
      }
      case DataType::kUInt8: buf[i] = static_cast<char>(u8In(r, b, i)); break;
      case DataType::kBFloat16: {
        uint16_t v = bf16In(r, b, i);
        memcpy(buf + 2 * i, &v, 2);
        break;
      }
      case DataType::kInt64: {
        int64_t v = i64In(r, b, i);
        memcpy(buf + 8 * i, &v, 8);
        break;
      }
      default: ADD_FAILURE() << "no inputs for this dtype";
    }
  }
}

std::vector<char> makeInput(DataType dt, int r, int b, size_t count) {
  std::vector<char> v(count * elemSize(dt) + 1);  // +1: never a null data()
  fillInput(dt, r, b, v.data(), count);
  return v;
}

// Checks `got` against the reduction of block b over ranks 0..n-1.
::testing::AssertionResult matchesReference(DataType dt, RedOp op, int n, int b,
                                             const char* got, size_t count) {
  for (size_t i = 0; i < count; i++) {
    std::ostringstream bad;
    switch (dt) {
      case DataType::kFloat32: {
        double sum = 0, mx = -1e300;
        for (int q = 0; q < n; q++) {
          sum += f32In(q, b, i);
          mx = std::max<double>(mx, f32In(q, b, i));
        }
        float want;
        if (op == RedOp::kSum) want = static_cast<float>(sum);
        else if (op == RedOp::kMax) want = static_cast<float>(mx);
        else if (op == RedOp::kAvg) want = static_cast<float>(sum) / static_cast<float>(n);
        else want = static_cast<float>(sum * kPremul);  // halves of small integers: exact
        float g;
        memcpy(&g, got + 4 * i, 4);
        if (g != want) bad << "got " << g << ", want " << want;
        break;
      }
      case DataType::kInt32: {
        uint32_t sum = 0;
        int32_t mx = std::numeric_limits<int32_t>::min();
        for (int q = 0; q < n; q++) {
          int32_t v = i32In(q, b, i);
          uint32_t u;
          memcpy(&u, &v, 4);
          sum += u;
          mx = std::max(mx, v);
        }
        int32_t wrapped;
        memcpy(&wrapped, &sum, 4);
        int32_t want = op == RedOp::kSum ? wrapped
                       : op == RedOp::kMax ? mx
                                           : static_cast<int32_t>(wrapped / n);  // AVG: truncates
        int32_t g;
        memcpy(&g, got + 4 * i, 4);
        if (g != want) bad << "got " << g << ", want " << want;
        break;
      }
      case DataType::kUInt8: {
        unsigned sum = 0, mx = 0;
        for (int q = 0; q < n; q++) {
          sum += u8In(q, b, i);
          mx = std::max<unsigned>(mx, u8In(q, b, i));
        }
        sum &= 0xFFu;
        unsigned want = op == RedOp::kSum ? sum : op == RedOp::kMax ? mx : sum / n;
        unsigned g = static_cast<uint8_t>(got[i]);
        if (g != want) bad << "got " << g << ", want " << want;
        break;
      }
      case DataType::kBFloat16: {
        // SUM only: the sum rounds once per reduction step, so allow n-1
        // roundings of at most 2^-9 of the sum of magnitudes each.
        double sum = 0, mag = 0;
        for (int q = 0; q < n; q++) {
          double v = fromBf16(bf16In(q, b, i));
          sum += v;
          mag += std::fabs(v);
        }
        uint16_t gb;
        memcpy(&gb, got + 2 * i, 2);
        double g = fromBf16(gb);
        if (!(std::fabs(g - sum) <= n * mag / 256.0 + 1e-9))
          bad << "got " << g << ", want " << sum << " (tolerance " << n * mag / 256.0 << ")";
        break;
      }
      default: return ::testing::AssertionFailure() << "no reference for this dtype";
    }
    if (!bad.str().empty())
      return ::testing::AssertionFailure() << "element " << i << " of " << count << ": "
                                           << bad.str();
  }
  return ::testing::AssertionSuccess();
}

struct Spec {
  DataType dtype;
  RedOp op;
};
// What the reduce and reduce_scatter tests run.
const std::vector<Spec> kSpecs = {
    {DataType::kFloat32, RedOp::kSum},   {DataType::kFloat32, RedOp::kMax},
    {DataType::kFloat32, RedOp::kAvg},   {DataType::kFloat32, RedOp::kPremulSum},
    {DataType::kInt32, RedOp::kSum},     {DataType::kInt32, RedOp::kMax},
    {DataType::kInt32, RedOp::kAvg},     {DataType::kUInt8, RedOp::kSum},
    {DataType::kUInt8, RedOp::kAvg},     {DataType::kBFloat16, RedOp::kSum},
};

class WorldSize : public ::testing::TestWithParam<int> {};

// ---------------------------------------------------------------------------
// Reduce.

TEST_P(WorldSize, ReduceRootGetsReferenceOthersUnchanged) {
  const int n = GetParam();
  TestGroup g(n);
  ASSERT_TRUE(g.ok());
  Comms& comms = g.comms;
  // 3000 elements: 12 chunks of float32, 3 of uint8.
  const std::vector<size_t> counts = {0, 1, 7, 3000};
  runRanks(n, [&](int r) {
    for (const char* algo : {"tree", "chain"}) {
      CollConfig cfg;
      // At or below the threshold: tree; above: chain (count 0 is always tree).
      cfg.threshold = std::string(algo) == "tree" ? std::numeric_limits<size_t>::max() : 0;
      for (size_t count : counts) {
        for (const Spec& sp : kSpecs) {
          for (int root = 0; root < n; root++) {
            std::string what = ::testing::PrintToString(n) + " ranks, " + algo + ", root " +
                               std::to_string(root) + ", " + std::to_string(count) + " " +
                               dtName(sp.dtype) + ", " + opName(sp.op) + ", rank " +
                               std::to_string(r);
            std::vector<char> buf = makeInput(sp.dtype, r, 0, count);
            const std::vector<char> orig = buf;
            std::shared_ptr<CollectiveTask> t;
            tcpxResult_t mk = makeReduce(*comms[r], cfg, buf.data(), count, sp.dtype, sp.op,
                                         kPremul, root, &t);
            EXPECT_EQ(mk, tcpxSuccess) << what << ": " << lastError();
            if (mk != tcpxSuccess) continue;  // the same on every rank
            TaskResult res = runTask(*comms[r], t);
            EXPECT_TRUE(res.ok()) << what << ": " << res.message;
            if (!res.ok()) continue;
            if (r == root)
              EXPECT_TRUE(matchesReference(sp.dtype, sp.op, n, 0, buf.data(), count)) << what;
            else
              EXPECT_TRUE(buf == orig) << what << ": a non-root buffer was modified";
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Reduce-scatter.

TEST_P(WorldSize, ReduceScatterMatchesReferenceInputsUnchanged) {
  const int n = GetParam();
  TestGroup g(n);
  ASSERT_TRUE(g.ok());
  Comms& comms = g.comms;
  // 1000 float32 elements per block: 4 chunks.
  const std::vector<size_t> counts = {0, 1, 1000};
  runRanks(n, [&](int r) {
    for (bool inPlace : {false, true}) {
      for (size_t count : counts) {
        for (const Spec& sp : kSpecs) {
          std::string what = std::to_string(n) + " ranks, " + (inPlace ? "in place, " : "") +
                             std::to_string(count) + " " + dtName(sp.dtype) + ", " +
                             opName(sp.op) + ", rank " + std::to_string(r);
          const size_t blockBytes = count * elemSize(sp.dtype);
          // One contiguous input of n blocks; block b is this rank's
          // contribution to rank b's result.
          std::vector<char> in(blockBytes * static_cast<size_t>(n) + 1);
          for (int b = 0; b < n; b++)
            fillInput(sp.dtype, r, b, in.data() + static_cast<size_t>(b) * blockBytes, count);
          const std::vector<char> orig = in;
          std::vector<char> out(blockBytes + 1, 0x5A);
          std::vector<const void*> ins;
          for (int b = 0; b < n; b++) ins.push_back(in.data() + static_cast<size_t>(b) * blockBytes);
          char* outp = inPlace ? in.data() + static_cast<size_t>(r) * blockBytes : out.data();
          std::shared_ptr<CollectiveTask> t;
          tcpxResult_t mk =
              makeReduceScatter(*comms[r], ins, outp, count, sp.dtype, sp.op, kPremul, &t);
          EXPECT_EQ(mk, tcpxSuccess) << what << ": " << lastError();
          if (mk != tcpxSuccess) continue;
          TaskResult res = runTask(*comms[r], t);
          EXPECT_TRUE(res.ok()) << what << ": " << res.message;
          if (!res.ok()) continue;
          EXPECT_TRUE(matchesReference(sp.dtype, sp.op, n, r, outp, count)) << what;
          // Every input block but the in-place output is as it was.
          for (int b = 0; b < n; b++) {
            if (inPlace && b == r) continue;
            const size_t off = static_cast<size_t>(b) * blockBytes;
            EXPECT_EQ(memcmp(in.data() + off, orig.data() + off, blockBytes), 0)
                << what << ": input block " << b << " was modified";
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------
// All-to-all.

int32_t a2aValue(int src, int dst, size_t i) {
  return src * 1000003 + dst * 10007 + static_cast<int32_t>(i);
}

// Runs one all_to_all on every rank with counts[src][dst] elements from src
// to dst, and checks what every rank received and that its sends are intact.
void checkAlltoall(const Comms& comms, const std::vector<std::vector<size_t>>& counts,
                   const std::string& label) {
  const int n = static_cast<int>(comms.size());
  runRanks(n, [&](int r) {
    std::vector<std::vector<int32_t>> sends(n), recvs(n);
    std::vector<const void*> sp;
    std::vector<void*> rp;
    std::vector<size_t> sc, rc;
    for (int j = 0; j < n; j++) {
      sends[j].resize(counts[r][j] + 1);
      for (size_t i = 0; i < counts[r][j]; i++) sends[j][i] = a2aValue(r, j, i);
      recvs[j].assign(counts[j][r] + 1, -7);
      sp.push_back(sends[j].data());
      rp.push_back(recvs[j].data());
      sc.push_back(counts[r][j]);
      rc.push_back(counts[j][r]);
    }
    const auto origSends = sends;
    std::shared_ptr<CollectiveTask> t;
    ASSERT_EQ(makeAlltoall(*comms[r], sp, sc, rp, rc, DataType::kInt32, &t), tcpxSuccess)
        << label << ": " << lastError();
    TaskResult res = runTask(*comms[r], t);
    ASSERT_TRUE(res.ok()) << label << ", rank " << r << ": " << res.message;
    for (int j = 0; j < n; j++) {
      size_t bad = counts[j][r];
      for (size_t i = 0; i < counts[j][r] && bad == counts[j][r]; i++)
        if (recvs[j][i] != a2aValue(j, r, i)) bad = i;
      EXPECT_EQ(bad, counts[j][r]) << label << ", rank " << r << ": block from rank " << j
                                   << " differs at element " << bad;
      EXPECT_EQ(recvs[j][counts[j][r]], -7) << label << ": written past the block from " << j;
    }
    EXPECT_TRUE(sends == origSends) << label << ", rank " << r << ": send buffers modified";
  });
}

TEST_P(WorldSize, AlltoallEqualAndUnevenCounts) {
  const int n = GetParam();
  TestGroup g(n);
  ASSERT_TRUE(g.ok());
  Comms& comms = g.comms;
  using Counts = std::vector<std::vector<size_t>>;
  auto make = [n](auto f) {
    Counts c(n, std::vector<size_t>(n));
    for (int s = 0; s < n; s++)
      for (int d = 0; d < n; d++) c[s][d] = f(s, d);
    return c;
  };
  // 600 int32 = 2400 bytes: 3 chunks.
  checkAlltoall(comms, make([](int, int) { return size_t{600}; }), "equal 600");
  checkAlltoall(comms, make([](int, int) { return size_t{1}; }), "equal 1");
  checkAlltoall(comms, make([](int, int) { return size_t{0}; }), "all empty");
  checkAlltoall(comms, make([](int s, int d) { return static_cast<size_t>((s * 3 + d * 5 + 1) % 4) * 333; }),
                "uneven with zeros");
  checkAlltoall(comms, make([](int s, int d) { return s == d ? size_t{0} : static_cast<size_t>(s + 2 * d); }),
                "uneven small, nothing to self");
  checkAlltoall(comms, make([](int s, int) { return s == 0 ? size_t{700} : size_t{0}; }),
                "only rank 0 sends");
}

// Runs one all_to_all whose counts disagree for one pair (rank `liar`
// expects `lie` elements from `from`, which sends counts[from][liar]).
// Returns every rank's result.
std::vector<TaskResult> runMismatchedAlltoall(const Comms& comms,
                                              const std::vector<std::vector<size_t>>& counts,
                                              int liar, int from, size_t lie) {
  const int n = static_cast<int>(comms.size());
  std::vector<TaskResult> results(n);
  runRanks(n, [&](int r) {
    std::vector<std::vector<int32_t>> sends(n), recvs(n);
    std::vector<const void*> sp;
    std::vector<void*> rp;
    std::vector<size_t> sc, rc;
    for (int j = 0; j < n; j++) {
      size_t want = (r == liar && j == from) ? lie : counts[j][r];
      sends[j].assign(counts[r][j] + 1, r);
      recvs[j].assign(want + 1, 0);
      sp.push_back(sends[j].data());
      rp.push_back(recvs[j].data());
      sc.push_back(counts[r][j]);
      rc.push_back(want);
    }
    std::shared_ptr<CollectiveTask> t;
    ASSERT_EQ(makeAlltoall(*comms[r], sp, sc, rp, rc, DataType::kInt32, &t), tcpxSuccess)
        << lastError();
    t->timeout = std::chrono::milliseconds(5000);
    results[r] = runTask(*comms[r], t);
  });
  return results;
}

// Enqueues `task` and waits for it at most `limit`: false if it has not
// completed by then. `keep` (the task's buffers) lives as long as the task's
// onComplete, which may still run later.
bool runTaskFor(Communicator& comm, std::shared_ptr<Task> task, std::chrono::milliseconds limit,
                TaskResult* out, std::shared_ptr<void> keep = nullptr) {
  auto done = std::make_shared<std::promise<TaskResult>>();
  auto fut = done->get_future();
  task->onComplete = [done, keep](const TaskResult& r) { done->set_value(r); };
  comm.enqueue(std::move(task));
  if (fut.wait_for(limit) != std::future_status::ready) return false;
  *out = fut.get();
  return true;
}

// One rank's part of a correct all_reduce (every rank contributes rank+1).
// `algo`: CollConfig::allreduceAlgo ("" lets the size choose).
void allreduceOnRank(const Comms& comms, int r, const std::string& label,
                     const std::string& algo = "",
                     std::chrono::milliseconds timeout = std::chrono::milliseconds(0)) {
  const int n = static_cast<int>(comms.size());
  auto buf = std::make_shared<std::vector<int32_t>>(3000, r + 1);
  CollConfig cfg;
  cfg.allreduceAlgo = algo;
  std::shared_ptr<CollectiveTask> t;
  ASSERT_EQ(makeAllreduce(*comms[r], cfg, buf->data(), buf->size(), DataType::kInt32,
                          RedOp::kSum, 1.0, &t),
            tcpxSuccess);
  t->timeout = timeout;
  TaskResult res;
  // Bounded, so that a task the communicator never completes fails the test
  // instead of hanging it.
  const auto limit = (timeout.count() > 0 ? timeout : kGroupTimeout) + std::chrono::seconds(5);
  ASSERT_TRUE(runTaskFor(*comms[r], t, limit, &res, buf))
      << label << ": all_reduce afterwards never completed on rank " << r;
  ASSERT_TRUE(res.ok()) << label << ": all_reduce afterwards failed on rank " << r << ": "
                        << res.message;
  EXPECT_EQ((*buf)[0], n * (n + 1) / 2) << label;
  EXPECT_EQ((*buf)[2999], n * (n + 1) / 2) << label;
}

// A correct all_reduce on every rank: the group is still usable.
void expectGroupUsable(const Comms& comms, const std::string& label) {
  runRanks(static_cast<int>(comms.size()), [&](int r) { allreduceOnRank(comms, r, label); });
}

void expectMismatchSomewhere(const std::vector<TaskResult>& results, const Comms& comms,
                             const std::string& label) {
  bool mismatch = false;
  for (size_t r = 0; r < results.size(); r++) {
    EXPECT_NE(results[r].code, tcpxTimeout) << label << ", rank " << r << ": " << results[r].message;
    EXPECT_EQ(comms[r]->abortReason(), "") << label << ", rank " << r;
    if (!results[r].ok() && results[r].message.find("mismatch") != std::string::npos)
      mismatch = true;
  }
  std::string all;
  for (size_t r = 0; r < results.size(); r++)
    all += "\n  rank " + std::to_string(r) + ": " +
           (results[r].ok() ? std::string("ok") : results[r].message);
  EXPECT_TRUE(mismatch) << label << ": no rank reported a mismatch:" << all;
}

TEST(CollectivesAlltoall, CountMismatchFailsWithoutHangAndGroupStaysUsable) {
  const int n = 3;
  TestGroup g(n);
  ASSERT_TRUE(g.ok());
  Comms& comms = g.comms;
  std::vector<std::vector<size_t>> counts = {{5, 700, 3}, {2, 0, 400}, {300, 1, 9}};
  struct Lie {
    int liar, from;
    size_t lie;
    const char* label;
  };
  const Lie lies[] = {
      {1, 0, 50, "receiver expects fewer chunks (50 vs 700)"},
      {1, 0, 1500, "receiver expects more chunks (1500 vs 700)"},
      {0, 2, 301, "same chunk count, one element more (301 vs 300)"},
      {2, 1, 0, "receiver expects nothing (0 vs 400)"},
      {0, 1, 7, "receiver expects something from an empty block (7 vs 2)"},
  };
  for (const Lie& l : lies) {
    auto results = runMismatchedAlltoall(comms, counts, l.liar, l.from, l.lie);
    expectMismatchSomewhere(results, comms, l.label);
    expectGroupUsable(comms, l.label);
    checkAlltoall(comms, counts, std::string("correct all_to_all after: ") + l.label);
  }
}

// ---------------------------------------------------------------------------
// Gather and scatter.

TEST_P(WorldSize, GatherEveryRoot) {
  const int n = GetParam();
  TestGroup g(n);
  ASSERT_TRUE(g.ok());
  Comms& comms = g.comms;
  // 300 int64 = 2400 bytes: 3 chunks.
  runRanks(n, [&](int r) {
    for (bool inPlace : {false, true}) {
      for (size_t count : {size_t{0}, size_t{1}, size_t{300}}) {
        for (int root = 0; root < n; root++) {
          std::string what = std::to_string(count) + " elements, root " + std::to_string(root) +
                             (inPlace ? ", in place" : "") + ", rank " + std::to_string(r);
          std::vector<std::vector<int64_t>> outs;
          std::vector<void*> op;
          if (r == root) {
            outs.assign(n, std::vector<int64_t>(count + 1, -1));
            for (auto& o : outs) op.push_back(o.data());
          }
          std::vector<int64_t> in(count + 1, -2);
          for (size_t i = 0; i < count; i++) in[i] = i64In(r, 0, i);
          const auto orig = in;
          const void* ip = in.data();
          if (inPlace && r == root) {
            outs[r] = in;
            op[r] = outs[r].data();
            ip = outs[r].data();
          }
          std::shared_ptr<CollectiveTask> t;
          tcpxResult_t mk = makeGather(*comms[r], ip, op, count, DataType::kInt64, root, &t);
          EXPECT_EQ(mk, tcpxSuccess) << what << ": " << lastError();
          if (mk != tcpxSuccess) continue;
          TaskResult res = runTask(*comms[r], t);
          EXPECT_TRUE(res.ok()) << what << ": " << res.message;
          if (!res.ok()) continue;
          EXPECT_TRUE(in == orig) << what << ": input modified";
          if (r != root) continue;
          for (int q = 0; q < n; q++) {
            size_t bad = count;
            for (size_t i = 0; i < count && bad == count; i++)
              if (outs[q][i] != i64In(q, 0, i)) bad = i;
            EXPECT_EQ(bad, count) << what << ": block of rank " << q << " differs at " << bad;
            EXPECT_EQ(outs[q][count], inPlace && q == r ? -2 : -1)
                << what << ": written past the block of rank " << q;
          }
        }
      }
    }
  });
}

TEST_P(WorldSize, ScatterEveryRoot) {
  const int n = GetParam();
  TestGroup g(n);
  ASSERT_TRUE(g.ok());
  Comms& comms = g.comms;
  runRanks(n, [&](int r) {
    for (bool inPlace : {false, true}) {
      for (size_t count : {size_t{0}, size_t{1}, size_t{300}}) {
        for (int root = 0; root < n; root++) {
          std::string what = std::to_string(count) + " elements, root " + std::to_string(root) +
                             (inPlace ? ", in place" : "") + ", rank " + std::to_string(r);
          std::vector<std::vector<int64_t>> ins;
          std::vector<const void*> ip;
          if (r == root) {
            for (int q = 0; q < n; q++) {
              ins.emplace_back(count + 1, -3);
              for (size_t i = 0; i < count; i++) ins[q][i] = i64In(root, q, i);
            }
            for (auto& v : ins) ip.push_back(v.data());
          }
          const auto origIns = ins;
          std::vector<int64_t> out(count + 1, -1);
          void* outp = out.data();
          if (inPlace && r == root) outp = ins[r].data();
          std::shared_ptr<CollectiveTask> t;
          tcpxResult_t mk = makeScatter(*comms[r], ip, outp, count, DataType::kInt64, root, &t);
          EXPECT_EQ(mk, tcpxSuccess) << what << ": " << lastError();
          if (mk != tcpxSuccess) continue;
          TaskResult res = runTask(*comms[r], t);
          EXPECT_TRUE(res.ok()) << what << ": " << res.message;
          if (!res.ok()) continue;
          EXPECT_TRUE(ins == origIns) << what << ": root's inputs modified";
          const int64_t* got = static_cast<const int64_t*>(outp);
          size_t bad = count;
          for (size_t i = 0; i < count && bad == count; i++)
            if (got[i] != i64In(root, r, i)) bad = i;
          EXPECT_EQ(bad, count) << what << ": received block differs at " << bad;
          if (!(inPlace && r == root)) {
            EXPECT_EQ(out[count], -1) << what << ": written past the block";
          }
        }
      }
    }
  });
}

INSTANTIATE_TEST_SUITE_P(Collectives, WorldSize, ::testing::Values(1, 2, 3, 5),
                         [](const ::testing::TestParamInfo<int>& i) {
                           return std::to_string(i.param) + "ranks";
                         });

// ---------------------------------------------------------------------------
// Coalesced batches.

// The buffers and tasks of one batch of parts on one rank.
struct Batch {
  // all_reduce float32 SUM (ring), int32 MAX (rd), uint8 AVG (ring), bfloat16 SUM (rd)
  std::vector<char> ar1, ar2, ar3, ar4;
  // reduce_scatter float32 PREMUL_SUM
  std::vector<char> rsIn, rsOut;
  // all_gather int64
  std::vector<char> agIn;
  std::vector<std::vector<char>> agOut;
  std::vector<std::shared_ptr<CollectiveTask>> parts;

  static constexpr size_t kAr1 = 1000, kAr2 = 7, kAr3 = 2000, kAr4 = 300, kRs = 500, kAg = 333;

  // `rsCount`: the reduce_scatter block size (another one: a rank that
  // batches differently).
  Batch(const Communicator& c, size_t rsCount = kRs) {
    const int n = c.nranks(), r = c.rank();
    ar1 = makeInput(DataType::kFloat32, r, 1, kAr1);
    ar2 = makeInput(DataType::kInt32, r, 2, kAr2);
    ar3 = makeInput(DataType::kUInt8, r, 3, kAr3);
    ar4 = makeInput(DataType::kBFloat16, r, 4, kAr4);
    rsIn.resize(rsCount * 4 * static_cast<size_t>(n) + 1);
    for (int b = 0; b < n; b++)
      fillInput(DataType::kFloat32, r, 10 + b, rsIn.data() + static_cast<size_t>(b) * rsCount * 4,
                rsCount);
    rsOut.assign(rsCount * 4 + 1, 0);
    agIn = makeInput(DataType::kInt64, r, 20, kAg);
    agOut.assign(n, std::vector<char>(kAg * 8 + 1, 0));

    CollConfig ring, rd;
    ring.allreduceAlgo = "ring";
    rd.allreduceAlgo = "rd";
    std::shared_ptr<CollectiveTask> t;
    auto add = [&](tcpxResult_t rc) {
      EXPECT_EQ(rc, tcpxSuccess) << lastError();
      parts.push_back(t);
    };
    add(makeAllreduce(c, ring, ar1.data(), kAr1, DataType::kFloat32, RedOp::kSum, 1.0, &t));
    add(makeAllreduce(c, rd, ar2.data(), kAr2, DataType::kInt32, RedOp::kMax, 1.0, &t));
    add(makeAllreduce(c, ring, ar3.data(), kAr3, DataType::kUInt8, RedOp::kAvg, 1.0, &t));
    add(makeAllreduce(c, rd, ar4.data(), kAr4, DataType::kBFloat16, RedOp::kSum, 1.0, &t));
    std::vector<const void*> ins;
    for (int b = 0; b < n; b++) ins.push_back(rsIn.data() + static_cast<size_t>(b) * rsCount * 4);
    add(makeReduceScatter(c, ins, rsOut.data(), rsCount, DataType::kFloat32, RedOp::kPremulSum,
                          kPremul, &t));
    std::vector<void*> outs;
    for (auto& o : agOut) outs.push_back(o.data());
    add(makeAllgather(c, agIn.data(), outs, kAg, DataType::kInt64, &t));
  }

  void expectReference(int n, int r, const std::string& label) const {
    EXPECT_TRUE(matchesReference(DataType::kFloat32, RedOp::kSum, n, 1, ar1.data(), kAr1)) << label;
    EXPECT_TRUE(matchesReference(DataType::kInt32, RedOp::kMax, n, 2, ar2.data(), kAr2)) << label;
    EXPECT_TRUE(matchesReference(DataType::kUInt8, RedOp::kAvg, n, 3, ar3.data(), kAr3)) << label;
    EXPECT_TRUE(matchesReference(DataType::kBFloat16, RedOp::kSum, n, 4, ar4.data(), kAr4)) << label;
    EXPECT_TRUE(matchesReference(DataType::kFloat32, RedOp::kPremulSum, n, 10 + r, rsOut.data(), kRs))
        << label;
    for (int q = 0; q < n; q++)
      EXPECT_TRUE(agOut[q] == makeInput(DataType::kInt64, q, 20, kAg)) << label << ": all_gather block " << q;
  }
};

TEST(CollectivesCoalesced, SameResultsAsOneByOne) {
  for (int n : {1, 3, 4}) {
    auto net = makeLoopbackNet();
    ASSERT_NE(net, nullptr);
    Comms comms = makeComms(net.get(), n);
    ASSERT_TRUE(allCreated(comms));
    runRanks(n, [&](int r) {
      const std::string label = std::to_string(n) + " ranks, rank " + std::to_string(r);
      Batch together(*comms[r]), apart(*comms[r]);
      std::shared_ptr<CollectiveTask> all;
      ASSERT_EQ(makeCoalesced(together.parts, &all), tcpxSuccess) << lastError();
      const uint64_t before = comms[r]->collectivesIssued();
      TaskResult res = runTask(*comms[r], all);
      ASSERT_TRUE(res.ok()) << label << ": " << res.message;
      EXPECT_EQ(comms[r]->collectivesIssued(), before + 1) << "one sequence number for the batch";
      for (auto& p : apart.parts) {
        TaskResult pr = runTask(*comms[r], p);
        ASSERT_TRUE(pr.ok()) << label << ": " << p->description << ": " << pr.message;
      }
      EXPECT_TRUE(together.ar1 == apart.ar1) << label;
      EXPECT_TRUE(together.ar2 == apart.ar2) << label;
      EXPECT_TRUE(together.ar3 == apart.ar3) << label;
      EXPECT_TRUE(together.ar4 == apart.ar4) << label;
      EXPECT_TRUE(together.rsOut == apart.rsOut) << label;
      EXPECT_TRUE(together.rsIn == apart.rsIn) << label << ": reduce_scatter inputs";
      EXPECT_TRUE(together.agOut == apart.agOut) << label;
      together.expectReference(n, r, label + ", coalesced");
      apart.expectReference(n, r, label + ", one by one");
    });
  }
}

TEST(CollectivesCoalesced, DifferentBatchesFailWithMismatchAndGroupStaysUsable) {
  const int n = 3;
  TestGroup g(n);
  ASSERT_TRUE(g.ok());
  Comms& comms = g.comms;
  enum Variant { kSizeDiffers, kPartsSwapped, kPartMissing };
  const std::pair<Variant, const char*> variants[] = {
      {kSizeDiffers, "rank 1's reduce_scatter part is smaller"},
      {kPartsSwapped, "rank 1 batches the same parts in another order"},
      {kPartMissing, "rank 1's batch lacks the last part"},
  };
  for (auto& v : variants) {
    // Phased: every rank waits for all batches to end before the next
    // collective. Back to back: each rank goes on to an all_reduce at once,
    // as a program would. A rank whose batch is shorter is only noticed that
    // way (phased, the others would wait for it), and only when its next
    // collective sends to a rank still waiting in the batch: ring all-reduce's
    // first round does (rank 1 -> rank 2); see ShorterBatchIsReported below.
    for (bool phased : {true, false}) {
      if (phased && v.first == kPartMissing) continue;
      const std::string label = std::string(v.second) + (phased ? ", phased" : ", back to back");
      std::vector<TaskResult> results(n);
      runRanks(n, [&](int r) {
        const bool odd = r == 1;
        Batch b(*comms[r], odd && v.first == kSizeDiffers ? 400 : Batch::kRs);
        auto parts = b.parts;
        if (odd && v.first == kPartsSwapped) std::swap(parts[0], parts[2]);
        if (odd && v.first == kPartMissing) parts.pop_back();
        std::shared_ptr<CollectiveTask> all;
        ASSERT_EQ(makeCoalesced(parts, &all), tcpxSuccess) << lastError();
        all->timeout = std::chrono::milliseconds(5000);
        results[r] = runTask(*comms[r], all);
        if (!phased) allreduceOnRank(comms, r, label, "ring");
      });
      expectMismatchSomewhere(results, comms, label);
      if (phased) expectGroupUsable(comms, label);
    }
    // A correct batch afterwards.
    runRanks(n, [&](int r) {
      Batch b(*comms[r]);
      std::shared_ptr<CollectiveTask> all;
      ASSERT_EQ(makeCoalesced(b.parts, &all), tcpxSuccess);
      TaskResult res = runTask(*comms[r], all);
      ASSERT_TRUE(res.ok()) << v.second << ": correct batch afterwards, rank " << r << ": "
                            << res.message;
      b.expectReference(n, r, std::string(v.second) + ": correct batch afterwards");
    });
  }
}

// The other new collectives in one batch: reduce (chain and tree, different
// roots), all_to_all with uneven counts (per-pair headers), gather, scatter
// and broadcast, against running them one by one and against references.
struct RootedBatch {
  static constexpr size_t kRed = 3000, kTree = 7, kGat = 300, kSca = 300, kBc = 900;
  std::vector<char> red, tree;  // reduce float32 SUM to root 1 (chain), int32 MAX to root 0 (tree)
  std::vector<std::vector<int32_t>> a2aSend, a2aRecv;
  std::vector<int64_t> gatIn, scaOut;
  std::vector<std::vector<int64_t>> gatOut, scaIn;
  std::vector<int32_t> bc;
  std::vector<std::shared_ptr<CollectiveTask>> parts;

  static size_t a2aCount(int s, int d) { return static_cast<size_t>((s + 2 * d) % 3) * 400; }

  explicit RootedBatch(const Communicator& c) {
    const int n = c.nranks(), r = c.rank();
    const int redRoot = 1 % n, treeRoot = 0, gatRoot = 2 % n, scaRoot = (n - 1), bcRoot = 1 % n;
    red = makeInput(DataType::kFloat32, r, 40, kRed);
    tree = makeInput(DataType::kInt32, r, 41, kTree);
    std::shared_ptr<CollectiveTask> t;
    auto add = [&](tcpxResult_t rc) {
      EXPECT_EQ(rc, tcpxSuccess) << lastError();
      parts.push_back(t);
    };
    CollConfig chain, treeCfg;
    chain.threshold = 0;
    treeCfg.threshold = std::numeric_limits<size_t>::max();
    add(makeReduce(c, chain, red.data(), kRed, DataType::kFloat32, RedOp::kSum, 1.0, redRoot, &t));
    add(makeReduce(c, treeCfg, tree.data(), kTree, DataType::kInt32, RedOp::kMax, 1.0, treeRoot,
                   &t));
    std::vector<const void*> sp;
    std::vector<void*> rp;
    std::vector<size_t> sc, rc;
    a2aSend.resize(n);
    a2aRecv.resize(n);
    for (int j = 0; j < n; j++) {
      a2aSend[j].resize(a2aCount(r, j) + 1);
      for (size_t i = 0; i < a2aCount(r, j); i++) a2aSend[j][i] = a2aValue(r, j, i);
      a2aRecv[j].assign(a2aCount(j, r) + 1, -7);
      sp.push_back(a2aSend[j].data());
      rp.push_back(a2aRecv[j].data());
      sc.push_back(a2aCount(r, j));
      rc.push_back(a2aCount(j, r));
    }
    add(makeAlltoall(c, sp, sc, rp, rc, DataType::kInt32, &t));
    gatIn.resize(kGat);
    for (size_t i = 0; i < kGat; i++) gatIn[i] = i64In(r, 42, i);
    std::vector<void*> gp;
    if (r == gatRoot) {
      gatOut.assign(n, std::vector<int64_t>(kGat, -1));
      for (auto& g : gatOut) gp.push_back(g.data());
    }
    add(makeGather(c, gatIn.data(), gp, kGat, DataType::kInt64, gatRoot, &t));
    std::vector<const void*> ip;
    if (r == scaRoot) {
      for (int q = 0; q < n; q++) {
        scaIn.emplace_back(kSca);
        for (size_t i = 0; i < kSca; i++) scaIn[q][i] = i64In(scaRoot, 43 + q, i);
      }
      for (auto& v : scaIn) ip.push_back(v.data());
    }
    scaOut.assign(kSca, -1);
    add(makeScatter(c, ip, scaOut.data(), kSca, DataType::kInt64, scaRoot, &t));
    bc.assign(kBc, -1);
    if (r == bcRoot)
      for (size_t i = 0; i < kBc; i++) bc[i] = a2aValue(bcRoot, 99, i);
    add(makeBroadcast(c, CollConfig(), bc.data(), kBc, DataType::kInt32, bcRoot, &t));
  }

  bool operator==(const RootedBatch& o) const {
    return red == o.red && tree == o.tree && a2aRecv == o.a2aRecv && gatOut == o.gatOut &&
           scaOut == o.scaOut && bc == o.bc;
  }

  void expectReference(int n, int r, const std::string& label) const {
    const int redRoot = 1 % n, treeRoot = 0, gatRoot = 2 % n, scaRoot = (n - 1), bcRoot = 1 % n;
    if (r == redRoot)
      EXPECT_TRUE(matchesReference(DataType::kFloat32, RedOp::kSum, n, 40, red.data(), kRed)) << label;
    else
      EXPECT_TRUE(red == makeInput(DataType::kFloat32, r, 40, kRed)) << label << ": reduce input";
    if (r == treeRoot)
      EXPECT_TRUE(matchesReference(DataType::kInt32, RedOp::kMax, n, 41, tree.data(), kTree)) << label;
    else
      EXPECT_TRUE(tree == makeInput(DataType::kInt32, r, 41, kTree)) << label << ": reduce input";
    for (int j = 0; j < n; j++)
      for (size_t i = 0; i <= a2aCount(j, r); i++) {
        int32_t want = i < a2aCount(j, r) ? a2aValue(j, r, i) : -7;
        if (a2aRecv[j][i] != want) {
          ADD_FAILURE() << label << ": all_to_all block from " << j << " differs at " << i;
          break;
        }
      }
    if (r == gatRoot)
      for (int q = 0; q < n; q++)
        for (size_t i = 0; i < kGat; i++)
          if (gatOut[q][i] != i64In(q, 42, i)) {
            ADD_FAILURE() << label << ": gather block " << q << " differs at " << i;
            break;
          }
    for (size_t i = 0; i < kSca; i++)
      if (scaOut[i] != i64In(scaRoot, 43 + r, i)) {
        ADD_FAILURE() << label << ": scatter block differs at " << i;
        break;
      }
    for (size_t i = 0; i < kBc; i++)
      if (bc[i] != a2aValue(bcRoot, 99, i)) {
        ADD_FAILURE() << label << ": broadcast differs at " << i;
        break;
      }
  }
};

TEST(CollectivesCoalesced, RootedAndPairwisePartsSameAsOneByOne) {
  for (int n : {2, 3, 4}) {
    auto net = makeLoopbackNet();
    ASSERT_NE(net, nullptr);
    Comms comms = makeComms(net.get(), n);
    ASSERT_TRUE(allCreated(comms));
    runRanks(n, [&](int r) {
      const std::string label = std::to_string(n) + " ranks, rank " + std::to_string(r);
      RootedBatch together(*comms[r]), apart(*comms[r]);
      std::shared_ptr<CollectiveTask> all;
      ASSERT_EQ(makeCoalesced(together.parts, &all), tcpxSuccess) << lastError();
      TaskResult res = runTask(*comms[r], all);
      ASSERT_TRUE(res.ok()) << label << ": " << res.message;
      for (auto& p : apart.parts) {
        TaskResult pr = runTask(*comms[r], p);
        ASSERT_TRUE(pr.ok()) << label << ": " << p->description << ": " << pr.message;
      }
      EXPECT_TRUE(together == apart) << label;
      together.expectReference(n, r, label + ", coalesced");
      apart.expectReference(n, r, label + ", one by one");
    });
  }
}

// Parts with identical headers (same kind, size, dtype, op) share one header
// in the schedule; each must still land in its own buffers.
TEST(CollectivesCoalesced, IdenticalPartsKeepTheirOwnBuffers) {
  const int n = 3;
  TestGroup g(n);
  ASSERT_TRUE(g.ok());
  Comms& comms = g.comms;
  const size_t count = 700;  // 2800 bytes: 3 chunks
  runRanks(n, [&](int r) {
    std::vector<std::shared_ptr<CollectiveTask>> parts;
    std::shared_ptr<CollectiveTask> t;
    // Three all_gathers and two rd all_reduces of the same sizes.
    std::vector<std::vector<int32_t>> agIn(3), agOut(3 * n);
    for (int k = 0; k < 3; k++) {
      agIn[k].resize(count);
      for (size_t i = 0; i < count; i++) agIn[k][i] = a2aValue(r, k, i);
      std::vector<void*> outs;
      for (int q = 0; q < n; q++) {
        agOut[k * n + q].assign(count, -1);
        outs.push_back(agOut[k * n + q].data());
      }
      ASSERT_EQ(makeAllgather(*comms[r], agIn[k].data(), outs, count, DataType::kInt32, &t),
                tcpxSuccess);
      parts.push_back(t);
    }
    CollConfig rd;
    rd.allreduceAlgo = "rd";
    std::vector<std::vector<char>> ar;
    for (int k = 0; k < 2; k++) ar.push_back(makeInput(DataType::kInt32, r, 30 + k, count));
    for (int k = 0; k < 2; k++) {
      ASSERT_EQ(makeAllreduce(*comms[r], rd, ar[k].data(), count, DataType::kInt32, RedOp::kSum,
                              1.0, &t),
                tcpxSuccess);
      parts.push_back(t);
    }
    std::shared_ptr<CollectiveTask> all;
    ASSERT_EQ(makeCoalesced(parts, &all), tcpxSuccess);
    TaskResult res = runTask(*comms[r], all);
    ASSERT_TRUE(res.ok()) << res.message;
    for (int k = 0; k < 3; k++)
      for (int q = 0; q < n; q++) {
        size_t bad = count;
        for (size_t i = 0; i < count && bad == count; i++)
          if (agOut[k * n + q][i] != a2aValue(q, k, i)) bad = i;
        EXPECT_EQ(bad, count) << "rank " << r << ", all_gather " << k << ", block of rank " << q
                              << " differs at " << bad;
      }
    for (int k = 0; k < 2; k++)
      EXPECT_TRUE(matchesReference(DataType::kInt32, RedOp::kSum, n, 30 + k, ar[k].data(), count))
          << "rank " << r << ", all_reduce " << k;
  });
}

// makeCoalesced promises that "a rank that coalesced differently gets a
// mismatch error". Here rank 1's batch lacks the last part and every rank
// then runs a recursive-doubling all_reduce. Rank 1 completes its shorter
// batch; ranks 0 and 2 wait in the batch's last part (a ring all_gather:
// rank 2 waits for rank 1, rank 0 for rank 2) while rank 1's all_reduce
// first waits for rank 0 (with 3 ranks, rank 0 folds into rank 1). No rank
// ever receives a message that shows the disagreement: a cycle of waits,
// broken only by the timeout, which aborts the communicators.
// (A ring all_reduce instead happens to send rank 1 -> rank 2 at once and
// the mismatch is reported: DifferentBatchesFailWithMismatchAndGroupStaysUsable.)
// A fix: make every message of a batch carry its length, e.g. mix
// paramHash(parts.size(), part index) into the phash of every step a part
// adds, so that batches of different lengths disagree on their first message.
TEST(CollectivesCoalesced, ShorterBatchIsReportedNotTimedOut) {
  const int n = 3;
  TestGroup g(n);
  ASSERT_TRUE(g.ok());
  Comms& comms = g.comms;
  const auto timeout = std::chrono::milliseconds(2000);
  std::vector<TaskResult> results(n);
  runRanks(n, [&](int r) {
    Batch b(*comms[r]);
    auto parts = b.parts;
    if (r == 1) parts.pop_back();
    std::shared_ptr<CollectiveTask> all;
    ASSERT_EQ(makeCoalesced(parts, &all), tcpxSuccess) << lastError();
    all->timeout = timeout;
    results[r] = runTask(*comms[r], all);
    allreduceOnRank(comms, r, "all_reduce (rd) after the batches", "rd", timeout);
  });
  expectMismatchSomewhere(results, comms, "rank 1's batch lacks the last part");
}

// Found while running ShorterBatchIsReportedNotTimedOut under ASan: a task
// enqueued while the communicator is aborting is never completed. hardFail()
// (transport/communicator.cc) runs the failed tasks' onComplete callbacks in
// failEverything() before it sets `aborted`, so an enqueue() from such a
// callback -- or from a thread the callback wakes, as runTask's caller is --
// still queues the task; the worker then takes it (takeIncoming) into
// collQueue/recvPosted but no longer progresses, fails or times out anything
// (abortedLocal), so the task waits forever (a collective is even dropped at
// shutdown without its callback). Deterministic here: the enqueue is made
// from inside the callback, on the worker thread. A fix: set `aborted`
// (under mu) before failEverything() runs the callbacks.
TEST(CollectivesAbort, TaskEnqueuedFromAFailureCallbackStillCompletes) {
  const int n = 2;
  TestGroup g(n);
  ASSERT_TRUE(g.ok());
  Comms& comms = g.comms;
  Communicator* c0 = comms[0].get();
  std::vector<float> buf(4);
  std::shared_ptr<P2PTask> pending;
  ASSERT_EQ(makeRecvAnySource(*c0, buf.data(), buf.size(), DataType::kFloat32, 1, &pending),
            tcpxSuccess);
  std::shared_ptr<CollectiveTask> next;
  ASSERT_EQ(makeBarrier(*c0, &next), tcpxSuccess);
  auto nextDone = std::make_shared<std::promise<TaskResult>>();
  auto nextF = nextDone->get_future();
  next->onComplete = [nextDone](const TaskResult& r) { nextDone->set_value(r); };
  auto firstDone = std::make_shared<std::promise<TaskResult>>();
  auto firstF = firstDone->get_future();
  pending->onComplete = [c0, next, firstDone](const TaskResult& r) {
    c0->enqueue(next);  // e.g. a program that issues its next op on failure
    firstDone->set_value(r);
  };
  c0->enqueue(pending);
  c0->abort("test: abort with a receive pending");
  ASSERT_EQ(firstF.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  EXPECT_FALSE(firstF.get().ok());
  ASSERT_EQ(nextF.wait_for(std::chrono::seconds(3)), std::future_status::ready)
      << "a barrier enqueued from the failure callback of an aborting communicator never "
         "completed";
  TaskResult r = nextF.get();
  EXPECT_FALSE(r.ok());
  EXPECT_NE(r.message.find("abort"), std::string::npos) << r.message;
}

// ---------------------------------------------------------------------------
// Argument checks: tcpxInvalidArgument, and a message naming the argument.

TEST(CollectivesArguments, InvalidArgumentsAreRejectedWithTheirName) {
  const int n = 3;
  TestGroup g(n);
  ASSERT_TRUE(g.ok());
  Comms& comms = g.comms;
  Communicator& c = *comms[1];
  std::vector<float> f(16);
  std::vector<int32_t> i32(16);
  std::shared_ptr<CollectiveTask> t;
  auto expectInvalid = [](tcpxResult_t rc, const std::string& word, const char* what) {
    EXPECT_EQ(rc, tcpxInvalidArgument) << what;
    if (rc != tcpxSuccess) {
      EXPECT_NE(lastError().find(word), std::string::npos) << what << ": " << lastError();
    }
  };
  CollConfig cfg;
  expectInvalid(makeReduce(c, cfg, f.data(), 4, DataType::kFloat32, RedOp::kSum, 1.0, -1, &t),
                "root", "reduce, root -1");
  expectInvalid(makeReduce(c, cfg, f.data(), 4, DataType::kFloat32, RedOp::kSum, 1.0, n, &t),
                "root", "reduce, root n");
  expectInvalid(makeReduce(c, cfg, i32.data(), 4, DataType::kInt32, RedOp::kPremulSum, 2.0, 0, &t),
                "PREMUL_SUM", "reduce, PREMUL_SUM on int32");
  expectInvalid(makeReduce(c, cfg, f.data(), 4, DataType::kFloat32, RedOp::kBand, 1.0, 0, &t),
                "BAND", "reduce, BAND on float32");
  std::vector<const void*> two = {f.data(), f.data()};
  expectInvalid(makeReduceScatter(c, two, f.data(), 1, DataType::kFloat32, RedOp::kSum, 1.0, &t),
                "input", "reduce_scatter with 2 blocks for 3 ranks");
  std::vector<const void*> three = {f.data(), f.data(), f.data()};
  expectInvalid(makeReduceScatter(c, three, f.data() + 8, 1, DataType::kFloat32, RedOp::kBxor, 1.0, &t),
                "BXOR", "reduce_scatter, BXOR on float32");
  std::vector<void*> outs3 = {f.data(), f.data() + 4, f.data() + 8};
  std::vector<void*> outs2 = {f.data(), f.data() + 4};
  std::vector<size_t> c3 = {1, 1, 1}, c2 = {1, 1};
  expectInvalid(makeAlltoall(c, two, c2, outs2, c2, DataType::kFloat32, &t), "expected one per rank",
                "all_to_all with 2 blocks for 3 ranks");
  expectInvalid(makeAlltoall(c, three, {1, 2, 1}, outs3, {1, 3, 1}, DataType::kFloat32, &t), "itself",
                "all_to_all, own block sizes differ");
  expectInvalid(makeGather(c, f.data(), outs3, 1, DataType::kFloat32, 3, &t), "root",
                "gather, root 3");
  expectInvalid(makeGather(c, f.data(), outs2, 1, DataType::kFloat32, 1, &t), "output",
                "gather, 2 outputs on the root");
  expectInvalid(makeScatter(c, three, f.data(), 1, DataType::kFloat32, -2, &t), "root",
                "scatter, root -2");
  expectInvalid(makeScatter(c, two, f.data(), 1, DataType::kFloat32, 1, &t), "input",
                "scatter, 2 inputs on the root");
  // Off the root, the output/input lists are ignored.
  EXPECT_EQ(makeGather(c, f.data(), {}, 1, DataType::kFloat32, 0, &t), tcpxSuccess) << lastError();
  EXPECT_EQ(makeScatter(c, {}, f.data(), 1, DataType::kFloat32, 0, &t), tcpxSuccess) << lastError();
  expectInvalid(makeCoalesced({}, &t), "no operations", "coalesced, no parts");
}

// ---------------------------------------------------------------------------
// Any-source receives.

std::vector<float> p2pPayload(int sender, int which, size_t count) {
  std::vector<float> v(count);
  for (size_t i = 0; i < count; i++) v[i] = static_cast<float>(sender * 100000 + which * 10000 + static_cast<int>(i % 5000));
  return v;
}

TaskResult sendNow(Communicator& c, const std::vector<float>& data, int peer, int64_t tag) {
  std::shared_ptr<P2PTask> t;
  EXPECT_EQ(makeSend(c, data.data(), data.size(), DataType::kFloat32, peer, tag, &t), tcpxSuccess);
  return runTask(c, t);
}

TEST(CollectivesAnySource, EverySenderMatchedOnceWithItsData) {
  const int n = 4;
  TestGroup g(n);
  ASSERT_TRUE(g.ok());
  Comms& comms = g.comms;
  const size_t count = 3000;  // 12000 bytes: larger than the net's inline size too
  for (int round = 0; round < 2; round++) {
    // Round 0: receives posted before anything is sent. Round 1: sent first,
    // so the messages wait in the unexpected queue (or are arriving).
    std::promise<void> posted;
    std::shared_future<void> postedF = posted.get_future().share();
    runRanks(n, [&](int r) {
      if (r != 0) {
        if (round == 0) postedF.wait();
        TaskResult res = sendNow(*comms[r], p2pPayload(r, round, count), 0, 42);
        EXPECT_TRUE(res.ok()) << res.message;
        return;
      }
      std::vector<std::vector<float>> bufs(n - 1, std::vector<float>(count, -1.f));
      std::vector<std::future<TaskResult>> futs;
      for (auto& b : bufs) {
        std::shared_ptr<P2PTask> t;
        ASSERT_EQ(makeRecvAnySource(*comms[0], b.data(), count, DataType::kFloat32, 42, &t),
                  tcpxSuccess);
        futs.push_back(startTask(*comms[0], t));
      }
      if (round == 0) posted.set_value();
      std::set<int> seen;
      for (size_t k = 0; k < futs.size(); k++) {
        TaskResult res = futs[k].get();
        ASSERT_TRUE(res.ok()) << res.message;
        EXPECT_TRUE(res.srcRank >= 1 && res.srcRank < n) << res.srcRank;
        EXPECT_TRUE(seen.insert(res.srcRank).second) << "rank " << res.srcRank << " matched twice";
        EXPECT_TRUE(bufs[k] == p2pPayload(res.srcRank, round, count))
            << "receive " << k << ": data is not rank " << res.srcRank << "'s";
      }
      EXPECT_EQ(seen.size(), static_cast<size_t>(n - 1));
    });
  }
}

// MPI's ordering rule: a message matches the oldest posted receive that fits,
// whether that one names its source or not.
TEST(CollectivesAnySource, OldestPostedReceiveMatchesFirst) {
  const int n = 2;
  TestGroup g(n);
  ASSERT_TRUE(g.ok());
  Comms& comms = g.comms;
  const size_t count = 1000;
  for (bool specificFirst : {true, false}) {
    std::promise<void> posted;
    std::shared_future<void> postedF = posted.get_future().share();
    runRanks(n, [&](int r) {
      if (r == 1) {
        postedF.wait();
        EXPECT_TRUE(sendNow(*comms[1], p2pPayload(1, 1, count), 0, 5).ok());
        EXPECT_TRUE(sendNow(*comms[1], p2pPayload(1, 2, count), 0, 5).ok());
        return;
      }
      std::vector<float> a(count, -1.f), b(count, -1.f);
      std::shared_ptr<P2PTask> specific, any;
      ASSERT_EQ(makeRecv(*comms[0], a.data(), count, DataType::kFloat32, 1, 5, &specific),
                tcpxSuccess);
      ASSERT_EQ(makeRecvAnySource(*comms[0], b.data(), count, DataType::kFloat32, 5, &any),
                tcpxSuccess);
      std::future<TaskResult> fs, fa;
      if (specificFirst) {
        fs = startTask(*comms[0], specific);
        fa = startTask(*comms[0], any);
      } else {
        fa = startTask(*comms[0], any);
        fs = startTask(*comms[0], specific);
      }
      posted.set_value();
      TaskResult rs = fs.get(), ra = fa.get();
      ASSERT_TRUE(rs.ok()) << rs.message;
      ASSERT_TRUE(ra.ok()) << ra.message;
      EXPECT_EQ(rs.srcRank, 1);
      EXPECT_EQ(ra.srcRank, 1);
      const int first = 1, second = 2;
      const char* label = specificFirst ? "recv(1) posted first" : "recv(any) posted first";
      EXPECT_TRUE(a == p2pPayload(1, specificFirst ? first : second, count)) << label;
      EXPECT_TRUE(b == p2pPayload(1, specificFirst ? second : first, count)) << label;
    });
  }
}

// The rule with two senders: a receive naming rank 2 is never taken by rank
// 1's message, and rank 1's message takes an any-source receive posted
// before the one naming rank 2.
TEST(CollectivesAnySource, SpecificReceiveSkipsOtherSenders) {
  const int n = 3;
  TestGroup g(n);
  ASSERT_TRUE(g.ok());
  Comms& comms = g.comms;
  const size_t count = 300;
  const std::vector<float> marker(1, 1.f);
  for (bool specificFirst : {true, false}) {
    const char* label = specificFirst ? "recv(2) posted first" : "recv(any) posted first";
    std::promise<void> posted, oneMatched;
    std::shared_future<void> postedF = posted.get_future().share();
    std::shared_future<void> oneMatchedF = oneMatched.get_future().share();
    runRanks(n, [&](int r) {
      if (r == 1) {
        postedF.wait();
        EXPECT_TRUE(sendNow(*comms[1], p2pPayload(1, 0, count), 0, 5).ok());
        EXPECT_TRUE(sendNow(*comms[1], marker, 0, 90).ok());
        return;
      }
      if (r == 2) {
        // With recv(any) posted first, rank 2 sends only once rank 1's
        // message has been matched (else it could take the any-source one).
        if (!specificFirst) oneMatchedF.wait();
        else postedF.wait();
        EXPECT_TRUE(sendNow(*comms[2], p2pPayload(2, 0, count), 0, 5).ok());
        return;
      }
      std::vector<float> a(count, -1.f), b(count, -1.f), m(1);
      std::shared_ptr<P2PTask> specific, any, mark;
      ASSERT_EQ(makeRecv(*comms[0], a.data(), count, DataType::kFloat32, 2, 5, &specific),
                tcpxSuccess);
      ASSERT_EQ(makeRecvAnySource(*comms[0], b.data(), count, DataType::kFloat32, 5, &any),
                tcpxSuccess);
      ASSERT_EQ(makeRecv(*comms[0], m.data(), 1, DataType::kFloat32, 1, 90, &mark), tcpxSuccess);
      std::future<TaskResult> fs, fa;
      if (specificFirst) {
        fs = startTask(*comms[0], specific);
        fa = startTask(*comms[0], any);
      } else {
        fa = startTask(*comms[0], any);
        fs = startTask(*comms[0], specific);
      }
      posted.set_value();
      TaskResult rm = runTask(*comms[0], mark);  // rank 1's tag-5 message came before it
      EXPECT_TRUE(rm.ok()) << rm.message;
      oneMatched.set_value();
      TaskResult rs = fs.get(), ra = fa.get();
      ASSERT_TRUE(rs.ok()) << label << ": " << rs.message;
      ASSERT_TRUE(ra.ok()) << label << ": " << ra.message;
      EXPECT_EQ(rs.srcRank, 2) << label;
      EXPECT_EQ(ra.srcRank, 1) << label;
      EXPECT_TRUE(a == p2pPayload(2, 0, count)) << label;
      EXPECT_TRUE(b == p2pPayload(1, 0, count)) << label;
    });
  }
}

// Messages that arrived before any receive wait in per-sender queues; an
// any-source receive takes the earliest arrival over all senders, which here
// is the higher rank's.
TEST(CollectivesAnySource, UnexpectedMessagesMatchInArrivalOrder) {
  const int n = 3;
  TestGroup g(n);
  ASSERT_TRUE(g.ok());
  Comms& comms = g.comms;
  const size_t count = 500;
  std::promise<void> firstIn;
  std::shared_future<void> firstInF = firstIn.get_future().share();
  const std::vector<float> marker(1, 1.f);
  runRanks(n, [&](int r) {
    if (r == 2) {
      EXPECT_TRUE(sendNow(*comms[2], p2pPayload(2, 0, count), 0, 5).ok());
      EXPECT_TRUE(sendNow(*comms[2], marker, 0, 90).ok());
      return;
    }
    if (r == 1) {
      firstInF.wait();
      EXPECT_TRUE(sendNow(*comms[1], p2pPayload(1, 0, count), 0, 5).ok());
      EXPECT_TRUE(sendNow(*comms[1], marker, 0, 91).ok());
      return;
    }
    // A sender's messages arrive in order: once its marker is received, its
    // tag-5 message has arrived (unexpected: no tag-5 receive is posted).
    std::vector<float> m(1);
    std::shared_ptr<P2PTask> t;
    ASSERT_EQ(makeRecv(*comms[0], m.data(), 1, DataType::kFloat32, 2, 90, &t), tcpxSuccess);
    ASSERT_TRUE(runTask(*comms[0], t).ok());
    firstIn.set_value();
    ASSERT_EQ(makeRecv(*comms[0], m.data(), 1, DataType::kFloat32, 1, 91, &t), tcpxSuccess);
    ASSERT_TRUE(runTask(*comms[0], t).ok());
    for (int expect : {2, 1}) {
      std::vector<float> buf(count, -1.f);
      ASSERT_EQ(makeRecvAnySource(*comms[0], buf.data(), count, DataType::kFloat32, 5, &t),
                tcpxSuccess);
      TaskResult res = runTask(*comms[0], t);
      ASSERT_TRUE(res.ok()) << res.message;
      EXPECT_EQ(res.srcRank, expect) << "the earliest arrival should match first";
      EXPECT_TRUE(buf == p2pPayload(res.srcRank, 0, count));
    }
  });
}

TEST(CollectivesAnySource, TimesOutWhenNothingIsSent) {
  const int n = 2;
  TestGroup g(n);
  ASSERT_TRUE(g.ok());
  Comms& comms = g.comms;
  std::vector<float> buf(10, -1.f);
  std::shared_ptr<P2PTask> t;
  ASSERT_EQ(makeRecvAnySource(*comms[0], buf.data(), buf.size(), DataType::kFloat32, 77, &t),
            tcpxSuccess);
  t->timeout = std::chrono::milliseconds(300);
  auto start = std::chrono::steady_clock::now();
  TaskResult res = runTask(*comms[0], t);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(res.code, tcpxTimeout) << res.message;
  EXPECT_EQ(res.srcRank, -1);
  EXPECT_GE(secs, 0.29);
  EXPECT_LT(secs, 3.0);
  EXPECT_NE(res.message.find("timed out"), std::string::npos) << res.message;
  EXPECT_TRUE(buf == std::vector<float>(10, -1.f));
  // Only the receive failed: the communicator still works.
  EXPECT_EQ(comms[0]->abortReason(), "");
  runRanks(n, [&](int r) {
    std::vector<float> v(10, static_cast<float>(r));
    std::shared_ptr<P2PTask> p;
    if (r == 1) {
      ASSERT_EQ(makeSend(*comms[1], v.data(), v.size(), DataType::kFloat32, 0, 78, &p), tcpxSuccess);
    } else {
      ASSERT_EQ(makeRecvAnySource(*comms[0], v.data(), v.size(), DataType::kFloat32, 78, &p),
                tcpxSuccess);
    }
    TaskResult pr = runTask(*comms[r], p);
    ASSERT_TRUE(pr.ok()) << pr.message;
    if (r == 0) {
      EXPECT_EQ(pr.srcRank, 1);
      EXPECT_EQ(v[9], 1.f);
    }
  });
}

// A peer that sent and then shut down (destroy_process_group right after a
// send): what arrived whole must still be receivable by receives posted
// after the connection is gone.
TEST(CollectivesP2P, MessagesStayReceivableAfterTheSenderShutsDown) {
  const int n = 2;
  TestGroup g(n);
  ASSERT_TRUE(g.ok());
  Comms& comms = g.comms;
  std::vector<int32_t> small(100), large(300000);  // inline and sliced
  for (size_t i = 0; i < small.size(); i++) small[i] = static_cast<int32_t>(i * 3 + 1);
  for (size_t i = 0; i < large.size(); i++) large[i] = static_cast<int32_t>(i * 7 + 5);
  for (int tag : {1, 2}) {
    auto& v = tag == 1 ? small : large;
    std::shared_ptr<P2PTask> t;
    ASSERT_EQ(makeSend(*comms[1], v.data(), v.size(), DataType::kInt32, 0, tag, &t), tcpxSuccess);
    comms[1]->enqueue(t);  // completes once rank 0 has taken it in (unexpected queue)
  }
  comms[1]->shutdown();
  // A receive for a tag never sent fails once rank 0 has seen the close:
  // from then on the link is gone.
  std::vector<int32_t> none(1);
  std::shared_ptr<P2PTask> probe;
  ASSERT_EQ(makeRecv(*comms[0], none.data(), 1, DataType::kInt32, 1, 9, &probe), tcpxSuccess);
  TaskResult pr = runTask(*comms[0], probe);
  ASSERT_EQ(pr.code, tcpxRemoteError) << pr.message;
  for (int tag : {1, 2}) {
    const auto& want = tag == 1 ? small : large;
    std::vector<int32_t> got(want.size(), -1);
    std::shared_ptr<P2PTask> t;
    ASSERT_EQ(makeRecv(*comms[0], got.data(), got.size(), DataType::kInt32, 1, tag, &t), tcpxSuccess);
    TaskResult r = runTask(*comms[0], t);
    ASSERT_TRUE(r.ok()) << "tag " << tag << ": " << r.message;
    EXPECT_TRUE(got == want) << "tag " << tag;
  }
}

}  // namespace
}  // namespace tcpx

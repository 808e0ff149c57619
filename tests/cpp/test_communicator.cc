// Collectives and point-to-point through Communicator over loopback, ranks
// as threads. References are computed in the test from the inputs.
#include <atomic>
#include <cmath>
#include <numeric>

#include "collectives/collectives.h"
#include "test_util.h"

namespace tcpx {
namespace {

using testing::makeGroup;
using testing::makeLoopbackNet;
using testing::runRanks;
using testing::runTask;

// Rank r's input element i: small integers, so float sums are exact.
int64_t inputValue(int r, size_t i) { return static_cast<int64_t>((i * 7 + static_cast<size_t>(r) * 13) % 23) - 11; }

struct AllreduceCase {
  int nranks;
  size_t count;
  std::string algo;
};

class AllreduceTest : public ::testing::TestWithParam<AllreduceCase> {};

TEST_P(AllreduceTest, SumMatchesReference) {
  const AllreduceCase c = GetParam();
  auto net = makeLoopbackNet();
  // Small chunks so that even modest sizes are cut into many pipelined messages.
  auto comms = makeGroup(net.get(), c.nranks, 4096, 4);
  CollConfig cfg;
  cfg.allreduceAlgo = c.algo;
  runRanks(c.nranks, [&](int r) {
    std::vector<float> buf(c.count);
    for (size_t i = 0; i < c.count; i++) buf[i] = static_cast<float>(inputValue(r, i));
    std::shared_ptr<CollectiveTask> t;
    ASSERT_EQ(makeAllreduce(*comms[r], cfg, buf.data(), c.count, DataType::kFloat32, RedOp::kSum,
                            1.0, &t),
              tcpxSuccess);
    TaskResult res = runTask(*comms[r], t);
    ASSERT_TRUE(res.ok()) << res.message;
    for (size_t i = 0; i < c.count; i++) {
      int64_t want = 0;
      for (int q = 0; q < c.nranks; q++) want += inputValue(q, i);
      ASSERT_EQ(buf[i], static_cast<float>(want)) << "rank " << r << " element " << i;
    }
  });
}

INSTANTIATE_TEST_SUITE_P(
    Sizes, AllreduceTest,
    ::testing::Values(AllreduceCase{1, 100, ""}, AllreduceCase{2, 0, "ring"},
                      AllreduceCase{2, 1, "ring"}, AllreduceCase{2, 1, "rd"},
                      AllreduceCase{2, 100000, "ring"}, AllreduceCase{2, 100000, "rd"},
                      AllreduceCase{3, 7, "ring"}, AllreduceCase{3, 7, "rd"},
                      AllreduceCase{3, 50001, "ring"}, AllreduceCase{3, 50001, "rd"},
                      AllreduceCase{4, 3, "ring"}, AllreduceCase{4, 65537, "ring"},
                      AllreduceCase{5, 65537, "rd"}, AllreduceCase{5, 65537, "ring"},
                      AllreduceCase{6, 12345, "rd"}, AllreduceCase{8, 100003, "ring"},
                      AllreduceCase{8, 1001, "rd"}));

TEST(Communicator, BroadcastEveryRootBothAlgorithms) {
  const int n = 5;
  auto net = makeLoopbackNet();
  auto comms = makeGroup(net.get(), n, 4096, 4);
  for (std::string algo : {"chain", "tree"}) {
    for (int root = 0; root < n; root++) {
      CollConfig cfg;
      cfg.broadcastAlgo = algo;
      const size_t count = 30001;
      runRanks(n, [&](int r) {
        std::vector<int32_t> buf(count, -1);
        if (r == root)
          for (size_t i = 0; i < count; i++) buf[i] = static_cast<int32_t>(i * 3 + root);
        std::shared_ptr<CollectiveTask> t;
        ASSERT_EQ(makeBroadcast(*comms[r], cfg, buf.data(), count, DataType::kInt32, root, &t),
                  tcpxSuccess);
        TaskResult res = runTask(*comms[r], t);
        ASSERT_TRUE(res.ok()) << res.message;
        for (size_t i = 0; i < count; i++)
          ASSERT_EQ(buf[i], static_cast<int32_t>(i * 3 + root)) << algo << " root " << root;
      });
    }
  }
}

TEST(Communicator, AllgatherIntoSeparateBuffers) {
  for (int n : {2, 3, 4}) {
    auto net = makeLoopbackNet();
    auto comms = makeGroup(net.get(), n, 4096, 4);
    const size_t count = 9999;
    runRanks(n, [&](int r) {
      std::vector<int64_t> in(count);
      for (size_t i = 0; i < count; i++) in[i] = static_cast<int64_t>(r * 1000000 + i);
      std::vector<std::vector<int64_t>> outs(n, std::vector<int64_t>(count, -1));
      std::vector<void*> ptrs;
      for (auto& o : outs) ptrs.push_back(o.data());
      std::shared_ptr<CollectiveTask> t;
      ASSERT_EQ(makeAllgather(*comms[r], in.data(), ptrs, count, DataType::kInt64, &t),
                tcpxSuccess);
      TaskResult res = runTask(*comms[r], t);
      ASSERT_TRUE(res.ok()) << res.message;
      for (int q = 0; q < n; q++)
        for (size_t i = 0; i < count; i++)
          ASSERT_EQ(outs[q][i], static_cast<int64_t>(q * 1000000 + i));
    });
  }
}

TEST(Communicator, BarrierWaitsForEveryone) {
  const int n = 6;
  auto net = makeLoopbackNet();
  auto comms = makeGroup(net.get(), n);
  for (int round = 0; round < 5; round++) {
    std::atomic<int> arrived{0};
    runRanks(n, [&](int r) {
      arrived++;
      std::shared_ptr<CollectiveTask> t;
      ASSERT_EQ(makeBarrier(*comms[r], &t), tcpxSuccess);
      TaskResult res = runTask(*comms[r], t);
      ASSERT_TRUE(res.ok()) << res.message;
      // Nobody leaves the barrier before everyone has entered it.
      ASSERT_EQ(arrived.load(), n);
    });
  }
}

TEST(Communicator, SendRecvTagsOutOfOrder) {
  auto net = makeLoopbackNet();
  auto comms = makeGroup(net.get(), 2);
  const size_t count = 100000;
  runRanks(2, [&](int r) {
    if (r == 0) {
      std::vector<float> a(count, 1.5f), b(count, 2.5f);
      std::shared_ptr<P2PTask> t1, t2;
      ASSERT_EQ(makeSend(*comms[0], a.data(), count, DataType::kFloat32, 1, 1, &t1), tcpxSuccess);
      ASSERT_EQ(makeSend(*comms[0], b.data(), count, DataType::kFloat32, 1, 2, &t2), tcpxSuccess);
      auto f1 = std::async(std::launch::async, [&] { return runTask(*comms[0], t1); });
      auto f2 = std::async(std::launch::async, [&] { return runTask(*comms[0], t2); });
      ASSERT_TRUE(f1.get().ok());
      ASSERT_TRUE(f2.get().ok());
    } else {
      std::vector<float> x(count), y(count);
      std::shared_ptr<P2PTask> t2, t1;
      ASSERT_EQ(makeRecv(*comms[1], y.data(), count, DataType::kFloat32, 0, 2, &t2), tcpxSuccess);
      TaskResult res = runTask(*comms[1], t2);
      ASSERT_TRUE(res.ok()) << res.message;
      ASSERT_EQ(makeRecv(*comms[1], x.data(), count, DataType::kFloat32, 0, 1, &t1), tcpxSuccess);
      res = runTask(*comms[1], t1);
      ASSERT_TRUE(res.ok()) << res.message;
      ASSERT_EQ(x[0], 1.5f);
      ASSERT_EQ(x[count - 1], 1.5f);
      ASSERT_EQ(y[0], 2.5f);
      ASSERT_EQ(y[count - 1], 2.5f);
    }
  });
}

TEST(Communicator, SizeMismatchFailsEveryRankAndGroupStaysUsable) {
  const int n = 4;
  auto net = makeLoopbackNet();
  auto comms = makeGroup(net.get(), n, 4096, 4);
  for (std::string algo : {"ring", "rd"}) {
    CollConfig cfg;
    cfg.allreduceAlgo = algo;
    runRanks(n, [&](int r) {
      // Rank 2 disagrees on the element count.
      size_t count = r == 2 ? 5000 : 4000;
      std::vector<int32_t> buf(count, 1);
      std::shared_ptr<CollectiveTask> t;
      ASSERT_EQ(makeAllreduce(*comms[r], cfg, buf.data(), count, DataType::kInt32, RedOp::kSum,
                              1.0, &t),
                tcpxSuccess);
      TaskResult res = runTask(*comms[r], t);
      EXPECT_FALSE(res.ok()) << "rank " << r << " " << algo;
      EXPECT_NE(res.message.find("mismatch"), std::string::npos) << res.message;
      // The group still works.
      std::vector<int32_t> ok(1000, r);
      ASSERT_EQ(makeAllreduce(*comms[r], cfg, ok.data(), ok.size(), DataType::kInt32, RedOp::kSum,
                              1.0, &t),
                tcpxSuccess);
      res = runTask(*comms[r], t);
      ASSERT_TRUE(res.ok()) << res.message;
      ASSERT_EQ(ok[0], n * (n - 1) / 2);
      ASSERT_EQ(ok[999], n * (n - 1) / 2);
    });
  }
}

TEST(Communicator, PeerAbortFailsOthersQuickly) {
  const int n = 3;
  auto net = makeLoopbackNet();
  auto comms = makeGroup(net.get(), n, 4096, 4, std::chrono::milliseconds(20000));
  // Connect everyone first.
  runRanks(n, [&](int r) {
    std::vector<float> buf(100, 1.f);
    std::shared_ptr<CollectiveTask> t;
    ASSERT_EQ(makeAllreduce(*comms[r], CollConfig(), buf.data(), buf.size(), DataType::kFloat32,
                            RedOp::kSum, 1.0, &t),
              tcpxSuccess);
    ASSERT_TRUE(runTask(*comms[r], t).ok());
  });
  auto start = std::chrono::steady_clock::now();
  runRanks(n, [&](int r) {
    if (r == 1) {
      comms[1]->abort("test: simulated death of rank 1");
      return;
    }
    std::vector<float> buf(100000, 1.f);
    std::shared_ptr<CollectiveTask> t;
    ASSERT_EQ(makeAllreduce(*comms[r], CollConfig(), buf.data(), buf.size(), DataType::kFloat32,
                            RedOp::kSum, 1.0, &t),
              tcpxSuccess);
    TaskResult res = runTask(*comms[r], t);
    EXPECT_FALSE(res.ok());
  });
  auto secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(secs, 10.0) << "the survivors should notice the lost peer long before the timeout";
}

}  // namespace
}  // namespace tcpx

namespace tcpx {
namespace {

TEST(Communicator, BootstrapIsBoundedByTheTimeout) {
  // Rank 1 of 2 whose rank 0 never starts: the bootstrap read from the store
  // must give up after the timeout with tcpxTimeout, not hang.
  auto net = testing::makeLoopbackNet();
  CommOptions o;
  o.rank = 1;
  o.nranks = 2;
  o.timeout = std::chrono::milliseconds(500);
  o.store = std::make_shared<testing::MemStore>();
  o.net = net.get();
  std::unique_ptr<Communicator> comm;
  auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(Communicator::create(o, &comm), tcpxTimeout);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_GE(secs, 0.4);
  EXPECT_LT(secs, 5.0);
  EXPECT_NE(lastError().find("bootstrap"), std::string::npos) << lastError();
  EXPECT_EQ(comm, nullptr);
}

}  // namespace
}  // namespace tcpx

// Tests of common/param.h: every TCPX_* knob parsed from a fake environment,
// valid and invalid values, and the helpers parseSize and Params::algoFor.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <string>

#include <unistd.h>
#include <sys/socket.h>

#include "common/logging.h"
#include "common/param.h"
#include "common/utils.h"
#include "common/status.h"

namespace tcpx {
namespace {

using Env = std::map<std::string, std::string>;

tcpxResult_t parseEnv(const Env& env, Params* out) {
  return parseParams(
      [&env](const char* name) -> const char* {
        auto it = env.find(name);
        return it == env.end() ? nullptr : it->second.c_str();
      },
      out);
}

TEST(Params, AutoSpinUs) {
  // 50 us with at least 4 cores per local rank, else no spinning.
  EXPECT_EQ(autoSpinUs(2, 2), 0);
  EXPECT_EQ(autoSpinUs(2, 1), 0);
  EXPECT_EQ(autoSpinUs(4, 1), 50);
  EXPECT_EQ(autoSpinUs(7, 2), 0);
  EXPECT_EQ(autoSpinUs(8, 2), 50);
  EXPECT_EQ(autoSpinUs(32, 2), 50);
  EXPECT_EQ(autoSpinUs(208, 8), 50);
  EXPECT_EQ(autoSpinUs(16, 8), 0);
  EXPECT_EQ(autoSpinUs(4, 0), 50);
}

TEST(Params, AutoSocketBufferBytes) {
  EXPECT_EQ(autoSocketBufferBytes(1), 256u * 1024);  // one NIC (or loopback): fixed
  EXPECT_EQ(autoSocketBufferBytes(2), 0u);           // several NICs: the kernel's autotuning
  EXPECT_EQ(autoSocketBufferBytes(4), 0u);
}

TEST(Params, AutoThreads) {
  // Half the cores per local rank, at least 1, at most 8; 16 from 16 cores per rank.
  EXPECT_EQ(autoThreads(2, 4), 1);
  EXPECT_EQ(autoThreads(2, 2), 1);
  EXPECT_EQ(autoThreads(2, 1), 1);
  EXPECT_EQ(autoThreads(16, 2), 4);
  EXPECT_EQ(autoThreads(16, 4), 2);
  EXPECT_EQ(autoThreads(128, 8), 16);
  EXPECT_EQ(autoThreads(32, 2), 16);
  EXPECT_EQ(autoThreads(30, 2), 7);
  EXPECT_EQ(autoThreads(256, 1), 16);
  EXPECT_EQ(autoThreads(1, 0), 1);
  Params p;
  ASSERT_EQ(parseEnv({{"LOCAL_WORLD_SIZE", "64"}}, &p), tcpxSuccess);
  EXPECT_EQ(p.nthreads, 1);
}

TEST(Params, Defaults) {
  Params p;
  p.nsocks = 99;  // parseParams must fill every field, not keep what was there
  ASSERT_EQ(parseEnv({}, &p), tcpxSuccess);
  EXPECT_EQ(p.debug, LogLevel::kWarn);
  EXPECT_EQ(p.debugSubsys, static_cast<uint32_t>(kLogAll));
  EXPECT_EQ(p.net, "socket");
  EXPECT_EQ(p.netPlugin, "");
  EXPECT_EQ(p.socketIfname, "");
  EXPECT_EQ(p.socketFamily, 0);
  EXPECT_EQ(p.nsocks, 2);
  // Unset: half the online cores (no LOCAL_WORLD_SIZE: one local rank), within [1, 8].
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  EXPECT_EQ(p.nthreads, static_cast<int>(std::max(1L, std::min(8L, cpus / 2))));
  EXPECT_EQ(p.nchannels, 0);  // auto: one channel per NIC (the socket net decides)
  EXPECT_EQ(p.chunkBytes, 512u * 1024);
  EXPECT_EQ(p.buffers, 8);
  EXPECT_EQ(p.sliceBytes, 512u * 1024);
  EXPECT_EQ(p.inlineBytes, 16u * 1024);
  EXPECT_EQ(p.socketBufferBytes, kSocketBufferAuto);
  EXPECT_EQ(p.algo, "");
  EXPECT_EQ(p.algoThreshold, 64u * 1024);
  EXPECT_EQ(p.spinUs, cpus >= 4 ? 50 : 0);  // autoSpinUs with one local rank
  EXPECT_EQ(p.gpuNicMap, "");
  EXPECT_EQ(p.cudaHostBytes, 512u * 1024);
  // The CUDA communicator's own defaults.
  EXPECT_EQ(p.cudaChunkBytes, 8u << 20);
  EXPECT_EQ(p.cudaBuffers, 4);
  EXPECT_EQ(p.cudaNsocks, 16);
}

// TCPX_CHUNK_BYTES, TCPX_BUFFERS and TCPX_NSOCKS, when set, apply to the CPU
// and the CUDA communicator alike.
TEST(Params, SetValuesApplyToCuda) {
  Params p;
  ASSERT_EQ(parseEnv({{"TCPX_CHUNK_BYTES", "1M"}, {"TCPX_BUFFERS", "6"}, {"TCPX_NSOCKS", "3"}}, &p),
            tcpxSuccess);
  EXPECT_EQ(p.chunkBytes, 1u << 20);
  EXPECT_EQ(p.cudaChunkBytes, 1u << 20);
  EXPECT_EQ(p.buffers, 6);
  EXPECT_EQ(p.cudaBuffers, 6);
  EXPECT_EQ(p.nsocks, 3);
  EXPECT_EQ(p.cudaNsocks, 3);
}

// An empty value is the same as an unset variable (`export TCPX_NSOCKS=`).
TEST(Params, EmptyValuesAreUnset) {
  Env env = {{"TCPX_NSOCKS", ""}, {"TCPX_NET", ""}, {"TCPX_CHUNK_BYTES", ""},
             {"TCPX_ALGO", ""}, {"TCPX_DEBUG", ""}, {"TCPX_SOCKET_FAMILY", ""}};
  Params p;
  ASSERT_EQ(parseEnv(env, &p), tcpxSuccess);
  EXPECT_EQ(p.nsocks, 2);
  EXPECT_EQ(p.net, "socket");
  EXPECT_EQ(p.chunkBytes, 512u * 1024);
  EXPECT_EQ(p.algo, "");
  EXPECT_EQ(p.socketFamily, 0);
}

struct ValidCase {
  const char* var;
  const char* value;
  std::function<bool(const Params&)> check;
};

TEST(Params, ValidValues) {
  const ValidCase cases[] = {
      {"TCPX_DEBUG", "INFO", [](const Params& p) { return p.debug == LogLevel::kInfo; }},
      {"TCPX_DEBUG", "trace", [](const Params& p) { return p.debug == LogLevel::kTrace; }},
      {"TCPX_DEBUG", "NONE", [](const Params& p) { return p.debug == LogLevel::kNone; }},
      {"TCPX_DEBUG_SUBSYS", "INIT,NET",
       [](const Params& p) { return p.debugSubsys == (kLogInit | kLogNet); }},
      {"TCPX_DEBUG_SUBSYS", "^NET",
       [](const Params& p) { return p.debugSubsys == ~static_cast<uint32_t>(kLogNet); }},
      {"TCPX_DEBUG_SUBSYS", "coll", [](const Params& p) { return p.debugSubsys == kLogColl; }},
      {"TCPX_NET", "plugin", [](const Params& p) { return p.net == "plugin"; }},
      {"TCPX_NET", "SOCKET", [](const Params& p) { return p.net == "socket"; }},
      {"TCPX_NET_PLUGIN", "/opt/tcpx/libnccl-net.so",
       [](const Params& p) { return p.netPlugin == "/opt/tcpx/libnccl-net.so"; }},
      {"TCPX_SOCKET_IFNAME", " eth1,eth2 ",
       [](const Params& p) { return p.socketIfname == "eth1,eth2"; }},
      {"TCPX_SOCKET_FAMILY", "AF_INET", [](const Params& p) { return p.socketFamily == AF_INET; }},
      {"TCPX_SOCKET_FAMILY", "4", [](const Params& p) { return p.socketFamily == AF_INET; }},
      {"TCPX_SOCKET_FAMILY", "ipv4", [](const Params& p) { return p.socketFamily == AF_INET; }},
      {"TCPX_SOCKET_FAMILY", "af_inet6",
       [](const Params& p) { return p.socketFamily == AF_INET6; }},
      {"TCPX_SOCKET_FAMILY", "6", [](const Params& p) { return p.socketFamily == AF_INET6; }},
      {"TCPX_NSOCKS", "1", [](const Params& p) { return p.nsocks == 1; }},
      {"TCPX_NSOCKS", "64", [](const Params& p) { return p.nsocks == 64; }},
      {"TCPX_NSOCKS", " 8 ", [](const Params& p) { return p.nsocks == 8; }},
      {"TCPX_NTHREADS", "16", [](const Params& p) { return p.nthreads == 16; }},
      {"TCPX_NCHANNELS", "32", [](const Params& p) { return p.nchannels == 32; }},
      {"TCPX_CHUNK_BYTES", "4096", [](const Params& p) { return p.chunkBytes == 4096; }},
      {"TCPX_CHUNK_BYTES", "1M", [](const Params& p) { return p.chunkBytes == (1u << 20); }},
      {"TCPX_CHUNK_BYTES", "256M", [](const Params& p) { return p.chunkBytes == (256u << 20); }},
      {"TCPX_BUFFERS", "2", [](const Params& p) { return p.buffers == 2; }},
      {"TCPX_BUFFERS", "256", [](const Params& p) { return p.buffers == 256; }},
      {"TCPX_SLICE_BYTES", "64k", [](const Params& p) { return p.sliceBytes == 65536; }},
      {"TCPX_INLINE_BYTES", "0", [](const Params& p) { return p.inlineBytes == 0; }},
      {"TCPX_SOCKET_BUFFER_BYTES", "0", [](const Params& p) { return p.socketBufferBytes == 0; }},
      {"TCPX_SOCKET_BUFFER_BYTES", "4K", [](const Params& p) { return p.socketBufferBytes == 4096; }},
      {"TCPX_SOCKET_BUFFER_BYTES", "1G", [](const Params& p) { return p.socketBufferBytes == (1u << 30); }},
      {"TCPX_INLINE_BYTES", "1M", [](const Params& p) { return p.inlineBytes == (1u << 20); }},
      {"TCPX_ALGO", "ring", [](const Params& p) { return p.algo == "ring"; }},
      {"TCPX_ALGO", "RING", [](const Params& p) { return p.algo == "ring"; }},
      {"TCPX_ALGO", "allreduce:rd,broadcast:tree",
       [](const Params& p) { return p.algo == "allreduce:rd,broadcast:tree"; }},
      {"TCPX_ALGO_THRESHOLD", "0", [](const Params& p) { return p.algoThreshold == 0; }},
      {"TCPX_ALGO_THRESHOLD", "1G",
       [](const Params& p) { return p.algoThreshold == (size_t{1} << 30); }},
      {"TCPX_SPIN_US", "0", [](const Params& p) { return p.spinUs == 0; }},
      {"TCPX_SPIN_US", "1000000", [](const Params& p) { return p.spinUs == 1000000; }},
      {"TCPX_CUDA_WAIT", "host", [](const Params& p) { return p.cudaWait == "host"; }},
      {"TCPX_CUDA_WAIT", "MemOp", [](const Params& p) { return p.cudaWait == "memop"; }},
      {"TCPX_CUDA_WAIT", "kernel", [](const Params& p) { return p.cudaWait == "kernel"; }},
      {"TCPX_CUDA_HOST_BYTES", "0", [](const Params& p) { return p.cudaHostBytes == 0; }},
      {"TCPX_CUDA_HOST_BYTES", "1M", [](const Params& p) { return p.cudaHostBytes == 1u << 20; }},
      {"TCPX_GPU_NIC_MAP", "0:eth1,1:eth1",
       [](const Params& p) { return p.gpuNicMap == "0:eth1,1:eth1"; }},
  };
  for (const ValidCase& c : cases) {
    Params p;
    ASSERT_EQ(parseEnv({{c.var, c.value}}, &p), tcpxSuccess)
        << c.var << "=" << c.value << ": " << lastError();
    EXPECT_TRUE(c.check(p)) << c.var << "=" << c.value;
    // Only that knob moved: nsocks stays at its default unless it was the one.
    if (std::string(c.var) != "TCPX_NSOCKS") {
      EXPECT_EQ(p.nsocks, 2) << c.var;
    }
  }
}

struct InvalidCase {
  const char* var;
  const char* value;
};

TEST(Params, InvalidValuesNameTheVariable) {
  const InvalidCase cases[] = {
      {"TCPX_DEBUG", "LOUD"},
      {"TCPX_DEBUG_SUBSYS", "INIT,FOO"},
      {"TCPX_NET", "ib"},
      {"TCPX_SOCKET_FAMILY", "7"},
      {"TCPX_SOCKET_FAMILY", "AF_UNIX"},
      {"TCPX_NSOCKS", "0"},
      {"TCPX_NSOCKS", "65"},
      {"TCPX_NSOCKS", "-2"},
      {"TCPX_NSOCKS", "4x"},
      {"TCPX_NSOCKS", "two"},
      {"TCPX_NSOCKS", "99999999999999999999"},
      {"TCPX_NTHREADS", "0"},
      {"TCPX_NTHREADS", "65"},
      {"TCPX_NCHANNELS", "0"},
      {"TCPX_NCHANNELS", "33"},
      {"TCPX_CHUNK_BYTES", "4095"},
      {"TCPX_CHUNK_BYTES", "257M"},
      {"TCPX_CHUNK_BYTES", "1.5M"},
      {"TCPX_CHUNK_BYTES", "-1"},
      {"TCPX_CHUNK_BYTES", "1MB"},
      {"TCPX_BUFFERS", "1"},
      {"TCPX_BUFFERS", "257"},
      {"TCPX_SLICE_BYTES", "1K"},
      {"TCPX_SLICE_BYTES", "abc"},
      {"TCPX_INLINE_BYTES", "2M"},
      {"TCPX_SOCKET_BUFFER_BYTES", "4095"},
      {"TCPX_SOCKET_BUFFER_BYTES", "2G"},
      {"TCPX_SOCKET_BUFFER_BYTES", "big"},
      {"TCPX_ALGO", "bogus"},
      {"TCPX_ALGO", "allgather:ring"},
      {"TCPX_ALGO", "allreduce:tree"},
      {"TCPX_ALGO", "broadcast:ring"},
      {"TCPX_ALGO_THRESHOLD", "2048G"},
      {"TCPX_ALGO_THRESHOLD", "x"},
      {"TCPX_SPIN_US", "-1"},
      {"TCPX_SPIN_US", "1000001"},
      {"TCPX_CUDA_WAIT", "stream"},
      {"TCPX_CUDA_HOST_BYTES", "2M"},
      {"TCPX_CUDA_HOST_BYTES", "-1"},
  };
  for (const InvalidCase& c : cases) {
    Params p;
    setLastError("");
    EXPECT_EQ(parseEnv({{c.var, c.value}}, &p), tcpxInvalidArgument) << c.var << "=" << c.value;
    const std::string& err = lastError();
    EXPECT_NE(err.find(c.var), std::string::npos) << c.var << "=" << c.value << ": " << err;
    // The message quotes the bad value, so users see what was read.
    EXPECT_NE(err.find(std::string("'") + c.value + "'"), std::string::npos)
        << c.var << "=" << c.value << ": " << err;
  }
}

// With several knobs set, a bad one is reported even when the others are fine,
// and it is the bad one that is named.
TEST(Params, SeveralKnobs) {
  Params p;
  ASSERT_EQ(parseEnv({{"TCPX_NSOCKS", "4"}, {"TCPX_NTHREADS", "8"}, {"TCPX_CHUNK_BYTES", "2M"}},
                     &p),
            tcpxSuccess);
  EXPECT_EQ(p.nsocks, 4);
  EXPECT_EQ(p.nthreads, 8);
  EXPECT_EQ(p.chunkBytes, 2u << 20);
  EXPECT_NE(describeParams(p).find("TCPX_NSOCKS=4,cuda:4"), std::string::npos) << describeParams(p);
  // One NAME=value token per knob (torch_tcpx.config() splits on spaces).
  Params d;
  ASSERT_EQ(parseEnv({}, &d), tcpxSuccess);
  for (const std::string& token : splitString(describeParams(d), ' '))
    EXPECT_EQ(token.rfind("TCPX_", 0), 0u) << "token '" << token << "' of " << describeParams(d);
  EXPECT_NE(describeParams(d).find("TCPX_CHUNK_BYTES=524288,cuda:8388608"), std::string::npos)
      << describeParams(d);

  EXPECT_EQ(parseEnv({{"TCPX_NSOCKS", "4"}, {"TCPX_BUFFERS", "0"}}, &p), tcpxInvalidArgument);
  EXPECT_NE(lastError().find("TCPX_BUFFERS"), std::string::npos) << lastError();
  EXPECT_EQ(lastError().find("TCPX_NSOCKS"), std::string::npos) << lastError();
}

// ---------------------------------------------------------------------------

struct SizeCase {
  const char* s;
  bool ok;
  uint64_t value;
};

TEST(ParseSize, Table) {
  const SizeCase cases[] = {
      {"0", true, 0},
      {"4096", true, 4096},
      {"512K", true, 512ull * 1024},
      {"512k", true, 512ull * 1024},
      {"4M", true, 4ull * 1024 * 1024},
      {"4m", true, 4ull * 1024 * 1024},
      {"1G", true, 1ull << 30},
      {"3g", true, 3ull << 30},
      {" 2M ", true, 2ull << 20},
      {"18446744073709551615", true, UINT64_MAX},
      {"17179869183G", true, 17179869183ull << 30},
      {"", false, 0},
      {"   ", false, 0},
      {"K", false, 0},
      {"1.5M", false, 0},
      {"-1", false, 0},
      {"+1", false, 0},
      {"12KB", false, 0},
      {"1T", false, 0},
      {"0x10", false, 0},
      {"1 K", false, 0},
      {"18446744073709551616", false, 0},  // 2^64
      {"17179869184G", false, 0},          // 2^34 GiB = 2^64 bytes
      {"16777216T", false, 0},
  };
  for (const SizeCase& c : cases) {
    uint64_t v = 12345;
    EXPECT_EQ(parseSize(c.s, &v), c.ok) << "'" << c.s << "'";
    if (c.ok) {
      EXPECT_EQ(v, c.value) << "'" << c.s << "'";
    }
  }
}

// ---------------------------------------------------------------------------

TEST(Params, AlgoFor) {
  Params p;
  EXPECT_EQ(p.algoFor("allreduce"), "");
  EXPECT_EQ(p.algoFor("broadcast"), "");

  p.algo = "ring";  // a bare name applies to the collectives that have it
  EXPECT_EQ(p.algoFor("allreduce"), "ring");
  EXPECT_EQ(p.algoFor("broadcast"), "");

  p.algo = "chain";
  EXPECT_EQ(p.algoFor("allreduce"), "");
  EXPECT_EQ(p.algoFor("broadcast"), "chain");

  p.algo = "allreduce:rd,broadcast:tree";
  EXPECT_EQ(p.algoFor("allreduce"), "rd");
  EXPECT_EQ(p.algoFor("broadcast"), "tree");
  EXPECT_EQ(p.algoFor("allgather"), "");

  p.algo = "ring,broadcast:tree";
  EXPECT_EQ(p.algoFor("allreduce"), "ring");
  EXPECT_EQ(p.algoFor("broadcast"), "tree");

  // Through the parser, which normalises case and spaces.
  Params q;
  ASSERT_EQ(parseEnv({{"TCPX_ALGO", " AllReduce:RD , broadcast:chain "}}, &q), tcpxSuccess)
      << lastError();
  EXPECT_EQ(q.algoFor("allreduce"), "rd");
  EXPECT_EQ(q.algoFor("broadcast"), "chain");
}

}  // namespace
}  // namespace tcpx

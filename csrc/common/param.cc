#include "common/param.h"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <mutex>
#include <set>

#include <sys/socket.h>
#include <unistd.h>

#include "common/utils.h"

namespace tcpx {
namespace {

const std::set<std::string>& knownCollectives() {
  static const std::set<std::string> s = {"allreduce", "broadcast"};
  return s;
}

// Algorithms each collective has; TCPX_ALGO may name only these.
bool algoValid(const std::string& coll, const std::string& algo) {
  if (coll == "allreduce") return algo == "ring" || algo == "rd";
  if (coll == "broadcast") return algo == "chain" || algo == "tree";
  return false;
}

tcpxResult_t parseInt(const char* name, const char* v, long lo, long hi, int* out) {
  char* end = nullptr;
  errno = 0;
  long x = strtol(v, &end, 10);
  if (errno != 0 || end == v || *trim(end).c_str() != '\0' || x < lo || x > hi) {
    TCPX_ERR(tcpxInvalidArgument, "%s='%s' is invalid: expected an integer in [%ld, %ld]",
             name, v, lo, hi);
  }
  *out = static_cast<int>(x);
  return tcpxSuccess;
}

tcpxResult_t parseBytes(const char* name, const char* v, uint64_t lo, uint64_t hi,
                        size_t* out) {
  uint64_t x = 0;
  if (!parseSize(v, &x) || x < lo || x > hi) {
    TCPX_ERR(tcpxInvalidArgument,
             "%s='%s' is invalid: expected a byte count in [%s, %s] (suffixes K, M, G allowed)",
             name, v, formatBytes(lo).c_str(), formatBytes(hi).c_str());
  }
  *out = static_cast<size_t>(x);
  return tcpxSuccess;
}

tcpxResult_t parseAlgo(const char* v, std::string* out) {
  // Either one algorithm name for every collective that has it, or a comma
  // list of collective:algorithm pairs.
  std::string spec = toLower(trim(v));
  for (const std::string& raw : splitString(spec, ',')) {
    std::string item = trim(raw);
    if (item.empty()) continue;
    size_t colon = item.find(':');
    if (colon == std::string::npos) {
      bool any = false;
      for (const std::string& c : knownCollectives()) any |= algoValid(c, item);
      if (!any) {
        TCPX_ERR(tcpxInvalidArgument,
                 "TCPX_ALGO='%s' is invalid: '%s' is not an algorithm (allowed: ring, rd for "
                 "allreduce; chain, tree for broadcast; or collective:algorithm pairs)",
                 v, item.c_str());
      }
      continue;
    }
    std::string coll = trim(item.substr(0, colon));
    std::string algo = trim(item.substr(colon + 1));
    if (!knownCollectives().count(coll)) {
      TCPX_ERR(tcpxInvalidArgument,
               "TCPX_ALGO='%s' is invalid: unknown collective '%s' (allowed: allreduce, broadcast)",
               v, coll.c_str());
    }
    if (!algoValid(coll, algo)) {
      TCPX_ERR(tcpxInvalidArgument,
               "TCPX_ALGO='%s' is invalid: '%s' is not an algorithm of %s (allowed: %s)", v,
               algo.c_str(), coll.c_str(), coll == "allreduce" ? "ring, rd" : "chain, tree");
    }
  }
  *out = spec;
  return tcpxSuccess;
}

}  // namespace

bool parseSize(const std::string& s, uint64_t* out) {
  std::string t = trim(s);
  if (t.empty()) return false;
  uint64_t mult = 1;
  char last = static_cast<char>(toupper(static_cast<unsigned char>(t.back())));
  if (last == 'K' || last == 'M' || last == 'G') {
    mult = last == 'K' ? (1ull << 10) : last == 'M' ? (1ull << 20) : (1ull << 30);
    t.pop_back();
  }
  if (t.empty()) return false;
  for (char c : t)
    if (c < '0' || c > '9') return false;
  errno = 0;
  unsigned long long x = strtoull(t.c_str(), nullptr, 10);
  if (errno != 0 || x > UINT64_MAX / mult) return false;
  *out = x * mult;
  return true;
}

std::string Params::algoFor(const std::string& coll) const {
  for (const std::string& raw : splitString(algo, ',')) {
    std::string item = trim(raw);
    if (item.empty()) continue;
    size_t colon = item.find(':');
    if (colon == std::string::npos) {
      if (algoValid(coll, item)) return item;
    } else if (trim(item.substr(0, colon)) == coll) {
      return trim(item.substr(colon + 1));
    }
  }
  return "";
}

tcpxResult_t parseParams(const std::function<const char*(const char*)>& getenvFn,
                         Params* out) {
  Params p;
  auto get = [&](const char* name) -> const char* {
    const char* v = getenvFn(name);
    return (v && *v) ? v : nullptr;
  };
  // torchrun tells each process how many share the host.
  auto localWorldSize = [&] {
    const char* l = get("LOCAL_WORLD_SIZE");
    return l ? std::max(1, atoi(l)) : 1;
  };
  auto onlineCpus = [] {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    return cpus > 0 ? static_cast<int>(cpus) : 1;
  };
  if (const char* v = get("TCPX_DEBUG")) {
    if (!parseLogLevel(v, &p.debug))
      TCPX_ERR(tcpxInvalidArgument,
               "TCPX_DEBUG='%s' is invalid: expected NONE, VERSION, WARN, INFO or TRACE", v);
  }
  if (const char* v = get("TCPX_DEBUG_SUBSYS")) {
    std::string bad;
    if (!parseLogSubsys(v, &p.debugSubsys, &bad))
      TCPX_ERR(tcpxInvalidArgument,
               "TCPX_DEBUG_SUBSYS='%s' is invalid: '%s' is not one of INIT, NET, TRANSPORT, "
               "COLL, C10D, ALL",
               v, bad.c_str());
  }
  if (const char* v = get("TCPX_NET")) {
    p.net = toLower(trim(v));
    if (p.net != "socket" && p.net != "plugin")
      TCPX_ERR(tcpxInvalidArgument, "TCPX_NET='%s' is invalid: expected socket or plugin", v);
  }
  if (const char* v = get("TCPX_NET_PLUGIN")) p.netPlugin = v;
  if (const char* v = get("TCPX_SOCKET_IFNAME")) p.socketIfname = trim(v);
  if (const char* v = get("TCPX_SOCKET_FAMILY")) {
    std::string f = toUpper(trim(v));
    if (f == "AF_INET" || f == "4" || f == "IPV4") p.socketFamily = AF_INET;
    else if (f == "AF_INET6" || f == "6" || f == "IPV6") p.socketFamily = AF_INET6;
    else
      TCPX_ERR(tcpxInvalidArgument,
               "TCPX_SOCKET_FAMILY='%s' is invalid: expected AF_INET or AF_INET6", v);
  }
  if (const char* v = get("TCPX_NSOCKS")) {
    TCPX_CHECK(parseInt("TCPX_NSOCKS", v, 1, 64, &p.nsocks));
    p.cudaNsocks = p.nsocks;
  }
  if (const char* v = get("TCPX_NTHREADS")) {
    TCPX_CHECK(parseInt("TCPX_NTHREADS", v, 1, 64, &p.nthreads));
  } else {
    const int lws = localWorldSize();
    p.nthreads = autoThreads(onlineCpus(), lws);
  }
  if (const char* v = get("TCPX_NCHANNELS"))
    TCPX_CHECK(parseInt("TCPX_NCHANNELS", v, 1, 32, &p.nchannels));
  if (const char* v = get("TCPX_CHUNK_BYTES")) {
    TCPX_CHECK(parseBytes("TCPX_CHUNK_BYTES", v, 4096, 256ull << 20, &p.chunkBytes));
    p.cudaChunkBytes = p.chunkBytes;
  }
  if (const char* v = get("TCPX_BUFFERS")) {
    TCPX_CHECK(parseInt("TCPX_BUFFERS", v, 2, 256, &p.buffers));
    p.cudaBuffers = p.buffers;
  }
  if (const char* v = get("TCPX_SLICE_BYTES"))
    TCPX_CHECK(parseBytes("TCPX_SLICE_BYTES", v, 4096, 256ull << 20, &p.sliceBytes));
  if (const char* v = get("TCPX_SOCKET_BUFFER_BYTES")) {
    TCPX_CHECK(parseBytes("TCPX_SOCKET_BUFFER_BYTES", v, 0, 1ull << 30, &p.socketBufferBytes));
    if (p.socketBufferBytes != 0 && p.socketBufferBytes < 4096)
      TCPX_ERR(tcpxInvalidArgument,
               "TCPX_SOCKET_BUFFER_BYTES='%s' is invalid: expected 0 (the kernel's autotuning) "
               "or 4K-1G", v);
  }
  if (const char* v = get("TCPX_INLINE_BYTES"))
    TCPX_CHECK(parseBytes("TCPX_INLINE_BYTES", v, 0, 1ull << 20, &p.inlineBytes));
  if (const char* v = get("TCPX_ALGO")) TCPX_CHECK(parseAlgo(v, &p.algo));
  if (const char* v = get("TCPX_ALGO_THRESHOLD"))
    TCPX_CHECK(parseBytes("TCPX_ALGO_THRESHOLD", v, 0, 1ull << 40, &p.algoThreshold));
  if (const char* v = get("TCPX_SPIN_US"))
    TCPX_CHECK(parseInt("TCPX_SPIN_US", v, 0, 1000000, &p.spinUs));
  else
    p.spinUs = autoSpinUs(onlineCpus(), localWorldSize());
  if (const char* v = get("TCPX_GPU_NIC_MAP")) p.gpuNicMap = trim(v);
  if (const char* v = get("TCPX_CUDA_WAIT")) {
    p.cudaWait = toLower(trim(v));
    if (p.cudaWait != "kernel" && p.cudaWait != "memop" && p.cudaWait != "host")
      TCPX_ERR(tcpxInvalidArgument,
               "TCPX_CUDA_WAIT='%s' is invalid: expected kernel, memop or host", v);
  }
  if (const char* v = get("TCPX_CUDA_HOST_BYTES"))
    TCPX_CHECK(parseBytes("TCPX_CUDA_HOST_BYTES", v, 0, 1ull << 20, &p.cudaHostBytes));
  if (const char* v = get("TCPX_CUDA_BLOCKS"))
    TCPX_CHECK(parseInt("TCPX_CUDA_BLOCKS", v, 1, 64, &p.cudaBlocks));
  *out = p;
  return tcpxSuccess;
}

size_t autoSocketBufferBytes(int ndevices) { return ndevices == 1 ? 256 * 1024 : 0; }

int autoSpinUs(int cpus, int localWorldSize) {
  return cpus >= 4 * std::max(1, localWorldSize) ? 50 : 0;
}

int autoThreads(int cpus, int localWorldSize) {
  const int share = cpus / std::max(1, localWorldSize);
  if (share >= 16) return 16;
  return std::max(1, std::min(8, share / 2));
}

tcpxResult_t getParams(const Params** out) {
  static Params params;
  static tcpxResult_t status = tcpxSuccess;
  static std::string error;
  static std::once_flag once;
  std::call_once(once, [] {
    status = parseParams([](const char* n) { return getenv(n); }, &params);
    if (status != tcpxSuccess) error = lastError();
  });
  if (status != tcpxSuccess) {
    setLastError(error);
    return status;
  }
  *out = &params;
  return tcpxSuccess;
}

std::string describeParams(const Params& p) {
  return strFormat(
      "TCPX_NET=%s TCPX_SOCKET_IFNAME=%s TCPX_NSOCKS=%d,cuda:%d TCPX_NTHREADS=%d "
      "TCPX_NCHANNELS=%s TCPX_CHUNK_BYTES=%zu,cuda:%zu TCPX_BUFFERS=%d,cuda:%d TCPX_SLICE_BYTES=%zu "
      "TCPX_SOCKET_BUFFER_BYTES=%s TCPX_INLINE_BYTES=%zu TCPX_ALGO=%s TCPX_ALGO_THRESHOLD=%zu TCPX_SPIN_US=%d "
      "TCPX_CUDA_WAIT=%s TCPX_CUDA_BLOCKS=%d TCPX_CUDA_HOST_BYTES=%zu",
      p.net.c_str(), p.socketIfname.empty() ? "(auto)" : p.socketIfname.c_str(), p.nsocks,
      p.cudaNsocks, p.nthreads, p.nchannels ? std::to_string(p.nchannels).c_str() : "auto", p.chunkBytes, p.cudaChunkBytes, p.buffers, p.cudaBuffers, p.sliceBytes,
      p.socketBufferBytes == kSocketBufferAuto ? "auto" : std::to_string(p.socketBufferBytes).c_str(),
      p.inlineBytes,
      p.algo.empty() ? "(auto)" : p.algo.c_str(), p.algoThreshold, p.spinUs,
      p.cudaWait.c_str(), p.cudaBlocks, p.cudaHostBytes);
}

}  // namespace tcpx

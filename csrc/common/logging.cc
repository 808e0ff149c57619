#include "common/logging.h"

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "common/utils.h"

namespace tcpx {
namespace {

struct LogConfig {
  LogLevel level = LogLevel::kWarn;
  uint32_t subsys = kLogAll;
  std::string host;
  int pid = 0;
};

std::atomic<int> gLogRank{-1};

const LogConfig& config() {
  static const LogConfig cfg = [] {
    LogConfig c;
    const char* lv = getenv("TCPX_DEBUG");
    if (lv && *lv && !parseLogLevel(lv, &c.level)) {
      fprintf(stderr,
              "TCPX WARN TCPX_DEBUG='%s' is not one of NONE, VERSION, WARN, "
              "INFO, TRACE; using WARN\n",
              lv);
    }
    const char* ss = getenv("TCPX_DEBUG_SUBSYS");
    std::string bad;
    if (ss && *ss && !parseLogSubsys(ss, &c.subsys, &bad)) {
      fprintf(stderr,
              "TCPX WARN TCPX_DEBUG_SUBSYS item '%s' is not one of INIT, NET, "
              "TRANSPORT, COLL, C10D, ALL; logging all subsystems\n",
              bad.c_str());
      c.subsys = kLogAll;
    }
    c.host = hostName();
    c.pid = static_cast<int>(getpid());
    return c;
  }();
  return cfg;
}

const char* levelName(LogLevel l) {
  switch (l) {
    case LogLevel::kWarn: return "WARN";
    case LogLevel::kInfo: return "INFO";
    case LogLevel::kTrace: return "TRACE";
    case LogLevel::kVersion: return "VERSION";
    default: return "";
  }
}

}  // namespace

bool parseLogLevel(const std::string& s, LogLevel* out) {
  std::string u = toUpper(s);
  if (u == "NONE") *out = LogLevel::kNone;
  else if (u == "VERSION") *out = LogLevel::kVersion;
  else if (u == "WARN") *out = LogLevel::kWarn;
  else if (u == "INFO") *out = LogLevel::kInfo;
  else if (u == "TRACE") *out = LogLevel::kTrace;
  else return false;
  return true;
}

bool parseLogSubsys(const std::string& s, uint32_t* out, std::string* bad) {
  std::string spec = s;
  bool invert = false;
  if (!spec.empty() && spec[0] == '^') {
    invert = true;
    spec = spec.substr(1);
  }
  uint32_t mask = 0;
  for (const std::string& item : splitString(spec, ',')) {
    std::string u = toUpper(trim(item));
    if (u.empty()) continue;
    if (u == "INIT") mask |= kLogInit;
    else if (u == "NET") mask |= kLogNet;
    else if (u == "TRANSPORT") mask |= kLogTransport;
    else if (u == "COLL") mask |= kLogColl;
    else if (u == "C10D") mask |= kLogC10d;
    else if (u == "ALL") mask |= kLogAll;
    else {
      if (bad) *bad = item;
      return false;
    }
  }
  *out = invert ? ~mask : mask;
  return true;
}

bool logEnabled(LogLevel level, uint32_t subsys) {
  const LogConfig& c = config();
  if (level == LogLevel::kWarn) return c.level >= LogLevel::kWarn;
  return c.level >= level && (c.subsys & subsys) != 0;
}

void setLogRank(int rank) {
  int expected = -1;
  gLogRank.compare_exchange_strong(expected, rank);
}

void logMessage(LogLevel level, uint32_t subsys, const char* file, int line,
                const char* fmt, ...) {
  if (!logEnabled(level, subsys)) return;
  const LogConfig& c = config();
  char msg[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  const char* base = strrchr(file, '/');
  base = base ? base + 1 : file;
  long tid = syscall(SYS_gettid);
  int rank = gLogRank.load(std::memory_order_relaxed);
  char rankStr[24] = "";
  if (rank >= 0) snprintf(rankStr, sizeof(rankStr), " [%d]", rank);
  // One fprintf per line so that lines of concurrent threads do not interleave.
  if (level == LogLevel::kWarn || level == LogLevel::kTrace) {
    // TRACE lines carry monotonic microseconds, as NCCL's do: the latency of
    // a step is read off the difference of two lines.
    char when[32] = "";
    if (level == LogLevel::kTrace) {
      timespec ts;
      clock_gettime(CLOCK_MONOTONIC, &ts);
      snprintf(when, sizeof(when), " %.1f", ts.tv_sec * 1e6 + ts.tv_nsec / 1e3);
    }
    fprintf(stderr, "%s:%d:%ld%s TCPX %s%s %s:%d %s\n", c.host.c_str(), c.pid, tid, rankStr,
            levelName(level), when, base, line, msg);
  } else {
    fprintf(stderr, "%s:%d:%ld%s TCPX %s %s\n", c.host.c_str(), c.pid, tid,
            rankStr, levelName(level), msg);
  }
}

}  // namespace tcpx

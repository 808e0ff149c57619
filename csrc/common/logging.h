// Logging, in NCCL's manner: a level (TCPX_DEBUG) and subsystems
// (TCPX_DEBUG_SUBSYS), lines prefixed "host:pid:tid [rank] TCPX LEVEL".
//
// TCPX_DEBUG: WARN (default), INFO or TRACE (VERSION and NONE are accepted
// too). TCPX_DEBUG_SUBSYS: comma list of INIT, NET, TRANSPORT, COLL, C10D,
// ALL; a leading '^' excludes (NCCL's syntax). Both are read once, at the
// first log call; a bad value is reported once and the default used, since
// logging must work before configuration is validated (common/param.h rejects
// the same bad values as errors).
#pragma once

#include <cstdint>
#include <string>

namespace tcpx {

enum class LogLevel : int { kNone = 0, kVersion = 1, kWarn = 2, kInfo = 3, kTrace = 4 };

enum LogSubsys : uint32_t {
  kLogInit = 1u << 0,
  kLogNet = 1u << 1,
  kLogTransport = 1u << 2,
  kLogColl = 1u << 3,
  kLogC10d = 1u << 4,
  kLogAll = ~0u,
};

// Parses a TCPX_DEBUG value; false if it is not one of the names above.
bool parseLogLevel(const std::string& s, LogLevel* out);
// Parses a TCPX_DEBUG_SUBSYS value; false (and `bad` names the item) if an
// item is unknown.
bool parseLogSubsys(const std::string& s, uint32_t* out, std::string* bad);

bool logEnabled(LogLevel level, uint32_t subsys);
void logMessage(LogLevel level, uint32_t subsys, const char* file, int line,
                const char* fmt, ...) __attribute__((format(printf, 5, 6)));
// Sets the rank shown in log lines of this process (the first group's rank).
void setLogRank(int rank);

}  // namespace tcpx

#define TCPX_WARN(...)                                                    \
  ::tcpx::logMessage(::tcpx::LogLevel::kWarn, ::tcpx::kLogAll, __FILE__, \
                     __LINE__, __VA_ARGS__)

#define TCPX_INFO(subsys, ...)                                              \
  do {                                                                      \
    if (::tcpx::logEnabled(::tcpx::LogLevel::kInfo, (subsys)))              \
      ::tcpx::logMessage(::tcpx::LogLevel::kInfo, (subsys), __FILE__,       \
                         __LINE__, __VA_ARGS__);                            \
  } while (0)

#define TCPX_TRACE(subsys, ...)                                             \
  do {                                                                      \
    if (::tcpx::logEnabled(::tcpx::LogLevel::kTrace, (subsys)))             \
      ::tcpx::logMessage(::tcpx::LogLevel::kTrace, (subsys), __FILE__,      \
                         __LINE__, __VA_ARGS__);                            \
  } while (0)

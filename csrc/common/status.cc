#include "common/status.h"

#include <cstdarg>
#include <cstdio>

#include "common/logging.h"

namespace tcpx {
namespace {
thread_local std::string tLastError;
}

const char* resultName(tcpxResult_t r) {
  switch (r) {
    case tcpxSuccess: return "success";
    case tcpxUnhandledCudaError: return "unhandled CUDA error";
    case tcpxSystemError: return "system error";
    case tcpxInternalError: return "internal error";
    case tcpxInvalidArgument: return "invalid argument";
    case tcpxInvalidUsage: return "invalid usage";
    case tcpxRemoteError: return "remote error";
    case tcpxInProgress: return "in progress";
    case tcpxTimeout: return "timeout";
    default: return "unknown result";
  }
}

const std::string& lastError() { return tLastError; }

void setLastError(const std::string& msg) { tLastError = msg; }

tcpxResult_t setError(tcpxResult_t code, const char* file, int line,
                      const char* fmt, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  tLastError = buf;
  // Invalid arguments are the caller's mistake and reach the user as an
  // exception; logging them at WARN as well would only repeat it.
  if (code == tcpxInvalidArgument) {
    TCPX_TRACE(kLogAll, "%s:%d %s", file, line, buf);
  } else {
    logMessage(LogLevel::kWarn, kLogAll, file, line, "%s (%s)", buf,
               resultName(code));
  }
  return code;
}

void traceCheck(tcpxResult_t code, const char* file, int line) {
  TCPX_TRACE(kLogAll, "%s:%d -> %d (%s)", file, line, static_cast<int>(code),
             resultName(code));
}

}  // namespace tcpx

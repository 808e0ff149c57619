// Status codes and check macros of the core.
//
// Every core function that can fail returns a tcpxResult_t. The values 0-7
// are NCCL's ncclResult_t values (nccl.h), so that the net layer can speak the
// NCCL net-plugin contract without translation. The place where an error
// starts records a message with TCPX_ERR (logged at WARN with file:line, kept
// in a thread-local "last error"); callers propagate with TCPX_CHECK, which
// logs the call chain at TRACE, as NCCL's NCCLCHECK does. The c10d layer turns
// a failed status plus lastError() into a Python exception.
#pragma once

#include <string>

namespace tcpx {

typedef enum {
  tcpxSuccess = 0,
  tcpxUnhandledCudaError = 1,
  tcpxSystemError = 2,     // a system call failed (socket, epoll, ...)
  tcpxInternalError = 3,   // a bug or broken invariant in torch_tcpx
  tcpxInvalidArgument = 4, // bad input from the caller: becomes ValueError
  tcpxInvalidUsage = 5,    // a valid call at the wrong time or place
  tcpxRemoteError = 6,     // a peer failed, disagreed or went away
  tcpxInProgress = 7,
  tcpxTimeout = 8,         // not in NCCL: an operation ran past its timeout
  tcpxNumResults = 9
} tcpxResult_t;

const char* resultName(tcpxResult_t r);

// The message recorded by the last TCPX_ERR/setError on this thread.
const std::string& lastError();
// Records `msg` as this thread's last error without logging (used when an
// error that started on another thread is handed to this one).
void setLastError(const std::string& msg);
// Records and logs (at WARN) an error that starts here; returns `code`.
tcpxResult_t setError(tcpxResult_t code, const char* file, int line,
                      const char* fmt, ...) __attribute__((format(printf, 4, 5)));
// Logs a propagation step at TRACE ("file:line -> code").
void traceCheck(tcpxResult_t code, const char* file, int line);

}  // namespace tcpx

// Records an error that starts here and returns it from the enclosing function.
#define TCPX_ERR(code, ...)                                        \
  return ::tcpx::setError((code), __FILE__, __LINE__, __VA_ARGS__)

// Propagates a failed status from `call`.
#define TCPX_CHECK(call)                                  \
  do {                                                    \
    ::tcpx::tcpxResult_t tcpx_res_ = (call);              \
    if (tcpx_res_ != ::tcpx::tcpxSuccess) {               \
      ::tcpx::traceCheck(tcpx_res_, __FILE__, __LINE__);  \
      return tcpx_res_;                                   \
    }                                                     \
  } while (0)

// Like TCPX_CHECK, but jumps to `label` (after setting `res`) for cleanup.
#define TCPX_CHECK_GOTO(call, res, label)                 \
  do {                                                    \
    (res) = (call);                                       \
    if ((res) != ::tcpx::tcpxSuccess) {                   \
      ::tcpx::traceCheck((res), __FILE__, __LINE__);      \
      goto label;                                         \
    }                                                     \
  } while (0)

// A system call that returns -1 and sets errno on failure.
#define TCPX_SYSCHECK(call, name)                                           \
  do {                                                                      \
    if ((call) == -1) {                                                     \
      int tcpx_errno_ = errno;                                              \
      TCPX_ERR(::tcpx::tcpxSystemError, "%s failed: %s", (name),            \
               strerror(tcpx_errno_));                                      \
    }                                                                       \
  } while (0)

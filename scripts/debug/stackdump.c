// Debug aid for hangs on the GPU machine (no gdb there): native stacks of
// a process's threads, printed by each thread from a signal handler.
// Loaded with ctypes by scripts/smoke_cuda.py:
//   gcc -shared -fPIC -O1 -o /tmp/stackdump.so scripts/debug/stackdump.c
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static void handler(int sig) {
  (void)sig;
  void* frames[48];
  int n = backtrace(frames, 48);
  char head[64];
  int len = snprintf(head, sizeof head, "--- native stack of thread %ld\n", (long)syscall(SYS_gettid));
  if (write(2, head, (size_t)len) < 0) return;
  backtrace_symbols_fd(frames, n, 2);
}

int stackdump_install(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = handler;
  sa.sa_flags = SA_RESTART;
  return sigaction(SIGUSR2, &sa, NULL);
}

int stackdump_thread(int tid) { return (int)syscall(SYS_tgkill, getpid(), tid, SIGUSR2); }

// Helpers shared by the standalone GPU tests (tests/cuda/*.cu): a CUDA or
// tcpx call that must succeed, and PASS/FAIL reporting with a failure count.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "common/status.h"

#define CUDA_OK(x)                                                                        \
  do {                                                                                    \
    cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                              \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      exit(2);                                                                            \
    }                                                                                     \
  } while (0)

// A tcpx call that must succeed (the core's error text on failure).
#define TCPX_OK(x)                                                                      \
  do {                                                                                  \
    if ((x) != ::tcpx::tcpxSuccess) {                                                   \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, tcpx::lastError().c_str()); \
      exit(2);                                                                          \
    }                                                                                   \
  } while (0)

// Polls a DeviceStage ticket until its work is done.
template <class Stage>
void waitTicket(Stage& s, uint64_t ticket) {
  bool done = false;
  while (!done) TCPX_OK(s.query(ticket, &done));
}

inline int& testFailures() {
  static int failures = 0;
  return failures;
}

inline void report(bool ok, const std::string& what) {
  printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
  fflush(stdout);
  if (!ok) testFailures()++;
}

// Helpers shared by the standalone GPU tests (tests/cuda/*.cu): a CUDA call
// that must succeed, and PASS/FAIL reporting with a failure count.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#define CUDA_OK(x)                                                                        \
  do {                                                                                    \
    cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                              \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      exit(2);                                                                            \
    }                                                                                     \
  } while (0)

inline int& testFailures() {
  static int failures = 0;
  return failures;
}

inline void report(bool ok, const std::string& what) {
  printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
  fflush(stdout);
  if (!ok) testFailures()++;
}

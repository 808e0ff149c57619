#!/usr/bin/env bash
# The whole test suite: C++ core tests (GoogleTest through CTest) and the
# Python tests (pytest, ranks as processes). Installs what it needs first.
#   TCPX_TEST_FULL=0    run the 64 MiB size class on a subset (default: the full product)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh

printf '\n==> C++ core tests (cmake + ctest)\n'
cmake -S . -B build/core -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build/core
ctest --test-dir build/core --output-on-failure --timeout 900 -j 1

printf '\n==> CUDA build check (nvcc, compile only; skipped without nvcc)\n'
bash scripts/check_cuda_build.sh

printf '\n==> Python tests (pytest)\n'
export TCPX_TEST_FULL=${TCPX_TEST_FULL:-1}
python3 -m pytest tests/python -q -ra --timeout 900 "$@"

#!/usr/bin/env bash
# Compile-only check of the CUDA build, for machines without a GPU (CI):
#  - every csrc/**/*.cu and the standalone GPU tests and benchmarks, with nvcc (sm_90);
#  - the C++ sources with TCPX_WITH_CUDA defined (their CUDA paths), against
#    the installed torch's headers and the CUDA toolkit's: a CPU-only torch
#    wheel ships the c10/cuda and ATen/cuda headers, so this catches a CUDA
#    build break without a CUDA torch or a GPU.
# Skips (exit 0, with a message) when nvcc is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda_build: nvcc not found; CUDA compile check skipped"
  exit 0
fi
CUDA_INC=${CUDA_HOME:-/usr/local/cuda}/include
[[ -f "$CUDA_INC/cuda.h" ]] || CUDA_INC=$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
echo "check_cuda_build: $("$NVCC" --version | tail -1)"
mapfile -t CU < <(ls csrc/*/*.cu)
for f in "${CU[@]}"; do
  "$NVCC" -std=c++17 -O2 -arch=sm_90 -DTCPX_WITH_CUDA=1 -Icsrc -c "$f" -o "$OUT/$(basename "$f").o"
  echo "  nvcc ok: $f"
done
"$NVCC" -std=c++17 -O2 -arch=sm_90 -Icsrc tests/cuda/test_unpack.cu csrc/transport/unpack.cu \
  csrc/common/*.cc -o "$OUT/test_unpack"
echo "  nvcc ok: tests/cuda/test_unpack.cu (linked)"
"$NVCC" -std=c++17 -O2 -arch=sm_90 -Icsrc tests/cuda/test_stage.cu csrc/transport/cuda_stage.cu \
  csrc/transport/unpack.cu csrc/common/*.cc -o "$OUT/test_stage"
echo "  nvcc ok: tests/cuda/test_stage.cu (linked)"
"$NVCC" -std=c++17 -O2 -arch=sm_90 -Icsrc tests/cuda/bench_stage.cu csrc/transport/cuda_stage.cu \
  csrc/transport/unpack.cu csrc/common/*.cc -o "$OUT/bench_stage"
echo "  nvcc ok: tests/cuda/bench_stage.cu (linked)"
"$NVCC" -std=c++17 -O2 -Icsrc tests/cuda/pcie_load.cu -o "$OUT/pcie_load"
echo "  nvcc ok: tests/cuda/pcie_load.cu (linked)"
TORCH_INC=$(python3 -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))")
PY_INC=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
# A CPU-only wheel lacks this one generated header of c10/cuda.
mkdir -p "$OUT/inc/c10/cuda/impl"
echo '#pragma once' > "$OUT/inc/c10/cuda/impl/cuda_cmake_macros.h"
TORCH_INC="$TORCH_INC -I$OUT/inc"
for f in csrc/c10d/*.cpp csrc/collectives/collectives.cc csrc/transport/communicator.cc; do
  g++ -std=c++20 -fsyntax-only -Wall -Wno-unused-parameter -DTCPX_WITH_CUDA=1 -Icsrc $TORCH_INC \
    -I"$PY_INC" -I"$CUDA_INC" "$f"
  echo "  g++ -DTCPX_WITH_CUDA ok: $f"
done

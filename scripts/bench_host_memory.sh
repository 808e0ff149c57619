#!/usr/bin/env bash
# On the GPU machine (2 GPUs): how much of the loopback net is left when the
# GPUs' staging traffic shares host memory with it. bench_net (the socket
# net alone, both directions, from host memory) runs alone, then beside
# tests/cuda/pcie_load.cu on GPUs 0 and 1 at RATE GB/s each way (the staging
# traffic of an all_reduce at RATE GB/s busbw), then beside them at full
# speed, for 8 and 16 sockets. See docs/performance.md (issue 4, fifth
# measurement).
#   bash scripts/bench_host_memory.sh [RATE, default 20]
set -uo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-20}
BIN=${TMPDIR:-/tmp}
g++ -O2 -std=c++17 -pthread -Icsrc benchmarks/bench_net.cc csrc/common/*.cc csrc/net/*.cc \
  -o "$BIN/bench_net" || exit 1
nvcc -O2 -std=c++17 -Icsrc tests/cuda/pcie_load.cu -o "$BIN/pcie_load" || exit 1
net() {
  "$BIN/bench_net" --nsocks "$1" --nthreads "$1" --chunk 8M --depth 4 --working 64M --bytes 8G \
    --rounds 3 --sockbuf 256K 2>&1 | grep "GB/s" | sed "s/^/  /"
}
# Both GPUs for `secs`, in the background; `wait` collects them.
load() { "$BIN/pcie_load" 0 "$1" "$2" & "$BIN/pcie_load" 1 "$1" "$2" & }
echo "== pcie_load alone, full speed"; load 0 5; wait
for ns in 8 16; do
  echo "== bench_net alone, $ns sockets"; net "$ns"
  # The load runs 8 s and bench_net starts 1 s into it, taking 2-4 s.
  echo "== bench_net, $ns sockets, beside 2 GPUs at $RATE GB/s each way"; load "$RATE" 8; sleep 1; net "$ns"; wait
  echo "== bench_net, $ns sockets, beside 2 GPUs at full speed"; load 0 8; sleep 1; net "$ns"; wait
  echo "== bench_net alone again, $ns sockets"; net "$ns"
done

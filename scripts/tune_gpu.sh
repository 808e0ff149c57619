#!/usr/bin/env bash
# On the GPU machine: all_reduce busbw of tcpx on CUDA tensors at 64-256 MiB
# for a grid of TCPX_NSOCKS x TCPX_NTHREADS x TCPX_CHUNK_BYTES (the knobs are
# read once per process, so one run per setting). One line per setting.
#   bash scripts/tune_gpu.sh [nproc]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
N=${1:-2}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
for socks in ${SOCKS:-2 4 8}; do
  for threads in ${THREADS:-4 8}; do
    for chunk in ${CHUNKS:-512K 2M}; do
      line=$(TCPX_NSOCKS=$socks TCPX_NTHREADS=$threads TCPX_CHUNK_BYTES=$chunk timeout 120 \
        python3 -m torch.distributed.run --standalone --nproc-per-node "$N" \
        benchmarks/bench_collectives.py --device cuda --backends tcpx --ops all_reduce \
        --min-bytes 64M --max-bytes 256M --target-time 0.2 2>&1 | grep -E "avg busbw|pipeline" | tr '\n' ' ')
      echo "nsocks=$socks nthreads=$threads chunk=$chunk: $line" | tee -a "$OUT/tune_gpu.txt"
    done
  done
done

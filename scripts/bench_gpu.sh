#!/usr/bin/env bash
# On the GPU machine: tcpx vs NCCL restricted to sockets over loopback vs gloo,
# CUDA tensors, all_reduce / all_gather / reduce_scatter 1 KiB .. 256 MiB,
# twice: NCCL's socket defaults, then NCCL_NSOCKS_PERTHREAD=4
# NCCL_SOCKET_NTHREADS=4 (NCCL reads its variables once per process, so one
# configuration per run). Builds first. Output (txt, csv, png) under $OUT.
#   bash scripts/bench_gpu.sh [nproc] [max-bytes]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
N=${1:-2}
MAX=${2:-256M}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NET=Socket NCCL_SOCKET_IFNAME=lo
if ! python3 -c "import torch_tcpx" 2>/dev/null; then
  TCPX_BUILD_CUDA=1 MAX_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . \
    > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
fi
for cfg in default tuned; do
  if [ $cfg = tuned ]; then export NCCL_NSOCKS_PERTHREAD=4 NCCL_SOCKET_NTHREADS=4; fi
  timeout 280 python3 -m torch.distributed.run --standalone --nproc-per-node "$N" \
    benchmarks/bench_collectives.py --device cuda --backends tcpx,nccl,gloo \
    --ops all_reduce,all_gather,reduce_scatter --min-bytes 1K --max-bytes "$MAX" --target-time 0.1 \
    --csv "$OUT/gpu_${N}gpu_nccl_$cfg.csv" --plot "$OUT/gpu_${N}gpu_nccl_$cfg.png" 2>&1 \
    | grep -v "^W" | tee "$OUT/gpu_${N}gpu_nccl_$cfg.txt"
done

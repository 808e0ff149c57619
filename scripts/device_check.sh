#!/usr/bin/env bash
# On the GPU machine (no network): build the extension against its torch
# (2.11+cu130) and run a CPU smoke test and a short benchmark. Output under $OUT.
#   bash scripts/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
nproc
start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . \
  > "$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - start )) s"
if [ $rc != 0 ]; then tail -40 "$OUT/build.log"; exit $rc; fi
python3 -c "import torch_tcpx; print('import ok', torch_tcpx.config())"
timeout 120 python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
  examples/train_digits_ddp.py 2>&1 | grep -v "^W" | tail -6
for n in 2 4; do
  timeout 240 python3 -m torch.distributed.run --standalone --nproc-per-node $n \
    benchmarks/bench_collectives.py --backends tcpx,gloo --ops all_reduce \
    --min-bytes 1K --max-bytes 64M --target-time 0.2 --csv "$OUT/cpu_allreduce_$n.csv" 2>&1 \
    | grep -v "^W" | tail -22
done

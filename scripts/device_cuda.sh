#!/usr/bin/env bash
# On the GPU machine (no network): build the CUDA extension, then run the
# steps named in $@ (default: unpack stage smoke pytest). Output under $OUT.
#   unpack  the standalone unpack-kernel test (tests/cuda/test_unpack.cu)
#   stage   the standalone stage test (tests/cuda/test_stage.cu)
#   bench-stage  the op kernel's cost per command (tests/cuda/bench_stage.cu)
#   smoke   scripts/smoke_cuda.py at 2 ranks (one per GPU) and 4 (GPUs shared)
#   smoke-host / smoke-memop / smoke-trace: the same with TCPX_CUDA_WAIT=host / =memop /
#           TCPX_DEBUG=TRACE
#   ddp     examples/train_digits_ddp.py on 2 GPUs against NCCL
#   fsdp    examples/train_fsdp2.py on 2 GPUs against one GPU
#   bench   scripts/bench_gpu.sh (tcpx vs NCCL sockets vs gloo)
#   pytest  tests/python/test_cuda.py
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
steps=${*:-unpack stage smoke pytest}
nvidia-smi -L
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'gpus', torch.cuda.device_count())"
if ! python3 -c "import pytest, pytest_timeout" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
start=$(date +%s)
TCPX_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install -q --no-build-isolation --no-deps \
  --no-index -e . > "$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - start )) s"
if [ $rc != 0 ]; then grep -E "error|Error" "$OUT/build.log" | head -30; exit $rc; fi
for step in $steps; do
  echo "==> $step"
  case $step in
    unpack)
      nvcc -std=c++17 -O2 -arch=sm_90 -Icsrc tests/cuda/test_unpack.cu csrc/transport/unpack.cu \
        csrc/common/*.cc -o /tmp/test_unpack && timeout 120 /tmp/test_unpack 2>&1 | tail -5 ;;
    stage)
      nvcc -std=c++17 -O2 -arch=sm_90 -Icsrc tests/cuda/test_stage.cu csrc/transport/cuda_stage.cu \
        csrc/transport/unpack.cu csrc/common/*.cc -o /tmp/test_stage && timeout 300 /tmp/test_stage 2>&1 | tail -40 ;;
    bench-stage)
      nvcc -std=c++17 -O2 -arch=sm_90 -Icsrc tests/cuda/bench_stage.cu csrc/transport/cuda_stage.cu \
        csrc/transport/unpack.cu csrc/common/*.cc -o /tmp/bench_stage && timeout 120 /tmp/bench_stage 2>&1 | tee "$OUT/bench_stage.txt" ;;
    smoke-host)
      TCPX_CUDA_WAIT=host timeout 100 python3 scripts/smoke_cuda.py 2 2>&1 | grep -v "^W" | tail -30 ;;
    smoke-memop)
      TCPX_CUDA_WAIT=memop timeout 100 python3 scripts/smoke_cuda.py 2 2>&1 | grep -v "^W" | tail -30 ;;
    smoke-trace)
      TCPX_DEBUG=TRACE TCPX_DEBUG_SUBSYS=TRANSPORT,COLL,C10D SMOKE_HANG_S=30 timeout 60 \
        python3 scripts/smoke_cuda.py 2 > "$OUT/smoke_trace.log" 2>&1
      grep -v "^W" "$OUT/smoke_trace.log" | head -60 ;;
    smoke)
      timeout 100 python3 scripts/smoke_cuda.py 2 2>&1 | grep -v "^W" | tail -40
      timeout 100 python3 scripts/smoke_cuda.py 4 2>&1 | grep -v "^W" | tail -30 ;;
    ddp)
      timeout 200 python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
        examples/train_digits_ddp.py --device cuda --reference nccl 2>&1 | grep -v "^W" | tail -8 ;;
    fsdp)
      timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
        examples/train_fsdp2.py --device cuda 2>&1 | grep -v "^W" | tail -14 ;;
    bench)
      bash scripts/bench_gpu.sh 2 ;;
    pytest)
      timeout 500 python3 -m pytest tests/python/test_cuda.py -x -q -ra --timeout 300 2>&1 | tail -40 ;;
  esac
done

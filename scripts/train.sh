#!/usr/bin/env bash
# The main job: DDP training of an MLP on scikit-learn's digits with 4
# processes over the tcpx backend, checked against the same run over gloo.
# Installs what it needs first (scripts/setup_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
NPROC=${NPROC:-4}
printf '\n==> torchrun --standalone --nproc-per-node %s examples/train_digits_ddp.py\n' "$NPROC"
exec python3 -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
  examples/train_digits_ddp.py "$@"

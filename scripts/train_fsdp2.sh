#!/usr/bin/env bash
# FSDP2 example: a small transformer trained with torch.distributed.fsdp.fully_shard
# on 4 processes over the tcpx backend, checked against the same training in a
# single process. Installs what it needs first (scripts/setup_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
NPROC=${NPROC:-4}
printf '\n==> torchrun --standalone --nproc-per-node %s examples/train_fsdp2.py\n' "$NPROC"
exec python3 -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
  examples/train_fsdp2.py "$@"

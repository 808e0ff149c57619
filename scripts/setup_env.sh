#!/usr/bin/env bash
# Installs what torch_tcpx needs on a fresh machine (Debian/Ubuntu, Python 3.10+)
# and builds the extension in place. Sourced by the README's two commands.
#   TCPX_SKIP_APT=1   skip apt-get (already have the Debian packages)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n==> %s\n' "$*"; }
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

if [ "${TCPX_SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null; then
  need=()
  for pkg in libgtest-dev iproute2 g++; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

PY=${PYTHON:-python3}
# torch: the pinned CPU build; an unpinned install would pull several GB of CUDA wheels.
if ! $PY -c "import torch" 2>/dev/null; then
  log "pip install torch==${TCPX_TORCH_VERSION:-2.13.0}"
  $PY -m pip install -q "torch==${TCPX_TORCH_VERSION:-2.13.0}"
fi
log "pip install build and test requirements"
$PY -m pip install -q -r requirements-dev.txt

log "build torch_tcpx (pip install --no-build-isolation -e .)"
$PY -m pip install -q --no-build-isolation -e .
$PY -c "import torch, torch_tcpx; print('torch', torch.__version__, '| torch_tcpx ready')"

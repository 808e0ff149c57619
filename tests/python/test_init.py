"""Process-group initialisation: tcp:// (the pools), env:// and torchrun, and the backend's
registration for both cpu and cuda."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from harness import RankPool
from testlib import BACKEND, check_group_usable

HERE = os.path.dirname(os.path.abspath(__file__))


def rank_registration(rank, ws, *, backend):
    assert dist.get_backend() == backend, f"default group backend is {dist.get_backend()!r}"
    devices = dist.Backend.backend_capability.get(backend.lower())
    assert devices is not None and {"cpu", "cuda"} <= set(devices), \
        f"backend {backend!r} is registered for {devices}, expected cpu and cuda"
    assert dist.get_rank() == rank and dist.get_world_size() == ws
    check_group_usable(rank, ws)
    return devices


@pytest.mark.parametrize("ws", [2, 3, 4])
def test_registered_for_cpu_and_cuda(pools, ws):
    """The default group (init_method=tcp://) uses the backend, registered for cpu and cuda."""
    pools.get(ws).run(rank_registration, backend=BACKEND)


def test_init_env():
    """init_process_group(backend, init_method='env://') works (MASTER_ADDR/PORT, RANK, ...)."""
    with RankPool(2, BACKEND, timeout_s=60, name="init-env", init="env") as pool:
        pool.run(rank_registration, backend=BACKEND)


@pytest.mark.timeout(240)
def test_torchrun():
    """Under torchrun (--standalone, 2 processes) init_process_group(backend) and ops work."""
    # The workers see the same modules as the pools' ranks (e.g. an in-place build of torch_tcpx).
    pythonpath = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    env = dict(os.environ, TCPX_TEST_BACKEND=BACKEND, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(HERE, "torchrun_worker.py")]
    try:
        proc = subprocess.run(cmd, env=env, cwd=HERE, capture_output=True, text=True,
                              timeout=180)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish within 180 s:\n{exc.stdout}\n{exc.stderr}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"torchrun exited with {proc.returncode}:\n{out[-6000:]}"
    assert out.count(": ok") == 2, f"not every worker reported ok:\n{out[-6000:]}"

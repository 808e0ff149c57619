"""Process-group initialisation: tcp:// (the pools), env:// and torchrun, and the backend's
registration for both cpu and cuda."""

from __future__ import annotations

import json
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


_INIT_ONE_RANK = """
import socket, sys, torch.distributed as dist
import torch_tcpx
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
try:
    dist.init_process_group("tcpx", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
except ValueError as e:
    print("ValueError:", e)
    sys.exit(3)
print("initialised")
"""


@pytest.mark.skipif(BACKEND != "tcpx", reason="TCPX_* configuration is tcpx's")
@pytest.mark.parametrize("env, names", [
    ({"TCPX_NSOCKS": "abc"}, ["TCPX_NSOCKS", "abc", "[1, 64]"]),
    ({"TCPX_CHUNK_BYTES": "1K"}, ["TCPX_CHUNK_BYTES", "1K"]),
    ({"TCPX_ALGO": "allreduce:tree"}, ["TCPX_ALGO", "tree"]),
    ({"TCPX_SOCKET_IFNAME": "=no-such-interface"}, ["TCPX_SOCKET_IFNAME", "no-such-interface"]),
    ({"TCPX_NET": "plugin"}, ["TCPX_NET", "plugin"]),
    ({"TCPX_CUDA_BLOCKS": "0"}, ["TCPX_CUDA_BLOCKS", "0", "[1, 64]"]),
    ({"TCPX_CUDA_HOST_BYTES": "2M"}, ["TCPX_CUDA_HOST_BYTES", "2M"]),
    ({"TCPX_SOCKET_BUFFER_BYTES": "1K"}, ["TCPX_SOCKET_BUFFER_BYTES", "1K", "4K-1G"]),
    ({"TCPX_GPU_NIC_MAP": "0=eth1"}, ["TCPX_GPU_NIC_MAP", "0=eth1", "gpu:ifname"]),
])
def test_bad_configuration_is_value_error(env, names):
    """An invalid TCPX_* setting makes init_process_group raise ValueError naming it."""
    full = dict(os.environ, **env)
    proc = subprocess.run([sys.executable, "-c", _INIT_ONE_RANK], env=full, capture_output=True,
                          text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, f"expected ValueError (exit 3), got {proc.returncode}:\n{out}"
    missing = [n for n in names if n not in out]
    assert not missing, f"the error does not name {missing}:\n{out}"


_DUMP_STATE = """
import socket, torch, torch.distributed as dist
import torch_tcpx
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
dist.init_process_group("tcpx", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
t = torch.ones(4)
dist.all_reduce(t)
dist.group.WORLD._get_backend(torch.device("cpu")).dump_state()
dist.all_reduce(t)  # the worker has looped (and logged) by now
print("sum", t.tolist())
dist.destroy_process_group()
"""


@pytest.mark.skipif(BACKEND != "tcpx", reason="dump_state() is tcpx's")
def test_dump_state_logs_what_the_worker_waits_for():
    """dump_state() logs how long ago the worker last looped, and the worker logs its state."""
    proc = subprocess.run([sys.executable, "-c", _DUMP_STATE], env=dict(os.environ),
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "sum [1.0, 1.0, 1.0, 1.0]" in out, out
    assert "worker last looped" in out, out
    assert "state: " in out, out  # no collective running, or the second all_reduce


@pytest.mark.skipif(BACKEND != "tcpx", reason="torch_tcpx.config() is tcpx's")
def test_config_lists_every_knob_once():
    """torch_tcpx.config() maps each TCPX_* knob to its effective value; knobs with a CUDA
    default of their own read 'value,cuda:value' (checked in a fresh process with none set)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCPX_")}
    code = "import json, torch_tcpx; print(json.dumps(torch_tcpx.config()))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(k.startswith("TCPX_") for k in cfg), cfg
    for knob in ("TCPX_NSOCKS", "TCPX_CHUNK_BYTES", "TCPX_BUFFERS", "TCPX_CUDA_BLOCKS",
                 "TCPX_CUDA_HOST_BYTES", "TCPX_SPIN_US", "TCPX_SOCKET_BUFFER_BYTES"):
        assert knob in cfg, cfg
    assert cfg["TCPX_NSOCKS"] == "2,cuda:16", cfg
    assert cfg["TCPX_CHUNK_BYTES"] == "524288,cuda:8388608", cfg
    assert cfg["TCPX_BUFFERS"] == "8,cuda:4", cfg
    assert cfg["TCPX_SOCKET_BUFFER_BYTES"] == "auto", cfg

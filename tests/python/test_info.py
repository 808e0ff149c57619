"""``python -m torch_tcpx.info``: devices, GPU <-> NIC pairing and configuration, or status 2 with
the reason for an invalid setting (issue 5's first command on a new cluster)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from testlib import BACKEND

pytestmark = pytest.mark.skipif(BACKEND != "tcpx", reason="torch_tcpx.info is tcpx's")


def _info(**env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("TCPX_")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "torch_tcpx.info"], env=full,
                          capture_output=True, text=True, timeout=120)


def test_info_lists_loopback_pairing_and_configuration():
    proc = _info(TCPX_SOCKET_IFNAME="lo", TCPX_NSOCKS="3")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    devices = out.split("net devices (1):")[1].split("GPU <-> NIC pairing:")[0]
    assert "lo" in devices and "127.0.0.1" in devices, out
    assert "GPU <-> NIC pairing:" in out, out
    assert "  TCPX_SOCKET_IFNAME=lo" in out and "  TCPX_NSOCKS=3,cuda:3" in out, out


@pytest.mark.parametrize("env, names", [
    ({"TCPX_SOCKET_IFNAME": "=no-such-interface"}, ["TCPX_SOCKET_IFNAME", "no-such-interface"]),
    ({"TCPX_GPU_NIC_MAP": "0=eth1"}, ["TCPX_GPU_NIC_MAP", "0=eth1"]),
    ({"TCPX_NSOCKS": "0"}, ["TCPX_NSOCKS"]),
])
def test_info_reports_invalid_settings(env, names):
    proc = _info(**env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    missing = [n for n in names if n not in proc.stderr]
    assert not missing, f"the message does not name {missing}:\n{proc.stderr}"

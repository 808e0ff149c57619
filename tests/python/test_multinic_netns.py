"""Multi-NIC striping on a two-host, four-link topology of network namespaces (issue 5, point 4).

scripts/netns_topology.sh builds two namespaces as hosts: eth0 (control: rendezvous and store,
10.77.0.1 <-> 10.77.0.2) and eth1..eth4, four veth data links limited to RATE_MBIT on the egress
of both ends (tbf).  netns_job.run_job starts torchrun (2 nodes x 2 processes) in both namespaces;
the ranks (netns_worker.py) check every collective against references they compute themselves and
time 16 MiB all_reduces (busbw = 2(n-1)/n * bytes / time, the slowest rank, median iteration).

The ring all_reduce over 2 nodes x 2 ranks crosses the links once in each direction, so its busbw
is bounded by what one direction of the links can carry: one link's rate with one interface, the
sum of the four rates with four.  The tests check that

(a) every collective is correct over four links;
(b) four links give >= 3.5 x the busbw of one link (TCPX_SOCKET_IFNAME==eth1), same link rates;
(c) with link 4 slowed to a quarter, busbw >= SLOW_LINK_FLOOR x the sum of the four rates
    (3.25 x rate), the issue's 0.85. On a 2-core VM the earliest-finish-time striping measured
    0.90-0.92 (tbf and TCP overheads leave ~0.92 at best); without it 0.81-0.90, and without any
    dynamic balance (a slow NIC holding up the messages behind its slices) 0.38-0.53.

Skipped (with the reason) without root, without ip/tc, or where ``ip netns add`` is not permitted.
The topology is always removed at the end.  Variables: TCPX_NETNS_RATE_MBIT (per-link rate,
default 200), TCPX_NETNS_NCHANNELS (TCPX_NCHANNELS of the four-link jobs; default: whatever the
environment has).  About 1-1.5 minutes on a 2-core machine (3 torchrun jobs).  By hand: ``python tests/python/netns_job.py``.
"""

from __future__ import annotations

import os

import pytest

from harness import backend_under_test
from netns_job import (DATA_IFNAMES, Topology, mbit_to_bytes_per_s, run_job, skip_reason)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

BACKEND = backend_under_test()
RATE_MBIT = int(os.environ.get("TCPX_NETNS_RATE_MBIT", "200"))
NCHANNELS = os.environ.get("TCPX_NETNS_NCHANNELS") or None
SLOW_LINK_FLOOR = 0.85  # issue 5 (docstring, docs/performance.md)
FOUR_LINKS = "=" + ",".join(DATA_IFNAMES)  # "=eth1,eth2,eth3,eth4": exact names (the '=' is global)
ONE_LINK = "=eth1"
# 16 MiB float32: at 4 x 200 Mbit/s (100 MB/s busbw) one all_reduce takes ~0.25 s, ~1 s on one link.
NBYTES = 16 << 20
WARMUP, ITERS = 2, 3

perf_only_tcpx = pytest.mark.skipif(
    BACKEND != "tcpx", reason=f"multi-NIC striping is tcpx's (backend under test: {BACKEND})")


def _mb(bps: float) -> str:
    return f"{bps / 1e6:.2f} MB/s"


@pytest.fixture(scope="module")
def topo():
    reason = skip_reason()
    if reason:
        pytest.skip(f"two-host netns topology unavailable: {reason}")
    t = Topology(f"t{os.getpid()}")
    try:
        t.up(RATE_MBIT)
        yield t
    finally:
        t.down()


def _job(topo: Topology, ifname: str, link_rates: dict | None = None, nchannels=None):
    topo.set_rates(RATE_MBIT, link_rates)
    job = run_job(topo, ifname, nchannels=nchannels, nbytes=NBYTES, warmup=WARMUP, iters=ITERS)
    print(job.describe())  # shown with -s, or under a failing test
    assert job.ok, f"the two-host job failed:\n{job.describe()}"
    if BACKEND == "tcpx":
        wanted = sorted(n.strip() for n in ifname.lstrip("=").split(","))
        for c in job.checks:
            assert sorted(c["devices"]) == wanted, \
                f"rank {c['rank']}: the socket net uses {c['devices']}, expected {wanted} " \
                f"(TCPX_SOCKET_IFNAME={ifname})"
    return job


@pytest.fixture(scope="module")
def four_link_job(topo):
    """The four-link job at the uniform rate; (a) checks its results, (b) its busbw."""
    return _job(topo, FOUR_LINKS, nchannels=NCHANNELS)


def test_collectives_over_four_links(four_link_job):
    """(a) every collective (two sizes) gives the reference result on every rank, over 4 links."""
    job = four_link_job
    assert sorted(c["rank"] for c in job.checks) == [0, 1, 2, 3], job.describe()
    assert sorted(c["node_rank"] for c in job.checks) == [0, 0, 1, 1], \
        f"ranks are not spread 2 + 2 over the two hosts:\n{job.describe()}"
    assert not job.failures, "wrong results over four links:\n" + "\n".join(job.failures)


@perf_only_tcpx
def test_four_links_vs_one(topo, four_link_job):
    """(b) all_reduce busbw over four links >= 3.5 x over one link, every link at RATE_MBIT."""
    one = _job(topo, ONE_LINK)
    four = four_link_job
    link = mbit_to_bytes_per_s(RATE_MBIT)
    four_bw, one_bw = four.busbw, one.busbw
    ratio = four_bw / one_bw
    assert ratio >= 3.5, (
        f"four links: busbw {_mb(four_bw)} (times {four.result['times_s']} s); one link: "
        f"{_mb(one_bw)} (times {one.result['times_s']} s); ratio {ratio:.2f} < 3.5; "
        f"per-link rate {RATE_MBIT} Mbit/s = {_mb(link)}, {NBYTES} bytes, "
        f"TCPX_NCHANNELS={four.result.get('nchannels')}")


@perf_only_tcpx
def test_slow_link_keeps_bandwidth(topo):
    """(c) link 4 at a quarter of the rate: busbw >= SLOW_LINK_FLOOR x the sum of the link rates."""
    slow = RATE_MBIT // 4
    rates = {k: RATE_MBIT for k in range(1, len(DATA_IFNAMES) + 1)}
    rates[len(DATA_IFNAMES)] = slow
    job = _job(topo, FOUR_LINKS, link_rates={len(DATA_IFNAMES): slow}, nchannels=NCHANNELS)
    total = sum(mbit_to_bytes_per_s(r) for r in rates.values())
    busbw = job.busbw
    print(f"slow link: busbw {_mb(busbw)} = {busbw / total:.2f} x the sum of the link rates "
          f"(issue 5 asks 0.85)")
    assert busbw >= SLOW_LINK_FLOOR * total, (
        f"busbw {_mb(busbw)} (times {job.result['times_s']} s) < {SLOW_LINK_FLOOR} x "
        f"{_mb(total)} = {_mb(SLOW_LINK_FLOOR * total)}, the sum of the link rates {rates} Mbit/s; {NBYTES} bytes, "
        f"TCPX_NCHANNELS={job.result.get('nchannels')}")

"""Two-host jobs over network namespaces (issue 5: multi-NIC striping), without pytest.

``Topology`` drives scripts/netns_topology.sh (two namespaces as hosts: eth0 for control at
10.77.0.1/.2, eth1..eth4 as rate-limited data links).  ``run_job`` starts
``torchrun --nnodes 2 --nproc-per-node 2 --node-rank R --master-addr 10.77.0.1`` inside each
namespace (``ip netns exec``), both nodes at once, with netns_worker.py as the rank program, and
returns what the ranks reported (JobResult): the per-rank collective checks and rank 0's timed
all_reduce (busbw).  Every subprocess has a timeout; a job that overruns it is killed (its
process group).

By hand (as root; builds a topology, runs one job, tears the topology down):

    python tests/python/netns_job.py --ifname =eth1,eth2,eth3,eth4 --rate 200 [--link-rate 4=50]
        [--nchannels 4] [--bytes 16M] [--iters 3] [--id myid] [--keep]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TOPOLOGY_SCRIPT = os.path.join(REPO, "scripts", "netns_topology.sh")
WORKER = os.path.join(HERE, "netns_worker.py")
MASTER_ADDR = "10.77.0.1"  # host A's eth0: rendezvous and store traffic use the control link
NLINKS = 4
DATA_IFNAMES = [f"eth{k}" for k in range(1, NLINKS + 1)]

sys.path.insert(0, HERE)
from netns_worker import CHECK_TAG, RESULT_TAG  # noqa: E402


class NetnsError(RuntimeError):
    """The topology could not be built or changed."""


def mbit_to_bytes_per_s(mbit: float) -> float:
    return mbit * 1e6 / 8


def skip_reason() -> str | None:
    """Why this machine cannot build the topology (a reason to skip), or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (euid 0)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    probe = f"tcpx-probe-{os.getpid()}"
    try:
        proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                              timeout=30)
    except subprocess.TimeoutExpired:
        return "'ip netns add' did not finish within 30 s"
    if proc.returncode != 0:
        return f"'ip netns add' is not permitted here: {(proc.stderr or proc.stdout).strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


@dataclasses.dataclass
class Topology:
    """Two namespaces built by scripts/netns_topology.sh, named after ``ident``."""

    ident: str
    ns_a: str = ""
    ns_b: str = ""
    rates_mbit: dict = dataclasses.field(default_factory=dict)  # link -> Mbit/s, as applied

    def __post_init__(self):
        self.ns_a = self.ns_a or f"tcpxA-{self.ident}"
        self.ns_b = self.ns_b or f"tcpxB-{self.ident}"

    @property
    def namespaces(self) -> tuple[str, str]:
        return self.ns_a, self.ns_b

    def _script(self, cmd: str, rates: dict | None = None, timeout: float = 60) -> str:
        env = dict(os.environ, TCPX_NETNS_A=self.ns_a, TCPX_NETNS_B=self.ns_b,
                   TCPX_NETNS_NLINKS=str(NLINKS))
        for k in range(1, NLINKS + 1):
            env.pop(f"TCPX_NETNS_RATE_MBIT_{k}", None)
        if rates is not None:
            for k, r in rates.items():
                env[f"TCPX_NETNS_RATE_MBIT_{k}"] = str(int(r))
        try:
            proc = subprocess.run(["bash", TOPOLOGY_SCRIPT, cmd, self.ident], env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise NetnsError(f"netns_topology.sh {cmd} did not finish within {timeout} s: "
                             f"{exc.stdout}{exc.stderr}") from exc
        if proc.returncode != 0:
            raise NetnsError(f"netns_topology.sh {cmd} {self.ident} failed "
                             f"(status {proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def up(self, rate_mbit: int, link_rates: dict | None = None) -> None:
        rates = self._rates(rate_mbit, link_rates)
        self._script("up", rates)
        self.rates_mbit = rates

    def set_rates(self, rate_mbit: int, link_rates: dict | None = None) -> None:
        """Every data link at ``rate_mbit``, except the links named in ``link_rates``."""
        rates = self._rates(rate_mbit, link_rates)
        if rates != self.rates_mbit:
            self._script("rates", rates)
            self.rates_mbit = rates

    def down(self) -> None:
        self._script("down")
        self.rates_mbit = {}

    def show(self) -> str:
        return self._script("show")

    @staticmethod
    def _rates(rate_mbit: int, link_rates: dict | None) -> dict:
        rates = {k: int(rate_mbit) for k in range(1, NLINKS + 1)}
        rates.update({int(k): int(v) for k, v in (link_rates or {}).items()})
        return rates


@dataclasses.dataclass
class JobResult:
    ifname: str
    rates_mbit: dict
    returncodes: list  # per node; None: killed after the timeout
    outputs: list = dataclasses.field(repr=False)  # per node: torchrun's and its ranks' output
    checks: list = dataclasses.field(repr=False)  # the ranks' TCPX_NETNS_CHECK dicts, by rank
    result: dict | None  # rank 0's TCPX_NETNS_RESULT dict
    wall_s: float
    timed_out: bool = False

    @property
    def failures(self) -> list[str]:
        return [f for c in self.checks for f in c.get("failures", [])]

    @property
    def ok(self) -> bool:
        return (not self.timed_out and all(rc == 0 for rc in self.returncodes)
                and len(self.checks) == 4 and not self.failures)

    @property
    def busbw(self) -> float:
        """Bus bandwidth in bytes/s (median iteration, slowest rank)."""
        if not self.result or "busbw_Bps" not in self.result:
            raise AssertionError(f"the job reported no timing:\n{self.describe()}")
        return float(self.result["busbw_Bps"])

    def describe(self, tail: int = 4000) -> str:
        head = (f"job TCPX_SOCKET_IFNAME={self.ifname} rates(Mbit/s)={self.rates_mbit}: "
                f"exit codes {self.returncodes}{' (timed out)' if self.timed_out else ''}, "
                f"{len(self.checks)} of 4 ranks reported, {self.wall_s:.1f} s")
        if self.failures:
            head += "\nwrong results:\n  " + "\n  ".join(self.failures)
        if self.result:
            head += f"\nresult: {json.dumps(self.result)}"
        if not self.ok:
            for node, out in enumerate(self.outputs):
                head += f"\n----- node {node} output (tail) -----\n{out[-tail:]}"
        return head


_next_port = [29500]


def run_job(topo: Topology, ifname: str, *, nchannels: int | str | None = None,
            nbytes: int = 16 << 20, warmup: int = 2, iters: int = 3,
            timeout_s: float = 120, pg_timeout_s: float = 60, port: int | None = None,
            backend: str | None = None, extra_env: dict | None = None) -> JobResult:
    """One torchrun job on both hosts at once; never raises for a failed job (see JobResult)."""
    if port is None:
        port = _next_port[0]
        _next_port[0] += 1
    backend = backend or os.environ.get("TCPX_TEST_BACKEND", "").strip() or "tcpx"
    # The ranks see the same modules as this process (e.g. an in-place build of torch_tcpx).
    pythonpath = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1",
               TCPX_TEST_BACKEND=backend, **{k: str(v) for k, v in (extra_env or {}).items()})
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
              "TCPX_SOCKET_IFNAME"):
        env.pop(k, None)
    worker_args = [WORKER, "--ifname", ifname, "--bytes", str(nbytes), "--warmup", str(warmup),
                   "--iters", str(iters), "--timeout", str(pg_timeout_s)]
    if nchannels is not None:
        worker_args += ["--nchannels", str(nchannels)]
    log_dir = tempfile.mkdtemp(prefix="tcpx-netns-job-")
    procs, logs = [], []
    start = time.monotonic()
    try:
        for node, ns in enumerate(topo.namespaces):
            cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run",
                   "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node),
                   "--master-addr", MASTER_ADDR, "--master-port", str(port),
                   "--max-restarts", "0", "--rdzv-conf", f"timeout={int(pg_timeout_s)}",
                   *worker_args]
            log = open(os.path.join(log_dir, f"node{node}.log"), "w+")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, env=env, cwd=HERE, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True))
        returncodes, timed_out = _wait_all(procs, start + timeout_s)
        wall = time.monotonic() - start
        outputs = []
        for log in logs:
            log.flush()
            log.seek(0)
            outputs.append(log.read())
    finally:
        for p in procs:
            _kill_group(p)
        for log in logs:
            log.close()
        shutil.rmtree(log_dir, ignore_errors=True)
    checks, result = {}, None
    for out in outputs:
        for line in out.splitlines():
            tag, _, payload = line.partition(" ")
            try:
                if tag == CHECK_TAG:
                    c = json.loads(payload)
                    checks[c["rank"]] = c
                elif tag == RESULT_TAG:
                    result = json.loads(payload)
            except (ValueError, KeyError):
                pass  # a line interleaved with another process's output
    return JobResult(ifname=ifname, rates_mbit=dict(topo.rates_mbit), returncodes=returncodes,
                     outputs=outputs, checks=[checks[r] for r in sorted(checks)], result=result,
                     wall_s=wall, timed_out=timed_out)


def _wait_all(procs, deadline: float, grace_s: float = 20):
    """Wait for every process until ``deadline``; once one failed, the others get ``grace_s``."""
    timed_out = False
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if any(p.returncode not in (None, 0) for p in procs):
            deadline = min(deadline, now + grace_s)
        if now >= deadline:
            timed_out = True
            break
        running = next(p for p in procs if p.returncode is None)
        try:
            running.wait(timeout=min(0.5, deadline - now))
        except subprocess.TimeoutExpired:
            pass
    killed = {i for i, p in enumerate(procs) if p.poll() is None}
    for i in killed:
        _kill_group(procs[i])
    return [None if i in killed else p.returncode for i, p in enumerate(procs)], timed_out


def _kill_group(p: subprocess.Popen) -> None:
    """End torchrun and its ranks (the session started for them), TERM first, then KILL."""
    if p.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:].upper(), 1)
    return int(s[:-1] if mult > 1 else s) * mult


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="one two-host job over a network-namespace topology")
    ap.add_argument("--ifname", default="=" + ",".join(DATA_IFNAMES))
    ap.add_argument("--rate", type=int, default=200, help="data link rate, Mbit/s")
    ap.add_argument("--link-rate", action="append", default=[], metavar="K=MBIT",
                    help="rate of link K alone (repeatable), e.g. 4=50")
    ap.add_argument("--nchannels", default=None)
    ap.add_argument("--bytes", default="16M")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--id", default=f"job{os.getpid()}")
    ap.add_argument("--keep", action="store_true", help="leave the topology up afterwards")
    ap.add_argument("--existing", action="store_true", help="use a topology that is up already")
    a = ap.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"netns_job: cannot run: {reason}", file=sys.stderr)
        return 2
    link_rates = {int(k): int(v) for k, v in (x.split("=") for x in a.link_rate)}
    topo = Topology(a.id)
    try:
        if a.existing:
            topo.set_rates(a.rate, link_rates)
        else:
            topo.up(a.rate, link_rates)
        job = run_job(topo, a.ifname, nchannels=a.nchannels, nbytes=_parse_size(a.bytes),
                      warmup=a.warmup, iters=a.iters, timeout_s=a.timeout)
    finally:
        if not a.keep and not a.existing:
            topo.down()
    print(job.describe())
    if job.result and "busbw_Bps" in job.result:
        used = [name.strip() for name in a.ifname.lstrip("=").split(",")]
        total = sum(mbit_to_bytes_per_s(job.rates_mbit[k])
                    for k in job.rates_mbit if f"eth{k}" in used)
        print(f"busbw {job.busbw / 1e6:.2f} MB/s (median of {job.result['times_s']} s); "
              f"sum of the rates of {', '.join(used)}: {total / 1e6:.2f} MB/s")
    return 0 if job.ok else 1


if __name__ == "__main__":
    sys.exit(main())

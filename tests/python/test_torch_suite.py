"""PyTorch's own c10d conformance suite (``DistributedTest._DistTestBase`` from
``torch/testing/_internal/distributed/distributed_test.py``) run against the backend under test,
on CPU, at world sizes 2 and 4.

    python -m pytest tests/python/test_torch_suite.py -s                        # CI subset (default)
    TCPX_TORCH_SUITE=full python -m pytest tests/python/test_torch_suite.py -s  # every test
    TCPX_TORCH_SUITE=off ...                                                    # skip this module
    TCPX_TEST_BACKEND=gloo ...    # the same harness over gloo: what a CPU backend can pass at all
    TCPX_TORCH_SUITE_WORLD_SIZES=2,4,8 ...   # also world size 8 (the subgroup tests need 8)
    python tests/python/test_torch_suite.py [--world-size N ...] [--mode full] [--backend gloo]
                                            [test_name ...]       # without pytest, any world size

How: one pytest test per world size runs this file as a script in a subprocess (the suite reads
BACKEND / WORLD_SIZE / INIT_METHOD / TEMP_DIR at import time).  The script imports the backend
(``torch_tcpx`` registers "tcpx"), adds it to ``DistTestCases.backend_feature`` for "plugin" (a
registered third-party backend), "subgroup" (new_group / new_subgroups) and "ddp" (DDP on CPU) --
not "gpu" or "cuda", which gate CUDA-tensor tests -- then defines
``TorchSuite(TestDistBackend, DistributedTest._DistTestBase)`` and runs it with unittest.
Each test starts its own ranks, forked from the runner: upstream's test_distributed_spawn.py
spawns them (``_spawn_processes``), which costs every rank a fresh import of torch and of the
suite, ~30 s per test on a loaded 2-core machine against ~0.5 s forked; the runner never
creates a process group or touches CUDA, so forking it is safe (TCPX_TORCH_SUITE_START=spawn
restores upstream's way).  ``common_distributed`` kills a test's ranks after
$TCPX_TORCH_SUITE_TEST_TIMEOUT seconds (default 120; upstream's longer limits for a few DDP
tests are kept) and reports it as failed ("timed out (hang)"), so a hang cannot stall the run;
the suite's process groups time out after 60 s.

Outcomes of the tests run: passed, failed (failures and errors, with the first failing rank's
one-line error), skipped (PyTorch's own skips: CUDA, gloo/nccl/mpi-only, world size).  Tests in
EXCLUDED (each with its reason) are not run and are counted as excluded.  The pytest test prints
a summary per world size -- counts and the failures grouped by error -- writes the per-test
report (JSON) and the ranks' log (paths in the summary), and fails when any test fails.

CI subset (TCPX_TORCH_SUITE=ci, the default): CI_SUBSET, every test that a third-party backend
can run on CPU at world size 2 or 4, less EXCLUDED: 66 tests (init and group queries, barrier,
broadcast, all_reduce, reduce, all_gather(_coalesced), gather, scatter, send/recv/isend/irecv
with tags and any source, DDP on CPU).  The ~220 others skip there under PyTorch's own gates:
most need CUDA devices; many are reserved by name to gloo/nccl/mpi (all_reduce_coalesced,
batch_isend_irecv, get_future, object collectives, monitored_barrier, timeouts, all_to_all;
reduce_scatter is tested on CUDA only); the subgroup tests need world size 8.  Running them
would only re-check that they skip, at about the cost of the whole CI subset, so CI leaves
them to "full", which also picks up tests that a newer torch makes runnable.  The CI subset
takes about 1.5-2.5 minutes for both world sizes on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from collections import Counter, defaultdict

import pytest

# TCPX_TORCH_SUITE_WORLD_SIZES=2,4,8 adds world size 8, where the suite's subgroup tests
# (*_group_*, on ranks 1 and 2) run; below 8 they skip.
WORLD_SIZES = tuple(int(w) for w in os.environ.get("TCPX_TORCH_SUITE_WORLD_SIZES", "2,4").split(","))
MODE_ENV = "TCPX_TORCH_SUITE"  # full | ci | off
TEST_TIMEOUT_ENV = "TCPX_TORCH_SUITE_TEST_TIMEOUT"
START_ENV = "TCPX_TORCH_SUITE_START"  # fork (default) | spawn (upstream's way, ~50x slower)
_INNER_ENV = "_TCPX_TORCH_SUITE_INNER"  # set in the per-world-size run (and so in its ranks)

# Tests that cannot pass for a reason outside the backend, or need what tcpx will never have on CPU.
EXCLUDED: dict[str, str] = {
    "test_ddp_logging_data_cpu": "expects DDP's logged backend_name == 'tcpx', but c10d's ProcessGroup "
                                 "reports 'custom' for every third-party backend (BackendType::CUSTOM)",
}

# Every test of the suite that a third-party backend can run on CPU at world size 2 or 4 (the
# others skip there: CUDA, gloo/nccl/mpi-only, or world size >= 8); see the module docstring.
CI_SUBSET: tuple[str, ...] = (
    # process groups, ranks, barrier
    "test_Backend_enum_class", "test_get_backend", "test_get_rank", "test_get_rank_size_group",
    "test_get_rank_size_full_group", "test_destroy_group", "test_destroy_full_group",
    "test_new_subgroups_with_group_param", "test_barrier", "test_barrier_full_group",
    # broadcast, all_reduce (+ complex, async, unsupported-op checks), all_reduce_coalesced
    "test_broadcast", "test_broadcast_full_group",
    "test_all_reduce_sum", "test_all_reduce_product", "test_all_reduce_min", "test_all_reduce_max",
    "test_all_reduce_full_group_sum", "test_all_reduce_full_group_product",
    "test_all_reduce_full_group_min", "test_all_reduce_full_group_max",
    "test_all_reduce_sum_async", "test_all_reduce_sum_complex",
    "test_all_reduce_complex_unsupported_ops", "test_all_reduce_coalesced_max_complex_unsupported",
    # reduce
    "test_reduce_sum", "test_reduce_product", "test_reduce_min", "test_reduce_max",
    "test_reduce_full_group_sum", "test_reduce_full_group_product", "test_reduce_full_group_min",
    "test_reduce_full_group_max", "test_reduce_sum_twice",
    # all_gather, all_gather_coalesced, gather, scatter
    "test_all_gather", "test_all_gather_complex", "test_all_gather_full_group",
    "test_all_gather_coalesced_simple", "test_all_gather_coalesced_complex",
    "test_all_gather_coalesced_full_group", "test_all_gather_coalesced_with_empty",
    "test_gather", "test_gather_checks", "test_gather_full_group",
    "test_scatter", "test_scatter_checks", "test_scatter_complex", "test_scatter_full_group",
    # point-to-point (tags, any source, isend/irecv; under the autograd and torch profilers)
    "test_send_recv", "test_send_recv_autograd_profiler", "test_send_recv_torch_profiler",
    "test_send_recv_with_tag", "test_send_recv_with_tag_autograd_profiler",
    "test_send_recv_with_tag_torch_profiler", "test_send_recv_any_source",
    "test_send_recv_any_source_autograd_profiler", "test_send_recv_any_source_torch_profiler",
    "test_isend", "test_isend_autograd_profiler", "test_isend_torch_profiler", "test_irecv",
    # DistributedDataParallel on CPU
    "test_DistributedDataParallelCPU", "test_DistributedDataParallelCPU_grad_is_view",
    "test_DistributedDataParallel_requires_grad", "test_ddp_create_graph",
    "test_static_graph_api_cpu", "test_dump_DDP_relevant_env_vars",
)
assert not set(CI_SUBSET) & set(EXCLUDED)


def _mode() -> str:
    mode = os.environ.get(MODE_ENV, "ci").strip().lower() or "ci"
    if mode not in ("full", "ci", "off"):
        raise ValueError(f"{MODE_ENV}={mode!r}: expected full, ci or off")
    return mode


# ---------------------------------------------------------------------------------------------
# The per-world-size run: module-level so that spawned ranks (which import this file as their
# __main__) find the test class too.
# ---------------------------------------------------------------------------------------------

if os.environ.get(_INNER_ENV):
    import torch.multiprocessing as mp

    if os.environ["BACKEND"] == "tcpx":
        import torch_tcpx  # noqa: F401  (registers "tcpx")
    from torch.testing._internal.common_distributed import DistTestCases

    # "plugin": a registered third-party backend (require_backend_is_available); "subgroup":
    # new_group/new_subgroups and the model averagers; "ddp": DDP tests (on CPU where they
    # allow it).  Not "gpu"/"cuda" (CUDA tensors), nor DistTestCases.skip_collective (which
    # would skip the tests of a collective instead of letting them fail).
    if os.environ["BACKEND"] not in ("gloo", "nccl", "ucc", "mpi"):
        for _feature in ("plugin", "subgroup", "ddp"):
            DistTestCases.backend_feature[_feature].add(os.environ["BACKEND"])

    from torch.testing._internal.distributed.distributed_test import (
        DistributedTest,
        TestDistBackend,
    )

    class TorchSuite(TestDistBackend, DistributedTest._DistTestBase):
        def setUp(self):
            super().setUp()
            if os.environ.get(START_ENV, "fork") == "spawn":
                self._spawn_processes()
            else:
                self._start_processes(mp.get_context("fork").Process)


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Timeout|Failure)\b.*)$")


def _one_line(text: str) -> str:
    """The one-line error of a failed test: the first failing rank's exception line."""
    if "terminated or timed out" in text:
        m = re.search(r"Process \d+ terminated or timed out after [\d.]+ seconds", text)
        return f"timed out (hang): {m.group(0) if m else 'ranks killed'}"
    m = re.search(r"Expected exit code (\d+) but got (-?\d+)", text)
    if m:
        return f"rank exited with code {m.group(2)} (expected {m.group(1)}; crash or kill)"
    # torch re-raises the ranks' tracebacks in one RuntimeError: take the first rank's block.
    blocks = re.split(r"Process \d+ exited with error code \d+ and exception:\n", text)
    block = blocks[1] if len(blocks) > 1 else text
    lines = [ln for ln in block.splitlines() if _ERROR_LINE.match(ln)]
    lines = lines or block.strip().splitlines() or ["(no error text)"]
    return lines[-1].strip()[:300]


def cause_of(error: str) -> str:
    """The grouping key of a failure: the error line without numbers, ranks and paths."""
    key = re.sub(r"/\S+", "<path>", error)
    key = re.sub(r"\d+(\.\d+)?", "N", key)
    return key[:160]


class _Recorder(unittest.TextTestResult):
    """Records outcome, seconds and the one-line error of each test; prints a line per test."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[dict] = []

    def startTest(self, test):
        self._t0 = time.monotonic()
        super().startTest(test)

    def _record(self, test, outcome, detail=""):
        name = test.id().split(".")[-1]
        secs = round(time.monotonic() - self._t0, 1)
        self.records.append({"test": name, "outcome": outcome, "seconds": secs, "detail": detail})
        print(f"[torch-suite] {name} {outcome} {secs}s {detail}", flush=True)

    def addSuccess(self, test):
        super().addSuccess(test)
        self._record(test, "passed")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._record(test, "failed", _one_line(self._exc_info_to_string(err, test)))

    def addError(self, test, err):
        super().addError(test, err)
        self._record(test, "failed", _one_line(self._exc_info_to_string(err, test)))

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._record(test, "skipped", str(reason).splitlines()[0][:200] if reason else "")

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._record(test, "passed", "expected failure")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._record(test, "failed", "unexpected success")


def _inner_main(argv: list[str]) -> int:
    """Runs the suite for one world size (environment set by _launch); writes the JSON report."""
    p = argparse.ArgumentParser()
    p.add_argument("--report", required=True)
    p.add_argument("--mode", default="ci", choices=("full", "ci"))
    p.add_argument("tests", nargs="*")
    args = p.parse_args(argv)
    all_tests = sorted(unittest.TestLoader().getTestCaseNames(TorchSuite))
    unknown = [t for t in (*args.tests, *EXCLUDED, *CI_SUBSET) if t not in all_tests]
    if unknown:
        raise SystemExit(f"not tests of this torch's suite: {unknown}")
    if args.tests:
        names = list(args.tests)
    elif args.mode == "ci":
        names = list(CI_SUBSET)
    else:
        names = all_tests
    excluded = sorted(t for t in names if t in EXCLUDED)
    names = [t for t in names if t not in EXCLUDED]
    suite = unittest.TestSuite(TorchSuite(t) for t in names)
    t0 = time.monotonic()
    result = unittest.TextTestRunner(resultclass=_Recorder, verbosity=0, stream=sys.stderr).run(suite)
    report = {
        "backend": os.environ["BACKEND"],
        "world_size": int(os.environ["WORLD_SIZE"]),
        "mode": "selected" if args.tests else args.mode,
        "suite_size": len(all_tests),
        "seconds": round(time.monotonic() - t0, 1),
        "results": result.records,
        "excluded": {t: EXCLUDED[t] for t in excluded},
    }
    with open(args.report, "w") as f:
        json.dump(report, f, indent=1)
    return 0


# ---------------------------------------------------------------------------------------------
# The pytest side: one test per world size.
# ---------------------------------------------------------------------------------------------


def _backend() -> str:
    return os.environ.get("TCPX_TEST_BACKEND", "").strip() or "tcpx"


def _launch(world_size: int, backend: str, mode: str, out_dir: str, tests=(),
            timeout_s: float | None = None) -> tuple[dict | None, str]:
    """Runs this file as a script for one world size; returns (report or None, log path)."""
    tmp = tempfile.mkdtemp(prefix=f"ws{world_size}-", dir=out_dir)
    for sub in ("barrier", "test_dir"):
        os.mkdir(os.path.join(tmp, sub))
    env = dict(os.environ)
    env.update({
        _INNER_ENV: "1",
        "BACKEND": backend,
        "WORLD_SIZE": str(world_size),
        "TEMP_DIR": tmp,
        "INIT_METHOD": f"file://{tmp}/shared_init_file",
        "DISTRIBUTED_TESTS_DEFAULT_TIMEOUT": os.environ.get(TEST_TIMEOUT_ENV, "120"),
    })
    spec = importlib.util.find_spec("torch_tcpx") if backend == "tcpx" else None
    if spec is not None and spec.origin:  # the ranks import the same torch_tcpx as pytest would
        pkg_root = os.path.dirname(os.path.dirname(spec.origin))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
    report_path = os.path.join(out_dir, f"report-{backend}-ws{world_size}.json")
    log_path = os.path.join(out_dir, f"log-{backend}-ws{world_size}.txt")
    if os.path.exists(report_path):
        os.remove(report_path)
    cmd = [sys.executable, os.path.abspath(__file__), "--report", report_path, "--mode", mode, *tests]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the runner and the ranks it started
            proc.wait()
    if not os.path.exists(report_path):
        return None, log_path
    with open(report_path) as f:
        return json.load(f), log_path


def summarize(report: dict) -> tuple[str, int]:
    """A printable summary of one run and its number of failed tests."""
    by = defaultdict(list)
    for r in report["results"]:
        by[r["outcome"]].append(r)
    failed = by["failed"]
    lines = [
        f"torch suite, backend {report['backend']}, world size {report['world_size']}, "
        f"mode {report['mode']}: {len(report['results'])} of {report['suite_size']} tests run, "
        f"{len(by['passed'])} passed, {len(failed)} failed, {len(by['skipped'])} skipped, {len(report['excluded'])} excluded "
        f"({report['seconds']:.0f} s)"
    ]
    causes = Counter(cause_of(r["detail"]) for r in failed)
    for cause, n in causes.most_common():
        names = [r["test"] for r in failed if cause_of(r["detail"]) == cause]
        lines.append(f"  {n:3d} x {cause}\n        " + " ".join(names))
    return "\n".join(lines), len(failed)


def _outer_timeout(mode: str) -> int:
    return 1200 if mode == "ci" else 6 * 3600


@pytest.mark.skipif(_mode() == "off", reason=f"{MODE_ENV}=off")
@pytest.mark.timeout(_outer_timeout(_mode()) + 120)
@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda ws: f"ws{ws}")
def test_torch_suite(world_size, capsys):
    mode, backend = _mode(), _backend()
    out_dir = tempfile.mkdtemp(prefix=f"tcpx-torch-suite-{backend}-ws{world_size}-")
    report, log_path = _launch(world_size, backend, mode, out_dir, timeout_s=_outer_timeout(mode))
    if report is None:
        with open(log_path) as f:
            tail = f.read()[-4000:]
        pytest.fail(f"the suite run wrote no report (crash or overall timeout); log {log_path}:\n"
                    f"{tail}", pytrace=False)
    text, n_failed = summarize(report)
    with capsys.disabled():
        print(f"\n{text}\n  report: {out_dir}/report-{backend}-ws{world_size}.json  log: {log_path}")
    assert n_failed == 0, f"{n_failed} tests failed (summary above)"


def main(argv: list[str]) -> int:
    """Script entry: the per-world-size run (inner), or a convenience run of both world sizes."""
    if os.environ.get(_INNER_ENV):
        return _inner_main(argv)
    p = argparse.ArgumentParser(description="Run PyTorch's distributed_test suite over a backend.")
    p.add_argument("--world-size", type=int, action="append", help="default: 2 and 4")
    p.add_argument("--backend", default=_backend())
    p.add_argument("--mode", default="ci", choices=("full", "ci"))
    p.add_argument("--out", default=None, help="directory for reports and logs")
    p.add_argument("tests", nargs="*")
    args = p.parse_args(argv)
    out_dir = args.out or tempfile.mkdtemp(prefix=f"tcpx-torch-suite-{args.backend}-")
    os.makedirs(out_dir, exist_ok=True)
    n_failed = 0
    for ws in args.world_size or WORLD_SIZES:
        report, log_path = _launch(ws, args.backend, args.mode, out_dir, tests=args.tests)
        if report is None:
            print(f"world size {ws}: no report; see {log_path}")
            n_failed += 1
            continue
        text, n = summarize(report)
        print(f"{text}\n  log: {log_path}", flush=True)
        n_failed += n
    print(f"reports in {out_dir}")
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

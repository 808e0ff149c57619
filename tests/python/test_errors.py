"""Errors: bad arguments (ValueError), ranks that disagree on a collective ("mismatch"), unsupported
devices, invalid peers and a peer that dies.  Every case that keeps its group checks afterwards
that a correct collective still works on all ranks."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from harness import RankPool
from testlib import (BACKEND, check_group_usable, dtype_aliases, expect_raises, maybe_skip_gloo,
                     skip_if_gloo)


# ---------------------------------------------------------------------------------------------
# bad arguments: ValueError naming the argument, group usable afterwards
# ---------------------------------------------------------------------------------------------

def _bad_argument_call(case, rank, ws):
    """(callable, names one of which the message must contain, accepted exception types)."""
    n = 1023
    x = torch.ones(n)
    value_error = (ValueError,)
    if case == "all_reduce-float32-BAND":
        return (lambda: dist.all_reduce(x, op=dist.ReduceOp.BAND),
                ["BAND", *dtype_aliases(torch.float32)], value_error)
    if case == "all_reduce-int32-PREMUL_SUM":
        t = torch.ones(n, dtype=torch.int32)
        return (lambda: dist.all_reduce(t, op=dist._make_nccl_premul_sum(2.0)),
                ["PREMUL", *dtype_aliases(torch.int32)], value_error)
    if case == "all_reduce-bool-AVG":
        t = torch.ones(n, dtype=torch.bool)
        return (lambda: dist.all_reduce(t, op=dist.ReduceOp.AVG),
                ["AVG", *dtype_aliases(torch.bool)], value_error)
    if case == "all_reduce-unsupported-dtype-float8":
        t = torch.zeros(n, dtype=torch.float8_e4m3fn)
        return (lambda: dist.all_reduce(t), ["float8", "Float8", "dtype", "type"], value_error)
    if case == "all_gather_into_tensor-output-too-big":
        out = torch.zeros(ws * n + 1)
        return (lambda: dist.all_gather_into_tensor(out, x),
                ["output", "size", "numel", "shape"], value_error)
    if case == "all_gather_into_tensor-output-dtype":
        out = torch.zeros(ws * n, dtype=torch.float64)
        return (lambda: dist.all_gather_into_tensor(out, x), ["dtype", "type"], value_error)
    if case == "all_gather-list-too-short":
        outs = [torch.zeros(n) for _ in range(ws - 1)]
        return (lambda: dist.all_gather(outs, x), ["output", "list", "length", "size"],
                value_error)
    if case == "all_gather-output-wrong-size":
        outs = [torch.zeros(n) for _ in range(ws - 1)] + [torch.zeros(n + 1)]
        return (lambda: dist.all_gather(outs, x), ["output", "size", "numel", "shape"],
                value_error)
    if case == "broadcast-root-out-of-range":
        # torch may reject this before the backend does: ValueError or RuntimeError.
        return (lambda: dist.broadcast(x, src=ws + 3), ["src", "root", "rank"],
                (ValueError, RuntimeError))
    raise ValueError(case)


BAD_ARGUMENT_CASES = [
    "all_reduce-float32-BAND",
    "all_reduce-int32-PREMUL_SUM",
    "all_reduce-bool-AVG",
    "all_reduce-unsupported-dtype-float8",
    "all_gather_into_tensor-output-too-big",
    "all_gather_into_tensor-output-dtype",
    "all_gather-list-too-short",
    "all_gather-output-wrong-size",
    "broadcast-root-out-of-range",
]


def rank_bad_argument(rank, ws, *, case):
    call, names, accepted = _bad_argument_call(case, rank, ws)
    result = expect_raises(call, accepted, names)
    check_group_usable(rank, ws, f"{result[0]} {result[1]!r}")
    return result


@pytest.mark.parametrize("case", BAD_ARGUMENT_CASES)
@pytest.mark.parametrize("ws", [2, 3])
def test_bad_argument(pools, ws, case):
    """A bad argument raises ValueError naming it, on every rank, and the group stays usable."""
    if case != "broadcast-root-out-of-range":
        maybe_skip_gloo("raises RuntimeError (not ValueError) for bad arguments")
    pools.get(ws).run(rank_bad_argument, timeout=60, case=case)


# ---------------------------------------------------------------------------------------------
# ranks that disagree about a collective
# ---------------------------------------------------------------------------------------------

MISMATCH_CASES = [
    "all_reduce-numel-1023-vs-1024",
    "all_reduce-numel-1MiB-vs-1MiB+4KiB",
    "all_reduce-numel-0-vs-8",
    "all_reduce-dtype-float32-vs-int32",
    "all_reduce-dtype-float32-vs-float64",
    "broadcast-numel",
    "broadcast-dtype-float32-vs-int32",
    "all_gather_into_tensor-numel",
    "all_gather-numel",
]


def rank_mismatch(rank, ws, *, case):
    odd = rank == ws - 1  # the last rank disagrees with the others
    if case.startswith("all_reduce-numel"):
        n = {"all_reduce-numel-1023-vs-1024": (1023, 1024),
             "all_reduce-numel-1MiB-vs-1MiB+4KiB": ((1 << 18) + 3, (1 << 18) + 3 + 1024),
             "all_reduce-numel-0-vs-8": (8, 0)}[case][odd]
        call = lambda: dist.all_reduce(torch.ones(n))  # noqa: E731
    elif case == "all_reduce-dtype-float32-vs-int32":  # same byte count, different dtype
        t = torch.ones(1023, dtype=torch.int32 if odd else torch.float32)
        call = lambda: dist.all_reduce(t)  # noqa: E731
    elif case == "all_reduce-dtype-float32-vs-float64":
        t = torch.ones(1023, dtype=torch.float64 if odd else torch.float32)
        call = lambda: dist.all_reduce(t)  # noqa: E731
    elif case == "broadcast-numel":
        t = torch.ones(1023 + odd)
        call = lambda: dist.broadcast(t, src=0)  # noqa: E731
    elif case == "broadcast-dtype-float32-vs-int32":
        t = torch.ones(1023, dtype=torch.int32 if odd else torch.float32)
        call = lambda: dist.broadcast(t, src=0)  # noqa: E731
    elif case == "all_gather_into_tensor-numel":
        n = 1023 + odd
        out = torch.zeros(ws * n)
        call = lambda: dist.all_gather_into_tensor(out, torch.ones(n))  # noqa: E731
    elif case == "all_gather-numel":
        n = 1023 + odd
        outs = [torch.zeros(n) for _ in range(ws)]
        call = lambda: dist.all_gather(outs, torch.ones(n))  # noqa: E731
    else:
        raise ValueError(case)
    start = time.monotonic()
    try:
        call()
    except RuntimeError as exc:
        outcome = ("RuntimeError", type(exc).__name__, str(exc), time.monotonic() - start)
    except Exception as exc:  # noqa: BLE001
        outcome = ("other", type(exc).__name__, str(exc), time.monotonic() - start)
    else:
        outcome = ("nothing", "", "", time.monotonic() - start)
    usable = True
    try:
        check_group_usable(rank, ws, "a mismatch")
    except Exception as exc:  # noqa: BLE001
        usable = f"{type(exc).__name__}: {exc}"
    return outcome, usable


@skip_if_gloo("no detection of ranks that disagree on a collective's size or dtype")
@pytest.mark.parametrize("case", MISMATCH_CASES)
@pytest.mark.parametrize("ws", [2, 3])
def test_mismatch(pools, ws, case):
    """Ranks that disagree on size/dtype get RuntimeError('...mismatch...') (every rank for
    all_reduce/all_gather; for broadcast the rank that disagrees with the root); group still works."""
    results = pools.get(ws).run(rank_mismatch, timeout=45, case=case)
    problems = []
    for rank, ((kind, exc_type, msg, elapsed), usable) in enumerate(results):
        # A broadcast root only sends, and ranks that agree with it receive
        # exactly what they expect: neither can see the disagreement without
        # an acknowledgement round trip (gloo and NCCL do not detect it either).
        # They may complete (their data is right); the disagreeing rank must fail.
        agrees_with_root = case.startswith("broadcast") and rank != ws - 1
        if agrees_with_root and kind == "nothing":
            pass
        elif kind != "RuntimeError":
            problems.append(f"rank {rank}: expected RuntimeError, got {kind} {exc_type} {msg!r}")
        elif "mismatch" not in msg.lower():
            problems.append(f"rank {rank}: {exc_type} does not say 'mismatch': {msg!r}")
        if usable is not True:
            problems.append(f"rank {rank}: group unusable afterwards: {usable}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# unsupported device
# ---------------------------------------------------------------------------------------------

def rank_meta_backend_direct(rank, ws):
    # torch (2.13) routes c10d ops on meta tensors to Python meta kernels that return a FakeWork
    # without reaching any backend, so the backend's device check is called directly here.
    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.SUM
    try:
        backend.allreduce([torch.ones(8, device="meta")], opts).wait()
    except (ValueError, RuntimeError) as exc:
        assert "meta" in str(exc).lower(), f"error does not name the device: {exc}"
        msg = f"{type(exc).__name__}: {exc}"
    else:
        raise AssertionError("allreduce of a meta tensor (backend called directly) did not raise")
    check_group_usable(rank, ws, msg)
    return msg


@pytest.mark.parametrize("ws", [2])
def test_meta_device_rejected_by_backend(pools, ws):
    """The backend rejects a tensor on the meta device with an error naming the device."""
    pools.get(ws).run(rank_meta_backend_direct, timeout=60)


def rank_meta_public_api(rank, ws):
    try:
        work = dist.all_reduce(torch.ones(8, device="meta"), async_op=True)
        if work is not None:
            work.wait()
        outcome = f"accepted ({type(work).__name__})"
    except (ValueError, RuntimeError) as exc:
        assert "meta" in str(exc).lower(), f"error does not name the device: {exc}"
        outcome = f"{type(exc).__name__}: {exc}"
    check_group_usable(rank, ws, "an all_reduce on a meta tensor")
    return outcome


@pytest.mark.parametrize("ws", [2])
def test_meta_device_public_api(pools, ws):
    """all_reduce on a meta tensor raises naming 'meta' or torch absorbs it; the group survives."""
    # torch 2.13 registers Python meta kernels for the c10d ops (FakeWork), so the call may never
    # reach the backend; test_meta_device_rejected_by_backend checks the backend's own check.
    pools.get(ws).run(rank_meta_public_api, timeout=60)


# ---------------------------------------------------------------------------------------------
# invalid peer ranks
# ---------------------------------------------------------------------------------------------

def rank_invalid_peer(rank, ws, *, call):
    bad = ws + 3
    t = torch.ones(16)
    start = time.monotonic()
    try:
        if call == "send":
            dist.send(t, dst=bad)
        elif call == "recv":
            dist.recv(t, src=bad)
        elif call == "isend":
            dist.isend(t, dst=bad).wait()
        elif call == "irecv":
            dist.irecv(t, src=bad).wait()
    except (ValueError, RuntimeError) as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"{call} to/from rank {bad}: expected ValueError or RuntimeError, "
                             f"got {type(exc).__name__}: {exc}") from exc
    else:
        raise AssertionError(f"{call} to/from rank {bad} of {ws} did not raise")
    elapsed = time.monotonic() - start
    assert elapsed < 10, f"{call} to/from an invalid rank took {elapsed:.1f} s to fail"
    check_group_usable(rank, ws, outcome)
    return outcome


@skip_if_gloo("waits for the invalid peer's store key until the store timeout before failing")
@pytest.mark.parametrize("call", ["send", "recv", "isend", "irecv"])
def test_invalid_peer_rank(pools, call):
    """send/recv with a peer rank outside the group fails fast and leaves the group usable."""
    pools.get(2).run(rank_invalid_peer, timeout=60, call=call)


# ---------------------------------------------------------------------------------------------
# a peer that dies
# ---------------------------------------------------------------------------------------------

PEER_DEATH_TIMEOUT_S = 10
VICTIM = 2


def rank_peer_death(rank, ws, *, mode):
    n = (16 << 20) // 4
    if rank == VICTIM:
        if mode == "mid_op":
            dist.all_reduce(torch.ones(n), async_op=True)
        elif mode == "before_join":
            time.sleep(1.0)  # the others are already inside the collective
        os._exit(17)
    if mode == "after_death":
        time.sleep(2.0)  # the victim is gone before the collective starts
    start = time.monotonic()
    try:
        if mode == "mid_op":  # the failure surfaces from Work.wait()
            dist.all_reduce(torch.ones(n), async_op=True).wait()
        else:  # ... or from the blocking call
            dist.all_reduce(torch.ones(n))
    except RuntimeError as exc:
        return ("RuntimeError", type(exc).__name__,
                isinstance(exc, dist.DistBackendError), str(exc)[:500],
                time.monotonic() - start)
    except Exception as exc:  # noqa: BLE001
        return ("other", type(exc).__name__, False, str(exc)[:500], time.monotonic() - start)
    return ("nothing", "", False, "", time.monotonic() - start)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["before_join", "mid_op", "after_death"])
def test_peer_death(mode):
    """A rank dying (os._exit) makes the others' all_reduce raise RuntimeError in the timeout."""
    # Own pool with timeout=10 s.  before_join: the victim dies while the others wait in the
    # collective; mid_op: it dies right after issuing it (the others see the error from wait());
    # after_death: it is gone before the others start.
    with RankPool(3, BACKEND, timeout_s=PEER_DEATH_TIMEOUT_S, name=f"peer-death-{mode}") as pool:
        results = pool.run_raw(rank_peer_death, timeout=90, allow_exit=(VICTIM,),
                               error_grace_s=None, mode=mode)
        pool.mark_broken("a rank was killed on purpose", keep_logs=False)
    assert results[VICTIM].status == "exited", f"the victim did not exit: {results[VICTIM]}"
    problems = []
    for r in results:
        if r.rank == VICTIM:
            continue
        if r.status != "ok":
            problems.append(f"rank {r.rank}: rank function failed: {r.exc_type}: {r.message}")
            continue
        kind, exc_type, is_backend_error, msg, elapsed = r.value
        if kind != "RuntimeError":
            problems.append(f"rank {r.rank}: expected RuntimeError, got {kind} {exc_type} "
                            f"{msg!r} after {elapsed:.1f} s")
        # "within the group's timeout", plus slack for a loaded 2-core machine
        elif elapsed > PEER_DEATH_TIMEOUT_S + 8:
            problems.append(f"rank {r.rank}: error only after {elapsed:.1f} s "
                            f"(timeout {PEER_DEATH_TIMEOUT_S} s): {exc_type}: {msg!r}")
    assert not problems, "\n".join(problems)


GROUP_TIMEOUT_S = 5.0


def rank_missing_peer(rank, ws, *, absent):
    """Every rank but `absent` runs an all_reduce that `absent` never joins."""
    if rank == absent:
        return ("absent", "", "", 0.0)
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1000))
    except RuntimeError as exc:
        return ("RuntimeError", type(exc).__name__, str(exc)[:500], time.monotonic() - start)
    except Exception as exc:  # noqa: BLE001
        return ("other", type(exc).__name__, str(exc)[:500], time.monotonic() - start)
    return ("nothing", "", "", time.monotonic() - start)


@skip_if_gloo("gloo's timeout message differs; the property is tcpx's")
@pytest.mark.timeout(120)
def test_group_timeout_honoured():
    """A collective that a rank never joins fails with a timeout error after the group's timeout."""
    with RankPool(3, BACKEND, timeout_s=GROUP_TIMEOUT_S, name="group-timeout") as pool:
        results = pool.run_raw(rank_missing_peer, timeout=90, error_grace_s=None, absent=2)
        pool.mark_broken("the group was aborted on purpose", keep_logs=False)
    problems = []
    for r in results:
        if r.rank == 2:
            continue
        if r.status != "ok":
            problems.append(f"rank {r.rank}: rank function failed: {r.exc_type}: {r.message}")
            continue
        kind, exc_type, msg, elapsed = r.value
        if kind != "RuntimeError" or "timed out" not in msg:
            problems.append(f"rank {r.rank}: expected a 'timed out' RuntimeError, got {kind} "
                            f"{exc_type} {msg!r}")
        # Not before the timeout, and not long after it (slack for a loaded machine; the
        # rank that times out first aborts, which fails its neighbours at once).
        elif not (GROUP_TIMEOUT_S * 0.5 <= elapsed <= GROUP_TIMEOUT_S + 8):
            problems.append(f"rank {r.rank}: error after {elapsed:.1f} s, timeout "
                            f"{GROUP_TIMEOUT_S} s: {msg!r}")
    assert not problems, "\n".join(problems)

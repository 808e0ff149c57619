"""Work and Future semantics: future values, callbacks, issue order, wait(timeout), errors."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from harness import RankPool
from testlib import (BACKEND, assert_equal, case_seed, check_all_reduce, check_group_usable,
                     gen_input, maybe_skip_gloo, skip_if_gloo)


def _value_list(fut, ctx):
    vals = fut.value()
    if not isinstance(vals, list) or not all(isinstance(v, torch.Tensor) for v in vals):
        raise AssertionError(f"{ctx}: future value is {type(vals).__name__} {vals!r}, "
                             f"expected a list of tensors")
    return vals


def rank_future_values(rank, ws, *, op, seed):
    n = 1023
    ctx = f"rank {rank} {op}"
    if op == "all_reduce":
        t = gen_input(seed, rank, "float32", n, "small")
        work = dist.all_reduce(t, async_op=True)
        fut = work.get_future()
        doubled = fut.then(lambda f: f.value()[0] * 2)  # what DDP comm hooks do
        waited = fut.wait()
        vals = _value_list(fut, ctx)
        assert isinstance(waited, list) and len(waited) == 1 and len(vals) == 1, \
            f"{ctx}: expected [tensor], got wait()={waited!r} value()={vals!r}"
        assert vals[0].data_ptr() == t.data_ptr(), f"{ctx}: future value is not the user's tensor"
        inputs = [gen_input(seed, r, "float32", n, "small") for r in range(ws)]
        check_all_reduce(vals[0], inputs, ws, "float32", "SUM", None, True, ctx)
        check_all_reduce(doubled.wait() / 2, inputs, ws, "float32", "SUM", None, True,
                         ctx + " then() callback")
    elif op == "broadcast":
        t = gen_input(seed, rank, "float32", n, "randn")
        work = dist.broadcast(t, src=ws - 1, async_op=True)
        vals = work.get_future().wait()
        assert isinstance(vals, list) and len(vals) == 1, f"{ctx}: value {vals!r}"
        assert_equal(vals[0], gen_input(seed, ws - 1, "float32", n, "randn"), ctx)
        assert vals[0].data_ptr() == t.data_ptr(), f"{ctx}: future value is not the user's tensor"
    elif op == "all_gather":
        x = gen_input(seed, rank, "int64", n, "int_full")
        outs = [torch.zeros(n, dtype=torch.int64) for _ in range(ws)]
        work = dist.all_gather(outs, x, async_op=True)
        work.get_future().wait()
        vals = _value_list(work.get_future(), ctx)
        assert len(vals) == ws, f"{ctx}: expected {ws} output tensors, got {len(vals)}"
        for r in range(ws):
            assert_equal(vals[r], gen_input(seed, r, "int64", n, "int_full"), f"{ctx} value[{r}]")
            assert_equal(outs[r], vals[r], f"{ctx} output[{r}] vs value[{r}]")
    elif op == "all_gather_into_tensor":
        x = gen_input(seed, rank, "bfloat16", n, "randn")
        out = torch.zeros(ws * n, dtype=torch.bfloat16)
        work = dist.all_gather_into_tensor(out, x, async_op=True)
        work.get_future().wait()
        vals = _value_list(work.get_future(), ctx)
        expected = torch.cat([gen_input(seed, r, "bfloat16", n, "randn") for r in range(ws)])
        assert_equal(out, expected, ctx)
        # Accepted forms: [output] (as NCCL) or the output's per-rank blocks (as gloo).
        got = vals[0] if len(vals) == 1 else torch.cat([v.reshape(-1) for v in vals])
        assert_equal(got.reshape(-1), expected, ctx + " future value")
    elif op == "barrier":
        work = dist.barrier(async_op=True)
        vals = work.get_future().wait()
        assert isinstance(vals, list), f"{ctx}: value {vals!r}"
    elif op == "isend_irecv":
        peer = rank ^ 1
        if peer < ws:
            send = gen_input(seed, rank, "float32", n, "randn")
            recv = torch.zeros(n)
            w_send = dist.isend(send, dst=peer)
            w_recv = dist.irecv(recv, src=peer)
            vals = w_recv.get_future().wait()
            assert isinstance(vals, list) and len(vals) == 1, f"{ctx}: irecv value {vals!r}"
            assert_equal(vals[0], gen_input(seed, peer, "float32", n, "randn"), ctx + " irecv")
            sent = w_send.get_future().wait()
            assert isinstance(sent, list), f"{ctx}: isend value {sent!r}"
            assert_equal(recv, vals[0], ctx + " irecv buffer")
    else:
        raise ValueError(op)
    # wait() after completion returns at once, and more than once.
    if op != "isend_irecv" or (rank ^ 1) < ws:
        work = work if op != "isend_irecv" else w_recv
        work.wait()
        work.wait()
        assert work.is_completed(), f"{ctx}: is_completed() is False after wait()"


FUTURE_OPS = ["all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "barrier",
              "isend_irecv"]


@pytest.mark.parametrize("op", FUTURE_OPS)
@pytest.mark.parametrize("ws", [2, 3])
def test_future_value(pools, ws, op):
    """get_future().wait()/.value() give the op's output tensors; then() chains; wait() repeats."""
    maybe_skip_gloo("send/recv Work has no Future ('Work::getFuture not implemented')"
                    if op == "isend_irecv" else None)
    pools.get(ws).run(rank_future_values, op=op, seed=case_seed("future", ws, op))


def _thread_name():
    import threading
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def rank_callbacks_off_network_thread(rank, ws, *, seed):
    # get_future() races with completion: whichever wins, a callback must not
    # run on the backend's network thread (a blocking callback would stall it).
    names, works = [], []
    for i in range(200):
        t = torch.full((4,), float(rank + i))
        w = dist.all_reduce(t, async_op=True)
        if i % 2:
            time.sleep(0)  # let some complete before get_future()
        w.get_future().then(lambda f: names.append(_thread_name()))
        works.append((w, t, i))
    for w, t, i in works:
        w.wait()
        assert_equal(t, torch.full((4,), float(sum(range(ws)) + ws * i)), f"rank {rank} op {i}")
    deadline = time.monotonic() + 30
    while len(names) < len(works) and time.monotonic() < deadline:
        time.sleep(0.01)  # callbacks of completed futures finish on their threads
    assert len(names) == len(works), f"{len(names)} of {len(works)} callbacks ran"
    bad = [n for n in names if n.startswith("tcpx-worker")]
    assert not bad, f"{len(bad)} callbacks ran on the network thread: {sorted(set(bad))}"


@skip_if_gloo("thread names are tcpx's")
@pytest.mark.parametrize("ws", [2])
def test_future_callbacks_never_run_on_the_network_thread(pools, ws):
    """A then() callback runs on a completion thread or the caller's, never on the worker."""
    pools.get(ws).run(rank_callbacks_off_network_thread, seed=case_seed("callbacks", ws))


# ---------------------------------------------------------------------------------------------

def rank_issue_order(rank, ws, *, seed):
    # Issue many async ops of different kinds and sizes, then wait in reverse order.
    pending = []

    def add_all_reduce(dtype, n, op, kind):
        inputs = [gen_input(seed + len(pending), r, dtype, n, kind) for r in range(ws)]
        t = inputs[rank].clone()
        w = dist.all_reduce(t, op=getattr(dist.ReduceOp, op), async_op=True)
        pending.append((w, lambda: check_all_reduce(t, inputs, ws, dtype, op, None, True,
                                                    f"all_reduce {op} {dtype} n={n}")))

    def add_broadcast(dtype, n, root):
        s = seed + len(pending)
        t = gen_input(s, rank, dtype, n, "randn")
        w = dist.broadcast(t, src=root, async_op=True)
        pending.append((w, lambda: assert_equal(t, gen_input(s, root, dtype, n, "randn"),
                                                f"broadcast {dtype} n={n}")))

    def add_all_gather(dtype, n):
        s = seed + len(pending)
        outs = [torch.zeros(n, dtype=getattr(torch, dtype)) for _ in range(ws)]
        w = dist.all_gather(outs, gen_input(s, rank, dtype, n, "int_full"), async_op=True)
        pending.append((w, lambda: [assert_equal(outs[r], gen_input(s, r, dtype, n, "int_full"),
                                                 f"all_gather[{r}] {dtype} n={n}")
                                    for r in range(ws)]))

    def add_all_gather_into_tensor(dtype, n):
        s = seed + len(pending)
        out = torch.zeros(ws * n, dtype=getattr(torch, dtype))
        w = dist.all_gather_into_tensor(out, gen_input(s, rank, dtype, n, "int_full"),
                                        async_op=True)
        pending.append((w, lambda: assert_equal(
            out, torch.cat([gen_input(s, r, dtype, n, "int_full") for r in range(ws)]),
            f"all_gather_into_tensor {dtype} n={n}")))

    add_all_reduce("float32", 1023, "SUM", "small")
    add_all_reduce("int64", 1 << 16, "MAX", "int_full")
    add_broadcast("bfloat16", 4099, 1 % ws)
    add_all_gather("int32", 777)
    add_all_reduce("float64", (1 << 20) // 8 + 3, "SUM", "small")
    add_all_gather_into_tensor("uint8", 5000)
    add_all_reduce("int8", 1, "PRODUCT", "int_prod")
    pending.append((dist.barrier(async_op=True), lambda: None))
    add_all_reduce("float32", 0, "SUM", "small")
    add_broadcast("float32", (4 << 20) // 4, 0)
    add_all_reduce("float32", (4 << 20) // 4, "MIN", "small")
    add_all_reduce("uint8", 3, "BXOR", "int_full")
    for w, _ in reversed(pending):
        w.wait()
    for i, (_, check) in enumerate(pending):
        try:
            check()
        except AssertionError as exc:
            raise AssertionError(f"op #{i} (issued {i}th, waited {len(pending) - 1 - i}th): "
                                 f"{exc}") from exc


@pytest.mark.parametrize("ws", [2, 3, 4])
def test_async_issue_order_wait_reversed(pools, ws):
    """Many async ops issued back to back and waited in reverse order all give correct results."""
    pools.get(ws).run(rank_issue_order, seed=case_seed("issue_order", ws))


# ---------------------------------------------------------------------------------------------

JOIN_DELAY_S = 4.0


def rank_wait_timeout(rank, ws, *, variant):
    t = torch.ones(4)
    raised = None
    if variant == "all_reduce":
        if rank == 1:
            time.sleep(JOIN_DELAY_S)
        work = dist.all_reduce(t, async_op=True)
    else:  # irecv that nobody serves until JOIN_DELAY_S later
        if rank == 0:
            work = dist.irecv(t, src=1, tag=3)
        else:
            time.sleep(JOIN_DELAY_S)
            try:
                work = dist.isend(torch.full((4,), 2.0), dst=0, tag=3)
            except Exception as exc:  # noqa: BLE001  (the receiver may have given up: allowed)
                return None, f"isend raised {type(exc).__name__}: {exc}"
    if rank == 0:
        start = time.monotonic()
        try:
            work.wait(timeout=timedelta(milliseconds=300))
        except RuntimeError as exc:
            raised = (type(exc).__name__, str(exc), time.monotonic() - start)
        except Exception as exc:  # noqa: BLE001
            raised = (type(exc).__name__ + " (not a RuntimeError)", str(exc),
                      time.monotonic() - start)
        else:
            raised = ("nothing", "", time.monotonic() - start)
    # Whether the timed-out op may still complete afterwards is not specified: try, don't assert.
    try:
        work.wait(timeout=timedelta(seconds=8))
        after = "completed"
    except Exception as exc:  # noqa: BLE001
        after = f"{type(exc).__name__}: {exc}"
    return raised, after


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", ["all_reduce", "irecv"])
def test_wait_timeout_raises(variant):
    """work.wait(timeout) raises RuntimeError when the op cannot complete in time (own pool)."""
    with RankPool(2, BACKEND, timeout_s=10, name=f"wait-timeout-{variant}") as pool:
        results = pool.run(rank_wait_timeout, timeout=60, variant=variant)
    raised, after = results[0]
    kind, msg, elapsed = raised
    assert kind not in ("nothing",) and "not a RuntimeError" not in kind, \
        f"wait(timeout=300ms) on an op that could not complete: {kind} {msg!r} " \
        f"after {elapsed:.2f} s"
    assert elapsed < JOIN_DELAY_S - 1.0, \
        f"wait(timeout=300ms) raised only after {elapsed:.2f} s " \
        f"(the peer joins at {JOIN_DELAY_S} s)"


# ---------------------------------------------------------------------------------------------

def rank_stored_exception(rank, ws):
    n = 1024 + (1 if rank == ws - 1 else 0)  # the last rank disagrees about the size
    t = torch.ones(n)
    try:
        work = dist.all_reduce(t, async_op=True)
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"all_reduce(async_op=True) raised at issue time instead of "
                             f"storing the error in the Work: {type(exc).__name__}: {exc}") from exc
    fut = work.get_future()
    try:
        work.wait()
    except RuntimeError as exc:
        msg = str(exc)
    else:
        raise AssertionError("wait() did not raise for a size mismatch between ranks")
    assert "mismatch" in msg.lower(), f"error does not say 'mismatch': {msg!r}"
    try:
        fut.wait()
    except RuntimeError:
        pass
    else:
        raise AssertionError("the Work's future completed without error after a failed op")
    check_group_usable(rank, ws, "a stored error")
    return msg


@skip_if_gloo("no detection of ranks that disagree on a collective's size")
@pytest.mark.parametrize("ws", [2, 3])
def test_stored_exception_raised_by_wait(pools, ws):
    """An error stored in an async Work (size mismatch) is raised by wait() and by its future."""
    pools.get(ws).run(rank_stored_exception, timeout=60)

"""CUDA tensors: every c10d operation on CUDA tensors, and the stream semantics of ProcessGroupNCCL
(the contract tcpx follows on CUDA).

Every rank uses device cuda:(rank % torch.cuda.device_count()) and calls torch.cuda.set_device on
it first; on a machine with one GPU all ranks share GPU 0, which must work too.  The rank pools are
the suite's ordinary ones (conftest.py: init_process_group with a tcp:// init_method and no device
binding); the tests simply use CUDA tensors on them (tcpx serves CPU and CUDA tensors in one
group).  Inputs are generated on the CPU (testlib.gen_input, every rank can regenerate every
rank's input) and copied to the GPU; results are copied back with .cpu() and compared with
references computed with plain torch/numpy on the CPU (testlib.reference_all_reduce through
check_all_reduce, slicing for the data movement).  The backend under test is never its own
reference.

What is tested:
  1. The op matrix: all_reduce (every dtype x every valid reduce op, PREMUL_SUM included; the
     invalid (dtype, op) pairs raise ValueError), broadcast, all_gather, all_gather_into_tensor,
     reduce, reduce_scatter (list), reduce_scatter_tensor, all_to_all (list) and
     all_to_all_single (equal and uneven splits), gather, scatter, send/recv, isend/irecv,
     batch_isend_irecv, all_reduce_coalesced, _coalescing_manager (all_reduce,
     all_gather_into_tensor, reduce_scatter_tensor) and barrier, at 0, 1, 1023 and 1 MiB + 3
     elements (looped inside one rank call), float32/bfloat16/int64/uint8/bool for all but
     all_reduce, sync and async (Work.wait()) alternately, world sizes 2 and 4; all_reduce and
     all_gather on non-contiguous CUDA views (the result lands in the view, storage outside it
     is untouched).
  2. The host does not block: after a ~200 ms torch.cuda._sleep queued on the current stream,
     issuing an op and Work.wait() (or a synchronous call) return to the host well before the
     sleep ends; the result is still right (the op waited for the kernel that wrote its input).
  3. wait() orders the caller's stream: rank 0 issues, waits, queues a clone of the result and
     only then lets the other ranks issue their side (through the c10d store), so the clone is
     right only if wait() (or the synchronous call) made the current stream wait for the op.
     Default and non-default current stream; all_reduce, all_gather_into_tensor and irecv.
  4. An input produced on another stream: after wait_stream / an event wait on the current
     stream, or with the op issued while that stream is current.
  5. Input lifetime: the input's last Python reference is dropped right after issue and its
     memory is offered to the caching allocator (new tensors filled on the same stream) before
     the peers even issue; the result must still be the original data.
  6. Work.get_future().then(...) on CUDA.
  7. Errors: ranks that disagree on the size (RuntimeError naming a mismatch on at least one
     rank), tensors on different devices in one op (ValueError or RuntimeError naming the
     device); the group stays usable.
  8. CPU and CUDA tensors interleaved on the same group, sync and async.

Sleeps are never used as synchronisation: torch.cuda._sleep only widens the window in which a
missing stream dependency gives a wrong result, and host time is measured only in test 2 (and the
barrier).  The _sleep rate (cycles per ms) is measured once per rank process, one rank after the
other, so that ranks sharing a GPU do not time-slice it while measuring.

Skipped without a GPU, and unless the backend under test is tcpx or nccl.
TCPX_TEST_BACKEND=nccl validates these tests against ProcessGroupNCCL on a machine with at least
as many GPUs as ranks (NCCL refuses two ranks on one GPU; larger world sizes are skipped); what
NCCL lacks (bitwise reduce ops, non-contiguous collective tensors, mismatch detection, CPU
tensors) is skipped only under nccl.
"""

from __future__ import annotations

import math
import time
import uuid
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from testlib import (BACKEND, DTYPE_NAMES, DTYPES, PREMUL_FACTOR_EXACT, PREMUL_FACTOR_RANDN,
                     REDUCE_OPS, Checks, a2a_units, assert_equal, case_seed, check_all_reduce,
                     data_kind, dtype_aliases, expect_raises, garbage_like, gen_input,
                     input_kind, invalid_pair, is_float, make_op, nc_base_shape, nc_mask,
                     nc_view, numel_of, reference_all_reduce)

HAS_CUDA = torch.cuda.is_available()
N_GPUS = torch.cuda.device_count() if HAS_CUDA else 0
IS_NCCL = BACKEND == "nccl"

pytestmark = [
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is "
                                            "False)"),
    pytest.mark.skipif(BACKEND not in ("tcpx", "nccl"),
                       reason=f"CUDA tests run against tcpx (or nccl, to validate the tests); "
                              f"the backend under test is {BACKEND!r}"),
]

WORLD_SIZES = (2, 4)
MID = "1MiB+3"
SMALL_NUMELS = (0, 1, 1023)
MATRIX_DTYPES = ("float32", "bfloat16", "int64", "uint8", "bool")
SIGNAL_TIMEOUT_S = 20  # how long a rank waits for another rank's store signal
SLEEP_MS = 200.0       # test 2: the kernel the host must not wait for
HAZARD_MS = 50.0       # test 4: the delay before an input is written on another stream


# ---------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------

def _pool(pools, ws):
    """The pool of world size ``ws``; under nccl, skip when there are fewer GPUs than ranks."""
    if IS_NCCL and ws > N_GPUS:
        pytest.skip(f"nccl: {ws} ranks need {ws} GPUs (NCCL refuses two ranks on one GPU); "
                    f"{N_GPUS} present")
    return pools.get(ws)


def _nccl_lacks(reason: str | None) -> None:
    if IS_NCCL and reason:
        pytest.skip(f"nccl: {reason}")


def _key(*parts) -> str:
    """A store key prefix that no other case (or earlier run on the same store) uses."""
    return "test_cuda/" + "/".join(str(p) for p in parts) + "/" + uuid.uuid4().hex


# ---------------------------------------------------------------------------------------------
# rank side helpers
# ---------------------------------------------------------------------------------------------

def _device(rank: int) -> torch.device:
    dev = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    return dev


def _store():
    return dist.distributed_c10d._get_default_store()


def _numels(dtype: str) -> list[int]:
    return [*SMALL_NUMELS, numel_of(MID, DTYPES[dtype])]


def _issue(async_op: bool, fn, *args, **kwargs):
    """Call a c10d function; with async_op, wait on the returned Work (stream-ordered wait)."""
    work = fn(*args, async_op=async_op, **kwargs)
    if async_op:
        work.wait()


def _ctx(rank, ws, what, dtype, n, async_op=False) -> str:
    return f"rank {rank}/{ws} CUDA {what}{' async' if async_op else ''} {dtype} n={n}"


def _nccl_gap_all_reduce(dtype: str, op: str) -> str | None:
    """What ProcessGroupNCCL (torch 2.11) lacks for a valid all_reduce case, or None."""
    if not IS_NCCL:
        return None
    if op in ("BAND", "BOR", "BXOR"):
        return f"NCCL has no {op}"
    if op == "PREMUL_SUM" and dtype == "bfloat16":
        return "PREMUL_SUM with a scalar factor on bfloat16 gives wrong results (~1e-23)"
    return None


def _invalid_pair_error_types():
    # tcpx raises ValueError; ProcessGroupNCCL raises RuntimeError (TypeError for PREMUL_SUM).
    return (ValueError, RuntimeError, TypeError) if IS_NCCL else ValueError


def _premul_factor(op: str, flavor: str):
    if op != "PREMUL_SUM":
        return None
    return PREMUL_FACTOR_EXACT if flavor == "exact" else PREMUL_FACTOR_RANDN


def _flavors(dtype: str) -> list[str]:
    return ["exact", "randn"] if is_float(dtype) else ["exact"]


def _check_usable_cuda(rank: int, ws: int, dev: torch.device, ctx: str) -> None:
    """A correct CUDA all_reduce: proves the group still works (after an error)."""
    t = torch.arange(5, dtype=torch.int64, device=dev) + rank
    dist.all_reduce(t)
    exp = torch.arange(5, dtype=torch.int64) * ws + ws * (ws - 1) // 2
    assert_equal(t.cpu(), exp, f"group not usable (CUDA all_reduce) after {ctx}")


def _wait_for_signal(key: str) -> str | None:
    """Wait for another rank's store key; None when it came, the error text when it did not."""
    try:
        _store().wait([key], timedelta(seconds=SIGNAL_TIMEOUT_S))
    except Exception as exc:  # noqa: BLE001  (DistStoreError / RuntimeError on timeout)
        return f"{type(exc).__name__}: {exc}"
    return None


def _no_signal_message(key: str, err: str) -> str:
    return (f"rank 0 did not signal {key!r} within {SIGNAL_TIMEOUT_S} s ({err}): issuing the op or "
            f"Work.wait() / the synchronous call blocked rank 0's host until the op completed "
            f"(the op could only complete after this rank issued its side); it must only make "
            f"the current stream wait")


def _warm_up(rank: int, ws: int, dev: torch.device, op: str) -> None:
    """Run ``op`` once to completion on every rank involved, so that one-time set-up that may
    block the host until the peers join (NCCL creates its communicators lazily, on the first
    collective / the first send-recv between two ranks) is not part of what a test measures.
    "send": rank 0 sends to rank 1; "recv": rank 1 sends to rank 0."""
    t = torch.ones(8, device=dev)
    if op == "all_reduce":
        dist.all_reduce(t)
    elif op == "all_gather_into_tensor":
        dist.all_gather_into_tensor(torch.empty(8 * ws, device=dev), t)
    elif op in ("send", "recv"):
        src, dst = (0, 1) if op == "send" else (1, 0)
        if rank == src:
            dist.send(t, dst=dst)
        elif rank == dst:
            dist.recv(t, src=src)
    else:
        raise ValueError(op)
    torch.cuda.synchronize()


_CYCLES_PER_MS: dict[int, float] = {}


def _measure_cycles_per_ms() -> float:
    torch.cuda.synchronize()
    cycles = 20_000_000  # ~10 ms at 2 GHz
    torch.cuda._sleep(cycles // 10)  # warm-up
    best = None
    for _ in range(3):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        best = ms if best is None else min(best, ms)
    return cycles / max(best, 1e-3)


def _cycles_per_ms(rank: int, ws: int, key: str) -> float:
    """torch.cuda._sleep cycles per millisecond on this rank's GPU, measured once per process.

    The ranks measure one after the other (a chain of store keys) and none goes on before the
    last one is done, so ranks sharing a GPU never time-slice it while one of them measures (which
    would make the rate look lower and the sleeps shorter)."""
    store = _store()
    idx = torch.cuda.current_device()
    try:
        if rank > 0:
            store.wait([f"{key}/calibrated/{rank - 1}"], timedelta(seconds=60))
        if idx not in _CYCLES_PER_MS:
            _CYCLES_PER_MS[idx] = _measure_cycles_per_ms()
    finally:
        store.set(f"{key}/calibrated/{rank}", "1")
    store.wait([f"{key}/calibrated/{ws - 1}"], timedelta(seconds=60))
    return _CYCLES_PER_MS[idx]


# ---------------------------------------------------------------------------------------------
# 1. the op matrix
# ---------------------------------------------------------------------------------------------

def rank_all_reduce_matrix(rank, ws, *, dtype, seed):
    dev = _device(rank)
    dt = DTYPES[dtype]
    checks = Checks()
    for oi, op in enumerate(REDUCE_OPS):
        why_invalid = invalid_pair(dtype, op)
        if why_invalid:
            x = torch.zeros(1023, dtype=dt, device=dev)
            factor = PREMUL_FACTOR_EXACT if op == "PREMUL_SUM" else None
            with checks():
                expect_raises(lambda: dist.all_reduce(x, op=make_op(op, factor)),  # noqa: B023
                              _invalid_pair_error_types(),
                              [op, op.split("_")[0], *dtype_aliases(dt)],
                              f"rank {rank}/{ws} CUDA all_reduce({op}) on {dtype} ({why_invalid})")
            continue
        if _nccl_gap_all_reduce(dtype, op):
            continue
        for i, n in enumerate(_numels(dtype)):
            for fi, flavor in enumerate(_flavors(dtype)):
                kind = input_kind(dtype, op, flavor)
                factor = _premul_factor(op, flavor)
                s = seed + 7919 * oi + 7 * n + fi
                t = gen_input(s, rank, dtype, n, kind).to(dev)
                ptr = t.data_ptr()
                async_op = (i + fi) % 2 == 1
                ctx = _ctx(rank, ws, f"all_reduce({op})", dtype, n, async_op) + f" {kind}"
                _issue(async_op, dist.all_reduce, t, op=make_op(op, factor))
                got = t.cpu()
                with checks():
                    assert t.data_ptr() == ptr and t.device == dev, ctx + ": tensor replaced"
                    check_all_reduce(got, [gen_input(s, r, dtype, n, kind) for r in range(ws)],
                                     ws, dtype, op, factor, flavor == "exact", ctx)
                del t, got
    _check_usable_cuda(rank, ws, dev, f"the all_reduce matrix of {dtype}")
    checks.done()


def _m_broadcast(rank, ws, dev, dtype, seed, checks):
    kind = data_kind(dtype)
    for i, n in enumerate(_numels(dtype)):
        for root in range(ws):
            s = seed + 7 * n + 101 * root
            t = gen_input(s, rank, dtype, n, kind).to(dev)
            ptr = t.data_ptr()
            async_op = (i + root) % 2 == 1
            _issue(async_op, dist.broadcast, t, src=root)
            got = t.cpu()
            with checks():
                ctx = _ctx(rank, ws, f"broadcast(src={root})", dtype, n, async_op)
                assert t.data_ptr() == ptr, ctx + ": tensor replaced"
                assert_equal(got, gen_input(s, root, dtype, n, kind), ctx)


def _m_all_gather(rank, ws, dev, dtype, seed, checks):
    dt = DTYPES[dtype]
    kind = data_kind(dtype)
    for i, n in enumerate(_numels(dtype)):
        s = seed + 7 * n
        async_op = i % 2 == 1
        x = gen_input(s, rank, dtype, n, kind).to(dev)
        outs = [garbage_like(torch.empty(n, dtype=dt), s + 1 + r).to(dev) for r in range(ws)]
        ptrs = [o.data_ptr() for o in outs]
        _issue(async_op, dist.all_gather, outs, x)
        got = [o.cpu() for o in outs]
        x_after = x.cpu()
        with checks():
            ctx = _ctx(rank, ws, "all_gather", dtype, n, async_op)
            assert_equal(x_after, gen_input(s, rank, dtype, n, kind), ctx + ": input modified")
            for r in range(ws):
                assert outs[r].data_ptr() == ptrs[r], f"{ctx}: output[{r}] replaced"
                assert_equal(got[r], gen_input(s, r, dtype, n, kind), f"{ctx}: output[{r}]")


def _m_all_gather_into_tensor(rank, ws, dev, dtype, seed, checks):
    dt = DTYPES[dtype]
    kind = data_kind(dtype)
    for i, n in enumerate(_numels(dtype)):
        s = seed + 7 * n
        async_op = i % 2 == 1
        x = gen_input(s, rank, dtype, n, kind).to(dev)
        out = garbage_like(torch.empty(ws * n, dtype=dt), s + 1).to(dev)
        ptr = out.data_ptr()
        _issue(async_op, dist.all_gather_into_tensor, out, x)
        got = out.cpu()
        x_after = x.cpu()
        with checks():
            ctx = _ctx(rank, ws, "all_gather_into_tensor", dtype, n, async_op)
            assert out.data_ptr() == ptr, ctx + ": output replaced"
            assert_equal(x_after, gen_input(s, rank, dtype, n, kind), ctx + ": input modified")
            for r in range(ws):
                assert_equal(got[r * n:(r + 1) * n], gen_input(s, r, dtype, n, kind),
                             f"{ctx}: block {r}")


def _m_reduce(rank, ws, dev, dtype, seed, checks):
    kind = input_kind(dtype, "SUM")
    for i, n in enumerate(_numels(dtype)):
        for dst in range(ws):
            s = seed + 7 * n + 101 * dst
            mine = gen_input(s, rank, dtype, n, kind)
            t = mine.to(dev)
            async_op = (i + dst) % 2 == 1
            _issue(async_op, dist.reduce, t, dst=dst, op=dist.ReduceOp.SUM)
            got = t.cpu()
            with checks():
                ctx = _ctx(rank, ws, f"reduce(SUM, dst={dst})", dtype, n, async_op)
                if rank == dst:
                    check_all_reduce(got, [gen_input(s, r, dtype, n, kind) for r in range(ws)],
                                     ws, dtype, "SUM", None, True, ctx)
                else:
                    assert_equal(got, mine, ctx + ": the input of a non-dst rank was modified")


def _rs_chunk(seed, src, i, dtype, n, kind):
    """Chunk i (the part for rank i) of rank src's reduce_scatter input."""
    return gen_input(seed + 7919 * (i + 1), src, dtype, n, kind)


def _m_reduce_scatter(rank, ws, dev, dtype, seed, checks, form="list"):
    dt = DTYPES[dtype]
    kind = input_kind(dtype, "SUM")
    for i, n in enumerate(_numels(dtype)):
        s = seed + 7 * n
        async_op = i % 2 == 1
        chunks = [_rs_chunk(s, rank, c, dtype, n, kind) for c in range(ws)]
        out = garbage_like(torch.empty(n, dtype=dt), s + 1).to(dev)
        ptr = out.data_ptr()
        if form == "list":
            inputs = [c.to(dev) for c in chunks]
            _issue(async_op, dist.reduce_scatter, out, inputs, op=dist.ReduceOp.SUM)
            after = [x.cpu() for x in inputs]
            name = "reduce_scatter"
        else:
            full = torch.cat(chunks).to(dev)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                _issue(async_op, dist.reduce_scatter_tensor, out, full, op=dist.ReduceOp.SUM)
            after = list(full.cpu().reshape(ws, n))
            name = "reduce_scatter_tensor"
        got = out.cpu()
        with checks():
            ctx = _ctx(rank, ws, f"{name}(SUM)", dtype, n, async_op) + f" (x{ws} input)"
            assert out.data_ptr() == ptr, ctx + ": output replaced"
            for c in range(ws):
                assert_equal(after[c], chunks[c], f"{ctx}: input chunk {c} modified")
            check_all_reduce(got, [_rs_chunk(s, r, rank, dtype, n, kind) for r in range(ws)],
                             ws, dtype, "SUM", None, True, ctx)


def _m_reduce_scatter_tensor(rank, ws, dev, dtype, seed, checks):
    _m_reduce_scatter(rank, ws, dev, dtype, seed, checks, form="tensor")


def _a2a_block(seed, src, dst, dtype, k):
    """What ``src`` sends to ``dst`` (k elements): any rank can regenerate it."""
    return gen_input(seed + 7919 * (dst + 1), src, dtype, k, data_kind(dtype))


def _m_all_to_all(rank, ws, dev, dtype, seed, checks, form="list"):
    dt = DTYPES[dtype]
    for i, n in enumerate(_numels(dtype)):
        for pi, pattern in enumerate(("equal", "uneven")):
            s = seed + 7 * n + pi
            async_op = (i + pi) % 2 == 1
            in_splits = [a2a_units(pattern, rank, d, n, ws) for d in range(ws)]
            out_splits = [a2a_units(pattern, src, rank, n, ws) for src in range(ws)]
            blocks = [_a2a_block(s, rank, d, dtype, in_splits[d]) for d in range(ws)]
            if form == "list":
                inputs = [b.to(dev) for b in blocks]
                outs = [garbage_like(torch.empty(k, dtype=dt), s + 3 + src).to(dev)
                        for src, k in enumerate(out_splits)]
                _issue(async_op, dist.all_to_all, outs, inputs)
                got = [o.cpu() for o in outs]
                after = [x.cpu() for x in inputs]
                name = "all_to_all"
            else:
                x = torch.cat(blocks).to(dev)
                out = garbage_like(torch.empty(sum(out_splits), dtype=dt), s + 3).to(dev)
                if pattern == "equal":
                    _issue(async_op, dist.all_to_all_single, out, x)
                else:
                    _issue(async_op, dist.all_to_all_single, out, x,
                           output_split_sizes=out_splits, input_split_sizes=in_splits)
                got = list(out.cpu().split(out_splits))
                after = list(x.cpu().split(in_splits))
                name = "all_to_all_single"
            with checks():
                ctx = (_ctx(rank, ws, f"{name} {pattern}", dtype, n, async_op)
                       + f" in_splits={in_splits} out_splits={out_splits}")
                for d in range(ws):
                    assert_equal(after[d], blocks[d], f"{ctx}: input block for rank {d} modified")
                for src in range(ws):
                    assert_equal(got[src], _a2a_block(s, src, rank, dtype, out_splits[src]),
                                 f"{ctx}: block from rank {src}")


def _m_all_to_all_single(rank, ws, dev, dtype, seed, checks):
    _m_all_to_all(rank, ws, dev, dtype, seed, checks, form="single")


def _m_gather(rank, ws, dev, dtype, seed, checks):
    dt = DTYPES[dtype]
    kind = data_kind(dtype)
    for i, n in enumerate(_numels(dtype)):
        for root in range(ws):
            s = seed + 7 * n + 101 * root
            x = gen_input(s, rank, dtype, n, kind).to(dev)
            gl = ([garbage_like(torch.empty(n, dtype=dt), s + 3 + r).to(dev) for r in range(ws)]
                  if rank == root else None)
            async_op = (i + root) % 2 == 1
            _issue(async_op, dist.gather, x, gl, dst=root)
            got = [g.cpu() for g in gl] if gl is not None else None
            x_after = x.cpu()
            with checks():
                ctx = _ctx(rank, ws, f"gather(dst={root})", dtype, n, async_op)
                assert_equal(x_after, gen_input(s, rank, dtype, n, kind), ctx + ": input modified")
                if got is not None:
                    for r in range(ws):
                        assert_equal(got[r], gen_input(s, r, dtype, n, kind),
                                     f"{ctx}: gather_list[{r}]")


def _m_scatter(rank, ws, dev, dtype, seed, checks):
    dt = DTYPES[dtype]
    kind = data_kind(dtype)
    for i, n in enumerate(_numels(dtype)):
        for root in range(ws):
            s = seed + 7 * n + 101 * root
            sl = ([gen_input(s, d, dtype, n, kind).to(dev) for d in range(ws)]
                  if rank == root else None)
            out = garbage_like(torch.empty(n, dtype=dt), s + 3).to(dev)
            async_op = (i + root) % 2 == 1
            _issue(async_op, dist.scatter, out, sl, src=root)
            got = out.cpu()
            sl_after = [x.cpu() for x in sl] if sl is not None else None
            with checks():
                ctx = _ctx(rank, ws, f"scatter(src={root})", dtype, n, async_op)
                assert_equal(got, gen_input(s, rank, dtype, n, kind), ctx)
                if sl_after is not None:
                    for d in range(ws):
                        assert_equal(sl_after[d], gen_input(s, d, dtype, n, kind),
                                     f"{ctx}: scatter_list[{d}] modified")


def _m_p2p(rank, ws, dev, dtype, seed, checks, mode="blocking"):
    """Every ordered pair (src, dst) in turn: src sends, dst receives."""
    dt = DTYPES[dtype]
    kind = data_kind(dtype)
    for n in _numels(dtype):
        for src in range(ws):
            for dst in range(ws):
                if src == dst or rank not in (src, dst):
                    continue
                s = seed + 7 * n + 31 * src + dst
                ctx = _ctx(rank, ws, f"{'send/recv' if mode == 'blocking' else 'isend/irecv'} "
                                     f"{src}->{dst}", dtype, n)
                if rank == src:
                    t = gen_input(s, src, dtype, n, kind).to(dev)
                    if mode == "blocking":
                        dist.send(t, dst=dst)
                    else:
                        dist.isend(t, dst=dst, tag=3).wait()
                    after = t.cpu()
                    with checks():
                        assert_equal(after, gen_input(s, src, dtype, n, kind),
                                     ctx + ": send buffer modified")
                else:
                    t = garbage_like(torch.empty(n, dtype=dt), s).to(dev)
                    ptr = t.data_ptr()
                    if mode == "blocking":
                        dist.recv(t, src=src)
                    else:
                        dist.irecv(t, src=src, tag=3).wait()
                    got = t.cpu()
                    with checks():
                        assert t.data_ptr() == ptr, ctx + ": receive buffer replaced"
                        assert_equal(got, gen_input(s, src, dtype, n, kind), ctx)


def _m_isend_irecv(rank, ws, dev, dtype, seed, checks):
    _m_p2p(rank, ws, dev, dtype, seed, checks, mode="async")


def _m_batch_isend_irecv(rank, ws, dev, dtype, seed, checks):
    """A ring (send right, receive left); the order of the two ops alternates between ranks."""
    kind = data_kind(dtype)
    right, left = (rank + 1) % ws, (rank - 1) % ws
    for n in _numels(dtype):
        s = seed + 7 * n
        send = gen_input(s, rank, dtype, n, kind).to(dev)
        recv = garbage_like(gen_input(s, rank, dtype, n, kind), s + 1).to(dev)
        ops = [dist.P2POp(dist.isend, send, right), dist.P2POp(dist.irecv, recv, left)]
        if rank % 2:
            ops.reverse()
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        got, sent = recv.cpu(), send.cpu()
        with checks():
            ctx = _ctx(rank, ws, "batch_isend_irecv ring", dtype, n)
            assert_equal(got, gen_input(s, left, dtype, n, kind), ctx + ": received from the left")
            assert_equal(sent, gen_input(s, rank, dtype, n, kind), ctx + ": send buffer modified")


def _m_all_reduce_coalesced(rank, ws, dev, dtype, seed, checks):
    kind = input_kind(dtype, "SUM")
    numels = [1023, 0, numel_of(MID, DTYPES[dtype]), 1]
    for async_op in (False, True):
        s = seed + 1000 * async_op
        tensors = [gen_input(s + i, rank, dtype, k, kind).to(dev) for i, k in enumerate(numels)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ret = dist.all_reduce_coalesced(tensors, op=dist.ReduceOp.SUM, async_op=async_op)
        if async_op:
            ret.wait()  # a Work or a Future, depending on the torch version
        got = [t.cpu() for t in tensors]
        for i, k in enumerate(numels):
            with checks():
                ctx = _ctx(rank, ws, f"all_reduce_coalesced(SUM) tensor {i} of {numels}", dtype,
                           k, async_op)
                check_all_reduce(got[i], [gen_input(s + i, r, dtype, k, kind) for r in range(ws)],
                                 ws, dtype, "SUM", None, True, ctx)


def _m_coalescing_manager(rank, ws, dev, dtype, seed, checks):
    dt = DTYPES[dtype]
    numels = [1023, 0, numel_of(MID, dt), 1]
    for ci, coll in enumerate(("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor")):
        kind = data_kind(dtype) if coll == "all_gather_into_tensor" else input_kind(dtype, "SUM")
        for async_ops in (False, True):
            s = seed + 1000 * async_ops + 100000 * ci
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                if coll == "all_reduce":
                    tensors = [gen_input(s + i, rank, dtype, k, kind).to(dev)
                               for i, k in enumerate(numels)]
                    with dist._coalescing_manager(device=dev, async_ops=async_ops) as cm:
                        for t in tensors:
                            dist.all_reduce(t)
                elif coll == "all_gather_into_tensor":
                    inputs = [gen_input(s + i, rank, dtype, k, kind).to(dev)
                              for i, k in enumerate(numels)]
                    outputs = [garbage_like(torch.empty(ws * k, dtype=dt), s + i).to(dev)
                               for i, k in enumerate(numels)]
                    with dist._coalescing_manager(device=dev, async_ops=async_ops) as cm:
                        for o, x in zip(outputs, inputs):
                            dist.all_gather_into_tensor(o, x)
                else:
                    inputs = [torch.cat([_rs_chunk(s + i, rank, c, dtype, k, kind)
                                         for c in range(ws)]).to(dev)
                              for i, k in enumerate(numels)]
                    outputs = [garbage_like(torch.empty(k, dtype=dt), s + i).to(dev)
                               for i, k in enumerate(numels)]
                    with dist._coalescing_manager(device=dev, async_ops=async_ops) as cm:
                        for o, x in zip(outputs, inputs):
                            dist.reduce_scatter_tensor(o, x)
            if async_ops:
                cm.wait()
            got = [t.cpu() for t in (tensors if coll == "all_reduce" else outputs)]
            for i, k in enumerate(numels):
                with checks():
                    ctx = _ctx(rank, ws, f"_coalescing_manager(device={dev}) x{len(numels)} "
                                         f"{coll} tensor {i} of {numels}", dtype, k, async_ops)
                    if coll == "all_reduce":
                        check_all_reduce(got[i], [gen_input(s + i, r, dtype, k, kind)
                                                  for r in range(ws)],
                                         ws, dtype, "SUM", None, True, ctx)
                    elif coll == "all_gather_into_tensor":
                        for r in range(ws):
                            assert_equal(got[i][r * k:(r + 1) * k],
                                         gen_input(s + i, r, dtype, k, kind), f"{ctx}: block {r}")
                    else:
                        check_all_reduce(got[i], [_rs_chunk(s + i, r, rank, dtype, k, kind)
                                                  for r in range(ws)],
                                         ws, dtype, "SUM", None, True, ctx)


_MATRIX_OPS = {
    "broadcast": _m_broadcast,
    "all_gather": _m_all_gather,
    "all_gather_into_tensor": _m_all_gather_into_tensor,
    "reduce": _m_reduce,
    "reduce_scatter": _m_reduce_scatter,
    "reduce_scatter_tensor": _m_reduce_scatter_tensor,
    "all_to_all": _m_all_to_all,
    "all_to_all_single": _m_all_to_all_single,
    "gather": _m_gather,
    "scatter": _m_scatter,
    "send_recv": _m_p2p,
    "isend_irecv": _m_isend_irecv,
    "batch_isend_irecv": _m_batch_isend_irecv,
    "all_reduce_coalesced": _m_all_reduce_coalesced,
    "coalescing_manager": _m_coalescing_manager,
}


def rank_op_matrix(rank, ws, *, op, seed):
    dev = _device(rank)
    checks = Checks()
    for di, dtype in enumerate(MATRIX_DTYPES):
        _MATRIX_OPS[op](rank, ws, dev, dtype, seed + 1_000_003 * di, checks)
    checks.done()


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("ws", WORLD_SIZES, ids=lambda w: f"ws{w}")
def test_all_reduce(pools, ws, dtype):
    """CUDA all_reduce of one dtype: every valid reduce op (PREMUL_SUM with a scalar factor) at
    0, 1, 1023 and 1 MiB + 3 elements, floats with exact and random-normal inputs, sync and async
    alternately; the invalid (dtype, op) pairs raise ValueError; the group is usable afterwards."""
    _nccl_lacks("no int16 ('Input tensor data type is not supported for NCCL process group: "
                "Short')" if dtype == "int16" else None)
    _pool(pools, ws).run(rank_all_reduce_matrix, timeout=240, dtype=dtype,
                         seed=case_seed("cuda_all_reduce", ws, dtype))


@pytest.mark.parametrize("op", list(_MATRIX_OPS))
@pytest.mark.parametrize("ws", WORLD_SIZES, ids=lambda w: f"ws{w}")
def test_op(pools, ws, op):
    """One c10d op on CUDA tensors: float32, bfloat16, int64, uint8 and bool at 0, 1, 1023 and
    1 MiB + 3 elements (every root / every ordered pair where the op has one), sync and async
    alternately; outputs land in the caller's tensors, inputs stay unchanged."""
    _pool(pools, ws).run(rank_op_matrix, timeout=240, op=op, seed=case_seed("cuda_op", ws, op))


# ---- non-contiguous views ------------------------------------------------------------------

NC_SHAPES = ((31, 35), (515, 259))
NC_DTYPES = ("float32", "bfloat16", "int64", "bool")


def rank_noncontig(rank, ws, *, op, layout, seed):
    dev = _device(rank)
    checks = Checks()
    for di, dtype in enumerate(NC_DTYPES):
        dt = DTYPES[dtype]
        for rows, cols in NC_SHAPES:
            s = seed + 1000 * di + rows
            shape = nc_base_shape(layout, rows, cols)
            numel = math.prod(shape)
            kind = input_kind(dtype, "SUM") if op == "all_reduce" else data_kind(dtype)

            def base_of(r):  # rank r's input storage (CPU)
                return gen_input(s, r, dtype, numel, kind).reshape(shape)  # noqa: B023

            ctx = f"rank {rank}/{ws} CUDA {op} on a {layout} view ({rows}x{cols}) of {dtype}"
            if op == "all_reduce":
                base = base_of(rank).to(dev)
                view = nc_view(layout, base)
                assert not view.is_contiguous()
                dist.all_reduce(view)
                got = base.cpu()
                with checks():
                    mask = nc_mask(layout, got)
                    assert_equal(got[mask], base_of(rank)[mask],
                                 ctx + ": storage outside the view changed")
                    check_all_reduce(nc_view(layout, got).contiguous(),
                                     [nc_view(layout, base_of(r)).contiguous() for r in range(ws)],
                                     ws, dtype, "SUM", None, True, ctx)
            else:  # all_gather from a non-contiguous input into non-contiguous output views
                xb = base_of(rank).to(dev)
                x = nc_view(layout, xb)
                garbage = [garbage_like(torch.empty(shape, dtype=dt), s + 11 + r)
                           for r in range(ws)]
                obs = [g.to(dev) for g in garbage]
                outs = [nc_view(layout, ob) for ob in obs]
                assert not x.is_contiguous() and not outs[0].is_contiguous()
                dist.all_gather(outs, x)
                got = [ob.cpu() for ob in obs]
                x_after = xb.cpu()
                with checks():
                    assert_equal(x_after, base_of(rank), ctx + ": input storage modified")
                    mask = nc_mask(layout, got[0])
                    for r in range(ws):
                        assert_equal(got[r][mask], garbage[r][mask],
                                     f"{ctx}: storage outside output view {r} changed")
                        assert_equal(nc_view(layout, got[r]).contiguous(),
                                     nc_view(layout, base_of(r)).contiguous(),
                                     f"{ctx}: output view {r}")
    checks.done()


@pytest.mark.parametrize("layout", ["stride2", "columns", "transposed"])
@pytest.mark.parametrize("op", ["all_reduce", "all_gather"])
@pytest.mark.parametrize("ws", WORLD_SIZES, ids=lambda w: f"ws{w}")
def test_noncontiguous(pools, ws, op, layout):
    """all_reduce on a non-contiguous CUDA view, and all_gather from a non-contiguous view into
    non-contiguous output views: results land in the views, nothing outside them changes."""
    _nccl_lacks("collectives require contiguous CUDA tensors ('Tensors must be contiguous')")
    _pool(pools, ws).run(rank_noncontig, timeout=120, op=op, layout=layout,
                         seed=case_seed("cuda_nc", ws, op, layout))


def rank_barrier(rank, ws, *, device_ids):
    dev = _device(rank)
    late = 0.3
    elapsed = []
    for _ in range(2):
        if rank == 0:
            time.sleep(late)
        start = time.monotonic()
        if device_ids:
            dist.barrier(device_ids=[dev.index])
        else:
            dist.barrier()
        elapsed.append(time.monotonic() - start)
    if rank != 0:
        assert min(elapsed) >= late * 0.6, \
            (f"rank {rank}: barrier returned after {min(elapsed):.3f} s although rank 0 entered "
             f"it {late} s late: {elapsed}")
    _check_usable_cuda(rank, ws, dev, "barrier")
    return elapsed


@pytest.mark.parametrize("device_ids", [False, True], ids=["plain", "device_ids"])
@pytest.mark.parametrize("ws", WORLD_SIZES, ids=lambda w: f"ws{w}")
def test_barrier(pools, ws, device_ids):
    """barrier() (and barrier(device_ids=[this rank's GPU])) on ranks using CUDA: nobody leaves
    before the last rank (0, 0.3 s late) arrives; CUDA ops work afterwards."""
    _pool(pools, ws).run(rank_barrier, timeout=60, device_ids=device_ids)


# ---------------------------------------------------------------------------------------------
# 2. the host does not block
# ---------------------------------------------------------------------------------------------

def rank_host_not_blocked(rank, ws, *, op, n, key):
    dev = _device(rank)
    cycles = int(SLEEP_MS * _cycles_per_ms(rank, ws, key))
    peer = rank ^ 1
    t = torch.empty(n, device=dev)
    out = torch.empty(ws * n, device=dev)

    def issue_and_wait():
        if op == "all_reduce-async":
            dist.all_reduce(t, async_op=True).wait()
        elif op == "all_reduce-sync":
            dist.all_reduce(t)
        elif op == "all_gather_into_tensor-async":
            dist.all_gather_into_tensor(out, t, async_op=True).wait()
        elif op == "isend_irecv":
            if peer < ws:
                if rank % 2 == 0:
                    dist.isend(t, dst=peer).wait()
                else:
                    dist.irecv(t, src=peer).wait()
        else:
            raise ValueError(op)

    # Warm-up: the same op once, completed, so one-time set-up costs are not timed.
    t.fill_(rank + 1)
    issue_and_wait()
    torch.cuda.synchronize()

    t.fill_(-100.0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(cycles)
    t.fill_(rank + 1)  # the input, written by a kernel queued behind the sleep
    issue_and_wait()
    host_ms = (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    total_ms = (time.perf_counter() - start) * 1e3

    ctx = f"rank {rank}/{ws} CUDA {op} n={n}"
    assert total_ms >= 0.75 * SLEEP_MS, \
        (f"{ctx}: the {SLEEP_MS:.0f} ms torch.cuda._sleep finished after {total_ms:.1f} ms "
         f"(calibration problem: {cycles} cycles); the test proves nothing")
    assert host_ms < 0.5 * SLEEP_MS, \
        (f"{ctx}: issuing the op and waiting took {host_ms:.1f} ms of host time behind a "
         f"{SLEEP_MS:.0f} ms kernel (everything done after {total_ms:.1f} ms): issue or "
         f"wait() blocked the host on the GPU")
    # The values: the op must have waited for the fill queued behind the sleep.
    total = ws * (ws + 1) // 2
    if op.startswith("all_reduce"):
        assert_equal(t.cpu(), torch.full((n,), float(total)), ctx + ": result")
    elif op.startswith("all_gather_into_tensor"):
        exp = torch.cat([torch.full((n,), float(r + 1)) for r in range(ws)])
        assert_equal(out.cpu(), exp, ctx + ": result")
    elif peer < ws and rank % 2 == 1:
        assert_equal(t.cpu(), torch.full((n,), float(peer + 1)), ctx + ": received")
    return round(host_ms, 2), round(total_ms, 2)


HOST_CASES = [
    (2, "all_reduce-async", 1023), (2, "all_reduce-async", 1 << 20),
    (2, "all_reduce-sync", 1 << 20), (2, "all_gather_into_tensor-async", 1 << 20),
    (2, "isend_irecv", 1 << 20), (4, "all_reduce-async", 1 << 20), (4, "all_reduce-sync", 1023),
]


@pytest.mark.parametrize("ws,op,n", [pytest.param(*c, id=f"ws{c[0]}-{c[1]}-n{c[2]}")
                                     for c in HOST_CASES])
def test_host_not_blocked(pools, ws, op, n):
    """An op issued behind a ~200 ms kernel on the current stream: issuing it and Work.wait()
    (or the synchronous call) return to the host in under half the kernel's time, and after
    torch.cuda.synchronize() the result includes the input written behind the kernel."""
    _pool(pools, ws).run(rank_host_not_blocked, timeout=120, op=op, n=n,
                         key=_key("host", ws, op, n))


# ---------------------------------------------------------------------------------------------
# 3. wait() orders the caller's stream
# ---------------------------------------------------------------------------------------------

def rank_wait_orders_stream(rank, ws, *, op, stream, mode, key, seed):
    """Rank 0 issues, waits (or calls synchronously), queues a clone of the result on its
    current stream and only then signals; the others issue after the signal.  So the clone was
    queued before the op could possibly have completed: it is right only if wait() made the
    stream wait for the op."""
    dev = _device(rank)
    async_op = mode == "async"
    _warm_up(rank, ws, dev, "recv" if op == "irecv" else op)
    checks = Checks()
    for n in (1023, numel_of(MID, torch.float32)):
        k = f"{key}/n{n}"
        s = seed + n
        inputs = [gen_input(s, r, "float32", n, "small") for r in range(ws)]
        t = inputs[rank].to(dev)
        out = torch.full((ws * n,), -1.0, device=dev)
        ctx = f"rank {rank}/{ws} CUDA {op} ({mode}, {stream} stream) n={n}"
        if rank == 0:
            side = torch.cuda.Stream() if stream == "side" else None
            if side is not None:
                side.wait_stream(torch.cuda.current_stream())  # t and out are ready on it
            with torch.cuda.stream(side):
                if op == "all_reduce":
                    _issue(async_op, dist.all_reduce, t)
                    snap = t.clone()
                elif op == "all_gather_into_tensor":
                    _issue(async_op, dist.all_gather_into_tensor, out, t)
                    snap = out.clone()
                else:  # irecv from rank 1 (a blocking recv for mode "sync")
                    if async_op:
                        dist.irecv(t, src=1).wait()
                    else:
                        dist.recv(t, src=1)
                    snap = t.clone()
            _store().set(k, "1")
            torch.cuda.synchronize()
            got = snap.cpu()
            with checks():
                if op == "all_reduce":
                    check_all_reduce(got, inputs, ws, "float32", "SUM", None, True,
                                     ctx + ": clone queued right after wait()")
                elif op == "all_gather_into_tensor":
                    assert_equal(got, torch.cat(inputs), ctx + ": clone queued right after wait()")
                else:
                    assert_equal(got, inputs[1], ctx + ": clone queued right after wait()")
        else:
            err = _wait_for_signal(k)
            # Issue even without the signal, so that rank 0 is not left waiting in its op.
            if op == "all_reduce":
                dist.all_reduce(t)
                got = t.cpu()
            elif op == "all_gather_into_tensor":
                dist.all_gather_into_tensor(out, t)
                got = out.cpu()
            elif rank == 1:
                dist.send(t, dst=0)
            with checks():
                if err is not None:
                    raise AssertionError(ctx + ": " + _no_signal_message(k, err))
                if op == "all_reduce":
                    check_all_reduce(got, inputs, ws, "float32", "SUM", None, True, ctx)
                elif op == "all_gather_into_tensor":
                    assert_equal(got, torch.cat(inputs), ctx)
    checks.done()


def _wait_cases():
    for ws in WORLD_SIZES:
        for stream in ("default", "side"):
            for mode in ("async", "sync"):
                yield pytest.param(ws, "all_reduce", stream, mode,
                                   id=f"ws{ws}-all_reduce-{stream}-{mode}")
    for op in ("all_gather_into_tensor", "irecv"):
        for mode in ("async", "sync"):
            yield pytest.param(2, op, "default", mode, id=f"ws2-{op}-default-{mode}")
    yield pytest.param(2, "irecv", "side", "async", id="ws2-irecv-side-async")


@pytest.mark.parametrize("ws,op,stream,mode", list(_wait_cases()))
def test_wait_orders_stream(pools, ws, op, stream, mode):
    """Work.wait() / a synchronous call makes the caller's current stream (default or a side
    stream) wait for the op: a clone queued right after it, before the peers even issued their
    side, holds the result.  Fails also (with an explanation) when wait() blocks the host."""
    _pool(pools, ws).run(rank_wait_orders_stream, timeout=120, op=op, stream=stream, mode=mode,
                         key=_key("wait", ws, op, stream, mode),
                         seed=case_seed("cuda_wait", ws, op, stream, mode))


# ---------------------------------------------------------------------------------------------
# 4. an input produced on another stream
# ---------------------------------------------------------------------------------------------

def rank_input_other_stream(rank, ws, *, variant, mode, key, seed):
    dev = _device(rank)
    cycles = int(HAZARD_MS * _cycles_per_ms(rank, ws, key))
    async_op = mode == "async"
    _warm_up(rank, ws, dev, "all_reduce")  # one-time set-up must not hide the hazard
    checks = Checks()
    for n in (1023, numel_of(MID, torch.float32)):
        s = seed + n
        inputs = [gen_input(s, r, "float32", n, "small") for r in range(ws)]
        src = inputs[rank].to(dev)
        t = torch.full((n,), -3.0, device=dev)  # stale content: wrong if read too early
        cur = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(cur)  # src and t are ready before the side stream touches them
        if variant in ("wait_stream", "event"):
            with torch.cuda.stream(side):
                torch.cuda._sleep(cycles)
                t.copy_(src)
            if variant == "wait_stream":
                cur.wait_stream(side)
            else:
                ev = torch.cuda.Event()
                ev.record(side)
                ev.wait(cur)
            _issue(async_op, dist.all_reduce, t)  # on the current stream
            got = t.cpu()
        else:  # issued while the side stream is current: the op must wait on the side stream
            with torch.cuda.stream(side):
                torch.cuda._sleep(cycles)
                t.copy_(src)
                _issue(async_op, dist.all_reduce, t)
                snap = t.clone()
            cur.wait_stream(side)
            got = snap.cpu()
        with checks():
            check_all_reduce(got, inputs, ws, "float32", "SUM", None, True,
                             f"rank {rank}/{ws} CUDA all_reduce ({mode}) of an input written on "
                             f"another stream ({variant}) n={n}")
        torch.cuda.synchronize()
    checks.done()


@pytest.mark.parametrize("variant,mode", [("wait_stream", "sync"), ("wait_stream", "async"),
                                          ("event", "sync"), ("issue_on_side", "async"),
                                          ("issue_on_side", "sync")])
@pytest.mark.parametrize("ws", WORLD_SIZES, ids=lambda w: f"ws{w}")
def test_input_from_other_stream(pools, ws, variant, mode):
    """An input written on a side stream (behind a ~50 ms kernel): after the current stream waits
    for it (wait_stream / an event) the op on the current stream sees it; with the op issued
    while the side stream is current, the op waits on that stream."""
    _pool(pools, ws).run(rank_input_other_stream, timeout=120, variant=variant, mode=mode,
                         key=_key("other_stream", ws, variant, mode),
                         seed=case_seed("cuda_other_stream", ws, variant, mode))


# ---------------------------------------------------------------------------------------------
# 5. the input stays alive (or its memory unused) until the op is done
# ---------------------------------------------------------------------------------------------

def rank_input_lifetime(rank, ws, *, op, n, key, seed):
    dev = _device(rank)
    kind = "randn"

    def make_input():
        return gen_input(seed, rank, "float32", n, kind).to(dev)

    _warm_up(rank, ws, dev, "send" if op == "isend" else op)
    out = torch.full((ws * n,), -5.0, device=dev)
    recv = torch.full((n,), -5.0, device=dev)
    reuse = []
    err = None
    # Launch the kernels used below once beforehand: with lazy CUDA module loading the first
    # launch of a kernel can wait until the GPU is idle, i.e. until the pending op completed.
    torch.full((n,), -1.0, device=dev).mul_(3.0)
    torch.cuda.synchronize()
    if rank == 0:
        x = make_input()
        ptr = x.data_ptr()
        if op == "all_gather_into_tensor":
            w = dist.all_gather_into_tensor(out, x, async_op=True)
        else:
            w = dist.isend(x, dst=1)
        del x  # the only Python reference to the input
        # New tensors of the same size on the same stream: the caching allocator hands out the
        # freed block unless the backend holds the tensor or recorded its stream.
        junk = [torch.full((n,), -(i + 1.0), device=dev) for i in range(4)]
        for j in junk:
            j.mul_(3.0)
        reuse = [i for i, j in enumerate(junk) if j.data_ptr() == ptr]
        _store().set(key, "1")  # only now may the others issue their side
        w.wait()
    else:
        err = _wait_for_signal(key)
        if op == "all_gather_into_tensor":
            dist.all_gather_into_tensor(out, make_input(), async_op=True).wait()
        elif rank == 1:
            dist.irecv(recv, src=0).wait()
    ctx = f"rank {rank}/{ws} CUDA {op} n={n} with rank 0's input dropped right after issue"
    if reuse:
        ctx += (f" (junk tensor(s) {reuse} were given the dropped input's memory while the op "
                f"was pending)")
    got_out, got_recv = out.cpu(), recv.cpu()
    if err is not None:
        raise AssertionError(ctx + ": " + _no_signal_message(key, err))
    if op == "all_gather_into_tensor":
        for r in range(ws):
            assert_equal(got_out[r * n:(r + 1) * n], gen_input(seed, r, "float32", n, kind),
                         f"{ctx}: block {r}")
    elif rank == 1:
        assert_equal(got_recv, gen_input(seed, 0, "float32", n, kind), ctx + ": received")
    return reuse


@pytest.mark.parametrize("n", [1023, numel_of(MID, torch.float32)], ids=["n1023", "1MiB+3"])
@pytest.mark.parametrize("op", ["all_gather_into_tensor", "isend"])
def test_input_lifetime(pools, op, n):
    """Rank 0 drops its only reference to the input right after issuing (all_gather_into_tensor,
    isend) and fills new same-size tensors on the same stream before the peer even issues: the
    peer must still get the original data (the backend keeps the input alive or records its
    stream)."""
    _pool(pools, 2).run(rank_input_lifetime, timeout=90, op=op, n=n,
                        key=_key("lifetime", op, n), seed=case_seed("cuda_lifetime", op, n))


# ---------------------------------------------------------------------------------------------
# 6. futures
# ---------------------------------------------------------------------------------------------

def rank_future_then(rank, ws, *, seed):
    dev = _device(rank)
    checks = Checks()
    for n in (1, 1023, numel_of(MID, torch.float32)):
        s = seed + n
        inputs = [gen_input(s, r, "float32", n, "small") for r in range(ws)]
        expected = reference_all_reduce(inputs, ws, "float32", "SUM").value
        t = inputs[rank].to(dev)
        fut = dist.all_reduce(t, async_op=True).get_future()
        doubled = fut.then(lambda f: f.value()[0] * 2).wait()
        value = fut.wait()
        got_doubled = doubled.cpu()
        got_t = t.cpu()
        with checks():
            ctx = f"rank {rank}/{ws} CUDA all_reduce(...).get_future() n={n}"
            assert isinstance(value, list) and len(value) == 1 and \
                value[0].data_ptr() == t.data_ptr(), \
                f"{ctx}: the future's value is not [the all_reduce'd tensor]: {type(value)}"
            assert_equal(got_doubled, expected * 2, ctx + ": then(value()[0] * 2)")
            assert_equal(got_t, expected, ctx + ": the tensor")
    checks.done()


@pytest.mark.parametrize("ws", WORLD_SIZES, ids=lambda w: f"ws{w}")
def test_future_then(pools, ws):
    """Work.get_future() on CUDA: its value is [the tensor], and a .then() callback computing on
    it sees the result (compared without an explicit synchronize besides .cpu())."""
    _pool(pools, ws).run(rank_future_then, timeout=90, seed=case_seed("cuda_future", ws))


# ---------------------------------------------------------------------------------------------
# 7. errors
# ---------------------------------------------------------------------------------------------

# Sizes through the host relay (<= TCPX_CUDA_HOST_BYTES, 512 KiB), through the op kernel, and
# one on each side of the limit (rank 0 relayed, the others through the op kernel).
MISMATCH_NUMELS = {"1024-vs-1000": (1024, 1000),
                   "1MiB+4KiB-vs-1MiB": ((1 << 18) + 1024, 1 << 18),
                   "512KiB-vs-512KiB+4": (1 << 17, (1 << 17) + 1)}


def rank_mismatch(rank, ws, *, case):
    """Rank 0 all_reduces a different number of elements than the others.  With non-blocking
    CUDA semantics the error can surface at issue, at Work.wait() or once the op has completed
    (is_completed()), so the op is issued async, polled until completed (30 s) and waited."""
    dev = _device(rank)
    a, b = MISMATCH_NUMELS[case]
    t = torch.ones(a if rank == 0 else b, device=dev)
    start = time.monotonic()
    completed = None
    try:
        work = dist.all_reduce(t, async_op=True)
        deadline = time.monotonic() + 30
        while not work.is_completed() and time.monotonic() < deadline:
            time.sleep(0.01)
        completed = work.is_completed()
        work.wait()
        torch.cuda.synchronize()
    except RuntimeError as exc:
        outcome = ("RuntimeError", type(exc).__name__, str(exc)[:500])
    except Exception as exc:  # noqa: BLE001
        outcome = ("other", type(exc).__name__, str(exc)[:500])
    else:
        outcome = ("nothing", "", "")
    elapsed = time.monotonic() - start
    usable = True
    try:
        _check_usable_cuda(rank, ws, dev, f"a size mismatch ({case})")
    except Exception as exc:  # noqa: BLE001
        usable = f"{type(exc).__name__}: {exc}"
    return outcome, completed, round(elapsed, 2), usable


@pytest.mark.parametrize("case", list(MISMATCH_NUMELS))
@pytest.mark.parametrize("ws", WORLD_SIZES, ids=lambda w: f"ws{w}")
def test_mismatch(pools, ws, case):
    """Ranks that disagree on a CUDA all_reduce's size: RuntimeError naming a mismatch on at least
    one rank (nothing but RuntimeError or completion elsewhere), the failed op counts as
    completed, and a correct CUDA all_reduce works on every rank afterwards."""
    _nccl_lacks("no detection of ranks that disagree on a collective's size")
    results = _pool(pools, ws).run(rank_mismatch, timeout=120, case=case)
    problems = []
    for rank, ((kind, exc_type, msg), completed, elapsed, usable) in enumerate(results):
        if kind == "other":
            problems.append(f"rank {rank}: expected RuntimeError or completion, got {exc_type}: "
                            f"{msg!r}")
        if completed is False:
            problems.append(f"rank {rank}: the mismatched op was not completed after 30 s "
                            f"(is_completed() stayed False)")
        if usable is not True:
            problems.append(f"rank {rank}: group unusable afterwards: {usable}")
    if not any(kind == "RuntimeError" and "mismatch" in msg.lower()
               for (kind, _, msg), _, _, _ in results):
        problems.append("no rank raised RuntimeError mentioning 'mismatch': " + "; ".join(
            f"rank {r}: {kind} {exc_type} {msg!r}"
            for r, ((kind, exc_type, msg), _, _, _) in enumerate(results)))
    assert not problems, "\n".join(problems)


# Tensors on different devices in one op: (tcpx only?, description).
MIXED_DEVICE_CASES = {
    "all_gather_into_tensor-cpu-output": False,
    "all_gather_into_tensor-cpu-input": False,
    "all_gather-cpu-output-list": True,
    "all_gather-one-cpu-output": True,
    "all_reduce_coalesced-cpu-and-cuda": True,
    "reduce_scatter_tensor-cpu-input": True,
    "all_to_all_single-cpu-output": True,
}


def _mixed_device_call(case, ws, dev):
    n = 1023
    cuda_in = torch.ones(n, device=dev)
    if case == "all_gather_into_tensor-cpu-output":
        out = torch.zeros(ws * n)
        return lambda: dist.all_gather_into_tensor(out, cuda_in)
    if case == "all_gather_into_tensor-cpu-input":
        out = torch.zeros(ws * n, device=dev)
        cpu_in = torch.ones(n)
        return lambda: dist.all_gather_into_tensor(out, cpu_in)
    if case == "all_gather-cpu-output-list":
        outs = [torch.zeros(n) for _ in range(ws)]
        return lambda: dist.all_gather(outs, cuda_in)
    if case == "all_gather-one-cpu-output":
        outs = [torch.zeros(n, device=dev) for _ in range(ws - 1)] + [torch.zeros(n)]
        return lambda: dist.all_gather(outs, cuda_in)
    if case == "all_reduce_coalesced-cpu-and-cuda":
        ts = [torch.ones(n, device=dev), torch.ones(n)]

        def call():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                dist.all_reduce_coalesced(ts)
        return call
    if case == "reduce_scatter_tensor-cpu-input":
        out = torch.zeros(n, device=dev)
        cpu_full = torch.ones(ws * n)

        def call():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                dist.reduce_scatter_tensor(out, cpu_full)
        return call
    if case == "all_to_all_single-cpu-output":
        out = torch.zeros(ws * n)
        x = torch.ones(ws * n, device=dev)
        return lambda: dist.all_to_all_single(out, x)
    raise ValueError(case)


def rank_mixed_devices(rank, ws, *, case):
    dev = _device(rank)
    result = expect_raises(_mixed_device_call(case, ws, dev), (ValueError, RuntimeError),
                           ["cuda", "cpu", "device"],
                           f"rank {rank}/{ws} {case} (tensors on cpu and {dev} in one op)")
    _check_usable_cuda(rank, ws, dev, f"{result[0]} {result[1]!r}")
    return result


@pytest.mark.parametrize("case", list(MIXED_DEVICE_CASES))
def test_mixed_devices(pools, case):
    """An op whose tensors are partly on the CPU and partly on the GPU raises ValueError (or
    RuntimeError) naming the device, on every rank, and the group stays usable."""
    if MIXED_DEVICE_CASES[case]:
        _nccl_lacks("does not check every tensor's device for this op (undefined behaviour)")
    _pool(pools, 2).run(rank_mixed_devices, timeout=60, case=case)


# ---------------------------------------------------------------------------------------------
# 8. CPU and CUDA tensors on the same group
# ---------------------------------------------------------------------------------------------

def rank_cpu_cuda_interleaved(rank, ws, *, seed):
    dev = _device(rank)
    checks = Checks()
    n = 1023
    devices = ["cpu", "cuda", "cpu", "cuda", "cuda", "cpu"]

    def inputs_of(i):
        return [gen_input(seed + i, r, "float32", n, "small") for r in range(ws)]

    # one after the other, synchronous
    for i, d in enumerate(devices):
        t = inputs_of(i)[rank].to(dev if d == "cuda" else "cpu")
        dist.all_reduce(t)
        got = t.cpu()
        with checks():
            check_all_reduce(got, inputs_of(i), ws, "float32", "SUM", None, True,
                             f"rank {rank}/{ws} all_reduce #{i} on {d} (sync, interleaved)")
    # all in flight at once, waited in reverse order
    base = len(devices)
    ts = [inputs_of(base + i)[rank].to(dev if d == "cuda" else "cpu")
          for i, d in enumerate(devices)]
    works = [dist.all_reduce(t, async_op=True) for t in ts]
    for w in reversed(works):
        w.wait()
    for i, (d, t) in enumerate(zip(devices, ts)):
        got = t.cpu()
        with checks():
            check_all_reduce(got, inputs_of(base + i), ws, "float32", "SUM", None, True,
                             f"rank {rank}/{ws} all_reduce #{i} on {d} (async, all in flight)")
    checks.done()


@pytest.mark.parametrize("ws", WORLD_SIZES, ids=lambda w: f"ws{w}")
def test_cpu_cuda_interleaved(pools, ws):
    """all_reduce on CPU and CUDA tensors of one group, alternating: one after the other, and all
    in flight at once (waited in reverse order); every result right."""
    _nccl_lacks("ProcessGroupNCCL has no CPU tensors")
    _pool(pools, ws).run(rank_cpu_cuda_interleaved, timeout=90,
                         seed=case_seed("cuda_interleaved", ws))

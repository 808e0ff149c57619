"""The remaining c10d operations on CPU tensors, world sizes 2, 3 and 4 (3 is the odd one that
gives uneven splits): reduce, reduce_scatter (list), reduce_scatter_tensor, all_to_all (list),
all_to_all_single, gather, scatter, recv/irecv from any source, batch_isend_irecv, and the
coalesced entry points (all_reduce_coalesced, all_gather_coalesced and the three fast paths of
torch.distributed._coalescing_manager: all_reduce, all_gather_into_tensor, reduce_scatter_tensor).

Every rank regenerates every rank's input from the case's seed (testlib.gen_input) and computes
the expected result with plain torch/numpy (testlib.reference_all_reduce through check_all_reduce
for the reductions, slicing and concatenation for the data movement); the backend under test is
never its own reference.

What is checked besides the values:
  * reduce leaves the input of every rank but dst unchanged, and reduce_scatter /
    reduce_scatter_tensor / all_to_all* / gather / scatter leave their inputs unchanged (tcpx
    guarantees that, like NCCL; gloo overwrites reduce's non-dst inputs, so only that one check is
    skipped under gloo);
  * results land in the caller's tensors (no replacement), also in non-contiguous views, and
    storage outside such a view is untouched (tcpx only: gloo treats views as contiguous);
  * bad arguments raise ValueError naming the argument and leave the group usable (for a
    bad gather_list/scatter_list, which only the root sees, the other ranks may also complete
    or raise RuntimeError, but must not hang); ranks that disagree raise RuntimeError("...mismatch...")
    on at least one rank and the group stays usable on all ranks (tcpx only).

Size classes (testlib.numel_of): "small" is 0, 1 and 1023 elements, looped inside one case, for
every dtype (x every reduce op) at world sizes 2, 3 and 4.  "1MiB+3" (1 MiB of bytes + 3
elements) runs the whole dtype (x op) product at world size 3 and one dtype per element size
(uint8, bfloat16, float32, int64; SUM for the reductions) at 2 and 4; reduce_scatter's list form
runs SUM for every dtype plus every op on float32 at 3 and float32 SUM at 2 and 4;
all_reduce_coalesced runs every op at 3 and SUM at 2 and 4.  Floats run twice: inputs whose
results are exact (compared bit for bit) and random normal ones (compared within a rounding
bound).  For reduce_scatter the size is that of each rank's output (the input has world_size
times as many elements); for all_to_all it is the unit of the per-pair split sizes; for
batch_isend_irecv it is 0, 1 and 1 Mi + 3 elements.  The 64 MiB class (pytest.mark.big) runs only
on this subset by default:
    reduce                 float32 SUM, world size 3
    reduce_scatter_tensor  float32 SUM, world size 3 (64 MiB of input per rank)
    all_to_all_single      uint8, world size 3, equal and uneven splits (~64 MiB per rank)
TCPX_TEST_FULL=1 adds world sizes 2 and 4 to those, reduce int64 MAX, reduce_scatter (list),
gather/scatter and a batch_isend_irecv ring at 64 MiB.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist

from testlib import (DTYPE_NAMES, DTYPES, PREMUL_FACTOR_EXACT, PREMUL_FACTOR_RANDN,
                     REDUCE_OPS, Checks, a2a_units, assert_equal, case_seed, check_all_reduce,
                     check_group_usable, data_kind, dtype_aliases, expect_raises, garbage_like,
                     gen_input, gloo_gap_all_reduce, gloo_gap_dtype, gloo_lacks, input_kind,
                     invalid_pair, is_float, make_op, maybe_skip_gloo, nc_base_shape, nc_mask,
                     nc_view, numel_of, skip_if_gloo)

WORLD_SIZES = (2, 3, 4)
FULL = os.environ.get("TCPX_TEST_FULL", "") == "1"
BIG = "64MiB"
SMALL_NUMELS = (0, 1, 1023)  # the "small" size class, looped inside one case
SIZES = ("small", "1MiB+3")

# What gloo (torch 2.13) does differently; the checks are skipped only under gloo.
GLOO_CLOBBERS_REDUCE_INPUT = "reduce overwrites the input of non-dst ranks"
GLOO_NONCONTIG = "treats non-contiguous tensors as contiguous (wrong results) or rejects them"
GLOO_RUNTIME_ERROR = "raises RuntimeError (not ValueError) for bad arguments"


# The 1MiB+3 class runs the whole dtype (x op) product at world size 3; at world sizes 2 and 4 it
# runs one dtype per element size (uint8, bfloat16, float32, int64), with SUM for the reductions.
MID = "1MiB+3"
MID_DTYPES_ALL_WS = ("uint8", "bfloat16", "float32", "int64")
MID_FULL_WS = 3


def _mid_selected(ws: int, dtype: str, op: str | None = None) -> bool:
    if FULL or ws == MID_FULL_WS:
        return True
    return dtype in MID_DTYPES_ALL_WS and op in (None, "SUM")


def _numels(size: str, dtype: torch.dtype) -> list[int]:
    return list(SMALL_NUMELS) if size == "small" else [numel_of(size, dtype)]


def _timeout_for(size: str) -> float:
    return 300 if size == BIG else 120


def _marks(size: str):
    return [pytest.mark.big] if size == BIG else []


def _premul_factor(op: str, flavor: str):
    if op != "PREMUL_SUM":
        return None
    return PREMUL_FACTOR_EXACT if flavor == "exact" else PREMUL_FACTOR_RANDN


def _flavors(dtype: str, size: str) -> list[str]:
    """Floats run "exact" inputs (bit-exact results) and random normal ones (rounding bound)."""
    return ["exact", "randn"] if is_float(dtype) and size != BIG else ["exact"]


def _reduction_skip(dtype: str, op: str) -> str | None:
    if invalid_pair(dtype, op):
        return "raises RuntimeError (not ValueError) for invalid dtype/op pairs"
    return gloo_gap_all_reduce(dtype, op)


def _invalid_pair_names(dtype: str, op: str) -> list[str]:
    return [op, op.split("_")[0], *dtype_aliases(DTYPES[dtype])]



# ---------------------------------------------------------------------------------------------
# reduce
# ---------------------------------------------------------------------------------------------

def rank_reduce(rank, ws, *, dtype, op, size, seed, all_dsts):
    dt = DTYPES[dtype]
    why_invalid = invalid_pair(dtype, op)
    if why_invalid:
        x = torch.zeros(1023, dtype=dt)
        factor = PREMUL_FACTOR_EXACT if op == "PREMUL_SUM" else None
        msg = expect_raises(lambda: dist.reduce(x, dst=ws - 1, op=make_op(op, factor)),
                            ValueError, _invalid_pair_names(dtype, op),
                            f"reduce({op}) on {dtype} ({why_invalid})")[1]
        check_group_usable(rank, ws, f"ValueError {msg!r}")
        return
    checks = Checks()
    for n in _numels(size, dt):
        for fi, flavor in enumerate(_flavors(dtype, size)):
            kind = input_kind(dtype, op, flavor)
            factor = _premul_factor(op, flavor)
            s = seed + 7 * n + fi
            mine = gen_input(s, rank, dtype, n, kind)
            dsts = range(ws) if all_dsts else [(seed + fi) % ws]
            for dst in dsts:
                t = mine.clone()
                ptr = t.data_ptr()
                async_op = dst % 2 == 1  # odd roots through Work.wait()
                ctx = (f"rank {rank}/{ws} reduce({op}, dst={dst}{', async' if async_op else ''}) "
                       f"{dtype} n={n} {kind}")
                work = dist.reduce(t, dst=dst, op=make_op(op, factor), async_op=async_op)
                if async_op:
                    work.wait()
                with checks():
                    assert t.data_ptr() == ptr and t.dtype == dt and t.numel() == n, \
                        ctx + ": tensor replaced"
                    if rank == dst:
                        # Freshly generated inputs (the reference may work in place on them).
                        everyone = [gen_input(s, r, dtype, n, kind) for r in range(ws)]
                        check_all_reduce(t, everyone, ws, dtype, op, factor, flavor == "exact",
                                         ctx)
                        del everyone
                    elif not gloo_lacks(GLOO_CLOBBERS_REDUCE_INPUT):
                        assert_equal(t, mine, ctx + ": the input of a non-dst rank was modified")
                del t
            del mine
    checks.done()


def _big_reduce_selected(ws, dtype, op):
    if FULL:
        return (dtype, op) in (("float32", "SUM"), ("int64", "MAX"))
    return ws == 3 and (dtype, op) == ("float32", "SUM")


def _reduction_cases(big_selected, mid_selected=_mid_selected):
    for ws in WORLD_SIZES:
        for size in (*SIZES, BIG):
            for dtype in DTYPE_NAMES:
                for op in REDUCE_OPS:
                    if size == BIG and not big_selected(ws, dtype, op):
                        continue
                    if size == MID and not mid_selected(ws, dtype, op):
                        continue
                    if invalid_pair(dtype, op) and size != "small":
                        continue  # the ValueError comes before any data moves: once is enough
                    yield pytest.param(ws, size, dtype, op, marks=_marks(size),
                                       id=f"ws{ws}-{size}-{dtype}-{op}")


@pytest.mark.parametrize("ws,size,dtype,op", list(_reduction_cases(_big_reduce_selected)))
def test_reduce(pools, ws, size, dtype, op):
    """reduce gives dst the reference, leaves the others' inputs unchanged; dst = every rank in
    turn for the small sizes, one rank per case above that; ValueError for invalid pairs."""
    maybe_skip_gloo(_reduction_skip(dtype, op))
    pools.get(ws).run(rank_reduce, timeout=_timeout_for(size), dtype=dtype, op=op, size=size,
                      seed=case_seed("reduce", ws, size, dtype, op),
                      all_dsts=size == "small")


# ---------------------------------------------------------------------------------------------
# reduce_scatter (list) and reduce_scatter_tensor
# ---------------------------------------------------------------------------------------------

def _rs_numels(size: str, dt: torch.dtype, ws: int) -> list[int]:
    """Elements of each rank's output; the 64 MiB class means 64 MiB of input per rank."""
    if size == BIG:
        return [numel_of(BIG, dt) // ws]
    return _numels(size, dt)


def _rs_chunk(seed, src, i, dtype, n, kind):
    """Chunk i (the part for rank i) of rank src's reduce_scatter input."""
    return gen_input(seed + 7919 * (i + 1), src, dtype, n, kind)


def _rs_input(seed, src, ws, dtype, n, kind):
    return torch.cat([_rs_chunk(seed, src, i, dtype, n, kind) for i in range(ws)])


def _reduce_scatter_call(form, out, full, ws, n, op):
    """Issue the op; return the inputs that must stay unchanged, as handed to the call."""
    if form == "list":
        # Separate tensors, not views of one buffer.
        inputs = [full[i * n:(i + 1) * n].clone() for i in range(ws)]
        dist.reduce_scatter(out, inputs, op=op)
        return inputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for reduce_scatter_single
        dist.reduce_scatter_tensor(out, full, op=op)
    return [full]


def rank_reduce_scatter(rank, ws, *, form, dtype, op, size, seed):
    dt = DTYPES[dtype]
    fn_name = "reduce_scatter" if form == "list" else "reduce_scatter_tensor"
    why_invalid = invalid_pair(dtype, op)
    if why_invalid:
        n = 1023
        factor = PREMUL_FACTOR_EXACT if op == "PREMUL_SUM" else None
        out0 = torch.zeros(n, dtype=dt)
        full0 = torch.zeros(ws * n, dtype=dt)
        msg = expect_raises(
            lambda: _reduce_scatter_call(form, out0, full0, ws, n, make_op(op, factor)),
            ValueError, _invalid_pair_names(dtype, op),
            f"{fn_name}({op}) on {dtype} ({why_invalid})")[1]
        check_group_usable(rank, ws, f"ValueError {msg!r}")
        return
    checks = Checks()
    for n in _rs_numels(size, dt, ws):
        for fi, flavor in enumerate(_flavors(dtype, size)):
            kind = input_kind(dtype, op, flavor)
            factor = _premul_factor(op, flavor)
            s = seed + 7 * n + fi
            full = _rs_input(s, rank, ws, dtype, n, kind)
            out = garbage_like(torch.empty(n, dtype=dt), s)
            ptr = out.data_ptr()
            ctx = f"rank {rank}/{ws} {fn_name}({op}) {dtype} n={n} (x{ws} input) {kind}"
            inputs = _reduce_scatter_call(form, out, full, ws, n, make_op(op, factor))
            with checks():
                assert out.data_ptr() == ptr and out.numel() == n, ctx + ": output replaced"
                if form == "list":
                    for i, x in enumerate(inputs):
                        assert_equal(x, full[i * n:(i + 1) * n], f"{ctx}: input_list[{i}] modified")
                else:
                    assert_equal(full, _rs_input(s, rank, ws, dtype, n, kind),
                                 ctx + ": input modified")
            del inputs, full
            with checks():
                chunks = [_rs_chunk(s, r, rank, dtype, n, kind) for r in range(ws)]
                check_all_reduce(out, chunks, ws, dtype, op, factor, flavor == "exact", ctx)
            del out
    checks.done()


def _big_rs_selected(form):
    def selected(ws, dtype, op):
        if (dtype, op) != ("float32", "SUM"):
            return False
        if FULL:
            return form == "tensor" or ws == 3
        return form == "tensor" and ws == 3
    return selected


def _mid_rs_list_selected(ws, dtype, op):
    """The list form at 1MiB+3: SUM for every dtype and every op on float32 at world size 3,
    float32 SUM at world sizes 2 and 4 (the reductions are the tensor form's)."""
    if FULL:
        return True
    if ws == MID_FULL_WS:
        return op == "SUM" or dtype == "float32"
    return (dtype, op) == ("float32", "SUM")


def _rs_cases():
    for form in ("list", "tensor"):
        mid = _mid_rs_list_selected if form == "list" else _mid_selected
        for p in _reduction_cases(_big_rs_selected(form), mid):
            ws, size, dtype, op = p.values
            yield pytest.param(form, ws, size, dtype, op, marks=p.marks,
                               id=f"{form}-{p.id}")


@pytest.mark.parametrize("form,ws,size,dtype,op", list(_rs_cases()))
def test_reduce_scatter(pools, form, ws, size, dtype, op):
    """reduce_scatter (list input) and reduce_scatter_tensor (flat input of world_size x n):
    rank r gets the reduction of every rank's r-th chunk; inputs unchanged."""
    maybe_skip_gloo(_reduction_skip(dtype, op))
    pools.get(ws).run(rank_reduce_scatter, timeout=_timeout_for(size), form=form, dtype=dtype,
                      op=op, size=size, seed=case_seed("reduce_scatter", form, ws, size, dtype, op))


# ---------------------------------------------------------------------------------------------
# all_to_all and all_to_all_single
# ---------------------------------------------------------------------------------------------
# Split patterns (units are elements, or rows of COLS elements for the "-2d" variants):
#   equal   every pair exchanges n (all_to_all_single gets split sizes None)
#   uneven  (0, n, n // 2 + 1, 2n + 1)[(src + 2 dst) % 4]: zero, odd and unequal splits
#   onehot  each rank sends only to its right neighbour (n + src units), zero to everyone else
A2A_COLS = 3



def _a2a_block(seed, src, dst, dtype, units, two_d):
    """What ``src`` sends to ``dst``: any rank can regenerate it."""
    numel = units * A2A_COLS if two_d else units
    t = gen_input(seed + 7919 * (dst + 1), src, dtype, numel, data_kind(dtype))
    return t.reshape(units, A2A_COLS) if two_d else t


def _a2a_layout(pattern_name: str, n: int):
    base, _, dims = pattern_name.partition("-")
    two_d = dims == "2d"
    units = math.ceil(n / A2A_COLS) if two_d else n
    return base, two_d, units


def rank_all_to_all_single(rank, ws, *, dtype, size, seed, patterns):
    dt = DTYPES[dtype]
    ns = [numel_of(BIG, dt) // ws] if size == BIG else _numels(size, dt)
    checks = Checks()
    for n in ns:
        for pattern_name in patterns:
            pattern, two_d, units = _a2a_layout(pattern_name, n)
            s = seed + 13 * n
            in_splits = [a2a_units(pattern, rank, d, units, ws) for d in range(ws)]
            out_splits = [a2a_units(pattern, src, rank, units, ws) for src in range(ws)]
            x = torch.cat([_a2a_block(s, rank, d, dtype, in_splits[d], two_d)
                           for d in range(ws)])
            x_before = x.clone()
            tail = (A2A_COLS,) if two_d else ()
            out = garbage_like(torch.empty((sum(out_splits), *tail), dtype=dt), s)
            ptr = out.data_ptr()
            ctx = (f"rank {rank}/{ws} all_to_all_single {pattern_name} {dtype} unit={units} "
                   f"in_splits={in_splits} out_splits={out_splits}")
            if pattern == "equal":
                dist.all_to_all_single(out, x)
            else:
                dist.all_to_all_single(out, x, output_split_sizes=out_splits,
                                       input_split_sizes=in_splits)
            with checks():
                assert out.data_ptr() == ptr, ctx + ": output replaced"
                assert_equal(x, x_before, ctx + ": input modified")
                offset = 0
                for src in range(ws):
                    k = out_splits[src]
                    assert_equal(out[offset:offset + k],
                                 _a2a_block(s, src, rank, dtype, k, two_d),
                                 f"{ctx}: block from rank {src}")
                    offset += k
            del x, x_before, out
    checks.done()


def rank_all_to_all_list(rank, ws, *, dtype, size, seed, patterns):
    dt = DTYPES[dtype]
    checks = Checks()
    for n in _numels(size, dt):
        for pattern in patterns:
            s = seed + 13 * n
            in_units = [a2a_units(pattern, rank, d, n, ws) for d in range(ws)]
            out_units = [a2a_units(pattern, src, rank, n, ws) for src in range(ws)]
            inputs = [_a2a_block(s, rank, d, dtype, in_units[d], False) for d in range(ws)]
            before = [x.clone() for x in inputs]
            outputs = [garbage_like(torch.empty(k, dtype=dt), s + i)
                       for i, k in enumerate(out_units)]
            ptrs = [o.data_ptr() for o in outputs]
            ctx = f"rank {rank}/{ws} all_to_all {pattern} {dtype} in={in_units} out={out_units}"
            dist.all_to_all(outputs, inputs)
            with checks():
                for src in range(ws):
                    assert outputs[src].data_ptr() == ptrs[src], f"{ctx}: output[{src}] replaced"
                    assert_equal(outputs[src],
                                 _a2a_block(s, src, rank, dtype, out_units[src], False),
                                 f"{ctx}: output[{src}]")
                    assert_equal(inputs[src], before[src], f"{ctx}: input[{src}] modified")
    checks.done()


A2A_SINGLE_PATTERNS = ["equal", "uneven", "onehot", "equal-2d", "uneven-2d"]


def _big_a2a_selected(ws, dtype):
    return dtype == "uint8" and (FULL or ws == 3)


def _a2a_cases():
    for ws in WORLD_SIZES:
        for size in (*SIZES, BIG):
            for dtype in DTYPE_NAMES:
                if size == BIG and not _big_a2a_selected(ws, dtype):
                    continue
                if size == MID and not _mid_selected(ws, dtype):
                    continue
                yield pytest.param(ws, size, dtype, marks=_marks(size),
                                   id=f"ws{ws}-{size}-{dtype}")


@pytest.mark.parametrize("ws,size,dtype", list(_a2a_cases()))
def test_all_to_all_single(pools, ws, size, dtype):
    """all_to_all_single with equal (None) splits, uneven splits with zero-size ones, one-hot
    splits, and dim-0 splitting of a 2-D tensor: block (src -> dst) lands in order on dst."""
    maybe_skip_gloo(gloo_gap_dtype(dtype))
    patterns = ["equal", "uneven"] if size == BIG else A2A_SINGLE_PATTERNS
    pools.get(ws).run(rank_all_to_all_single, timeout=_timeout_for(size), dtype=dtype, size=size,
                      seed=case_seed("a2a_single", ws, size, dtype), patterns=patterns)


@pytest.mark.parametrize("sizes", ["equal", "different"])
@pytest.mark.parametrize("ws,size,dtype", [p for p in _a2a_cases() if BIG not in p.id])
def test_all_to_all_list(pools, ws, size, dtype, sizes):
    """all_to_all with lists of tensors: the same size everywhere, or a different (possibly
    empty) size per destination."""
    maybe_skip_gloo(gloo_gap_dtype(dtype) or (
        "all_to_all requires tensors of one size ('invalid tensor size')"
        if sizes == "different" else None))
    patterns = ["equal"] if sizes == "equal" else ["uneven", "onehot"]
    pools.get(ws).run(rank_all_to_all_list, dtype=dtype, size=size, patterns=patterns,
                      seed=case_seed("a2a_list", ws, size, dtype, sizes))


# ---------------------------------------------------------------------------------------------
# gather and scatter
# ---------------------------------------------------------------------------------------------

def rank_gather(rank, ws, *, dtype, size, seed):
    dt = DTYPES[dtype]
    kind = data_kind(dtype)
    checks = Checks()
    for n in _numels(size, dt):
        for root in range(ws):
            s = seed + 101 * root + 7 * n
            x = gen_input(s, rank, dtype, n, kind)
            gather_list = ([garbage_like(x, s + r) for r in range(ws)] if rank == root else None)
            ptrs = [g.data_ptr() for g in gather_list] if gather_list else None
            async_op = root % 2 == 1
            ctx = f"rank {rank}/{ws} gather(dst={root}{', async' if async_op else ''}) {dtype} n={n}"
            work = dist.gather(x, gather_list, dst=root, async_op=async_op)
            if async_op:
                work.wait()
            with checks():
                assert_equal(x, gen_input(s, rank, dtype, n, kind), ctx + ": input modified")
                if rank == root:
                    for r in range(ws):
                        assert gather_list[r].data_ptr() == ptrs[r], \
                            f"{ctx}: gather_list[{r}] replaced"
                        assert_equal(gather_list[r], gen_input(s, r, dtype, n, kind),
                                     f"{ctx}: gather_list[{r}]")
    checks.done()


def rank_scatter(rank, ws, *, dtype, size, seed):
    dt = DTYPES[dtype]
    kind = data_kind(dtype)
    checks = Checks()
    for n in _numels(size, dt):
        for root in range(ws):
            s = seed + 101 * root + 7 * n
            # scatter_list[d] of the root is "rank d's block": gen_input(s, d, ...).
            scatter_list = ([gen_input(s, d, dtype, n, kind) for d in range(ws)]
                            if rank == root else None)
            out = garbage_like(torch.empty(n, dtype=dt), s + 3)
            ptr = out.data_ptr()
            async_op = root % 2 == 1
            ctx = f"rank {rank}/{ws} scatter(src={root}{', async' if async_op else ''}) {dtype} n={n}"
            work = dist.scatter(out, scatter_list, src=root, async_op=async_op)
            if async_op:
                work.wait()
            with checks():
                assert out.data_ptr() == ptr, ctx + ": output replaced"
                assert_equal(out, gen_input(s, rank, dtype, n, kind), ctx)
                if rank == root:
                    for d in range(ws):
                        assert_equal(scatter_list[d], gen_input(s, d, dtype, n, kind),
                                     f"{ctx}: scatter_list[{d}] modified")
    checks.done()


def _gather_scatter_cases():
    for ws in WORLD_SIZES:
        sizes = (*SIZES, BIG) if FULL else SIZES
        for size in sizes:
            for dtype in DTYPE_NAMES:
                if size == BIG and dtype != "uint8":
                    continue
                if size == MID and not _mid_selected(ws, dtype):
                    continue
                yield pytest.param(ws, size, dtype, marks=_marks(size),
                                   id=f"ws{ws}-{size}-{dtype}")


@pytest.mark.parametrize("ws,size,dtype", list(_gather_scatter_cases()))
def test_gather(pools, ws, size, dtype):
    """gather to every rank in turn (gather_list only on the root, None elsewhere)."""
    maybe_skip_gloo(gloo_gap_dtype(dtype))
    pools.get(ws).run(rank_gather, timeout=_timeout_for(size), dtype=dtype, size=size,
                      seed=case_seed("gather", ws, size, dtype))


@pytest.mark.parametrize("ws,size,dtype", list(_gather_scatter_cases()))
def test_scatter(pools, ws, size, dtype):
    """scatter from every rank in turn (scatter_list only on the root, None elsewhere)."""
    maybe_skip_gloo(gloo_gap_dtype(dtype))
    pools.get(ws).run(rank_scatter, timeout=_timeout_for(size), dtype=dtype, size=size,
                      seed=case_seed("scatter", ws, size, dtype))


# ---------------------------------------------------------------------------------------------
# recv / irecv from any source
# ---------------------------------------------------------------------------------------------
# recv(t) without src goes to ProcessGroup.recv_anysource -> Backend::recvAnysource; recv() then
# reads the sender from Work._source_rank() (Backend Work::sourceRank()) and returns it.

def rank_recv_anysource(rank, ws, *, dtype, n, seed, mode, msgs, tag):
    dt = DTYPES[dtype]
    kind = data_kind(dtype)

    def message(src, k):  # the k-th message of sender src
        return gen_input(seed + 17 * k, src, dtype, n, kind)

    if rank != 0:
        for k in range(msgs):
            dist.send(message(rank, k), dst=0, tag=tag)
        return None
    total = (ws - 1) * msgs
    sources = []
    bufs = []
    if mode == "recv":
        for i in range(total):
            buf = garbage_like(torch.empty(n, dtype=dt), seed + i)
            src = dist.recv(buf, tag=tag)
            assert isinstance(src, int), f"recv returned {src!r}, not the sender's rank"
            sources.append(src)
            bufs.append(buf)
    else:
        bufs = [garbage_like(torch.empty(n, dtype=dt), seed + i) for i in range(total)]
        works = [dist.irecv(b, tag=tag) for b in bufs]
        for w in reversed(works):
            w.wait()
        sources = [w._source_rank() for w in works]
    ctx = f"{mode} from any source, {dtype} n={n} tag={tag}, {msgs} message(s) per sender"
    assert sorted(sources) == sorted(r for r in range(1, ws) for _ in range(msgs)), \
        f"{ctx}: source ranks {sources}, expected each of 1..{ws - 1} exactly {msgs} time(s)"
    # Messages of one sender are matched in the order it sent them (and receives were posted).
    seen = {}
    for i, (src, buf) in enumerate(zip(sources, bufs)):
        k = seen.get(src, 0)
        seen[src] = k + 1
        assert_equal(buf, message(src, k), f"{ctx}: receive #{i} (from rank {src}, message {k})")
    return sources


ANYSOURCE_CASES = [  # dtype, size class, messages per sender, tag
    ("float32", "n1023", 1, 0),
    ("int64", "n1", 1, 0),
    ("bool", "n0", 1, 0),
    ("bfloat16", "1MiB+3", 1, 0),
    ("float32", "n1023", 3, 0),
    ("uint8", "1MiB+3", 2, 0),
    ("float64", "n1023", 2, 9),
]


@pytest.mark.parametrize("mode", ["recv", "irecv"])
@pytest.mark.parametrize("dtype,size,msgs,tag", [
    pytest.param(*c, id=f"{c[0]}-{c[1]}-{c[2]}msg-tag{c[3]}") for c in ANYSOURCE_CASES])
@pytest.mark.parametrize("ws", WORLD_SIZES, ids=lambda w: f"ws{w}")
def test_recv_anysource(pools, ws, mode, dtype, size, msgs, tag):
    """recv(t)/irecv(t) without src: every other rank sends to rank 0, which learns each sender
    (recv's return value / Work._source_rank()) exactly once per message, in per-sender order."""
    maybe_skip_gloo(gloo_gap_dtype(dtype) or (
        "an empty message from any source fails ('enforce fail ... offset < this->size')"
        if size == "n0" else None))
    pools.get(ws).run(rank_recv_anysource, dtype=dtype, n=numel_of(size, DTYPES[dtype]),
                      msgs=msgs, mode=mode, tag=tag,
                      seed=case_seed("anysource", ws, mode, dtype, size, msgs))


# ---------------------------------------------------------------------------------------------
# batch_isend_irecv
# ---------------------------------------------------------------------------------------------

def rank_batch_ring(rank, ws, *, dtype, n, seed):
    right, left = (rank + 1) % ws, (rank - 1) % ws
    kind = data_kind(dtype)
    send = gen_input(seed, rank, dtype, n, kind)
    recv = garbage_like(send, seed + 1)
    ops = [dist.P2POp(dist.isend, send, right), dist.P2POp(dist.irecv, recv, left)]
    if rank % 2:
        ops.reverse()  # the order of sends and receives within a batch must not matter
    works = dist.batch_isend_irecv(ops)
    for w in works:
        w.wait()
    ctx = f"rank {rank}/{ws} batch_isend_irecv ring {dtype} n={n}"
    assert_equal(recv, gen_input(seed, left, dtype, n, kind), ctx + ": received from the left")
    assert_equal(send, gen_input(seed, rank, dtype, n, kind), ctx + ": send buffer modified")


def rank_batch_all_pairs(rank, ws, *, dtype, n, seed):
    # Two messages (n and n // 3 + 1 elements) in each direction between every pair; the two
    # messages of one (src, dst) pair must be matched in order.
    kind = data_kind(dtype)
    sizes = (n, n // 3 + 1)

    def message(src, dst, k):
        return gen_input(seed + 31 * dst + k, src, dtype, sizes[k], kind)

    sends, recvs, bufs = [], [], {}
    for peer in range(ws):
        if peer == rank:
            continue
        for k in range(2):
            sends.append(dist.P2POp(dist.isend, message(rank, peer, k), peer))
            bufs[(peer, k)] = garbage_like(message(peer, rank, k), seed + peer + k)
            recvs.append(dist.P2POp(dist.irecv, bufs[(peer, k)], peer))
    ops = recvs + sends if rank % 2 else sends + recvs
    works = dist.batch_isend_irecv(ops)
    for w in reversed(works):
        w.wait()
    for (peer, k), buf in bufs.items():
        assert_equal(buf, message(peer, rank, k),
                     f"rank {rank}/{ws} batch_isend_irecv all-pairs {dtype}: message {k} from {peer}")


def _batch_cases():
    for ws in WORLD_SIZES:
        for pattern in ("ring", "all-pairs"):
            for n_name, n in (("n0", 0), ("n1", 1), ("1Mi+3", (1 << 20) + 3)):
                for dtype in ("float32", "bfloat16", "int64", "bool"):
                    yield pytest.param(ws, pattern, n, dtype,
                                       id=f"ws{ws}-{pattern}-{n_name}-{dtype}")
        if FULL:
            yield pytest.param(ws, "ring", numel_of(BIG, torch.float32), "float32",
                               marks=_marks(BIG), id=f"ws{ws}-ring-{BIG}-float32")


@pytest.mark.parametrize("ws,pattern,n,dtype", list(_batch_cases()))
def test_batch_isend_irecv(pools, ws, pattern, n, dtype):
    """batch_isend_irecv: a ring (send right, receive left) and an all-pairs exchange (two
    messages each way between every pair, matched in order); sizes in elements."""
    fn = rank_batch_ring if pattern == "ring" else rank_batch_all_pairs
    pools.get(ws).run(fn, timeout=300 if n > (1 << 22) else 120, dtype=dtype, n=n,
                      seed=case_seed("batch", pattern, ws, n, dtype))


# ---------------------------------------------------------------------------------------------
# coalesced entry points
# ---------------------------------------------------------------------------------------------
# all_reduce_coalesced / all_gather_coalesced are deprecated (FutureWarning) but present in torch
# 2.13; with async_op=True they return a Future (work.get_future()), not a Work.

COALESCED_NUMELS = (1023, 0, 1, 5003)


def _coalesced_numels(dtype: str, with_big: bool) -> list[int]:
    numels = list(COALESCED_NUMELS)
    if with_big:
        numels.append(numel_of("1MiB+3", DTYPES[dtype]))
    return numels


def rank_all_reduce_coalesced(rank, ws, *, dtype, op, numels, seed):
    dt = DTYPES[dtype]
    factor = _premul_factor(op, "exact")
    why_invalid = invalid_pair(dtype, op)
    if why_invalid:
        ts = [torch.zeros(k, dtype=dt) for k in numels]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            msg = expect_raises(lambda: dist.all_reduce_coalesced(ts, op=make_op(op, factor)),
                                ValueError, _invalid_pair_names(dtype, op),
                                f"all_reduce_coalesced({op}) on {dtype} ({why_invalid})")[1]
        check_group_usable(rank, ws, f"ValueError {msg!r}")
        return
    kind = input_kind(dtype, op)
    checks = Checks()
    for async_op in (False, True):
        s = seed + 1000 * async_op
        tensors = [gen_input(s + i, rank, dtype, k, kind) for i, k in enumerate(numels)]
        ptrs = [t.data_ptr() for t in tensors]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ret = dist.all_reduce_coalesced(tensors, op=make_op(op, factor), async_op=async_op)
        if async_op:
            ret.wait()  # a Future
        for i, (t, k) in enumerate(zip(tensors, numels)):
            ctx = (f"rank {rank}/{ws} all_reduce_coalesced({op}{', async' if async_op else ''}) "
                   f"{dtype}: tensor {i} of {numels}")
            with checks():
                assert t.data_ptr() == ptrs[i], ctx + ": replaced"
                check_all_reduce(t, [gen_input(s + i, r, dtype, k, kind) for r in range(ws)], ws,
                                 dtype, op, factor, True, ctx)
    checks.done()


def _arc_cases():
    """Every dtype x op at world size 3, SUM for every dtype at 2 and 4; a batch with a 1MiB+3
    tensor per the 1MiB+3 selection."""
    for ws in WORLD_SIZES:
        for dtype in DTYPE_NAMES:
            for op in REDUCE_OPS:
                if FULL or ws == MID_FULL_WS or op == "SUM":
                    yield pytest.param(ws, dtype, op, False, id=f"ws{ws}-{dtype}-{op}")
            if _mid_selected(ws, dtype, "SUM"):
                yield pytest.param(ws, dtype, "SUM", True, id=f"ws{ws}-{dtype}-SUM-with-1MiB+3")


@pytest.mark.parametrize("ws,dtype,op,with_big", list(_arc_cases()))
def test_all_reduce_coalesced(pools, ws, dtype, op, with_big):
    """all_reduce_coalesced on tensors of different sizes (incl. empty), sync and async."""
    maybe_skip_gloo(_reduction_skip(dtype, op))
    pools.get(ws).run(rank_all_reduce_coalesced, dtype=dtype, op=op,
                      numels=_coalesced_numels(dtype, with_big),
                      seed=case_seed("arc", ws, dtype, op, with_big))


AGC_SHAPES = [(1023,), (0,), (1,), (31, 33), (2, 0, 3), (5003,)]


def rank_all_gather_coalesced(rank, ws, *, dtype, seed, big_numel):
    kind = data_kind(dtype)
    shapes = AGC_SHAPES + ([(big_numel,)] if big_numel else [])

    def block(r, i, s):
        return gen_input(s + i, r, dtype, math.prod(shapes[i]), kind).reshape(shapes[i])

    checks = Checks()
    for async_op in (False, True):
        s = seed + 1000 * async_op
        inputs = [block(rank, i, s) for i in range(len(shapes))]
        outputs = [[garbage_like(x, s + 7 * r + i) for i, x in enumerate(inputs)]
                   for r in range(ws)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ret = dist.all_gather_coalesced(outputs, inputs, async_op=async_op)
        if async_op:
            ret.wait()  # a Future
        for i in range(len(shapes)):
            ctx = (f"rank {rank}/{ws} all_gather_coalesced{' async' if async_op else ''} "
                   f"{dtype}: tensor {i} {shapes[i]}")
            with checks():
                assert_equal(inputs[i], block(rank, i, s), ctx + ": input modified")
                for r in range(ws):
                    assert tuple(outputs[r][i].shape) == shapes[i], ctx + f": output[{r}] reshaped"
                    assert_equal(outputs[r][i], block(r, i, s), f"{ctx}: from rank {r}")
    checks.done()


def _agc_cases():
    for ws in WORLD_SIZES:
        for dtype in DTYPE_NAMES:
            yield pytest.param(ws, dtype, False, id=f"ws{ws}-{dtype}")
            if _mid_selected(ws, dtype):
                yield pytest.param(ws, dtype, True, id=f"ws{ws}-{dtype}-with-1MiB+3")


@pytest.mark.parametrize("ws,dtype,with_big", list(_agc_cases()))
def test_all_gather_coalesced(pools, ws, dtype, with_big):
    """all_gather_coalesced of tensors of different shapes (incl. empty), sync and async."""
    maybe_skip_gloo(gloo_gap_dtype(dtype))
    pools.get(ws).run(rank_all_gather_coalesced, dtype=dtype,
                      big_numel=numel_of("1MiB+3", DTYPES[dtype]) if with_big else 0,
                      seed=case_seed("agc", ws, dtype, with_big))


def rank_coalescing_manager(rank, ws, *, coll, dtype, op, device, numels, seed):
    dt = DTYPES[dtype]
    dev = torch.device(device) if device else None
    factor = _premul_factor(op, "exact")
    kind = input_kind(dtype, op) if coll != "all_gather_into_tensor" else data_kind(dtype)
    checks = Checks()
    for async_ops in (False, True):
        s = seed + 1000 * async_ops
        ctx0 = (f"rank {rank}/{ws} _coalescing_manager(device={device}, async_ops={async_ops}) "
                f"x {len(numels)} {coll}({op if coll != 'all_gather_into_tensor' else ''}) {dtype}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if coll == "all_reduce":
                tensors = [gen_input(s + i, rank, dtype, k, kind) for i, k in enumerate(numels)]
                with dist._coalescing_manager(group=None, device=dev, async_ops=async_ops) as cm:
                    for t in tensors:
                        dist.all_reduce(t, op=make_op(op, factor))
            elif coll == "all_gather_into_tensor":
                inputs = [gen_input(s + i, rank, dtype, k, kind) for i, k in enumerate(numels)]
                outputs = [garbage_like(torch.empty(ws * k, dtype=dt), s + i)
                           for i, k in enumerate(numels)]
                with dist._coalescing_manager(group=None, device=dev, async_ops=async_ops) as cm:
                    for o, x in zip(outputs, inputs):
                        dist.all_gather_into_tensor(o, x)
            else:
                inputs = [_rs_input(s + i, rank, ws, dtype, k, kind) for i, k in enumerate(numels)]
                outputs = [garbage_like(torch.empty(k, dtype=dt), s + i)
                           for i, k in enumerate(numels)]
                with dist._coalescing_manager(group=None, device=dev, async_ops=async_ops) as cm:
                    for o, x in zip(outputs, inputs):
                        dist.reduce_scatter_tensor(o, x, op=make_op(op, factor))
        if async_ops:
            with checks():
                assert cm.works, ctx0 + ": nothing to wait for (cm.works is empty)"
            cm.wait()
        for i, k in enumerate(numels):
            ctx = f"{ctx0}: tensor {i} of {numels}"
            with checks():
                if coll == "all_reduce":
                    check_all_reduce(tensors[i], [gen_input(s + i, r, dtype, k, kind)
                                                  for r in range(ws)],
                                     ws, dtype, op, factor, True, ctx)
                elif coll == "all_gather_into_tensor":
                    assert_equal(inputs[i], gen_input(s + i, rank, dtype, k, kind),
                                 ctx + ": input modified")
                    for r in range(ws):
                        assert_equal(outputs[i][r * k:(r + 1) * k],
                                     gen_input(s + i, r, dtype, k, kind), f"{ctx}: block {r}")
                else:
                    assert_equal(inputs[i], _rs_input(s + i, rank, ws, dtype, k, kind),
                                 ctx + ": input modified")
                    chunks = [_rs_chunk(s + i, r, rank, dtype, k, kind) for r in range(ws)]
                    check_all_reduce(outputs[i], chunks, ws, dtype, op, factor, True, ctx)
    checks.done()


CM_DTYPES = ["float32", "bfloat16", "float64", "int64", "uint8", "bool"]
CM_EXTRA_OPS = [("float32", "MAX"), ("int32", "MIN"), ("bfloat16", "AVG"),
                ("float32", "PREMUL_SUM"), ("int16", "BXOR")]
CM_BIG_DTYPES = ("float32", "uint8")


def _cm_cases():
    for ws in WORLD_SIZES:
        for device in (None, "cpu"):
            dev_id = "dev-cpu" if device else "dev-none"
            for coll in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor"):
                pairs = [(d, "SUM") for d in CM_DTYPES]
                if coll != "all_gather_into_tensor":
                    pairs += CM_EXTRA_OPS
                for dtype, op in pairs:
                    yield pytest.param(ws, device, coll, dtype, op,
                                       id=f"ws{ws}-{dev_id}-{coll}-{dtype}-{op}")


@pytest.mark.parametrize("ws,device,coll,dtype,op", list(_cm_cases()))
def test_coalescing_manager(pools, ws, device, coll, dtype, op):
    """_coalescing_manager around several all_reduce / all_gather_into_tensor /
    reduce_scatter_tensor calls of different sizes (incl. empty): the fast-path coalesced backend
    ops; async_ops=False and True (cm.wait()); device=None and device=cpu (start/endCoalescing)."""
    maybe_skip_gloo((gloo_gap_dtype(dtype) if coll == "all_gather_into_tensor"
                     else gloo_gap_all_reduce(dtype, op))
                    or ("does not implement startCoalescing (device=cpu)" if device else None))
    numels = list(COALESCED_NUMELS)
    if dtype in CM_BIG_DTYPES and op == "SUM":
        numels.insert(2, numel_of("1MiB+3", DTYPES[dtype]))
    pools.get(ws).run(rank_coalescing_manager, coll=coll, dtype=dtype, op=op, device=device,
                      numels=numels, seed=case_seed("cm", ws, device, coll, dtype, op))


# ---------------------------------------------------------------------------------------------
# non-contiguous tensors (tcpx only)
# ---------------------------------------------------------------------------------------------
# Layouts: "stride2" (every other element of a 1-D tensor), "columns" (inner columns of a 2-D
# tensor: rows have gaps) and "transposed" (a transposed 2-D view over all of its storage).

NC_ROWS, NC_COLS = 31, 35



def _nc_make(layout, rows, cols, dtype, seed, rank, kind):
    """A base filled from (seed, rank) and the view into it (shape (rows, cols), or 1-D)."""
    shape = nc_base_shape(layout, rows, cols)
    base = gen_input(seed, rank, dtype, math.prod(shape), kind).reshape(shape)
    return base, nc_view(layout, base)


def rank_noncontig_reduce(rank, ws, *, layout, dtype, seed):
    kind = input_kind(dtype, "SUM")
    checks = Checks()
    for dst in range(ws):
        s = seed + dst
        base, view = _nc_make(layout, NC_ROWS, NC_COLS, dtype, s, rank, kind)
        assert not view.is_contiguous()
        base_before = base.clone()
        dist.reduce(view, dst=dst, op=dist.ReduceOp.SUM)
        ctx = f"rank {rank}/{ws} reduce(dst={dst}) into a {layout} view of {dtype}"
        with checks():
            mask = nc_mask(layout, base)
            assert_equal(base[mask], base_before[mask], ctx + ": storage outside the view changed")
            if rank == dst:
                views = [_nc_make(layout, NC_ROWS, NC_COLS, dtype, s, r, kind)[1].contiguous()
                         for r in range(ws)]
                check_all_reduce(view.contiguous(), views, ws, dtype, "SUM", None, True, ctx)
            else:
                assert_equal(base, base_before, ctx + ": the input of a non-dst rank was modified")
    checks.done()


def rank_noncontig_reduce_scatter(rank, ws, *, layout, dtype, seed, noncontig_input):
    dt = DTYPES[dtype]
    kind = input_kind(dtype, "SUM")
    rows, cols = NC_ROWS, NC_COLS
    n = rows * cols
    out_base = garbage_like(torch.empty(nc_base_shape(layout, rows, cols), dtype=dt), seed)
    out = nc_view(layout, out_base)
    assert not out.is_contiguous()
    out_before = out_base.clone()

    def full_input(r):  # rank r's input in logical order: ws * n elements
        return gen_input(seed, r, dtype, ws * n, kind)

    # The input is (ws * rows, cols) (1-D for stride2), so chunk r is rows [r * rows, (r+1) * rows).
    if noncontig_input:
        in_base = garbage_like(torch.empty(nc_base_shape(layout, ws * rows, cols), dtype=dt),
                               seed + 5)
        x = nc_view(layout, in_base)
        x.copy_(full_input(rank).reshape(x.shape))
        assert not x.is_contiguous()
    else:
        in_base = full_input(rank)
        x = in_base if layout == "stride2" else in_base.reshape(ws * rows, cols)
    in_before = in_base.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dist.reduce_scatter_tensor(out, x, op=dist.ReduceOp.SUM)
    ctx = (f"rank {rank}/{ws} reduce_scatter_tensor into a {layout} output view of {dtype} "
           f"from a {'non-' if noncontig_input else ''}contiguous input")
    assert_equal(in_base, in_before, ctx + ": input storage modified")
    mask = nc_mask(layout, out_base)
    assert_equal(out_base[mask], out_before[mask], ctx + ": storage outside the output view changed")
    chunks = [full_input(r)[rank * n:(rank + 1) * n] for r in range(ws)]
    check_all_reduce(out.contiguous(), chunks, ws, dtype, "SUM", None, True, ctx)


def rank_noncontig_all_to_all_single(rank, ws, *, dtype, seed, uneven):
    """Input and output are inner-column views of wider 2-D tensors; splits are rows."""
    dt = DTYPES[dtype]
    units = 7
    pattern = "uneven" if uneven else "equal"
    in_splits = [a2a_units(pattern, rank, d, units, ws) for d in range(ws)]
    out_splits = [a2a_units(pattern, src, rank, units, ws) for src in range(ws)]
    x_contig = torch.cat([_a2a_block(seed, rank, d, dtype, in_splits[d], True) for d in range(ws)])
    xb = garbage_like(torch.empty(x_contig.shape[0], A2A_COLS + 2, dtype=dt), seed + 1)
    x = xb[:, 1:-1]
    x.copy_(x_contig)
    xb_before = xb.clone()
    ob = garbage_like(torch.empty(sum(out_splits), A2A_COLS + 2, dtype=dt), seed + 2)
    out = ob[:, 1:-1]
    ob_before = ob.clone()
    assert not x.is_contiguous() and not out.is_contiguous()
    if uneven:
        dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits)
    else:
        dist.all_to_all_single(out, x)
    ctx = (f"rank {rank}/{ws} all_to_all_single {pattern} on column views of {dtype}, "
           f"in_splits={in_splits} out_splits={out_splits}")
    assert_equal(xb, xb_before, ctx + ": input storage modified")
    assert_equal(ob[:, [0, -1]], ob_before[:, [0, -1]], ctx + ": storage outside the output view")
    offset = 0
    for src in range(ws):
        k = out_splits[src]
        assert_equal(out[offset:offset + k].contiguous(),
                     _a2a_block(seed, src, rank, dtype, k, True), f"{ctx}: block from rank {src}")
        offset += k


NC_DTYPES = ["float32", "bfloat16", "int64", "int8", "bool"]


@skip_if_gloo(GLOO_NONCONTIG)
@pytest.mark.parametrize("dtype", NC_DTYPES)
@pytest.mark.parametrize("layout", ["stride2", "columns", "transposed"])
@pytest.mark.parametrize("ws", [2, 3], ids=lambda w: f"ws{w}")
def test_noncontiguous_reduce(pools, ws, layout, dtype):
    """reduce on a non-contiguous view: the result lands in dst's view, nothing else changes."""
    pools.get(ws).run(rank_noncontig_reduce, layout=layout, dtype=dtype,
                      seed=case_seed("nc_reduce", ws, layout, dtype))


@pytest.mark.parametrize("noncontig_input", [False, True], ids=["contig-in", "noncontig-in"])
@pytest.mark.parametrize("dtype", NC_DTYPES)
@pytest.mark.parametrize("layout", ["stride2", "columns", "transposed"])
@pytest.mark.parametrize("ws", [2, 3], ids=lambda w: f"ws{w}")
def test_noncontiguous_reduce_scatter_tensor(pools, ws, layout, dtype, noncontig_input):
    """reduce_scatter_tensor into a non-contiguous output view (from a contiguous or a
    non-contiguous input): the right chunk lands in the view, nothing else changes."""
    pools.get(ws).run(rank_noncontig_reduce_scatter, layout=layout, dtype=dtype,
                      noncontig_input=noncontig_input,
                      seed=case_seed("nc_rs", ws, layout, dtype, noncontig_input))


@skip_if_gloo(GLOO_NONCONTIG)
@pytest.mark.parametrize("uneven", [False, True], ids=["equal", "uneven"])
@pytest.mark.parametrize("dtype", NC_DTYPES)
@pytest.mark.parametrize("ws", [2, 3, 4], ids=lambda w: f"ws{w}")
def test_noncontiguous_all_to_all_single(pools, ws, dtype, uneven):
    """all_to_all_single between non-contiguous (column-view) input and output tensors."""
    pools.get(ws).run(rank_noncontig_all_to_all_single, dtype=dtype, uneven=uneven,
                      seed=case_seed("nc_a2a", ws, dtype, uneven))


# ---------------------------------------------------------------------------------------------
# bad arguments: ValueError naming the argument on every rank, group usable afterwards
# ---------------------------------------------------------------------------------------------

def _bad_argument_call(case, rank, ws):
    """(callable, names one of which the message must mention, names for gloo's message)."""
    n = 6
    x = torch.ones(n)
    if case == "reduce-dst-out-of-range":
        return lambda: dist.reduce(x, dst=ws + 3), ["dst", "root"], ["root"]
    if case == "reduce-dst-negative":
        return lambda: dist.reduce(x, dst=-1), ["dst", "root"], ["root"]
    if case == "reduce_scatter_tensor-input-numel":
        out = torch.zeros(n)
        return (lambda: dist.reduce_scatter_tensor(out, torch.ones(ws * n + 1)),
                ["input", "output"], ["input", "output"])
    if case == "reduce_scatter_tensor-input-too-small":
        out = torch.zeros(n)
        return (lambda: dist.reduce_scatter_tensor(out, torch.ones((ws - 1) * n)),
                ["input", "output"], ["input", "output"])
    if case == "reduce_scatter-input_list-length":
        out = torch.zeros(n)
        return (lambda: dist.reduce_scatter(out, [torch.ones(n) for _ in range(ws + 1)]),
                ["input_list", "input list", "input"], ["input"])
    if case == "all_to_all_single-input-splits-sum":
        splits = [2] * (ws - 1) + [3]
        return (lambda: dist.all_to_all_single(torch.zeros(2 * ws), torch.ones(2 * ws),
                                               [2] * ws, splits),
                ["split"], ["split"])
    if case == "all_to_all_single-output-splits-sum":
        splits = [2] * (ws - 1) + [1]
        return (lambda: dist.all_to_all_single(torch.zeros(2 * ws), torch.ones(2 * ws),
                                               splits, [2] * ws),
                ["split"], ["split"])
    if case == "all_to_all_single-split-count":
        return (lambda: dist.all_to_all_single(torch.zeros(2 * ws), torch.ones(2 * ws),
                                               [2] * ws, [2] * (ws - 1) + [0, 0]),
                ["split"], ["split"])
    if case == "all_to_all_single-equal-split-indivisible":
        return (lambda: dist.all_to_all_single(torch.zeros(2 * ws + 1), torch.ones(2 * ws + 1)),
                ["split", "divisible", "world"], ["size"])
    if case == "reduce_scatter-input_list-tensor-size":
        lst = [torch.ones(n) for _ in range(ws - 1)] + [torch.ones(n + 1)]
        out = torch.zeros(n)
        return (lambda: dist.reduce_scatter(out, lst), ["input_list", "input list", "input"],
                ["input", "size"])
    if case == "all_to_all-input-list-length":
        outs = [torch.zeros(n) for _ in range(ws)]
        ins = [torch.ones(n) for _ in range(ws - 1)]
        return (lambda: dist.all_to_all(outs, ins), ["input"], ["input", "size"])
    if case == "gather-dst-out-of-range":
        return lambda: dist.gather(x, None, dst=ws + 2), ["dst", "root"], ["root"]
    if case == "scatter-src-out-of-range":
        out = torch.zeros(n)
        return lambda: dist.scatter(out, None, src=ws + 2), ["src", "root"], ["root"]
    raise ValueError(case)


BAD_ARGUMENT_CASES = [
    "reduce-dst-out-of-range",
    "reduce-dst-negative",
    "reduce_scatter_tensor-input-numel",
    "reduce_scatter_tensor-input-too-small",
    "reduce_scatter-input_list-length",
    "all_to_all_single-input-splits-sum",
    "all_to_all_single-output-splits-sum",
    "all_to_all_single-split-count",
    "all_to_all_single-equal-split-indivisible",
    "reduce_scatter-input_list-tensor-size",
    "all_to_all-input-list-length",
    "gather-dst-out-of-range",
    "scatter-src-out-of-range",
]
GLOO_BAD_ARGUMENT_GAPS = {
    "all_to_all_single-equal-split-indivisible": "checks the byte count, not the element count, "
                                                 "for divisibility by world_size (no error at 2)",
    "reduce_scatter-input_list-tensor-size": "aborts the process (CHECK failure) on a wrong-size "
                                             "input_list tensor",
}


def rank_bad_argument(rank, ws, *, case):
    call, names, gloo_names = _bad_argument_call(case, rank, ws)
    if gloo_lacks(GLOO_RUNTIME_ERROR):
        result = expect_raises(call, (ValueError, RuntimeError), gloo_names, case + " [gloo]")
    else:
        result = expect_raises(call, ValueError, names, case)
    check_group_usable(rank, ws, f"{result[0]} {result[1]!r}")
    return result


@pytest.mark.parametrize("case", BAD_ARGUMENT_CASES)
@pytest.mark.parametrize("ws", [2, 3], ids=lambda w: f"ws{w}")
def test_bad_argument(pools, ws, case):
    """A bad argument that every rank passes raises ValueError naming it, on every rank, and the
    group stays usable (under gloo: RuntimeError, gloo's wording)."""
    maybe_skip_gloo(GLOO_BAD_ARGUMENT_GAPS.get(case))
    pools.get(ws).run(rank_bad_argument, timeout=60, case=case)


# Arguments only the root can get wrong (inside the backend: torch's own checks on the root, e.g.
# one dtype for all tensors, would leave the other ranks waiting for a root that never started).
# The root must raise ValueError naming the argument; the other ranks (which passed valid
# arguments) may complete or raise RuntimeError, but must not hang, and the group must stay usable
# everywhere.
ROOT_ONLY_CASES = [
    "gather-gather_list-too-long",
    "gather-gather_list-too-short",
    "gather-gather_list-tensor-size",
    "scatter-scatter_list-too-long",
    "scatter-scatter_list-too-short",
    "scatter-scatter_list-tensor-size",
]


def rank_bad_root_argument(rank, ws, *, case):
    n = 6
    root = ws - 1
    is_root = rank == root
    fn_name, _, what = case.partition("-")
    what = what.partition("-")[2]  # too-long | too-short | tensor-size
    right = [torch.full((n,), float(d)) for d in range(ws)]
    bad = {"too-long": right + [torch.zeros(n)], "too-short": right[:-1],
           "tensor-size": right[:-1] + [torch.zeros(n + 1)]}[what]
    if fn_name == "gather":
        x = torch.full((n,), float(rank))
        call = lambda: dist.gather(x, bad if is_root else None, dst=root)  # noqa: E731
        names = ["gather_list", "gather list", "output"]
    else:
        out = torch.zeros(n)
        call = lambda: dist.scatter(out, bad if is_root else None, src=root)  # noqa: E731
        names = ["scatter_list", "scatter list", "input"]
    if is_root:
        outcome = expect_raises(call, ValueError, names, f"rank {rank} (root): {case}")
    else:
        try:
            call()
            outcome = ("completed", "")
        except RuntimeError as exc:
            outcome = (type(exc).__name__, str(exc))
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"rank {rank} (not the root) of {case}: expected completion or "
                                 f"RuntimeError, got {type(exc).__name__}: {exc}") from exc
    check_group_usable(rank, ws, f"{case}: {outcome}")
    return outcome


@skip_if_gloo("raises RuntimeError only on the root; the other ranks wait until the timeout and "
              "the group is broken afterwards")
@pytest.mark.parametrize("case", ROOT_ONLY_CASES)
@pytest.mark.parametrize("ws", [2, 3], ids=lambda w: f"ws{w}")
def test_bad_root_argument(pools, ws, case):
    """gather/scatter with a bad gather_list/scatter_list on the root: ValueError naming it on the
    root, no hang elsewhere, group usable on every rank afterwards."""
    pools.get(ws).run(rank_bad_root_argument, timeout=90, case=case)


# ---------------------------------------------------------------------------------------------
# ranks that disagree (tcpx only)
# ---------------------------------------------------------------------------------------------

MISMATCH_CASES = [
    "all_to_all_single-recv-more",      # rank 0 expects k + 1 from rank 1, which sends k
    "all_to_all_single-recv-less",      # rank 0 expects k - 1 from rank 1, which sends k
    "all_to_all_single-recv-more-1MiB",
    "all_to_all-list-numel",            # rank 1's tensor for rank 0 has k + 1 elements
    "reduce-numel",
    "reduce-dtype-float32-vs-int32",
    "reduce_scatter_tensor-numel",
    "reduce_scatter-list-numel",
    "gather-numel",                     # the last rank sends k + 1 to a root expecting k
    "scatter-numel",                    # the last rank expects k + 1 from a root sending k
]


def rank_mismatch(rank, ws, *, case):
    odd = rank == ws - 1
    k = ((1 << 20) // 4 + 3) if case.endswith("1MiB") else 1023
    if case.startswith("all_to_all_single-recv"):
        out_splits = [k] * ws
        if rank == 0:
            out_splits[1] += 1 if "more" in case else -1
        out = torch.zeros(sum(out_splits))
        call = lambda: dist.all_to_all_single(out, torch.ones(ws * k), out_splits,  # noqa: E731
                                              [k] * ws)
    elif case == "all_to_all-list-numel":
        ins = [torch.ones(k + (1 if rank == 1 and d == 0 else 0)) for d in range(ws)]
        outs = [torch.zeros(k) for _ in range(ws)]
        call = lambda: dist.all_to_all(outs, ins)  # noqa: E731
    elif case == "reduce-numel":
        t = torch.ones(k + odd)
        call = lambda: dist.reduce(t, dst=0)  # noqa: E731
    elif case == "reduce-dtype-float32-vs-int32":
        t = torch.ones(k, dtype=torch.int32 if odd else torch.float32)
        call = lambda: dist.reduce(t, dst=0)  # noqa: E731
    elif case == "reduce_scatter_tensor-numel":
        m = k + odd
        out = torch.zeros(m)

        def call():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                dist.reduce_scatter_tensor(out, torch.ones(ws * m))
    elif case == "reduce_scatter-list-numel":
        m = k + odd
        out = torch.zeros(m)
        call = lambda: dist.reduce_scatter(out, [torch.ones(m) for _ in range(ws)])  # noqa: E731
    elif case == "gather-numel":
        gl = [torch.zeros(k) for _ in range(ws)] if rank == 0 else None
        call = lambda: dist.gather(torch.ones(k + odd), gl, dst=0)  # noqa: E731
    elif case == "scatter-numel":
        sl = [torch.ones(k) for _ in range(ws)] if rank == 0 else None
        out = torch.zeros(k + odd)
        call = lambda: dist.scatter(out, sl, src=0)  # noqa: E731
    else:
        raise ValueError(case)
    try:
        call()
    except RuntimeError as exc:
        outcome = ("RuntimeError", type(exc).__name__, str(exc))
    except Exception as exc:  # noqa: BLE001
        outcome = ("other", type(exc).__name__, str(exc))
    else:
        outcome = ("nothing", "", "")
    usable = True
    try:
        check_group_usable(rank, ws, f"a mismatch ({case})")
    except Exception as exc:  # noqa: BLE001
        usable = f"{type(exc).__name__}: {exc}"
    return outcome, usable


@skip_if_gloo("no detection of ranks that disagree on split sizes, sizes or dtypes")
@pytest.mark.parametrize("case", MISMATCH_CASES)
@pytest.mark.parametrize("ws", [2, 3], ids=lambda w: f"ws{w}")
def test_mismatch(pools, ws, case):
    """Ranks that disagree on split sizes / sizes / dtypes: RuntimeError('...mismatch...') on at
    least one rank, nothing but RuntimeError or completion elsewhere, group usable on all ranks."""
    results = pools.get(ws).run(rank_mismatch, timeout=60, case=case)
    problems = []
    for rank, ((kind, exc_type, msg), usable) in enumerate(results):
        if kind == "other":
            problems.append(f"rank {rank}: expected RuntimeError or completion, got {exc_type}: "
                            f"{msg!r}")
        if usable is not True:
            problems.append(f"rank {rank}: group unusable afterwards: {usable}")
    if not any(kind == "RuntimeError" and "mismatch" in msg.lower()
               for (kind, _, msg), _ in results):
        problems.append("no rank raised RuntimeError mentioning 'mismatch': " +
                        "; ".join(f"rank {r}: {kind} {exc_type} {msg!r}"
                                  for r, ((kind, exc_type, msg), _) in enumerate(results)))
    assert not problems, "\n".join(problems)

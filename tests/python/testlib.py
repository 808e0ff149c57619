"""Shared helpers of the torch_tcpx Python tests: dtypes, reduce ops, size classes, deterministic
inputs, references computed with plain torch/numpy, and comparisons that explain mismatches.

Everything here is imported both by pytest (collection) and by the rank processes.
"""

from __future__ import annotations

import contextlib
import os
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist

from harness import backend_under_test

BACKEND = backend_under_test()
IS_GLOO = BACKEND == "gloo"
# Set TCPX_TEST_IGNORE_GLOO_SKIPS=1 to run the gloo-skipped cases anyway (they should then fail
# on gloo, which shows that they detect the gaps they were skipped for).
_IGNORE_GLOO_SKIPS = os.environ.get("TCPX_TEST_IGNORE_GLOO_SKIPS", "") not in ("", "0")


def gloo_lacks(reason: str | None) -> bool:
    """True when the backend under test is gloo and ``reason`` says gloo cannot do the case."""
    return bool(reason) and IS_GLOO and not _IGNORE_GLOO_SKIPS


def skip_if_gloo(reason: str):
    """A pytest mark that skips a test only when the backend under test is gloo."""
    return pytest.mark.skipif(IS_GLOO and not _IGNORE_GLOO_SKIPS, reason=f"gloo: {reason}")


def maybe_skip_gloo(reason: str | None) -> None:
    """Skip the running test (parent side) when gloo lacks what the case needs."""
    if gloo_lacks(reason):
        pytest.skip(f"gloo: {reason}")


# ---------------------------------------------------------------------------------------------
# dtypes, ops, sizes
# ---------------------------------------------------------------------------------------------

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = list(DTYPES)
FLOAT_DTYPES = ["float32", "float64", "float16", "bfloat16"]
INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8"]

REDUCE_OPS = ["SUM", "AVG", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR", "PREMUL_SUM"]

# Every size class is a number of elements computed from the element size.
SIZE_CLASSES = ["n0", "n1", "n1023", "1MiB+3", "64MiB"]
SMALL_SIZE_CLASSES = ["n0", "n1", "n1023", "1MiB+3"]


def numel_of(size: str, dtype: torch.dtype) -> int:
    es = torch.empty((), dtype=dtype).element_size()
    return {
        "n0": 0,
        "n1": 1,
        "n1023": 1023,
        "1MiB+3": (1 << 20) // es + 3,
        "64MiB": (64 << 20) // es,
    }[size]


def is_float(dtype_name: str) -> bool:
    return dtype_name in FLOAT_DTYPES


def invalid_pair(dtype_name: str, op: str) -> str | None:
    """Why (dtype, op) is not a valid all_reduce (the backend must raise ValueError), or None."""
    if op in ("BAND", "BOR", "BXOR") and is_float(dtype_name):
        return f"{op} is a bitwise op and {dtype_name} is a floating type"
    if op == "PREMUL_SUM" and not is_float(dtype_name):
        return f"PREMUL_SUM is defined for floating types only, not {dtype_name}"
    if op == "AVG" and dtype_name == "bool":
        return "AVG is not defined for bool"
    return None


def gloo_gap_all_reduce(dtype_name: str, op: str) -> str | None:
    """What gloo (torch 2.13) lacks for a *valid* all_reduce case, or None."""
    if dtype_name == "int16":
        return "no int16 support in gloo collectives ('Invalid scalar type')"
    if op == "PREMUL_SUM":
        return "no PREMUL_SUM in gloo"
    if op == "AVG" and not is_float(dtype_name):
        return "no AVG on integer types in gloo"
    return None


def gloo_gap_dtype(dtype_name: str) -> str | None:
    """What gloo lacks for broadcast/all_gather of this dtype, or None."""
    if dtype_name == "int16":
        return "no int16 support in gloo collectives ('Invalid scalar type')"
    return None


def make_op(op: str, factor: float | torch.Tensor | None = None):
    if op == "PREMUL_SUM":
        return dist._make_nccl_premul_sum(factor)
    return getattr(dist.ReduceOp, op)


# Factors used for PREMUL_SUM: a power of two keeps the "exact" inputs exact.
PREMUL_FACTOR_EXACT = 0.5
PREMUL_FACTOR_RANDN = 0.3


def case_seed(*parts) -> int:
    """A stable 31-bit seed from the parameters of a test case."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# deterministic inputs
# ---------------------------------------------------------------------------------------------
# An input of n elements is combine(tile(A, n), tile(B, n)), where A and B are random blocks of
# 4099 and 4111 elements (both prime), so the pattern only repeats after 4099 * 4111 (~16.9 M)
# elements and a displaced chunk of any power-of-two length is visible.  Tiling keeps the 64 MiB
# class cheap: generating an input costs about two memcpys of its size.

_P, _Q = 4099, 4111
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _tile(block: torch.Tensor, n: int) -> torch.Tensor:
    if block.numel() >= n:
        return block[:n]
    reps = -(-n // block.numel())
    return block.repeat(reps)[:n]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def input_kind(dtype_name: str, op: str, flavor: str = "exact") -> str:
    """Which data family suits (dtype, op): see gen_input."""
    if is_float(dtype_name):
        if flavor == "randn":
            return "randn"
        return "pow2" if op == "PRODUCT" else "small"
    if dtype_name == "bool":
        if op in ("PRODUCT", "MIN", "BAND"):
            return "bool_hi"
        if op in ("SUM", "MAX", "BOR"):
            return "bool_lo"
        return "bool_mid"
    return "int_prod" if op == "PRODUCT" else "int_full"


def data_kind(dtype_name: str) -> str:
    """Data family for data-movement ops (broadcast, all_gather, send/recv)."""
    if is_float(dtype_name):
        return "randn"
    if dtype_name == "bool":
        return "bool_mid"
    return "int_full"


def gen_input(seed: int, rank: int, dtype_name: str, n: int, kind: str) -> torch.Tensor:
    """Rank ``rank``'s input for the case ``seed``: any rank can regenerate any rank's input.

    kinds: small   small integers in [-8, 8] stored as floats (sums of 4 are exact even in bf16)
           pow2    +-{1/4 .. 4}, powers of two (products of 4 are exact)
           randn   random normal (generated in float32, converted)
           int_full  uniformly random over the full range of the dtype (sums/products wrap)
           int_prod  75 % small values in [-3, 3], 25 % full-range values
           bool_hi / bool_lo / bool_mid   True with probability ~0.8 / ~0.2 / 0.5
    The blocks are converted to the target dtype before tiling, so the peak memory is about three
    times the tensor's own size.
    """
    dtype = DTYPES[dtype_name]
    g = _gen(seed * 1009 + rank * 7919 + 1)
    a_len, b_len = min(n, _P), min(n, _Q)
    if kind == "small":
        a = torch.randint(-4, 5, (a_len,), generator=g, dtype=torch.int64).to(dtype)
        b = torch.randint(-4, 5, (b_len,), generator=g, dtype=torch.int64).to(dtype)
        return _tile(a, n) + _tile(b, n)
    if kind == "pow2":
        ka = torch.randint(-1, 2, (a_len,), generator=g).double()
        sa = torch.randint(0, 2, (a_len,), generator=g).double() * 2 - 1
        kb = torch.randint(-1, 2, (b_len,), generator=g).double()
        return _tile((sa * torch.exp2(ka)).to(dtype), n) * _tile(torch.exp2(kb).to(dtype), n)
    if kind == "randn":
        a = (torch.randn(a_len, generator=g) * 0.8).to(dtype)
        b = (torch.randn(b_len, generator=g) * 0.6).to(dtype)
        return _tile(a, n) + _tile(b, n)
    if kind == "int_full":
        # Converting to a narrower type keeps the low bits (uniform over the narrow range).
        a = torch.randint(_INT64_MIN, _INT64_MAX, (a_len,), generator=g, dtype=torch.int64)
        b = torch.randint(_INT64_MIN, _INT64_MAX, (b_len,), generator=g, dtype=torch.int64)
        return _tile(a.to(dtype), n) ^ _tile(b.to(dtype), n)
    if kind == "int_prod":
        a = torch.randint(-3, 4, (a_len,), generator=g, dtype=torch.int64)
        big = torch.randint(_INT64_MIN, _INT64_MAX, (b_len,), generator=g, dtype=torch.int64)
        keep = torch.rand(b_len, generator=g) < 0.25
        b = torch.where(keep, big, torch.zeros_like(big)).to(dtype)
        tb = _tile(b, n)
        return torch.where(tb != 0, tb, _tile(a.to(dtype), n))
    if kind in ("bool_hi", "bool_lo", "bool_mid"):
        if kind == "bool_mid":
            a = torch.rand(a_len, generator=g) < 0.5
            b = torch.rand(b_len, generator=g) < 0.5
            return _tile(a, n) ^ _tile(b, n)
        a = torch.rand(a_len, generator=g) < 0.55
        b = torch.rand(b_len, generator=g) < 0.55
        if kind == "bool_hi":
            return _tile(a, n) | _tile(b, n)  # P(True) ~ 0.8
        return ~(_tile(a, n) | _tile(b, n))  # P(True) ~ 0.2
    raise ValueError(f"unknown input kind {kind!r}")


def garbage_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    """Different, deterministic content of the same shape/dtype (fills outputs before an op)."""
    kind = "randn" if t.dtype.is_floating_point else ("bool_mid" if t.dtype == torch.bool
                                                     else "int_full")
    name = [k for k, v in DTYPES.items() if v == t.dtype][0]
    return gen_input(seed ^ 0x5A5A5A, 12345, name, t.numel(), kind).reshape(t.shape)


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------

_NP_BINARY = {
    "SUM": np.add,
    "PRODUCT": np.multiply,
    "MIN": np.minimum,
    "MAX": np.maximum,
    "BAND": np.bitwise_and,
    "BOR": np.bitwise_or,
    "BXOR": np.bitwise_xor,
}
_BOOL_BINARY = {
    "SUM": np.logical_or,
    "MAX": np.logical_or,
    "BOR": np.logical_or,
    "PRODUCT": np.logical_and,
    "MIN": np.logical_and,
    "BAND": np.logical_and,
    "BXOR": np.logical_xor,
}


class Reference:
    """The expected all_reduce result, plus an elementwise error bound for inexact float cases."""

    def __init__(self, value: torch.Tensor, tol: torch.Tensor | None = None):
        self.value = value  # dtype of the op for exact cases, float64 for toleranced ones
        self.tol = tol


def reference_all_reduce(inputs, ws: int, dtype_name: str, op: str,
                         factor: float | None = None, exact: bool = True) -> Reference:
    """Reduce the ranks' inputs (an iterable, rank order) the way the backend must.

    Integers: numpy arithmetic in the tensor's own dtype, which wraps modulo 2**bits.
    AVG on integers: the wrapped sum divided by ws, truncated toward zero.
    bool: SUM/MAX/BOR = or, PRODUCT/MIN/BAND = and, BXOR = xor.
    Floats: float64 arithmetic; exact=True means the inputs were built so that the result is
    exactly representable and every summation order gives it (compare bit for bit); otherwise an
    elementwise bound of (ws + 2) * eps * sum|terms| (+ tiny) covers any order of one-rounding
    steps, including accumulation in the narrow type.
    """
    dtype = DTYPES[dtype_name]
    if dtype_name == "bool":
        fn = _BOOL_BINARY[op]
        acc = None
        for x in inputs:
            a = x.numpy()
            acc = a.copy() if acc is None else fn(acc, a, out=acc)
        return Reference(torch.from_numpy(acc))
    if not is_float(dtype_name):
        fn = _NP_BINARY["SUM" if op == "AVG" else op]
        acc = None
        for x in inputs:
            a = x.numpy()
            acc = a.copy() if acc is None else fn(acc, a, out=acc)
        value = torch.from_numpy(acc)
        if op == "AVG":
            value = torch.div(value.to(torch.int64), ws, rounding_mode="trunc").to(dtype)
        return Reference(value)

    # floating point
    if op in ("MIN", "MAX"):
        fn = torch.minimum if op == "MIN" else torch.maximum
        acc = None
        for x in inputs:
            acc = x.clone() if acc is None else fn(acc, x)
        return Reference(acc)  # selection is exact
    scale = {"SUM": 1.0, "AVG": 1.0 / ws, "PREMUL_SUM": factor, "PRODUCT": 1.0}[op]
    acc = None
    mag = None
    for x in inputs:
        x64 = x.double()
        if op == "PRODUCT":
            acc = x64.clone() if acc is None else acc.mul_(x64)  # .double() may alias x
        else:
            term = x64 * scale if scale != 1.0 else x64
            acc = term.clone() if acc is None else acc.add_(term)
            mag = term.abs() if mag is None else mag.add_(term.abs())
    if exact and op != "AVG":
        return Reference(acc.to(dtype))
    finfo = torch.finfo(dtype)
    if op == "PRODUCT":
        tol = acc.abs() * ((ws + 1) * finfo.eps) + finfo.tiny
    else:
        tol = mag * ((ws + 2) * finfo.eps) + finfo.tiny
    return Reference(acc, tol)


# ---------------------------------------------------------------------------------------------
# comparisons (raise AssertionError with a useful message on the rank)
# ---------------------------------------------------------------------------------------------

def _describe(out: torch.Tensor, ref: torch.Tensor, bad: torch.Tensor, ctx: str,
              offset: int = 0) -> str:
    idx = bad.nonzero().flatten()
    first = idx[:5].tolist()
    shown = ", ".join(f"[{i + offset}] got {out[i].item()!r} expected {ref[i].item()!r}"
                      for i in first)
    where = f" of elements [{offset}, {offset + out.numel()})" if offset else \
        f" of {out.numel()} elements"
    return (f"{ctx}: {idx.numel()}{where} differ "
            f"(first at {first[0] + offset if first else '-'}; "
            f"last at {idx[-1].item() + offset}): {shown}")


def assert_equal(out: torch.Tensor, ref: torch.Tensor, ctx: str, offset: int = 0) -> None:
    """Bit-exact comparison of two tensors of the same dtype and number of elements."""
    if out.dtype != ref.dtype:
        raise AssertionError(f"{ctx}: dtype {out.dtype} != expected {ref.dtype}")
    if out.numel() != ref.numel():
        raise AssertionError(f"{ctx}: numel {out.numel()} != expected {ref.numel()}")
    o, r = out.reshape(-1), ref.reshape(-1)
    if torch.equal(o, r):
        return
    raise AssertionError(_describe(o, r, o != r, ctx, offset))


def assert_reference(out: torch.Tensor, ref: Reference, ctx: str, offset: int = 0) -> None:
    if ref.tol is None:
        assert_equal(out, ref.value, ctx, offset)
        return
    o = out.reshape(-1).double()
    r = ref.value.reshape(-1)
    bad = (o - r).abs() > ref.tol.reshape(-1)
    bad |= ~torch.isfinite(o)
    if bool(bad.any()):
        raise AssertionError(_describe(o, r, bad, ctx + " (beyond the rounding bound)", offset))


def check_all_reduce(out: torch.Tensor, inputs: list[torch.Tensor], ws: int, dtype_name: str,
                     op: str, factor: float | None, exact: bool, ctx: str,
                     chunk: int = 1 << 20) -> None:
    """Compare ``out`` with the reference of ``inputs`` (one per rank), chunk by chunk.

    Chunking keeps the float64 temporaries of the reference small for the 64 MiB class.
    """
    o = out.reshape(-1)
    xs = [x.reshape(-1) for x in inputs]
    n = o.numel()
    if o.dtype != DTYPES[dtype_name] or any(x.numel() != n for x in xs):
        raise AssertionError(f"{ctx}: output {o.dtype}/{n} does not match the inputs")
    for lo in range(0, max(n, 1), chunk):
        hi = min(n, lo + chunk)
        ref = reference_all_reduce([x[lo:hi] for x in xs], ws, dtype_name, op, factor, exact)
        assert_reference(o[lo:hi], ref, ctx, lo)


def digest(t: torch.Tensor) -> int:
    """CRC32 of the tensor's bytes (lets the parent check that all ranks hold the same result)."""
    if t.numel() == 0:
        return 0
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def check_group_usable(rank: int, ws: int, ctx: str = "") -> None:
    """A correct all_reduce right after an error: proves the group still works."""
    t = torch.arange(5, dtype=torch.int64) + rank
    dist.all_reduce(t)
    exp = torch.arange(5, dtype=torch.int64) * ws + ws * (ws - 1) // 2
    assert_equal(t, exp, f"group not usable after {ctx}" if ctx else "group not usable")


def dtype_aliases(dtype: torch.dtype) -> list[str]:
    """Names a message may use for a dtype (torch and c10 spellings)."""
    short = str(dtype).replace("torch.", "")
    c10 = {
        torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
        torch.bfloat16: "BFloat16", torch.int8: "Char", torch.int16: "Short",
        torch.int32: "Int", torch.int64: "Long", torch.uint8: "Byte", torch.bool: "Bool",
    }.get(dtype)
    names = [short]
    if c10:
        names.append(c10)
    return names


def expect_raises(fn, accepted, names: list[str], ctx: str = "") -> tuple[str, str]:
    """Run fn and require an exception of a type in ``accepted`` whose message mentions one of
    ``names`` (case-insensitive); return (exception type name, message)."""
    accepted = accepted if isinstance(accepted, tuple) else (accepted,)
    wanted = [a.__name__ for a in accepted]
    prefix = f"{ctx}: " if ctx else ""
    try:
        fn()
    except accepted as exc:
        msg = str(exc)
        if not any(n.lower() in msg.lower() for n in names):
            raise AssertionError(f"{prefix}{type(exc).__name__} message does not name the argument "
                                 f"(expected one of {names}): {msg!r}") from exc
        return type(exc).__name__, msg
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"{prefix}expected {wanted}, got {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"{prefix}expected {wanted}, nothing was raised")


_GLOO_GROUP = None


def gloo_group():
    """A gloo group over all ranks, created once per rank process (new_group is collective, so
    every rank must reach the first call in the same test).  The tests use it for references and
    verdicts that must not depend on the backend under test."""
    global _GLOO_GROUP
    if _GLOO_GROUP is None:
        _GLOO_GROUP = dist.new_group(backend="gloo")
    return _GLOO_GROUP


# ---------------------------------------------------------------------------------------------
# Shared by the CPU and CUDA collective tests (test_collectives_more.py, test_cuda.py)

class Checks:
    """Collects failed checks so that a rank keeps taking part in the remaining collectives of
    its case: a rank that stopped at the first wrong value would leave the others waiting in the
    next collective until the group timeout.  ``done()`` raises them all at the end.  A ``with``
    block ends at its first failed assertion, so it must not contain collectives."""

    def __init__(self):
        self.failures: list[str] = []

    @contextlib.contextmanager
    def __call__(self):
        try:
            yield
        except AssertionError as exc:
            self.failures.append(str(exc))

    def done(self) -> None:
        if self.failures:
            shown = "\n".join(self.failures[:8])
            raise AssertionError(f"{len(self.failures)} check(s) failed:\n{shown}")


def a2a_units(pattern: str, src: int, dst: int, n: int, ws: int) -> int:
    """Units (rows) that ``src`` sends to ``dst`` in all_to_all pattern ``pattern`` of ``ws``
    ranks with base count ``n`` (the patterns are described in test_collectives_more.py)."""
    if pattern == "equal":
        return n
    if pattern == "uneven":
        return (0, n, n // 2 + 1, 2 * n + 1)[(src + 2 * dst) % 4]
    if pattern == "onehot":
        return n + src if dst == (src + 1) % ws else 0
    raise ValueError(pattern)


# Non-contiguous layouts: "stride2" (every other element of a 1-D tensor), "columns" (inner
# columns of a 2-D tensor) and "transposed" (a transposed 2-D view over all of its storage).

def nc_view(layout: str, base: torch.Tensor) -> torch.Tensor:
    if layout == "stride2":
        return base.reshape(-1)[::2]
    if layout == "columns":
        return base[:, 1:-1]
    if layout == "transposed":
        return base.t()
    raise ValueError(layout)


def nc_base_shape(layout: str, rows: int, cols: int) -> tuple:
    """Storage shape whose view (see nc_view) has ``rows`` x ``cols`` elements."""
    if layout == "stride2":
        return (2 * rows * cols,)
    if layout == "columns":
        return (rows, cols + 2)
    return (cols, rows)


def nc_mask(layout: str, base: torch.Tensor) -> torch.Tensor:
    """True where the view does NOT reach: those elements must never change."""
    mask = torch.ones_like(base, dtype=torch.bool)
    nc_view(layout, mask).fill_(False)
    return mask

#!/usr/bin/env python3
"""nccl-tests-style sweep of torch.distributed collectives, several backends in one run.

Launch with torchrun, one process per rank:

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_collectives.py
    torchrun --standalone --nproc-per-node 4 benchmarks/bench_collectives.py \\
        --backends tcpx,gloo --ops all --min-bytes 1K --max-bytes 256M --csv out.csv --plot out.png
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_collectives.py --check-bar

The first backend of --backends owns the default process group; each further one gets a group from
dist.new_group(backend=...) (a backend may be repeated, e.g. gloo,gloo; repeats are labelled gloo#2).
A separate gloo group carries the benchmark's own traffic (agreeing on iteration counts, reducing the
per-rank times with MAX, checking results), so the measuring tool is the same for every backend.

For each op and each size S (powers of two from --min-bytes to --max-bytes; S is the per-rank buffer
size as in nccl-tests: the whole gathered array for all_gather, the input for reduce_scatter) and each
backend, the script
  1. runs the op once on a known pattern and checks the result exactly (float sums of small integers
     are exact), so a broken backend cannot report fast garbage;
  2. warms up, then times n back-to-back blocking ops with time.perf_counter (no barrier inside the
     timed loop; one barrier over the measurement group before it), and takes time = elapsed / n;
     n is chosen so that each size takes about --target-time seconds per backend (at least 3);
  3. takes the MAX of that time over ranks.
algbw = S / time (GB = 1e9 B); busbw = algbw * factor, factor = 2(n-1)/n for all_reduce, (n-1)/n for
all_gather, reduce_scatter, all_to_all, gather and scatter, 1 for broadcast, reduce and sendrecv
(nccl-tests' factors; PERFORMANCE.md of nccl-tests explains them).

Ops: all_reduce, broadcast (root 0), reduce (root 0), all_gather (all_gather_into_tensor),
reduce_scatter (reduce_scatter_tensor), all_to_all (all_to_all_single), gather and scatter (root 0; S is
the whole array on the root), sendrecv (each rank sends S to rank+1 and receives S from rank-1, isend +
irecv), and all_reduce_x16 / all_reduce_x16_coalesced (16 tensors of S/16 reduced one by one, or in one
_coalescing_manager block); --ops all selects all of them. An op that a
backend does not support is skipped for that backend with a note. A wrong result or another error marks
the row and makes every rank exit with status 1 at the end.

Rank 0 prints one fixed-width table per op (size, count, type, redop, then time/algbw/busbw per backend,
then the ratios first-backend/other of busbw and of time), optionally writes --csv (one row per
op x size x backend) and --plot (busbw vs size, log-log, one line per backend per op).

--check-bar prints the project's acceptance bar for all_reduce: tcpx busbw >= gloo busbw at every size
>= 1 MiB, and tcpx time <= gloo time at 1 KiB (without tcpx in the run: the first backend against gloo,
or against the second backend).
"""

import argparse
import csv
import math
import os
import re
import socket
import sys
import time

import torch
import torch.distributed as dist

OPS = ["all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter", "all_to_all", "gather",
       "scatter", "sendrecv", "all_reduce_x16", "all_reduce_x16_coalesced"]
REDUCING = {"all_reduce", "reduce", "reduce_scatter", "all_reduce_x16", "all_reduce_x16_coalesced"}
# Tensors per call of the all_reduce_x16 pair: the same bytes as one all_reduce of size S, issued as
# 16 separate all_reduces of S/16, or as one coalesced batch (_coalescing_manager, which calls the
# backend's allreduce_coalesced): the difference is the round trips coalescing saves.
NUM_COALESCED = 16
DTYPES = {
    "float32": torch.float32, "float": torch.float32, "float64": torch.float64, "double": torch.float64,
    "float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
    "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32, "int": torch.int32,
    "int64": torch.int64,
}
# torch >= 2.13 names these all_gather_single / reduce_scatter_single (the old names warn).
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
REDOPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
          "avg": dist.ReduceOp.AVG, "prod": dist.ReduceOp.PRODUCT}


# ---------------------------------------------------------------------------------------------------
# command line

def parse_bytes(text):
    """'1K' -> 1024, '256M' -> 268435456, '1G', '4096', '8B', '1KiB', '1KB' (binary multiples)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: expected e.g. 8, 1K, 256M, 1G")
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")


def parse_count(text):
    if text == "auto":
        return None
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0 or 'auto'")
    return n


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--backends", default="tcpx,gloo",
                   help="comma-separated backends; the first owns the default group (default tcpx,gloo)")
    p.add_argument("--ops", default="all_reduce",
                   help=f"comma-separated ops from {','.join(OPS)}, or 'all' (default all_reduce)")
    p.add_argument("--min-bytes", type=parse_bytes, default=parse_bytes("1K"), help="default 1K")
    p.add_argument("--max-bytes", type=parse_bytes, default=parse_bytes("256M"), help="default 256M")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="default float32")
    p.add_argument("--redop", default="sum", choices=sorted(REDOPS), help="default sum")
    p.add_argument("--iters", type=parse_count, default=None,
                   help="timed iterations per size, or 'auto' (default: ~--target-time per size)")
    p.add_argument("--warmup", type=parse_count, default=None,
                   help="warm-up iterations per size, or 'auto' (default)")
    p.add_argument("--target-time", type=float, default=0.3,
                   help="seconds of timed iterations per size and backend with --iters auto (default 0.3)")
    p.add_argument("--max-iters", type=int, default=100000, help="cap on auto iterations")
    p.add_argument("--rounds", type=int, default=1,
                   help="timed rounds per size and backend, alternating between backends; the "
                        "median round is reported (default 1)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="tensor device (cuda: GPU LOCAL_RANK per rank), default cpu")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads per rank (default 1)")
    p.add_argument("--csv", help="write results to this CSV file")
    p.add_argument("--plot", help="write a busbw-vs-size PNG plot to this file")
    p.add_argument("--check-bar", action="store_true",
                   help="print whether all_reduce meets the acceptance bar (tcpx vs gloo)")
    args = p.parse_args()

    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends:
        p.error("--backends is empty")
    args.ops = OPS if args.ops.strip() == "all" else [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in args.ops if o not in OPS]
    if bad:
        p.error(f"unknown op(s) {bad}; choose from {OPS} or 'all'")
    if args.min_bytes < 1 or args.max_bytes < args.min_bytes:
        p.error("need 1 <= --min-bytes <= --max-bytes")
    if args.iters == 0:
        p.error("--iters must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------------
# helpers

def bus_factor(op, n):
    if op.startswith("all_reduce"):
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all", "gather", "scatter"):
        return (n - 1) / n
    return 1.0  # broadcast, reduce, sendrecv


def sizes(lo, hi):
    s = 1 << max(0, (lo - 1).bit_length())  # first power of two >= lo
    out = []
    while s <= hi:
        out.append(s)
        s <<= 1
    return out


def is_unsupported(exc):
    msg = str(exc).lower()
    return isinstance(exc, NotImplementedError) or "does not support" in msg or "not supported" in msg \
        or "unsupported" in msg


def short_error(exc, limit=160):
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:limit]}{'...' if len(msg) > limit else ''}"


class Bench:
    def __init__(self, args):
        self.args = args
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.dtype = DTYPES[args.dtype]
        self.esize = torch.tensor([], dtype=self.dtype).element_size()
        self.redop = REDOPS[args.redop]
        if args.device == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

        # One group per backend, created in the same order on every rank.
        self.labels, self.groups = [], {}
        for i, b in enumerate(args.backends):
            label = b if b not in self.labels else f"{b}#{sum(l.split('#')[0] == b for l in self.labels) + 1}"
            self.labels.append(label)
            self.groups[label] = dist.group.WORLD if i == 0 else dist.new_group(backend=b)
        self.meas = dist.new_group(backend="gloo")  # the neutral measurement group
        self.skip = {}       # (op, label) -> note, for ops that a backend can't run
        self.failed = False  # any wrong result or error

    # -- small collectives over the measurement group (CPU tensors) --
    def reduce_max(self, values):
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.meas)
        return t.tolist()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- patterns: small integers, so that float sums are exact; exact compare everywhere --
    def pattern(self, count, offset):
        """(i % 7) + offset for i in range(count), in the benchmark dtype (offset may be a tensor)."""
        idx = torch.arange(count, device=self.device, dtype=torch.int64)
        return ((idx % 7) + offset).to(self.dtype)

    def reduce_expect(self, count, scale_base=True):
        """Expected result of reducing pattern(count, r) over ranks r = 0..n-1 with the redop."""
        n, base = self.world, self.pattern(count, 0)
        op = self.args.redop
        if op == "sum":
            return (base.to(torch.int64) * n + n * (n - 1) // 2).to(self.dtype) \
                if not self.dtype.is_floating_point else base * n + n * (n - 1) // 2
        if op == "max":
            return self.pattern(count, n - 1)
        if op == "min":
            return base
        if op == "avg":
            return base + (n - 1) / 2 if self.dtype.is_floating_point else None
        if op == "prod":
            acc = self.pattern(count, 0)
            for r in range(1, n):
                acc = acc * self.pattern(count, r)
            return acc
        return None

    def same(self, got, expect):
        """Exact, except reductions in half types, where a different summation order may round
        differently once partial sums pass 256 (bfloat16) / 2048 (float16): large world sizes."""
        if self.dtype in (torch.float16, torch.bfloat16) and self.world > 8:
            return torch.allclose(got.float(), expect.float(), rtol=2 ** -6, atol=0)
        return torch.equal(got, expect)

    # -- per-op setup: returns (S bytes, count, fn, check) or None when the size doesn't fit --
    def setup(self, op, size, pg):
        n, r, dt, dev = self.world, self.rank, self.dtype, self.device
        count = size // self.esize
        if op in ("all_gather", "reduce_scatter", "all_to_all", "gather", "scatter"):
            count -= count % n  # whole chunks per rank (nccl-tests rounds the same way)
        if op.startswith("all_reduce_x"):
            count -= count % NUM_COALESCED
        if count == 0:
            return None
        nbytes = count * self.esize
        chunk = count // n
        if op == "all_reduce":
            buf = self.pattern(count, r)
            expect = self.reduce_expect(count)
            def fn():
                dist.all_reduce(buf, op=self.redop, group=pg)
            def check():
                return expect is None or self.same(buf, expect)
            def reset():  # timing data that stays bounded under repeated reduction
                buf.fill_(1 if self.args.redop == "prod" else 0)
        elif op == "broadcast":
            buf = self.pattern(count, 0) if r == 0 else torch.full((count,), -1, dtype=dt, device=dev)
            expect = self.pattern(count, 0)
            def fn():
                dist.broadcast(buf, src=0, group=pg)
            def check():
                return torch.equal(buf, expect)
            def reset():
                pass
        elif op == "reduce":
            buf = self.pattern(count, r)
            expect = self.reduce_expect(count)
            def fn():
                dist.reduce(buf, dst=0, op=self.redop, group=pg)
            def check():  # only the root's buffer is defined afterwards (gloo writes the others)
                return r != 0 or expect is None or self.same(buf, expect)
            def reset():
                buf.fill_(1 if self.args.redop == "prod" else 0)
        elif op in ("all_reduce_x16", "all_reduce_x16_coalesced"):
            part = count // NUM_COALESCED
            bufs = [self.pattern(part, r) for _ in range(NUM_COALESCED)]
            expect = self.reduce_expect(part)
            coalesced = op.endswith("_coalesced")
            def fn():
                if coalesced:
                    with dist._coalescing_manager(group=pg):
                        for b in bufs:
                            dist.all_reduce(b, op=self.redop, group=pg)
                else:
                    for b in bufs:
                        dist.all_reduce(b, op=self.redop, group=pg)
            def check():
                return expect is None or all(self.same(b, expect) for b in bufs)
            def reset():
                for b in bufs:
                    b.fill_(1 if self.args.redop == "prod" else 0)
        elif op == "gather":
            idx = torch.arange(count, device=dev, dtype=torch.int64)
            expect = ((idx % 7) + idx // chunk).to(dt)  # rank q's block: (i % 7) + q
            inp = expect[r * chunk:(r + 1) * chunk].clone()
            outs = [torch.full((chunk,), -1, dtype=dt, device=dev) for _ in range(n)] if r == 0 else None
            def fn():
                dist.gather(inp, outs, dst=0, group=pg)
            def check():
                return r != 0 or torch.equal(torch.cat(outs), expect)
            def reset():
                pass
        elif op == "scatter":
            idx = torch.arange(count, device=dev, dtype=torch.int64)
            whole = ((idx % 7) + idx // chunk).to(dt)
            ins = list(whole.chunk(n)) if r == 0 else None
            expect = whole[r * chunk:(r + 1) * chunk].clone()
            out = torch.full((chunk,), -1, dtype=dt, device=dev)
            def fn():
                dist.scatter(out, ins, src=0, group=pg)
            def check():
                return torch.equal(out, expect)
            def reset():
                pass
        elif op == "sendrecv":
            send = self.pattern(count, r)
            recv = torch.full((count,), -1, dtype=dt, device=dev)
            expect = self.pattern(count, (r - 1) % n)
            nxt, prv = dist.get_global_rank(pg, (r + 1) % n), dist.get_global_rank(pg, (r - 1) % n)
            def fn():
                works = [dist.isend(send, nxt, group=pg), dist.irecv(recv, prv, group=pg)]
                for w in works:
                    w.wait()
            def check():
                return torch.equal(recv, expect)
            def reset():
                pass
        elif op == "all_gather":
            idx = torch.arange(count, device=dev, dtype=torch.int64)
            expect = ((idx % 7) + idx // chunk).to(dt)  # rank q's block: (i % 7) + q
            inp = expect[r * chunk:(r + 1) * chunk].clone()
            out = torch.full((count,), -1, dtype=dt, device=dev)
            def fn():
                ALL_GATHER(out, inp, group=pg)
            def check():
                return torch.equal(out, expect)
            def reset():
                pass
        elif op == "reduce_scatter":
            inp = self.pattern(count, r)
            full = self.reduce_expect(count)
            expect = None if full is None else full[r * chunk:(r + 1) * chunk].clone()
            out = torch.full((chunk,), -1, dtype=dt, device=dev)
            def fn():
                REDUCE_SCATTER(out, inp, op=self.redop, group=pg)
            def check():
                return expect is None or self.same(out, expect)
            def reset():
                pass
        elif op == "all_to_all":
            # value(src q, destination block b, offset i) = (i % 7) + q * n + b: unique per (q, b)
            idx = torch.arange(count, device=dev, dtype=torch.int64)
            inp = ((idx % chunk % 7) + r * n + idx // chunk).to(dt)
            expect = ((idx % chunk % 7) + (idx // chunk) * n + r).to(dt)
            out = torch.full((count,), -1, dtype=dt, device=dev)
            def fn():
                dist.all_to_all_single(out, inp, group=pg)
            def check():
                return torch.equal(out, expect)
            def reset():
                pass
        else:
            raise ValueError(op)
        return nbytes, count, fn, check, reset

    def timed(self, fn, n):
        self.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        self.sync()
        return time.perf_counter() - t0

    def measure(self, op, size, label):
        """Validates and calibrates this (op, size, backend) and returns (result dict, timer).

        The result's status is 'ok', 'wrong', 'error' or 'skip'; for 'ok', timer() runs one timed
        round (back-to-back ops, MAX over ranks) and returns seconds per op; finish() turns the
        rounds' times into the row's numbers."""
        a = self.args
        pg = self.groups[label]
        res = dict(op=op, backend=label, time_us=math.nan, algbw=math.nan, busbw=math.nan,
                   iters=0, warmup=0, status="ok", note="")
        if (op, label) in self.skip:
            res.update(status="skip", note=self.skip[(op, label)])
            return res, None
        made = self.setup(op, size, pg)
        if made is None:
            res.update(status="skip", note="size below one element per rank")
            return res, None
        nbytes, count, fn, check, reset = made
        res.update(bytes=nbytes, count=count)

        # 1. validation (also the first, connection-opening call)
        err = ""
        try:
            fn()
            self.sync()
            good = bool(check())
            unsupported = False
        except Exception as e:  # noqa: BLE001 - reported, then agreed on over the gloo group
            good, unsupported, err = False, is_unsupported(e), short_error(e)
        bad, unsup, low = self.reduce_max([float(not good), float(unsupported),
                                           float(self.world - self.rank) if not good else 0.0])
        bad_rank = int(self.world - low) if low else -1  # lowest rank that saw a bad result
        if unsup:
            note = f"{label} does not support {op}" + (f" ({err})" if err else "")
            self.skip[(op, label)] = note
            res.update(status="skip", note=note)
            return res, None
        if bad:
            self.failed = True
            if err:  # a real error: the group may be unusable, stop using it for this op
                self.skip[(op, label)] = f"{label} {op} failed earlier: {err}"
                res.update(status="error", note=err or f"error on rank {bad_rank}")
            else:
                res.update(status="wrong", note=f"WRONG RESULT (first seen on rank {bad_rank})")
            return res, None
        reset()

        # 2. calibration and warm-up; every count is agreed on over the measurement group
        if a.iters is None or a.warmup is None:
            (t1,) = self.reduce_max([self.timed(fn, 1)])
            warm = a.warmup if a.warmup is not None else max(1, min(20, int(0.05 / max(t1, 1e-9))))
            if warm:
                (tw,) = self.reduce_max([self.timed(fn, warm) / warm])
            else:
                tw = t1
            iters = a.iters if a.iters is not None else \
                max(3, min(a.max_iters, int(a.target_time / max(tw, 1e-9))))
        else:
            warm, iters = a.warmup, a.iters
            if warm:
                self.timed(fn, warm)

        # 3. timed loop, back to back, no barrier inside (run by the caller, once per round)
        res.update(iters=iters, warmup=warm)

        def timer():
            dist.barrier(group=self.meas)
            (t,) = self.reduce_max([self.timed(fn, iters) / iters])
            return t

        return res, timer

    def finish(self, res, times):
        """Fills a result from the per-round times: the median round."""
        t = sorted(times)[len(times) // 2]
        algbw = res["bytes"] / t / 1e9
        res.update(time_us=t * 1e6, algbw=algbw, busbw=algbw * bus_factor(res["op"], self.world),
                   rounds=len(times))
        return res


# ---------------------------------------------------------------------------------------------------
# output

TYPE_NAMES = {torch.float32: "float", torch.float64: "double", torch.float16: "half",
              torch.bfloat16: "bfloat16", torch.int8: "int8", torch.uint8: "uint8",
              torch.int32: "int32", torch.int64: "int64"}


class Table:
    """nccl-tests-like fixed-width table; rows are printed as they come."""
    CELL = 9  # width of a number cell

    def __init__(self, labels):
        self.labels = labels
        self.ref = labels[0]
        self.others = labels[1:]

    def header(self, op, world, note):
        W = self.CELL
        block = 3 * W + 2
        top = f"#{'':>12} {'':>12} {'':>8} {'':>6} " + "".join(f"  {l:^{block}}" for l in self.labels)
        top += "".join(f"  {self.ref + '/' + o:^{2 * W + 1}}" for o in self.others)
        names = f"#{'size':>12} {'count':>12} {'type':>8} {'redop':>6} " + \
            "".join(f"  {'time':>{W}} {'algbw':>{W}} {'busbw':>{W}}" for _ in self.labels) + \
            "".join(f"  {'busbw':>{W}} {'time':>{W}}" for _ in self.others)
        units = f"#{'(B)':>12} {'(elements)':>12} {'':>8} {'':>6} " + \
            "".join(f"  {'(us)':>{W}} {'(GB/s)':>{W}} {'(GB/s)':>{W}}" for _ in self.labels) + \
            "".join(f"  {'(x)':>{W}} {'(x)':>{W}}" for _ in self.others)
        return "\n".join([f"#\n# {op}, {world} ranks{note}", top.rstrip(), names, units])

    @staticmethod
    def num(v, w, prec):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return f"{'-':>{w}}"
        if v >= 10 ** (w - prec - 2):  # keep the column width
            return f"{v:>{w}.0f}"
        return f"{v:>{w}.{prec}f}"

    def row(self, size, count, tname, redop, results):
        W = self.CELL
        s = f" {size:>12} {count:>12} {tname:>8} {redop:>6} "
        for l in self.labels:
            r = results[l]
            if r["status"] == "ok":
                s += f"  {self.num(r['time_us'], W, 1)} {self.num(r['algbw'], W, 3)} {self.num(r['busbw'], W, 3)}"
            else:
                s += f"  {r['status'].upper():>{3 * W + 2}}"
        ref = results[self.ref]
        for o in self.others:
            r = results[o]
            if ref["status"] == "ok" and r["status"] == "ok":
                s += f"  {self.num(ref['busbw'] / r['busbw'], W, 2)} {self.num(ref['time_us'] / r['time_us'], W, 2)}"
            else:
                s += f"  {'-':>{W}} {'-':>{W}}"
        return s.rstrip()


def write_csv(path, rows, meta):
    fields = ["op", "bytes", "count", "dtype", "redop", "backend", "time_us", "algbw_GBps", "busbw_GBps",
              "iters", "warmup", "world_size", "device", "status", "note"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({"op": r["op"], "bytes": r.get("bytes", ""), "count": r.get("count", ""),
                        "dtype": meta["dtype"], "redop": r["redop"], "backend": r["backend"],
                        "time_us": f"{r['time_us']:.3f}", "algbw_GBps": f"{r['algbw']:.6f}",
                        "busbw_GBps": f"{r['busbw']:.6f}", "iters": r["iters"], "warmup": r["warmup"],
                        "world_size": meta["world"], "device": meta["device"], "status": r["status"],
                        "note": r["note"]})


def write_plot(path, rows, labels, ops, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "x"]
    for i, op in enumerate(ops):
        for j, l in enumerate(labels):
            pts = [(r["bytes"], r["busbw"]) for r in rows
                   if r["op"] == op and r["backend"] == l and r["status"] == "ok" and r["busbw"] > 0]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=f"C{i % 10}", linestyle=styles[j % len(styles)],
                        marker=markers[j % len(markers)], markersize=4, label=f"{op} {l}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("size S (bytes per rank)")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title(f"{meta['world']} ranks, {meta['dtype']}, {meta['device']} tensors")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_bar(rows, labels):
    """The project's acceptance bar, for all_reduce. Returns a list of summary lines."""
    target = "tcpx" if "tcpx" in labels else labels[0]
    base = next((l for l in labels if l.split("#")[0] == "gloo" and l != target), None)
    if base is None:
        base = next((l for l in labels if l != target), None)
    if base is None:
        return ["check-bar: needs two backends (tcpx and gloo)"]
    ar = {(r["bytes"], r["backend"]): r for r in rows if r["op"] == "all_reduce"}
    if not ar:
        return ["check-bar: all_reduce was not measured (add it to --ops)"]
    sizes_ = sorted({b for b, _ in ar})
    lines, ok = [], True
    big = [s for s in sizes_ if s >= 1 << 20]
    worse = []
    for s in big:
        t, g = ar.get((s, target)), ar.get((s, base))
        if not (t and g and t["status"] == "ok" and g["status"] == "ok"):
            worse.append(f"{s} B (not measured)")
        elif t["busbw"] < g["busbw"]:
            worse.append(f"{s} B ({t['busbw']:.3f} < {g['busbw']:.3f} GB/s)")
    if not big:
        lines.append(f"check-bar: {target} busbw >= {base} at sizes >= 1 MiB: NOT MEASURED (raise --max-bytes)")
        ok = False
    elif worse:
        lines.append(f"check-bar: {target} busbw >= {base} at every size >= 1 MiB: NO, at " + ", ".join(worse))
        ok = False
    else:
        lines.append(f"check-bar: {target} busbw >= {base} at every size >= 1 MiB "
                     f"({len(big)} sizes, {big[0]}..{big[-1]} B): yes")
    t, g = ar.get((1024, target)), ar.get((1024, base))
    if not (t and g and t["status"] == "ok" and g["status"] == "ok"):
        lines.append(f"check-bar: {target} time <= {base} at 1 KiB: NOT MEASURED (need 1K in the sweep)")
        ok = False
    elif t["time_us"] <= g["time_us"]:
        lines.append(f"check-bar: {target} time <= {base} at 1 KiB: yes "
                     f"({t['time_us']:.1f} <= {g['time_us']:.1f} us)")
    else:
        lines.append(f"check-bar: {target} time <= {base} at 1 KiB: NO "
                     f"({t['time_us']:.1f} > {g['time_us']:.1f} us)")
        ok = False
    lines.append(f"check-bar: all_reduce acceptance bar ({target} vs {base}): {'PASS' if ok else 'FAIL'}")
    return lines


def coalescing_summary(rows, labels):
    """Per backend and size: time of the coalesced 16-tensor batch / time of the 16 ops one by one."""
    by = {(r["op"], r["backend"], r["bytes"]): r for r in rows if r["status"] == "ok"}
    lines = []
    for l in labels:
        pairs = [(b, by[("all_reduce_x16", l, b)], by[("all_reduce_x16_coalesced", l, b)])
                 for (op, lb, b) in sorted(by, key=lambda k: k[2])
                 if op == "all_reduce_x16" and lb == l and ("all_reduce_x16_coalesced", l, b) in by]
        if not pairs:
            continue
        lines.append(f"#\n# coalescing, {l}: {NUM_COALESCED} all_reduces in one batch vs one by one "
                     f"(time ratio < 1: the batch saves round trips)")
        for b, one, co in pairs:
            lines.append(f"#   {b:>12} B: one by one {one['time_us']:10.1f} us, coalesced "
                         f"{co['time_us']:10.1f} us, ratio {co['time_us'] / one['time_us']:.2f}")
    return lines


# ---------------------------------------------------------------------------------------------------

def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    if "tcpx" in args.backends:
        import torch_tcpx  # noqa: F401  (registers the "tcpx" backend)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))

    dist.init_process_group(backend=args.backends[0])  # env:// from torchrun
    bench = Bench(args)
    rank, world = bench.rank, bench.world
    tname = TYPE_NAMES[bench.dtype]

    def out(*a):
        if rank == 0:
            print(*a, flush=True)

    out(f"# bench_collectives: {world} ranks on {socket.gethostname()}, torch {torch.__version__}, "
        f"{args.device} tensors, {args.threads} thread(s) per rank")
    out(f"# backends: {', '.join(bench.labels)} (default group: {bench.labels[0]}); "
        f"measurement group: gloo; times: MAX over ranks")
    out(f"# sizes {args.min_bytes}..{args.max_bytes} B, dtype {args.dtype}, redop {args.redop}, "
        f"iters {args.iters or 'auto'}, warmup {args.warmup if args.warmup is not None else 'auto'}"
        + (f", target {args.target_time} s per size and backend" if args.iters is None else ""))

    rows = []
    table = Table(bench.labels)
    for op in args.ops:
        redop = args.redop if op in REDUCING else "none"
        out(table.header(op, world, ", root 0" if op in ("broadcast", "reduce", "gather", "scatter")
                         else f", {NUM_COALESCED} tensors of S/{NUM_COALESCED}" if op.startswith("all_reduce_x")
                         else ""))
        noted = set()
        for size in sizes(args.min_bytes, args.max_bytes):
            results, timers, times = {}, {}, {}
            for label in bench.labels:
                r, timers[label] = bench.measure(op, size, label)
                r["redop"] = redop
                results[label] = r
            # Rounds alternate between backends, so that a busy moment of the machine
            # hits them alike; the median round is reported.
            for _ in range(args.rounds):
                for label, timer in timers.items():
                    if timer is not None:
                        times.setdefault(label, []).append(timer())
            for label, ts in times.items():
                bench.finish(results[label], ts)
            first = next((r for r in results.values() if "bytes" in r), None)
            if first is None:  # below one element per rank for everyone
                continue
            for r in results.values():
                r.setdefault("bytes", first["bytes"])
                r.setdefault("count", first["count"])
                rows.append(r)
            out(table.row(first["bytes"], first["count"], tname, redop, results))
            for r in results.values():
                if r["status"] in ("wrong", "error") or (r["status"] == "skip" and r["note"] not in noted):
                    if r["status"] == "skip":
                        noted.add(r["note"])
                    out(f"#   note: {r['backend']} {op} {r['bytes']} B: {r['status']}: {r['note']}")
        for l in bench.labels:
            ok = [r["busbw"] for r in rows if r["op"] == op and r["backend"] == l and r["status"] == "ok"]
            if ok:
                out(f"# {op} {l}: avg busbw {sum(ok) / len(ok):.3f} GB/s, peak {max(ok):.3f} GB/s "
                    f"over {len(ok)} sizes")

    for line in coalescing_summary(rows, bench.labels):
        out(line)

    # tcpx on CUDA: where the time of its collectives went (staging copies, net, unpacks),
    # summed over the whole run; busy times adding up to more than the wall time is overlap.
    for label in bench.labels:
        if label.split("#")[0] != "tcpx" or args.device != "cuda":
            continue
        try:
            b = bench.groups[label]._get_backend(torch.device("cuda")).device_breakdown()
        except Exception as e:  # noqa: BLE001 - informative only
            out(f"# {label}: no device breakdown ({short_error(e)})")
            continue
        if b["ops"]:
            w = b["wall_us"]
            busy = b["staging_us"] + b["net_us"] + b["unpack_us"]
            out(f"# {label} pipeline (rank 0, {b['ops']} CUDA collectives, {w / 1e6:.3f} s): "
                f"staging copies busy {b['staging_us'] / w:.0%}, sends in the net {b['net_us'] / w:.0%}, "
                f"unpacks {b['unpack_us'] / w:.0%} of the wall time; overlap {max(busy - w, 0) / w:.0%}")

    if rank == 0:
        meta = dict(world=world, dtype=args.dtype, device=args.device)
        if args.csv:
            write_csv(args.csv, rows, meta)
            out(f"# wrote {args.csv}")
        if args.plot:
            write_plot(args.plot, rows, bench.labels, args.ops, meta)
            out(f"# wrote {args.plot}")
        if args.check_bar:
            out("#")
            for line in check_bar(rows, bench.labels):
                out(line)
    if bench.failed:
        out("# FAILED: wrong results or errors above")

    failed = bench.failed
    dist.barrier(group=bench.meas)
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""Rank program of the two-host network-namespace job (netns_job.py, test_multinic_netns.py).

Launched by torchrun inside each namespace (2 nodes x 2 processes).  It

1. sets TCPX_SOCKET_IFNAME (``--ifname``) before the backend is imported, initialises the default
   group from torchrun's environment (rendezvous over eth0) and records the socket net's devices;
2. runs every collective once on CPU float32 tensors with small integer values (so every sum is
   exact), at two sizes (one that fits the inline path, one that is sliced across the data
   sockets), and compares each result with a reference computed here from every rank's input;
3. times ``--iters`` all_reduce SUMs of ``--bytes`` bytes after ``--warmup`` untimed ones; each
   iteration's time is the maximum over ranks, and busbw = 2(n-1)/n * bytes / median time.

Each rank prints one ``TCPX_NETNS_CHECK {json}`` line; rank 0 then prints one
``TCPX_NETNS_RESULT {json}`` line.  The exit status is 1 when a check failed on this rank.  Checks
never change which collectives run, so a wrong result on one rank cannot make the others hang.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta

CHECK_TAG = "TCPX_NETNS_CHECK"
RESULT_TAG = "TCPX_NETNS_RESULT"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ifname", required=True, help="TCPX_SOCKET_IFNAME for the socket net")
    p.add_argument("--nchannels", default=None, help="TCPX_NCHANNELS (unset: leave as is)")
    p.add_argument("--bytes", type=int, default=16 << 20, help="timed all_reduce size")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3, help="timed iterations (0: checks only)")
    p.add_argument("--timeout", type=float, default=60, help="process group timeout (s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    backend = os.environ.get("TCPX_TEST_BACKEND", "").strip() or "tcpx"
    # Before the backend is imported: the socket net reads its configuration once per process.
    os.environ["TCPX_SOCKET_IFNAME"] = args.ifname
    if args.nchannels is not None:
        os.environ["TCPX_NCHANNELS"] = str(args.nchannels)
    if backend == "gloo":  # validating the job itself against gloo: one named interface
        os.environ.setdefault("GLOO_SOCKET_IFNAME", args.ifname.lstrip("=^").split(",")[0])

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    devices = None
    config = None
    module = None
    if backend == "tcpx":
        import torch_tcpx

        module = torch_tcpx._C.__file__
        config = torch_tcpx.config()
        devices = [d["name"] for d in torch_tcpx._C.net_devices()]
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout))
    rank, ws = dist.get_rank(), dist.get_world_size()

    failures = check_collectives(rank, ws)
    print(f"{CHECK_TAG} " + json.dumps({
        "rank": rank, "world_size": ws, "node_rank": int(os.environ.get("GROUP_RANK", -1)),
        "backend": backend, "module": module, "devices": devices, "failures": failures,
        "config": {k: v for k, v in (config or {}).items()
                   if k in ("TCPX_SOCKET_IFNAME", "TCPX_NCHANNELS", "TCPX_NSOCKS")},
    }), flush=True)

    result = None
    if args.iters > 0:
        result, bad = time_all_reduce(rank, ws, args.bytes, args.warmup, args.iters)
        failures += bad
        for f in bad:
            print(f"{CHECK_TAG}_TIMED_FAILURE {f}", file=sys.stderr, flush=True)
    if rank == 0:
        print(f"{RESULT_TAG} " + json.dumps({
            "ifname": args.ifname, "world_size": ws, "backend": backend, "devices": devices,
            "nchannels": (config or {}).get("TCPX_NCHANNELS", os.environ.get("TCPX_NCHANNELS")),
            "nsocks": (config or {}).get("TCPX_NSOCKS"), **(result or {}),
        }), flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


# ------------------------------------------------------------------------------------------------
# inputs and references: every rank can build every rank's input
# ------------------------------------------------------------------------------------------------

def _values(torch, seed: int, n: int):
    """n integer-valued float32 numbers in [-500, 520]: sums of a few stay exact."""
    i = torch.arange(n, dtype=torch.int64)
    return ((i * 7 + seed * 13) % 1001 - 500 + seed % 20).to(torch.float32)


def check_collectives(rank: int, ws: int) -> list[str]:
    """Run every collective once per size; return descriptions of wrong results."""
    import torch
    import torch.distributed as dist

    failures: list[str] = []

    def expect(name: str, got, want) -> None:
        if got.shape != want.shape:
            failures.append(f"rank {rank} {name}: shape {tuple(got.shape)}, expected "
                            f"{tuple(want.shape)}")
        elif not torch.equal(got, want):
            bad = (got != want).nonzero().flatten()
            k = int(bad[0])
            failures.append(f"rank {rank} {name}: {bad.numel()} of {want.numel()} elements "
                            f"differ, first at {k}: {got.flatten()[k].item()} != "
                            f"{want.flatten()[k].item()}")

    # 1023 elements travel inline with the header; 393241 (~1.5 MiB, not a multiple of any
    # chunk or slice) are cut into slices across the data sockets (and links).
    for n in (1023, 393241):
        def inp(r, what, m=n):
            return _values(torch, 1000 * what + 17 * r + n % 97, m)

        # all_reduce SUM
        t = inp(rank, 1)
        dist.all_reduce(t)
        expect(f"all_reduce(n={n})", t, sum(inp(r, 1) for r in range(ws)))

        # broadcast from a rank of the other node than rank 0
        src = ws - 2 if ws > 2 else ws - 1
        t = inp(rank, 2)
        dist.broadcast(t, src=src)
        expect(f"broadcast(n={n}, src={src})", t, inp(src, 2))

        # reduce SUM to rank 1 (only the destination's result is defined)
        dst = 1 % ws
        t = inp(rank, 3)
        dist.reduce(t, dst=dst)
        if rank == dst:
            expect(f"reduce(n={n}, dst={dst})", t, sum(inp(r, 3) for r in range(ws)))

        # all_gather_into_tensor
        out = torch.full((ws * n,), -1.0)
        dist.all_gather_into_tensor(out, inp(rank, 4))
        expect(f"all_gather_into_tensor(n={n})", out, torch.cat([inp(r, 4) for r in range(ws)]))

        # reduce_scatter_tensor SUM
        out = torch.full((n,), -1.0)
        dist.reduce_scatter_tensor(out, inp(rank, 5, ws * n))
        full = sum(inp(r, 5, ws * n) for r in range(ws))
        expect(f"reduce_scatter_tensor(n={n})", out, full[rank * n:(rank + 1) * n])

        # all_to_all_single, even splits: block j of rank r's input goes to rank j
        out = torch.full((ws * n,), -1.0)
        dist.all_to_all_single(out, inp(rank, 6, ws * n))
        expect(f"all_to_all_single(n={n})", out,
               torch.cat([inp(r, 6, ws * n)[rank * n:(rank + 1) * n] for r in range(ws)]))

        # gather to the last rank
        dst = ws - 1
        gl = [torch.full((n,), -1.0) for _ in range(ws)] if rank == dst else None
        dist.gather(inp(rank, 7), gather_list=gl, dst=dst)
        if rank == dst:
            for r in range(ws):
                expect(f"gather(n={n}, dst={dst})[{r}]", gl[r], inp(r, 7))

        # scatter from rank 0: piece j is inp(j, 8) built on rank 0
        out = torch.full((n,), -1.0)
        dist.scatter(out, scatter_list=[inp(j, 8) for j in range(ws)] if rank == 0 else None,
                     src=0)
        expect(f"scatter(n={n}, src=0)", out, inp(rank, 8))

        dist.barrier()

        # send/recv: with the peer on the other node (rank ^ 2) and on the same node (rank ^ 1)
        for step, mask in enumerate((2, 1)):
            peer = rank ^ mask
            if peer >= ws:
                continue
            got = torch.full((n,), -1.0)
            mine = inp(rank, 9 + step)
            if rank < peer:
                dist.send(mine, dst=peer)
                dist.recv(got, src=peer)
            else:
                dist.recv(got, src=peer)
                dist.send(mine, dst=peer)
            expect(f"send/recv(n={n}, peer={peer})", got, inp(peer, 9 + step))
    return failures


def time_all_reduce(rank: int, ws: int, nbytes: int, warmup: int, iters: int):
    """Timed all_reduce SUMs; returns (result dict, failures)."""
    import torch
    import torch.distributed as dist

    n = nbytes // 4
    t = torch.empty(n, dtype=torch.float32)
    want = float(ws * (ws + 1) // 2)
    failures = []
    times = []
    for it in range(warmup + iters):
        t.fill_(rank + 1)
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        dt = time.perf_counter() - t0
        if it >= warmup:
            times.append(dt)
        if not bool((t == want).all()):
            failures.append(f"rank {rank} timed all_reduce {it}: "
                            f"{int((t != want).sum())} elements != {want}")
    # An iteration lasts as long as its slowest rank.
    tt = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(tt, op=dist.ReduceOp.MAX)
    max_times = tt.tolist()
    med = statistics.median(max_times)
    factor = 2 * (ws - 1) / ws
    result = {
        "bytes": n * 4, "warmup": warmup, "iters": iters, "times_s": max_times,
        "median_s": med, "busbw_Bps": factor * n * 4 / med,
        "busbw_best_Bps": factor * n * 4 / min(max_times),
    }
    return result, failures


if __name__ == "__main__":
    sys.exit(main())

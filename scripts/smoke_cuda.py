"""Quick check of the tcpx backend on CUDA tensors (GPU machine): every op
once, small and large, against values computed on the CPU; prints one line
per op and exits non-zero on any mismatch. Ranks use cuda:(rank % GPUs), so
one GPU serves several ranks.

    python3 scripts/smoke_cuda.py [world_size]
"""
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def expect(name, got, want, failures):
    got = got.cpu()
    ok = got.dtype == want.dtype and got.shape == want.shape
    if ok and want.dtype in (torch.bfloat16, torch.float16):
        # Sums of several ranks round differently in another order.
        ok = torch.allclose(got.float(), want.float(), rtol=3e-2, atol=0)
    elif ok:
        ok = torch.equal(got, want)
    if not ok:
        failures.append(name)
        bad = (got != want).nonzero()[:3].tolist() if got.shape == want.shape else "shape"
        print(f"  FAIL {name}: first bad {bad}", flush=True)


def run(rank, ws, port):
    import faulthandler
    import threading
    hang_s = float(os.environ.get("SMOKE_HANG_S", "80"))
    faulthandler.dump_traceback_later(hang_s, exit=True)

    dumper = None
    if os.environ.get("SMOKE_STACKS"):  # native stacks of tcpx threads on a hang (debug aid)
        import ctypes
        dumper = ctypes.CDLL(os.environ["SMOKE_STACKS"])
        dumper.stackdump_install()

    def watchdog():  # a moment before faulthandler: what the workers wait for
        time.sleep(max(hang_s - 3, 1))
        if dist.is_initialized():
            dist.group.WORLD._get_backend(torch.device("cuda")).dump_state()
        # What every thread is blocked in (syscall numbers: 202 futex, 16 ioctl, 24 sched_yield).
        for tid in sorted(os.listdir("/proc/self/task")):
            def read(name):
                try:
                    with open(f"/proc/self/task/{tid}/{name}") as f:
                        return f.read().strip()
                except OSError:
                    return "?"
            print(f"rank {rank} thread {tid} {read('comm')}: syscall {read('syscall').split(' ')[0]}"
                  f" wchan {read('wchan')}", flush=True)
            if dumper and (read("comm").startswith("tcpx-worker") or tid == str(os.getpid())):
                dumper.stackdump_thread(int(tid))
                time.sleep(0.2)
    threading.Thread(target=watchdog, daemon=True).start()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch_tcpx  # noqa: F401
    dev = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    import datetime
    timeout = datetime.timedelta(seconds=float(os.environ.get("SMOKE_PG_TIMEOUT_S", "600")))
    dist.init_process_group("tcpx", rank=rank, world_size=ws, timeout=timeout)
    failures = []
    for n in (1, 1023, (1 << 20) + 3, 16 << 20):
        print(f"rank {rank}: n={n}", flush=True)
        base = [torch.arange(n, dtype=torch.int64) % 97 + r for r in range(ws)]
        for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.uint8):
            ins = [b.to(dtype) for b in base]
            t = ins[rank].to(dev)
            dist.all_reduce(t)
            want = ins[0].clone()
            for x in ins[1:]:
                want = want + x
            expect(f"all_reduce {dtype} n={n}", t, want.to(dtype), failures)
        t = base[rank].float().to(dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        expect(f"all_reduce MAX n={n}", t, torch.stack(base).max(0).values.float(), failures)
        t = base[rank].float().to(dev)
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
        expect(f"all_reduce AVG n={n}", t, (torch.stack(base).float().sum(0) / ws), failures)
        t = base[rank].float().to(dev)
        dist.broadcast(t, src=ws - 1)
        expect(f"broadcast n={n}", t, base[ws - 1].float(), failures)
        out = torch.empty(ws * n, dtype=torch.float32, device=dev)
        dist.all_gather_into_tensor(out, base[rank].float().to(dev))
        expect(f"all_gather_into_tensor n={n}", out, torch.cat(base).float(), failures)
        outs = [torch.empty(n, device=dev) for _ in range(ws)]
        dist.all_gather(outs, base[rank].float().to(dev))
        expect(f"all_gather n={n}", torch.cat(outs), torch.cat(base).float(), failures)
        full = [torch.cat([b + i for i in range(ws)]).float() for b in base]
        o = torch.empty(n, device=dev)
        dist.reduce_scatter_tensor(o, full[rank].to(dev))
        expect(f"reduce_scatter_tensor n={n}", o, sum(f[rank * n:(rank + 1) * n] for f in full), failures)
        t = base[rank].float().to(dev)
        dist.reduce(t, dst=0)
        if rank == 0:
            expect(f"reduce n={n}", t, sum(b.float() for b in base), failures)
        else:
            expect(f"reduce input kept n={n}", t, base[rank].float(), failures)
        src = torch.cat([base[rank] * 10 + j for j in range(ws)]).float()
        o = torch.empty(ws * n, device=dev)
        dist.all_to_all_single(o, src.to(dev))
        want = torch.cat([base[j] * 10 + rank for j in range(ws)]).float()
        expect(f"all_to_all_single n={n}", o, want, failures)
        gl = [torch.empty(n, device=dev) for _ in range(ws)] if rank == 0 else None
        dist.gather(base[rank].float().to(dev), gl, dst=0)
        if rank == 0:
            expect(f"gather n={n}", torch.cat(gl), torch.cat(base).float(), failures)
        o = torch.empty(n, device=dev)
        sl = [base[j].float().to(dev) for j in range(ws)] if rank == 0 else None
        dist.scatter(o, sl, src=0)
        expect(f"scatter n={n}", o, base[rank].float(), failures)
        if rank == 0:
            dist.send(base[0].float().to(dev), dst=1)
            r = torch.empty(n, device=dev)
            dist.recv(r, src=1)
            expect(f"send/recv n={n}", r, base[1].float(), failures)
        elif rank == 1:
            r = torch.empty(n, device=dev)
            dist.recv(r, src=0)
            dist.send(base[1].float().to(dev), dst=0)
            expect(f"recv/send n={n}", r, base[0].float(), failures)
        # non-contiguous
        big = torch.zeros(n, 2, device=dev)
        view = big[:, 0]
        view.copy_(base[rank].float().to(dev))
        dist.all_reduce(view)
        expect(f"all_reduce noncontig n={n}", big[:, 0], sum(b.float() for b in base), failures)
        expect(f"all_reduce noncontig untouched n={n}", big[:, 1], torch.zeros(n), failures)
    dist.barrier()
    # Host does not block: a long kernel ahead of the op.
    t = torch.ones(1 << 20, device=dev)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(int(2e9))  # ~1 s at ~2 GHz
    w = dist.all_reduce(t, async_op=True)
    w.wait()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    gpu = time.perf_counter() - t0
    expect("all_reduce after sleep", t, torch.full((1 << 20,), float(ws)), failures)
    print(f"rank {rank}: host returned after {host*1e3:.1f} ms, GPU done after {gpu*1e3:.1f} ms",
          flush=True)
    if host > 0.5 * gpu and os.environ.get("TCPX_CUDA_WAIT") != "host":  # host mode blocks by design
        failures.append("host blocked")
    b = dist.group.WORLD._get_backend(dev).device_breakdown()
    print(f"rank {rank}: {b['ops']} CUDA collectives, wall {b['wall_us'] / 1e3:.1f} ms, staging busy "
          f"{b['staging_us'] / 1e3:.1f} ms, sends {b['net_us'] / 1e3:.1f} ms, unpacks "
          f"{b['unpack_us'] / 1e3:.1f} ms", flush=True)
    dist.destroy_process_group()
    print(f"rank {rank}: {'OK' if not failures else 'FAILED ' + str(len(failures))}", flush=True)
    if failures:
        sys.exit(1)


def main():
    ws = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(run, args=(ws, port), nprocs=ws, start_method="spawn")


if __name__ == "__main__":
    main()

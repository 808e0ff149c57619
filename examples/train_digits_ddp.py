#!/usr/bin/env python3
"""Train a small MLP with DistributedDataParallel over torch_tcpx and check it against gloo.

What it does
------------
Trains a 64-128-64-10 MLP on scikit-learn's bundled handwritten digits dataset
(``sklearn.datasets.load_digits``: 1797 8x8 images, no download), standardized,
with a fixed seeded 75/25 train/test split. Every rank trains on its
``DistributedSampler`` shard with SGD + momentum for a few epochs.

The same model is trained twice, from the same initial parameters and in the
same data order:

1. with DDP over the default process group (backend from ``--backend``,
   default ``tcpx``);
2. with DDP over a gloo group made with ``dist.new_group(backend="gloo")``.

Rank 0 prints per epoch the train loss (mean over all ranks, all-reduced) and
the test accuracy (correct/total counts all-reduced), the wall time of each
run, and at the end a verdict: the maximum absolute difference between the
final parameters of the two runs and

    PASS: final parameters match gloo within rtol=1e-5, atol=1e-6

or ``FAIL: ...``; on failure every rank exits with a non-zero status. It also
checks that the replicas of the run under test are identical on all ranks.

Gradients are summed by different algorithms in the two runs, so the results
agree to rounding, not bit for bit; that is what the tolerance is for.

How to run
----------
    torchrun --standalone --nproc-per-node 4 examples/train_digits_ddp.py
    torchrun --standalone --nproc-per-node 4 examples/train_digits_ddp.py --backend gloo

(``--backend gloo`` compares gloo with gloo, a check of the script itself.) On GPUs:

    torchrun --standalone --nproc-per-node 2 examples/train_digits_ddp.py --device cuda --reference nccl

Options: ``--epochs``, ``--batch-size`` (per rank), ``--lr``, ``--momentum``,
``--seed``, ``--device cpu|cuda``, ``--rtol``, ``--atol``; see ``--help``.
Needs scikit-learn (``pip install scikit-learn``).
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", default="tcpx",
                   help="backend of the default process group, the one under test")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32, help="per-rank batch size")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", default="gloo",
                   help="backend of the reference run (gloo; nccl with --device cuda)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the model and tensors live (cuda: one GPU per rank, LOCAL_RANK)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads per process")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-6)
    return p.parse_args()


def seed_everything(seed):
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(seed):
    """Standardized digits, fixed split. Identical on every rank (no randomness outside the seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x_tr)
    x_tr = torch.tensor(scaler.transform(x_tr), dtype=torch.float32)
    x_te = torch.tensor(scaler.transform(x_te), dtype=torch.float32)
    return (TensorDataset(x_tr, torch.tensor(y_tr, dtype=torch.long)),
            TensorDataset(x_te, torch.tensor(y_te, dtype=torch.long)))


class MLP(nn.Module):
    def __init__(self, sizes=(64, 128, 64, 10)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def log0(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def train(name, pg, init_state, train_set, test_set, args, device):
    """Train from init_state with DDP over process group pg; return (final params, seconds)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # nothing random below, but keep both runs on the same footing

    model = MLP().to(device)
    model.load_state_dict(init_state)
    ddp = DDP(model, process_group=pg, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=args.momentum)

    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=False)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=0)
    # Test set: a plain strided shard per rank (no padding, so the counts are exact).
    x_te, y_te = test_set.tensors
    x_te, y_te = x_te[rank::world].to(device), y_te[rank::world].to(device)

    dist.barrier(group=pg)
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)
        ddp.train()
        loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, samples]
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(ddp(xb), yb)
            loss.backward()
            opt.step()
            loss_sum[0] += loss.detach().double() * len(yb)
            loss_sum[1] += len(yb)

        ddp.eval()
        with torch.no_grad():
            pred = model(x_te).argmax(dim=1)
        counts = torch.tensor([(pred == y_te).sum().item(), len(y_te)],
                              dtype=torch.float64, device=device)
        stats = torch.cat([loss_sum, counts])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=pg)
        log0(f"[{name:>5}] epoch {epoch:3d}/{args.epochs}  train loss {stats[0] / stats[1]:.5f}  "
             f"test acc {100.0 * stats[2] / stats[3]:6.2f}% ({int(stats[2])}/{int(stats[3])})")
    dist.barrier(group=pg)
    seconds = time.perf_counter() - t0
    params = [p.detach().clone() for p in model.parameters()]
    return params, seconds


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda":  # cuBLAS needs this for deterministic algorithms
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        torch.use_deterministic_algorithms(True)
    except Exception as e:  # pragma: no cover - informative only
        print(f"note: use_deterministic_algorithms(True) failed: {e}", file=sys.stderr)
    seed_everything(args.seed)

    if args.backend == "tcpx":
        import torch_tcpx  # noqa: F401  (registers the "tcpx" backend)

    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    dist.init_process_group(backend=args.backend)  # env:// from torchrun
    gloo_pg = dist.new_group(backend="gloo")  # carries the verdict
    ref_pg = gloo_pg if args.reference == "gloo" else dist.new_group(backend=args.reference)
    world = dist.get_world_size()
    test_name = args.backend if args.backend != "gloo" else "gloo*"  # gloo* = default-group gloo

    train_set, test_set = load_data(args.seed)
    torch.manual_seed(args.seed)
    init_state = {k: v.to(device) for k, v in MLP().state_dict().items()}
    log0(f"digits: {len(train_set)} train / {len(test_set)} test samples, world size {world}, "
         f"device {device.type}, torch {torch.__version__}, "
         f"{sum(v.numel() for v in init_state.values())} parameters")

    p_test, t_test = train(test_name, dist.group.WORLD, init_state, train_set, test_set, args, device)
    p_gloo, t_gloo = train(args.reference, ref_pg, init_state, train_set, test_set, args, device)

    # 1) The run under test against the gloo run, on every rank.
    max_abs = max((a - b).abs().max().item() for a, b in zip(p_test, p_gloo))
    close = all(torch.allclose(a, b, rtol=args.rtol, atol=args.atol) for a, b in zip(p_test, p_gloo))
    # 2) The run under test keeps identical replicas on all ranks (compare with rank 0 over gloo).
    flat = torch.cat([p.flatten() for p in p_test]).cpu()
    ref = flat.clone()
    dist.broadcast(ref, src=0, group=gloo_pg)
    replica_diff = (flat - ref).abs().max().item()
    # Agree on the verdict over the gloo group so that every rank exits the same way.
    verdict = torch.tensor([max_abs, float(not close), replica_diff], dtype=torch.float64)
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX, group=gloo_pg)
    max_abs, any_not_close, replica_diff = verdict.tolist()
    ok = any_not_close == 0.0 and replica_diff == 0.0

    refname = args.reference
    log0(f"wall time: {test_name} {t_test:.3f} s, {refname} {t_gloo:.3f} s")
    log0(f"max |param({test_name}) - param({refname})| = {max_abs:.3e}; "
         f"max replica difference across ranks ({test_name}) = {replica_diff:.3e}")
    if ok:
        log0(f"PASS: final parameters match {refname} within rtol={args.rtol:g}, atol={args.atol:g}")
    else:
        why = []
        if any_not_close:
            why.append(f"final parameters differ from {refname} beyond rtol={args.rtol:g}, atol={args.atol:g} "
                       f"(max abs diff {max_abs:.3e})")
        if replica_diff:
            why.append(f"replicas differ across ranks (max abs diff {replica_diff:.3e})")
        log0("FAIL: " + "; ".join(why))

    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

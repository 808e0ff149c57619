"""DDP communication hooks over the backend under test: allreduce_hook, fp16_compress_hook,
bf16_compress_hook and PowerSGD (powerSGD_hook with a vanilla-allreduce phase followed by
compression), at world sizes 2 and 4.

A small MLP learns a fixed teacher network (regression, SGD with momentum); every step each rank
trains on its own slice of the same global batch.  What is checked:

* Every averaging all_reduce a hook makes (all of allreduce/fp16/bf16, and PowerSGD's first
  ``start_powerSGD_iter`` steps) is checked at every step: a wrapper records each bucket's input
  (the rank's local gradients) and the hook's result; the inputs of all ranks are gathered over a
  gloo group and compressed exactly as the hook does (``x.to(dtype).div_(world_size)``), and the
  result must equal their exact sum within ``world_size - 1`` roundings in the communication
  dtype: ``(ws - 1) * (u * sum|terms| + s/2)``, where u is the unit roundoff (2^-24 float32,
  2^-11 float16, 2^-8 bfloat16) and s the smallest subnormal.  Any summation order or tree, and
  accumulating in a wider type, stays within that bound; a lost, doubled, stale or displaced
  contribution does not.
* allreduce_hook: the final parameters and the per-step losses match a single-process run on the
  whole global batch (rtol=1e-5, atol=1e-6, as in test_ddp.py: the gradient sums differ from the
  full-batch GEMM by float32 rounding only).
* PowerSGD is lossy, so there is no exact reference for the compression phase.  It can still
  fail on wrong data in three ways: (1) the replicas must stay bit-identical on all ranks (a
  rank that receives different P/Q sums than the others drifts away at once); (2) the loss must
  fall clearly (garbage sums make it diverge or stall); (3) the final parameters and losses must
  match the same hook, same state and seed, run over a gloo group of the same ranks (this also
  catches a wrong result that is the same on every rank, which (1) cannot).  Tolerance of (3):
  parameters atol=rtol=1e-3, losses rtol=1e-3.  PowerSGD amplifies rounding differences (its
  power iteration and error feedback): perturbing the inputs by +-1 ulp, like a different
  summation order, moved the final parameters by up to 4e-5 and the losses by up to 8e-5
  (relative) over ten seeds, while losing one rank's gradients once in the compression phase
  moved them by 1.5e-2 to 2.6e-2 and 2e-2 to 7e-2 (test_hook_checks_detect_wrong_sums runs
  that case).  Against gloo itself the two runs are bit-identical.
* Every run: DDP's initial broadcast gives every rank rank 0's weights (the ranks start from
  different ones), the replicas end bit-identical, and the loss over the whole data set falls
  below 0.6 of its start.

bf16_compress_hook: DDP's register_comm_hook refuses a hook *named* bf16_compress_hook unless
CUDA with NCCL >= 2.10 is present (a capability check for GPUs that does not apply to a CPU
backend); the recording wrapper has its own name, so the hook itself runs unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from harness import RankFailure
from testlib import case_seed, digest, gloo_group

STEPS = 30
START_POWERSGD_ITER = 10  # steps 0-9: vanilla allreduce; 10-29: compression
N_DATA = 1024
GLOBAL_BATCH = 32
LR, MOMENTUM = 0.05, 0.9
# ~8 KB: the ~22 KB of gradients span several buckets, whose all_reduces are in flight together.
# Not for PowerSGD: its hook issues the P and Q all_reduces from the completion callback of the
# previous one, i.e. from whichever thread completes it, so with several buckets the ranks can
# issue the collectives of different buckets in different orders (gloo then aborts with a size
# mismatch). PowerSGD gets DDP's default cap, which puts this model in one bucket.
BUCKET_CAP_MB = 0.008
IN, HIDDEN, OUT = 16, 64, 4

HOOKS = {
    # name: (hook, dtype of the all_reduce it makes)
    "allreduce": (default_hooks.allreduce_hook, torch.float32),
    "fp16": (default_hooks.fp16_compress_hook, torch.float16),
    "bf16": (default_hooks.bf16_compress_hook, torch.bfloat16),
    "powersgd": (powerSGD_hook.powerSGD_hook, torch.float32),
}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.fc3 = nn.Linear(HIDDEN, OUT)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _data(seed):
    """Inputs and the targets of a fixed random teacher network (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_DATA, IN, generator=g)
    w1 = torch.randn(IN, 32, generator=g) / math.sqrt(IN)
    w2 = torch.randn(32, OUT, generator=g) / math.sqrt(32)
    return x, torch.tanh(x @ w1 * 2) @ w2


def _global_rows(seed, step):
    g = torch.Generator().manual_seed(seed * 7919 + step)
    return torch.randperm(N_DATA, generator=g)[:GLOBAL_BATCH]


def _data_loss(model, seed):
    """The loss over the whole data set (less noisy than one batch's)."""
    x, y = _data(seed)
    with torch.no_grad():
        return F.mse_loss(model(x), y).item()


def _initial_model(seed, rank):
    torch.manual_seed(seed + 1000 * rank)
    return MLP()


FAULT_STEP = START_POWERSGD_ITER + 2  # in PowerSGD's compression phase


def _faulty(hook, fault, rank, ws):
    """Self-checks of this file's checks: ``hook`` with one injected fault at FAULT_STEP, between
    the recording wrapper and the hook, as if the backend had delivered wrong sums.
      drop-rank  the last rank's gradients of bucket 0 are zeroed (its contribution is lost)
      bf16-sum   bucket 0's result is rounded to bfloat16 (a sum at too low a precision)"""
    seen = [0]  # how many times bucket 0 came by: one per step

    def faulty_hook(state, bucket):
        fire = bucket.index() == 0 and seen[0] == FAULT_STEP
        seen[0] += bucket.index() == 0
        if fire and fault == "drop-rank" and rank == ws - 1:
            bucket.buffer().zero_()
        fut = hook(state, bucket)
        if fire and fault == "bf16-sum":
            return fut.then(lambda f: f.value().copy_(f.value().to(torch.bfloat16)))
        return fut

    return faulty_hook


def _recording(hook):
    """Wrap a hook: record (bucket index, is an averaging all_reduce, input, result) per bucket."""
    records = []

    def recording_hook(state, bucket):
        averaging = (not isinstance(state, powerSGD_hook.PowerSGDState)
                     or state.iter < state.start_powerSGD_iter)  # PowerSGD's vanilla phase
        index, inp = bucket.index(), bucket.buffer().detach().clone()

        def done(fut):
            out = fut.value()
            records.append((index, averaging, inp, out.detach().clone()))
            return out

        return hook(state, bucket).then(done)

    return recording_hook, records


def _check_averages(records, ws, comm_dtype, gloo, ctx):
    """Each recorded averaging all_reduce gave sum_i x_i.to(dtype)/ws within ws-1 roundings."""
    checked = 0
    fin = torch.finfo(comm_dtype)
    u, half_subnormal = fin.eps / 2, fin.smallest_normal * fin.eps / 2
    # Bucket order, the same on all ranks (the results arrive in any order).
    for index, averaging, inp, out in sorted(records, key=lambda r: r[0]):
        if not averaging:
            continue
        inputs = [torch.empty_like(inp) for _ in range(ws)]
        dist.all_gather(inputs, inp, group=gloo)
        terms = [x.to(comm_dtype).div_(ws).double() for x in inputs]  # exactly as the hooks do
        exact = torch.stack(terms).sum(0)
        tol = (ws - 1) * (u * torch.stack(terms).abs().sum(0) + half_subnormal)
        err = (out.double() - exact).abs()
        bad = ~(err <= tol)  # NaN counts as bad
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise AssertionError(
                f"{ctx}, bucket {index}: {int(bad.sum())} of {out.numel()} averaged gradients are "
                f"beyond {ws - 1} {comm_dtype} roundings of the exact mean; first at [{i}]: got "
                f"{out[i].item()!r}, exact {exact[i].item()!r}, bound {tol[i].item():.3e}")
        checked += 1
    records.clear()
    return checked


def _train(rank, ws, seed, pg, hook_name, gloo, record, fault=None):
    """DDP with the hook over ``pg``; returns (module, global losses per step, buckets checked,
    hook state)."""
    hook, comm_dtype = HOOKS[hook_name]
    if fault:
        hook = _faulty(hook, fault, rank, ws)
    x, y = _data(seed)
    model = _initial_model(seed, rank)
    ddp = DDP(model, process_group=pg,
              bucket_cap_mb=None if hook_name == "powersgd" else BUCKET_CAP_MB)
    # DDP broadcast rank 0's initial weights over pg.
    for p, p0 in zip(model.parameters(), _initial_model(seed, 0).parameters()):
        torch.testing.assert_close(p, p0, rtol=0, atol=0,
                                   msg=lambda m: f"after DDP's initial broadcast: {m}")
    if hook_name == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=pg, matrix_approximation_rank=1,
                                            start_powerSGD_iter=START_POWERSGD_ITER,
                                            random_seed=seed)
    else:
        state = pg  # None: the default group
    records = None
    if record:
        hook, records = _recording(hook)
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=MOMENTUM)

    local = GLOBAL_BATCH // ws
    losses, checked = [], 0
    for step in range(STEPS):
        rows = _global_rows(seed, step)[rank * local:(rank + 1) * local]
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(ddp(x[rows]), y[rows])
        loss.backward()
        if records is not None:
            checked += _check_averages(records, ws, comm_dtype, gloo,
                                       f"{hook_name} hook, step {step}")
        opt.step()
        losses.append(loss.item())
    # The global loss of a step is the mean of the rank losses (equal slices).
    global_losses = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(global_losses, group=gloo)
    return model, (global_losses / ws).tolist(), checked, state


def _single_process(seed):
    """allreduce_hook's reference: rank 0's initial weights, the whole global batch per step."""
    x, y = _data(seed)
    model = _initial_model(seed, 0)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    losses = []
    for step in range(STEPS):
        rows = _global_rows(seed, step)
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x[rows]), y[rows])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def _assert_params_close(model, ref, rtol, atol, what):
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{what}: parameter {name}: {m}")


def rank_ddp_hook(rank, ws, *, hook_name, seed, fault=None):
    gloo = gloo_group()
    model, losses, checked, state = _train(rank, ws, seed, None, hook_name, gloo, record=True,
                                           fault=fault)

    if hook_name == "allreduce":
        ref, ref_losses = _single_process(seed)
        _assert_params_close(model, ref, 1e-5, 1e-6, "DDP + allreduce_hook vs one process")
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5,
                                   atol=1e-7,
                                   msg=lambda m: f"losses vs one process: {m}")
    if hook_name == "powersgd":
        # Both phases ran: vanilla allreduce (checked above), then compression.
        assert state.iter == STEPS, f"PowerSGD counted {state.iter} iterations, not {STEPS}"
        _, before, after = state.compression_stats()
        assert 0 < after < before and state.error_dict, \
            f"PowerSGD never compressed (numel before {before}, after {after})"
        ref, ref_losses, _, _ = _train(rank, ws, seed, gloo, hook_name, gloo, record=False)
        _assert_params_close(model, ref, 1e-3, 1e-3, "PowerSGD over the backend vs over gloo")
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-3,
                                   atol=0, msg=lambda m: f"losses vs PowerSGD over gloo: {m}")

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return digest(flat), checked, _data_loss(_initial_model(seed, 0), seed), _data_loss(model, seed)


@pytest.mark.parametrize("hook_name", list(HOOKS))
@pytest.mark.parametrize("ws", [2, 4])
def test_ddp_comm_hook(pools, ws, hook_name):
    results = pools.get(ws).run(rank_ddp_hook, timeout=90, hook_name=hook_name,
                                seed=case_seed("ddp_hooks", ws, hook_name))
    digests = [r[0] for r in results]
    assert all(d == digests[0] for d in digests), \
        f"replicas diverged: final parameters differ between ranks (CRC per rank {digests})"
    _, checked, start, end = results[0]
    expected_steps = START_POWERSGD_ITER if hook_name == "powersgd" else STEPS
    assert checked >= expected_steps, f"only {checked} bucket results were checked"
    # Over the whole data set the loss falls to 0.23-0.41 of its start with every hook here
    # (PowerSGD the least); a training that goes wrong stays near 1 or grows.
    assert end < 0.6 * start, f"the loss did not fall clearly: {start:.4f} -> {end:.4f}"


@pytest.mark.parametrize("hook_name, fault, expected", [
    ("allreduce", "drop-rank", "beyond 1 torch.float32 roundings"),
    ("fp16", "bf16-sum", "beyond 1 torch.float16 roundings"),
    ("powersgd", "drop-rank", "PowerSGD over the backend vs over gloo"),
])
def test_hook_checks_detect_wrong_sums(pools, hook_name, fault, expected):
    """Self-check: one wrong sum, injected once in front of the backend, fails the run's checks
    (the per-step check of averaging all_reduces, or PowerSGD's comparison with gloo)."""
    with pytest.raises(RankFailure, match=expected):
        pools.get(2).run(rank_ddp_hook, timeout=90, hook_name=hook_name, fault=fault,
                         seed=case_seed("ddp_hooks", 2, hook_name))

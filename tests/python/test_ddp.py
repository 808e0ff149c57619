"""DistributedDataParallel parity: training over the backend under test (the default group)
matches training over a gloo subgroup of the same ranks, step for step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from testlib import case_seed, digest

STEPS = 20
_GLOO_GROUP = None


def _gloo_group():
    """A gloo group over all ranks, created once per rank process (new_group is collective)."""
    global _GLOO_GROUP
    if _GLOO_GROUP is None:
        _GLOO_GROUP = dist.new_group(backend="gloo")
    return _GLOO_GROUP


class MLP(nn.Module):
    def __init__(self, with_unused: bool):
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 4)
        # A parameter the forward never uses (find_unused_parameters=True must cope).
        self.unused = nn.Linear(64, 64) if with_unused else None

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _train(model, process_group, ddp_kwargs, rank, seed):
    ddp = DDP(model, process_group=process_group, **ddp_kwargs)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(seed * 1000 + rank * 100 + step)
        x = torch.randn(8, 16, generator=g)
        y = torch.randn(8, 4, generator=g)
        opt.zero_grad()
        loss = F.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return ddp.module, losses


def rank_ddp_parity(rank, ws, *, variant, seed):
    gloo = _gloo_group()
    # Different initial weights per rank: DDP must broadcast rank 0's at construction.
    torch.manual_seed(seed + rank)
    with_unused = variant == "find_unused_parameters"
    base = MLP(with_unused)
    kwargs = {}
    if variant == "small_buckets":
        kwargs["bucket_cap_mb"] = 0.004  # ~4 KB: the ~22 KB of gradients span several buckets
    if variant == "find_unused_parameters":
        kwargs["find_unused_parameters"] = True

    model_t, losses_t = _train(copy.deepcopy(base), None, kwargs, rank, seed)  # backend under test
    model_g, losses_g = _train(copy.deepcopy(base), gloo, kwargs, rank, seed)  # gloo reference

    for (name, p_t), (_, p_g) in zip(model_t.named_parameters(), model_g.named_parameters()):
        torch.testing.assert_close(p_t, p_g, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"parameter {name}: {m}")
    torch.testing.assert_close(torch.tensor(losses_t), torch.tensor(losses_g), rtol=1e-5,
                               atol=1e-6, msg=lambda m: f"losses per step: {m}")
    if with_unused:
        # The unused layer gets no gradient, so it still holds rank 0's initial weights.
        torch.manual_seed(seed + 0)
        rank0_initial = MLP(with_unused).unused
        for p, p0 in zip(model_t.unused.parameters(), rank0_initial.parameters()):
            assert p.grad is None or bool((p.grad == 0).all()), "unused parameter got a gradient"
            torch.testing.assert_close(p, p0, rtol=0, atol=0,
                                       msg=lambda m: f"unused parameter changed: {m}")
    flat = torch.cat([p.detach().reshape(-1) for p in model_t.parameters()])
    return digest(flat), losses_t[-1]


@pytest.mark.parametrize("variant", ["default", "small_buckets", "find_unused_parameters"])
@pytest.mark.parametrize("ws", [2, 3])
def test_ddp_matches_gloo(pools, ws, variant):
    """DDP over the tested backend trains to the same parameters and losses as DDP over gloo."""
    results = pools.get(ws).run(rank_ddp_parity, timeout=120, variant=variant,
                                seed=case_seed("ddp", ws, variant))
    digests = [d for d, _ in results]
    assert all(d == digests[0] for d in digests), \
        f"replicas diverged: final parameters differ between ranks (CRC per rank {digests})"

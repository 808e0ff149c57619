#!/usr/bin/env python3
"""Train a small transformer with FSDP2 (fully_shard) over torch_tcpx; check it against one process.

What it does
------------
Trains a 3-layer decoder-only transformer (hand-written blocks: pre-LayerNorm,
causal ``scaled_dot_product_attention``, GELU MLP; about 0.16 M parameters) on
scikit-learn's handwritten digits read as sequences: every 8x8 image is a
sequence of 64 pixel tokens (intensities 0..16) preceded by a class token, and
the model predicts each next pixel (next-token cross entropy: about 3.1 at the
start, 1.9 after 10 steps, 1.6 after the default 60). The data and its order are
fixed by the seed: step ``s`` uses global batch ``s`` of a seeded permutation,
and rank ``r`` of ``W`` takes rows ``[r*B/W, (r+1)*B/W)`` of it.

The same training runs twice, from the same initial weights on the same global
batches:

1. with ``torch.distributed.fsdp.fully_shard`` (FSDP2) on every block and on the
   root, over the default process group (backend from ``--backend``, default
   ``tcpx``), with AdamW on the sharded parameters;
2. in a single process (rank 0, no distribution at all), on the whole global
   batch.

Every rank loss is a mean over the same number of tokens, so the average of the
rank gradients that FSDP reduce-scatters equals the gradient of the full-batch
mean loss, and the two runs agree to rounding. Rank 0 prints, every
``--log-every`` steps, the global FSDP loss (the mean of the rank losses) next to
the single-process loss, then the held-out loss of both models and

    PASS: FSDP2 over tcpx matches the single-process run (losses rtol=1e-05 ...)

or ``FAIL: ...``; on failure every rank exits with a non-zero status. The
reference, the per-step losses and the verdict travel over a separate gloo
group, so the check does not rely on the backend under test; each rank compares
its own shard of every parameter with the same rows of the reference.

Tolerance (float32, the default): the two runs add the same per-sample
gradients in different orders (FSDP: one GEMM over B/W rows per rank, then the
backend's reduce-scatter of W partial sums; one process: one GEMM over B rows),
so the gradients differ by a few float32 roundings (relative ~1e-7) per step,
and AdamW carries those differences along. Measured with the default settings,
over gloo and over tcpx alike: at most ~2e-7 relative on the per-step losses
and ~1e-6 absolute on the parameters (which are of order 0.01-1). The defaults,
rtol=1e-5 for the losses and atol=2e-5 + rtol=1e-4 for the parameters, leave a
margin of 20-50x, while one rank's gradient lost from a single reduce-scatter
(``--inject-fault drop-rank``) moves the losses by 1e-3 to 2e-2 (relative) and
the parameters by 1e-2 to 2e-2. (A parameter whose true gradient is zero would
be walked by rounding noise alone under Adam; hence no bias on qkv.)
``--dtype float64`` runs everything in double precision: differences ~5e-15,
tolerances 1e-8 times the float32 ones, and FSDP then reduce-scatters with SUM
instead of AVG (see below).

What FSDP2 asks of the backend (torch 2.13, CPU; the example records every
``c10d`` op the dispatcher sees during the first step and prints them)
-----------------------------------------------------------------------------
* ``c10d::_allgather_base_`` (``ProcessGroup::all_gather_single``, i.e.
  ``all_gather_into_tensor``): one per sharded module in forward and again in
  backward (``reshard_after_forward=True``); the flat shards of all parameters
  of the module, in the parameter dtype (float32 here; bfloat16/float16 with a
  ``MixedPrecisionPolicy(param_dtype=...)``; uint8 when a module mixes dtypes).
  Here: 4 in forward (3 blocks + root) and 3 in backward (the root keeps its
  parameters unsharded from forward to backward).
* ``c10d::_reduce_scatter_base_`` (``reduce_scatter_tensor``): one per sharded
  module in backward, on the flat padded gradients, in the reduce dtype (the
  parameter dtype unless ``MixedPrecisionPolicy(reduce_dtype=...)``), with
  - ``ReduceOp.AVG`` when the reduce dtype is float32 or bfloat16 (the default
    here): no pre/post division in Python at all;
  - ``ReduceOp.SUM`` for float16 and float64 (FSDP's "overflow risk" dtypes),
    with a division by a power of two before and the rest after the
    reduce-scatter (W=4: /2 before, /2 after);
  - ``ReduceOp.PREMUL_SUM(1/f)`` only after ``set_gradient_divide_factor(f)``
    with f != W (gloo cannot run that case).
* No all_reduce, broadcast or barrier from FSDP itself on a 1-D mesh (HSDP, a
  2-D mesh, adds an ``allreduce_`` of the reduce-scattered shards). The 1-D
  CPU mesh (``init_device_mesh("cpu", (W,))``) reuses the default group, so
  every one of these collectives runs on the backend under test.

How to run
----------
    torchrun --standalone --nproc-per-node 4 examples/train_fsdp2.py
    torchrun --standalone --nproc-per-node 4 examples/train_fsdp2.py --backend gloo
    bash scripts/train_fsdp2.sh          # installs and builds first, then the first line

Options: ``--steps``, ``--global-batch``, ``--lr``, ``--layers``, ``--dim``,
``--heads``, ``--dtype``, ``--device cpu|cuda``, ``--seed``, ``--threads``, ``--log-every``,
``--no-trace``, ``--inject-fault``, ``--loss-rtol``, ``--param-atol``,
``--param-rtol``; see ``--help``. Needs scikit-learn.
``tests/python/test_fsdp.py`` runs ``compare_fsdp_with_single_process`` from
this file inside the test suite's rank processes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import math
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

N_PIXEL_TOKENS = 17  # pixel intensities 0..16 of sklearn's digits
N_CLASSES = 10
VOCAB = N_PIXEL_TOKENS + N_CLASSES  # a class token (17 + label) opens every sequence
SEQ_LEN = 64  # the model reads [class, p0 .. p62] and predicts [p0 .. p63]


@dataclasses.dataclass
class Config:
    steps: int = 60
    global_batch: int = 64
    lr: float = 3e-3
    layers: int = 3
    dim: int = 64
    heads: int = 4
    dtype: str = "float32"
    # "cuda": the model and data live on the rank's GPU (LOCAL_RANK), the mesh is a CUDA mesh,
    # and the single-process reference runs on rank 0's GPU.
    device: str = "cpu"
    seed: int = 0
    log_every: int = 10
    trace: bool = True
    # Self-check of the comparison: "drop-rank" zeroes the last rank's input of the first
    # reduce-scatter of step 2 (the last block's), as if the backend had lost one rank's
    # contribution once; the verdict must then be FAIL.
    fault: str | None = None
    # Tolerances (see the module docstring); scaled by 1e-8 for float64 by default_tolerances().
    loss_rtol: float | None = None
    param_atol: float | None = None
    param_rtol: float | None = None

    def default_tolerances(self) -> None:
        scale = 1e-8 if self.dtype == "float64" else 1.0
        if self.loss_rtol is None:
            self.loss_rtol = 1e-5 * scale
        if self.param_atol is None:
            self.param_atol = 2e-5 * scale
        if self.param_rtol is None:
            self.param_rtol = 1e-4 * scale

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "float64": torch.float64}[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        if self.device == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# data and model
# ------------------------------------------------------------------------------------------------

def load_sequences(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as token sequences [class token, 64 pixels]: (train, held-out), fixed 80/20 split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    seqs = torch.cat([torch.tensor(y, dtype=torch.long)[:, None] + N_PIXEL_TOKENS,
                      torch.tensor(x, dtype=torch.long)], dim=1)  # [1797, 65]
    perm = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(seqs))
    return seqs[perm[:n_train]], seqs[perm[n_train:]]


def global_batches(n_samples: int, global_batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Row indices of every step's global batch: consecutive slices of one seeded permutation per
    epoch (the tail of an epoch that does not fill a batch is skipped)."""
    per_epoch = n_samples // global_batch
    if per_epoch == 0:
        raise ValueError(f"global batch {global_batch} is larger than the data ({n_samples})")
    batches = []
    epoch = 0
    while len(batches) < steps:
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        perm = torch.randperm(n_samples, generator=g)
        for i in range(per_epoch):
            batches.append(perm[i * global_batch:(i + 1) * global_batch])
        epoch += 1
    return batches[:steps]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        # No bias on qkv: softmax ignores a key bias, so its true gradient is 0 and AdamW would
        # walk it by rounding noise alone (different noise in the two runs).
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [b, heads, t, d / heads]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyDecoder(nn.Module):
    def __init__(self, layers: int, dim: int, heads: int):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(SEQ_LEN, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, N_PIXEL_TOKENS)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        # Logits as [batch * time, tokens]: a 2-D Linear returns a fresh tensor (FSDP2 warns
        # about a root module that returns a view).
        return self.head(self.ln(x).reshape(-1, x.shape[-1]))


def make_model(cfg: Config) -> nn.Module:
    return TinyDecoder(cfg.layers, cfg.dim, cfg.heads).to(cfg.torch_dtype).to(cfg.torch_device)


def initial_state(cfg: Config) -> dict[str, torch.Tensor]:
    """The initial weights, a function of the seed only (so every rank builds the same ones);
    made on the CPU whatever the device, so CPU and CUDA runs start from the same weights."""
    torch.manual_seed(cfg.seed)
    cpu = TinyDecoder(cfg.layers, cfg.dim, cfg.heads).to(cfg.torch_dtype)
    return {k: v.clone().to(cfg.torch_device) for k, v in cpu.state_dict().items()}


def next_token_loss(model: nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    logits = model(seqs[:, :-1])
    return F.cross_entropy(logits, seqs[:, 1:].reshape(-1))


def make_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    # foreach=False: the same per-tensor code path for DTensor shards and for plain tensors.
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.01,
                             foreach=False)


# ------------------------------------------------------------------------------------------------
# the two runs
# ------------------------------------------------------------------------------------------------

def train_single_process(cfg: Config, train: torch.Tensor, init_state, batches):
    """The reference: plain model, whole global batch per step.

    Returns (losses, {name: parameter}, model, seconds).
    """
    model = make_model(cfg)
    model.load_state_dict(init_state)
    opt = make_optimizer(model.parameters(), cfg)
    losses = []
    t0 = time.perf_counter()
    for idx in batches:
        opt.zero_grad(set_to_none=True)
        loss = next_token_loss(model, train[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, model, seconds


class CommTrace:
    """Counts the c10d ops (name, dtypes, reduce op) that pass the dispatcher while active."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        names = {int(v): k for k, v in dist.ReduceOp.RedOpType.__members__.items()}
        counts: collections.Counter = collections.Counter()
        self.counts = counts

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket)
                if name.startswith("c10d."):
                    dtypes, op = set(), None
                    stack = list(args)
                    while stack:
                        a = stack.pop()
                        if isinstance(a, torch.Tensor):
                            dtypes.add(str(a.dtype).replace("torch.", ""))
                        elif isinstance(a, (list, tuple)):
                            stack.extend(a)
                        elif isinstance(a, torch.ScriptObject) and a._has_method("op"):
                            op = names.get(int(a.op()), str(a.op()))  # a c10d ReduceOp
                    counts[(name, ",".join(sorted(dtypes)), op)] += 1
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    def summary(self) -> list[tuple[str, str, str | None, int]]:
        return sorted((n, d, o, c) for (n, d, o), c in self.counts.items())


def train_fsdp(cfg: Config, train: torch.Tensor, init_state, batches):
    """FSDP2 over the default group. Returns (local losses, {name: local shard}, model, seconds,
    trace of the first step or None)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.global_batch % world:
        raise ValueError(f"global batch {cfg.global_batch} is not divisible by world size {world}")
    local = cfg.global_batch // world

    mesh = init_device_mesh(cfg.torch_device.type, (world,))
    if mesh.get_group() != dist.group.WORLD:  # a 1-D mesh must reuse the group under test
        raise RuntimeError(f"the FSDP mesh runs on {dist.get_backend(mesh.get_group())}, "
                           f"not on the default group ({dist.get_backend()})")
    model = make_model(cfg)
    model.load_state_dict(init_state)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if cfg.fault is not None:
        fault = faulty_reduce_scatter(cfg.fault, rank, world, calls_per_step=len(model.blocks) + 1)
        for module in [*model.blocks, model]:
            module.set_custom_reduce_scatter(fault)
    opt = make_optimizer(model.parameters(), cfg)

    losses, trace = [], None
    t0 = time.perf_counter()
    for step, idx in enumerate(batches):
        rows = idx[rank * local:(rank + 1) * local]
        with (CommTrace() if cfg.trace and step == 0 else contextlib.nullcontext()) as tr:
            opt.zero_grad(set_to_none=True)
            loss = next_token_loss(model, train[rows])
            loss.backward()
            opt.step()
        trace = tr if tr is not None else trace
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    shards = {n: p.to_local().detach().cpu() for n, p in model.named_parameters()}
    return losses, shards, model, seconds, trace


def faulty_reduce_scatter(kind: str, rank: int, world: int, calls_per_step: int):
    """FSDP2's default reduce-scatter, with one injected fault (see Config.fault)."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    if kind != "drop-rank":
        raise ValueError(f"unknown fault {kind!r} (known: drop-rank)")

    class Faulty(DefaultReduceScatter):
        calls = 0

        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            if self.calls == calls_per_step and rank == world - 1:  # first call of step 2
                input_tensor.zero_()
            self.calls += 1
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    return Faulty()


def shard_rows(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The rows of ``full`` that FSDP2's Shard(0) gives ``rank`` (torch.chunk; may be empty)."""
    chunks = torch.chunk(full, world, dim=0)
    if rank < len(chunks):
        return chunks[rank]
    return full[full.shape[0]:]  # empty, with the right trailing shape


# ------------------------------------------------------------------------------------------------
# the comparison (importable: tests/python/test_fsdp.py runs it in the suite's rank processes)
# ------------------------------------------------------------------------------------------------

def compare_fsdp_with_single_process(cfg: Config, check_group=None, log=None) -> dict:
    """Train with FSDP2 over the default group and in one process (rank 0), compare; return a
    report that is the same on every rank (``report["ok"]`` is the verdict).

    ``check_group``: the group that carries the reference and the verdict (default: a new gloo
    group; creating it is collective). ``log``: called with lines on rank 0 (default: print).
    """
    cfg = dataclasses.replace(cfg)
    cfg.default_tolerances()
    rank, world = dist.get_rank(), dist.get_world_size()
    if check_group is None:
        check_group = dist.new_group(backend="gloo")
    say = (log or (lambda s: print(s, flush=True))) if rank == 0 else (lambda s: None)

    train, held_out = (t.to(cfg.torch_device) for t in load_sequences(cfg.seed))
    batches = global_batches(len(train), cfg.global_batch, cfg.steps, cfg.seed)
    init_state = initial_state(cfg)
    n_params = sum(v.numel() for v in init_state.values())
    say(f"digits as sequences: {len(train)} train / {len(held_out)} held-out, {cfg.steps} steps of "
        f"{cfg.global_batch} sequences ({cfg.global_batch // world} per rank), world size {world}, "
        f"backend {dist.get_backend()}, {cfg.dtype}, {n_params} parameters, "
        f"torch {torch.__version__}")

    # 1) FSDP2 over the backend under test.
    losses_local, shards, fsdp_model, t_fsdp, trace = train_fsdp(cfg, train, init_state, batches)

    # 2) The single-process reference on rank 0; the others wait in the broadcast below.
    names = [n for n, _ in make_model(cfg).named_parameters()]
    shapes = {n: init_state[n].shape for n in names}
    numel = sum(math.prod(s) for s in shapes.values())
    ref_flat = torch.empty(cfg.steps + numel + 2, dtype=torch.float64)
    if rank == 0:
        ref_losses, ref_params, ref_model, t_ref = train_single_process(cfg, train, init_state,
                                                                          batches)
        with torch.no_grad():
            ref_held = next_token_loss(ref_model, held_out).item()
        ref_flat.copy_(torch.cat([torch.tensor(ref_losses, dtype=torch.float64),
                                  torch.cat([ref_params[n].reshape(-1).double().cpu()
                                             for n in names]),
                                  torch.tensor([t_ref, ref_held], dtype=torch.float64)]))
    dist.broadcast(ref_flat, src=0, group=check_group)
    ref_losses = ref_flat[:cfg.steps]
    t_ref, ref_held = ref_flat[-2].item(), ref_flat[-1].item()
    ref_params, offset = {}, cfg.steps
    for n in names:
        k = math.prod(shapes[n])
        ref_params[n] = ref_flat[offset:offset + k].reshape(shapes[n]).to(cfg.torch_dtype)
        offset += k

    # Global FSDP loss per step: the mean of the rank losses (every rank has as many tokens).
    fsdp_losses = torch.tensor(losses_local, dtype=torch.float64)
    dist.all_reduce(fsdp_losses, op=dist.ReduceOp.SUM, group=check_group)
    fsdp_losses /= world
    with torch.no_grad():  # collective: every rank runs the FSDP model on the held-out set
        fsdp_held = next_token_loss(fsdp_model, held_out).item()

    # 3) Compare: losses (same on every rank) and each rank's own shard of every parameter.
    loss_err = ((fsdp_losses - ref_losses).abs() / ref_losses.abs()).max().item()
    param_abs, param_excess, worst = 0.0, 0.0, ""
    for n in names:
        mine, ref = shards[n].double(), shard_rows(ref_params[n], rank, world).double()
        if mine.shape != ref.shape:
            raise AssertionError(f"rank {rank}: shard of {n} has shape {tuple(mine.shape)}, "
                                 f"expected {tuple(ref.shape)} (torch.chunk of the full parameter)")
        if mine.numel() == 0:
            continue
        diff = (mine - ref).abs()
        # excess > 0 where |diff| > atol + rtol * |ref| (torch.allclose's rule)
        excess = (diff - cfg.param_atol - cfg.param_rtol * ref.abs()).max().item()
        if diff.max().item() > param_abs:
            param_abs = diff.max().item()
        if excess > 0 and (not worst or excess > param_excess):
            param_excess, worst = excess, n
    bad_params = torch.tensor([param_abs, 1.0 if worst else 0.0], dtype=torch.float64)
    dist.all_reduce(bad_params, op=dist.ReduceOp.MAX, group=check_group)
    param_abs, any_bad = bad_params.tolist()
    worst_names: list = [None] * world
    dist.all_gather_object(worst_names, worst, group=check_group)
    worst = sorted({w for w in worst_names if w})

    for step in range(cfg.steps):
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            say(f"step {step + 1:4d}/{cfg.steps}  loss FSDP2 {fsdp_losses[step].item():.6f}  "
                f"single {ref_losses[step].item():.6f}  "
                f"|diff| {abs(fsdp_losses[step].item() - ref_losses[step].item()):.1e}")
    say(f"held-out loss: FSDP2 {fsdp_held:.6f}, single process {ref_held:.6f} "
        f"(a uniform guess: ln {N_PIXEL_TOKENS} = {math.log(N_PIXEL_TOKENS):.3f})")
    say(f"wall time: FSDP2 ({world} ranks) {t_fsdp:.2f} s, single process {t_ref:.2f} s")
    trace_rows = trace.summary() if trace is not None else []
    if trace_rows:
        say("backend calls of FSDP2 in step 1 (op, dtype, reduce op, count):")
        for name, dtypes, op, count in trace_rows:
            say(f"    {name:<28} {dtypes:<10} {op or '-':<10} x{count}")
    say(f"max rel. loss difference {loss_err:.2e} (rtol {cfg.loss_rtol:g}); max |param difference| "
        f"{param_abs:.2e} (atol {cfg.param_atol:g} + rtol {cfg.param_rtol:g})")

    why = []
    if not loss_err <= cfg.loss_rtol:  # also catches NaN
        why.append(f"losses differ (max relative difference {loss_err:.2e} > {cfg.loss_rtol:g})")
    if any_bad or not math.isfinite(param_abs):
        why.append(f"final parameters differ beyond atol={cfg.param_atol:g}, "
                   f"rtol={cfg.param_rtol:g} (max abs difference {param_abs:.2e}; in {worst})")
    ok = not why
    backend = dist.get_backend()
    if ok:
        say(f"PASS: FSDP2 over {backend} matches the single-process run (losses rtol="
            f"{cfg.loss_rtol:g}, parameters atol={cfg.param_atol:g} rtol={cfg.param_rtol:g})")
    else:
        say(f"FAIL: FSDP2 over {backend}: " + "; ".join(why))
    return {
        "ok": ok, "why": why, "loss_rel_err": loss_err, "param_abs_err": param_abs,
        "fsdp_losses": fsdp_losses.tolist(), "ref_losses": ref_losses.tolist(),
        "fsdp_held_out": fsdp_held, "ref_held_out": ref_held,
        "seconds_fsdp": t_fsdp, "seconds_single": t_ref, "trace": trace_rows,
    }


def parse_args() -> argparse.Namespace:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", default="tcpx",
                   help="backend of the default process group, the one under test")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--global-batch", type=int, default=d.global_batch,
                   help="sequences per step over all ranks (divisible by the world size)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--dtype", choices=["float32", "float64"], default=d.dtype)
    p.add_argument("--device", choices=["cpu", "cuda"], default=d.device,
                   help="cuda: one GPU per rank (LOCAL_RANK); the reference runs on rank 0's GPU")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads per process")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--inject-fault", dest="fault", choices=["drop-rank"], default=None,
                   help="self-check: lose the last rank's gradient once; the verdict must be FAIL")
    p.add_argument("--no-trace", dest="trace", action="store_false",
                   help="do not record the backend calls of the first step")
    p.add_argument("--loss-rtol", type=float, default=None,
                   help="default 1e-5 (float32) / 1e-13 (float64)")
    p.add_argument("--param-atol", type=float, default=None,
                   help="default 2e-5 (float32) / 2e-13 (float64)")
    p.add_argument("--param-rtol", type=float, default=None,
                   help="default 1e-4 (float32) / 1e-12 (float64)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        import os
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Attention backward kernels have no deterministic variant: warn, do not fail (the
        # tolerances leave room for their reordering).
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True)
    if args.backend == "tcpx":
        import torch_tcpx  # noqa: F401  (registers the "tcpx" backend)
    dist.init_process_group(backend=args.backend)  # env:// from torchrun
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    report = compare_fsdp_with_single_process(cfg)
    dist.destroy_process_group()
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()

"""FSDP2 (torch.distributed.fsdp.fully_shard) over the backend under test: a small transformer
trained with FSDP2 at world size 4 matches the same training in one process.

The training and the comparison are examples/train_fsdp2.py's (``compare_fsdp_with_single_process``,
run here in the suite's rank processes with a smaller configuration): per-step losses and every
rank's final parameter shards against a single-process run on rank 0, within the tolerances that
the example documents (rounding-level differences of the gradient sums, carried along by AdamW).
The reference and the verdict travel over a gloo group.  FSDP2 exercises _allgather_base and
_reduce_scatter_base (AVG for float32, SUM for float64) on the default group.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest

from testlib import gloo_group

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples")
sys.path.insert(0, os.path.normpath(EXAMPLES))

import train_fsdp2  # noqa: E402

WORLD_SIZE = 4
# Smaller than the example's defaults (2 layers, 25 steps) to keep the test short; large enough
# that the loss falls clearly and that a wrong gradient shows far above the tolerances.
SMALL = dict(layers=2, dim=32, heads=4, steps=25, global_batch=32, log_every=5)


def rank_fsdp_vs_single(rank, ws, *, dtype, fault=None):
    cfg = train_fsdp2.Config(dtype=dtype, fault=fault, **SMALL)
    report = train_fsdp2.compare_fsdp_with_single_process(cfg, check_group=gloo_group())
    keep = ("ok", "why", "loss_rel_err", "param_abs_err", "fsdp_losses", "ref_losses", "trace",
            "seconds_fsdp", "seconds_single")
    return {k: report[k] for k in keep}


def _agree(results):
    """Every rank reached the same verdict (it is all-reduced over gloo)."""
    verdicts = [(r["ok"], r["loss_rel_err"], r["param_abs_err"]) for r in results]
    assert all(v == verdicts[0] for v in verdicts), f"ranks disagree on the verdict: {verdicts}"
    return results[0]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dtype, reduce_op", [("float32", "AVG"), ("float64", "SUM")])
def test_fsdp2_matches_single_process(pools, dtype, reduce_op):
    """FSDP2 training over the backend equals single-process training within the tolerances."""
    results = pools.get(WORLD_SIZE).run(rank_fsdp_vs_single, timeout=180, dtype=dtype)
    r = _agree(results)
    assert r["ok"], "FSDP2 run differs from the single-process run: " + "; ".join(r["why"])
    losses = r["fsdp_losses"]
    assert losses[-1] < 0.75 * losses[0], f"the model did not learn: losses {losses}"
    # The run used the collectives this test is about, on the default group (FSDP's mesh is
    # checked to be the default group inside the example), with the reduce op FSDP picks.
    ops = {(name, dtypes, op) for name, dtypes, op, _ in r["trace"]}
    assert ("c10d._allgather_base_", dtype, None) in ops, f"no all_gather_into_tensor: {ops}"
    assert ("c10d._reduce_scatter_base_", dtype, reduce_op) in ops, \
        f"no reduce_scatter_tensor({reduce_op}) in {dtype}: {ops}"


@pytest.mark.timeout(240)
def test_fsdp2_comparison_detects_a_lost_contribution(pools):
    """Self-check: when one rank's gradient is lost from a single reduce-scatter (injected in
    front of the backend, once), the comparison must report a mismatch."""
    results = pools.get(WORLD_SIZE).run(rank_fsdp_vs_single, timeout=180, dtype="float32",
                                        fault="drop-rank")
    r = _agree(results)
    assert not r["ok"], (f"a lost gradient contribution went unnoticed: loss error "
                         f"{r['loss_rel_err']:.2e}, parameter error {r['param_abs_err']:.2e}")
    # Far beyond the tolerances, not a borderline case.
    cfg = dataclasses.replace(train_fsdp2.Config())
    cfg.default_tolerances()
    assert r["param_abs_err"] > 10 * cfg.param_atol, r

"""Self-tests of the rank-pool harness: errors travel back with tracebacks, hangs and dead ranks
break the pool (with a clear message) instead of hanging the suite."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from harness import RankFailure, RankPool, RankPoolError
from testlib import BACKEND


def rank_echo(rank, ws, *, value):
    return (rank, ws, value)


def rank_fail_on_last(rank, ws):
    if rank == ws - 1:
        raise KeyError("deliberate failure")
    return rank


def rank_hang_on_first(rank, ws):
    if rank == 0:
        time.sleep(3600)
    return rank


def rank_die_on_last(rank, ws):
    if rank == ws - 1:
        os._exit(5)
    return rank


def test_pool_reports_errors_hangs_and_deaths():
    """run() returns results, raises RankFailure with tracebacks; hangs/deaths break the pool."""
    with RankPool(2, BACKEND, timeout_s=30, name="harness-selftest") as pool:
        assert pool.run(rank_echo, value="x") == [(0, 2, "x"), (1, 2, "x")]
        with pytest.raises(RankFailure, match="deliberate failure") as info:
            pool.run(rank_fail_on_last)
        assert "rank_fail_on_last" in str(info.value) and "KeyError" in str(info.value)
        assert pool.usable, "a plain exception must not break the pool"
        assert pool.run(rank_echo, value=1) == [(0, 2, 1), (1, 2, 1)]
        start = time.monotonic()
        with pytest.raises(RankPoolError, match=r"did not answer"):
            pool.run(rank_hang_on_first, timeout=3)
        assert time.monotonic() - start < 20
        assert not pool.usable
        shutil.rmtree(pool.log_dir, ignore_errors=True)  # broken on purpose: drop its logs
    with RankPool(2, BACKEND, timeout_s=30, name="harness-selftest-death") as pool:
        with pytest.raises(RankPoolError, match=r"rank 1 died \(exit code 5\)"):
            pool.run(rank_die_on_last, timeout=30)
        assert not pool.usable
        shutil.rmtree(pool.log_dir, ignore_errors=True)


def test_broken_shared_pool_is_replaced(pools):
    """The session fixture hands out a fresh pool after a test broke the previous one."""
    first = pools.get(2)
    first.mark_broken("broken on purpose by the harness self-test", keep_logs=False)
    second = pools.get(2)
    assert second is not first and second.usable
    assert second.run(rank_echo, value=3) == [(0, 2, 3), (1, 2, 3)]

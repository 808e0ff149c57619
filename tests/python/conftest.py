"""pytest fixtures of the torch_tcpx Python suite.

    python -m pytest tests/python -q                          # the tcpx backend (default)
    TCPX_TEST_BACKEND=gloo python -m pytest tests/python -q   # validate the suite against gloo
    python -m pytest tests/python -q -m "not big"             # without the 64 MiB cases

Backend under test: $TCPX_TEST_BACKEND (default "tcpx"; "gloo" validates the suite itself;
torch_tcpx is imported, in the rank processes only, when the backend is "tcpx").  Cases that gloo
cannot run are skipped only when the backend is gloo; TCPX_TEST_IGNORE_GLOO_SKIPS=1 runs them
anyway (they then fail on gloo, showing that they detect what they test).

Session-scoped rank pools for world sizes 2, 3 and 4 are created on first use and recreated
when a test leaves one broken (a hang or a dead rank).  Tests that must kill or wedge their
ranks build their own RankPool instead.  Rank logs live in /tmp/tcpx-test-*; those of broken
pools are kept and their tails are shown in the failure message.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import RankPool, RankPoolError, backend_under_test  # noqa: E402

WORLD_SIZES = (2, 3, 4)
# After this many failed start-ups of one world size, later tests fail at once with the same
# message instead of paying the start-up again (e.g. when the backend cannot be imported).
_MAX_START_FAILURES = 2


def pytest_report_header(config):
    return f"torch_tcpx tests: backend under test = {backend_under_test()!r} " \
           f"(set TCPX_TEST_BACKEND to change)"


class PoolManager:
    def __init__(self, backend: str):
        self.backend = backend
        self.pools: dict[int, RankPool] = {}
        self.start_failures: dict[int, list[str]] = {}

    def get(self, world_size: int) -> RankPool:
        pool = self.pools.get(world_size)
        if pool is not None and pool.usable:
            return pool
        if pool is not None:
            pool.close()
            del self.pools[world_size]
        failures = self.start_failures.setdefault(world_size, [])
        if len(failures) >= _MAX_START_FAILURES:
            pytest.fail(f"rank pool (world size {world_size}, backend {self.backend!r}) failed to "
                        f"start {len(failures)} times; last error:\n{failures[-1]}",
                        pytrace=False)
        try:
            pool = RankPool(world_size, self.backend, timeout_s=60)
        except RankPoolError as exc:
            failures.append(str(exc))
            raise
        failures.clear()
        self.pools[world_size] = pool
        return pool

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()


@pytest.fixture(scope="session")
def backend() -> str:
    return backend_under_test()


@pytest.fixture(scope="session")
def pools(backend):
    """Lazily created, self-healing pools: ``pools.get(world_size)``."""
    manager = PoolManager(backend)
    yield manager
    manager.close()


@pytest.fixture
def pool2(pools) -> RankPool:
    return pools.get(2)


@pytest.fixture
def pool3(pools) -> RankPool:
    return pools.get(3)


@pytest.fixture
def pool4(pools) -> RankPool:
    return pools.get(4)


DEFAULT_TEST_TIMEOUT_S = 300


def pytest_configure(config):
    config.addinivalue_line("markers", "big: a 64 MiB size-class case")
    config.addinivalue_line("markers", "netns: needs root and network namespaces "
                                       "(test_multinic_netns.py; skips itself otherwise)")


def pytest_collection_modifyitems(config, items):
    """pytest-timeout safety net: every test without its own timeout mark gets 300 s."""
    if not config.pluginmanager.hasplugin("timeout"):
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT_S))

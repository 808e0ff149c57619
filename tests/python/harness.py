"""Long-lived rank processes for the torch_tcpx Python test suite.

A ``RankPool`` spawns ``world_size`` processes (multiprocessing "spawn" context).  Each one
initialises a process group once (``init_method="tcp://127.0.0.1:<free port>"``) and then serves
requests from the parent over its own pipe: a request names a module-level function by
(module, file, qualified name) plus keyword arguments; every rank imports the module, calls
``fn(rank, world_size, **kwargs)`` and answers ``("ok", result)`` or
``("error", exception type name, message, traceback text)``.

``pool.run(fn, timeout=..., **kwargs)`` returns the per-rank results, or raises ``RankFailure``
(with every failing rank's traceback) when a rank raised.  If a rank does not answer in time or
dies, the pool is marked broken, its processes are killed and ``RankPoolError`` is raised with the
tail of every rank's log; the fixtures in conftest.py then hand the next test a fresh pool.

Rank functions must be module-level functions (they are found again by qualified name in the rank
process), take ``(rank, world_size, **kwargs)`` and return something small and picklable: they
compare against their own locally computed references and raise AssertionError on mismatch.

The harness itself does not depend on pytest and never imports torch in the parent process.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Iterable

BACKEND_ENV = "TCPX_TEST_BACKEND"
DEFAULT_BACKEND = "tcpx"


def backend_under_test() -> str:
    """The backend the suite runs against: $TCPX_TEST_BACKEND, default "tcpx"."""
    return os.environ.get(BACKEND_ENV, "").strip() or DEFAULT_BACKEND


class RankPoolError(AssertionError):
    """The pool could not produce an answer: start-up failed, a rank hung or died."""


class RankFailure(AssertionError):
    """At least one rank function raised; the message carries every failing rank's traceback."""

    def __init__(self, message: str, results: list["RankResult"]):
        super().__init__(message)
        self.results = results


@dataclasses.dataclass
class RankResult:
    rank: int
    status: str  # "ok" | "error" | "exited"
    value: Any = None
    exc_type: str | None = None
    message: str | None = None
    traceback: str | None = None
    exitcode: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# rank side
# --------------------------------------------------------------------------------------------

def _resolve(module: str, file: str | None, qualname: str) -> Callable:
    mod = sys.modules.get(module)
    if mod is None:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            if not file:
                raise
            spec = importlib.util.spec_from_file_location(module, file)
            if spec is None or spec.loader is None:
                raise
            mod = importlib.util.module_from_spec(spec)
            sys.modules[module] = mod
            spec.loader.exec_module(mod)
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _error_tuple(exc: BaseException) -> tuple:
    return ("error", type(exc).__name__, str(exc), traceback.format_exc())


def _worker_main(rank: int, world_size: int, backend: str, port: int, timeout_s: float,
                 env: dict | None, conn, log_path: str, init: str = "tcp") -> None:
    # Everything the rank prints (Python and C++) goes to its own log file; the parent shows
    # its tail when something goes wrong.
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if env:
        os.environ.update({k: str(v) for k, v in env.items()})
    if init == "env":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        from datetime import timedelta

        import torch

        # 2-4 ranks share a small machine: one intra-op thread each avoids oversubscription.
        torch.set_num_threads(1)
        import torch.distributed as dist

        if backend == "tcpx":
            import torch_tcpx  # noqa: F401  (registers the "tcpx" backend)
        if init == "env":
            dist.init_process_group(backend, init_method="env://",
                                    timeout=timedelta(seconds=timeout_s))
        else:
            dist.init_process_group(
                backend,
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
            )
    except BaseException as exc:  # noqa: BLE001
        try:
            conn.send(_error_tuple(exc))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
    conn.send(("ready", os.getpid()))

    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            break
        if request is None:
            break
        module, file, qualname, kwargs = request
        try:
            fn = _resolve(module, file, qualname)
            reply = ("ok", fn(rank, world_size, **kwargs))
        except BaseException as exc:  # noqa: BLE001  (assertions, backend errors, anything)
            reply = _error_tuple(exc)
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001  (e.g. an unpicklable result)
            conn.send(("error", type(exc).__name__, f"could not send the result back: {exc}",
                       traceback.format_exc()))
        sys.stdout.flush()
        sys.stderr.flush()

    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def health_check(rank: int, world_size: int) -> bool:
    """Rank function used after an unexpected failure: is the default group still usable?"""
    import torch
    import torch.distributed as dist

    t = torch.full((8,), rank + 1, dtype=torch.int64)
    dist.all_reduce(t)
    expected = world_size * (world_size + 1) // 2
    if not bool((t == expected).all()):
        raise AssertionError(f"health check all_reduce gave {t.tolist()}, expected {expected}")
    return True


# --------------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------------

def _fn_address(fn: Callable) -> tuple[str, str | None, str]:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname or "<locals>" in qualname or "<lambda>" in qualname:
        raise TypeError(f"rank functions must be module-level functions, got {fn!r}")
    mod = sys.modules.get(module)
    file = getattr(mod, "__file__", None) if mod is not None else None
    return module, file, qualname


def _tail(path: str, limit: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<no log: {exc}>"


class RankPool:
    """``world_size`` long-lived rank processes sharing one process group."""

    def __init__(self, world_size: int, backend: str | None = None, timeout_s: float = 60,
                 env: dict | None = None, startup_timeout_s: float | None = None,
                 name: str | None = None, init: str = "tcp"):
        """``init``: "tcp" (init_method="tcp://127.0.0.1:<port>", the default) or "env"
        (init_method="env://" with MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE set per rank)."""
        if init not in ("tcp", "env"):
            raise ValueError(f"init must be 'tcp' or 'env', not {init!r}")
        self.init = init
        self.world_size = world_size
        self.backend = backend or backend_under_test()
        self.timeout_s = timeout_s
        self.env = dict(env or {})
        self.name = name or f"pool{world_size}"
        self.broken: str | None = None  # why the pool may not be used any more
        self.closed = False
        self.log_dir = tempfile.mkdtemp(prefix=f"tcpx-test-{self.name}-")
        self._procs: list = []
        self._conns: list = []
        self._keep_logs = False
        startup = startup_timeout_s if startup_timeout_s is not None else timeout_s + 90
        attempts = 2
        for attempt in range(attempts):
            try:
                self._start(startup)
                return
            except RankPoolError as exc:
                self._kill()
                # Only a lost race for the port is worth a second try.
                if attempt + 1 < attempts and "in use" in str(exc).lower():
                    continue
                self.broken = f"start-up failed: {exc}"
                self._keep_logs = True
                raise

    # ---- life cycle ------------------------------------------------------------------------
    def log_path(self, rank: int) -> str:
        return os.path.join(self.log_dir, f"rank{rank}.log")

    def logs(self, limit: int = 3000) -> str:
        return "\n".join(
            f"----- rank {r} log tail ({self.log_path(r)}) -----\n{_tail(self.log_path(r), limit)}"
            for r in range(self.world_size))

    def _start(self, startup_timeout_s: float) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._procs, self._conns = [], []
        for rank in range(self.world_size):
            parent_conn, child_conn = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=_worker_main,
                args=(rank, self.world_size, self.backend, port, self.timeout_s, self.env,
                      child_conn, self.log_path(rank), self.init),
                name=f"{self.name}-rank{rank}",
                daemon=True,
            )
            proc.start()
            child_conn.close()
            self._procs.append(proc)
            self._conns.append(parent_conn)
        replies = self._collect(startup_timeout_s, what="init_process_group", allow_exit=(),
                                error_grace_s=15)
        bad = [r for r in replies if r.status != "ready"]
        if bad:
            detail = "\n".join(f"rank {r.rank}: {r.exc_type}: {r.message}\n{r.traceback or ''}"
                               for r in bad)
            raise RankPoolError(
                f"{self.name}: init_process_group({self.backend!r}, world_size={self.world_size}) "
                f"failed:\n{detail}\n{self.logs()}")

    def close(self) -> None:
        """Shut the ranks down (destroy_process_group), killing any that do not exit."""
        if self.closed:
            return
        self.closed = True
        if not self.broken:
            for conn in self._conns:
                try:
                    conn.send(None)
                except (OSError, ValueError):
                    pass
            deadline = time.monotonic() + 15
            for proc in self._procs:
                proc.join(max(0.0, deadline - time.monotonic()))
        self._kill()
        if not self._keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass

    def mark_broken(self, why: str, keep_logs: bool = True) -> None:
        """Kill the ranks; the pool refuses further requests.  Logs stay for post-mortems."""
        if not self.broken:
            self.broken = why
        self._keep_logs = self._keep_logs or keep_logs
        self._kill()

    @property
    def usable(self) -> bool:
        return not self.broken and not self.closed

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- requests --------------------------------------------------------------------------
    def _collect(self, timeout: float, what: str, allow_exit: Iterable[int],
                 error_grace_s: float | None = None) -> list[RankResult]:
        """Wait for one answer per rank; raise RankPoolError on a hang or an unexpected death."""
        __tracebackhide__ = True  # pytest: show the test's line, not the harness internals
        allow_exit = set(allow_exit)
        deadline = time.monotonic() + timeout
        results: dict[int, RankResult] = {}
        while len(results) < self.world_size:
            pending = [r for r in range(self.world_size) if r not in results]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                done = ", ".join(f"rank {r}: {results[r].status}"
                                 + (f" ({results[r].exc_type}: {results[r].message})"
                                    if results[r].status == "error" else "")
                                 for r in sorted(results))
                raise RankPoolError(
                    f"{self.name}: rank(s) {pending} did not answer {what} within {timeout:.0f} s "
                    f"(hang?); answered: [{done}]\n{self.logs()}")
            waitables = {}
            for r in pending:
                waitables[self._conns[r]] = ("conn", r)
                waitables[self._procs[r].sentinel] = ("proc", r)
            for obj in mpc.wait(list(waitables), timeout=min(remaining, 1.0)):
                kind, r = waitables[obj]
                if r in results:
                    continue
                conn = self._conns[r]
                msg = None
                if kind == "conn" or conn.poll():
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        msg = None  # the rank is gone (its end of the pipe closed)
                if msg is None:
                    self._procs[r].join(2)  # the pipe/sentinel can fire before exitcode is set
                    code = self._procs[r].exitcode
                    if r in allow_exit:
                        results[r] = RankResult(r, "exited", exitcode=code)
                        continue
                    raise RankPoolError(
                        f"{self.name}: rank {r} died (exit code {code}) during {what}\n"
                        f"{self.logs()}")
                if msg[0] == "error":
                    results[r] = RankResult(r, "error", exc_type=msg[1], message=msg[2],
                                            traceback=msg[3])
                    if error_grace_s is not None:
                        deadline = min(deadline, time.monotonic() + error_grace_s)
                elif msg[0] == "ready":
                    results[r] = RankResult(r, "ready", value=msg[1])
                else:
                    results[r] = RankResult(r, "ok", value=msg[1])
        return [results[r] for r in range(self.world_size)]

    def run_raw(self, fn: Callable, timeout: float = 120, allow_exit: Iterable[int] = (),
                error_grace_s: float | None = 20, **kwargs) -> list[RankResult]:
        """Run ``fn(rank, world_size, **kwargs)`` on every rank; return the RankResults.

        Ranks in ``allow_exit`` may die instead of answering (their result has status "exited").
        Once one rank has raised, the others get ``error_grace_s`` more seconds to answer.
        """
        __tracebackhide__ = True
        if not self.usable:
            raise RankPoolError(f"{self.name} is not usable: {self.broken or 'closed'}")
        module, file, qualname = _fn_address(fn)
        what = f"{qualname}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
        if len(what) > 300:
            what = what[:300] + "...)"
        completed = False
        try:
            for r, conn in enumerate(self._conns):
                try:
                    conn.send((module, file, qualname, kwargs))
                except (OSError, ValueError) as exc:
                    raise RankPoolError(f"{self.name}: cannot reach rank {r}: {exc!r}\n"
                                        f"{self.logs()}") from exc
            results = self._collect(timeout, what, allow_exit, error_grace_s)
            completed = True
            return results
        except RankPoolError as exc:
            self.mark_broken(str(exc).splitlines()[0])
            raise
        finally:
            if not completed and not self.broken:
                # Interrupted (e.g. by pytest-timeout): the ranks' replies are out of step now.
                self.mark_broken(f"interrupted while running {what}")

    def run(self, fn: Callable, timeout: float = 120, **kwargs) -> list[Any]:
        """Run ``fn`` on every rank and return the per-rank results (index = rank).

        If any rank raised, the pool is checked with a small all_reduce (and marked broken when
        that fails) and RankFailure is raised with every failing rank's traceback.
        """
        __tracebackhide__ = True
        results = self.run_raw(fn, timeout=timeout, **kwargs)
        failed = [r for r in results if r.status != "ok"]
        if not failed:
            return [r.value for r in results]
        module, _, qualname = _fn_address(fn)
        detail = "\n".join(
            f"===== rank {r.rank}: {r.exc_type}: {r.message}\n{r.traceback}" for r in failed)
        health = self._health_after_failure()
        raise RankFailure(
            f"{qualname} failed on rank(s) {[r.rank for r in failed]} of {self.world_size} "
            f"[{self.backend}]{health}\n{detail}", results)

    def _health_after_failure(self) -> str:
        try:
            results = self.run_raw(health_check, timeout=30, error_grace_s=10)
        except RankPoolError as exc:
            return f" (the pool is broken afterwards: {str(exc).splitlines()[0]})"
        bad = [r for r in results if r.status != "ok"]
        if bad:
            self.mark_broken(f"health check failed: {bad[0].exc_type}: {bad[0].message}")
            return f" (the pool failed its health check afterwards: {bad[0].message})"
        return ""

"""Where the tasks of a map run: this process, a pool of local processes, or a Ray cluster.

A map applies one function to a list of task specs (plain dicts of paths and numbers) and
returns the results in the order of the specs. Every task writes its files atomically
(``util.atomic``), so a task that dies half-way leaves nothing behind and is simply run again:

- ``LocalEngine(workers=1)`` runs the tasks in this process, one after the other;
- ``LocalEngine(workers=N)`` runs them on N spawned processes; when a process dies (killed,
  out of memory) the pool is rebuilt and the unfinished tasks are run again, up to
  ``retries`` times;
- ``RayEngine`` runs each task as a Ray task with a CPU and a memory request and Ray's own
  retries (``pip install ehrgpt[ray]``); ``address`` joins an existing cluster, none starts a
  local one. Every node must see the run folder at the same path (a shared file system).

An error a user can fix (:class:`ehrgpt.errors.EhrgptError`) raised in a task is raised
again here at once, never retried.

>>> LocalEngine(1).map(abs, [-2, 3], description="abs", progress=False)
[2, 3]
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from ehrgpt.errors import EhrgptError
from ehrgpt.util.progress import Bar

ENGINES = ("local", "ray")
#: Times a task is run again after its worker died.
RETRIES = 3
#: Test hook: ``STAGE:INDEX:MARKER`` kills the worker running task INDEX of STAGE once, in the
#: middle of the task (the marker file records that it happened). See :func:`fault_point`.
FAULT_ENV = "EHRGPT_TEST_KILL_TASK"


def fault_point(spec: dict[str, Any]) -> None:
    """Kill this process (SIGKILL) if ``spec`` carries a fault for it that has not fired yet.

    Tasks call it half-way, after they wrote part of their output under temporary names.
    """
    fault = spec.get("fault")
    if not fault:
        return
    stage, index, marker = fault.split(":", 2)
    if stage != spec.get("stage") or int(index) != spec.get("index"):
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def with_fault(specs: list[dict[str, Any]], stage: str) -> list[dict[str, Any]]:
    """The specs with their stage, index and the test fault of :data:`FAULT_ENV`, if set."""
    fault = os.environ.get(FAULT_ENV)
    return [{**s, "stage": stage, "index": i, "fault": fault} for i, s in enumerate(specs)]


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _warm_up(_: int) -> int:
    """Load what tasks use, so that the first tasks do not pay for it."""
    import duckdb  # noqa: F401
    import polars  # noqa: F401

    return os.getpid()


class LocalEngine:
    """Tasks in this process (``workers=1``) or on a pool of spawned processes."""

    name = "local"

    def __init__(self, workers: int = 1, *, retries: int = RETRIES) -> None:
        if workers < 1:
            raise EhrgptError(f"--workers must be at least 1, not {workers}.")
        self.workers = workers
        self.retries = retries
        self._executor: ProcessPoolExecutor | None = None

    def threads_per_task(self) -> int:
        """Threads one task may use so that the workers share the machine's cores."""
        return max(1, (os.cpu_count() or 1) // self.workers)

    def map(
        self,
        fn: Callable[[dict], Any],
        specs: Sequence[Any],
        *,
        description: str,
        progress: bool = True,
        memory: int | None = None,
        on_result: Callable[[int, Any], None] | None = None,
    ) -> list[Any]:
        """``[fn(s) for s in specs]``, run as this engine runs tasks (``memory``: bytes a task
        needs, unused here: the memory check is made before the run). ``on_result(i, result)``
        is called in this process as each task finishes (the run's journal, for ``--resume``).
        """
        del memory
        finished = on_result or (lambda i, r: None)
        bar = Bar(len(specs), description, enabled=progress)
        try:
            if self.workers == 1 or len(specs) <= 1:
                out = []
                for i, spec in enumerate(specs):
                    out.append(fn(spec))
                    finished(i, out[-1])
                    bar.update(i + 1)
                return out
            return self._pool_map(fn, list(specs), bar, description, finished)
        finally:
            bar.close()

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            with _env(POLARS_MAX_THREADS=str(self.threads_per_task())):
                self._executor = ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("spawn")
                )
                # A spawn pool starts all its workers at the first task: start them now, while
                # the environment holds their thread count.
                list(self._executor.map(_warm_up, range(self.workers)))
        return self._executor

    def _pool_map(
        self,
        fn: Callable[[dict], Any],
        specs: list[Any],
        bar: Bar,
        description: str,
        finished: Callable[[int, Any], None],
    ) -> list[Any]:
        results: dict[int, Any] = {}
        deaths = 0
        while len(results) < len(specs):
            pool = self._pool()
            futures = {pool.submit(fn, specs[i]): i for i in range(len(specs)) if i not in results}
            pending = set(futures)
            broken = False
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        results[futures[fut]] = fut.result()
                        finished(futures[fut], results[futures[fut]])
                    except BrokenProcessPool:
                        broken = True
                    except BaseException:
                        self.close()
                        raise
                bar.update(len(results))
            if broken:  # a worker died: a new pool runs the unfinished tasks again
                self.close()
                deaths += 1
                if deaths > self.retries:
                    left = sorted(i for i in range(len(specs)) if i not in results)
                    raise EhrgptError(
                        f"A worker process died {deaths} times while running task(s) {left} "
                        f"of {description!r} (killed, or out of memory?); lower --workers "
                        "or raise --memory-limit."
                    )
        return [results[i] for i in range(len(specs))]

    def close(self) -> None:
        """Stop the worker processes."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


class RayEngine:
    """Each task a Ray task (``num_cpus``, ``memory`` requests, Ray's retries)."""

    name = "ray"

    def __init__(
        self,
        workers: int | None = None,
        *,
        address: str | None = None,
        retries: int = RETRIES,
        cpus_per_task: int = 1,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise EhrgptError(
                "--engine ray needs Ray: pip install 'ehrgpt[ray]' (or pip install ray)."
            ) from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                kwargs["address"] = address
            elif workers:
                kwargs["num_cpus"] = workers
            # Workers of a local cluster import ehrgpt from where this process does.
            src = str(Path(__file__).resolve().parents[2])
            path = os.environ.get("PYTHONPATH", "")
            runtime = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (src, path) if p)}}
            try:
                ray.init(runtime_env=runtime, **kwargs)
            except Exception as exc:  # ConnectionError, RuntimeError, ...
                raise EhrgptError(
                    f"Cannot start or join a Ray cluster (--ray-address {address or 'local'}): "
                    f"{exc}"
                ) from None
            self._started = True
        self.workers = int(workers or ray.cluster_resources().get("CPU", 1))
        self.retries = retries
        self.cpus_per_task = cpus_per_task

    def threads_per_task(self) -> int:
        return self.cpus_per_task

    def map(
        self,
        fn: Callable[[dict], Any],
        specs: Sequence[Any],
        *,
        description: str,
        progress: bool = True,
        memory: int | None = None,
        on_result: Callable[[int, Any], None] | None = None,
    ) -> list[Any]:
        """As :meth:`LocalEngine.map`, each spec a Ray task."""
        ray = self._ray
        options: dict[str, Any] = {
            "num_cpus": self.cpus_per_task,
            "max_retries": self.retries,
            "retry_exceptions": False,
            "runtime_env": {"env_vars": {"POLARS_MAX_THREADS": str(self.cpus_per_task)}},
        }
        if memory:
            options["memory"] = int(memory)
        remote = ray.remote(fn).options(**options)
        refs = [remote.remote(s) for s in specs]
        index = {ref: i for i, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        bar = Bar(len(specs), description, enabled=progress)
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        results[index[ref]] = ray.get(ref)
                        if on_result is not None:
                            on_result(index[ref], results[index[ref]])
                    except ray.exceptions.RayTaskError as exc:
                        for other in pending:
                            ray.cancel(other)
                        cause = getattr(exc, "cause", None)
                        if isinstance(cause, EhrgptError):
                            raise cause from None
                        raise
                    except ray.exceptions.WorkerCrashedError:
                        raise EhrgptError(
                            f"A Ray worker died {self.retries + 1} times while running task "
                            f"{index[ref]} of {description!r} (out of memory?); raise "
                            "--memory-limit or use more, smaller shards."
                        ) from None
                bar.update(len(results))
        finally:
            bar.close()
        return [results[i] for i in range(len(specs))]

    def close(self) -> None:
        """Shut down the local cluster this engine started (a joined one keeps running)."""
        if self._started:
            self._ray.shutdown()


def make_engine(
    engine: str = "local", workers: int | None = None, *, ray_address: str | None = None
) -> LocalEngine | RayEngine:
    """The engine ``--engine`` names (``workers``: processes, default all cores)."""
    if engine == "local":
        return LocalEngine(workers or (os.cpu_count() or 1))
    if engine == "ray":
        return RayEngine(workers, address=ray_address)
    raise EhrgptError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}.")

"""Resuming a long run after a crash: a journal of finished tasks and a fingerprint of inputs.

A command that maps tasks over shards (``ehrgpt prepare``) builds its output in a work folder
with a fixed name beside it (:func:`partial_name`), not one named after its process, so that
the next run finds it. In that folder:

- ``resume.json`` holds the run's fingerprint (its source and the options that change the
  output). A run with ``--resume`` continues only an unfinished run with the same fingerprint;
- ``journal/STAGE/INDEX-KEY.pkl`` holds the result of each finished task, written (atomically)
  once the task's own files are in place. ``KEY`` is a digest of the task's spec, so a task
  whose spec changed (another shard count, split or seed) is never taken for done; what lies
  behind the spec's paths is covered by the fingerprint and by the steps before the task,
  which are deterministic.

A work folder is used by one process at a time (:func:`lock`, an advisory lock the system
drops when the process dies, however it dies).

>>> import tempfile
>>> from ehrgpt.util.engines import LocalEngine
>>> j = Journal(Path(tempfile.mkdtemp()))
>>> j.map(LocalEngine(1), abs, [{"x": 1}, {"x": 2}], stage="demo", description="d",
...       progress=False, fn_arg=lambda s: -s["x"])
[1, 2]
>>> j.reused, j.map(LocalEngine(1), abs, [{"x": 1}, {"x": 2}], stage="demo", description="d",
...                 progress=False, fn_arg=lambda s: -s["x"]), j.reused
(0, [1, 2], 2)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ehrgpt.errors import EhrgptError
from ehrgpt.util import atomic

#: Spec fields that say how a task runs, not what it makes (a resumed run may change them).
HOW_FIELDS = frozenset({"fault", "threads", "memory_limit"})
FINGERPRINT = "resume.json"


def partial_name(path: Path) -> Path:
    """The work folder an unfinished run of ``path`` is kept in.

    >>> partial_name(Path("/runs/prepared")).name
    '.prepared.partial'
    """
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def spec_key(spec: Any) -> str:
    """A digest of what a task makes (its spec without :data:`HOW_FIELDS`).

    >>> spec_key({"part": 1, "threads": 2}) == spec_key({"part": 1, "threads": 1})
    True
    >>> spec_key({"part": 1}) == spec_key({"part": 2})
    False
    """
    if isinstance(spec, dict):
        spec = {k: v for k, v in spec.items() if k not in HOW_FIELDS}
    text = json.dumps(spec, sort_keys=True, default=atomic.json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Journal:
    """Results of the finished tasks of one run, under ``folder`` (None: kept nowhere, every
    task runs)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = None if folder is None else Path(folder)
        self.reused = 0  # tasks and steps taken from the journal instead of run
        self.ran = 0  # tasks and steps run and recorded

    def _path(self, stage: str, index: int, spec: Any) -> Path:
        assert self.folder is not None
        return self.folder / stage / f"{index:05d}-{spec_key(spec)}.pkl"

    def get(self, stage: str, index: int, spec: Any) -> tuple[bool, Any]:
        """``(True, result)`` of a finished task, else ``(False, None)``."""
        if self.folder is None:
            return False, None
        path = self._path(stage, index, spec)
        if not path.exists():
            return False, None
        with open(path, "rb") as f:
            return True, pickle.load(f)

    def put(self, stage: str, index: int, spec: Any, result: Any) -> None:
        """Record a finished task's result (after the task's own files are in place)."""
        if self.folder is None:
            return
        with atomic.atomic_path(self._path(stage, index, spec)) as tmp, open(tmp, "wb") as f:
            pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)

    def map(
        self,
        engine,
        fn: Callable[[Any], Any],
        specs: Sequence[Any],
        *,
        stage: str,
        description: str,
        progress: bool = True,
        memory: int | None = None,
        fn_arg: Callable[[Any], Any] | None = None,
    ) -> list[Any]:
        """``engine.map(fn, specs)``, skipping the tasks this journal has finished.

        ``fn_arg`` turns a spec into the task's argument (tests; default the spec itself).
        """
        results: dict[int, Any] = {}
        todo: list[int] = []
        for i, spec in enumerate(specs):
            found, result = self.get(stage, i, spec)
            if found:
                results[i] = result
            else:
                todo.append(i)
        self.reused += len(results)

        def record(j: int, result: Any) -> None:
            self.put(stage, todo[j], specs[todo[j]], result)
            self.ran += 1

        args = [fn_arg(specs[i]) if fn_arg else specs[i] for i in todo]
        if args:
            ran = engine.map(
                fn,
                args,
                description=description,
                progress=progress,
                memory=memory,
                on_result=record,
            )
            results.update(zip(todo, ran, strict=True))
        return [results[i] for i in range(len(specs))]

    def step(self, stage: str, spec: Any, run: Callable[[], Any]) -> Any:
        """The result of a step run in this process, from the journal when it finished."""
        found, result = self.get(stage, 0, spec)
        if found:
            self.reused += 1
            return result
        result = run()
        self.put(stage, 0, spec, result)
        self.ran += 1
        return result


@contextlib.contextmanager
def lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s work lock (``folder/.lock``) or stop with an error naming it.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> with lock(d):
    ...     with lock(d):
    ...         pass
    Traceback (most recent call last):
    ehrgpt.errors.EhrgptError: Another process is writing ...
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    fd = os.open(path, os.O_CREAT | os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EhrgptError(
                f"Another process is writing {folder} (it holds {path}); wait for it to end "
                "or stop it first."
            ) from None
        yield
    finally:
        os.close(fd)


def check_fingerprint(folder: Path, fingerprint: dict[str, Any]) -> None:
    """Stop unless the unfinished run in ``folder`` was started with ``fingerprint``."""
    path = folder / FINGERPRINT
    if not path.exists():
        raise EhrgptError(
            f"{folder} holds no {FINGERPRINT}: it is not an unfinished run that can be resumed; "
            "run again without --resume to start over."
        )
    before = atomic.read_json(path)
    changed = sorted(k for k in set(before) | set(fingerprint) if before.get(k) != fingerprint[k])
    if changed:
        detail = "; ".join(
            f"{k}: {before.get(k)!r} then, {fingerprint.get(k)!r} now" for k in changed
        )
        raise EhrgptError(
            f"The unfinished run in {folder} was started with other inputs ({detail}); run "
            "again with the same ones to resume it, or without --resume to start over."
        )


def folder_size(folder: Path) -> int:
    """Bytes of the files under ``folder``."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def source_signature(path: Path) -> str:
    """A digest of a source file's or folder's names, sizes and modification times.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "a.csv").write_text("x")
    >>> s = source_signature(d); _ = (d / "b.csv").write_text("y")
    >>> s == source_signature(d)
    False
    """
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(
            f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:"
            f"{st.st_mtime_ns}\n".encode()
        )
    return h.hexdigest()[:16]

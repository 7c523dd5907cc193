"""Atomic writes: every file and folder ehrgpt writes appears whole or not at all.

A file is written under a temporary sibling name (``.NAME.tmp-PID``) and renamed into place;
a folder is built under ``.NAME.tmp-PID`` and renamed, replacing an old one only on success.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> write_json(d / "a.json", {"x": 1})
>>> read_json(d / "a.json")
{'x': 1}
>>> sorted(p.name for p in d.iterdir())
['a.json']
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq


def tmp_name(path: Path) -> Path:
    """The temporary sibling a file or folder is written under before its rename.

    >>> tmp_name(Path("/runs/a/vocab.json")).name.startswith(".vocab.json.tmp-")
    True
    """
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def json_default(value: Any) -> Any:
    """How values JSON lacks are written: paths and dates as text, numpy scalars as numbers."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; it is renamed to ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any, *, indent: int = 1) -> None:
    """Write JSON atomically (paths, dates and numpy scalars become plain values)."""
    write_text(path, json.dumps(data, indent=indent, default=json_default) + "\n")


def read_json(path: Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Write JSON lines atomically."""
    write_text(path, "".join(json.dumps(r, default=json_default) + "\n" for r in rows))


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record to a JSON-lines log (a line cut by a crash is skipped on reading)."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=json_default) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file (a last line cut by a crash is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def write_parquet(path: Path, table: pa.Table | pl.DataFrame) -> None:
    """Write a parquet file atomically (a polars frame or an arrow table)."""
    with atomic_path(path) as tmp:
        if isinstance(table, pl.DataFrame):
            table.write_parquet(tmp)
        else:
            pq.write_table(table, tmp)


def copy_file(src: Path, dst: Path) -> None:
    """Copy a file atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp)`` to write a file or folder, then rename it to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries to disk (after renames into it), where the OS allows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_tmp(folder: Path, pattern: str = ".*.tmp-*") -> list[Path]:
    """Remove temporary files or folders left in ``folder`` by an interrupted writer."""
    removed = []
    for tmp in Path(folder).glob(pattern):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def replace_folder(built: Path, target: Path) -> None:
    """Move the finished folder ``built`` to ``target``, replacing an old ``target`` only now.

    The old folder is first renamed aside (``.NAME.old-PID``), so at every moment either the
    old or the new folder is at ``target``.
    """
    built, target = Path(built), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(built, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(built, target)
    fsync_dir(target.parent)

"""Content digests of a prepared run folder, to compare runs across engines and versions.

A parquet file's digest is the SHA-256 of its rows written as CSV (list columns as
space-separated numbers), so it does not depend on the parquet writer's version; a JSON
file's is the SHA-256 of its parsed content written back in its own key order. Files that
say when or where the run was made (config.json, versions.json, dataset.json) are left out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl

#: Files that differ between any two runs (times, paths, package versions).
VARYING = ("config.json", "versions.json", "meds/metadata/dataset.json")


def _frame_text(frame: pl.DataFrame) -> str:
    lists = [c for c, t in frame.schema.items() if isinstance(t, pl.List)]
    frame = frame.with_columns(
        pl.col(c).list.eval(pl.element().cast(pl.String)).list.join(" ") for c in lists
    )
    return frame.write_csv()


def run_digests(run: Path) -> dict[str, str]:
    """``{relative path: digest}`` of every file of ``run`` but :data:`VARYING`."""
    out = {}
    for path in sorted(Path(run).rglob("*")):
        rel = path.relative_to(run).as_posix()
        if not path.is_file() or rel in VARYING:
            continue
        if path.suffix == ".parquet":
            text = _frame_text(pl.read_parquet(path))
        elif path.suffix == ".json":
            text = json.dumps(json.loads(path.read_text()))
        else:
            text = path.read_text()
        out[rel] = hashlib.sha256(text.encode()).hexdigest()
    return out


def run_bytes(run: Path) -> dict[str, bytes]:
    """``{relative path: bytes}`` of every file of ``run`` but :data:`VARYING`."""
    return {
        p.relative_to(run).as_posix(): p.read_bytes()
        for p in sorted(Path(run).rglob("*"))
        if p.is_file() and p.relative_to(run).as_posix() not in VARYING
    }

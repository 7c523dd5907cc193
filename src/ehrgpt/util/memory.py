"""Sizes in bytes, and how ``prepare`` splits a memory limit between workers and shards.

>>> parse_size("4GB"), parse_size("512MiB"), parse_size("1000")
(4000000000, 536870912, 1000)
>>> format_size(1_500_000_000)
'1.5GB'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ehrgpt.errors import EhrgptError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}

#: Resident memory of one worker process before it holds any data (Python, polars, DuckDB,
#: pyarrow loaded). Measured on Linux x86-64: about 250-300 MB.
PROCESS_BYTES = 350 * 10**6
#: Memory per MEDS row of an output shard while it is sorted and written (the polars frame and
#: its sorted copy; tokenizing works on slices of subjects and needs less). Measured on scaled
#: Eunomia: a worker holds 1.35-1.38 GB at x372 with 20,000 subjects a shard (2.5M rows).
BYTES_PER_MEDS_ROW = 400
#: MEDS rows per clinical row read (visits rebuilt, person rows; 1.56 on Eunomia).
MEDS_ROWS_PER_SOURCE_ROW = 1.6
#: Memory DuckDB works well with per clinical row of a patient shard (it spills beyond).
DUCKDB_BYTES_PER_ROW = 250
#: The least memory a DuckDB task is given.
MIN_DUCKDB_BYTES = 256 * 10**6
#: The main process's DuckDB limit while the tasks run (it only waits for them).
IDLE_DUCKDB_BYTES = 64 * 10**6
#: Resident memory of the Ray processes a local cluster adds (raylet, GCS, idle workers, Ray in
#: the driver): 650-660 MiB measured at Eunomia x1 and x372 (benchmarks/README.md).
RAY_LOCAL_BYTES = 700 * 10**6


def parse_size(text: str) -> int:
    """Bytes of ``4GB``, ``512MiB``, ``1.5 GB``, ``1000`` (an error names the value)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS:
        raise EhrgptError(f"--memory-limit must be a size such as 4GB or 512MB, not {text!r}.")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(n: int) -> str:
    """A size as DuckDB reads it (``1.5GB``, ``300MB``)."""
    if n >= 10**9:
        return f"{n / 10**9:.3g}GB"
    return f"{max(n, 10**6) / 10**6:.0f}MB"


@dataclass
class MemoryPlan:
    """How a run uses its memory: workers, patient shards, DuckDB's share per task."""

    workers: int
    n_parts: int
    #: DuckDB memory limit of each cleaning task and of the shuffle in the main process.
    task_duckdb: int
    main_duckdb: int
    #: Estimated peak of one output-shard task (sort, write, tokenize).
    shard_task: int
    #: Estimated peak of the whole run, all workers and the main process.
    peak: int


def plan_memory(
    limit: int,
    *,
    workers: int,
    workers_given: bool,
    source_rows: int,
    persons: int,
    shard_size: int,
    reserved: int = 0,
) -> MemoryPlan:
    """Split ``limit`` bytes between the main process and ``workers`` workers.

    The cleaning tasks (DuckDB) and the output-shard tasks (polars) run one stage after the
    other, so the peak is the larger of the two stages. Workers that were not asked for are
    dropped until the run fits; a run that cannot fit raises :class:`EhrgptError` before it
    starts. ``reserved`` bytes of the limit are used by something else (a local Ray cluster).

    >>> p = plan_memory(4 * 10**9, workers=2, workers_given=False, source_rows=10_000_000,
    ...                 persons=135_000, shard_size=20_000)
    >>> p.workers, p.n_parts, p.peak < 4 * 10**9
    (2, 3, True)
    """
    total, limit = limit, limit - reserved
    rows_per_person = MEDS_ROWS_PER_SOURCE_ROW * source_rows / max(persons, 1) + 5
    shard_rows = min(shard_size, max(persons, 1)) * rows_per_person
    shard_task = int(shard_rows * BYTES_PER_MEDS_ROW)
    main = PROCESS_BYTES + IDLE_DUCKDB_BYTES  # the main process while the tasks run
    for n in range(workers, 0, -1):
        # DuckDB goes a little over its limit: give it 80% of a worker's share.
        per_worker = int(0.8 * ((limit - main) // n - PROCESS_BYTES))
        shard_peak = main + n * (PROCESS_BYTES + shard_task)
        if per_worker >= MIN_DUCKDB_BYTES and shard_peak <= limit:
            parts = max(n, math.ceil(source_rows * DUCKDB_BYTES_PER_ROW / per_worker))
            return MemoryPlan(
                workers=n,
                n_parts=parts,
                task_duckdb=per_worker,
                main_duckdb=limit - PROCESS_BYTES,
                shard_task=shard_task,
                peak=reserved + max(shard_peak, main + n * (PROCESS_BYTES + per_worker)),
            )
        if workers_given:
            break
    need = reserved + main + workers * (PROCESS_BYTES + max(shard_task, MIN_DUCKDB_BYTES))
    also = f" and a local Ray cluster ({format_size(reserved)})" if reserved else ""
    raise EhrgptError(
        f"--memory-limit {format_size(total)} is too small: {workers} worker(s) with output "
        f"shards of {min(shard_size, persons):,} subjects (about {shard_rows:,.0f} MEDS rows "
        f"each){also} need about {format_size(need)}; raise --memory-limit, or lower --workers "
        "or --shard-size."
    )

"""OMOP -> MEDS as a map over patient shards: one shuffle, one pass per shard, small reduces.

The steps (docs/method.md section 1 says what each SQL step does to the rows):

1. **shuffle** (this process, DuckDB): every OMOP table read once and written as parquet in
   ``n_parts`` patient shards by a hash of ``person_id``; each shard holds every table's rows
   of its patients. The concept table becomes one small ``code_map``.
2. **clean** (one task per patient shard, :func:`clean_part`): persons, deaths, visits and
   events cleaned with their reasons, missing visits rebuilt, events without a visit given a
   covering visit or grouped per day. Returns the data-quality counts, the kept persons, the
   smallest visit id and the day groups per person.
3. **reduce**: the counts added up, the subject split drawn over all kept persons
   (``assign_splits``), the day-group visits numbered across shards (:func:`day_offsets`).
4. **bucket** (one task per patient shard, :func:`bucket_part`): the shard's MEDS rows written
   by output shard (split, shard).
5. **gather** (one task per output shard, :func:`ehrgpt.sources.gather.gather_shard`): its
   rows from every patient shard, sorted (a total order), written as
   ``data/{split}/{shard}.parquet``, with the codes they use and, for training shards, the
   counts the vocabulary needs.

The output is the same, byte for byte, for any number of patient shards and workers. Where a
visit id's rows lie in two patient shards (one visit id for two persons, or an event naming
another person's visit), the cleaning rules look across persons, so the run uses one patient
shard instead (and says so).

Each task writes under a temporary name and renames at the end, so a task whose worker died is
run again from the start and nothing half-written is ever read. The shuffle and every finished
task are recorded in the run's journal (:mod:`ehrgpt.util.resume`): ``prepare --resume`` after
a crash runs only what had not finished.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ehrgpt.meds_format import columns as mc
from ehrgpt.meds_format.dataset import (
    OMOP_CONCEPTS_FILE,
    assign_splits,
    shard_assignment,
    write_metadata,
)
from ehrgpt.quality import QualityReport
from ehrgpt.sources.gather import gather_all, parquet_files
from ehrgpt.sources.omop import OmopDatabase, TableInfo, _create_empty_view, connect
from ehrgpt.sources.omop_tables import EVENT_TABLES, OMOP_TABLES
from ehrgpt.sources.omop_to_meds import (
    MedsResult,
    _clean_events,
    _clean_persons,
    _clean_visits,
    _code_tables,
    _rebuild_visits,
    codes_frame,
    day_group_counts,
    day_offsets,
    meds_rows_sql,
    number_day_visits,
    write_concepts,
)
from ehrgpt.util import atomic
from ehrgpt.util.engines import fault_point, with_fault
from ehrgpt.util.memory import IDLE_DUCKDB_BYTES, format_size, parse_size
from ehrgpt.util.resume import Journal
from ehrgpt.util.sql import sql_str

log = logging.getLogger(__name__)

#: The tables split by patient (all that ehrgpt reads but the concept table).
PATIENT_TABLES = tuple(t for t in OMOP_TABLES if t != "concept")


def _part_expr(n_parts: int) -> str:
    return f"CAST(hash(person_id) % {int(n_parts)} AS INTEGER)"


def crossing_visit_ids(con, n_parts: int) -> int:
    """Visit ids whose rows (a visit's, or an event's naming it) lie in two patient shards."""
    part = _part_expr(n_parts)
    events = " UNION ALL ".join(
        f"SELECT visit_occurrence_id AS vid, {part} AS p FROM omop_{t.name} "
        "WHERE visit_occurrence_id IS NOT NULL"
        for t in EVENT_TABLES
    )
    return int(
        con.execute(f"""
        WITH v AS (
            SELECT visit_occurrence_id AS vid, min({part}) AS lo, max({part}) AS hi
            FROM omop_visit_occurrence WHERE visit_occurrence_id IS NOT NULL GROUP BY 1)
        SELECT (SELECT count(*) FROM v WHERE lo <> hi)
             + (SELECT count(*) FROM ({events}) e JOIN v USING (vid) WHERE e.p <> v.lo)
        """).fetchall()[0][0]
    )


def shuffle(db: OmopDatabase, staging: Path, n_parts: int) -> None:
    """Write every well-formed patient table as ``staging/shuffle/TABLE/_part=P/*.parquet``."""
    con = db.con
    for table in PATIENT_TABLES:
        if not db.has(table):
            continue
        out = staging / "shuffle" / table
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        if n_parts == 1:
            (out / "_part=0").mkdir(parents=True)
            target, options = out / "_part=0" / "data_0.parquet", "FORMAT parquet"
            query = f"SELECT * FROM omop_{table}"
        else:
            target, options = out, "FORMAT parquet, PARTITION_BY (_part)"
            query = f"SELECT *, {_part_expr(n_parts)} AS _part FROM omop_{table}"
        con.execute(f"COPY ({query}) TO {sql_str(str(target))} ({options})")


def _listing(files: list[Path]) -> str:
    return "[" + ", ".join(sql_str(str(f)) for f in files) + "]"


def clean_part(spec: dict[str, Any]) -> dict[str, Any]:
    """Task: clean one patient shard into its own DuckDB file ``staging/parts/P``."""
    staging, part = Path(spec["staging"]), spec["part"]
    final = staging / "parts" / str(part)
    shutil.rmtree(final, ignore_errors=True)
    with atomic.atomic_path(final) as tmp:
        con = connect(tmp, memory_limit=spec["memory_limit"], threads=spec["threads"])
        tables: dict[str, TableInfo] = {}
        for table in PATIENT_TABLES:
            status, location, problem, n_rows = spec["tables"][table]
            files = parquet_files(staging / "shuffle" / table / f"_part={part}")
            if status == "ok" and files:
                con.execute(
                    f"CREATE VIEW omop_{table} AS SELECT * FROM read_parquet({_listing(files)})"
                )
                n_rows = con.execute(f"SELECT count(*) FROM omop_{table}").fetchall()[0][0]
            else:
                _create_empty_view(con, table)
                n_rows = n_rows if status != "ok" else 0
            tables[table] = TableInfo(table, location, int(n_rows), status, problem)
        db = OmopDatabase(con, tables, "")
        quality = QualityReport()
        _clean_persons(con, db, quality)
        _clean_visits(con, db, quality)
        _clean_events(con, db, quality)
        fault_point(spec)
        _rebuild_visits(con, quality)
        kept = con.execute("""
            SELECT person_id FROM persons p
            WHERE EXISTS (SELECT 1 FROM visits v WHERE v.person_id = p.person_id)
               OR EXISTS (SELECT 1 FROM day_groups g WHERE g.person_id = p.person_id)
        """).fetchnumpy()["person_id"]
        n_persons = con.execute("SELECT count(*) FROM persons").fetchall()[0][0]
        min_visit = con.execute("SELECT min(visit_id) FROM visits").fetchall()[0][0]
        days = day_group_counts(con)
        con.close()
    return {
        "quality": quality,
        "kept": np.asarray(kept, dtype=np.int64),
        "n_persons": int(n_persons),
        "min_visit": None if min_visit is None else int(min_visit),
        "day_counts": days,
    }


def bucket_part(spec: dict[str, Any]) -> None:
    """Task: one patient shard's MEDS rows, by output shard, under ``staging/buckets/P``."""
    staging, part = Path(spec["staging"]), spec["part"]
    final = staging / "buckets" / str(part)
    shutil.rmtree(final, ignore_errors=True)
    con = connect(staging / "parts" / str(part), memory_limit=spec["memory_limit"])
    con.execute(f"SET threads={int(spec['threads'])}")
    try:
        number_day_visits(con, spec["base"], f"read_parquet({sql_str(spec['offsets'])})", temp=True)
        con.execute(f"""
            CREATE TEMP VIEW code_map AS
            SELECT * FROM read_parquet({sql_str(str(staging / "code_map.parquet"))})
        """)
        con.execute("""
            CREATE TEMP VIEW all_visits AS
            SELECT * FROM visits UNION ALL
            SELECT person_id, visit_id, 0, start_time, end_time, NULL, 'grouped per person and day'
            FROM day_visits
        """)
        con.execute("""
            CREATE TEMP VIEW all_event_visit AS
            SELECT eid, visit_id FROM event_visit UNION ALL SELECT eid, visit_id FROM day_attached
        """)
        con.execute("""
            CREATE TEMP TABLE kept AS
            SELECT p.* FROM persons p SEMI JOIN all_visits v ON p.person_id = v.person_id
        """)
        with atomic.atomic_path(final) as tmp:
            tmp.mkdir(parents=True)
            splits = f"read_parquet({sql_str(spec['splits'])})"
            con.execute(f"""
                COPY (SELECT m.*, s.split, s.shard
                      FROM ({meds_rows_sql("all_visits", "all_event_visit")}) m
                      JOIN {splits} s ON s.subject_id = m.subject_id)
                TO {sql_str(str(tmp))} (FORMAT parquet, PARTITION_BY (split, shard),
                                         OVERWRITE_OR_IGNORE)
            """)
            fault_point(spec)
    finally:
        con.close()


def merge_quality(parts: list[QualityReport], into: QualityReport) -> None:
    """Add the patient shards' counts up into ``into`` (table and visit order kept)."""
    first = parts[0]
    for name, table in first.tables.items():
        if table.status != "ok":  # missing or malformed: the same in every shard
            into.tables[name] = table
            continue
        reasons: dict[str, int] = {}
        for q in parts:
            for reason, n in q.tables[name].set_aside.items():
                reasons[reason] = reasons.get(reason, 0) + n
        into.add_table(
            name,
            read=sum(q.tables[name].read for q in parts),
            used=sum(q.tables[name].used for q in parts),
            set_aside=reasons,
        )
    into.visits = {k: sum(q.visits[k] for q in parts) for k in first.visits}


def run(
    db: OmopDatabase,
    meds_dir: Path,
    staging: Path,
    quality: QualityReport,
    *,
    engine,
    n_parts: int,
    seed: int,
    shard_size: int,
    dataset_name: str,
    task_memory: str,
    statistics: bool,
    progress: bool,
    journal: Journal | None = None,
) -> MedsResult:
    """The steps of the module docstring; see :func:`ehrgpt.sources.omop_to_meds.omop_to_meds`.

    Steps and tasks already in ``journal`` (a resumed run) are not run again; without one,
    every step runs.
    """
    con = db.con
    quality.source = db.description
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now
        log.debug("OMOP -> MEDS: %s %.2f s", name, timings[name])

    journal = journal or Journal(None)
    infos = {
        t: (i.status, i.location, i.problem, i.n_rows)
        for t, i in db.tables.items()
        if t in PATIENT_TABLES
    }

    def split_by_patient() -> int:
        parts = n_parts
        if parts > 1:
            crossing = crossing_visit_ids(con, parts)
            if crossing:
                log.warning(
                    "%d visit id(s) of %s have rows of more than one patient shard (a visit "
                    "id of two persons, or an event naming another person's visit); one shard "
                    "is used.",
                    crossing,
                    db.description,
                )
                parts = 1
        shuffle(db, staging, parts)
        return parts

    n_parts = journal.step("shuffle", {"n_parts": n_parts, "tables": infos}, split_by_patient)
    _code_tables(con)
    con.execute(f"COPY code_map TO {sql_str(str(staging / 'code_map.parquet'))} (FORMAT parquet)")
    # The shuffle's cached source pages are of no use to the tasks (1.8 GB held at 1M patients,
    # benchmarks/README.md): give that memory back to them until the metadata step.
    main_limit = con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
    con.execute(f"SET memory_limit={sql_str(format_size(IDLE_DUCKDB_BYTES))}")
    lap("shuffle")

    common = {"staging": str(staging), "memory_limit": task_memory}
    common["threads"] = engine.threads_per_task()
    specs = [{**common, "part": p, "tables": infos} for p in range(n_parts)]
    memory = parse_size(task_memory)
    cleaned = journal.map(
        engine,
        clean_part,
        with_fault(specs, "clean"),
        stage="clean",
        description="Cleaning patient shards",
        progress=progress,
        memory=memory,
    )
    lap("clean")

    merge_quality([c["quality"] for c in cleaned], quality)
    n_persons = sum(c["n_persons"] for c in cleaned)
    kept = np.concatenate([c["kept"] for c in cleaned])
    n_kept = len(kept)
    person_table = quality.tables["person"]
    quality.patients = {
        "in person table": person_table.read,
        "kept": int(n_kept),
        "dropped": {**person_table.set_aside, "no events": int(n_persons - n_kept)},
    }
    # Persons without any event are not used: move them from "used" to a reason.
    person_table.used = int(n_kept)
    if n_persons - n_kept:
        person_table.set_aside["no events"] = int(n_persons - n_kept)

    splits = shard_assignment(assign_splits(kept, seed=seed), shard_size)
    mins = [c["min_visit"] for c in cleaned if c["min_visit"] is not None]
    base = min(0, *mins) if mins else 0
    offsets = day_offsets(pl.concat([c["day_counts"] for c in cleaned]))
    atomic.write_parquet(staging / "splits.parquet", splits)
    atomic.write_parquet(staging / "day_offsets.parquet", offsets)
    lap("reduce")

    specs = [
        {
            **common,
            "part": p,
            "base": base,
            "offsets": str(staging / "day_offsets.parquet"),
            "splits": str(staging / "splits.parquet"),
        }
        for p in range(n_parts)
    ]
    journal.map(
        engine,
        bucket_part,
        with_fault(specs, "bucket"),
        stage="bucket",
        description="Writing MEDS rows",
        progress=progress,
        memory=memory,
    )
    lap("bucket")

    outputs = splits.select("split", "shard").unique().rows()
    shards, gathered, train_stats = gather_all(
        engine,
        journal,
        outputs,
        staging=staging,
        meds_dir=meds_dir,
        n_parts=n_parts,
        seed=seed,
        statistics=statistics,
        progress=progress,
        memory=memory,
    )
    lap("gather")

    con.execute(f"SET memory_limit={sql_str(main_limit)}")
    used = pl.concat([g[k] for g in gathered for k in ("codes", "value_codes")])
    used = used.unique().to_frame("code")
    codes = codes_frame(con, used)
    write_metadata(
        meds_dir,
        dataset_name=dataset_name,
        codes=codes,
        splits=splits,
        extra_columns=mc.EXTRA_COLUMNS,
    )
    write_concepts(con, codes, meds_dir / "metadata" / OMOP_CONCEPTS_FILE)
    lap("metadata")
    return MedsResult(
        meds_dir,
        sum(g["n_rows"] for g in gathered),
        int(n_kept),
        shards,
        train_stats,
        timings,
        n_parts,
    )

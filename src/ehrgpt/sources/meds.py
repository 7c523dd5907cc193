"""A user's MEDS 0.4 folder -> ehrgpt's MEDS layout (checked, split, sharded, with visit ids).

Each data shard is checked against the MEDS 0.4 schema first (a broken one stops the run,
naming the file and the column). The user's ``metadata/subject_splits.parquet`` is kept when
present (``train`` / ``tuning`` / ``held_out``); otherwise subjects are split by ``--seed``.

Visits: MEDS has no visit concept. When the data has no ``visit_id`` column, a rule makes one
(``--meds-visit-rule``):

- ``day`` (default): a subject's events on one calendar day form one visit;
- ``hours:N``: a new visit starts when an event comes more than N hours after the previous one.

Visits made this way have the unknown visit type (``VISIT/UNKNOWN``). Codes ``VISIT/...``
at a visit's start and ``DISCHARGE/...`` inside it are understood when the data has them.

When the data has a ``visit_id`` column, an event whose ``visit_id`` is null goes to a visit of
its subject whose [start, end] covers its day, else to a visit per subject and day, as on the
OMOP path (:func:`ehrgpt.sources.omop_to_meds.attach_to_visits`), and the data-quality report
counts them. A visit spans from its first row to its last row or its ``VISIT/`` row's ``end``.
Times with a time zone (``end``) are read in UTC.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import polars as pl

from ehrgpt.errors import SourceError
from ehrgpt.meds_format import columns as mc
from ehrgpt.meds_format.dataset import (
    assign_splits,
    check_shard,
    data_shards,
    shard_assignment,
    write_metadata,
)
from ehrgpt.quality import QualityReport
from ehrgpt.sources.gather import gather_all
from ehrgpt.sources.omop import duckdb_connect
from ehrgpt.sources.omop_to_meds import MedsResult, attach_to_visits
from ehrgpt.util import atomic
from ehrgpt.util.engines import LocalEngine, RayEngine
from ehrgpt.util.progress import Steps
from ehrgpt.util.resume import Journal
from ehrgpt.util.sql import sql_ident as quote
from ehrgpt.util.sql import sql_str

_SQL_TYPES = {
    mc.VISIT_ID: "BIGINT",
    mc.END: "TIMESTAMP",
    mc.OMOP_TABLE: "VARCHAR",
    mc.UNIT: "VARCHAR",
    mc.VALUE_CODE: "VARCHAR",
    mc.NUMERIC_VALUE: "FLOAT",
    mc.TEXT_VALUE: "VARCHAR",
}


def visit_rule_sql(rule: str) -> tuple[str, str]:
    """SQL for a visit rule: (a ``new_visit`` flag per row, the visit id from that flag).

    Both work on rows with a ``timed`` flag (timed events other than birth and death).

    >>> "date_trunc" in visit_rule_sql("day")[1], "INTERVAL 6 HOUR" in visit_rule_sql("hours:6")[0]
    (True, True)
    """
    window = "PARTITION BY subject_id, timed ORDER BY time"
    if rule == "day":
        return (
            "0",
            "CASE WHEN timed THEN dense_rank() OVER (PARTITION BY subject_id, timed "
            "ORDER BY date_trunc('day', time)) END",
        )
    match = re.fullmatch(r"hours:(\d+)", rule)
    if not match:
        raise SourceError(f"Unknown MEDS visit rule {rule!r}: use 'day' or 'hours:N'.")
    new_visit = (
        f"CASE WHEN time - lag(time) OVER ({window}) <= INTERVAL {int(match.group(1))} "
        "HOUR THEN 0 ELSE 1 END"
    )
    # RANGE framing: rows with the same time (peers) get the same running sum, so a visit never
    # splits inside a group of simultaneous events, whatever order the window sorts ties in.
    return new_visit, (
        f"CASE WHEN timed THEN sum(new_visit) OVER ({window} "
        "RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) END"
    )


def _splits(src: Path, con, shards_sql: str, seed: int) -> pl.DataFrame:
    ids = con.execute(f"SELECT DISTINCT subject_id FROM {shards_sql}").fetchnumpy()["subject_id"]
    path = src / "metadata" / "subject_splits.parquet"
    if not path.exists():
        return assign_splits(ids, seed=seed)
    try:
        given = pl.read_parquet(path).select(
            pl.col("subject_id").cast(pl.Int64), pl.col("split").cast(pl.String)
        )
    except Exception as exc:
        raise SourceError(f"{path} is not a MEDS subject_splits file: {exc}") from None
    known = {"train", "tuning", "held_out"}
    others = set(given["split"].unique().to_list()) - known
    if others:
        raise SourceError(
            f"{path} uses split names {sorted(others)}; MEDS splits are train, tuning and held_out."
        )
    missing = pl.DataFrame({"subject_id": ids}).join(given, on="subject_id", how="anti")
    if missing.height:
        raise SourceError(
            f"{path} gives no split for {missing.height} subject(s) of the data, "
            f"for example subject {missing['subject_id'][0]}."
        )
    return given


_TIMED = f"time IS NOT NULL AND code NOT IN ('{mc.BIRTH_CODE}', '{mc.DEATH_CODE}')"


def _typed_columns(columns: set[str]) -> list[str]:
    """SELECT items: the core columns and each extra column the data has, in ehrgpt's types."""
    select = ["subject_id", "CAST(time AS TIMESTAMP) AS time", "code"]
    for col in (mc.NUMERIC_VALUE, mc.TEXT_VALUE, *mc.EXTRA_COLUMNS):
        if col in columns:
            # Quoted: ``end`` is an SQL keyword.
            select.append(f"CAST({quote(col)} AS {_SQL_TYPES[col]}) AS {quote(col)}")
    return select


def _output_columns(columns: set[str], visit_expr: str, alias: str = "") -> list[str]:
    outer = [f"{alias}subject_id", f"{alias}time", f"{alias}code"]
    for col in (mc.NUMERIC_VALUE, mc.TEXT_VALUE, *mc.EXTRA_COLUMNS):
        name = quote(col)
        if col == mc.VISIT_ID:
            outer.append(f"{visit_expr} AS {name}")
        elif col in columns:
            outer.append(f"{alias}{name}")
        else:
            outer.append(f"NULL::{_SQL_TYPES[col]} AS {name}")
    return outer


def _rows_by_rule(shards_sql: str, columns: set[str], visit_rule: str) -> str:
    """SQL of the MEDS rows, with visit ids made by ``visit_rule`` (data without visit_id)."""
    new_visit, visit_expr = visit_rule_sql(visit_rule)
    return f"""
        SELECT {", ".join(_output_columns(columns, visit_expr))} FROM (
            SELECT *, {new_visit} AS new_visit FROM (
                SELECT {", ".join(_typed_columns(columns))}, ({_TIMED}) AS timed
                FROM {shards_sql}))"""


def _rows_with_visits(con, shards_sql: str, columns: set[str], quality: QualityReport) -> str:
    """SQL of the MEDS rows, events with a null visit_id given a visit (see module doc)."""
    con.execute(f"""
        CREATE OR REPLACE TABLE src_rows AS
        SELECT {", ".join(_typed_columns(columns))}, ({_TIMED}) AS timed FROM {shards_sql}
    """)
    end = quote(mc.END) if mc.END in columns else "NULL::TIMESTAMP"
    con.execute(f"""
        CREATE OR REPLACE TABLE data_visits AS
        SELECT subject_id AS person_id, visit_id, min(time) AS start_time,
               max(CASE WHEN starts_with(code, '{mc.VISIT_PREFIX}')
                        THEN greatest(time, coalesce({end}, time)) ELSE time END) AS end_time
        FROM src_rows WHERE timed AND visit_id IS NOT NULL
        GROUP BY ALL
    """)
    con.execute("""
        CREATE OR REPLACE TABLE unattached AS
        SELECT rowid AS eid, subject_id AS person_id, time AS t, time AS t0
        FROM src_rows WHERE timed AND visit_id IS NULL
    """)
    counts = attach_to_visits(con, "unattached", "data_visits")
    n_visits = con.execute("SELECT count(*) FROM data_visits").fetchall()[0][0]
    quality.visits = {"visits in the data": int(n_visits), **counts}
    visit = f"coalesce(r.{mc.VISIT_ID}, a.visit_id)"
    return f"""
        SELECT {", ".join(_output_columns(columns, visit, "r."))}
        FROM src_rows r LEFT JOIN attached a ON a.eid = r.rowid"""


def import_meds(
    src: Path,
    meds_dir: Path,
    quality: QualityReport,
    *,
    seed: int = 0,
    shard_size: int = 20_000,
    visit_rule: str = "day",
    progress: bool = True,
    engine: LocalEngine | RayEngine | None = None,
    journal: Journal | None = None,
    statistics: bool = False,
    task_memory: int | None = None,
) -> MedsResult:
    """Check and copy a MEDS folder into ``meds_dir`` in ehrgpt's layout (see module doc).

    The rows are written once by output shard, then each output shard is sorted and written
    by a task of ``engine`` (:mod:`ehrgpt.sources.gather`; this process when None), which also
    collects the vocabulary's statistics of training shards when ``statistics`` is set.
    """
    engine = engine or LocalEngine(1)
    journal = journal or Journal(None)
    shards = data_shards(src)
    steps = Steps(5, "MEDS import", enabled=progress)
    steps.advance("checking shards")
    for shard in shards:
        check_shard(shard)
    quality.source = f"MEDS folder {src}"
    staging = meds_dir.parent / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    con = duckdb_connect(staging / "meds.duckdb")
    try:
        shards_sql = (
            "read_parquet([" + ", ".join(sql_str(str(s)) for s in shards) + "], union_by_name=true)"
        )
        columns = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {shards_sql}").fetchall()}
        if mc.VISIT_ID in columns:
            rows_sql = _rows_with_visits(con, shards_sql, columns, quality)
        else:
            rows_sql = _rows_by_rule(shards_sql, columns, visit_rule)
        n_rows = con.execute(f"SELECT count(*) FROM {shards_sql}").fetchall()[0][0]

        steps.advance("splits")
        splits = shard_assignment(_splits(src, con, shards_sql, seed), shard_size)
        con.register("split_frame", splits.to_arrow())
        steps.advance("writing shards")
        # The layout of one patient shard's buckets on the OMOP path.
        parts = staging / "buckets" / "0"

        def write_rows() -> None:
            shutil.rmtree(parts, ignore_errors=True)
            with atomic.atomic_path(parts) as tmp:
                con.execute(f"""
                    COPY (SELECT m.*, s.split, s.shard FROM ({rows_sql}) m
                          JOIN split_frame s ON s.subject_id = m.subject_id)
                    TO {sql_str(str(tmp))} (FORMAT parquet, PARTITION_BY (split, shard))
                """)

        journal.step("MEDS rows", {}, write_rows)
    finally:
        con.close()
    steps.advance("sorting shards")
    # Only the (split, shard) pairs with rows: a given split file may name absent subjects.
    outputs = [
        (d.parent.name.split("=", 1)[1], int(d.name.split("=", 1)[1]))
        for d in parts.glob("split=*/shard=*")
    ]
    out_shards, gathered, train_stats = gather_all(
        engine,
        journal,
        outputs,
        staging=staging,
        meds_dir=meds_dir,
        n_parts=1,
        seed=seed,
        statistics=statistics,
        progress=progress,
        memory=task_memory,
    )
    n_written = sum(g["n_rows"] for g in gathered)
    steps.advance("metadata")
    codes_path = src / "metadata" / "codes.parquet"
    used = pl.concat([g["codes"] for g in gathered]).unique().to_frame("code")
    codes = used
    if codes_path.exists():
        given = pl.read_parquet(codes_path)
        keep = [
            c for c in given.columns if c != "parent_codes" or given.schema[c] == pl.List(pl.String)
        ]
        codes = used.join(given.select(keep).unique("code"), on="code", how="left")
    name = "meds"
    dataset_json = src / "metadata" / "dataset.json"
    if dataset_json.exists():
        name = json.loads(dataset_json.read_text()).get("dataset_name") or name
    write_metadata(
        meds_dir, dataset_name=name, codes=codes, splits=splits, extra_columns=mc.EXTRA_COLUMNS
    )
    quality.add_table(
        "MEDS data",
        read=n_rows,
        used=n_rows,
        note=(
            "visits from the data" if mc.VISIT_ID in columns else f"visits by rule {visit_rule!r}"
        ),
    )
    quality.patients = {"in MEDS data": splits.height, "kept": splits.height}
    steps.close()
    return MedsResult(meds_dir, n_written, splits.height, out_shards, train_stats)

"""OMOP CDM -> MEDS 0.4, in DuckDB SQL: clean, rebuild missing visits, write shards by subject.

Steps (each a table in the staging database, so nothing needs to fit in memory):

1. persons with a birth time; deaths (earliest per person);
2. visits, with rows set aside by reason (null dates, before birth, after death, unknown
   person, duplicates); a visit whose end is before its start keeps its type, its end is set
   to its start (counted);
3. events from the six clinical tables, set aside by reason (null dates, concept 0, unknown
   person, before birth, after death, exact duplicates);
4. visits rebuilt for events that name a visit id absent from visit_occurrence (one visit per
   missing id, dated by its events, outpatient), events without a visit id attached to a visit
   of the same person covering their date, or grouped per person and day into a visit of
   unknown type (:func:`attach_to_visits`, which the MEDS input shares);
5. MEDS rows (static person codes, MEDS_BIRTH, visits, discharges, events, MEDS_DEATH), split
   and sharded by subject, sorted by subject and time.

Times: a row whose ``*_datetime`` is NULL or holds only a date (see ``omop_tables``) is a
date-only row. Date-only events, event ends, visit ends and deaths are stamped 23:59:59 of
their day, as the field's OMOP-to-MEDS ETL (meds_etl) does, so that a prediction made at a
visit's start (00:00:00 when date-only) cannot see that day's diagnoses; visit starts keep
their own time and MEDS_BIRTH its date and time. Timestamps with a time zone are read in UTC.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ehrgpt.meds_format import columns as mc
from ehrgpt.quality import QualityReport
from ehrgpt.sources.omop import OmopDatabase
from ehrgpt.sources.omop_tables import EVENT_TABLES
from ehrgpt.util import atomic
from ehrgpt.util.sql import sql_str

#: Visit concept given to visits rebuilt from a visit id that visit_occurrence lacks.
REBUILT_VISIT_CONCEPT = 9202
#: Time of day given to date-only events (meds_etl's convention, docs/method.md section 1).
DAY_END = f"INTERVAL '{mc.END_OF_DAY.isoformat()}'"
#: Visit counts a MEDS input shares with the OMOP path (data_quality.json, "visits").
UNATTACHED = "events without a usable visit id"
ATTACHED = "  attached to a covering visit"
GROUPED = "  grouped per person and day"
DAY_VISITS = "visits made from day groups"
END_REPAIRED = "  end before start: end set to start"
_BIRTH = (
    "coalesce(birth_datetime, TRY_CAST(printf('%04d-%02d-%02d', year_of_birth, "
    "coalesce(nullif(month_of_birth, 0), 1), coalesce(nullif(day_of_birth, 0), 1)) AS TIMESTAMP))"
)


@dataclass
class MedsResult:
    """What the conversion wrote."""

    meds_dir: Path
    n_rows: int  # MEDS rows written (events, visits, person attributes, birth, death)
    n_subjects: int
    shards: list[Path]
    #: Per training shard, in order, what the vocabulary needs (``tokenizer.fit``), when asked.
    train_statistics: list = field(default_factory=list)
    #: Seconds per step.
    timings: dict = field(default_factory=dict)
    #: Patient shards the work was split into.
    n_parts: int = 1


def _reason_counts(con, table: str) -> tuple[int, int, dict[str, int]]:
    rows = con.execute(f"SELECT reason, count(*) FROM {table} GROUP BY reason").fetchall()
    counts = {r: n for r, n in rows if r is not None}
    used = next((n for r, n in rows if r is None), 0)
    return used + sum(counts.values()), used, counts


def _clean_persons(con, db: OmopDatabase, quality: QualityReport) -> None:
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE p_flag AS
        SELECT *, CASE
            WHEN person_id IS NULL THEN 'null person id'
            WHEN birth IS NULL THEN 'null dates'
            WHEN rn > 1 THEN 'duplicate person id' END AS reason
        FROM (SELECT person_id, gender_concept_id, race_concept_id, ethnicity_concept_id,
                     {_BIRTH} AS birth,
                     row_number() OVER (PARTITION BY person_id ORDER BY birth_datetime) AS rn
              FROM omop_person)
    """)
    con.execute(
        "CREATE OR REPLACE TABLE persons AS SELECT * EXCLUDE (rn, reason) FROM p_flag "
        "WHERE reason IS NULL"
    )
    read, used, reasons = _reason_counts(con, "p_flag")
    quality.add_table("person", read=read, used=used, set_aside=reasons)

    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE d_flag AS
        SELECT d.person_id, d.t AS death_time, CASE
            WHEN d.t IS NULL THEN 'null dates'
            WHEN p.person_id IS NULL THEN 'unknown person'
            WHEN CAST(d.t AS DATE) < CAST(p.birth AS DATE) THEN 'event before birth'
            WHEN row_number() OVER (PARTITION BY d.person_id ORDER BY d.t) > 1
                THEN 'duplicate death record' END AS reason
        FROM (SELECT person_id, coalesce(death_datetime, CAST(death_date AS TIMESTAMP) + {DAY_END})
                         AS t
              FROM omop_death) d
        LEFT JOIN persons p USING (person_id)
    """)
    con.execute(
        "CREATE OR REPLACE TABLE deaths AS SELECT person_id, death_time FROM d_flag "
        "WHERE reason IS NULL"
    )
    _add_table_quality(con, db, quality, "death", "d_flag")


def _add_table_quality(con, db: OmopDatabase, quality: QualityReport, table: str, flag: str):
    info = db.tables[table]
    if info.status == "ok":
        read, used, reasons = _reason_counts(con, flag)
        quality.add_table(table, read=read, used=used, set_aside=reasons)
    elif info.status == "malformed":
        quality.add_table(
            table,
            read=info.n_rows,
            used=0,
            set_aside={"malformed table": info.n_rows},
            status="malformed",
            note=info.problem,
        )
    else:
        quality.add_table(table, read=0, used=0, status="missing", note="no such table")


def _clean_visits(con, db: OmopDatabase, quality: QualityReport) -> None:
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE v_flag AS
        SELECT v.*, CASE
            WHEN v.visit_id IS NULL THEN 'null visit id'
            WHEN v.start_time IS NULL THEN 'null dates'
            WHEN p.person_id IS NULL THEN 'unknown person'
            WHEN CAST(v.start_time AS DATE) < CAST(p.birth AS DATE) THEN 'event before birth'
            WHEN CAST(v.start_time AS DATE) > CAST(d.death_time AS DATE) THEN 'event after death'
            WHEN row_number() OVER (PARTITION BY v.visit_id, v.person_id, v.visit_concept_id,
                 v.start_time, v.end_time, v.discharge ORDER BY v.visit_id) > 1
                THEN 'exact duplicates'
            WHEN row_number() OVER (PARTITION BY v.visit_id ORDER BY v.start_time) > 1
                THEN 'duplicate visit id' END AS reason
        FROM (SELECT visit_occurrence_id AS visit_id, person_id, visit_concept_id,
                     coalesce(visit_start_datetime, CAST(visit_start_date AS TIMESTAMP))
                         AS start_time,
                     coalesce(visit_end_datetime, CAST(visit_end_date AS TIMESTAMP) + {DAY_END})
                         AS end_time,
                     discharged_to_concept_id AS discharge
              FROM omop_visit_occurrence) v
        LEFT JOIN persons p USING (person_id)
        LEFT JOIN deaths d USING (person_id)
    """)
    con.execute("""
        CREATE OR REPLACE TABLE visits AS
        SELECT person_id, visit_id, coalesce(visit_concept_id, 0) AS visit_concept_id, start_time,
               greatest(coalesce(end_time, start_time), start_time) AS end_time, discharge,
               'visit_occurrence' AS origin
        FROM v_flag WHERE reason IS NULL
    """)
    _add_table_quality(con, db, quality, "visit_occurrence", "v_flag")
    # A visit ending before it starts keeps its type and its events; its end becomes its start.
    n_repaired = con.execute(
        "SELECT count(*) FROM v_flag WHERE reason IS NULL AND end_time < start_time"
    ).fetchall()[0][0]
    quality.visits = {
        "from visit_occurrence": int(db_count(con, "visits")),
        END_REPAIRED: int(n_repaired),
    }


def db_count(con, table: str) -> int:
    """Rows in a staging table."""
    return int(con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])


def _clean_events(con, db: OmopDatabase, quality: QualityReport) -> None:
    parts = []
    for t in EVENT_TABLES:
        end = (
            f"coalesce({t.end_datetime}, CAST({t.end_date} AS TIMESTAMP) + {DAY_END})"
            if t.end_date
            else "NULL::TIMESTAMP"
        )
        parts.append(f"""
            SELECT {sql_str(t.name)} AS tbl, person_id, {t.concept} AS concept_id,
                   coalesce({t.start_datetime}, CAST({t.start_date} AS TIMESTAMP) + {DAY_END})
                       AS t,
                   {t.start_datetime} IS NULL AS date_only,
                   {end} AS t_end, visit_occurrence_id AS vid,
                   {"value_as_number" if t.value_as_number else "NULL::DOUBLE"} AS value,
                   {"value_as_concept_id" if t.value_as_concept else "NULL::BIGINT"}
                       AS value_concept,
                   {"unit_concept_id" if t.unit else "NULL::BIGINT"} AS unit_concept,
                   {"value_as_string" if t.value_as_string else "NULL::VARCHAR"} AS text
            FROM omop_{t.name}""")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE e_flag AS
        SELECT e.*, CASE
            WHEN e.t IS NULL THEN 'null dates'
            WHEN p.person_id IS NULL THEN 'unknown person'
            WHEN coalesce(e.concept_id, 0) = 0 THEN 'concept 0'
            WHEN CAST(e.t AS DATE) < CAST(p.birth AS DATE) THEN 'event before birth'
            WHEN CAST(e.t AS DATE) > CAST(d.death_time AS DATE) THEN 'event after death'
            END AS reason
        FROM ({" UNION ALL ".join(parts)}) e
        LEFT JOIN persons p USING (person_id)
        LEFT JOIN deaths d USING (person_id)
    """)
    # Exact duplicates among otherwise usable rows: keep one of each group. The table's rowid
    # serves as the event id below.
    con.execute("""
        CREATE OR REPLACE TABLE events AS
        SELECT tbl, person_id, concept_id, t, date_only, t_end, vid, value, value_concept,
               unit_concept, text, count(*) AS n_copies
        FROM e_flag WHERE reason IS NULL
        GROUP BY ALL
    """)
    rows = con.execute("""
        SELECT tbl, reason, count(*) FROM e_flag WHERE reason IS NOT NULL GROUP BY ALL
        UNION ALL
        SELECT tbl, 'exact duplicates', sum(n_copies - 1) FROM events GROUP BY tbl
        UNION ALL
        SELECT tbl, NULL, count(*) FROM events GROUP BY tbl
    """).fetchall()
    for t in EVENT_TABLES:
        info = db.tables[t.name]
        if info.status != "ok":
            _add_table_quality(con, db, quality, t.name, "")
            continue
        reasons = {r: int(n) for tbl, r, n in rows if tbl == t.name and r is not None}
        used = sum(int(n) for tbl, r, n in rows if tbl == t.name and r is None)
        quality.add_table(t.name, read=info.n_rows, used=used, set_aside=reasons)


def attach_to_visits(con, unattached: str, visits: str) -> dict[str, int]:
    """Give each event without a visit a visit: one of its subject covering its day, or a new one.

    ``unattached`` holds ``eid, person_id, t, t0`` (``t0``: the event's day start when it is
    date-only, else ``t``); ``visits`` holds ``person_id, visit_id, start_time, end_time``. An
    event goes to the visit of its person whose [start, end] covers its day (the latest start,
    then the smallest id); the rest are grouped per person and day into new visits with ids
    below every id of ``visits`` (and below 0), numbered in (person, day) order. Makes tables
    ``attached (eid, visit_id)`` and ``day_visits (person_id, visit_id, start_time,
    end_time)``; returns the counts.
    """
    counts = group_unattached(con, unattached, visits)
    base = con.execute(f"SELECT least(0, coalesce(min(visit_id), 0)) FROM {visits}").fetchall()[0][
        0
    ]
    number_day_visits(con, int(base))
    con.execute("INSERT INTO attached SELECT eid, visit_id FROM day_attached")
    return counts


def group_unattached(con, unattached: str, visits: str) -> dict[str, int]:
    """The first half of :func:`attach_to_visits`, local to each person: table ``attached``
    (events given a covering visit) and ``day_groups (eid, person_id, t, t0, day_rank)``, the
    rest with the rank of their day among the person's day groups (1, 2, ...)."""
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE attached AS
        SELECT eid, visit_id FROM (
            SELECT u.eid, v.visit_id, row_number() OVER (
                PARTITION BY u.eid ORDER BY v.start_time DESC, v.visit_id) AS rn
            FROM {unattached} u JOIN {visits} v ON u.person_id = v.person_id
             AND CAST(u.t AS DATE) BETWEEN CAST(v.start_time AS DATE) AND CAST(v.end_time AS DATE))
        WHERE rn = 1
    """)
    con.execute(f"""
        CREATE OR REPLACE TABLE day_groups AS
        SELECT u.eid, u.person_id, u.t, u.t0,
               dense_rank() OVER (PARTITION BY u.person_id ORDER BY CAST(u.t AS DATE))
                   AS day_rank
        FROM {unattached} u ANTI JOIN attached a USING (eid)
    """)
    n_unattached, n_grouped, n_day_visits = con.execute(
        f"SELECT (SELECT count(*) FROM {unattached}), (SELECT count(*) FROM day_groups), "
        "(SELECT coalesce(sum(n), 0) FROM (SELECT max(day_rank) AS n FROM day_groups "
        "GROUP BY person_id))"
    ).fetchall()[0]
    return {
        UNATTACHED: int(n_unattached),
        ATTACHED: int(n_unattached - n_grouped),
        GROUPED: int(n_grouped),
        DAY_VISITS: int(n_day_visits),
    }


def day_group_counts(con) -> pl.DataFrame:
    """``person_id, n``: the day groups of each person with any (after :func:`group_unattached`)."""
    return con.sql("SELECT person_id, max(day_rank) AS n FROM day_groups GROUP BY person_id").pl()


def day_offsets(counts: pl.DataFrame) -> pl.DataFrame:
    """``person_id, day_offset``: the day groups of all persons with a smaller id.

    >>> day_offsets(pl.DataFrame({"person_id": [7, 3], "n": [2, 4]})).rows()
    [(3, 0), (7, 4)]
    """
    counts = counts.sort("person_id")
    return counts.select(
        "person_id", (pl.col("n").cum_sum() - pl.col("n")).cast(pl.Int64).alias("day_offset")
    )


def number_day_visits(con, base: int, offsets: str | None = None, *, temp: bool = False) -> None:
    """The second half of :func:`attach_to_visits`: tables ``day_attached (eid, visit_id)`` and
    ``day_visits``, the day groups numbered ``base - 1, base - 2, ...`` in (person, day) order.

    ``offsets`` (``person_id, day_offset``, see :func:`day_offsets`) numbers them across
    patient shards; without it the persons of ``day_groups`` are all there are.
    """
    kind = "TEMP TABLE" if temp else "TABLE"
    if offsets is None:
        con.register("_day_offsets", day_offsets(day_group_counts(con)))
        offsets = "_day_offsets"
    con.execute(f"""
        CREATE OR REPLACE {kind} day_attached AS
        SELECT g.eid, g.person_id, g.t, g.t0,
               CAST({int(base)} - (o.day_offset + g.day_rank) AS BIGINT) AS visit_id
        FROM day_groups g JOIN {offsets} o USING (person_id)
    """)
    con.execute(f"""
        CREATE OR REPLACE {kind} day_visits AS
        SELECT person_id, visit_id, min(t0) AS start_time, max(t) AS end_time
        FROM day_attached GROUP BY person_id, visit_id
    """)
    with contextlib.suppress(Exception):
        con.unregister("_day_offsets")


def _rebuild_visits(con, quality: QualityReport) -> None:
    # A date-only event's visit starts at the start of its day, like a date-only visit.
    t0 = "CASE WHEN e.date_only THEN date_trunc('day', e.t) ELSE e.t END"
    # 1. Visit ids named by events but absent from visit_occurrence: one outpatient visit each.
    con.execute(f"""
        INSERT INTO visits
        SELECT e.person_id, e.vid, {REBUILT_VISIT_CONCEPT}, min({t0}), max(e.t), NULL,
               'rebuilt from missing visit id'
        FROM events e ANTI JOIN visits v ON e.vid = v.visit_id
        WHERE e.vid IS NOT NULL
        GROUP BY e.person_id, e.vid
    """)
    n_rebuilt = db_count(con, "visits WHERE origin = 'rebuilt from missing visit id'")
    # Events naming a visit of another person are treated as naming no visit.
    con.execute("""
        CREATE OR REPLACE TABLE event_visit AS
        SELECT e.rowid AS eid, e.vid AS visit_id FROM events e
        JOIN visits v ON e.vid = v.visit_id AND e.person_id = v.person_id
    """)
    # 2. Events without a (usable) visit id: a covering visit, or one visit per person and day
    #    of unknown type (ids below 0, never in OMOP).
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE unattached AS
        SELECT e.rowid AS eid, e.person_id, e.t, {t0} AS t0 FROM events e
        ANTI JOIN event_visit ev ON e.rowid = ev.eid
    """)
    # The day groups are numbered once the day groups of all shards are counted
    # (omop_shards.bucket_part).
    counts = group_unattached(con, "unattached", "visits")
    con.execute("INSERT INTO event_visit SELECT eid, visit_id FROM attached")
    quality.visits = {
        **quality.visits,
        "rebuilt from missing visit ids": n_rebuilt,
        **counts,
    }


def _code_tables(con) -> None:
    con.execute("""
        CREATE OR REPLACE TABLE code_map AS
        SELECT concept_id, vocabulary_id || '/' || concept_code AS code, concept_name, domain_id,
               vocabulary_id
        FROM omop_concept WHERE concept_id IS NOT NULL AND vocabulary_id IS NOT NULL
          AND concept_code IS NOT NULL
        QUALIFY row_number() OVER (PARTITION BY concept_id ORDER BY concept_code) = 1
    """)


def _code(expr: str, alias: str) -> str:
    return f"coalesce({alias}.code, '{mc.FALLBACK_CONCEPT_PREFIX}' || CAST({expr} AS VARCHAR))"


def meds_rows_sql(visits: str = "visits", event_visit: str = "event_visit") -> str:
    """SQL of the MEDS rows of the persons of table ``kept``."""
    g, r, eth = mc.GENDER_PREFIX, mc.RACE_PREFIX, mc.ETHNICITY_PREFIX
    unknown = mc.UNKNOWN

    def attr(col: str, prefix: str) -> str:
        return (
            f"CASE WHEN coalesce({col}, 0) = 0 THEN '{prefix}{unknown}' "
            f"ELSE '{prefix}' || CAST({col} AS VARCHAR) END"
        )

    static = " UNION ALL ".join(
        f"SELECT person_id AS subject_id, NULL::TIMESTAMP AS time, {attr(col, pre)} AS code, "
        "NULL::FLOAT AS numeric_value, NULL::VARCHAR AS text_value, NULL::BIGINT AS visit_id, "
        "NULL::TIMESTAMP AS \"end\", 'person' AS omop_table, NULL::VARCHAR AS unit, "
        "NULL::VARCHAR AS value_code FROM kept"
        for col, pre in (
            ("gender_concept_id", g),
            ("race_concept_id", r),
            ("ethnicity_concept_id", eth),
        )
    )
    return f"""
        {static}
        UNION ALL
        SELECT person_id, birth, '{mc.BIRTH_CODE}', NULL, NULL, NULL, NULL, 'person', NULL, NULL
        FROM kept
        UNION ALL
        SELECT v.person_id, v.start_time, {attr("v.visit_concept_id", mc.VISIT_PREFIX)}, NULL,
               NULL, v.visit_id, v.end_time, 'visit_occurrence', NULL, NULL
        FROM {visits} v SEMI JOIN kept k ON v.person_id = k.person_id
        UNION ALL
        SELECT v.person_id, v.end_time, '{mc.DISCHARGE_PREFIX}' || CAST(v.discharge AS VARCHAR),
               NULL, NULL, v.visit_id, NULL, 'visit_occurrence', NULL, NULL
        FROM {visits} v SEMI JOIN kept k ON v.person_id = k.person_id
        WHERE coalesce(v.discharge, 0) <> 0
        UNION ALL
        SELECT e.person_id, e.t, {_code("e.concept_id", "c")}, CAST(e.value AS FLOAT), e.text,
               ev.visit_id, e.t_end, e.tbl,
               CASE WHEN coalesce(e.unit_concept, 0) <> 0 THEN {_code("e.unit_concept", "u")} END,
               CASE WHEN coalesce(e.value_concept, 0) <> 0 THEN {_code("e.value_concept", "vc")} END
        FROM events e
        JOIN {event_visit} ev ON ev.eid = e.rowid
        LEFT JOIN code_map c ON c.concept_id = e.concept_id
        LEFT JOIN code_map u ON u.concept_id = e.unit_concept
        LEFT JOIN code_map vc ON vc.concept_id = e.value_concept
        UNION ALL
        SELECT d.person_id, d.death_time, '{mc.DEATH_CODE}', NULL, NULL, NULL, NULL, 'death', NULL,
               NULL
        FROM deaths d SEMI JOIN kept k ON d.person_id = k.person_id
    """


def omop_to_meds(
    db: OmopDatabase,
    meds_dir: Path,
    staging: Path,
    quality: QualityReport,
    *,
    seed: int = 0,
    shard_size: int = 20_000,
    dataset_name: str = "omop",
    progress: bool = True,
    engine=None,
    n_parts: int = 1,
    task_memory: str = "1GB",
    statistics: bool = False,
    journal=None,
) -> MedsResult:
    """Convert an opened OMOP source into a MEDS 0.4 folder at ``meds_dir``.

    The work is a map over ``n_parts`` patient shards run by ``engine`` (this process by
    default), see :mod:`ehrgpt.sources.omop_shards`; the output does not depend on either.
    ``statistics``: also count, per training shard, what the vocabulary needs
    (``MedsResult.train_statistics``). ``journal``: the run's :class:`ehrgpt.util.resume.Journal`
    (finished steps are not run again).
    """
    from ehrgpt.sources import omop_shards
    from ehrgpt.util.engines import LocalEngine

    return omop_shards.run(
        db,
        meds_dir,
        staging,
        quality,
        engine=engine or LocalEngine(1),
        n_parts=n_parts,
        seed=seed,
        shard_size=shard_size,
        dataset_name=dataset_name,
        task_memory=task_memory,
        statistics=statistics,
        progress=progress,
        journal=journal,
    )


def write_concepts(con, codes: pl.DataFrame, path: Path) -> None:
    """The source's concept rows of the codes' concepts, for synthetic OMOP output (none when
    the source has no concept table)."""
    con.register("_code_ids", codes.select(pl.col("omop_concept_id").drop_nulls().unique()))
    date = "coalesce(try_cast({c} AS DATE), try_strptime({c}, '%Y%m%d')::DATE) AS {c}"
    try:
        rows = con.sql(f"""
            SELECT concept_id, concept_name, domain_id, vocabulary_id, concept_class_id,
                   nullif(trim(standard_concept), '') AS standard_concept, concept_code,
                   {date.format(c="valid_start_date")}, {date.format(c="valid_end_date")},
                   nullif(trim(invalid_reason), '') AS invalid_reason
            FROM omop_concept SEMI JOIN _code_ids ON concept_id = omop_concept_id
            QUALIFY row_number() OVER (PARTITION BY concept_id ORDER BY concept_code) = 1
            ORDER BY concept_id
        """).pl()
    finally:
        con.unregister("_code_ids")
    if rows.height:
        atomic.write_parquet(path, rows)


def codes_frame(con, used: pl.DataFrame) -> pl.DataFrame:
    """``codes.parquet`` rows of the ``used`` codes (``code``), named from ``code_map``."""
    cmap = (
        con.sql(
            "SELECT code, concept_name AS description, concept_id AS omop_concept_id, "
            "domain_id AS omop_domain, vocabulary_id AS omop_vocabulary FROM code_map"
        )
        .pl()
        .unique("code", keep="first")
    )
    names = con.sql("SELECT concept_id, concept_name FROM code_map").pl()
    codes = used.join(cmap, on="code", how="left")
    # Structure codes (GENDER/8532, VISIT/9201, OMOP_CONCEPT/123, ...) carry their concept id.
    tail = pl.col("code").str.split("/").list.last()
    prefixed = pl.col("code").str.contains(
        f"^({mc.GENDER_PREFIX}|{mc.RACE_PREFIX}|{mc.ETHNICITY_PREFIX}|{mc.VISIT_PREFIX}|"
        f"{mc.DISCHARGE_PREFIX}|{mc.FALLBACK_CONCEPT_PREFIX})[0-9]+$"
    )
    codes = codes.with_columns(
        pl.when(prefixed)
        .then(tail.cast(pl.Int64, strict=False))
        .otherwise(pl.col("omop_concept_id"))
        .alias("omop_concept_id")
    )
    codes = codes.join(
        names.rename({"concept_id": "omop_concept_id", "concept_name": "_name"}),
        on="omop_concept_id",
        how="left",
    )
    return (
        codes.with_columns(
            pl.coalesce("description", "_name").alias("description"),
            pl.lit(None, pl.List(pl.String)).alias("parent_codes"),
        )
        .drop("_name")
        .with_columns(
            pl.col("omop_concept_id").cast(pl.Int64),
        )
        .cast({"omop_domain": pl.String, "omop_vocabulary": pl.String})
    )

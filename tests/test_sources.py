"""Every kind of source gives the MEDS data it should: CSV, parquet, PostgreSQL, MEDS folders.

Also: what ehrgpt writes is valid MEDS 0.4, and the data-quality report of Eunomia states what
Eunomia's known counts measured.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import duckdb
import meds
import polars as pl
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from ehrgpt.meds_format import columns as mc
from ehrgpt.pipelines.prepare import prepare
from ehrgpt.quality import QualityReport
from ehrgpt.sources.meds import import_meds
from ehrgpt.sources.omop import eunomia_path
from ehrgpt.tokenizer.vocab import bin_token
from tests.helpers.postgres_loader import load_omop_duckdb_into_postgres
from tests.helpers.runs import (
    assert_quality_adds_up,
    eunomia_sample,
    export_eunomia,
    meds_frame,
    quality,
    read_json,
    tokens_frame,
    vocab,
)

EVENT_TABLES = (
    "condition_occurrence",
    "drug_exposure",
    "procedure_occurrence",
    "measurement",
    "observation",
)


def _tables_quality(report: dict) -> dict:
    return {k: (t["read"], t["used"], t["set_aside"]) for k, t in report["tables"].items()}


def _assert_same_run(a: Path, b: Path) -> None:
    """Same MEDS rows (all columns), same splits, same vocabulary, same token ids."""
    assert_frame_equal(meds_frame(a), meds_frame(b))
    splits = [
        pl.read_parquet(r / "meds" / "metadata" / "subject_splits.parquet").sort("subject_id")
        for r in (a, b)
    ]
    assert_frame_equal(*splits)
    assert vocab(a) == vocab(b)
    assert_frame_equal(tokens_frame(a), tokens_frame(b))


def _shards(run: Path) -> list[Path]:
    return sorted((run / "meds" / "data").rglob("*.parquet"))


def _validate_meds_folder(meds_dir: Path) -> pl.DataFrame:
    """Check a MEDS folder with the ``meds`` schemas; return its rows (shard order kept)."""
    frames = []
    for shard in sorted((meds_dir / "data").rglob("*.parquet")):
        table = pq.read_table(shard)
        meds.DataSchema.validate(table)
        frame = pl.from_arrow(table).with_columns(pl.lit(str(shard)).alias("_shard"))
        frames.append(frame)
        # sorted by subject, then time (static rows, time null, first)
        ordered = frame.select("subject_id", "time").with_row_index()
        resorted = ordered.sort(["subject_id", "time"], nulls_last=False, maintain_order=True)
        assert ordered["index"].equals(resorted["index"]), f"{shard} is not sorted"
    meds.DatasetMetadataSchema.validate(read_json(meds_dir / "metadata" / "dataset.json"))
    codes = pq.read_table(meds_dir / "metadata" / "codes.parquet")
    meds.CodeMetadataSchema.validate(codes)
    splits = pq.read_table(meds_dir / "metadata" / "subject_splits.parquet")
    meds.SubjectSplitSchema.validate(splits)
    data = pl.concat(frames, how="diagonal_relaxed")

    # each subject in exactly one shard, and the splits cover exactly the subjects of the data
    per_subject = data.group_by("subject_id").agg(pl.col("_shard").n_unique())
    assert per_subject["_shard"].max() == 1
    split_frame = pl.from_arrow(splits)
    assert split_frame["subject_id"].is_unique().all()
    assert set(split_frame["subject_id"]) == set(data["subject_id"])
    assert set(split_frame["split"]) <= {"train", "tuning", "held_out"}
    # a shard lives in the folder of its subjects' split
    shard_split = data.select("subject_id", pl.col("_shard").str.extract(r"/data/([^/]+)/"))
    joined = shard_split.unique().join(split_frame, on="subject_id")
    assert (joined["_shard"] == joined["split"]).all()

    # codes.parquet covers every code in the data
    listed = set(pl.from_arrow(codes)["code"])
    assert set(data["code"]) <= listed
    return data


# -- CSV folder (Synthea27Nj, upper-case file names) ---------------------------------------


def test_synthea_csv_folder(synthea_csv: Path, synthea_run: Path) -> None:
    assert (synthea_csv / "PERSON.csv").exists() and not (synthea_csv / "person.csv").exists()
    con = duckdb.connect()

    def csv_rel(name: str) -> str:
        return f"read_csv('{(synthea_csv / name).as_posix()}', all_varchar=true)"

    report = quality(synthea_run)
    assert_quality_adds_up(report)
    # every table is read whole from its CSV file
    for table in ("person", "death", "visit_occurrence", *EVENT_TABLES):
        n = con.execute(f"SELECT count(*) FROM {csv_rel(table.upper() + '.csv')}").fetchone()[0]
        assert report["tables"][table]["read"] == n, table
        assert report["tables"][table]["status"] == "ok", table

    # all 28 patients are kept: each has visits and events
    assert report["patients"]["in person table"] == 28
    assert report["patients"]["kept"] == 28
    data = meds_frame(synthea_run)
    assert data["subject_id"].n_unique() == 28

    # numeric measurement values arrive with their units (UCUM codes from CONCEPT.csv)
    numeric = data.filter(
        (pl.col("omop_table") == "measurement") & pl.col("numeric_value").is_not_null()
    )
    assert numeric.height > 8_000
    assert numeric["unit"].is_not_null().sum() > 0.9 * numeric.height
    assert numeric["unit"].drop_nulls().str.starts_with("UCUM/").all()
    person, day, value, unit = con.execute(f"""
        SELECT m.person_id::BIGINT, m.measurement_date::DATE, m.value_as_number::DOUBLE,
               c.vocabulary_id || '/' || c.concept_code
        FROM {csv_rel("MEASUREMENT.csv")} m
        JOIN {csv_rel("CONCEPT.csv")} c ON c.concept_id = m.unit_concept_id
        WHERE m.value_as_number IS NOT NULL ORDER BY m.measurement_id::BIGINT LIMIT 1
    """).fetchone()
    match = numeric.filter(
        (pl.col("subject_id") == person)
        & (pl.col("time").dt.date() == day)
        & ((pl.col("numeric_value") - value).abs() < 1e-3 * max(1.0, abs(value)))
    )
    assert match.height >= 1 and unit in set(match["unit"])

    # deaths become MEDS_DEATH, dated
    deaths = con.execute(
        f"SELECT person_id::BIGINT, death_date::DATE FROM {csv_rel('DEATH.csv')} ORDER BY 1"
    ).fetchall()
    assert len(deaths) == 3
    meds_deaths = data.filter(pl.col("code") == mc.DEATH_CODE).sort("subject_id")
    assert list(zip(meds_deaths["subject_id"], meds_deaths["time"].dt.date(), strict=True)) == (
        deaths
    )

    # numeric values become value-bin tokens
    v = vocab(synthea_run)
    bins = {v[bin_token(i)] for i in range(10)}
    ids = tokens_frame(synthea_run)["input_ids"].explode()
    n_bins = int(ids.is_in(list(bins)).sum())
    assert n_bins > 5_000
    assert n_bins == report["tokens"]["numeric values as bin tokens"]
    assert (synthea_run / "tokenizer" / "value_bins.json").exists()


# -- parquet folder (lower-case names) ------------------------------------------------------


def test_parquet_folder_matches_duckdb(
    eunomia_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.mktemp("eunomia_parquet")
    src = export_eunomia(base / "omop", "parquet")
    assert (src / "person.parquet").exists()
    run = prepare(str(src), base / "run", progress=False).run_dir
    _assert_same_run(eunomia_run, run)
    assert _tables_quality(quality(run)) == _tables_quality(quality(eunomia_run))


# -- PostgreSQL -----------------------------------------------------------------------------


@pytest.mark.postgres
def test_postgres_matches_duckdb(
    postgres_url: str, eunomia_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema=cdm"
    load_omop_duckdb_into_postgres(eunomia_path(), url)
    run = prepare(url, tmp_path_factory.mktemp("eunomia_pg") / "run", progress=False).run_dir
    _assert_same_run(eunomia_run, run)
    report = quality(run)
    assert _tables_quality(report) == _tables_quality(quality(eunomia_run))
    assert report["source"].startswith("PostgreSQL postgresql://")
    assert read_json(run / "config.json")["source"] == url


# -- MEDS folders as input ------------------------------------------------------------------


def test_meds_folder_round_trip(
    eunomia_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """ehrgpt's own MEDS output, prepared again, reproduces subjects, splits and token ids."""
    out = tmp_path_factory.mktemp("eunomia_meds") / "run"
    result = prepare(str(eunomia_run / "meds"), out, progress=False)
    _assert_same_run(eunomia_run, result.run_dir)
    assert result.n_subjects == 2694
    report = quality(result.run_dir)
    assert_quality_adds_up(report)
    assert report["tables"]["MEDS data"]["note"] == "visits from the data"
    assert report["tokens"] == quality(eunomia_run)["tokens"]


@pytest.fixture(scope="module")
def meds_without_visits(eunomia_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Eunomia run's MEDS folder with the core MEDS columns only (no visit_id)."""
    src = eunomia_run / "meds"
    dst = tmp_path_factory.mktemp("meds_core") / "meds"
    shutil.copytree(src / "metadata", dst / "metadata")
    for shard in _shards(eunomia_run):
        table = pq.read_table(shard, columns=["subject_id", "time", "code", "numeric_value"])
        out = dst / shard.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(meds.DataSchema.align(table), out)
    return dst


def _timed_events(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter(
        pl.col("time").is_not_null() & ~pl.col("code").is_in([mc.BIRTH_CODE, mc.DEATH_CODE])
    )


def test_meds_without_visit_id_day_rule(
    meds_without_visits: Path, eunomia_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = tmp_path_factory.mktemp("meds_day") / "run"
    result = prepare(str(meds_without_visits), out, meds_visit_rule="day", progress=False)
    data = _validate_meds_folder(out / "meds")
    assert data.height == meds_frame(eunomia_run).height
    events = _timed_events(data)
    assert events["visit_id"].null_count() == 0
    # one visit per subject and day, one day per visit
    per_day = events.group_by("subject_id", pl.col("time").dt.date()).agg(
        pl.col("visit_id").n_unique()
    )
    assert per_day["visit_id"].max() == 1
    per_visit = events.group_by("subject_id", "visit_id").agg(pl.col("time").dt.date().n_unique())
    assert per_visit["time"].max() == 1
    # static, birth and death rows have no visit
    assert (
        data.filter(pl.col("time").is_null())["visit_id"].null_count()
        == data.filter(pl.col("time").is_null()).height
    )
    # the user's splits are kept; everyone is tokenized
    splits = pl.read_parquet(out / "meds" / "metadata" / "subject_splits.parquet")
    given = pl.read_parquet(meds_without_visits / "metadata" / "subject_splits.parquet")
    assert_frame_equal(splits.sort("subject_id"), given.sort("subject_id"))
    assert result.n_subjects == 2694
    report = quality(out)
    assert report["tables"]["MEDS data"]["note"] == "visits by rule 'day'"
    assert report["tokens"]["subjects tokenized"] == 2694


def test_meds_without_visit_id_hours_rule_on_eunomia(
    meds_without_visits: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """hours:6 on day-resolution data: never splits simultaneous events into two visits."""
    out = tmp_path_factory.mktemp("meds_hours") / "meds"  # the MEDS step only
    import_meds(meds_without_visits, out, QualityReport(), visit_rule="hours:6", progress=False)
    events = _timed_events(_validate_meds_folder(out))
    per_time = events.group_by("subject_id", "time").agg(pl.col("visit_id").n_unique())
    assert per_time["visit_id"].max() == 1
    # Eunomia's events are date-only, all at 23:59:59 of their day (visit starts at 00:00:00),
    # so 6 hours never bridges two days of events: one visit per day
    per_visit = (
        events.filter(~pl.col("code").str.starts_with(mc.VISIT_PREFIX))
        .group_by("subject_id", "visit_id")
        .agg(pl.col("time").dt.date().n_unique())
    )
    assert per_visit["time"].max() == 1


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        # A 08:00, B 08:00, C 10:00, D 20:00, E next day 01:00, F 2021-06-01 09:00
        ("day", {"A": 1, "B": 1, "C": 1, "D": 1, "E": 2, "F": 3}),
        ("hours:6", {"A": 1, "B": 1, "C": 1, "D": 2, "E": 2, "F": 3}),
        ("hours:12", {"A": 1, "B": 1, "C": 1, "D": 1, "E": 1, "F": 2}),
    ],
)
def test_meds_visit_rules_on_intraday_times(
    tiny_meds: Path, tmp_path: Path, rule: str, expected: dict[str, int]
) -> None:
    run = prepare(str(tiny_meds), tmp_path / "run", meds_visit_rule=rule, progress=False).run_dir
    data = _validate_meds_folder(run / "meds")
    events = _timed_events(data).filter(pl.col("code").str.starts_with("CODE/"))
    for subject, rows in events.group_by("subject_id"):
        got = dict(zip(rows["code"].str.strip_prefix("CODE/"), rows["visit_id"], strict=True))
        assert got == expected, (rule, subject)
    assert data.filter(pl.col("code") == "LAB/X")["numeric_value"].null_count() == 0
    assert data["subject_id"].n_unique() == 12
    assert_quality_adds_up(quality(run))


def test_tiny_meds_gets_splits_when_it_has_none(tiny_meds: Path, tmp_path: Path) -> None:
    assert not (tiny_meds / "metadata").exists()
    run = prepare(str(tiny_meds), tmp_path / "run", seed=3, progress=False).run_dir
    splits = pl.read_parquet(run / "meds" / "metadata" / "subject_splits.parquet")
    assert splits.height == 12
    assert dict(splits.group_by("split").len().iter_rows()) == {
        "train": 10,
        "tuning": 1,
        "held_out": 1,
    }


# -- MEDS output validity ---------------------------------------------------------------------


def test_eunomia_meds_output_is_valid_meds(eunomia_run: Path) -> None:
    meds_dir = eunomia_run / "meds"
    data = _validate_meds_folder(meds_dir)
    assert data["subject_id"].n_unique() == 2694
    assert {p.parent.name for p in _shards(eunomia_run)} == {"train", "tuning", "held_out"}
    dataset = read_json(meds_dir / "metadata" / "dataset.json")
    assert dataset["dataset_name"] == "eunomia"
    assert set(mc.EXTRA_COLUMNS) <= set(dataset["other_extension_columns"])

    # codes.parquet: every code, unit and categorical value, with its OMOP concept id
    codes = pl.read_parquet(meds_dir / "metadata" / "codes.parquet")
    assert codes["code"].is_unique().all()
    used = set(data["code"]) | set(data["unit"].drop_nulls()) | set(data["value_code"].drop_nulls())
    assert used <= set(codes["code"])
    concept_codes = codes.filter(
        ~pl.col("code").is_in([mc.BIRTH_CODE, mc.DEATH_CODE])
        & ~pl.col("code").str.ends_with("/" + mc.UNKNOWN)
    )
    assert concept_codes["omop_concept_id"].null_count() == 0
    # vocabulary codes carry the concept id the OMOP concept table gives them
    con = duckdb.connect(str(eunomia_path()), read_only=True)
    concept = con.sql(
        "SELECT concept_id AS omop_concept_id, vocabulary_id || '/' || concept_code AS code "
        "FROM concept"
    ).pl()
    con.close()
    vocab_codes = codes.join(concept, on="code", how="inner", suffix="_omop")
    assert vocab_codes.height > 200
    assert (vocab_codes["omop_concept_id"] == vocab_codes["omop_concept_id_omop"]).all()
    gi_bleed = codes.filter(pl.col("omop_concept_id") == 192671)
    assert gi_bleed.select("code", "description").rows() == [
        ("SNOMED/74474003", "Gastrointestinal hemorrhage")
    ]
    # visit types and genders carry their concept id too
    for code, concept_id in (("VISIT/9201", 9201), ("GENDER/8532", 8532)):
        assert codes.filter(pl.col("code") == code)["omop_concept_id"].item() == concept_id


# -- data quality on Eunomia (its known counts) ---------------------------------------------


def test_eunomia_data_quality(eunomia_run: Path) -> None:
    report = quality(eunomia_run)
    assert_quality_adds_up(report)
    tables = report["tables"]
    assert report["patients"]["in person table"] == 2694
    assert report["patients"]["kept"] == 2694
    assert tables["person"]["read"] == tables["person"]["used"] == 2694

    # the event tables as Eunomia is known to hold them (rows read)
    for table, approx in (
        ("condition_occurrence", 65_000),
        ("drug_exposure", 68_000),
        ("procedure_occurrence", 37_000),
        ("measurement", 44_000),
        ("observation", 1_500),
    ):
        assert abs(tables[table]["read"] - approx) < 0.02 * approx, table
        assert tables[table]["status"] == "ok"
    assert tables["visit_occurrence"]["read"] == 1037

    # malformed tables are reported and skipped, not fatal
    for table in ("death", "device_exposure"):
        t = tables[table]
        assert t["status"] == "malformed", table
        assert t["used"] == 0 and t["set_aside"] == {"malformed table": t["read"]}
        assert "lacks column(s)" in t["note"]

    # missing visits rebuilt from the ids events name; events without an id counted
    con = duckdb.connect(str(eunomia_path()), read_only=True)
    named = " UNION ALL ".join(f"SELECT visit_occurrence_id AS vid FROM {t}" for t in EVENT_TABLES)
    no_id, missing_ids = con.execute(f"""
        SELECT count(*) FILTER (WHERE vid IS NULL),
               count(DISTINCT vid) FILTER (WHERE vid NOT IN
                   (SELECT visit_occurrence_id FROM visit_occurrence))
        FROM ({named})
    """).fetchone()
    con.close()
    visits = report["visits"]
    assert visits["from visit_occurrence"] == 1037
    assert visits["rebuilt from missing visit ids"] == missing_ids
    assert 110_000 < missing_ids < 112_000
    assert no_id == 657
    assert visits["events without a usable visit id"] == 657
    assert visits["  attached to a covering visit"] + visits["  grouped per person and day"] == 657

    # nothing dropped silently: MEDS event rows == rows used from the event tables
    data = meds_frame(eunomia_run)
    from_tables = data.filter(pl.col("omop_table").is_in(EVENT_TABLES))
    assert from_tables.height == sum(tables[t]["used"] for t in EVENT_TABLES)
    assert from_tables["visit_id"].null_count() == 0
    assert json.dumps(report)  # plain JSON


# -- MEDS input with a visit_id column: events without one (issue 7, item 4) -----------------


def _meds_with_null_visit_ids(folder: Path) -> Path:
    """Two subjects; subject 1 has an inpatient visit 10 (01-01 08:00 to 01-05 12:00, given by
    its VISIT row's ``end``) and events without a visit id inside it, after it and later."""
    t = dt.datetime
    rows = [
        (1, t(1950, 1, 1), mc.BIRTH_CODE, None, None),
        (1, t(2020, 1, 1, 8), "VISIT/9201", 10, t(2020, 1, 5, 12)),
        (1, t(2020, 1, 1, 9), "CODE/IN", 10, None),
        (1, t(2020, 1, 3, 10), "CODE/COVERED", None, None),
        (1, t(2020, 1, 5, 23), "CODE/LAST_DAY", None, None),
        (1, t(2020, 2, 1, 9), "CODE/FEB_A", None, None),
        (1, t(2020, 2, 1, 15), "CODE/FEB_B", None, None),
        (1, t(2020, 3, 1, 9), "CODE/MARCH", None, None),
        (2, t(1960, 1, 1), mc.BIRTH_CODE, None, None),
        (2, t(2020, 1, 3, 10), "CODE/OTHER_SUBJECT", None, None),  # not in subject 1's visit
        (2, t(2020, 4, 1, 10), "VISIT/9202", 7, None),
        (2, t(2020, 4, 1, 11), "CODE/IN_7", 7, None),
    ]
    frame = pl.DataFrame(
        rows,
        schema={
            "subject_id": pl.Int64,
            "time": pl.Datetime("us"),
            "code": pl.String,
            "visit_id": pl.Int64,
            "end": pl.Datetime("us"),
        },
        orient="row",
    ).with_columns(pl.lit(None, pl.Float32).alias("numeric_value"))
    (folder / "data").mkdir(parents=True)
    frame.write_parquet(folder / "data" / "0.parquet")
    return folder


def test_meds_events_without_visit_id_get_a_covering_or_day_visit(tmp_path: Path) -> None:
    src = _meds_with_null_visit_ids(tmp_path / "src")
    report = QualityReport()
    import_meds(src, tmp_path / "out" / "meds", report, progress=False)
    data = pl.read_parquet(sorted((tmp_path / "out" / "meds" / "data").rglob("*.parquet")))
    visit = dict(zip(data["code"], data["visit_id"], strict=True))
    # covered by subject 1's visit 10 (its day inside [01-01, 01-05], the end from VISIT's end)
    assert visit["CODE/COVERED"] == visit["CODE/LAST_DAY"] == 10
    # not covered: one new visit per subject and day, ids below every id of the data
    assert visit["CODE/FEB_A"] == visit["CODE/FEB_B"]
    new_ids = {visit["CODE/FEB_A"], visit["CODE/MARCH"], visit["CODE/OTHER_SUBJECT"]}
    assert len(new_ids) == 3 and max(new_ids) < 0
    assert visit["CODE/IN_7"] == 7 and visit["CODE/IN"] == 10  # given ids are kept
    assert data.filter(pl.col("code") == mc.BIRTH_CODE)["visit_id"].null_count() == 2
    assert report.visits == {
        "visits in the data": 2,
        "events without a usable visit id": 6,
        "  attached to a covering visit": 2,
        "  grouped per person and day": 4,
        "visits made from day groups": 3,
    }


# -- a visit whose end is before its start (issue 7, item 6) ---------------------------------


def test_visit_ending_before_its_start_is_repaired_and_keeps_its_type(tmp_path: Path) -> None:
    """Its end becomes its start (counted); it stays inpatient and keeps its events."""
    vid = 6727  # inpatient (9201) visit of person 99, 2000-03-11 to 2000-03-12
    src = eunomia_sample(
        tmp_path / "cdm.duckdb",
        statements=(
            "UPDATE visit_occurrence SET \"VISIT_END_DATE\" = DATE '2000-03-08', "
            f'"VISIT_END_DATETIME" = DATE \'2000-03-08\' WHERE "VISIT_OCCURRENCE_ID" = {vid}',
        ),
    )
    run = prepare(str(src), tmp_path / "run", progress=False).run_dir
    data = meds_frame(run)
    visit = data.filter(pl.col("visit_id") == vid)
    row = visit.filter(pl.col("code").str.starts_with(mc.VISIT_PREFIX))
    assert row["code"].to_list() == ["VISIT/9201"]
    assert row["end"].item() == row["time"].item() == dt.datetime(2000, 3, 11)
    assert visit.filter(pl.col("omop_table") == "condition_occurrence").height > 0
    report = quality(run)
    assert_quality_adds_up(report)
    assert report["tables"]["visit_occurrence"]["set_aside"] == {}
    assert report["visits"]["  end before start: end set to start"] == 1


# -- date-only events at the end of their day (docs/method.md section 1) -------------------


def test_date_only_events_come_after_their_visit_start(eunomia_run: Path) -> None:
    """A prediction at a date-only visit's start (00:00:00) does not see that day's diagnoses,
    stamped 23:59:59 as meds_etl does; birth keeps its date."""
    data = meds_frame(eunomia_run)
    visits = data.filter(pl.col("code") == "VISIT/9201").select(
        "subject_id", "visit_id", pl.col("time").alias("start")
    )
    assert (visits["start"].dt.time() == dt.time(0)).all()
    conditions = data.filter(pl.col("omop_table") == "condition_occurrence")
    assert (conditions["time"].dt.time() == dt.time(23, 59, 59)).all()
    same_day = conditions.join(visits, on=["subject_id", "visit_id"]).filter(
        pl.col("time").dt.date() == pl.col("start").dt.date()
    )
    assert same_day.height > 100
    subject, start = same_day.select("subject_id", "start").row(0)
    seen = data.filter((pl.col("subject_id") == subject) & (pl.col("time") <= start))
    assert seen.filter(pl.col("time").dt.date() == start.date())["code"].to_list() == ["VISIT/9201"]
    assert same_day.filter(pl.col("subject_id") == subject).height > 0
    assert (data.filter(pl.col("code") == mc.BIRTH_CODE)["time"].dt.time() == dt.time(0)).all()

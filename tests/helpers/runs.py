"""Prepared runs shared by the test session, and helpers to read them.

Each run is made once per session (``prepare`` on Eunomia takes a few seconds):

- ``eunomia_run``: ``prepare eunomia`` (the DuckDB path);
- ``synthea_csv``: the Synthea27Nj OMOP CSV export (``tests/data``, Apache-2.0, see
  ``tests/data/README.md``) unzipped into a temporary folder (upper-case file names);
- ``synthea_run``: ``prepare`` of that CSV folder;
- ``synthea_expanded_run``: the same with ``--vocab-from`` the Eunomia run;
- ``tiny_meds``: a small hand-made MEDS folder (intra-day times, no visit_id, written by
  polars), for fast runs of the MEDS path and the CLI.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import zipfile
from pathlib import Path

import duckdb
import polars as pl
import pytest

from ehrgpt.pipelines.prepare import prepare
from ehrgpt.sources.omop import eunomia_path

#: Synthea27Nj OMOP CDM 5.4 CSV export, kept in the repository (licence: tests/data/README.md).
SYNTHEA_ZIP = Path(__file__).resolve().parents[1] / "data" / "synthea27nj_omop54_csv.zip"

#: The OMOP tables ehrgpt reads (as Eunomia names them).
OMOP_TABLES = (
    "person",
    "death",
    "visit_occurrence",
    "condition_occurrence",
    "drug_exposure",
    "procedure_occurrence",
    "measurement",
    "observation",
    "device_exposure",
    "concept",
)


# -- helpers ------------------------------------------------------------------------------


def meds_frame(run: Path) -> pl.DataFrame:
    """All MEDS rows of a run (or of a MEDS folder), sorted by every column."""
    meds_dir = run / "meds" if (run / "meds").is_dir() else run
    frame = pl.read_parquet(sorted((meds_dir / "data").rglob("*.parquet")))
    return frame.sort(frame.columns, nulls_last=False)


def tokens_frame(run: Path) -> pl.DataFrame:
    """All tokenized rows of a run, one per subject, sorted by subject."""
    return pl.read_parquet(sorted((run / "tokenized").rglob("*.parquet"))).sort("subject_id")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def vocab(run: Path) -> dict[str, int]:
    return read_json(run / "tokenizer" / "vocab.json")


def quality(run: Path) -> dict:
    return read_json(run / "data_quality.json")


def assert_quality_adds_up(report: dict) -> None:
    """read == used + set aside, for every table of a data_quality.json."""
    assert report["tables"], "no tables in the data-quality report"
    for name, t in report["tables"].items():
        assert t["read"] == t["used"] + sum(t["set_aside"].values()), (name, t)


def leftovers(out: Path) -> list[str]:
    """The run folder and any work sibling (``.NAME.tmp-*``, ``.NAME.old-*``,
    ``.NAME.partial``) that exist."""
    found = [out.name] if out.exists() else []
    if out.parent.exists():
        found += sorted(
            p.name
            for p in out.parent.iterdir()
            if p.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-"))
            or p.name == f".{out.name}.partial"
        )
    return found


def export_eunomia(folder: Path, fmt: str, tables=OMOP_TABLES, *, upper: bool = False) -> Path:
    """Copy Eunomia tables to ``folder/<table>.<fmt>`` with DuckDB ``COPY`` (csv or parquet)."""
    folder.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(eunomia_path()), read_only=True)
    try:
        for table in tables:
            name = table.upper() if upper else table
            target = (folder / f"{name}.{fmt}").as_posix()
            options = "FORMAT parquet" if fmt == "parquet" else "FORMAT csv, HEADER true"
            con.execute(f"COPY (SELECT * FROM main.{table}) TO '{target}' ({options})")
    finally:
        con.close()
    return folder


def eunomia_sample(path: Path, n_persons: int = 100, statements: tuple[str, ...] = ()) -> Path:
    """A DuckDB file with Eunomia's tables cut to its first ``n_persons`` persons.

    Tables without a ``PERSON_ID`` column (concept, the malformed death and device_exposure)
    are copied whole; then ``statements`` (SQL, on Eunomia's upper-case column names) run on
    the copy. The connection works in UTC.
    """
    con = duckdb.connect(str(path))
    try:
        con.execute("SET TimeZone='UTC'")
        con.execute(f"ATTACH '{eunomia_path().as_posix()}' AS src (READ_ONLY)")
        keep = f'SELECT "PERSON_ID" FROM src.main.person ORDER BY 1 LIMIT {int(n_persons)}'
        for table in OMOP_TABLES:
            cols = {r[0] for r in con.execute(f"DESCRIBE src.main.{table}").fetchall()}
            where = f' WHERE "PERSON_ID" IN ({keep})' if "PERSON_ID" in cols else ""
            con.execute(f"CREATE TABLE {table} AS SELECT * FROM src.main.{table}{where}")
        con.execute("DETACH src")
        for statement in statements:
            con.execute(statement)
    finally:
        con.close()
    return path


def write_tiny_meds(folder: Path, n_subjects: int = 12) -> Path:
    """A small MEDS 0.4 folder without visit_id, written by polars (large_string codes).

    Subject ``s`` is born 1950-01-01 + s years and has, on 2020-01-01 + s days:
    08:00 A, 08:00 B (simultaneous), 10:00 C, 20:00 D (10 h later), next day 01:00 E (5 h
    later), and 2021-06-01 09:00 F. Subjects with an even id also have a lab with a value.
    """
    rows = []
    for s in range(1, n_subjects + 1):
        day = dt.datetime(2020, 1, 1) + dt.timedelta(days=s)
        rows += [
            (s, None, "GENDER/8507" if s % 2 else "GENDER/8532", None),
            (s, dt.datetime(1950 + s, 1, 1), "MEDS_BIRTH", None),
            (s, day.replace(hour=8), "CODE/A", None),
            (s, day.replace(hour=8), "CODE/B", None),
            (s, day.replace(hour=10), "CODE/C", None),
            (s, day.replace(hour=20), "CODE/D", None),
            (s, day + dt.timedelta(days=1, hours=1), "CODE/E", None),
            (s, dt.datetime(2021, 6, 1, 9), "CODE/F", None),
        ]
        if s % 2 == 0:
            rows.append((s, dt.datetime(2021, 6, 1, 9), "LAB/X", float(s)))
    frame = pl.DataFrame(
        rows,
        schema={
            "subject_id": pl.Int64,
            "time": pl.Datetime("us"),
            "code": pl.String,
            "numeric_value": pl.Float32,
        },
        orient="row",
    )
    (folder / "data" / "train").mkdir(parents=True, exist_ok=True)
    frame.filter(pl.col("subject_id") <= n_subjects // 2).write_parquet(
        folder / "data" / "train" / "0.parquet"
    )
    frame.filter(pl.col("subject_id") > n_subjects // 2).write_parquet(
        folder / "data" / "train" / "1.parquet"
    )
    return folder


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def eunomia_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``prepare eunomia`` (the DuckDB source), made once per session."""
    out = tmp_path_factory.mktemp("eunomia") / "run"
    return prepare("eunomia", out, progress=False).run_dir


@pytest.fixture(scope="session")
def synthea_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Synthea27Nj OMOP 5.4 CSV export (28 patients), unzipped as it comes."""
    folder = tmp_path_factory.mktemp("synthea27nj")
    with zipfile.ZipFile(SYNTHEA_ZIP) as archive:
        archive.extractall(folder)
    return folder


@pytest.fixture(scope="session")
def synthea_run(synthea_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``prepare`` of the Synthea27Nj CSV folder with its own vocabulary."""
    out = tmp_path_factory.mktemp("synthea") / "run"
    return prepare(str(synthea_csv), out, progress=False).run_dir


@pytest.fixture(scope="session")
def synthea_expanded_run(
    synthea_csv: Path, eunomia_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """``prepare`` of Synthea27Nj with ``--vocab-from`` the Eunomia run."""
    out = tmp_path_factory.mktemp("synthea_expanded") / "run"
    return prepare(str(synthea_csv), out, vocab_from=eunomia_run, progress=False).run_dir


@pytest.fixture(scope="session")
def tiny_meds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MEDS folder (see :func:`write_tiny_meds`); do not modify it."""
    return write_tiny_meds(tmp_path_factory.mktemp("tiny_meds"))


def small_model_dir(run: Path, out: Path, *, context: int = 1024) -> Path:
    """A small, freshly initialised model folder laid out like ``ehrgpt train`` output
    (weights, tokenizer, demographics, code metadata and concept rows of ``run``)."""
    import torch

    from ehrgpt.generation.prompts import DEMOGRAPHICS_FILE, demographics
    from ehrgpt.model import EhrGptConfig, EhrGptForCausalLM
    from ehrgpt.tokenizer.vocab import EhrTokenizer

    tok = EhrTokenizer.from_pretrained(run / "tokenizer")
    torch.manual_seed(0)
    config = EhrGptConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        dropout=0.0,
        max_position_embeddings=context,
    )
    EhrGptForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    demographics(run, tok).write_parquet(out / DEMOGRAPHICS_FILE)
    for name in ("codes.parquet", "omop_concepts.parquet"):  # as ehrgpt train saves them
        source = run / "meds" / "metadata" / name
        if source.exists():
            (out / name).write_bytes(source.read_bytes())
    return out


def planted_run(run: Path, labels: pl.DataFrame, folder: Path) -> Path:
    """A copy of ``run`` whose subjects get events after their prediction time.

    For each label: a diagnosis the same day one hour after the prediction time (a date-only
    event stamped later that day), one 30 days later, and a visit that starts 2 days later.
    """
    copy = folder / "planted"
    shutil.copytree(run / "meds", copy / "meds")
    shard = sorted((copy / "meds" / "data").rglob("*.parquet"))
    frames = {p: pl.read_parquet(p) for p in shard}
    for path, frame in frames.items():
        mine = labels.filter(pl.col("subject_id").is_in(frame["subject_id"].unique().implode()))
        if not mine.height:
            continue
        t = pl.col("prediction_time")
        planted = pl.concat(
            [
                mine.select(
                    "subject_id",
                    (t + dt.timedelta(hours=1)).alias("time"),
                    pl.lit("SNOMED/74474003").alias("code"),
                ),
                mine.select(
                    "subject_id",
                    (t + dt.timedelta(days=30)).alias("time"),
                    pl.lit("SNOMED/10509002").alias("code"),
                ),
                mine.select(
                    "subject_id",
                    (t + dt.timedelta(days=2)).alias("time"),
                    pl.lit("VISIT/9201").alias("code"),
                ),
            ]
        )
        out = pl.concat([frame, planted], how="diagonal_relaxed").sort(
            "subject_id", "time", nulls_last=False
        )
        out.select(frame.columns).write_parquet(path)
    return copy

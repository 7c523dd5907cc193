"""The same data gives the same MEDS rows and tokens under any machine time zone (issue 7, 5).

Timestamps with a time zone are read in UTC: DuckDB's ``TimeZone`` is pinned on every
connection, so ``TZ=America/New_York`` or ``TZ=Pacific/Kiritimati`` (UTC+14) change nothing.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
from polars.testing import assert_frame_equal

import ehrgpt
from tests.helpers.runs import eunomia_sample, meds_frame, tokens_frame

#: Written as TIMESTAMPTZ: visit starts and condition times at hours spread over the UTC day,
#: so that a conversion to local time moves some of them to another day and not others.
_AWARE = (
    'ALTER TABLE visit_occurrence ALTER "VISIT_START_DATETIME" TYPE TIMESTAMPTZ USING '
    "timezone('UTC', CAST(\"VISIT_START_DATE\" AS TIMESTAMP) "
    '+ to_hours(("VISIT_OCCURRENCE_ID" * 7) % 24))',
    'ALTER TABLE condition_occurrence ALTER "CONDITION_START_DATETIME" TYPE TIMESTAMPTZ USING '
    "timezone('UTC', CAST(\"CONDITION_START_DATE\" AS TIMESTAMP) "
    '+ to_hours(("CONDITION_OCCURRENCE_ID" * 5) % 24))',
)
_TABLES = ("person", "visit_occurrence", "condition_occurrence", "drug_exposure", "concept")

_PREPARE = """
import sys
from ehrgpt.pipelines.prepare import prepare
for src, out in zip(sys.argv[1::2], sys.argv[2::2]):
    prepare(src, out, progress=False)
"""


def _export(db: Path, folder: Path, fmt: str, zone: str) -> Path:
    """Tables as parquet (UTC instants) or CSV (text with ``zone``'s offsets, e.g. -05)."""
    folder.mkdir()
    con = duckdb.connect(str(db), read_only=True)
    try:
        con.execute(f"SET TimeZone='{zone}'")
        for table in _TABLES:
            options = "FORMAT parquet" if fmt == "parquet" else "FORMAT csv, HEADER true"
            con.execute(f"COPY {table} TO '{(folder / f'{table}.{fmt}').as_posix()}' ({options})")
    finally:
        con.close()
    return folder


def _prepare_under(zone: str, sources: list[Path], outs: list[Path]) -> None:
    env = {**os.environ, "TZ": zone, "PYTHONPATH": str(Path(ehrgpt.__file__).parents[1])}
    args = [a for pair in zip(sources, outs, strict=True) for a in map(str, pair)]
    subprocess.run([sys.executable, "-c", _PREPARE, *args], env=env, check=True, timeout=300)


def test_time_zone_of_the_machine_changes_nothing(tmp_path: Path) -> None:
    db = eunomia_sample(tmp_path / "cdm.duckdb", n_persons=60, statements=_AWARE)
    sources = [
        _export(db, tmp_path / "parquet", "parquet", "UTC"),
        _export(db, tmp_path / "csv", "csv", "America/Chicago"),
    ]
    runs = {}
    for zone in ("America/New_York", "Pacific/Kiritimati"):
        outs = [tmp_path / zone.replace("/", "_") / s.name for s in sources]
        _prepare_under(zone, sources, outs)
        runs[zone] = outs
    reference = runs["America/New_York"][0]
    for outs in runs.values():
        for run in outs:  # parquet and CSV, under each zone: one result
            assert_frame_equal(meds_frame(run), meds_frame(reference))
            assert_frame_equal(tokens_frame(run), tokens_frame(reference))
    # and that result is UTC: visit 6727 at 2000-03-11 + (6727 * 7) % 24 = 1 hour (UTC),
    # which New York calls 2000-03-10
    visit = meds_frame(reference).filter(
        (pl.col("visit_id") == 6727) & pl.col("code").str.starts_with("VISIT/")
    )
    assert visit["time"].to_list() == [dt.datetime(2000, 3, 11, 1)]

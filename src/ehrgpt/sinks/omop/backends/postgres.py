"""An OMOP target in a PostgreSQL schema: tables created where missing, chunks sent with
``COPY FROM STDIN`` in one transaction each, and keys added on request.

Existing tables are appended to as they are named and spelled (case of table and column
names, CDM 5.3 column names); the schema is ``?schema=`` of the URL (default ``public``).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping
from typing import Any

import polars as pl

from ehrgpt.errors import SinkError
from ehrgpt.sinks.omop.backends.base import SqlBackend, ddl, fit_columns, write_cdm_csv
from ehrgpt.sinks.omop.schema import CDM_TABLES, ID_COLUMNS, id_column
from ehrgpt.util.urls import mask_secrets

__all__ = ["PostgresBackend"]


class PostgresBackend(SqlBackend):
    """The CDM tables of a PostgreSQL schema (created if missing), one transaction a chunk."""

    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg import sql

        from ehrgpt.sources.postgres import connect, parse_postgres_url

        self.sql = sql
        self._url = url
        self.target = parse_postgres_url(url)
        self.description = f"PostgreSQL {self.target.masked_url}"
        self.driver_error = psycopg.Error
        self._stack = contextlib.ExitStack()
        self.conn = self._stack.enter_context(connect(self.target, autocommit=True))
        try:
            with self._errors("create the CDM tables"):
                self._open()
        except BaseException:
            self._stack.close()
            raise

    def _mask(self, message: str) -> str:
        return mask_secrets(message, self._url)

    def _open(self) -> None:
        sql = self.sql
        schema = self.target.schema
        self.schema = sql.Identifier(schema)
        with self.conn.transaction():
            self.conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(self.schema))
            stored: dict[str, str] = {}
            for (name,) in self.conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s "
                "ORDER BY table_name <> lower(table_name), table_name",
                (schema,),
            ).fetchall():
                stored.setdefault(str(name).lower(), str(name))
            self.names: dict[str, str] = {}
            self.columns: dict[str, list[str]] = {}
            self.types: dict[str, dict[str, str]] = {}
            for table in CDM_TABLES:
                name = stored.get(table, table)
                self.names[table] = name
                if table not in stored:
                    qualified = self._q(table).as_string(self.conn)
                    self.conn.execute(sql.SQL(ddl(table, qualified, "postgresql")))  # type: ignore[arg-type]
                described = self.conn.execute(
                    "SELECT column_name, data_type, numeric_precision, numeric_scale "
                    "FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
                    "ORDER BY ordinal_position",
                    (schema, name),
                ).fetchall()
                self.columns[table] = [str(r[0]) for r in described]
                self.types[table] = {
                    str(col).lower(): f"numeric({p},{sc or 0})" if typ == "numeric" and p else typ
                    for col, typ, p, sc in described
                }

    def id_types(self) -> dict[tuple[str, str], str]:
        return {
            (table, col): self.types[table][col]
            for table, cols in ID_COLUMNS.items()
            for col in cols
            if col in self.types[table]
        }

    def _q(self, table: str) -> Any:
        return self.sql.Identifier(self.target.schema, self.names[table])

    def _col(self, table: str, col: str) -> str | None:
        return next((c for c in self.columns[table] if c.lower() == col), None)

    def largest(self, table: str, col: str) -> int:
        name = self._col(table, col)
        if not name:
            return -1
        q = self.sql.SQL("SELECT max({}) FROM {}").format(self.sql.Identifier(name), self._q(table))
        with self._errors(f"read {table}.{col}"):
            value = self.conn.execute(q).fetchone()[0]
        return int(value) if value is not None else -1

    def existing(self, table: str, col: str, ids: Iterable[int]) -> set[int]:
        ids = list(ids)
        name = self._col(table, col)
        if not ids or not name:
            return set()
        q = self.sql.SQL("SELECT DISTINCT {c} FROM {t} WHERE {c} = ANY(%s)").format(
            c=self.sql.Identifier(name), t=self._q(table)
        )
        with self._errors(f"read {table}.{col}"):
            return {int(r[0]) for r in self.conn.execute(q, (ids,)).fetchall()}

    def person_ids(self, at_least: int) -> list[int]:
        q = self.sql.SQL("SELECT {c} FROM {t} WHERE {c} >= %s").format(
            c=self.sql.Identifier(self._col("person", "person_id") or "person_id"),
            t=self._q("person"),
        )
        with self._errors("read person.person_id"):
            return [int(r[0]) for r in self.conn.execute(q, (at_least,)).fetchall()]

    def write_chunk(self, tables: Mapping[str, pl.DataFrame], next_id: int) -> None:
        sql = self.sql
        parts = {
            table: fit_columns(frame, [c.lower() for c in self.columns[table]], table)
            for table, frame in tables.items()
            if frame.height
        }
        with (
            self._errors("write a chunk (nothing of it was kept)"),
            self.conn.transaction(),
            self.conn.cursor() as cur,
        ):
            for table, part in parts.items():
                cols = [self._col(table, c) or c for c in part.columns]
                buf = io.BytesIO()
                write_cdm_csv(part, buf)
                q = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv, HEADER true)").format(
                    self._q(table), sql.SQL(", ").join(sql.Identifier(c) for c in cols)
                )
                with cur.copy(q) as copy:
                    copy.write(buf.getvalue())

    def _constraints(self) -> set[str]:
        rows = self.conn.execute(
            "SELECT c.conname FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
            "WHERE n.nspname = %s",
            (self.target.schema,),
        ).fetchall()
        return {str(r[0]) for r in rows}

    def _has_primary_key(self, table: str) -> bool:
        q = (
            "SELECT 1 FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
            "JOIN pg_namespace n ON n.oid = t.relnamespace "
            "WHERE n.nspname = %s AND t.relname = %s AND c.contype = 'p'"
        )
        return self.conn.execute(q, (self.target.schema, self.names[table])).fetchone() is not None

    def add_keys(self) -> None:
        """Primary keys on the id columns; person and visit foreign keys on every table."""
        sql = self.sql
        statements = []
        for table in CDM_TABLES:
            col = id_column(table)
            if col and self._col(table, col) and not self._has_primary_key(table):
                statements.append(
                    sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
                        self._q(table), sql.Identifier(self._col(table, col))
                    )
                )
        existing = self._constraints()
        for table in CDM_TABLES:
            for col, parent in (
                ("person_id", "person"),
                ("visit_occurrence_id", "visit_occurrence"),
            ):
                if table == parent or not self._col(table, col):
                    continue
                name = f"fpk_{table}_{col}"[:63]
                if name in existing:
                    continue
                statements.append(
                    sql.SQL(
                        "ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({})"
                    ).format(
                        self._q(table),
                        sql.Identifier(name),
                        sql.Identifier(self._col(table, col)),
                        self._q(parent),
                        sql.Identifier(self._col(parent, col)),
                    )
                )
        for statement in statements:
            try:
                with self.conn.transaction():
                    self.conn.execute(statement)
            except Exception as exc:
                text = statement.as_string(self.conn)
                raise SinkError(
                    f"Cannot add a key in {self.description} ({text}): "
                    f"{str(exc).strip().splitlines()[0]}."
                ) from None

    def close(self) -> None:
        self._stack.close()

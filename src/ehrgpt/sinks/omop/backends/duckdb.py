"""An OMOP target in a DuckDB file: CDM tables created where missing, one transaction a chunk."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import polars as pl

from ehrgpt.errors import SinkError
from ehrgpt.sinks.omop.backends.base import SqlBackend, ddl, fit_columns
from ehrgpt.sinks.omop.schema import CDM_TABLES

__all__ = ["DuckDbBackend"]


class DuckDbBackend(SqlBackend):
    """The CDM tables of a DuckDB file (created if missing), in its default schema."""

    def __init__(self, path: Path) -> None:
        import duckdb

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.con = duckdb.connect(str(path))
        except duckdb.Error as exc:
            raise SinkError(
                f"Cannot open DuckDB file {path} for writing: {exc}; check that no other "
                "process has it open."
            ) from None
        self.description = f"DuckDB {path}"
        for table in CDM_TABLES:
            self.con.execute(ddl(table, table, "duckdb")).fetchall()
        self.columns = {
            table: [
                str(r[0]).lower()
                for r in self.con.execute(
                    "SELECT column_name FROM information_schema.columns WHERE "
                    "lower(table_name) = ? AND table_schema = current_schema() "
                    "ORDER BY ordinal_position",
                    [table],
                ).fetchall()
            ]
            for table in CDM_TABLES
        }

    def largest(self, table: str, col: str) -> int:
        if col not in self.columns[table]:
            return -1
        value = self.con.execute(f"SELECT max({col}) FROM {table}").fetchall()[0][0]
        return int(value) if value is not None else -1

    def existing(self, table: str, col: str, ids: Iterable[int]) -> set[int]:
        ids = list(ids)
        if not ids or col not in self.columns[table]:
            return set()
        self.con.register("_ids", pl.DataFrame({"i": ids}, schema={"i": pl.Int64}).to_arrow())
        try:
            found = self.con.execute(
                f"SELECT DISTINCT {col} FROM {table} WHERE {col} IN (SELECT i FROM _ids)"
            ).fetchall()
        finally:
            self.con.unregister("_ids")
        return {int(r[0]) for r in found}

    def person_ids(self, at_least: int) -> list[int]:
        rows = self.con.execute(
            "SELECT person_id FROM person WHERE person_id >= ?", [at_least]
        ).fetchall()
        return [int(r[0]) for r in rows]

    def write_chunk(self, tables: Mapping[str, pl.DataFrame], next_id: int) -> None:
        self.con.begin()
        try:
            for table, frame in tables.items():
                if not frame.height:
                    continue
                part = fit_columns(frame, self.columns[table], table)
                self.con.register("_chunk", part.to_arrow())
                cols = ", ".join(part.columns)
                self.con.execute(
                    f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _chunk"
                ).fetchall()
                self.con.unregister("_chunk")
            self.con.commit()
        except BaseException:
            self.con.rollback()
            raise

    def close(self) -> None:
        self.con.close()

"""An OMOP target in a DuckDB file: CDM tables created where missing, one transaction a chunk."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import polars as pl

from ehrgpt.errors import SinkError
from ehrgpt.sinks.omop.backends.base import SqlBackend, ddl, fit_columns
from ehrgpt.sinks.omop.schema import CDM_TABLES, ID_COLUMNS

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
        self.driver_error = duckdb.Error
        try:
            with self._errors("create the CDM tables"):
                self._open()
        except BaseException:
            self.con.close()
            raise

    def _open(self) -> None:
        for table in CDM_TABLES:
            self.con.execute(ddl(table, table, "duckdb")).fetchall()
        self.types: dict[str, dict[str, str]] = {
            table: {
                str(r[0]).lower(): str(r[1])
                for r in self.con.execute(
                    "SELECT column_name, data_type FROM information_schema.columns WHERE "
                    "lower(table_name) = ? AND table_schema = current_schema() "
                    "ORDER BY ordinal_position",
                    [table],
                ).fetchall()
            }
            for table in CDM_TABLES
        }
        self.columns = {table: list(types) for table, types in self.types.items()}

    def id_types(self) -> dict[tuple[str, str], str]:
        return {
            (table, col): self.types[table][col]
            for table, cols in ID_COLUMNS.items()
            for col in cols
            if col in self.types[table]
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
        parts = {
            table: fit_columns(frame, self.columns[table], table)
            for table, frame in tables.items()
            if frame.height
        }
        with self._errors("write a chunk (nothing of it was kept)"):
            self.con.begin()
            try:
                for table, part in parts.items():
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

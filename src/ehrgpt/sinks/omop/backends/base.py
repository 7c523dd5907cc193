"""What an OMOP target must do for :class:`~ehrgpt.sinks.omop.writer.OmopWriter`, and the
pieces the targets share: CDM DDL, fitting a chunk to an existing table, CSV text.

:class:`Backend` is a target (a DuckDB file, a folder, a PostgreSQL schema); :class:`SqlBackend`
implements its id and person/concept queries for SQL databases on two primitives.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO

import polars as pl

from ehrgpt.errors import SinkError
from ehrgpt.sinks.omop.schema import CDM_TABLES, ID_COLUMNS, SEQUENCE_ID_COLUMNS

log = logging.getLogger(__name__)

__all__ = ["Backend", "SqlBackend", "ddl", "fit_columns", "write_cdm_csv"]

_DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S%.f"

#: CDM 5.3 spellings of 5.4 columns, used when appending to a 5.3 table.
_CDM53_NAMES = {
    "discharged_to_concept_id": "discharge_to_concept_id",
    "discharged_to_source_value": "discharge_to_source_value",
}


class Backend:
    """Where chunks go; each method is one small, well-defined operation."""

    description: str

    def max_id(self) -> int:
        """The largest id of the shared sequence in the target (-1 when it has none)."""
        raise NotImplementedError

    def max_person_id(self) -> int:
        """The largest person id in the target (-1 when it has none)."""
        raise NotImplementedError

    def person_ids(self, at_least: int) -> list[int]:
        """The person ids in the target from ``at_least`` up."""
        raise NotImplementedError

    def has_vocabulary(self) -> bool:
        """Whether the target's ``concept`` table holds any row."""
        raise NotImplementedError

    def id_types(self) -> dict[tuple[str, str], str]:
        """(table, column) -> SQL type of the id columns ehrgpt writes (ours: CDM_TABLES)."""
        return {
            (table, c.name): c.type
            for table, cols in ID_COLUMNS.items()
            for c in CDM_TABLES[table]
            if c.name in cols
        }

    def existing_persons(self, ids: list[int]) -> set[int]:
        """Those of ``ids`` that are person ids in the target."""
        raise NotImplementedError

    def existing_concepts(self, ids: set[int]) -> set[int]:
        """Those of ``ids`` that are in the target's ``concept`` table."""
        raise NotImplementedError

    def write_chunk(self, tables: Mapping[str, pl.DataFrame], next_id: int) -> None:
        """Append the tables of one chunk, atomically; ``next_id`` continues the sequence."""
        raise NotImplementedError

    def add_keys(self) -> None:
        """Add primary and foreign keys (PostgreSQL only)."""
        log.warning("Keys are only added to PostgreSQL targets; %s gets none.", self.description)

    def close(self) -> None:
        """Release the target."""
        return None


class SqlBackend(Backend):
    """A SQL database: the queries of :class:`Backend` from ``largest`` and ``existing``.

    Subclasses set ``description`` (what the target is, credentials masked) and
    ``driver_error`` (the driver's base exception class), and may mask messages further in
    :meth:`_mask`.
    """

    description: str = ""
    driver_error: type[BaseException] = Exception

    def _mask(self, message: str) -> str:
        return message

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Turn a database error into one :class:`SinkError` sentence."""
        try:
            yield
        except self.driver_error as exc:
            text = str(exc).strip()
            first = text.splitlines()[0].rstrip(".") if text else type(exc).__name__
            raise SinkError(self._mask(f"Cannot {doing} in {self.description}: {first}.")) from None

    def largest(self, table: str, col: str) -> int:
        """The largest value of ``table.col`` (-1 when the table is empty or lacks ``col``)."""
        raise NotImplementedError

    def existing(self, table: str, col: str, ids: Iterable[int]) -> set[int]:
        """Those of ``ids`` found in ``table.col`` (none when the table lacks ``col``)."""
        raise NotImplementedError

    def max_id(self) -> int:
        return max(self.largest(t, col) for t, col in SEQUENCE_ID_COLUMNS.items())

    def max_person_id(self) -> int:
        return self.largest("person", "person_id")

    def has_vocabulary(self) -> bool:
        return self.largest("concept", "concept_id") >= 0

    def existing_persons(self, ids: list[int]) -> set[int]:
        return self.existing("person", "person_id", ids)

    def existing_concepts(self, ids: set[int]) -> set[int]:
        return self.existing("concept", "concept_id", ids)


# DuckDB writes NUMERIC as DECIMAL(18,3), which would round values: DOUBLE keeps them.
def _ddl_type(sql_type: str, engine: str) -> str:
    return "DOUBLE" if engine == "duckdb" and sql_type == "NUMERIC" else sql_type


def ddl(table: str, qualified: str, engine: str) -> str:
    """``CREATE TABLE IF NOT EXISTS`` of a CDM table for ``engine`` (duckdb or postgresql).

    >>> ddl("death", "cdm.death", "duckdb")[:64]
    'CREATE TABLE IF NOT EXISTS cdm.death (person_id BIGINT NOT NULL,'
    """
    cols = ", ".join(
        f"{c.name} {_ddl_type(c.type, engine)}{' NOT NULL' if c.required else ''}"
        for c in CDM_TABLES[table]
    )
    return f"CREATE TABLE IF NOT EXISTS {qualified} ({cols})"


def fit_columns(frame: pl.DataFrame, have: list[str], table: str) -> pl.DataFrame:
    """The frame with only the columns an existing table has (5.3 names where it uses them).

    >>> f = pl.DataFrame({"a": [1], "discharged_to_concept_id": [2], "z": [None]})
    >>> fit_columns(f, ["a", "discharge_to_concept_id"], "t").columns
    ['a', 'discharge_to_concept_id']
    """
    have_set = {h.lower() for h in have}
    renames = {
        new: old
        for new, old in _CDM53_NAMES.items()
        if new in frame.columns and new not in have_set and old in have_set
    }
    frame = frame.rename(renames)
    keep = [c for c in frame.columns if c in have_set]
    filled = [c for c in frame.columns if frame[c].null_count() < frame.height]
    dropped = [c for c in filled if c not in have_set]
    if dropped:
        raise SinkError(
            f"The existing OMOP table {table} lacks the column(s) {', '.join(dropped)} that "
            "this chunk fills; add them or write to a new schema, file or folder."
        )
    return frame.select(keep)


def write_cdm_csv(frame: pl.DataFrame, dest: Path | IO[bytes]) -> None:
    """Write ``frame`` as CSV with a header, dates ``YYYY-MM-DD`` and datetimes
    ``YYYY-MM-DD HH:MM:SS`` (with the fraction of a second where there is one).

    >>> import datetime as dt, io
    >>> buf = io.BytesIO()
    >>> times = [dt.datetime(2020, 1, 2, 3, 4), dt.datetime(2020, 1, 2, 3, 4, 5, 600)]
    >>> write_cdm_csv(pl.DataFrame({"t": times, "d": [dt.date(2020, 1, 2)] * 2}), buf)
    >>> buf.getvalue().decode().splitlines()
    ['t,d', '2020-01-02 03:04:00,2020-01-02', '2020-01-02 03:04:05.000600,2020-01-02']
    """
    frame.write_csv(dest, datetime_format=_DATETIME_FORMAT, date_format="%Y-%m-%d")

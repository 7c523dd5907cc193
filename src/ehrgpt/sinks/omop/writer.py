"""Append chunks of MEDS rows, as OMOP CDM 5.4 tables, to DuckDB, a folder or PostgreSQL.

:class:`OmopWriter` converts each chunk with :func:`~ehrgpt.sinks.omop.convert.meds_to_omop`,
continuing the target's id sequence, refuses person ids the target already has and ids its
id columns cannot hold, copies real ``concept`` rows into a target without a vocabulary, and
hands the chunk to its backend
(:mod:`~ehrgpt.sinks.omop.backends.duckdb`, :mod:`~ehrgpt.sinks.omop.backends.folder`,
:mod:`~ehrgpt.sinks.omop.backends.postgres`) to write atomically.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ehrgpt.errors import SinkError
from ehrgpt.sinks.omop.backends.base import Backend
from ehrgpt.sinks.omop.backends.duckdb import DuckDbBackend
from ehrgpt.sinks.omop.backends.folder import FileBackend
from ehrgpt.sinks.omop.backends.postgres import PostgresBackend
from ehrgpt.sinks.omop.concepts import concept_ids, concept_rows
from ehrgpt.sinks.omop.convert import meds_to_omop
from ehrgpt.sinks.omop.schema import (
    EHR_TYPE_CONCEPT,
    ID_COLUMNS,
    SEQUENCE_ID_COLUMNS,
    conform,
    integer_limit,
)

__all__ = ["IdLimit", "OmopWriteSummary", "OmopWriter", "resolve_format"]


@dataclass(frozen=True)
class IdLimit:
    """The largest id the narrowest id column of a kind (person or record ids) holds."""

    limit: int
    column: str
    type: str

    def check(self, largest: int, what: str, target: str) -> None:
        """Raise :class:`SinkError` when ``largest`` does not fit the column."""
        if largest > self.limit:
            raise SinkError(
                f"{what} would reach {largest:,}, above the {self.limit:,} that {self.column} "
                f"({self.type}) of {target} holds; pass a smaller --id-offset (or generate "
                "fewer patients), or write to a target whose id columns are bigint."
            )


@dataclass
class OmopWriteSummary:
    """What an :class:`OmopWriter` session wrote."""

    target: str
    fmt: str
    chunks: int
    rows: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)


def resolve_format(target: str | Path, fmt: str | None) -> tuple[str, str]:
    """(format, target) from a path or URL and an optional format name.

    >>> resolve_format("out/cdm.duckdb", None), resolve_format("out", "csv")
    (('duckdb', 'out/cdm.duckdb'), ('csv', 'out'))
    >>> resolve_format("x", "postgresql://h/db?schema=synth")
    ('postgresql', 'postgresql://h/db?schema=synth')
    """
    text = str(target)
    if fmt and fmt.startswith(("postgresql://", "postgres://")):
        return "postgresql", fmt
    if text.startswith(("postgresql://", "postgres://")):
        if fmt not in (None, "postgresql"):
            raise SinkError(f"A PostgreSQL URL cannot be written as {fmt!r}.")
        return "postgresql", text
    if fmt is None:
        fmt = "duckdb" if Path(text).suffix.lower() in (".duckdb", ".ddb", ".db") else "parquet"
    fmt = fmt.lower()
    if fmt not in ("duckdb", "parquet", "csv"):
        raise SinkError(
            f"Unknown OMOP output format {fmt!r}; use duckdb, parquet, csv or a postgresql:// URL."
        )
    return fmt, text


class OmopWriter:
    """Append chunks of MEDS rows, as OMOP CDM 5.4 tables, to a database or a folder.

    Args:
        target: a DuckDB file, a folder (parquet or CSV), or a ``postgresql://`` URL whose
            ``?schema=`` names the schema (created if missing; default ``public``).
        fmt: ``duckdb``, ``parquet``, ``csv`` or ``postgresql``; inferred when ``None``
            (URL -> postgresql, ``.duckdb``/``.ddb``/``.db`` -> duckdb, else parquet).
        codes: the codes metadata of the run (``meds/metadata/codes.parquet``).
        id_offset: ``person_id = subject_id + id_offset``; for synthetic patients use a range
            above the real ids that still fits the target's id columns (the official CDM 5.4
            DDL declares them 32-bit ``integer``).
        first_id: the first id of visits, events and observation periods (default
            ``id_offset``, and never 0, which OHDSI tools read as "none"); the writer starts
            above the largest id already in the target.
        concept_table: the real OMOP concept rows of the source (a run's
            ``meds/metadata/omop_concepts.parquet``), to map codes the metadata lacks and to
            copy concept rows from.
        write_concepts: when the target's ``concept`` table is empty, copy into it the rows of
            ``concept_table`` for every concept of ``codes`` and of the chunks. Rows are never
            made up, and a target that already holds a vocabulary gets none.
        add_keys: PostgreSQL only: add primary keys and the person / visit foreign keys at
            :meth:`close`.

    Every chunk is atomic: one transaction (DuckDB, PostgreSQL) or a set of files renamed into
    place and recorded in ``_ehrgpt_omop_writer.json`` (folders; on reopening, files of an
    unrecorded chunk are removed). Tables are created with CDM 5.4 types where missing;
    existing tables are appended to (only the columns they have).
    """

    def __init__(
        self,
        target: str | Path,
        *,
        fmt: str | None = None,
        codes: pl.DataFrame,
        id_offset: int,
        first_id: int | None = None,
        concept_table: pl.DataFrame | None = None,
        type_concept_id: int = EHR_TYPE_CONCEPT,
        write_concepts: bool = True,
        add_keys: bool = False,
    ) -> None:
        self.fmt, where = resolve_format(target, fmt)
        self.codes = codes
        self.id_offset = int(id_offset)
        self.concept_table = concept_table
        self.type_concept_id = type_concept_id
        self.write_concepts = write_concepts
        self.add_keys = add_keys
        self.notes: Counter[str] = Counter()
        self.rows: Counter[str] = Counter()
        self.chunks = 0
        backend: Backend
        if self.fmt == "postgresql":
            backend = PostgresBackend(where)
        elif self.fmt == "duckdb":
            backend = DuckDbBackend(Path(where))
        else:
            backend = FileBackend(Path(where), self.fmt)
        self._backend = backend
        self.target = backend.description
        self._closed = False
        try:
            start = self.id_offset if first_id is None else int(first_id)
            self.next_id = max(start, 1, backend.max_id() + 1)
            self.vocabulary_in_target = backend.has_vocabulary()
            self.limits = self._id_limits()
        except BaseException:
            backend.close()
            self._closed = True
            raise
        # Concepts are copied only into a target without a vocabulary, and only real rows.
        self._copy_concepts = (
            write_concepts and concept_table is not None and not self.vocabulary_in_target
        )

    def _id_limits(self) -> dict[str, IdLimit]:
        """The narrowest id column of each kind: ``person`` ids, ``record`` ids (the rest)."""
        limits: dict[str, IdLimit] = {}
        for (table, col), sql_type in self._backend.id_types().items():
            kind = "person" if col == "person_id" else "record"
            limit = integer_limit(sql_type)
            if limit <= 0:
                raise SinkError(
                    f"The column {table}.{col} of {self.target} is {sql_type}, which cannot hold "
                    "ids; give it an integer type, or write to a new schema, file or folder."
                )
            if kind not in limits or limit < limits[kind].limit:
                limits[kind] = IdLimit(limit, f"{table}.{col}", sql_type)
        return limits

    def max_person_id(self) -> int:
        """The largest person id in the target (-1 when it has none)."""
        return self._backend.max_person_id()

    def check_ids(self, last_person_id: int, last_record_id: int | None = None) -> None:
        """Refuse person ids up to ``last_person_id`` (and record ids up to ``last_record_id``)
        that the target's id columns cannot hold, before anything is written."""
        if "person" in self.limits:
            self.limits["person"].check(last_person_id, "Person ids", self.target)
        if "record" in self.limits:
            last = self.next_id if last_record_id is None else last_record_id
            self.limits["record"].check(last, "Visit and event ids", self.target)

    def person_ids(self, at_least: int) -> list[int]:
        """The person ids in the target from ``at_least`` up."""
        return self._backend.person_ids(at_least)

    def completed_subjects(self) -> set[int]:
        """Subjects (``person_id - id_offset``) already in the target at or above the offset."""
        return {p - self.id_offset for p in self._backend.person_ids(self.id_offset)}

    def write(self, frame: pl.DataFrame) -> dict[str, int]:
        """Convert a chunk of MEDS rows (whole subjects) and append it; rows per table."""
        tables = meds_to_omop(
            frame,
            self.codes,
            id_offset=self.id_offset,
            concept_table=self.concept_table,
            first_id=self.next_id,
            type_concept_id=self.type_concept_id,
        )
        counts = self.write_tables(tables)
        self.notes.update(tables.notes)
        return counts

    def write_tables(self, tables: Mapping[str, pl.DataFrame]) -> dict[str, int]:
        """Append CDM tables as one atomic chunk; rows per table.

        The tables should come from :func:`meds_to_omop` with ``first_id=self.next_id``, so that
        their ids continue the target's sequence (the writer does not renumber them).
        """
        if self._closed:
            raise SinkError(f"The OMOP writer of {self.target} is already closed.")
        out = {name: conform(name, frame) for name, frame in tables.items()}
        self._check_chunk_ids(out)
        if "person" in out and out["person"].height:
            ids = out["person"]["person_id"].to_list()
            if len(set(ids)) != len(ids):
                raise SinkError("A chunk for the OMOP writer holds a person id twice.")
            clash = self._backend.existing_persons(ids)
            if clash:
                raise SinkError(
                    f"{len(clash)} person id(s) of this chunk (e.g. {min(clash)}) already exist "
                    f"in {self.target}; pass an id_offset above the largest person id there "
                    f"({self.max_person_id()}) and skip completed_subjects() when resuming."
                )
        if self._copy_concepts:
            self._add_concepts(out)
        ids = [
            int(out[t][col].max())  # type: ignore[arg-type]
            for t, col in SEQUENCE_ID_COLUMNS.items()
            if t in out and out[t].height
        ]
        next_id = getattr(tables, "next_id", max(ids, default=self.next_id - 1) + 1)
        self.next_id = max(self.next_id, int(next_id))
        self._backend.write_chunk(out, self.next_id)
        self.chunks += 1
        counts = {name: frame.height for name, frame in out.items()}
        self.rows.update(counts)
        return counts

    def _check_chunk_ids(self, out: Mapping[str, pl.DataFrame]) -> None:
        """Refuse a chunk with an id of 0 or less, or one its target column cannot hold."""
        for table, frame in out.items():
            for col in ID_COLUMNS.get(table, ()):
                if not frame.height or frame[col].null_count() == frame.height:
                    continue
                low, high = int(frame[col].min()), int(frame[col].max())  # type: ignore[arg-type]
                if low < 1:
                    raise SinkError(
                        f"A chunk for {self.target} holds {table}.{col} = {low}; ids start at 1 "
                        "(OHDSI tools read 0 as none): pass a positive id_offset."
                    )
                kind = "person" if col == "person_id" else "record"
                if kind in self.limits:
                    what = "Person ids" if kind == "person" else "Visit and event ids"
                    self.limits[kind].check(high, what, self.target)

    def _add_concepts(self, out: dict[str, pl.DataFrame]) -> None:
        """Add to ``out`` the real concept rows the target lacks: on the first chunk, those of
        every concept of the codes metadata too, so that a resumed session needs none."""
        used = concept_ids(out)
        if not self.chunks:
            known = (
                self.codes.get_column("omop_concept_id")
                if "omop_concept_id" in (self.codes.columns)
                else pl.Series([], dtype=pl.Int64)
            )
            used |= {int(i) for i in known.drop_nulls().to_list() if i}
        new = used - self._backend.existing_concepts(used)
        rows, n_incomplete = concept_rows(new, self.concept_table)
        if n_incomplete:
            self.notes["source concept rows lacking a NOT NULL column (not copied)"] += n_incomplete
        if rows.height:
            out["concept"] = pl.concat([out["concept"], rows]) if "concept" in out else rows

    def close(self) -> OmopWriteSummary:
        """Finish: add keys (PostgreSQL, when asked) and release the target."""
        if not self._closed:
            try:
                if self.add_keys:
                    self._backend.add_keys()
            finally:
                self._backend.close()
                self._closed = True
        return OmopWriteSummary(
            self.target, self.fmt, self.chunks, dict(self.rows), dict(sorted(self.notes.items()))
        )

    def __enter__(self) -> OmopWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._backend.close()
            self._closed = True

"""Append chunks of MEDS rows, as OMOP CDM 5.4 tables, to DuckDB, a folder or PostgreSQL.

:class:`OmopWriter` converts each chunk with :func:`~ehrgpt.sinks.omop.convert.meds_to_omop`,
continuing the target's id sequence, refuses person ids the target already has, adds the
``concept`` rows the chunk uses that the target lacks, and hands the chunk to its backend
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
    SEQUENCE_ID_COLUMNS,
    SYNTHETIC_ID_OFFSET,
    conform,
)

__all__ = ["OmopWriteSummary", "OmopWriter", "resolve_format"]


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
        id_offset: base of the ids (see :mod:`ehrgpt.sinks.omop.convert`); for synthetic
            patients use a range above the real maximum id, e.g. :data:`SYNTHETIC_ID_OFFSET`.
        concept_table: an OMOP concept table, to map codes the metadata lacks and to copy
            concept rows from.
        write_concepts: add to the target's ``concept`` table the concepts a chunk uses that
            it lacks (made from ``concept_table`` or from ``codes``).
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
        self.next_id = max(self.id_offset, backend.max_id() + 1)
        self._closed = False

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
        if "person" in out and out["person"].height:
            ids = out["person"]["person_id"].to_list()
            if len(set(ids)) != len(ids):
                raise SinkError("A chunk for the OMOP writer holds a person id twice.")
            clash = self._backend.existing_persons(ids)
            if clash:
                raise SinkError(
                    f"{len(clash)} person id(s) of this chunk (e.g. {min(clash)}) already exist "
                    f"in {self.target}; pass an id_offset above the largest real person id "
                    f"(e.g. {SYNTHETIC_ID_OFFSET}) and skip completed_subjects() when resuming."
                )
        if self.write_concepts:
            used = concept_ids(out)
            new = used - self._backend.existing_concepts(used)
            if new:
                rows = concept_rows(new, self.codes, self.concept_table)
                if rows.height:
                    out["concept"] = pl.concat([out["concept"], rows]) if "concept" in out else rows
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

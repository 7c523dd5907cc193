"""An OMOP target in a folder: ``table/part-NNN.parquet`` (or ``.csv``), one file a table a chunk.

A chunk's files are written under temporary names, renamed into place, and then recorded in
``_ehrgpt_omop_writer.json``; reopening the folder removes the files of an unrecorded chunk.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import polars as pl

from ehrgpt.errors import SinkError
from ehrgpt.sinks.omop.backends.base import Backend, write_cdm_csv
from ehrgpt.util import atomic

log = logging.getLogger(__name__)

__all__ = ["FileBackend"]

_MANIFEST = "_ehrgpt_omop_writer.json"
_PART = re.compile(r"^part-(\d+)\.(parquet|csv)$")


class FileBackend(Backend):
    """A folder with one sub-folder per table and one file per table per chunk."""

    def __init__(self, folder: Path, fmt: str) -> None:
        self.folder, self.fmt = folder, fmt
        self.description = f"{fmt} folder {folder}"
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / _MANIFEST
        if manifest.exists():
            self.state = json.loads(manifest.read_text())
            if self.state.get("format") != fmt:
                raise SinkError(
                    f"{folder} holds OMOP tables written as {self.state.get('format')}, not "
                    f"{fmt}; write {fmt} to another folder."
                )
        else:
            if any(folder.iterdir()):
                raise SinkError(
                    f"The folder {folder} is not empty and was not written by ehrgpt's OMOP "
                    "writer; give a new or empty folder."
                )
            self.state = {"format": fmt, "chunks": 0, "next_id": -1}
        self._remove_unrecorded()
        self.persons = set(self._read_ints("person", "person_id"))
        self.concepts = set(self._read_ints("concept", "concept_id"))

    def _remove_unrecorded(self) -> None:
        """Delete temporary files and the files of a chunk the manifest does not record."""
        for tmp in self.folder.glob(f".{_MANIFEST}.tmp*"):
            tmp.unlink()
        for table_dir in (p for p in self.folder.iterdir() if p.is_dir()):
            for f in table_dir.iterdir():
                m = _PART.match(f.name)
                if f.name.startswith(".") or (m and int(m.group(1)) >= self.state["chunks"]):
                    log.warning("Removing %s, left by an interrupted OMOP writer.", f)
                    f.unlink()

    def _files(self, table: str) -> list[Path]:
        folder = self.folder / table
        return sorted(p for p in folder.glob(f"part-*.{self.fmt}") if _PART.match(p.name))

    def _read_ints(self, table: str, col: str) -> list[int]:
        files = self._files(table)
        if not files:
            return []
        if self.fmt == "parquet":
            frame = pl.read_parquet(files, columns=[col])
        else:
            frame = pl.concat(
                [pl.read_csv(f, columns=[col], schema_overrides={col: pl.Int64}) for f in files]
            )
        return frame[col].drop_nulls().to_list()

    def max_id(self) -> int:
        return int(self.state.get("next_id", -1)) - 1 if self.state["chunks"] else -1

    def max_person_id(self) -> int:
        return max(self.persons, default=-1)

    def has_vocabulary(self) -> bool:
        return bool(self.concepts)

    def person_ids(self, at_least: int) -> list[int]:
        return [p for p in self.persons if p >= at_least]

    def existing_persons(self, ids: list[int]) -> set[int]:
        return self.persons.intersection(ids)

    def existing_concepts(self, ids: set[int]) -> set[int]:
        return self.concepts & ids

    def write_chunk(self, tables: Mapping[str, pl.DataFrame], next_id: int) -> None:
        n = int(self.state["chunks"])
        staged: list[tuple[Path, Path]] = []
        try:
            for table, frame in tables.items():
                if not frame.height and n:
                    continue  # empty tables get a file in the first chunk only
                folder = self.folder / table
                folder.mkdir(exist_ok=True)
                final = folder / f"part-{n:03d}.{self.fmt}"
                tmp = atomic.tmp_name(final)
                if self.fmt == "parquet":
                    frame.write_parquet(tmp)
                else:
                    write_cdm_csv(frame, tmp)
                staged.append((tmp, final))
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, final in staged:
            os.replace(tmp, final)
        state = {**self.state, "chunks": n + 1, "next_id": int(next_id)}
        atomic.write_json(self.folder / _MANIFEST, state)
        self.state = state
        if "person" in tables:
            self.persons.update(tables["person"]["person_id"].to_list())
        if "concept" in tables:
            self.concepts.update(tables["concept"]["concept_id"].to_list())

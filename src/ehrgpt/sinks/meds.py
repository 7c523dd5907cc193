"""A MEDS 0.4 sink: chunks of MEDS rows streamed into ``data/{split}/{n}.parquet`` shards.

:class:`MedsWriter` buffers whole subjects until a shard holds about ``shard_rows`` rows, then
writes it sorted by subject and time under a temporary name and renames it into place, so a
shard file either exists complete or not at all. ``close()`` writes the metadata
(``codes.parquet`` restricted to the codes the shards use, ``subject_splits.parquet``,
``dataset.json``) and checks every shard and metadata file against the ``meds`` schemas.

An interrupted run (no ``close()``) leaves only complete shards; reopening the folder removes
temporary leftovers and :meth:`MedsWriter.completed_subjects` says which subjects are done, so
a generator can skip them and carry on::

    writer = MedsWriter(out, codes=codes, dataset_name="synthetic")
    done = writer.completed_subjects()
    for chunk in chunks_of_new_subjects(skip=done):
        writer.write(chunk)
    writer.close()
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import meds
import polars as pl
import pyarrow.parquet as pq

from ehrgpt.errors import SinkError
from ehrgpt.meds_format import columns as mc
from ehrgpt.meds_format.dataset import SPLITS, check_shard, write_metadata
from ehrgpt.sources.gather import sort_events
from ehrgpt.util import atomic

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SHARD_ROWS",
    "MedsSinkResult",
    "MedsWriter",
    "as_event_frame",
    "column_or_null",
    "renumber_visits",
    "used_codes",
]

#: Rows a shard holds before it is written (whole subjects, so a shard may hold a few more).
DEFAULT_SHARD_ROWS = 500_000
_SHARD_NAME = re.compile(r"^(\d+)\.parquet$")
_REQUIRED = (mc.SUBJECT_ID, mc.TIME, mc.CODE)


def as_event_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """MEDS rows in ehrgpt's event schema: missing extra columns become null, types are cast.

    ``subject_id``, ``time`` and ``code`` must be present; other columns are dropped.

    >>> f = as_event_frame(pl.DataFrame({"subject_id": [1], "time": [None], "code": ["X/1"]}))
    >>> f.columns == list(mc.EVENT_SCHEMA.names), f.schema["time"], f.schema["numeric_value"]
    (True, Datetime(time_unit='us', time_zone=None), Float32)
    """
    missing = [c for c in _REQUIRED if c not in frame.columns]
    if missing:
        raise SinkError(
            f"MEDS rows given to a sink lack the column(s) {', '.join(missing)}; a MEDS event "
            "table needs subject_id, time and code."
        )
    schema = pl.Schema(mc.EVENT_SCHEMA)
    return frame.select([column_or_null(frame, name, dtype) for name, dtype in schema.items()])


def column_or_null(frame: pl.DataFrame, name: str, dtype: pl.DataType) -> pl.Expr:
    """Column ``name`` of ``frame`` cast to ``dtype``, or nulls of that type when it lacks it.

    >>> f = pl.DataFrame({"a": [1]})
    >>> f.select(column_or_null(f, "a", pl.String()), column_or_null(f, "b", pl.Int8())).rows()
    [('1', None)]
    """
    return (pl.col(name).cast(dtype) if name in frame.columns else pl.lit(None, dtype)).alias(name)


@dataclass
class MedsSinkResult:
    """What a :class:`MedsWriter` folder holds after ``close()``."""

    meds_dir: Path
    shards: list[Path]
    n_subjects: int
    n_rows: int
    subjects_per_split: dict[str, int] = field(default_factory=dict)


class MedsWriter:
    """Stream chunks of MEDS rows into a MEDS 0.4 folder, shard by shard, atomically.

    Args:
        out_dir: the MEDS folder (created if missing; an existing one written by a previous,
            possibly interrupted, writer is continued).
        codes: code metadata (a run's ``meds/metadata/codes.parquet``); ``close()`` keeps the
            rows of the codes the shards use, and adds the used codes it lacks.
        dataset_name: ``dataset_name`` in ``dataset.json``.
        shard_rows: rows buffered before a shard is written.
        default_split: split of subjects written without one (``train`` for synthetic data).

    Each chunk passed to :meth:`write` must hold all rows of its subjects; a subject seen
    before (in this session or in a completed shard) is refused.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        codes: pl.DataFrame,
        dataset_name: str,
        shard_rows: int = DEFAULT_SHARD_ROWS,
        default_split: str = meds.train_split,
    ) -> None:
        if shard_rows < 1:
            raise SinkError(f"shard_rows must be at least 1 (got {shard_rows}).")
        self.meds_dir = Path(out_dir)
        self.codes = codes
        self.dataset_name = dataset_name
        self.shard_rows = int(shard_rows)
        self.default_split = _check_split(default_split)
        self.data_dir = self.meds_dir / meds.data_subdirectory
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        self._done = self._read_completed()
        self._buffer: dict[str, list[pl.DataFrame]] = {}
        self._buffered_rows: dict[str, int] = {}
        self._buffered_subjects: set[int] = set()
        self._closed = False

    # -- resume ---------------------------------------------------------------------------
    def _remove_leftovers(self) -> None:
        """Delete temporary files an interrupted writer left behind (never complete shards)."""
        for tmp in self.meds_dir.rglob(".*.tmp-*"):
            if tmp.is_file():
                log.warning("Removing %s, left by an interrupted MEDS writer.", tmp)
                tmp.unlink()

    def _shards(self) -> list[Path]:
        return sorted(
            (p for p in self.data_dir.glob("*/*.parquet") if _SHARD_NAME.match(p.name)),
            key=lambda p: (p.parent.name, int(p.stem)),
        )

    def _read_completed(self) -> dict[int, str]:
        done: dict[int, str] = {}
        for shard in self._shards():
            ids = pq.read_table(shard, columns=[mc.SUBJECT_ID]).column(0).unique().to_pylist()
            done.update(dict.fromkeys(ids, shard.parent.name))
        return done

    def completed_subjects(self) -> set[int]:
        """Subjects whose rows are in complete shard files (written by this or an earlier run)."""
        return set(self._done)

    # -- writing --------------------------------------------------------------------------
    def write(self, frame: pl.DataFrame, *, split: str | pl.DataFrame | None = None) -> list[Path]:
        """Add a chunk of MEDS rows (whole subjects); returns the shards written by this call.

        ``split`` is one split name for the whole chunk, or a frame ``subject_id, split``
        (subjects it lacks go to the default split), or ``None`` for the default split.
        """
        self._check_open()
        rows = as_event_frame(frame)
        if rows.is_empty():
            return []
        if rows[mc.SUBJECT_ID].null_count():
            raise SinkError("MEDS rows given to the MEDS writer have a null subject_id.")
        ids = rows[mc.SUBJECT_ID].unique()
        seen = [i for i in ids.to_list() if i in self._done or i in self._buffered_subjects]
        if seen:
            raise SinkError(
                f"{len(seen)} subject(s) of this chunk (e.g. {min(seen)}) were already written to "
                f"{self.meds_dir}; give each subject's rows in one chunk, and skip "
                "completed_subjects() when resuming."
            )
        rows = rows.with_columns(_split_column(rows, split, self.default_split))
        written: list[Path] = []
        for (name,), part in rows.partition_by("_split", as_dict=True).items():
            self._buffer.setdefault(str(name), []).append(part.drop("_split"))
            self._buffered_rows[str(name)] = self._buffered_rows.get(str(name), 0) + part.height
            if self._buffered_rows[str(name)] >= self.shard_rows:
                written.append(self._flush_split(str(name)))
        self._buffered_subjects.update(ids.to_list())
        return written

    def flush(self) -> list[Path]:
        """Write every buffered row now (one shard per split with buffered rows)."""
        self._check_open()
        return [self._flush_split(s) for s in sorted(self._buffer)]

    def _flush_split(self, split: str) -> Path:
        frame = pl.concat(self._buffer.pop(split))
        self._buffered_rows.pop(split, None)
        folder = self.data_dir / split
        taken = [int(p.stem) for p in folder.glob("*.parquet") if _SHARD_NAME.match(p.name)]
        path = folder / f"{max(taken, default=-1) + 1}.parquet"
        atomic.write_parquet(path, sort_events(frame).to_arrow().cast(mc.EVENT_SCHEMA))
        ids = frame[mc.SUBJECT_ID].unique().to_list()
        self._done.update(dict.fromkeys(ids, split))
        self._buffered_subjects.difference_update(ids)
        return path

    def close(self) -> MedsSinkResult:
        """Write what is buffered, then the metadata; check everything against MEDS 0.4."""
        self._check_open()
        self.flush()
        shards = self._shards()
        for shard in shards:
            check_shard(shard)
        used = used_codes(pl.scan_parquet(shards)).collect()
        codes = used.join(self.codes.unique("code", keep="first"), on="code", how="left")
        splits = pl.DataFrame(
            {"subject_id": list(self._done), "split": list(self._done.values())},
            schema={"subject_id": pl.Int64, "split": pl.String},
        ).sort("subject_id")
        write_metadata(
            self.meds_dir,
            dataset_name=self.dataset_name,
            codes=codes,
            splits=splits,
            extra_columns=mc.EXTRA_COLUMNS,
        )
        _check_metadata(self.meds_dir)
        self._closed = True
        n_rows = sum(pq.read_metadata(s).num_rows for s in shards)
        per_split = dict(splits.group_by("split").len().sort("split").iter_rows())
        return MedsSinkResult(self.meds_dir, shards, splits.height, n_rows, per_split)

    def _check_open(self) -> None:
        if self._closed:
            raise SinkError(f"The MEDS writer of {self.meds_dir} is already closed.")

    def __enter__(self) -> MedsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._closed:
            self.close()


def _check_split(name: str) -> str:
    if not name or "/" in name or name.startswith("."):
        raise SinkError(f"{name!r} cannot be a MEDS split name (use e.g. {', '.join(SPLITS)}).")
    return name


def _split_column(rows: pl.DataFrame, split: str | pl.DataFrame | None, default: str) -> pl.Expr:
    """The ``_split`` of each row: one name, a per-subject frame, or the default.

    >>> rows = pl.DataFrame({"subject_id": [1, 2, 2]})
    >>> table = pl.DataFrame({"subject_id": [2], "split": ["held_out"]})
    >>> rows.with_columns(_split_column(rows, table, "train"))["_split"].to_list()
    ['train', 'held_out', 'held_out']
    """
    if split is None:
        return pl.lit(default).alias("_split")
    if isinstance(split, str):
        return pl.lit(_check_split(split)).alias("_split")
    for name in split["split"].unique().drop_nulls().to_list():
        _check_split(name)
    mapping = dict(split.select("subject_id", "split").iter_rows())
    return (
        pl.col(mc.SUBJECT_ID)
        .replace_strict(mapping, default=default, return_dtype=pl.String)
        .fill_null(default)
        .alias("_split")
    )


def renumber_visits(frame: pl.DataFrame, start: int) -> tuple[pl.DataFrame, int]:
    """(rows, next): the rows with visit ids numbered from ``start`` across subjects (in order
    of subject and visit start), as in prepared MEDS where a visit id names one visit of the
    whole dataset; ``next`` is the first id a following chunk may use.

    >>> import datetime as dt
    >>> d = dt.datetime
    >>> rows = pl.DataFrame({"subject_id": [7, 7, 7, 3, 3], "visit_id": [1, 1, 2, 1, None],
    ...     "time": [d(2000, 1, 1), d(2000, 1, 1), d(2001, 1, 1), d(1990, 1, 1), None]})
    >>> out, nxt = renumber_visits(rows, 100)
    >>> out["visit_id"].to_list(), nxt
    ([101, 101, 102, 100, None], 103)
    """
    key = [mc.SUBJECT_ID, mc.VISIT_ID]
    visits = (
        frame.filter(pl.col(mc.VISIT_ID).is_not_null())
        .group_by(key)
        .agg(pl.col(mc.TIME).min().alias("_start"))
        .sort(mc.SUBJECT_ID, "_start", mc.VISIT_ID, nulls_last=True)
        .with_columns((pl.int_range(pl.len(), dtype=pl.Int64) + start).alias("_new"))
    )
    out = (
        frame.join(
            visits.drop("_start"), on=key, how="left", nulls_equal=False, maintain_order="left"
        )
        .with_columns(pl.col("_new").alias(mc.VISIT_ID))
        .drop("_new")
    )
    return out, start + visits.height


def used_codes(rows: pl.LazyFrame) -> pl.LazyFrame:
    """Every code, unit and categorical value the rows use, once, sorted (column ``code``).

    >>> rows = pl.LazyFrame({"code": ["B", "A"], "unit": ["U", None], "value_code": ["A", None]})
    >>> used_codes(rows).collect()["code"].to_list()
    ['A', 'B', 'U']
    """
    frame = rows.select(mc.CODE, mc.UNIT, mc.VALUE_CODE)
    return (
        pl.concat(
            [
                frame.select(pl.col(c).alias("code")).drop_nulls()
                for c in (mc.CODE, mc.UNIT, mc.VALUE_CODE)
            ]
        )
        .unique()
        .sort("code")
    )


def _check_metadata(meds_dir: Path) -> None:
    """Read the metadata back and validate it with the ``meds`` schemas."""
    meta = meds_dir / "metadata"
    try:
        meds.CodeMetadataSchema.validate(pq.read_table(meta / "codes.parquet"))
        meds.SubjectSplitSchema.validate(pq.read_table(meta / "subject_splits.parquet"))
    except Exception as exc:  # flexible_schema raises its own error types
        raise SinkError(f"The MEDS metadata in {meta} breaks the MEDS 0.4 schema: {exc}") from None

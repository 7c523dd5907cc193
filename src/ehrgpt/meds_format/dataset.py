"""Writing and checking the parts of a MEDS 0.4 dataset folder: splits, metadata, shard layout.

Layout (MEDS 0.4)::

    meds/data/{train,tuning,held_out}/{shard}.parquet
    meds/metadata/dataset.json
    meds/metadata/codes.parquet            code, description, parent_codes (+ omop columns)
    meds/metadata/subject_splits.parquet   subject_id, split
    meds/metadata/omop_concepts.parquet    (OMOP sources only) the source's concept rows of
                                           the codes, copied into synthetic OMOP output
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from pathlib import Path

import meds
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ehrgpt import __version__
from ehrgpt.errors import SourceError
from ehrgpt.util import atomic

#: The OMOP concept rows of a run's codes, as the source's ``concept`` table holds them.
OMOP_CONCEPTS_FILE = "omop_concepts.parquet"
SPLITS = (meds.train_split, meds.tuning_split, meds.held_out_split)
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def assign_splits(
    subject_ids: Iterable[int] | np.ndarray,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> pl.DataFrame:
    """Assign each subject to train / tuning / held_out, reproducibly for a seed.

    The assignment depends only on the set of ids and the seed, not on their order.

    >>> df = assign_splits(range(10), seed=1)
    >>> df.group_by("split").len().sort("split").rows()
    [('held_out', 1), ('train', 8), ('tuning', 1)]
    >>> assign_splits([3, 1, 2], seed=1).equals(assign_splits([2, 3, 1], seed=1))
    True
    """
    ids = np.unique(
        np.asarray(
            list(subject_ids) if not isinstance(subject_ids, np.ndarray) else subject_ids,
            dtype=np.int64,
        )
    )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    n_train = round(fractions[0] * len(ids))
    n_tuning = round(fractions[1] * len(ids))
    split = np.empty(len(ids), dtype=object)
    split[order[:n_train]] = meds.train_split
    split[order[n_train : n_train + n_tuning]] = meds.tuning_split
    split[order[n_train + n_tuning :]] = meds.held_out_split
    return pl.DataFrame(
        {"subject_id": ids, "split": split.astype(str)},
        schema={"subject_id": pl.Int64, "split": pl.String},
    )


def shard_assignment(splits: pl.DataFrame, shard_size: int) -> pl.DataFrame:
    """Add a ``shard`` column: consecutive blocks of ``shard_size`` subjects per split.

    >>> s = pl.DataFrame({"subject_id": [5, 1, 2, 9], "split": ["train"] * 3 + ["tuning"]})
    >>> shard_assignment(s, 2).sort("subject_id").rows()
    [(1, 'train', 0), (2, 'train', 0), (5, 'train', 1), (9, 'tuning', 0)]
    """
    return splits.sort("subject_id").with_columns(
        (pl.int_range(pl.len()).over("split") // shard_size).cast(pl.Int32).alias("shard")
    )


def write_metadata(
    meds_dir: Path,
    *,
    dataset_name: str,
    codes: pl.DataFrame,
    splits: pl.DataFrame,
    extra_columns: Iterable[str] = (),
) -> None:
    """Write dataset.json, codes.parquet and subject_splits.parquet, each checked by ``meds``.

    ``codes`` needs ``code`` and may hold ``description``, ``parent_codes`` and extra columns.
    """
    meta_dir = meds_dir / "metadata"
    meta_dir.mkdir(parents=True, exist_ok=True)
    dataset = {
        "dataset_name": dataset_name,
        "dataset_version": dt.date.today().isoformat(),
        "etl_name": "ehrgpt",
        "etl_version": __version__,
        "meds_version": "0.4.1",
        "created_at": dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat(),
        "other_extension_columns": list(extra_columns),
    }
    meds.DatasetMetadataSchema.validate(dataset)
    atomic.write_json(meta_dir / "dataset.json", dataset, indent=2)

    if "description" not in codes.columns:
        codes = codes.with_columns(pl.lit(None, pl.String).alias("description"))
    if "parent_codes" not in codes.columns:
        codes = codes.with_columns(pl.lit(None, pl.List(pl.String)).alias("parent_codes"))
    first = ["code", "description", "parent_codes"]
    codes = codes.select(first + [c for c in codes.columns if c not in first]).sort("code")
    codes_table = meds.CodeMetadataSchema.align(codes.to_arrow())
    atomic.write_parquet(meta_dir / "codes.parquet", codes_table)
    atomic.write_parquet(
        meta_dir / "subject_splits.parquet",
        meds.SubjectSplitSchema.align(splits.select("subject_id", "split").to_arrow()),
    )


def meds_folder(path: Path) -> Path:
    """The MEDS folder of a prepared run (``RUN/meds``), or ``path`` itself when it is one
    (``ehrgpt generate`` output's ``meds/``, any MEDS dataset).

    >>> import tempfile
    >>> run = Path(tempfile.mkdtemp()); (run / "meds" / "data").mkdir(parents=True)
    >>> meds_folder(run) == run / "meds", meds_folder(run / "meds") == run / "meds"
    (True, True)
    """
    path = Path(path)
    return path / "meds" if (path / "meds" / "data").is_dir() else path


def data_shards(meds_dir: Path) -> list[Path]:
    """All data shards of a MEDS folder, in a stable order.

    Raises SourceError if there are none.
    """
    shards = sorted((meds_dir / "data").rglob("*.parquet"))
    if not shards:
        raise SourceError(f"The MEDS folder {meds_dir} has no data/**/*.parquet shards.")
    return shards


#: Core columns whose string width or timestamp unit a writer may choose freely (polars and
#: pandas write ``large_string`` and ``timestamp[ns]``); ingestion casts them anyway.
_FLEXIBLE_TYPES = {
    "time": pa.timestamp("us"),
    "code": pa.string(),
    "text_value": pa.large_string(),
}


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _normalise_widths(schema: pa.Schema) -> pa.Schema:
    """The schema with string widths and timestamp units of core columns as MEDS spells them.

    >>> s = pa.schema([("code", pa.large_string()), ("time", pa.timestamp("ns"))])
    >>> _normalise_widths(s).types
    [DataType(string), TimestampType(timestamp[us])]
    >>> _normalise_widths(pa.schema([("code", pa.int64())])).types
    [DataType(int64)]
    """
    fields = []
    for f in schema:
        want = _FLEXIBLE_TYPES.get(f.name)
        if want is not None and (
            (_is_text(f.type) and _is_text(want))
            or (pa.types.is_timestamp(f.type) and f.type.tz is None and pa.types.is_timestamp(want))
        ):
            f = f.with_type(want)
        fields.append(f)
    return pa.schema(fields, metadata=schema.metadata)


def check_shard(path: Path) -> None:
    """Check one data shard against the MEDS 0.4 data schema (types, required columns).

    String widths and timestamp units of ``code``, ``text_value`` and ``time`` may differ from
    the schema's (any arrow string type, any timezone-free timestamp unit). Raises SourceError
    naming the file and what is wrong.
    """
    try:
        schema = _normalise_widths(pq.read_schema(path))
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"The MEDS shard {path} cannot be read as parquet: {exc}") from None
    try:
        meds.DataSchema.validate(schema)
    except Exception as exc:  # flexible_schema raises its own error types
        raise SourceError(f"The MEDS shard {path} breaks the MEDS 0.4 data schema: {exc}") from None

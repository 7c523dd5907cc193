"""Count features (EHRSHOT's count baseline) over the same leakage-safe history cut.

For each label row, each code of its history (rows at or before the prediction time, static
rows included, see :func:`ehrgpt.tasks.history.cut_rows`) is counted in time buckets that end
at the prediction time: the last 30 days, the last 365 days, and all time; plus the age in
years at the prediction time. The vocabulary is the codes seen in the training split's
histories. Features are a sparse CSR matrix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from ehrgpt.tasks.history import cut_rows, plan_chunks

#: Buckets: name -> look-back in days (None = all time).
BUCKETS = {"30d": 30, "365d": 365, "all": None}
AGE = "AGE_YEARS"


def bucket_counts(cut: pl.DataFrame, times: pl.DataFrame) -> pl.DataFrame:
    """Long counts ``sample_id, feature, count`` of a :func:`cut_rows` frame.

    ``times`` maps ``sample_id`` to ``prediction_time``.

    >>> import datetime as dt
    >>> cut = pl.DataFrame({"subject_id": [0, 0, 0], "code": ["G/F", "A", "A"],
    ...     "time": [None, dt.datetime(2020, 1, 1), dt.datetime(2020, 12, 20)]})
    >>> times = pl.DataFrame({"sample_id": [0], "prediction_time": [dt.datetime(2021, 1, 1)]})
    >>> bucket_counts(cut, times).sort("feature").rows()
    [(0, 'A@30d', 1), (0, 'A@365d', 1), (0, 'A@all', 2), (0, 'G/F@all', 1)]
    """
    rows = (
        cut.rename({"subject_id": "sample_id"})
        .join(times, on="sample_id")
        .with_columns((pl.col("prediction_time") - pl.col("time")).dt.total_days().alias("ago"))
    )
    parts = []
    for name, days in BUCKETS.items():
        keep = rows if days is None else rows.filter(pl.col("ago") <= days)
        parts.append(
            keep.group_by("sample_id", "code")
            .len("count")
            .select("sample_id", (pl.col("code") + "@" + name).alias("feature"), "count")
        )
    return pl.concat(parts).cast({"count": pl.Int64})


def ages(cut: pl.DataFrame, times: pl.DataFrame) -> pl.DataFrame:
    """``sample_id, feature, count`` rows holding the age in years at the prediction time."""
    return (
        cut.rename({"subject_id": "sample_id"})
        .filter(pl.col("code") == "MEDS_BIRTH")
        .group_by("sample_id")
        .agg(pl.col("time").min().alias("birth"))
        .join(times, on="sample_id")
        .select(
            "sample_id",
            pl.lit(AGE).alias("feature"),
            ((pl.col("prediction_time") - pl.col("birth")).dt.total_days() // 365).alias("count"),
        )
        .cast({"count": pl.Int64})
    )


def count_features(
    run_dir: Path, labels: pl.DataFrame, *, vocab: list[str] | None = None, chunk_size: int = 2048
) -> tuple[sp.csr_matrix, list[str]]:
    """CSR [labels, features] of bucketed code counts and age, and the feature names.

    ``labels`` has ``sample_id`` (0..N-1), ``subject_id``, ``prediction_time`` and ``split``;
    without ``vocab`` the features are those seen in the ``train`` rows.
    """
    parts = []
    cache: dict[Path, pl.DataFrame] = {}
    for shard, part in plan_chunks(run_dir, labels, chunk_size):
        if shard not in cache:
            cache.clear()
            cache[shard] = pl.read_parquet(shard, columns=["subject_id", "time", "code", "end"])
        meds = cache[shard].filter(
            pl.col("subject_id").is_in(part["subject_id"].unique().implode())
        )
        cut = cut_rows(meds, part).select("subject_id", "time", "code")
        times = part.select("sample_id", "prediction_time")
        parts += [bucket_counts(cut, times), ages(cut, times)]
    long = pl.concat(parts)
    if vocab is None:
        train = labels.filter(pl.col("split") == "train")["sample_id"].implode()
        vocab = sorted(long.filter(pl.col("sample_id").is_in(train))["feature"].unique())
    index = pl.DataFrame({"feature": vocab, "col": np.arange(len(vocab))})
    long = long.join(index, on="feature", how="inner")
    matrix = sp.csr_matrix(
        (
            long["count"].to_numpy().astype(np.float32),
            (long["sample_id"].to_numpy(), long["col"].to_numpy()),
        ),
        shape=(labels.height, len(vocab)),
    )
    return matrix, list(vocab)

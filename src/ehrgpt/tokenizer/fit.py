"""Fitting a tokenizer on the training shards: patient counts per code, value samples.

Only codes that can stand in a timeline are counted: timed codes, and the static gender and
race codes of the demographic prompt. Other static codes (``ETHNICITY/...``, null time in
MEDS) have no place in a visit, so they never enter the vocabulary (encoding counts them).

>>> import polars as pl
>>> f = pl.DataFrame({"subject_id": [1, 1, 2, 2, 2], "code": ["A", "A", "A", "ETHNICITY/1",
...                   "GENDER/8507"], "value_code": [None, "V", None, None, None],
...                   "time": [0, 1, 2, None, None]})
>>> sorted(patient_code_counts(f).rows())
[('A', 2), ('GENDER/8507', 1), ('VAL:V', 1)]
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ehrgpt.meds_format import columns as mc
from ehrgpt.tokenizer.values import fit_value_bins, sample_values
from ehrgpt.tokenizer.vocab import VALUE_PREFIX, EhrTokenizer
from ehrgpt.util.progress import track


def patient_code_counts(frame: pl.DataFrame) -> pl.DataFrame:
    """Patients per code (each code counted once per patient), categorical values included."""
    code = pl.col("code").str
    prompt = code.starts_with(mc.GENDER_PREFIX) | code.starts_with(mc.RACE_PREFIX)
    in_timeline = pl.col("time").is_not_null() | prompt
    codes = frame.filter(
        in_timeline & ~pl.col("code").is_in([mc.BIRTH_CODE, mc.DEATH_CODE])
    ).select("subject_id", "code")
    if "value_code" in frame.columns:
        values = frame.filter(pl.col("value_code").is_not_null()).select(
            "subject_id", (pl.lit(VALUE_PREFIX) + pl.col("value_code")).alias("code")
        )
        codes = pl.concat([codes, values])
    return codes.unique().group_by("code").agg(pl.len().alias("n"))


@dataclass
class ShardStatistics:
    """What one training shard gives the vocabulary: patients per code, subjects, a sample of
    numeric values per (code, unit), and the latest event date."""

    counts: Counter
    n_subjects: int
    sample: pl.DataFrame | None
    last: dt.date | None


def shard_statistics(frame: pl.DataFrame, seed: int) -> ShardStatistics:
    """The statistics of one training shard (values sampled with ``seed``)."""
    latest = frame["time"].max()
    last = None
    if latest is not None:
        last = latest.date() if isinstance(latest, dt.datetime) else latest
    sample = None
    if "numeric_value" in frame.columns:
        unit = pl.col("unit") if "unit" in frame.columns else pl.lit(None, pl.String)
        sample = sample_values(frame.with_columns(unit.alias("unit")), seed=seed)
    return ShardStatistics(
        Counter(dict(patient_code_counts(frame).iter_rows())),
        frame["subject_id"].n_unique(),
        sample,
        last,
    )


def merge_statistics(
    parts: list[ShardStatistics],
) -> tuple[Counter, int, list[pl.DataFrame], dt.date | None]:
    """Shard statistics added up, in shard order."""
    counts: Counter = Counter()
    n_subjects = 0
    samples = []
    last: dt.date | None = None
    for part in parts:
        counts.update(part.counts)
        n_subjects += part.n_subjects
        if part.sample is not None:
            samples.append(part.sample)
        if part.last is not None:
            last = part.last if last is None else max(last, part.last)
    return counts, n_subjects, samples, last


def collect_statistics(
    shards: list[Path], *, seed: int = 0, progress: bool = True
) -> tuple[Counter, int, list[pl.DataFrame], dt.date | None]:
    """One pass over training shards: code patient counts, number of subjects, value samples,
    and the latest event date (shard ``i``'s values sampled with ``seed + i``)."""
    return merge_statistics(
        [
            shard_statistics(pl.read_parquet(path), seed + i)
            for i, path in enumerate(
                track(shards, len(shards), "Vocabulary", unit="shards", enabled=progress)
            )
        ]
    )


def fit_tokenizer(
    train_shards: list[Path],
    *,
    att_scheme: str = "day",
    min_prevalence: float = 0.001,
    seed: int = 0,
    base: EhrTokenizer | None = None,
    progress: bool = True,
) -> tuple[EhrTokenizer, int]:
    """Build a vocabulary on the training shards, or expand ``base`` with their new codes.

    Returns the tokenizer and the number of codes added.
    """
    return fit_from_statistics(
        collect_statistics(train_shards, seed=seed, progress=progress),
        att_scheme=att_scheme,
        min_prevalence=min_prevalence,
        base=base,
    )


def fit_from_statistics(
    statistics: tuple[Counter, int, list[pl.DataFrame], dt.date | None],
    *,
    att_scheme: str = "day",
    min_prevalence: float = 0.001,
    base: EhrTokenizer | None = None,
) -> tuple[EhrTokenizer, int]:
    """:func:`fit_tokenizer` from merged statistics (:func:`merge_statistics`)."""
    counts, n_subjects, samples, last = statistics
    bins = fit_value_bins(samples)
    if base is None:
        tok = EhrTokenizer.build(
            att_scheme,
            code_counts=counts,
            n_subjects=n_subjects,
            min_prevalence=min_prevalence,
            value_bins=bins,
            last_date=last,
        )
        return tok, len(tok)
    added = base.expand(counts, n_subjects=n_subjects, value_bins=bins, last_date=last)
    return base, added

"""Leakage-safe histories: the tokens a model may see for each (subject, prediction time).

Tokens in ``RUN/tokenized`` carry days only, so cutting them at a prediction day would leak the
events later that day (a diagnosis stamped 23:59:59 against a prediction at admission). The
history is instead cut on the MEDS rows, at full time resolution, and encoded again with the
run's tokenizer:

1. :func:`cut_rows`: each label gets a pseudo subject id (its ``sample_id``) and the subject's
   static rows plus every row with ``time <= prediction_time``; a visit still open at the
   prediction time is cut there (its ``end`` is clipped to the prediction time, and its
   discharge, stamped later, is gone), so neither its length nor its outcome leaks;
2. :func:`ehrgpt.tokenizer.encode.encode_shard` turns the rows into tokens, exactly as
   ``prepare`` does for whole timelines;
3. :func:`left_truncate`: a history longer than the context keeps its most recent visits
   behind a rebuilt demographic prompt (year and age at the first kept visit), the rule of
   training windows and of :func:`ehrgpt.generation.prompts.history_prompt`.

All of it is vectorised in polars over the labels of a chunk; :func:`build_histories` streams
chunks (memory follows the chunk, not the number of labels).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ehrgpt.meds_format.dataset import data_shards, meds_folder
from ehrgpt.tokenizer.encode import encode_shard
from ehrgpt.tokenizer.vocab import VS, EhrTokenizer
from ehrgpt.training.data import prompt_ids

PROMPT_LEN = 4


@dataclass
class HistoryStats:
    """Counts over all chunks: histories built, left-truncated, cut inside a visit, empty."""

    histories: int = 0
    truncated: int = 0
    cut_inside_visit: int = 0
    empty: int = 0
    tokens: int = 0


def cut_rows(meds: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    """The MEDS rows visible at each label, with ``subject_id`` replaced by ``sample_id``.

    ``labels`` has ``sample_id``, ``subject_id`` and ``prediction_time``. Static rows (null
    time) are kept; an open visit's ``end`` is clipped to the prediction time.

    >>> import datetime as dt
    >>> t = lambda h: dt.datetime(2020, 1, 1, h)
    >>> meds = pl.DataFrame({"subject_id": [1, 1, 1, 1], "time": [None, t(8), t(9), t(23)],
    ...     "code": ["GENDER/F", "VISIT/IP", "DX/A", "DX/LATE"],
    ...     "end": [None, t(22), None, None]})
    >>> labels = pl.DataFrame({"sample_id": [0, 1], "subject_id": [1, 1],
    ...                        "prediction_time": [t(9), t(23)]})
    >>> out = cut_rows(meds, labels)
    >>> out.filter(pl.col("subject_id") == 0)["code"].to_list()
    ['GENDER/F', 'VISIT/IP', 'DX/A']
    >>> out.filter(pl.col("subject_id") == 0)["end"].dt.hour().to_list()
    [None, 9, None]
    >>> out.filter(pl.col("subject_id") == 1)["code"].to_list()
    ['GENDER/F', 'VISIT/IP', 'DX/A', 'DX/LATE']
    """
    cut = labels.select("sample_id", "subject_id", "prediction_time").join(
        meds, on="subject_id", how="inner"
    )
    cut = cut.filter(pl.col("time").is_null() | (pl.col("time") <= pl.col("prediction_time")))
    if "end" in cut.columns:
        cut = cut.with_columns(
            pl.when(pl.col("end") > pl.col("prediction_time"))
            .then(pl.col("prediction_time"))
            .otherwise(pl.col("end"))
            .alias("end")
        )
    return (
        cut.drop("subject_id", "prediction_time")
        .rename({"sample_id": "subject_id"})
        .sort("subject_id", "time", nulls_last=False, maintain_order=True)
    )


def left_truncate(
    ids: np.ndarray, days: np.ndarray, birth_day: int | None, tok: EhrTokenizer, max_len: int
) -> tuple[np.ndarray, bool]:
    """Keep the most recent visits of a history behind a rebuilt prompt, within ``max_len``.

    Returns the ids and whether the cut had to fall inside a visit (the last visit alone is
    longer than the context: its most recent tokens are kept).

    >>> tok = EhrTokenizer.build("day", code_counts={}, n_subjects=1)
    >>> vs, ve = tok.id("[VS]"), tok.id("[VE]")
    >>> ids = np.array([tok.year_base, tok.age_base, 7, 8, vs, 20, ve, vs, 21, 22, ve])
    >>> out, inside = left_truncate(ids, np.arange(11) * 400, 0, tok, max_len=9)
    >>> [tok.tokens[i] for i in out[:2]], out[4:].tolist() == [vs, 21, 22, ve], inside
    (['year:1977', 'age:7'], True, False)
    """
    n = len(ids)
    if n <= max_len:
        return ids, False
    keep = max_len - PROMPT_LEN
    vs_pos = np.flatnonzero(ids == tok.token_to_id[VS])
    fits = vs_pos[vs_pos >= n - keep]
    inside = not len(fits)
    start = n - keep if inside else int(fits[0])
    prompt = prompt_ids(tok, int(days[start]), birth_day, int(ids[2]), int(ids[3]))
    return np.concatenate([prompt, ids[start:]]).astype(np.int32), inside


def encode_histories(
    meds: pl.DataFrame,
    labels: pl.DataFrame,
    tok: EhrTokenizer,
    max_len: int,
    stats: HistoryStats | None = None,
) -> pl.DataFrame:
    """Token ids of each label's history: ``sample_id, input_ids, n_tokens, last_day`` (in
    label order; ``last_day``: the day of the history's last token, where a continuation
    starts counting time).

    Labels whose history holds no visit are left out (counted as ``empty``).
    """
    stats = stats if stats is not None else HistoryStats()
    encoded, _ = encode_shard(cut_rows(meds, labels), tok)
    encoded = encoded.rename({"subject_id": "sample_id"})
    stats.empty += labels.height - encoded.height
    births = encoded["birth_day"].to_list()
    long = (encoded["n_tokens"] > max_len).to_numpy()
    ids_col = encoded["input_ids"].to_list() if long.any() else None
    if ids_col is not None:
        days_col = encoded["days"].to_list()
        for i in np.flatnonzero(long):
            ids, inside = left_truncate(
                np.asarray(ids_col[i], np.int32), np.asarray(days_col[i]), births[i], tok, max_len
            )
            ids_col[i] = ids.tolist()
            stats.truncated += 1
            stats.cut_inside_visit += int(inside)
        encoded = encoded.with_columns(pl.Series("input_ids", ids_col, dtype=pl.List(pl.Int32)))
    out = encoded.select(
        "sample_id",
        pl.col("input_ids").cast(pl.List(pl.Int32)),
        pl.col("input_ids").list.len().alias("n_tokens"),
        pl.col("days").list.last().cast(pl.Int64).alias("last_day"),
    ).sort("sample_id")
    stats.histories += out.height
    stats.tokens += int(out["n_tokens"].sum())
    return out


def plan_chunks(
    run_dir: Path, labels: pl.DataFrame, chunk_size: int = 1024
) -> list[tuple[Path, pl.DataFrame]]:
    """(MEDS shard, labels of its subjects) in chunks of at most ``chunk_size`` labels.

    ``run_dir``: a prepared run or a MEDS folder (:func:`ehrgpt.meds_format.dataset.meds_folder`).
    """
    plan = []
    for shard in data_shards(meds_folder(run_dir)):
        subjects = pl.read_parquet(shard, columns=["subject_id"])["subject_id"].unique()
        mine = labels.filter(pl.col("subject_id").is_in(subjects.implode()))
        plan += [(shard, mine.slice(i, chunk_size)) for i in range(0, mine.height, chunk_size)]
    return plan


def build_histories(
    plan: list[tuple[Path, pl.DataFrame]],
    tok: EhrTokenizer,
    max_len: int,
    *,
    stats: HistoryStats | None = None,
) -> Iterator[pl.DataFrame]:
    """Stream the histories of a :func:`plan_chunks` plan, one frame per chunk.

    Each frame: the chunk's label columns (``sample_id``, ``subject_id``, ``prediction_time``,
    ...), ``input_ids``, ``n_tokens`` and ``last_day``; labels with an empty history are left
    out.
    """
    stats = stats if stats is not None else HistoryStats()
    cached: tuple[Path | None, pl.DataFrame | None] = (None, None)
    for shard, part in plan:
        if cached[0] != shard:
            cached = (shard, pl.read_parquet(shard))
        rows = cached[1]
        meds = rows.filter(pl.col("subject_id").is_in(part["subject_id"].unique().implode()))
        hist = encode_histories(meds, part, tok, max_len, stats)
        yield part.join(hist, on="sample_id", how="inner")

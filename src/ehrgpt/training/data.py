"""Tokenized records -> pretraining samples (docs/method.md section 6).

A prepared run holds one row per subject in ``RUN/tokenized/{split}/*.parquet``. For
pretraining each record becomes one *sample* of at most ``context`` tokens:

- a record under ``MIN_PRETRAIN_TOKENS`` (20) tokens is dropped (counted);
- a record that fits (with one more token) gets ``[END]`` appended;
- a longer record is, by a seeded coin flip, either right-truncated after the last ``[VE]``
  that fits, or cut to a random window that starts at a ``[VS]`` and ends at a ``[VE]``; the
  window gets the demographic prompt of its own start prepended (year of the window's first
  visit, age then, the record's gender and race). The reference builds that prompt and
  throws it away; we keep it.

A sample is described by a :class:`Piece` (where it starts and ends in its record, and the
prompt to prepend), so an epoch's plan is small and the tokens are only materialised for the
batch being trained.

>>> import numpy as np
>>> from ehrgpt.tokenizer.vocab import EhrTokenizer
>>> tok = EhrTokenizer.build("day", code_counts={"C/1": 5}, n_subjects=5)
>>> vs, ve, c = tok.id("[VS]"), tok.id("[VE]"), tok.id("C/1")
>>> g, r = tok.id("GENDER/UNKNOWN"), tok.id("RACE/UNKNOWN")
>>> ids = np.array([tok.id("year:1970"), tok.id("age:30"), g, r]
...                + [vs, c, c, ve, tok.id("D5")] * 3, np.int32)
>>> days = np.array([0] * 9 + [3660] * 5 + [7300] * 5, np.int32)
>>> rec = Record(ids, days, birth_day=-10958)                # born 1939-12-31
>>> piece = plan_sample(rec, 40, tok, window=False)      # fits: [END] appended
>>> piece.length, piece.add_end
(20, True)
>>> piece = plan_sample(rec, 14, tok, window=False)      # right truncation after a [VE]
>>> [tok.tokens[i] for i in materialize(rec, piece)][-2:], piece.length
(['C/1', '[VE]'], 13)
>>> piece = plan_sample(rec, 12, tok, window=True, rng=np.random.default_rng(0))
>>> [tok.tokens[i] for i in materialize(rec, piece)]      # a window, its own prompt
['year:1980', 'age:40', 'GENDER/UNKNOWN', 'RACE/UNKNOWN', '[VS]', 'C/1', 'C/1', '[VE]']
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from ehrgpt.errors import EhrgptError
from ehrgpt.tokenizer.encode import MIN_PRETRAIN_TOKENS
from ehrgpt.tokenizer.vocab import (
    AGE_UNKNOWN,
    END,
    MAX_AGE,
    VE,
    VS,
    YEAR_RANGE,
    EhrTokenizer,
)

PROMPT_LEN = 4
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


@dataclass
class Record:
    """One tokenized subject: token ids, the day of each token, birth day (None if unknown)."""

    input_ids: np.ndarray
    days: np.ndarray
    birth_day: int | None = None
    subject_id: int = -1


@dataclass
class Records:
    """The records of a split held flat (one array of ids, one of days, and offsets)."""

    ids: np.ndarray
    days: np.ndarray
    offsets: np.ndarray  # len(records) + 1
    subject_ids: np.ndarray
    birth_days: np.ndarray  # int64, _NO_BIRTH where unknown
    dropped_short: int = 0
    split: str = ""
    files: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.subject_ids)

    def __getitem__(self, i: int) -> Record:
        a, b = self.offsets[i], self.offsets[i + 1]
        birth = int(self.birth_days[i])
        return Record(
            self.ids[a:b],
            self.days[a:b],
            None if birth == _NO_BIRTH else birth,
            int(self.subject_ids[i]),
        )

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])


_NO_BIRTH = np.iinfo(np.int64).min


def load_records(run_dir: Path, split: str, *, min_tokens: int = MIN_PRETRAIN_TOKENS) -> Records:
    """Read ``RUN/tokenized/<split>/*.parquet``; records under ``min_tokens`` are dropped.

    Records are ordered by subject id, so the order does not depend on how shards were cut.
    """
    folder = Path(run_dir) / "tokenized" / split
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise EhrgptError(
            f"{folder} holds no tokenized parquet files; run `ehrgpt prepare --out {run_dir}` "
            "first (or check --data)."
        )
    frame = (
        pl.read_parquet(files, columns=["subject_id", "input_ids", "days", "birth_day"])
        .with_columns(pl.col("input_ids").list.len().alias("n"))
        .sort("subject_id")
    )
    short = frame["n"] < min_tokens
    dropped = int(short.sum())
    frame = frame.filter(~short)
    lengths = frame["n"].to_numpy().astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = frame["input_ids"].explode().to_numpy().astype(np.int32) if len(frame) else np.zeros(0)
    days = frame["days"].explode().to_numpy().astype(np.int32) if len(frame) else np.zeros(0)
    births = frame["birth_day"].cast(pl.Int64).fill_null(_NO_BIRTH).to_numpy()
    return Records(
        ids=np.ascontiguousarray(ids, np.int32),
        days=np.ascontiguousarray(days, np.int32),
        offsets=offsets,
        subject_ids=frame["subject_id"].to_numpy(),
        birth_days=births.astype(np.int64),
        dropped_short=dropped,
        split=split,
        files=files,
    )


# -- the demographic prompt ---------------------------------------------------------------


def _date(day: int) -> dt.date:
    return dt.date.fromordinal(int(day) + _EPOCH_ORDINAL)


def age_in_years(birth_day: int, day: int) -> int:
    """Whole years from ``birth_day`` to ``day`` (days since 1970-01-01), the rule of encode.

    >>> age_in_years(0, 365), age_in_years(0, 364), age_in_years(-1, 365)
    (1, 0, 1)
    """
    b, d = _date(birth_day), _date(day)
    return d.year - b.year - int((d.month, d.day) < (b.month, b.day))


def prompt_ids(
    tok: EhrTokenizer, day: int, birth_day: int | None, gender_id: int, race_id: int
) -> np.ndarray:
    """The 4 prompt tokens for a timeline that starts on ``day``.

    >>> tok = EhrTokenizer.build("day", code_counts={}, n_subjects=1)
    >>> [tok.tokens[i] for i in prompt_ids(tok, 0, -3653, 7, 8)][:2]
    ['year:1970', 'age:10']
    """
    year = min(max(_date(day).year, YEAR_RANGE[0]), YEAR_RANGE[1])
    if birth_day is None:
        age_id = tok.token_to_id[AGE_UNKNOWN]
    else:
        age_id = tok.age_base + min(max(age_in_years(birth_day, day), 0), MAX_AGE)
    return np.array(
        [tok.year_base + year - YEAR_RANGE[0], age_id, gender_id, race_id], dtype=np.int32
    )


# -- one sample per record ----------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """A sample: ``record[start:stop]``, after ``prompt`` (or nothing), then maybe ``[END]``."""

    record: int
    start: int
    stop: int
    prompt: tuple[int, ...] = ()
    add_end: bool = False
    kind: str = "whole"  # whole | truncated | window | cut

    @property
    def length(self) -> int:
        return len(self.prompt) + self.stop - self.start + int(self.add_end)


def plan_sample(
    rec: Record,
    context: int,
    tok: EhrTokenizer,
    *,
    window: bool,
    rng: np.random.Generator | None = None,
    index: int = 0,
) -> Piece:
    """Where the sample of ``rec`` starts and stops for a model of ``context`` tokens.

    ``window`` chooses the random-window rule for a record that does not fit (the caller
    flips the coin); ``rng`` picks the window start.
    """
    ids = rec.input_ids
    n = len(ids)
    if n + 1 <= context:
        return Piece(index, 0, n, (), True, "whole")
    ve_pos = np.flatnonzero(ids == tok.token_to_id[VE])
    if window and rng is not None:
        piece = _window(rec, context, tok, ve_pos, rng, index)
        if piece is not None:
            return piece
    # Right truncation after the last [VE] that fits (a cut inside a visit if none fits).
    fits = ve_pos[ve_pos + 1 <= context]
    if len(fits):
        return Piece(index, 0, int(fits[-1]) + 1, (), False, "truncated")
    return Piece(index, 0, context, (), False, "cut")


def _window(
    rec: Record,
    context: int,
    tok: EhrTokenizer,
    ve_pos: np.ndarray,
    rng: np.random.Generator,
    index: int,
) -> Piece | None:
    """A window ``[VS] ... [VE]`` whose rest of the record does not fit (so it is full)."""
    ids, n = rec.input_ids, len(rec.input_ids)
    room = context - PROMPT_LEN
    vs_pos = np.flatnonzero(ids == tok.token_to_id[VS])
    vs_pos = vs_pos[(vs_pos >= PROMPT_LEN) & (n - vs_pos > room)]
    if not len(vs_pos) or not len(ve_pos):
        return None
    # For each start s, the last [VE] at position e with e - s + 1 <= room.
    last = np.searchsorted(ve_pos, vs_pos + room, side="left") - 1
    ok = last >= 0
    ok[ok] = ve_pos[last[ok]] > vs_pos[ok]
    if not ok.any():
        return None
    starts, ends = vs_pos[ok], ve_pos[last[ok]]
    k = int(rng.integers(len(starts)))
    s, e = int(starts[k]), int(ends[k])
    prompt = prompt_ids(tok, int(rec.days[s]), rec.birth_day, int(ids[2]), int(ids[3]))
    if rec.birth_day is None or int(ids[1]) == tok.token_to_id[AGE_UNKNOWN]:
        prompt[1] = tok.token_to_id[AGE_UNKNOWN]
    return Piece(index, s, e + 1, tuple(int(x) for x in prompt), False, "window")


def materialize(rec: Record, piece: Piece, tok: EhrTokenizer | None = None) -> np.ndarray:
    """The token ids of a sample (``tok`` only needed when ``[END]`` is appended)."""
    parts = [np.asarray(piece.prompt, np.int32), rec.input_ids[piece.start : piece.stop]]
    if piece.add_end:
        end_id = tok.token_to_id[END] if tok is not None else _END_ID
        parts.append(np.array([end_id], np.int32))
    return np.concatenate(parts).astype(np.int32, copy=False)


_END_ID = 3  # [END]'s id in every ehrgpt vocabulary (special tokens come first)


def plan_epoch(
    records: Records,
    context: int,
    tok: EhrTokenizer,
    rng: np.random.Generator,
    *,
    window_prob: float = 0.5,
) -> list[Piece]:
    """One :class:`Piece` per record, the truncation coin flipped with ``rng``."""
    lengths = records.lengths
    pieces = []
    for i in range(len(records)):
        if lengths[i] + 1 <= context:
            pieces.append(Piece(i, 0, int(lengths[i]), (), True, "whole"))
            continue
        window = bool(rng.random() < window_prob)
        pieces.append(plan_sample(records[i], context, tok, window=window, rng=rng, index=i))
    return pieces


def plan_counts(pieces: list[Piece]) -> dict[str, int]:
    """How many samples of each kind (whole, truncated, window, cut) a plan holds."""
    out = {"whole": 0, "truncated": 0, "window": 0, "cut": 0}
    for p in pieces:
        out[p.kind] += 1
    return out

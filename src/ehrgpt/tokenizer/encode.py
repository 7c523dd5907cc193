"""MEDS shard -> token ids per subject, vectorised in polars (no Python loop over events).

For each subject (docs/method.md section 2)::

    year:Y age:A GENDER/g RACE/r                       prompt, at the first visit
    [VS] VISIT/t  (i-D<n>) code (VAL:Qb) (VAL:c) ... (i-D<n>) (DISCHARGE/x) [VE]
    ATT [VS] VISIT/t ... [VE]
    ATT [VS] [DEATH] [VE]                              if the subject died

Rules that make ``decode`` an exact inverse at day resolution:

- visits in order of start (then id); the gap before a visit is its start day minus the day
  the previous visit ended on (the cursor at its ``[VE]``);
- inside any visit, a day change between consecutive events is ``i-D<n>``; an inpatient visit
  also moves the cursor to its end day before its discharge token;
- a visit that starts before the previous one ended is moved to that end, and an event dated
  before its visit start is moved to the start (both counted, rare in real data);
- events in a visit ordered by time, then code; a code outside the vocabulary becomes
  ``[OOV]`` (counted, never dropped); a numeric value becomes its bin token, a categorical
  value ``VAL:<code>``.
- a visit type, discharge, gender or race outside the vocabulary becomes its class's
  ``UNKNOWN`` token (``VISIT/UNKNOWN``, ...; counted), so every record keeps the grammar; a
  visit of an unknown type is not inpatient (no day tokens to its end, no discharge);
- static codes other than gender and race (``ETHNICITY/...``) are left out (counted);
- events without a visit id: one visit of unknown type per subject and day.
- death (``MEDS_DEATH``, or a discharge to "Patient died", 4216643) ends the timeline: the
  death day is the earlier of the two, the death visit comes last, and visits after a visit
  discharged to death are left out (counted).

Each token also gets its day (days since 1970-01-01), so later stages can cut a history at a
prediction time or a window start.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa

from ehrgpt.meds_format import columns as mc
from ehrgpt.tokenizer import time_tokens as tt
from ehrgpt.tokenizer.values import assign_bins
from ehrgpt.tokenizer.vocab import (
    AGE_UNKNOWN,
    DEATH,
    DIED_DISCHARGE,
    MAX_AGE,
    OOV,
    VALUE_PREFIX,
    VE,
    VS,
    YEAR_RANGE,
    EhrTokenizer,
)

MIN_PRETRAIN_TOKENS = 20
I32 = pl.Int32


@dataclass
class EncodeStats:
    """Counts from encoding: what became tokens, what was mapped to OOV, what was moved."""

    subjects: int = 0
    subjects_without_visits: int = 0
    subjects_without_birth: int = 0
    short_records: int = 0
    tokens: int = 0
    events: int = 0
    visits: int = 0
    oov_tokens: int = 0
    oov_codes: Counter = field(default_factory=Counter)
    values_binned: int = 0
    values_without_bins: int = 0
    events_moved_to_visit_start: int = 0
    visits_moved_after_previous: int = 0
    events_without_visit: int = 0
    #: Structure codes outside the vocabulary, per class token (``VISIT/UNKNOWN``: n, ...).
    unknown_structure: Counter = field(default_factory=Counter)
    #: ... and per original code.
    unknown_structure_codes: Counter = field(default_factory=Counter)
    static_codes_left_out: int = 0
    deaths: int = 0
    deaths_from_discharge: int = 0
    visits_after_death_left_out: int = 0

    def merge(self, other: EncodeStats) -> None:
        for name in self.__dataclass_fields__:
            mine = getattr(self, name)
            if isinstance(mine, Counter):
                mine.update(getattr(other, name))
            else:
                setattr(self, name, mine + getattr(other, name))

    def summary(self) -> dict:
        """A JSON-ready summary (the 10 most frequent OOV and unknown structure codes)."""
        out = {k: v for k, v in self.__dict__.items() if not isinstance(v, Counter)}
        out["distinct_oov_codes"] = len(self.oov_codes)
        out["top_oov_codes"] = _top(self.oov_codes)
        out["unknown_structure"] = {k: self.unknown_structure[k] for k in sorted(_UNKNOWNS)}
        out["top_unknown_structure_codes"] = _top(self.unknown_structure_codes)
        return out


def _top(counts: Counter, n: int = 10) -> dict[str, int]:
    """The ``n`` most frequent codes, ties in code order (whatever order they were counted in).

    >>> _top(Counter({"b": 2, "c": 1, "a": 2}), 2)
    {'a': 2, 'b': 2}
    """
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n])


_UNKNOWNS = (
    mc.visit_code(None),
    mc.discharge_code(None),
    mc.gender_code(None),
    mc.race_code(None),
)


def _days(col: str | pl.Expr) -> pl.Expr:
    expr = pl.col(col) if isinstance(col, str) else col
    return expr.dt.date().cast(I32)


def _ids(expr: pl.Expr, tok: EhrTokenizer, default: str = OOV) -> pl.Expr:
    return expr.replace_strict(tok.token_to_id, default=tok.token_to_id[default], return_dtype=I32)


def _known_structure(
    frame: pl.DataFrame,
    column: str,
    unknown: str,
    tok: EhrTokenizer,
    stats: EncodeStats,
    where: pl.Expr | None = None,
) -> pl.DataFrame:
    """``column`` (structure codes, null = unknown) with codes outside the vocabulary replaced
    by their class's ``unknown`` token, counted in ``stats`` (only rows ``where`` is true)."""
    col = pl.col(column).fill_null(unknown)
    prefix = unknown[: -len(mc.UNKNOWN)]
    outside = ~col.is_in([t for t in tok.tokens if t.startswith(prefix)])
    if where is not None:
        outside = outside & where
    n = frame.select(outside.sum()).item() or 0
    if n:
        stats.unknown_structure[unknown] += int(n)
        codes = frame.filter(outside)[column].value_counts().iter_rows()
        stats.unknown_structure_codes.update(dict(codes))
    return frame.with_columns(pl.when(outside).then(pl.lit(unknown)).otherwise(col).alias(column))


def _att_columns(gap: np.ndarray, tok: EhrTokenizer) -> dict[str, np.ndarray]:
    """Three nullable id columns (as masked int arrays, -1 = none) for gaps (-1 = no gap)."""
    short, rem = tt.att_lookup(tok.att_scheme, tok.token_to_id)
    long_from = tt.LONG_FROM[tok.att_scheme]
    a1 = np.full(len(gap), -1, np.int32)
    a2 = np.full(len(gap), -1, np.int32)
    a3 = np.full(len(gap), -1, np.int32)
    has = gap >= 0
    is_short = has & (gap < long_from)
    a1[is_short] = short[gap[is_short]]
    is_long = has & (gap >= long_from)
    g = gap[is_long]
    years = np.minimum(g // 365, tt.MAX_YEARS)
    a1[is_long] = tok.token_to_id[tt.LONG_TOKEN]
    a2[is_long] = tok.token_to_id["Y0"] + years
    a3[is_long] = rem[np.where(years < tt.MAX_YEARS, g - 365 * years, g % 365)]
    return {"a1": a1, "a2": a2, "a3": a3}


def _with_att(frame: pl.DataFrame, gap_col: str, tok: EhrTokenizer) -> pl.DataFrame:
    gap = frame[gap_col].fill_null(-1).to_numpy().astype(np.int64)
    cols = _att_columns(gap, tok)
    return frame.with_columns(
        [pl.Series(k, v).replace(-1, None).cast(I32) for k, v in cols.items()]
    )


def _day_ids(n: pl.Expr, tok: EhrTokenizer) -> tuple[pl.Expr, pl.Expr]:
    """Day tokens for a day change ``n`` >= 0: the remainder token, and how often i-D1079."""
    full = tt.MAX_DAY_TOKEN
    r = n % full
    rest = pl.when(r > 0).then((tok.day_base + r - 1).cast(I32)).otherwise(None)
    return rest, (n // full).clip(0)


# The order of tokens in a shard is one int64 key: the visit's place among all visits of the
# shard (visits are sorted by subject, then start), the section of that visit (the prompt
# belongs to a subject's first visit, death to its last), the event's place, the slot.
_PROMPT, _OPEN, _EVENTS, _CLOSE, _DEATH = range(5)


def _key(section: int, slot: int, eord: pl.Expr | None = None) -> pl.Expr:
    key = (pl.col("g") * 5 + section) * 2**33 + slot
    return key if eord is None else key + eord * 8


def _with_visit_key(frame: pl.DataFrame) -> pl.DataFrame:
    """Add ``vkey``, one int64 per (subject, visit) so grouping and joins use a single column.

    Events without a visit id get one visit per subject and day (ids below any real one).
    """
    day_group = -(10**12) - pl.col("time").dt.date().cast(pl.Int64)
    frame = frame.with_columns(pl.coalesce("visit_id", day_group).alias("visit_id"))
    subject = pl.col("subject_id").rank("dense").cast(pl.Int64)
    lo, hi = frame["visit_id"].min(), frame["visit_id"].max()
    if frame.height == 0 or (lo is not None and lo > -(2**41) and hi < 2**41):
        visit = pl.col("visit_id") + 2**41
    else:  # ids too wide to pack: rank them (slower, always exact)
        visit = pl.col("visit_id").rank("dense").cast(pl.Int64)
    return frame.with_columns((subject * 2**42 + visit).alias("vkey"))


def _token_rows(
    frame: pl.DataFrame, id_expr: pl.Expr, section: int, slot: int, eord: pl.Expr | None = None
) -> pl.DataFrame:
    """One token per row of ``frame`` (null ids are dropped later)."""
    return frame.select(
        "subject_id",
        _key(section, slot, eord).alias("key"),
        id_expr.cast(I32).alias("id"),
        pl.col("day").cast(I32),
    )


def _repeat_rows(frame: pl.DataFrame, n: pl.Expr, section: int, tok: EhrTokenizer) -> pl.DataFrame:
    """The repeated ``i-D1079`` tokens of day changes of 1079 days or more (rare)."""
    _, repeats = _day_ids(n, tok)
    long = frame.filter(repeats > 0)
    eord = pl.col("eord") if "eord" in long.columns else None
    return (
        long.select(
            "subject_id",
            _key(section, 0, eord).alias("key"),
            pl.lit(tok.day_base + tt.MAX_DAY_TOKEN - 1, I32).repeat_by(repeats).alias("id"),
            pl.col("day").cast(I32),
        )
        .explode("id")
        .with_columns(pl.col("id").cast(I32))
    )


def _to_lists(flat: pl.DataFrame) -> pl.DataFrame:
    """Rows sorted by subject -> one row per subject with list columns, without a group_by."""
    subjects = flat["subject_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, subjects[1:] != subjects[:-1]]) if len(subjects) else []
    offsets = pa.array(np.r_[starts, len(subjects)].astype(np.int32))
    ids = pa.ListArray.from_arrays(offsets, pa.array(flat["id"].to_numpy()))
    days = pa.ListArray.from_arrays(offsets, pa.array(flat["day"].to_numpy()))
    table = pa.table(
        {
            "subject_id": pa.array(subjects[starts] if len(subjects) else [], pa.int64()),
            "input_ids": ids,
            "days": days,
        }
    )
    out = pl.from_arrow(table)
    assert isinstance(out, pl.DataFrame)
    return out


#: Rows of MEDS encoded at a time: subjects are encoded independently, so a shard is encoded
#: in slices of whole subjects, and the memory a shard needs is that of one slice (about 350 MB
#: at 500,000 rows) plus its rows and tokens, not 1.1 GB for a shard of 2.5M rows in one piece
#: (benchmarks/README.md). Slices this size are no slower than one piece.
CHUNK_ROWS = 500_000


def encode_shard(
    frame: pl.DataFrame, tok: EhrTokenizer, *, chunk_rows: int = CHUNK_ROWS
) -> tuple[pl.DataFrame, EncodeStats]:
    """Encode one MEDS shard; returns one row per subject (by subject id) and the counts.

    Output columns: ``subject_id``, ``input_ids`` (list[int32]), ``days`` (list[int32], the
    day of each token), ``n_tokens``, ``first_day`` (day of the first visit), ``birth_day``.
    The result does not depend on ``chunk_rows`` (:func:`subject_slices`).
    """
    stats = EncodeStats()
    parts = []
    for part in subject_slices(frame, chunk_rows):
        encoded, part_stats = _encode_subjects(part, tok)
        parts.append(encoded)
        stats.merge(part_stats)
    if len(parts) == 1:
        return parts[0], stats
    return pl.concat(parts, how="vertical"), stats


def subject_slices(frame: pl.DataFrame, rows: int) -> list[pl.DataFrame]:
    """``frame`` cut into slices of whole subjects, about ``rows`` rows each, in subject order.

    A frame not sorted by subject is sorted first (stably: each subject's rows keep their
    order). Slices of a sorted frame share its memory.

    >>> f = pl.DataFrame({"subject_id": [3, 1, 1, 2, 2, 2], "x": range(6)})
    >>> [s["subject_id"].to_list() for s in subject_slices(f, 2)]
    [[1, 1], [2, 2, 2], [3]]
    >>> [s.height for s in subject_slices(f, 100)]
    [6]
    """
    if frame.height <= rows:
        return [frame]
    if not frame["subject_id"].is_sorted():
        frame = frame.sort("subject_id", maintain_order=True)
    ids = frame["subject_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # each subject's first row
    # Cut at the first subject that starts at or after each multiple of ``rows``.
    at = np.searchsorted(starts, np.arange(rows, len(ids), rows))
    cuts = np.unique(starts[at[at < len(starts)]])
    bounds = [0, *cuts.tolist(), len(ids)]
    return [frame.slice(a, b - a) for a, b in itertools.pairwise(bounds) if b > a]


def _encode_subjects(frame: pl.DataFrame, tok: EhrTokenizer) -> tuple[pl.DataFrame, EncodeStats]:
    """:func:`encode_shard` of some whole subjects, in one piece."""
    stats = EncodeStats()
    # Only the columns tokens come from, so that no filter, join or sort below copies the
    # others (text values, source tables).
    frame = _with_extra_columns(frame).select(USED_COLUMNS)
    persons = _persons(frame, tok, stats)
    timed = frame.filter(pl.col("time").is_not_null())
    stats.events_without_visit = timed.select(
        (_is_clinical() & pl.col("visit_id").is_null()).sum()
    ).item()
    timed = _with_visit_key(timed)
    events = _clinical_events(timed)
    visits = _visits(timed, events, tok, stats)
    events = _ordered_events(events, visits, tok, stats)
    visits = _with_att(visits, "gap", tok).join(_last_event_days(events), on="g", how="left")
    persons = _persons_with_visits(persons, visits, stats)
    token_rows = [
        *_event_tokens(events, tok),
        *_visit_open_tokens(visits, tok),
        *_visit_close_tokens(visits, tok),
        *_prompt_tokens(persons, tok),
        *_death_tokens(persons, tok),
    ]
    out = _assemble(token_rows, persons)
    stats.tokens = int(out["n_tokens"].sum())
    stats.short_records = int((out["n_tokens"] < MIN_PRETRAIN_TOKENS).sum())
    return out, stats


#: The MEDS columns tokens come from (a shard read for encoding needs no others).
USED_COLUMNS = (
    mc.SUBJECT_ID,
    mc.TIME,
    mc.CODE,
    mc.NUMERIC_VALUE,
    mc.VISIT_ID,
    mc.END,
    mc.UNIT,
    mc.VALUE_CODE,
)


def _with_extra_columns(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with every extra MEDS column and ``numeric_value`` (null where absent)."""
    for col in mc.EXTRA_COLUMNS:
        if col not in frame.columns:
            dtype = {mc.VISIT_ID: pl.Int64, mc.END: pl.Datetime("us")}.get(col, pl.String)
            frame = frame.with_columns(pl.lit(None, dtype).alias(col))
    if "numeric_value" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, pl.Float32).alias("numeric_value"))
    return frame


def _first_code(static: pl.DataFrame, prefix: str, name: str) -> pl.DataFrame:
    """Per subject, the first static code with ``prefix`` as column ``name``."""
    code = pl.col("code")
    return (
        static.filter(code.str.starts_with(prefix))
        .group_by("subject_id")
        .agg(code.first().alias(name))
    )


def _first_time(frame: pl.DataFrame, code: str, name: str) -> pl.DataFrame:
    """Per subject, the earliest time of ``code`` as column ``name``."""
    return (
        frame.filter(pl.col("code") == code)
        .group_by("subject_id")
        .agg(pl.col("time").min().alias(name))
    )


def _persons(frame: pl.DataFrame, tok: EhrTokenizer, stats: EncodeStats) -> pl.DataFrame:
    """One row per subject: ``gender``, ``race`` (tokens of the vocabulary), ``birth``,
    ``death`` times. Other static codes are counted and left out."""
    static = frame.filter(pl.col("time").is_null())
    code = pl.col("code").str
    prompt_code = code.starts_with(mc.GENDER_PREFIX) | code.starts_with(mc.RACE_PREFIX)
    stats.static_codes_left_out = int(static.select((~prompt_code).sum()).item() or 0)
    persons = (
        frame.select("subject_id")
        .unique()
        .join(_first_code(static, mc.GENDER_PREFIX, "gender"), on="subject_id", how="left")
        .join(_first_code(static, mc.RACE_PREFIX, "race"), on="subject_id", how="left")
        .join(_first_time(frame, mc.BIRTH_CODE, "birth"), on="subject_id", how="left")
        .join(_first_time(frame, mc.DEATH_CODE, "death"), on="subject_id", how="left")
    )
    persons = _known_structure(persons, "gender", mc.gender_code(None), tok, stats)
    return _known_structure(persons, "race", mc.race_code(None), tok, stats)


_IS_VISIT = pl.col("code").str.starts_with(mc.VISIT_PREFIX)
_IS_DISCHARGE = pl.col("code").str.starts_with(mc.DISCHARGE_PREFIX)


def _is_clinical() -> pl.Expr:
    """Rows that are neither visits, discharges, birth nor death."""
    return ~_IS_VISIT & ~_IS_DISCHARGE & ~pl.col("code").is_in([mc.BIRTH_CODE, mc.DEATH_CODE])


def _clinical_events(timed: pl.DataFrame) -> pl.DataFrame:
    """Timed clinical rows (:func:`_is_clinical`); ``d`` = their day."""
    return timed.filter(_is_clinical()).with_columns(_days("time").alias("d"))


def _visits(
    timed: pl.DataFrame, events: pl.DataFrame, tok: EhrTokenizer, stats: EncodeStats
) -> pl.DataFrame:
    """One row per visit in token order: type, discharge, start / end days, gap before it.

    Visits come from visit rows and from the events' visit keys (a visit without a row is of
    unknown type). Types and discharges outside the vocabulary become ``VISIT/UNKNOWN`` and
    ``DISCHARGE/UNKNOWN``; ``died`` marks a discharge to death, after which nothing is kept.
    The cursor end is the running maximum of the raw ends (no overlap); a visit starting
    before it is moved to it (``start2``).
    """
    code, time = pl.col("code"), pl.col("time")
    # Lazy, so that the filters copy only the columns the aggregations read.
    visit_rows = (
        timed.lazy()
        .filter(_IS_VISIT)
        .group_by("vkey")
        .agg(
            pl.col("subject_id").first(),
            pl.col("visit_id").first(),
            code.first().alias("vtype"),
            time.min().alias("vstart"),
            pl.col("end").max().alias("vend"),
        )
        .collect()
    )
    discharges = (
        timed.lazy()
        .filter(_IS_DISCHARGE)
        .group_by("vkey")
        .agg(code.first().alias("discharge"))
        .collect()
    )
    ev_span = events.group_by("vkey").agg(
        pl.col("subject_id").first(),
        pl.col("visit_id").first(),
        time.min().alias("tmin"),
        pl.col("d").max().alias("dmax"),
    )
    visits = (
        ev_span.join(visit_rows, on="vkey", how="full", coalesce=True)
        .with_columns(
            pl.coalesce("subject_id", "subject_id_right").alias("subject_id"),
            pl.coalesce("visit_id", "visit_id_right").alias("visit_id"),
        )
        .drop("subject_id_right", "visit_id_right")
        .join(discharges, on="vkey", how="left")
        .with_columns(
            (pl.col("discharge") == DIED_DISCHARGE).fill_null(False).alias("died"),
            pl.coalesce("vstart", "tmin").alias("start"),
        )
    )
    visits = _known_structure(visits, "vtype", mc.visit_code(None), tok, stats)
    visits = (
        visits.with_columns(
            _days("start").alias("start_d"),
            pl.col("vtype").is_in(list(tok.inpatient_visit_codes)).alias("inpatient"),
        )
        .with_columns(
            pl.max_horizontal(
                "start_d",
                pl.when("inpatient").then(_days("vend")),
                "dmax",
            ).alias("raw_end")
        )
        .sort("subject_id", "start", "visit_id")
        .with_columns(pl.col("raw_end").cum_max().over("subject_id").alias("end_d"))
        .with_columns(pl.col("end_d").shift(1).over("subject_id").alias("prev_end"))
        .with_columns(
            pl.max_horizontal("start_d", "prev_end").alias("start2"),
            pl.int_range(pl.len(), dtype=I32).over("subject_id").alias("vord"),
            pl.int_range(pl.len(), dtype=pl.Int64).alias("g"),
        )
        .with_columns((pl.col("start2") - pl.col("prev_end")).alias("gap"))
    )
    visits = _until_death(visits, stats)
    unknown = mc.discharge_code(None)
    visits = _known_structure(visits, "discharge", unknown, tok, stats, where=pl.col("inpatient"))
    stats.visits = visits.height
    stats.visits_moved_after_previous = int(
        visits.select((pl.col("start_d") < pl.col("prev_end")).sum()).item() or 0
    )
    return visits


def _until_death(visits: pl.DataFrame, stats: EncodeStats) -> pl.DataFrame:
    """The visits up to a subject's first visit discharged to death (later ones counted)."""
    first_death = pl.when("died").then(pl.col("vord")).min().over("subject_id")
    keep = first_death.is_null() | (pl.col("vord") <= first_death)
    n = len(visits)
    visits = visits.filter(keep)
    stats.visits_after_death_left_out = n - len(visits)
    return visits


def _ordered_events(
    events: pl.DataFrame, visits: pl.DataFrame, tok: EhrTokenizer, stats: EncodeStats
) -> pl.DataFrame:
    """Events clamped to their visit start, with token ids, in token order, with day changes.

    Adds ``d2`` (the event's day after clamping), ``code_id``, ``bin_id``, ``vcode_id`` and
    ``n`` (days since the previous event of the visit, or since the visit start).
    """
    events = events.join(
        visits.select("vkey", "vord", "g", "start2"), on="vkey", how="inner"
    ).with_columns(
        pl.max_horizontal("d", "start2").alias("d2"),
        # An event moved to its visit start keeps its time of day on the start's day, so the
        # order inside a day is the same whether or not an event was moved.
        pl.when(pl.col("d") < pl.col("start2"))
        .then(
            pl.from_epoch(pl.col("start2").cast(pl.Int64), time_unit="d").cast(pl.Datetime("us"))
            + (pl.col("time") - pl.col("time").dt.truncate("1d"))
        )
        .otherwise(pl.col("time"))
        .alias("t2"),
    )
    events = assign_bins(events, tok.value_bins).with_columns(
        _ids(pl.col("code"), tok).alias("code_id"),
        pl.when(pl.col("value_code").is_not_null())
        .then(_ids(pl.lit(VALUE_PREFIX) + pl.col("value_code"), tok))
        .alias("vcode_id"),
        (pl.col("bin").cast(I32) + tok.bin_base).alias("bin_id"),
    )
    # Within a visit: by time, then token id (so an [OOV] sorts the same before and after
    # decoding), then value.
    events = events.sort("g", "t2", "code_id", "bin_id", "vcode_id", nulls_last=True)
    stats.events = events.height
    stats.events_moved_to_visit_start = int(
        events.select((pl.col("d") < pl.col("start2")).sum()).item() or 0
    )
    same_visit = pl.col("g") == pl.col("g").shift(1)
    events = events.with_columns(
        (
            pl.col("d2")
            - pl.when(same_visit).then(pl.col("d2").shift(1)).otherwise(pl.col("start2"))
        ).alias("n")
    )
    _count_values_and_oov(events, tok, stats)
    return events


def _count_values_and_oov(events: pl.DataFrame, tok: EhrTokenizer, stats: EncodeStats) -> None:
    """Binned values, values without bins, and codes / categorical values outside the vocab."""
    stats.values_binned = int(events["bin"].is_not_null().sum())
    stats.values_without_bins = int(
        (events["numeric_value"].is_not_null() & events["bin"].is_null()).sum()
    )
    oov = tok.token_to_id[OOV]
    oov_rows = events.filter(pl.col("code_id") == oov)
    stats.oov_codes.update(dict(oov_rows["code"].value_counts().iter_rows()))
    oov_values = events.filter(pl.col("vcode_id") == oov)
    stats.oov_codes.update(
        {VALUE_PREFIX + k: v for k, v in oov_values["value_code"].value_counts().iter_rows()}
    )
    stats.oov_tokens = oov_rows.height + oov_values.height


def _last_event_days(events: pl.DataFrame) -> pl.DataFrame:
    """Per visit (``g``), the day of its last event (``last_d``)."""
    return events.group_by("g").agg(pl.col("d2").max().alias("last_d"))


def _event_tokens(events: pl.DataFrame, tok: EhrTokenizer) -> list[pl.DataFrame]:
    """Per event: its day change (``i-D<n>``, repeated ``i-D1079``), code, bin, value code."""
    day_rest, _ = _day_ids(pl.col("n"), tok)
    ev = events.with_columns(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("eord"), pl.col("d2").alias("day")
    )
    rows = [
        _token_rows(ev, id_expr, _EVENTS, slot, pl.col("eord"))
        for slot, id_expr in enumerate(
            (day_rest, pl.col("code_id"), pl.col("bin_id"), pl.col("vcode_id")), start=1
        )
    ]
    rows.append(_repeat_rows(ev, pl.col("n"), _EVENTS, tok))
    return rows


def _visit_open_tokens(visits: pl.DataFrame, tok: EhrTokenizer) -> list[pl.DataFrame]:
    """Per visit: the ATT before it (up to three tokens), ``[VS]`` and the visit type."""
    vs = tok.token_to_id[VS]
    opened = visits.with_columns(pl.col("start2").alias("day"))
    return [
        _token_rows(opened, id_expr, _OPEN, slot)
        for slot, id_expr in enumerate(
            (
                pl.col("a1"),
                pl.col("a2"),
                pl.col("a3"),
                pl.lit(vs, I32),
                _ids(pl.col("vtype"), tok),
            )
        )
    ]


def _visit_close_tokens(visits: pl.DataFrame, tok: EhrTokenizer) -> list[pl.DataFrame]:
    """Per visit: the day change to its end, the discharge (inpatient only), ``[VE]``."""
    closed = visits.with_columns(
        (pl.col("end_d") - pl.coalesce("last_d", "start2")).alias("n_end"),
        pl.col("end_d").alias("day"),
    )
    end_rest, _ = _day_ids(pl.col("n_end"), tok)
    discharge = pl.when("inpatient").then(
        _ids(pl.col("discharge").fill_null(mc.discharge_code(None)), tok)
    )
    rows = [_repeat_rows(closed, pl.col("n_end"), _CLOSE, tok)]
    for slot, id_expr in enumerate(
        (end_rest, discharge, pl.lit(tok.token_to_id[VE], I32)), start=1
    ):
        rows.append(_token_rows(closed, id_expr, _CLOSE, slot))
    return rows


def _persons_with_visits(
    persons: pl.DataFrame, visits: pl.DataFrame, stats: EncodeStats
) -> pl.DataFrame:
    """Subjects with at least one visit, with their first visit day and last visit end."""
    firsts = visits.filter(pl.col("vord") == 0).select(
        "subject_id", pl.col("start2").alias("first_day"), pl.col("g").alias("first_g")
    )
    lasts = visits.group_by("subject_id").agg(
        pl.col("end_d").max().alias("last_end"),
        pl.col("g").max().alias("last_g"),
        pl.col("end_d").filter("died").min().alias("died_end"),
    )
    persons = (
        persons.join(firsts, on="subject_id", how="left")
        .join(lasts, on="subject_id", how="left")
        .with_columns(pl.min_horizontal(_days("death"), "died_end").alias("death_d"))
    )
    stats.subjects_without_visits = int(persons["first_day"].is_null().sum())
    persons = persons.filter(pl.col("first_day").is_not_null())
    stats.subjects = persons.height
    stats.subjects_without_birth = int(persons["birth"].is_null().sum())
    stats.deaths = int(persons["death_d"].is_not_null().sum())
    stats.deaths_from_discharge = int(
        persons.select(pl.col("death").is_null() & pl.col("died_end").is_not_null()).sum().item()
    )
    return persons


def _month_day(date: pl.Expr) -> pl.Expr:
    """(month, day) as one Int32 number: polars gives month and day as Int8, which overflows."""
    return date.dt.month().cast(pl.Int32) * 100 + date.dt.day().cast(pl.Int32)


def _prompt_tokens(persons: pl.DataFrame, tok: EhrTokenizer) -> list[pl.DataFrame]:
    """Per subject: ``year:`` and ``age:`` at the first visit, gender and race."""
    first = pl.from_epoch(pl.col("first_day").cast(pl.Int64), time_unit="d")
    birth = pl.col("birth").dt.date()
    age = (
        first.dt.year().cast(pl.Int32)
        - birth.dt.year().cast(pl.Int32)
        - (_month_day(first) < _month_day(birth)).cast(pl.Int32)
    )
    year_id = (first.dt.year().clip(*YEAR_RANGE) - YEAR_RANGE[0] + tok.year_base).cast(I32)
    age_id = (
        pl.when(pl.col("birth").is_null())
        .then(pl.lit(tok.token_to_id[AGE_UNKNOWN]))
        .otherwise(age.clip(0, MAX_AGE) + tok.age_base)
        .cast(I32)
    )
    prompt = persons.with_columns(pl.col("first_g").alias("g"), pl.col("first_day").alias("day"))
    return [
        _token_rows(prompt, id_expr, _PROMPT, slot)
        for slot, id_expr in enumerate(
            (
                year_id,
                age_id,
                _ids(pl.col("gender").fill_null(mc.gender_code(None)), tok),
                _ids(pl.col("race").fill_null(mc.race_code(None)), tok),
            )
        )
    ]


def _death_tokens(persons: pl.DataFrame, tok: EhrTokenizer) -> list[pl.DataFrame]:
    """Per subject who died: ``ATT [VS] [DEATH] [VE]`` after the last visit."""
    died = persons.filter(pl.col("death_d").is_not_null()).with_columns(
        pl.max_horizontal(pl.col("death_d") - pl.col("last_end"), pl.lit(0)).alias("dgap"),
        pl.col("last_g").alias("g"),
    )
    died = _with_att(died, "dgap", tok).with_columns(
        pl.max_horizontal("death_d", "last_end").alias("day")
    )
    vs, ve = tok.token_to_id[VS], tok.token_to_id[VE]
    return [
        _token_rows(died, id_expr, _DEATH, slot)
        for slot, id_expr in enumerate(
            (
                pl.col("a1"),
                pl.col("a2"),
                pl.col("a3"),
                pl.lit(vs, I32),
                pl.lit(tok.token_to_id[DEATH], I32),
                pl.lit(ve, I32),
            )
        )
    ]


def _assemble(token_rows: list[pl.DataFrame], persons: pl.DataFrame) -> pl.DataFrame:
    """All token rows in key order -> one row per subject with its lists, days and counts."""
    flat = pl.concat(token_rows, how="vertical").filter(pl.col("id").is_not_null()).sort("key")
    return (
        _to_lists(flat)
        .join(
            persons.select("subject_id", "first_day", _days("birth").alias("birth_day")),
            on="subject_id",
            how="inner",
        )
        .with_columns(pl.col("input_ids").list.len().cast(I32).alias("n_tokens"))
        .sort("subject_id")
    )

"""Token sequence -> timeline -> MEDS rows with dates: the inverse of :mod:`encode`.

Decoding walks the grammar of SPEC section 1 with a date cursor. The first visit starts on
``first_day`` when it is known (a real patient's history) or on a random day of the prompt's
year (a generated patient); ATT tokens and day tokens move the cursor. Every violation of the
grammar raises :class:`DecodeError` with a short reason, so a generator can count rejections.

>>> from ehrgpt.tokenizer.vocab import EhrTokenizer
>>> tok = EhrTokenizer.build("day", code_counts={"SNOMED/1": 5, "VISIT/9202": 5}, n_subjects=5)
>>> seq = ["year:2001", "age:40", "GENDER/UNKNOWN", "RACE/UNKNOWN", "[VS]", "VISIT/9202",
...        "SNOMED/1", "[VE]", "D7", "[VS]", "VISIT/9202", "SNOMED/1", "[VE]"]
>>> tl = decode_tokens(seq, tok, first_day=11323)   # 2001-01-01
>>> [(str(v.start), [e.code for e in v.events]) for v in tl.visits]
[('2001-01-01', ['SNOMED/1']), ('2001-01-08', ['SNOMED/1'])]
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from ehrgpt.meds_format import columns as mc
from ehrgpt.tokenizer import time_tokens as tt
from ehrgpt.tokenizer.vocab import (
    AGE_UNKNOWN,
    DEATH,
    END,
    OOV,
    PAD,
    START,
    VALUE_PREFIX,
    VE,
    VS,
    EhrTokenizer,
)

EPOCH = dt.date(1970, 1, 1)


class DecodeError(ValueError):
    """A token sequence that breaks the timeline grammar; ``reason`` is a short category."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Event:
    """One clinical event: its day, code, and value (bin index and/or categorical code)."""

    day: dt.date
    code: str
    value_bin: int | None = None
    value_code: str | None = None


@dataclass
class Visit:
    """One visit: type code, start and end day, events, discharge code (inpatient only)."""

    visit_type: str
    start: dt.date
    end: dt.date
    events: list[Event] = field(default_factory=list)
    discharge: str | None = None


@dataclass
class Timeline:
    """A decoded patient: prompt fields, visits in order, death day if any."""

    year: int
    age: int | None
    gender: str
    race: str
    visits: list[Visit] = field(default_factory=list)
    death: dt.date | None = None


def day_to_date(day: int) -> dt.date:
    """Days since 1970-01-01 -> date.

    >>> day_to_date(0), day_to_date(-1)
    (datetime.date(1970, 1, 1), datetime.date(1969, 12, 31))
    """
    return EPOCH + dt.timedelta(days=int(day))


def _take_att(tokens: Sequence[str], i: int, scheme: str) -> tuple[int, int]:
    """Parse an ATT starting at ``i``; returns (days, next index)."""
    tok = tokens[i]
    if tok == tt.LONG_TOKEN:
        part = list(tokens[i : i + 3])
        if len(part) < 3 or not part[1].startswith("Y") or not tt.is_att_token(part[2]):
            raise DecodeError("broken long time token", " ".join(part))
        return tt.att_days(part, scheme), i + 3
    return tt.att_days([tok], scheme), i + 1


def decode_tokens(
    tokens: Sequence[str],
    tok: EhrTokenizer,
    *,
    first_day: int | None = None,
    rng: np.random.Generator | None = None,
) -> Timeline:
    """Decode token strings into a :class:`Timeline` (raises :class:`DecodeError`)."""
    seq = [t for t in tokens if t not in (PAD, START)]
    if seq and seq[-1] == END:
        seq = seq[:-1]
    if END in seq:
        raise DecodeError("[END] before the end")
    if len(seq) < 4 or not seq[0].startswith("year:"):
        raise DecodeError("no year token first")
    year = int(seq[0][5:])
    if not seq[1].startswith("age:"):
        raise DecodeError("no age token second")
    age = None if seq[1] == AGE_UNKNOWN else int(seq[1][4:])
    if not seq[2].startswith(mc.GENDER_PREFIX) or not seq[3].startswith(mc.RACE_PREFIX):
        raise DecodeError("bad demographic prompt", " ".join(seq[:4]))
    if len(seq) == 4:
        raise DecodeError("nothing after the prompt")
    if first_day is None:
        rng = rng or np.random.default_rng()
        start = dt.date(year, 1, 1)
        first_day = (start - EPOCH).days + int(rng.integers(0, 365 + (year % 4 == 0)))
    tl = Timeline(year, age, seq[2], seq[3])
    cursor = day_to_date(first_day)
    scheme = tok.att_scheme
    i, n = 4, len(seq)
    while i < n:
        if tl.death is not None:
            raise DecodeError("[DEATH] not last")
        if tl.visits:
            if not tt.is_att_token(seq[i]):
                raise DecodeError("expected a time token between visits", seq[i])
            days, i = _take_att(seq, i, scheme)
            cursor += dt.timedelta(days=days)
        if i >= n or seq[i] != VS:
            raise DecodeError("expected [VS]", seq[i] if i < n else "end of sequence")
        i += 1
        if i < n and seq[i] == DEATH:
            if not tl.visits:
                raise DecodeError("[DEATH] before any visit")
            if i + 1 >= n or seq[i + 1] != VE:
                raise DecodeError("[DEATH] without [VE]")
            tl.death = cursor
            i += 2
            continue
        if i >= n or not seq[i].startswith(mc.VISIT_PREFIX):
            raise DecodeError("no visit type after [VS]", seq[i] if i < n else "end of sequence")
        visit = Visit(seq[i], cursor, cursor)
        i += 1
        inpatient = visit.visit_type in tok.inpatient_visit_codes
        while True:
            if i >= n:
                raise DecodeError("visit not closed by [VE]")
            t = seq[i]
            if t == VE:
                i += 1
                break
            if t.startswith("i-D"):
                cursor += dt.timedelta(days=int(t[3:]))
            elif t.startswith(mc.DISCHARGE_PREFIX):
                if not inpatient or i + 1 >= n or seq[i + 1] != VE:
                    raise DecodeError("discharge outside the end of an inpatient visit", t)
                visit.discharge = t
            elif t.startswith(VALUE_PREFIX):
                if not visit.events:
                    raise DecodeError("value without a code before it", t)
                last = visit.events[-1]
                rest = t[len(VALUE_PREFIX) :]
                if len(rest) >= 2 and rest[0] == "Q" and rest[1:].isdigit():
                    if last.value_bin is not None or last.value_code is not None:
                        raise DecodeError("two numeric values for one code", t)
                    last.value_bin = int(rest[1:])
                else:
                    if last.value_code is not None:
                        raise DecodeError("two categorical values for one code", t)
                    last.value_code = rest
            elif (
                t in (VS, DEATH)
                or t.startswith(("year:", "age:", mc.VISIT_PREFIX))
                or tt.is_att_token(t)
                or t.startswith((mc.GENDER_PREFIX, mc.RACE_PREFIX))
            ):
                raise DecodeError("structure token inside a visit", t)
            else:
                visit.events.append(Event(cursor, t))
            i += 1
        visit.end = cursor
        if inpatient and visit.discharge is None:
            raise DecodeError("inpatient visit without discharge")
        tl.visits.append(visit)
    if not tl.visits:
        raise DecodeError("no visit")
    return tl


def decode_ids(ids: Sequence[int], tok: EhrTokenizer, **kwargs) -> Timeline:
    """Decode token ids (see :func:`decode_tokens`)."""
    try:
        tokens = [tok.tokens[i] for i in ids]
    except IndexError:
        raise DecodeError("token id outside the vocabulary") from None
    return decode_tokens(tokens, tok, **kwargs)


def timeline_to_meds(
    tl: Timeline,
    tok: EhrTokenizer,
    subject_id: int,
    *,
    birth_day: int | None = None,
    visit_id_start: int = 1,
) -> pl.DataFrame:
    """MEDS rows (with ehrgpt's extra columns) for one decoded timeline.

    Numeric values come back as the median of their bin, with the unit the bins were fitted
    for. Without ``birth_day`` the birth date is July 1 of ``year - age - 1`` or ``year - age``
    (whichever keeps the age right at the first visit).
    """
    first = tl.visits[0].start
    if birth_day is not None:
        birth = day_to_date(birth_day)
    elif tl.age is not None:
        birth = dt.date(first.year - tl.age, 7, 1)
        if (first.month, first.day) < (7, 1):
            birth = dt.date(first.year - tl.age - 1, 7, 1)
    else:
        birth = None
    rows: list[tuple] = []

    def add(time, code, value=None, visit=None, end=None, table=None, unit=None, vcode=None):
        rows.append((subject_id, time, code, value, None, visit, end, table, unit, vcode))

    add(None, tl.gender, table="person")
    add(None, tl.race, table="person")
    if birth is not None:
        add(dt.datetime.combine(birth, dt.time()), mc.BIRTH_CODE, table="person")
    for k, v in enumerate(tl.visits):
        vid = visit_id_start + k
        start = dt.datetime.combine(v.start, dt.time())
        end = dt.datetime.combine(v.end, dt.time())
        add(start, v.visit_type, visit=vid, end=end, table="visit_occurrence")
        for e in v.events:
            value = unit = None
            if e.value_bin is not None:
                unit = tok.value_unit(e.code)
                bins = tok.value_bins.get((e.code, unit))
                value = bins.representative(e.value_bin) if bins else None
            add(
                dt.datetime.combine(e.day, dt.time()),
                e.code,
                value=value,
                visit=vid,
                unit=unit,
                vcode=e.value_code,
            )
        if v.discharge is not None and v.discharge != mc.discharge_code(None):
            add(end, v.discharge, visit=vid, table="visit_occurrence")
    if tl.death is not None:
        add(dt.datetime.combine(tl.death, dt.time()), mc.DEATH_CODE, table="death")
    return pl.DataFrame(rows, schema=pl.Schema(mc.EVENT_SCHEMA), orient="row")


__all__ = [
    "OOV",
    "DecodeError",
    "Event",
    "Timeline",
    "Visit",
    "decode_ids",
    "decode_tokens",
    "timeline_to_meds",
]

"""Token sequence -> timeline -> MEDS rows with dates: the inverse of :mod:`encode`.

Decoding walks the grammar of docs/method.md section 2 with a date cursor. The first visit starts on
``first_day`` when it is known (a real patient's history) or on a random day of the prompt's
year, up to the training data's last date (a generated patient); ATT tokens and day tokens
move the cursor. Every violation of the grammar raises :class:`DecodeError` with a short
reason, so a generator can count rejections. A discharge to death ("Patient died") ends the
timeline: only the death visit may follow it.

:func:`check_plausible` rejects, by reason, generated timelines that decode but cannot be
real: a birth year outside 1900..this year, a date after the training data, an age over 120,
a visit longer than :data:`MAX_VISIT_DAYS`.

>>> from ehrgpt.tokenizer.vocab import EhrTokenizer
>>> tok = EhrTokenizer.build("day", code_counts={"SNOMED/1": 5, "VISIT/9202": 5}, n_subjects=5)
>>> seq = ["year:2001", "age:40", "GENDER/UNKNOWN", "RACE/UNKNOWN", "[VS]", "VISIT/9202",
...        "SNOMED/1", "[VE]", "D7", "[VS]", "VISIT/9202", "SNOMED/1", "[VE]"]
>>> tl = decode_tokens(seq, tok, first_day=11323)   # 2001-01-01
>>> [(str(v.start), [e.code for e in v.events]) for v in tl.visits]
[('2001-01-01', ['SNOMED/1']), ('2001-01-08', ['SNOMED/1'])]
"""

from __future__ import annotations

import calendar
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
    DIED_DISCHARGE,
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
#: Plausibility limits of a generated timeline (see :func:`check_plausible`).
MIN_BIRTH_YEAR = 1900
MAX_AGE_YEARS = 120
MAX_VISIT_DAYS = 365


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
        first_day = random_day_of_year(year, rng or np.random.default_rng(), tok.data_end)
    tl = Timeline(year, age, seq[2], seq[3])
    cursor = day_to_date(first_day)
    scheme = tok.att_scheme
    i, n = 4, len(seq)
    died_on: dt.date | None = None  # the end of a visit discharged to death
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
        if died_on is not None:
            raise DecodeError("visit after a discharge to death", seq[i] if i < n else "")
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
        if visit.discharge == DIED_DISCHARGE:
            died_on = visit.end
        tl.visits.append(visit)
    if not tl.visits:
        raise DecodeError("no visit")
    if tl.death is None and died_on is not None:
        tl.death = died_on
    return tl


def random_day_of_year(year: int, rng: np.random.Generator, last: dt.date | None = None) -> int:
    """A uniform day of ``year`` (leap years by the calendar), not after ``last``; as days
    since 1970-01-01.

    >>> rng = np.random.default_rng(0)
    >>> days = {random_day_of_year(1900, rng) for _ in range(3000)}
    >>> len(days), day_to_date(max(days))
    (365, datetime.date(1900, 12, 31))
    >>> day_to_date(random_day_of_year(2019, rng, dt.date(2019, 1, 1)))
    datetime.date(2019, 1, 1)
    """
    n_days = 366 if calendar.isleap(year) else 365
    start = dt.date(year, 1, 1)
    if last is not None and last.year == year:
        n_days = (last - start).days + 1
    return (start - EPOCH).days + int(rng.integers(0, n_days))


def birth_date(tl: Timeline) -> dt.date | None:
    """The birth date of a generated timeline: July 1 of ``year - age - 1`` or ``year - age``
    (whichever keeps the age right at the first visit); None without an age."""
    if tl.age is None:
        return None
    first = tl.visits[0].start
    if (first.month, first.day) < (7, 1):
        return dt.date(first.year - tl.age - 1, 7, 1)
    return dt.date(first.year - tl.age, 7, 1)


def day_budget(year: int, age: int | None, tok: EhrTokenizer) -> int:
    """The most days a generated record with prompt ``year:``/``age:`` may span from its first
    visit and still pass :func:`check_plausible` (dates up to the training data's end, age at
    most 120), whichever day of the year decoding starts it on; 0 if none.

    >>> tok = EhrTokenizer.build("day", code_counts={}, n_subjects=1, last_date=dt.date(2019, 7, 1))
    >>> day_budget(2019, 30, tok), day_budget(2018, 30, tok), day_budget(2018, 120, tok)
    (0, 182, 0)
    """
    end = tok.data_end
    latest_start = min(dt.date(year, 12, 31), end)
    budget = (end - latest_start).days
    if age is not None:
        # Birth is July 1 of year - age - 1 (first visit before July) or of year - age.
        for first, last, born in (
            (dt.date(year, 1, 1), dt.date(year, 6, 30), year - age - 1),
            (dt.date(year, 7, 1), dt.date(year, 12, 31), year - age),
        ):
            if first > latest_start:
                continue
            oldest = dt.date(born + MAX_AGE_YEARS + 1, 7, 1) - dt.timedelta(days=1)
            budget = min(budget, (oldest - min(last, latest_start)).days)
    return max(budget, 0)


def _last_date(tl: Timeline) -> dt.date:
    """The latest date of a timeline (visit ends, events, death)."""
    days = [v.end for v in tl.visits] + [e.day for v in tl.visits for e in v.events]
    return max([*days, *([tl.death] if tl.death else [])])


def check_plausible(tl: Timeline, tok: EhrTokenizer, *, today: dt.date | None = None) -> None:
    """Raise :class:`DecodeError` (reason = the category) for a generated timeline that
    cannot be real; the limits are :data:`MIN_BIRTH_YEAR`, :data:`MAX_AGE_YEARS`,
    :data:`MAX_VISIT_DAYS` and the training data's last date (today for older tokenizers).

    >>> tok = EhrTokenizer.build("day", code_counts={"VISIT/9202": 5}, n_subjects=5,
    ...                          last_date=dt.date(2019, 7, 1))
    >>> tl = Timeline(2019, 30, "GENDER/UNKNOWN", "RACE/UNKNOWN",
    ...               [Visit("VISIT/9202", dt.date(2019, 5, 1), dt.date(2019, 5, 2))])
    >>> check_plausible(tl, tok)
    >>> tl.visits[0].end = dt.date(2019, 8, 1)
    >>> check_plausible(tl, tok)
    Traceback (most recent call last):
    ...
    ehrgpt.tokenizer.decode.DecodeError: date after the training data: 2019-08-01 > 2019-07-01
    """
    today = today or dt.date.today()
    birth = birth_date(tl)
    if birth is not None and not MIN_BIRTH_YEAR <= birth.year <= today.year:
        raise DecodeError(f"birth year outside {MIN_BIRTH_YEAR}..{today.year}", str(birth.year))
    last = _last_date(tl)
    if last > tok.data_end:
        raise DecodeError("date after the training data", f"{last} > {tok.data_end}")
    if (
        birth is not None
        and (last.year - birth.year) - ((last.month, last.day) < (birth.month, birth.day))
        > MAX_AGE_YEARS
    ):
        raise DecodeError(f"age over {MAX_AGE_YEARS}", f"born {birth}, alive {last}")
    for v in tl.visits:
        if (v.end - v.start).days > MAX_VISIT_DAYS:
            raise DecodeError(
                f"visit longer than {MAX_VISIT_DAYS} days", f"{v.visit_type} {v.start}..{v.end}"
            )


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
    rng: np.random.Generator | None = None,
) -> pl.DataFrame:
    """MEDS rows (with ehrgpt's extra columns) for one decoded timeline.

    Times follow prepared MEDS (docs/method.md section 1): visit starts and birth at 00:00:00,
    events, visit ends, discharges and death at 23:59:59 of their day. Numeric values come
    back with the unit the bins were fitted for: drawn inside their bin
    from its quantiles with ``rng`` (generated timelines), else the bin's median (real
    records). Without ``birth_day`` the birth date is :func:`birth_date`.
    """
    birth = day_to_date(birth_day) if birth_day is not None else birth_date(tl)
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
        end = dt.datetime.combine(v.end, mc.END_OF_DAY)
        add(start, v.visit_type, visit=vid, end=end, table="visit_occurrence")
        for e in v.events:
            value = unit = None
            if e.value_bin is not None:
                unit = tok.value_unit(e.code)
                bins = tok.value_bins.get((e.code, unit))
                if bins is None:
                    value = None
                elif rng is None:
                    value = bins.representative(e.value_bin)
                else:
                    value = float(bins.sample(e.value_bin, rng))
            add(
                dt.datetime.combine(e.day, mc.END_OF_DAY),
                e.code,
                value=value,
                visit=vid,
                unit=unit,
                vcode=e.value_code,
            )
        if v.discharge is not None and v.discharge != mc.discharge_code(None):
            add(end, v.discharge, visit=vid, table="visit_occurrence")
    if tl.death is not None:
        add(dt.datetime.combine(tl.death, mc.END_OF_DAY), mc.DEATH_CODE, table="death")
    return pl.DataFrame(rows, schema=pl.Schema(mc.EVENT_SCHEMA), orient="row")


__all__ = [
    "OOV",
    "DecodeError",
    "Event",
    "Timeline",
    "Visit",
    "birth_date",
    "check_plausible",
    "day_budget",
    "decode_ids",
    "decode_tokens",
    "timeline_to_meds",
]

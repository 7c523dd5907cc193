"""Windows of a timeline longer than the model's context (docs/method.md section 8).

When a sequence being generated (or a history given as a prompt) reaches the context, the
engine keeps its most recent whole visits behind a demographic prompt rebuilt for the first
kept visit, the rule of the pretraining windows (:mod:`ehrgpt.training.data`), and goes on
from there. The engine knows only token ids, so the day of the first kept visit is counted
from the time tokens: time tokens between visits (``D<n>``, ``LT Y<k> ...``) and day tokens
inside visits (``i-D<n>``) move a day counter that starts at 0 on the first visit. Year and age
at the window start come from the original prompt's year and age plus that count, with the
first visit taken to be mid-year (1 July) and the age then half-way through its year:

- ``year`` = the calendar year of 1 July of the prompt's year + the day count;
- ``age`` = whole years between a birth day ``(age + 0.5) * 365.25`` days before that 1 July
  and the window's first day (``age:UNKNOWN`` stays unknown); gender and race are kept.

A window starts at a ``[VS]`` and holds everything after it, so the grammar state after the
window equals the state after the whole sequence. It is the longest window within ``keep``
tokens (about half the context by default, :data:`WINDOW_KEEP`, so shifts are rare); if the
current visit alone is longer than ``keep``, the current visit, when it fits in ``limit``;
otherwise there is no window (``None``).

>>> from ehrgpt.tokenizer.vocab import EhrTokenizer
>>> tok = EhrTokenizer.build("day", code_counts={"C/1": 5, "VISIT/9202": 5}, n_subjects=5)
>>> w = Windower(tok)
>>> seq = ["year:2000", "age:40", "GENDER/UNKNOWN", "RACE/UNKNOWN"]
>>> for gap in (["D10"], ["LT", "Y3", "D10"], ["D30"]):
...     seq += ["[VS]", "VISIT/9202", "C/1", "i-D3", "C/1", "[VE]", *gap]
>>> seq += ["[VS]", "VISIT/9202", "C/1"]
>>> ids = [tok.id(t) for t in seq]
>>> window, start, days = w.window(ids, keep=14, limit=30)  # the last two visits
>>> [tok.tokens[i] for i in window][:6], days             # 3 + 10 + 3 + 1105 days later
(['year:2003', 'age:43', 'GENDER/UNKNOWN', 'RACE/UNKNOWN', '[VS]', 'VISIT/9202'], 1121)
>>> w.window(ids, keep=10, limit=30)[1:]                   # only the last visit within keep
(27, 1154)
>>> w.window(ids, keep=3, limit=10)[1:]                    # the current visit, if it fits
(27, 1154)
>>> w.window(ids, keep=3, limit=6) is None                 # not even the current visit fits
True
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from ehrgpt.tokenizer import time_tokens as tt
from ehrgpt.tokenizer.vocab import AGE_UNKNOWN, VS, EhrTokenizer
from ehrgpt.training.data import PROMPT_LEN, prompt_ids

#: Share of the context a window keeps after a shift (the rest is room to generate in).
WINDOW_KEEP = 0.5
_EPOCH = dt.date(1970, 1, 1)


class Windower:
    """Day counting and window rebuilding over the token ids of one tokenizer."""

    def __init__(self, tok: EhrTokenizer) -> None:
        self.tok = tok
        self.vs_id = tok.token_to_id[VS]
        self.lt_id = tok.token_to_id.get(tt.LONG_TOKEN, -1)
        self.age_unknown = tok.token_to_id[AGE_UNKNOWN]
        # Days one token moves the cursor, LT groups aside (counted as a whole).
        self.step = [0] * len(tok)
        for i, t in enumerate(tok.tokens):
            if t.startswith("i-D") and t[3:].isdigit():
                self.step[i] = int(t[3:])
            elif tt.is_att_token(t) and t != tt.LONG_TOKEN and not t.startswith("Y"):
                try:
                    self.step[i] = tt.att_days([t], tok.att_scheme)
                except (ValueError, IndexError):
                    self.step[i] = 0

    def days_between(self, ids: Sequence[int], start: int, stop: int) -> int:
        """Days the tokens ``ids[start:stop]`` move the cursor (``start`` outside an LT group)."""
        days, i = 0, start
        while i < stop:
            t = ids[i]
            if t == self.lt_id:
                group = [self.tok.tokens[x] for x in ids[i : i + 3]]
                days += tt.att_days(group, self.tok.att_scheme)
                i += 3
            else:
                days += self.step[t]
                i += 1
        return days

    def days_before(self, ids: Sequence[int], position: int) -> int:
        """Days from the first visit (``ids[4]``) to the visit starting at ``position``."""
        return self.days_between(ids, PROMPT_LEN, position)

    def prompt(self, first_prompt: Sequence[int], days: int) -> list[int]:
        """The demographic prompt of a window that starts ``days`` after the first visit."""
        year = int(self.tok.tokens[first_prompt[0]][len("year:") :])
        first = (dt.date(year, 7, 1) - _EPOCH).days
        birth = None
        if first_prompt[1] != self.age_unknown:
            age = int(self.tok.tokens[first_prompt[1]][len("age:") :])
            birth = first - round((age + 0.5) * 365.25)
        out = prompt_ids(self.tok, first + days, birth, first_prompt[2], first_prompt[3])
        return [int(x) for x in out]

    def start(self, ids: Sequence[int], keep: int, limit: int, lowest: int = PROMPT_LEN) -> int:
        """Where the window starts (-1 if none): see the module docstring.

        Only ``[VS]`` at or after ``lowest`` are considered, and only those followed by at least
        one token (the visit type), so the window's grammar state is the sequence's.
        """
        n = len(ids)
        last = -1
        for p in range(max(lowest, n - limit + PROMPT_LEN, PROMPT_LEN), n - 1):
            if ids[p] == self.vs_id:
                if PROMPT_LEN + n - p <= keep:
                    return p
                last = p
        return last

    def window(
        self,
        ids: Sequence[int],
        *,
        keep: int,
        limit: int,
        since: tuple[int, int] = (PROMPT_LEN, 0),
    ) -> tuple[list[int], int, int] | None:
        """The rebuilt window of ``ids`` (prompt + tokens from a ``[VS]`` on), where it starts
        in ``ids`` and the day count there.

        ``keep``: preferred largest window; ``limit``: largest window at all. ``since``: a
        position at or before the window start (not inside an LT group) and its day count, to
        count on from an earlier window instead of from the first visit. ``None`` when no
        window of whole visits fits in ``limit``.
        """
        p = self.start(ids, keep, limit, lowest=max(since[0], PROMPT_LEN))
        if p < 0:
            return None
        days = since[1] + self.days_between(ids, since[0], p)
        return self.prompt(ids[:PROMPT_LEN], days) + list(ids[p:]), p, days


__all__ = ["WINDOW_KEEP", "Windower"]

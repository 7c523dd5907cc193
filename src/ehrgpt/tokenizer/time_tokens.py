"""Artificial time tokens (ATT) between visits and day tokens inside visits.

Three schemes map a gap of ``d`` days (d >= 0) to tokens:

=========  ===================================================  =================
scheme     short gaps                                           long gaps
=========  ===================================================  =================
day        d < 1080 -> ``D<d>``                                 ``LT Y<k> D<r>``
cehr_bert  d < 28 -> ``W<d//7>``; d < 360 -> ``M<d//30>``       ``LT Y<k> M<r//30>``
mix        d <= 7 -> ``D<d>``; <= 30 -> ``W<ceil(d/7)>``;       ``LT Y<k> M<ceil(r/30)>``
           <= 360 -> ``M<ceil(d/30)>``
=========  ===================================================  =================

with ``k = d // 365`` and ``r = d % 365``. ``LT`` never loses the real gap: the year token
and the remainder after it keep it (the reference decodes every ``LT`` as 1095 days).

Decoding returns the middle of the range a token stands for, so
``encode(decode(tokens)) == tokens`` always holds and ``|decode(encode(d)) - d|`` is below
the scheme's resolution (0 for ``day``, 3 for weeks, 15 for months).

>>> att_tokens(3, "day"), att_tokens(1500, "day")
(['D3'], ['LT', 'Y4', 'D40'])
>>> att_days(["LT", "Y4", "D40"], "day")
1500
>>> att_tokens(45, "cehr_bert"), att_tokens(10, "mix")
(['M1'], ['W2'])

Inside a visit, a day change of ``n`` days is ``i-D<n>`` (n < 1080); longer changes repeat
``i-D1079`` and end with the remainder:

>>> day_tokens(3), day_tokens(2200)
(['i-D3'], ['i-D1079', 'i-D1079', 'i-D42'])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SCHEMES = ("day", "cehr_bert", "mix")
LONG_TOKEN = "LT"
MAX_YEARS = 150
MAX_DAY_TOKEN = 1079
#: First gap (days) written as ``LT ...`` in each scheme.
LONG_FROM = {"day": 1080, "cehr_bert": 360, "mix": 361}


def _check(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown ATT scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def _short_token(d: int, scheme: str) -> str:
    if scheme == "day":
        return f"D{d}"
    if scheme == "cehr_bert":
        return f"W{d // 7}" if d < 28 else f"M{d // 30}"
    if d <= 7:
        return f"D{d}"
    if d <= 30:
        return f"W{math.ceil(d / 7)}"
    return f"M{math.ceil(d / 30)}"


def _remainder_token(r: int, scheme: str) -> str:
    if scheme == "day":
        return f"D{r}"
    if scheme == "cehr_bert":
        return f"M{r // 30}"
    return f"M{math.ceil(r / 30)}"


def att_tokens(days: int, scheme: str = "day") -> list[str]:
    """The tokens for a gap of ``days`` (negative gaps count as 0)."""
    _check(scheme)
    d = max(int(days), 0)
    if d < LONG_FROM[scheme]:
        return [_short_token(d, scheme)]
    k = min(d // 365, MAX_YEARS)
    return [
        LONG_TOKEN,
        f"Y{k}",
        _remainder_token(d - 365 * k if k < MAX_YEARS else d % 365, scheme),
    ]


def _short_range(token: str, scheme: str) -> tuple[int, int]:
    kind, n = token[0], int(token[1:])
    if scheme == "day" or (scheme == "mix" and kind == "D"):
        return n, n
    if scheme == "cehr_bert":
        if kind == "W":
            return 7 * n, 7 * n + 6
        return max(30 * n, 28), 30 * n + 29
    if kind == "W":
        return max(7 * (n - 1) + 1, 8), min(7 * n, 30)
    return max(30 * (n - 1) + 1, 31), min(30 * n, 360)


def _remainder_range(token: str, scheme: str) -> tuple[int, int]:
    n = int(token[1:])
    if scheme == "day":
        return n, n
    if scheme == "cehr_bert":
        return 30 * n, min(30 * n + 29, 364)
    if n == 0:
        return 0, 0
    return 30 * (n - 1) + 1, min(30 * n, 364)


def att_days(tokens: Sequence[str], scheme: str = "day") -> int:
    """The gap in days that one ATT (one token, or ``LT Y<k> <rest>``) stands for."""
    _check(scheme)
    if tokens[0] == LONG_TOKEN:
        years = int(tokens[1][1:])
        lo, hi = _remainder_range(tokens[2], scheme)
        lo, hi = 365 * years + lo, 365 * years + hi
        lo = max(lo, LONG_FROM[scheme])
        return (lo + max(hi, lo)) // 2
    lo, hi = _short_range(tokens[0], scheme)
    return (lo + hi) // 2


def att_vocab(scheme: str = "day") -> list[str]:
    """Every ATT token of a scheme (short tokens, ``LT``, year and remainder tokens)."""
    _check(scheme)
    tokens: list[str] = []
    for d in range(LONG_FROM[scheme]):
        tok = _short_token(d, scheme)
        if tok not in tokens:
            tokens.append(tok)
    for r in range(365):
        tok = _remainder_token(r, scheme)
        if tok not in tokens:
            tokens.append(tok)
    return [*tokens, LONG_TOKEN, *(f"Y{k}" for k in range(MAX_YEARS + 1))]


def is_att_token(token: str) -> bool:
    """Whether a token is part of an ATT (short, ``LT``, year or remainder).

    >>> is_att_token("D12"), is_att_token("LT"), is_att_token("i-D3"), is_att_token("DEATH")
    (True, True, False, False)
    """
    return token == LONG_TOKEN or (len(token) > 1 and token[0] in "DWMY" and token[1:].isdigit())


def att_lookup(scheme: str, token_ids: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Arrays mapping a short gap (index d) and a long-gap remainder (index r) to token ids."""
    short = np.array(
        [token_ids[_short_token(d, scheme)] for d in range(LONG_FROM[scheme])], dtype=np.int32
    )
    rem = np.array([token_ids[_remainder_token(r, scheme)] for r in range(365)], dtype=np.int32)
    return short, rem


def day_tokens(days: int) -> list[str]:
    """The day tokens for a day change of ``days`` >= 1 inside a visit."""
    q, r = divmod(int(days), MAX_DAY_TOKEN)
    return [f"i-D{MAX_DAY_TOKEN}"] * q + ([f"i-D{r}"] if r else [])


def day_vocab() -> list[str]:
    """Every day token ``i-D1`` .. ``i-D1079``."""
    return [f"i-D{n}" for n in range(1, MAX_DAY_TOKEN + 1)]


def att_parts(days: int) -> tuple[int, int, int]:
    """A gap split into (years, months, days), the targets of the time-decomposition head.

    >>> att_parts(400)
    (1, 1, 5)
    """
    years, rest = divmod(max(int(days), 0), 365)
    months, rest = divmod(rest, 30)
    return years, months, rest

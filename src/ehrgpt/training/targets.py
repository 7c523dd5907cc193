"""Targets of the four pretraining heads for one record's token ids (docs/method.md section 7).

Position ``t`` of every target is about the *next* token ``t + 1`` (the model at ``t`` has
seen tokens ``0..t``):

=============================  ==============================================  ===========
target                         value at position t                             absent
=============================  ==============================================  ===========
``labels``                     token ``t + 1``                                 -100 (last)
``time_year/month/day``        :func:`att_parts` of the gap of the ATT that    -100
                               starts at ``t + 1``
``time_gap``                   that gap in days (:func:`att_days`)             NaN
``value_bin``                  ``k`` if token ``t + 1`` is ``VAL:Q<k>``        -100
=============================  ==============================================  ===========

An ATT is one token (``D12``, ``W2``, ``M3``) or the triple ``LT Y<k> <remainder>``; only its
first token is an ATT start (the remainder of a triple may look like a short ATT, ``D40``, and
is not one). A triple cut off by the end of the record has no time target.

>>> from ehrgpt.tokenizer.vocab import EhrTokenizer
>>> tok = EhrTokenizer.build("day", code_counts={"LAB/1": 5}, n_subjects=5)
>>> words = "[VS] LAB/1 VAL:Q3 [VE] D40 [VS] LAB/1 [VE] LT Y4 D40 [VS]".split()
>>> t = make_targets([tok.id(w) for w in words], tok)
>>> [tok.tokens[i] if i >= 0 else -100 for i in t["labels"][:4]]
['LAB/1', 'VAL:Q3', '[VE]', 'D40']
>>> t["time_gap"].tolist()
[nan, nan, nan, 40.0, nan, nan, nan, 1500.0, nan, nan, nan, nan]
>>> t["time_year"][[3, 7]], t["time_month"][[3, 7]], t["time_day"][[3, 7]]
(array([0, 4]), array([1, 1]), array([10, 10]))
>>> t["value_bin"].tolist()
[-100, 3, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100]
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from ehrgpt.tokenizer import time_tokens as tt
from ehrgpt.tokenizer.values import N_BINS
from ehrgpt.tokenizer.vocab import EhrTokenizer

__all__ = ["IGNORE_INDEX", "TargetBuilder", "make_targets"]

IGNORE_INDEX = -100
#: Any gap of at least 10 years is written ``LT Y<k> <remainder>`` in every scheme.
_LONG_PROBE = 3650


class TargetBuilder:
    """Per-vocabulary lookup arrays that turn token ids into targets with numpy.

    - ``short_days[id]``: gap in days of a single-token ATT, -1 for other tokens;
    - ``year_of[id]``: ``k`` of ``Y<k>``, -1 otherwise; ``remainder_of[id]``: column of a
      remainder token in ``long_days``, -1 otherwise;
    - ``long_days[k, j]``: gap of ``LT Y<k> <remainder j>``.

    Every gap comes from :func:`ehrgpt.tokenizer.time_tokens.att_days`, so targets and decoding
    agree by construction.
    """

    def __init__(self, tokenizer: EhrTokenizer) -> None:
        scheme, ids, n = tokenizer.att_scheme, tokenizer.token_to_id, len(tokenizer)
        self.vocab_size = n
        self.long_id = ids[tt.LONG_TOKEN]
        self.bin_base = tokenizer.bin_base
        self.short_days = np.full(n, -1, dtype=np.int64)
        for d in range(tt.LONG_FROM[scheme]):
            (token,) = tt.att_tokens(d, scheme)
            self.short_days[ids[token]] = tt.att_days([token], scheme)
        self.year_of = np.full(n, -1, dtype=np.int64)
        for k in range(tt.MAX_YEARS + 1):
            self.year_of[ids[f"Y{k}"]] = k
        remainders = list(
            dict.fromkeys(tt.att_tokens(_LONG_PROBE + r, scheme)[2] for r in range(365))
        )
        self.remainder_of = np.full(n, -1, dtype=np.int64)
        self.remainder_of[[ids[r] for r in remainders]] = np.arange(len(remainders))
        self.long_days = np.array(
            [
                [tt.att_days([tt.LONG_TOKEN, f"Y{k}", r], scheme) for r in remainders]
                for k in range(tt.MAX_YEARS + 1)
            ],
            dtype=np.int64,
        )

    def att_gaps(self, ids: np.ndarray) -> np.ndarray:
        """Gap in days of the ATT starting at each position, -1 where none starts."""
        n = len(ids)
        gaps = np.full(n, -1, dtype=np.int64)
        lt = np.flatnonzero(ids == self.long_id)
        inside = np.zeros(n, dtype=bool)  # year and remainder tokens of an LT triple
        inside[(lt + 1)[lt + 1 < n]] = True
        inside[(lt + 2)[lt + 2 < n]] = True
        single = (self.short_days[ids] >= 0) & ~inside
        gaps[single] = self.short_days[ids[single]]
        lt = lt[lt + 2 < n]
        k, j = self.year_of[ids[lt + 1]], self.remainder_of[ids[lt + 2]]
        ok = (k >= 0) & (j >= 0)
        gaps[lt[ok]] = self.long_days[k[ok], j[ok]]
        return gaps

    def __call__(self, input_ids: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """The targets of one record (see the module docstring); numpy arrays of length T."""
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        n = len(ids)
        if n and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}) for this tokenizer; "
                f"got {ids.min()}..{ids.max()}."
            )
        labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
        labels[:-1] = ids[1:]

        gaps = self.att_gaps(ids)
        starts = np.flatnonzero(gaps >= 0)
        starts = starts[starts >= 1]
        before, gap = starts - 1, gaps[starts]
        time_gap = np.full(n, np.nan, dtype=np.float32)
        time_gap[before] = gap
        parts = {}
        years, rest = np.divmod(gap, 365)
        months, days = np.divmod(rest, 30)  # as tt.att_parts
        for name, values in (("time_year", years), ("time_month", months), ("time_day", days)):
            parts[name] = np.full(n, IGNORE_INDEX, dtype=np.int64)
            parts[name][before] = values

        value_bin = np.full(n, IGNORE_INDEX, dtype=np.int64)
        bins = ids[1:] - self.bin_base
        is_bin = (bins >= 0) & (bins < N_BINS)
        value_bin[:-1][is_bin] = bins[is_bin]
        return {"labels": labels, **parts, "time_gap": time_gap, "value_bin": value_bin}


_BUILDERS: dict[int, tuple[weakref.ref, int, TargetBuilder]] = {}


def _builder(tokenizer: EhrTokenizer) -> TargetBuilder:
    """The cached builder of a tokenizer (rebuilt if the vocabulary was expanded)."""
    hit = _BUILDERS.get(id(tokenizer))
    if hit is not None and hit[0]() is tokenizer and hit[1] == len(tokenizer):
        return hit[2]
    for key in [k for k, (ref, _, _) in _BUILDERS.items() if ref() is None]:
        del _BUILDERS[key]
    builder = TargetBuilder(tokenizer)
    _BUILDERS[id(tokenizer)] = (weakref.ref(tokenizer), len(tokenizer), builder)
    return builder


def make_targets(
    input_ids: np.ndarray | torch.Tensor | list[int], tokenizer: EhrTokenizer
) -> dict[str, np.ndarray] | dict[str, torch.Tensor]:
    """Targets of every head for one record: ``labels``, ``time_year``, ``time_month``,
    ``time_day``, ``value_bin`` (int64, -100 where absent) and ``time_gap`` (float32 days,
    NaN where absent), each as long as ``input_ids``.

    Numpy in, numpy out; a tensor in gives (CPU) tensors out. The lookup arrays are built once
    per tokenizer (:class:`TargetBuilder`; a collator may hold one itself).
    """
    targets = _builder(tokenizer)(
        input_ids.cpu().numpy() if isinstance(input_ids, torch.Tensor) else input_ids
    )
    if isinstance(input_ids, torch.Tensor):
        return {k: torch.from_numpy(v) for k, v in targets.items()}
    return targets

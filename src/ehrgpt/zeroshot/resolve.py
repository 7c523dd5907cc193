"""Resolving a sampled future as it is drawn: the outcome happened (hit) or the window passed.

A :class:`Resolver` is the engine's ``stop`` rule (:class:`ehrgpt.generation.engine.StopRule`)
for zero-shot prediction. For every slot it keeps the days from the prediction day to the
cursor of the timeline being sampled, exactly as decoding moves it (docs/method.md sections 2
and 12): time tokens between visits, day tokens inside inpatient visits, and long gaps
(``LT Y<k> <remainder>``: the ``Y<k>`` part is counted when drawn, so a gap that is long enough
already passes the window before its remainder). The days each token adds come from the
grammar's own table (``TimelineGrammar.charge_table``, by automaton state), so the count is
the decoder's, and it carries across window shifts.

A continuation starts at the cursor of its history's last visit, ``offset`` days from the
prediction day (0 when the prediction time falls in that visit; negative when the history
ended earlier). Generated events placed before the prediction day are counted on it: the
history holds everything up to the prediction time, so whatever comes after it is later.

Each drawn token is checked: an outcome code on a day inside the window is a **hit**; a time
token that moves the cursor past the window's end resolves the future as **no hit** (the
``window`` finish); ``[END]`` and death also end it without the outcome. A future that reaches
its token budget before any of these is **unresolved** (the engine's ``budget`` finish); see
:mod:`ehrgpt.zeroshot.risk` for how those are counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ehrgpt.generation.grammar import GrammarState, TimelineGrammar
from ehrgpt.zeroshot.outcome import Outcome

HIT, PASSED = 1, 2
#: Finish names of the codes :meth:`Resolver.check` returns (0: go on).
REASONS = ("", "hit", "window")


class Resolver:
    """The zero-shot stop rule over the slots of one engine run.

    ``offsets[i]``: days from prediction ``i``'s day to its history's cursor (<= 0 normally).
    """

    reasons = REASONS

    def __init__(
        self,
        grammar: TimelineGrammar,
        outcome: Outcome,
        outcome_ids: Sequence[int],
        offsets: Sequence[int],
        *,
        slots: int,
    ) -> None:
        dev = grammar.device
        self.charge = grammar.charge_table.reshape(-1)
        self.vocab = grammar.vocab_size
        self.is_outcome = torch.zeros(self.vocab, dtype=torch.bool, device=dev)
        if outcome_ids:
            self.is_outcome[torch.as_tensor(list(outcome_ids), device=dev)] = True
        self.offsets = torch.as_tensor(list(offsets), dtype=torch.long, device=dev)
        self.elapsed = torch.zeros(slots, dtype=torch.long, device=dev)
        # Whole days: first day inside the window, first day past it.
        if outcome.start_days <= 0:
            self.first_day = 0
        elif outcome.start_inclusive:
            self.first_day = math.ceil(outcome.start_days)
        else:
            self.first_day = math.floor(outcome.start_days) + 1
        if outcome.end_inclusive:
            self.past_day = math.floor(outcome.end_days) + 1
        else:
            self.past_day = math.ceil(outcome.end_days)

    def begin(self, rows: torch.Tensor, prompts: list[int]) -> None:
        """Slots ``rows`` start futures of the predictions with these indices."""
        self.elapsed[rows] = self.offsets[torch.as_tensor(prompts, device=rows.device)]

    def check(self, rows: torch.Tensor, state: GrammarState, choice: torch.Tensor) -> torch.Tensor:
        """HIT, PASSED or 0 per row, for tokens ``choice`` drawn in grammar ``state``."""
        flat = state.state * self.vocab + choice
        elapsed = self.elapsed[rows] + self.charge.index_select(0, flat)
        self.elapsed[rows] = elapsed
        day = elapsed.clamp(min=0)
        passed = day >= self.past_day
        hit = self.is_outcome[choice] & (day >= self.first_day) & ~passed
        return torch.where(hit, HIT, torch.where(passed, PASSED, 0))


__all__ = ["HIT", "PASSED", "REASONS", "Resolver"]

"""The outcome of an ACES task as zero-shot prediction needs it: codes within a time window.

Zero-shot prediction samples futures after each prediction time and counts those in which the
outcome happens within the window (docs/method.md section 12). The task's label must therefore
read as "one of these codes, from ``start`` to ``end`` days after the prediction time". It is
read from the ACES config object (never from the YAML by hand):

- the **outcome** is the label predicate of the labelled window: a code predicate (one code,
  ``any`` of a list, or a ``regex``), or ``or(...)`` of such predicates;
- the **window** is the labelled window's bounds, each a fixed offset from the trigger
  (directly, or through other windows' bounds), minus the offset of the prediction time
  (the ``index_timestamp`` window's bound).

A task that cannot be read so is refused with the reason: a value threshold or a static
predicate as the outcome, an ``and(...)``, a window bound tied to an event (``-> discharge``)
or to the start or end of the record, a window that starts before the prediction time.

>>> o = Outcome("gi_bleed", ("SNOMED/74474003",), 0.0, 365.0, False, True)
>>> o.describe()
'gi_bleed (SNOMED/74474003) within (0, 365] days'
>>> o.in_window(0), o.in_window(365), o.after_window(365), o.after_window(366)
(True, True, False, True)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ehrgpt.errors import EhrgptError
from ehrgpt.tokenizer.vocab import EhrTokenizer


@dataclass(frozen=True)
class Outcome:
    """Outcome codes (exact codes, or ``regex:<pattern>``) and the window after the prediction
    time in days.

    Generated events fall on whole days after the prediction day (day 0 is the prediction
    day itself: a generated event comes after the history, so after the prediction time), so a
    window that starts at the prediction time holds day 0 whatever ``start_inclusive`` says.
    """

    name: str
    codes: tuple[str, ...]
    start_days: float
    end_days: float
    start_inclusive: bool
    end_inclusive: bool

    def describe(self) -> str:
        left = "[" if self.start_inclusive else "("
        right = "]" if self.end_inclusive else ")"
        codes = ", ".join(self.codes[:3]) + (", ..." if len(self.codes) > 3 else "")
        return (
            f"{self.name} ({codes}) within {left}{self.start_days:g}, {self.end_days:g}{right} days"
        )

    def in_window(self, day: float) -> bool:
        """Whether an event ``day`` days after the prediction day is inside the window."""
        return self.starts_by(day) and not self.after_window(day)

    def starts_by(self, day: float) -> bool:
        if self.start_days <= 0:
            return True
        return day >= self.start_days if self.start_inclusive else day > self.start_days

    def after_window(self, day: float) -> bool:
        return day > self.end_days if self.end_inclusive else day >= self.end_days

    def token_ids(self, tok: EhrTokenizer) -> list[int]:
        """Vocabulary ids of the outcome codes (regexes match whole tokens).

        >>> tok = EhrTokenizer.build("day", code_counts={"A/1": 5, "A/2": 5, "B/1": 5},
        ...                          n_subjects=5)
        >>> o = Outcome("x", ("B/1", "regex:^A/"), 0, 30, False, True)
        >>> sorted(tok.tokens[i] for i in o.token_ids(tok))
        ['A/1', 'A/2', 'B/1']
        """
        ids = set()
        for code in self.codes:
            if code.startswith("regex:"):
                pattern = re.compile(code[len("regex:") :])
                ids |= {i for i, t in enumerate(tok.tokens) if pattern.search(t)}
            elif code in tok.token_to_id:
                ids.add(tok.token_to_id[code])
        return sorted(ids)


def _refuse(path: Path | str, why: str) -> EhrgptError:
    return EhrgptError(
        f"Task {path} cannot be predicted zero-shot: {why}. Zero-shot needs a label that reads "
        "as outcome codes within a time window after the prediction time."
    )


def _predicate_codes(cfg, name: str, path) -> list[str]:
    """The codes of a label predicate (a code predicate, or ``or`` of them)."""
    if name in cfg.derived_predicates:
        derived = cfg.derived_predicates[name]
        if not derived.is_or:
            raise _refuse(path, f"its label predicate {name!r} is {derived.expr!r}, not an or(...)")
        return [c for sub in derived.input_predicates for c in _predicate_codes(cfg, sub, path)]
    pred = cfg.plain_predicates.get(name)
    if pred is None:
        raise _refuse(path, f"its label predicate {name!r} is not a code predicate")
    if pred.static:
        raise _refuse(path, f"predicate {name!r} is static (it cannot happen in the future)")
    if pred.value_min is not None or pred.value_max is not None or pred.other_cols:
        raise _refuse(path, f"predicate {name!r} has a value or column condition")
    code = pred.code
    if isinstance(code, dict):
        if "any" in code:
            return [str(c) for c in code["any"]]
        if "regex" in code:
            return [f"regex:{code['regex']}"]
        raise _refuse(path, f"predicate {name!r} has a code rule {sorted(code)} it cannot read")
    return [str(code)]


def _bound_offset(cfg, window: str, which: str, path, seen: frozenset = frozenset()) -> timedelta:
    """Offset of a window bound (``which``: start or end) from the trigger."""
    if (window, which) in seen:
        raise _refuse(path, f"the bounds of window {window!r} refer to each other")
    seen = seen | {(window, which)}
    parsed = getattr(cfg.windows[window], f"_parsed_{which}")
    if parsed.get("event_bound"):
        raise _refuse(
            path, f"window {window!r} {which}s at an event or the record's edge, not a fixed time"
        )
    from aces.utils import parse_timedelta

    offset = parse_timedelta(parsed["offset"]) if parsed.get("offset") else timedelta(0)
    ref = parsed["referenced"]
    if ref == "trigger":
        return offset
    if ref in ("start", "end"):
        return _bound_offset(cfg, window, ref, path, seen) + offset
    other, _, bound = ref.rpartition(".")
    if other in cfg.windows and bound in ("start", "end"):
        return _bound_offset(cfg, other, bound, path, seen) + offset
    raise _refuse(path, f"window {window!r} {which} refers to {ref!r}")


def outcome_from_task(cfg, path: Path | str = "task") -> Outcome:
    """The :class:`Outcome` of an ACES ``TaskExtractorConfig`` (see the module docstring)."""
    label_window = cfg.label_window
    if label_window is None:
        raise _refuse(path, "it has no labelled window")
    window = cfg.windows[label_window]
    codes = tuple(dict.fromkeys(_predicate_codes(cfg, window.label, path)))
    start = _bound_offset(cfg, label_window, "start", path)
    end = _bound_offset(cfg, label_window, "end", path)
    idx_window = cfg.index_timestamp_window
    index = _bound_offset(cfg, idx_window, cfg.windows[idx_window].index_timestamp, path)
    start_days = (start - index).total_seconds() / 86400
    end_days = (end - index).total_seconds() / 86400
    if start_days < 0:
        raise _refuse(
            path, f"window {label_window!r} starts {-start_days:g} days before the prediction time"
        )
    if end_days <= start_days:
        raise _refuse(path, f"window {label_window!r} ends before it starts")
    return Outcome(
        window.label,
        codes,
        start_days,
        end_days,
        bool(window.start_inclusive),
        bool(window.end_inclusive),
    )

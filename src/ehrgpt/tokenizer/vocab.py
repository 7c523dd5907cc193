"""The vocabulary: word-level tokens with stable ids, saved in Hugging Face style files.

Layout (ids in this order, so time, year and age tokens are contiguous ranges):

1. special tokens ``[PAD] [OOV] [START] [END] [VS] [VE] [DEATH]``;
2. the ATT tokens of the scheme, then the day tokens ``i-D1..i-D1079``;
3. ``year:1800..year:2100``, ``age:0..age:130``, ``age:UNKNOWN``;
4. value bins ``VAL:Q0..VAL:Q9``;
5. structure codes seen in training (visit types, discharges, gender, race, plus their
   ``UNKNOWN``, always there), whatever their prevalence; a structure code outside the
   vocabulary is read as its class's ``UNKNOWN`` (``VISIT/UNKNOWN``, ...), never ``[OOV]``;
6. clinical codes and categorical values (``VAL:<code>``) seen in at least
   ``min_prevalence`` of training patients, most frequent first. Static codes (null time in
   MEDS, other than gender and race: ``ETHNICITY/...``) never enter (see :mod:`.fit`).

Expansion for a new dataset appends new codes after the last id, so old ids never move.

>>> tok = EhrTokenizer.build("day", code_counts={"SNOMED/1": 9, "SNOMED/2": 1},
...                          n_subjects=10, min_prevalence=0.5)
>>> tok.token_to_id["[PAD]"], tok.token_to_id["[OOV]"], "SNOMED/1" in tok, "SNOMED/2" in tok
(0, 1, True, False)
>>> tok.id("VISIT/123456") == tok.token_to_id["VISIT/UNKNOWN"], tok.id("X/1") == tok.id("[OOV]")
(True, True)
>>> n = len(tok); added = tok.expand({"SNOMED/2": 7, "SNOMED/3": 8}, n_subjects=10)
>>> added, tok.token_to_id["SNOMED/1"] < n <= tok.token_to_id["SNOMED/2"]
(2, True)
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ehrgpt import __version__
from ehrgpt.errors import EhrgptError
from ehrgpt.meds_format import columns as mc
from ehrgpt.tokenizer import time_tokens as tt
from ehrgpt.tokenizer.values import N_BINS, ValueBins, bins_from_json, bins_to_json
from ehrgpt.util import atomic

PAD, OOV, START, END, VS, VE, DEATH = (
    "[PAD]",
    "[OOV]",
    "[START]",
    "[END]",
    "[VS]",
    "[VE]",
    "[DEATH]",
)
SPECIAL_TOKENS = (PAD, OOV, START, END, VS, VE, DEATH)
YEAR_RANGE = (1800, 2100)
MAX_AGE = 130
AGE_UNKNOWN = "age:UNKNOWN"
VALUE_PREFIX = "VAL:"
STRUCTURE_PREFIXES = (mc.VISIT_PREFIX, mc.DISCHARGE_PREFIX, mc.GENDER_PREFIX, mc.RACE_PREFIX)
ALWAYS_STRUCTURE = tuple(p + mc.UNKNOWN for p in STRUCTURE_PREFIXES)
#: Codes only ever static (null time): kept out of the vocabulary and never sampled.
STATIC_ONLY_PREFIXES = (mc.ETHNICITY_PREFIX,)
#: The discharge that means death ("Patient died"): the death visit must follow it.
DIED_DISCHARGE = mc.discharge_code(mc.DIED_DISCHARGE_CONCEPT)

VOCAB_FILE = "vocab.json"
CONFIG_FILE = "tokenizer_config.json"
BINS_FILE = "value_bins.json"
COUNTS_FILE = "code_counts.json"


def bin_token(index: int) -> str:
    """The token of value bin ``index`` (0..9)."""
    return f"{VALUE_PREFIX}Q{index}"


def value_token(code: str) -> str:
    """The token of a categorical value code."""
    return f"{VALUE_PREFIX}{code}"


def is_structure_code(code: str) -> bool:
    """Visit types, discharges, gender and race: always in the vocabulary once seen."""
    return code.startswith(STRUCTURE_PREFIXES)


def unknown_of(code: str) -> str | None:
    """The ``UNKNOWN`` token of a structure code's class (None for other codes).

    >>> unknown_of("DISCHARGE/8536"), unknown_of("SNOMED/1")
    ('DISCHARGE/UNKNOWN', None)
    """
    for prefix in STRUCTURE_PREFIXES:
        if code.startswith(prefix):
            return prefix + mc.UNKNOWN
    return None


@dataclass
class EhrTokenizer:
    """Token <-> id maps plus what encoding and decoding need (scheme, value bins, counts)."""

    att_scheme: str
    tokens: list[str]
    min_prevalence: float = 0.001
    value_bins: dict[tuple[str, str | None], ValueBins] = field(default_factory=dict)
    code_counts: dict[str, int] = field(default_factory=dict)
    n_subjects: int = 0
    inpatient_visit_codes: tuple[str, ...] = tuple(sorted(mc.INPATIENT_VISIT_CODES))
    #: The latest event date of the training data (None in folders written before it was kept).
    last_date: dt.date | None = None

    def __post_init__(self) -> None:
        self.token_to_id = {t: i for i, t in enumerate(self.tokens)}
        if len(self.token_to_id) != len(self.tokens):
            raise EhrgptError("The vocabulary holds a token twice.")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        att_scheme: str,
        *,
        code_counts: Mapping[str, int],
        n_subjects: int,
        min_prevalence: float = 0.001,
        value_bins: dict[tuple[str, str | None], ValueBins] | None = None,
        last_date: dt.date | None = None,
    ) -> EhrTokenizer:
        """A new vocabulary from per-code patient counts on the training split."""
        tokens = base_tokens(att_scheme)
        tok = cls(att_scheme, tokens, min_prevalence, dict(value_bins or {}), {}, 0)
        tok.expand(code_counts, n_subjects=n_subjects, value_bins=value_bins, last_date=last_date)
        return tok

    def expand(
        self,
        code_counts: Mapping[str, int],
        *,
        n_subjects: int,
        value_bins: dict[tuple[str, str | None], ValueBins] | None = None,
        last_date: dt.date | None = None,
    ) -> int:
        """Append codes of a (new) dataset that pass the prevalence rule; returns how many.

        Existing ids stay as they are; counts are added; value bins of new (code, unit) pairs
        are added while existing bins are kept (their tokens keep their meaning). Static-only
        codes (``ETHNICITY/...``) are never added; ``last_date`` becomes the later of both.
        """
        if last_date is not None:
            self.last_date = max(last_date, self.last_date or last_date)
        for code, n in code_counts.items():
            self.code_counts[code] = self.code_counts.get(code, 0) + int(n)
        self.n_subjects += int(n_subjects)
        for key, b in (value_bins or {}).items():
            self.value_bins.setdefault(key, b)
        threshold = self.min_prevalence * n_subjects
        new = [
            c
            for c, n in code_counts.items()
            if c not in self.token_to_id
            and not c.startswith(STATIC_ONLY_PREFIXES)
            and (is_structure_code(c) or (n >= threshold and n > 0))
        ]
        # Structure codes first, then by frequency, ties by name: deterministic ids.
        new.sort(key=lambda c: (not is_structure_code(c), -code_counts[c], c))
        for code in new:
            self.token_to_id[code] = len(self.tokens)
            self.tokens.append(code)
        return len(new)

    # -- lookups ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return token in self.token_to_id

    def id(self, token: str) -> int:
        """The id of a token; if unknown, its class's ``UNKNOWN`` (structure) or ``[OOV]``."""
        found = self.token_to_id.get(token)
        if found is not None:
            return found
        return self.token_to_id[unknown_of(token) or OOV]

    @property
    def data_end(self) -> dt.date:
        """The latest date a generated event may have: the training data's, or today."""
        return self.last_date or dt.date.today()

    def base(self, first_token: str) -> int:
        """The id of the first token of a contiguous range (``year:1800``, ``i-D1``, ...)."""
        return self.token_to_id[first_token]

    @property
    def year_base(self) -> int:
        return self.token_to_id[f"year:{YEAR_RANGE[0]}"]

    @property
    def age_base(self) -> int:
        return self.token_to_id["age:0"]

    @property
    def day_base(self) -> int:
        """Id of ``i-D1`` (``i-D<n>`` is ``day_base + n - 1``)."""
        return self.token_to_id["i-D1"]

    @property
    def bin_base(self) -> int:
        return self.token_to_id[bin_token(0)]

    def value_unit(self, code: str) -> str | None:
        """The unit whose bins decode a bin token after ``code`` (the most frequent one)."""
        best = None
        for (c, unit), b in self.value_bins.items():
            if c == code and (best is None or b.count > best[1]):
                best = (unit, b.count)
        return None if best is None else best[0]

    # -- files --------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write vocab.json, tokenizer_config.json, value_bins.json and code_counts.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "EhrTokenizer",
            "ehrgpt_version": __version__,
            "att_scheme": self.att_scheme,
            "min_prevalence": self.min_prevalence,
            "n_subjects": self.n_subjects,
            "vocab_size": len(self),
            "special_tokens": list(SPECIAL_TOKENS),
            "pad_token": PAD,
            "unk_token": OOV,
            "bos_token": START,
            "eos_token": END,
            "inpatient_visit_codes": list(self.inpatient_visit_codes),
            "last_date": self.last_date.isoformat() if self.last_date else None,
        }
        files = {
            VOCAB_FILE: self.token_to_id,
            CONFIG_FILE: config,
            BINS_FILE: bins_to_json(self.value_bins),
            COUNTS_FILE: dict(sorted(self.code_counts.items())),
        }
        for name, data in files.items():
            atomic.write_json(directory / name, data)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> EhrTokenizer:
        """Load a tokenizer saved by :meth:`save_pretrained`."""
        directory = Path(directory)
        try:
            vocab = json.loads((directory / VOCAB_FILE).read_text())
            config = json.loads((directory / CONFIG_FILE).read_text())
        except FileNotFoundError as exc:
            raise EhrgptError(
                f"{directory} holds no ehrgpt tokenizer ({exc.filename} is missing)."
            ) from None
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        bins_path, counts_path = directory / BINS_FILE, directory / COUNTS_FILE
        return cls(
            att_scheme=config["att_scheme"],
            tokens=tokens,
            min_prevalence=config["min_prevalence"],
            value_bins=bins_from_json(json.loads(bins_path.read_text()))
            if bins_path.exists()
            else {},
            code_counts=json.loads(counts_path.read_text()) if counts_path.exists() else {},
            n_subjects=config.get("n_subjects", 0),
            inpatient_visit_codes=tuple(
                config.get("inpatient_visit_codes", sorted(mc.INPATIENT_VISIT_CODES))
            ),
            last_date=dt.date.fromisoformat(config["last_date"])
            if config.get("last_date")
            else None,
        )


def base_tokens(att_scheme: str) -> list[str]:
    """The tokens every vocabulary of a scheme starts with (specials, time, year, age, bins)."""
    return [
        *SPECIAL_TOKENS,
        *tt.att_vocab(att_scheme),
        *tt.day_vocab(),
        *(f"year:{y}" for y in range(YEAR_RANGE[0], YEAR_RANGE[1] + 1)),
        *(f"age:{a}" for a in range(MAX_AGE + 1)),
        AGE_UNKNOWN,
        *(bin_token(i) for i in range(N_BINS)),
        *ALWAYS_STRUCTURE,
    ]

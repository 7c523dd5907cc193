"""A batched automaton of the timeline grammar, for constrained sampling (docs/method.md
sections 2 and 8).

Every token id gets a small *class* (year, age, visit type, clinical code, short time token,
...); the automaton has a few dozen states and a transition table ``[state, class]``. A batch
of sequences is a :class:`GrammarState` (one state id per sequence), so
:meth:`TimelineGrammar.allowed` is one row gather from a precomputed ``[n_states, vocab]`` mask
and :meth:`TimelineGrammar.advance` two table lookups: no Python loop over the batch.

The grammar is the one :func:`ehrgpt.tokenizer.decode.decode_tokens` checks, made a little
stricter so that what it allows is what :mod:`ehrgpt.tokenizer.encode` writes:

- a value token (``VAL:Q<k>`` then/or ``VAL:<code>``) comes right after its clinical code (the
  decoder also takes one after a later day token);
- a time token between visits is one of the scheme's short tokens, or ``LT Y<k> <rest>`` with
  the years and remainder the encoder would write for a gap of at least the scheme's long
  threshold (``LT Y0 D5`` decodes, but as 1080 days, so it is refused);
- ``[OOV]`` is consumed like a clinical code (real histories hold it) but never allowed;
  ``[PAD]`` is skipped anywhere and ``[START]`` before the prompt, as the decoder does, but
  neither is allowed, except ``[PAD]`` after ``[END]`` (so a batch can keep stepping);
- a discharge to death (``DISCHARGE/4216643``) ends the timeline: after its ``[VE]`` only the
  death visit the encoder writes may follow (``ATT(0) [VS] [DEATH] [VE]``, then ``[END]``);
- static-only codes (``ETHNICITY/...``, in vocabularies made before they were left out) are
  never allowed.

Time limits (:meth:`TimelineGrammar.time_mask`): each time token moves the date cursor by a
number of days that depends on the state (``D5`` after ``[VE]`` is 5 days, after ``LT Y3``
it is the remainder of a long gap). ``charge_table`` holds those days, ``need_table`` the
fewest days a token commits the record to (``LT`` commits to the shortest long gap). The
engine keeps a day budget per sequence (the training data's end, an age of 120) and a visit
length budget, and masks the time tokens that would exceed them.

So every sequence the grammar accepts and that stops where :meth:`TimelineGrammar.is_complete`
is true decodes without :class:`~ehrgpt.tokenizer.decode.DecodeError`, and every record the
encoder writes is accepted.

>>> from ehrgpt.tokenizer.vocab import EhrTokenizer
>>> tok = EhrTokenizer.build("day", code_counts={"SNOMED/1": 5, "VISIT/9202": 5}, n_subjects=5)
>>> g = TimelineGrammar(tok)
>>> prompt = ["year:2001", "age:40", "GENDER/UNKNOWN", "RACE/UNKNOWN", "[VS]", "VISIT/9202"]
>>> st = g.start(2, [[tok.id(t) for t in prompt]] * 2)
>>> [g.state_name(s) for s in st.state.tolist()]
['OUT', 'OUT']
>>> allowed = g.allowed(st)
>>> bool(allowed[0, tok.id("SNOMED/1")]), bool(allowed[0, tok.id("D7")])
(True, False)
>>> st = g.advance(st, torch.tensor([tok.id("SNOMED/1"), tok.id("[VE]")]))
>>> g.is_complete(st).tolist(), g.tokens_to_finish(st).tolist()
([False, True], [2, 1])
>>> g.start(1, [[tok.id("year:2001"), tok.id("[VS]")]])  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ehrgpt.generation.grammar.GrammarError: prefix 0, position 1: token '[VS]' is not allowed after ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import torch

from ehrgpt.errors import EhrgptError
from ehrgpt.meds_format import columns as mc
from ehrgpt.tokenizer import time_tokens as tt
from ehrgpt.tokenizer.vocab import (
    DEATH,
    DIED_DISCHARGE,
    END,
    OOV,
    PAD,
    START,
    STATIC_ONLY_PREFIXES,
    VALUE_PREFIX,
    VE,
    VS,
    EhrTokenizer,
)


class S(IntEnum):
    """Automaton states (one per sequence)."""

    YEAR = 0  # start: expects year:
    AGE = 1
    GENDER = 2
    RACE = 3
    FIRST_VS = 4  # after the prompt: expects [VS]
    FIRST_TYPE = 5  # after the first [VS]: a visit type
    TYPE = 6  # after a later [VS]: a visit type or [DEATH]
    OUT = 7  # inside a non-inpatient visit, no value can follow
    OUT_CODE = 8  # ... right after a clinical code: a bin or a categorical value may follow
    OUT_BIN = 9  # ... right after code + bin: a categorical value may follow
    IN = 10  # the same three inside an inpatient visit
    IN_CODE = 11
    IN_BIN = 12
    DISCHARGED = 13  # after the discharge token: expects [VE]
    BETWEEN = 14  # after a visit's [VE]: a time token or [END] (may stop here)
    LT_YEAR = 15  # after LT: expects Y<k>
    LT_REM_EDGE = 16  # after the smallest allowed Y<k>: a remainder reaching the threshold
    LT_REM = 17  # after a larger Y<k>: any remainder
    NEXT_VS = 18  # after a time token: expects [VS]
    DEATH = 19  # after [DEATH]: expects [VE]
    DEAD = 20  # after the death visit: only [END] (may stop here)
    DONE = 21  # after [END]: only [PAD]
    DIED = 22  # after a discharge to death: expects [VE]
    AFTER_DIED = 23  # after its [VE]: expects the zero-gap time token
    DEATH_VS = 24  # ... then [VS]
    DEATH_TYPE = 25  # ... then [DEATH]
    ERROR = 26  # absorbing; reached only through advance(check=False)


_WHERE_EXPECTED: dict[S, tuple[str, str]] = {
    S.YEAR: ("at the start", "a year: token"),
    S.AGE: ("after year:", "an age: token"),
    S.GENDER: ("after age:", "a GENDER/ token"),
    S.RACE: ("after GENDER/", "a RACE/ token"),
    S.FIRST_VS: ("after the demographic prompt", "[VS]"),
    S.FIRST_TYPE: ("after the first [VS]", "a VISIT/ type"),
    S.TYPE: ("after [VS]", "a VISIT/ type or [DEATH]"),
    S.OUT: ("inside a visit", "a day token, a clinical code or [VE]"),
    S.OUT_CODE: ("after a clinical code", "a value, a day token, a clinical code or [VE]"),
    S.OUT_BIN: ("after a numeric value", "a categorical value, a day token, a code or [VE]"),
    S.IN: ("inside an inpatient visit", "a day token, a clinical code or DISCHARGE/"),
    S.IN_CODE: ("after a clinical code", "a value, a day token, a clinical code or DISCHARGE/"),
    S.IN_BIN: ("after a numeric value", "a categorical value, a day token, a code or DISCHARGE/"),
    S.DISCHARGED: ("after the discharge", "[VE]"),
    S.BETWEEN: ("after [VE]", "a time token or [END]"),
    S.LT_YEAR: ("after LT", "a year count Y<k> the scheme writes"),
    S.LT_REM_EDGE: ("after LT Y<k>", "a remainder that makes a long gap"),
    S.LT_REM: ("after LT Y<k>", "a remainder token"),
    S.NEXT_VS: ("after a time token", "[VS]"),
    S.DEATH: ("after [DEATH]", "[VE]"),
    S.DEAD: ("after the death visit", "[END]"),
    S.DONE: ("after [END]", "nothing (only [PAD])"),
    S.DIED: ("after a discharge to death", "[VE]"),
    S.AFTER_DIED: ("after a visit discharged to death", "the time token of a zero gap"),
    S.DEATH_VS: ("before the death visit", "[VS]"),
    S.DEATH_TYPE: ("in the death visit", "[DEATH]"),
    S.ERROR: ("after an invalid token", "nothing"),
}

_BODY = {
    S.OUT: (S.OUT, S.OUT_CODE, S.OUT_BIN),
    S.OUT_CODE: (S.OUT, S.OUT_CODE, S.OUT_BIN),
    S.OUT_BIN: (S.OUT, S.OUT_CODE, S.OUT_BIN),
    S.IN: (S.IN, S.IN_CODE, S.IN_BIN),
    S.IN_CODE: (S.IN, S.IN_CODE, S.IN_BIN),
    S.IN_BIN: (S.IN, S.IN_CODE, S.IN_BIN),
}

# Token classes. ATT tokens are "att:" + flags: s (short gap), r (remainder after LT Y<k>),
# e (remainder that reaches the long threshold after the smallest year count), z (a gap of 0).
_NEVER_SAMPLED = ("pad", "start", "oov", "bad")
_INF = 1 << 20  # "cannot finish" in the cost tables


def _step(state: S, kind: str) -> S | None:
    """The state after a token of class ``kind`` in ``state`` (None: not allowed)."""
    if state == S.ERROR:
        return S.ERROR
    if kind == "pad":
        return state
    if state in _BODY:
        base, code, value = _BODY[state]
        inpatient = base == S.IN
        if kind == "day":
            return base
        if kind in ("code", "oov"):
            return code
        if kind == "bin" and state == code:
            return value
        if kind == "cat" and state in (code, value):
            return base
        if kind == "ve" and not inpatient:
            return S.BETWEEN
        if kind == "discharge" and inpatient:
            return S.DISCHARGED
        if kind == "died" and inpatient:
            return S.DIED
        return None
    if kind.startswith("att:"):
        flag = {S.BETWEEN: "s", S.LT_REM: "r", S.LT_REM_EDGE: "e", S.AFTER_DIED: "z"}.get(state)
        if flag is None or flag not in kind[4:]:
            return None
        return S.DEATH_VS if state == S.AFTER_DIED else S.NEXT_VS
    table: dict[S, dict[str, S]] = {
        S.YEAR: {"year": S.AGE, "start": S.YEAR},
        S.AGE: {"age": S.GENDER},
        S.GENDER: {"gender": S.RACE},
        S.RACE: {"race": S.FIRST_VS},
        S.FIRST_VS: {"vs": S.FIRST_TYPE},
        S.FIRST_TYPE: {"visit_in": S.IN, "visit_out": S.OUT},
        S.TYPE: {"visit_in": S.IN, "visit_out": S.OUT, "death": S.DEATH},
        S.DISCHARGED: {"ve": S.BETWEEN},
        S.BETWEEN: {"lt": S.LT_YEAR, "end": S.DONE},
        S.LT_YEAR: {"y_edge": S.LT_REM_EDGE, "y_full": S.LT_REM},
        S.NEXT_VS: {"vs": S.TYPE},
        S.DEATH: {"ve": S.DEAD},
        S.DEAD: {"end": S.DONE},
        S.DIED: {"ve": S.AFTER_DIED},
        S.DEATH_VS: {"vs": S.DEATH_TYPE},
        S.DEATH_TYPE: {"death": S.DEATH},
    }
    return table.get(state, {}).get(kind)


def _classify(tok: EhrTokenizer) -> list[str]:
    """The class name of every token id (the decoder's own tests, in its order)."""
    scheme = tok.att_scheme
    short, rem = tt.att_lookup(scheme, tok.token_to_id)
    k_min, r_min = divmod(tt.LONG_FROM[scheme], 365)
    short_ids, rem_ids, edge_ids = set(short.tolist()), set(rem.tolist()), set(rem[r_min:].tolist())
    zero_id = int(short[0])
    years = {tok.token_to_id[f"Y{k}"]: k for k in range(tt.MAX_YEARS + 1)}
    inpatient = set(tok.inpatient_visit_codes)
    fixed = {PAD: "pad", START: "start", END: "end", VS: "vs", VE: "ve", DEATH: "death"}
    fixed[OOV] = "oov"
    kinds: list[str] = []
    for i, t in enumerate(tok.tokens):
        if t in fixed:
            kind = fixed[t]
        elif t.startswith("i-D"):
            kind = "day" if t[3:].isdigit() and int(t[3:]) > 0 else "bad"
        elif t == DIED_DISCHARGE:
            kind = "died"
        elif t.startswith(mc.DISCHARGE_PREFIX):
            kind = "discharge"
        elif t.startswith(STATIC_ONLY_PREFIXES):
            kind = "bad"
        elif t.startswith(VALUE_PREFIX):
            rest = t[len(VALUE_PREFIX) :]
            kind = "bin" if len(rest) >= 2 and rest[0] == "Q" and rest[1:].isdigit() else "cat"
        elif t.startswith("year:"):
            kind = "year" if t[5:].isdigit() else "bad"
        elif t.startswith("age:"):
            kind = "age"
        elif t.startswith(mc.VISIT_PREFIX):
            kind = "visit_in" if t in inpatient else "visit_out"
        elif t == tt.LONG_TOKEN:
            kind = "lt"
        elif i in years:
            k = years[i]
            kind = "y_edge" if k == k_min else "y_full" if k > k_min else "bad"
        elif tt.is_att_token(t):
            flags = "s" * (i in short_ids) + "r" * (i in rem_ids) + "e" * (i in edge_ids)
            flags += "z" * (i == zero_id)
            kind = f"att:{flags}" if flags else "bad"
        elif t.startswith(mc.GENDER_PREFIX):
            kind = "gender"
        elif t.startswith(mc.RACE_PREFIX):
            kind = "race"
        else:
            kind = "code"
        kinds.append(kind)
    return kinds


def _time_tables(
    tok: EhrTokenizer, kinds: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``charge [n_states, V]``: days a token moves the cursor in a state; ``need``: the fewest
    days it commits the record to (``LT``, ``Y<k>``: the shortest gap they can end in);
    ``visit_charge [V]``: days a token adds to the current visit (``i-D<n>``)."""
    scheme = tok.att_scheme
    k_min = tt.LONG_FROM[scheme] // 365
    n_states, vocab = len(S), len(tok)
    charge = torch.zeros(n_states, vocab, dtype=torch.long)
    visit = torch.zeros(vocab, dtype=torch.long)
    rem_states = {S.LT_REM: k_min + 1, S.LT_REM_EDGE: k_min}
    for i, (t, kind) in enumerate(zip(tok.tokens, kinds, strict=True)):
        if kind == "day":
            visit[i] = int(t[3:])
            for body in _BODY:
                charge[body, i] = int(t[3:])
        elif kind.startswith("att:"):
            for state in (S.BETWEEN, S.AFTER_DIED):
                charge[state, i] = tt.att_days([t], scheme)
            for state, k in rem_states.items():
                if "r" in kind or "e" in kind:
                    charge[state, i] = tt.att_days([tt.LONG_TOKEN, f"Y{k}", t], scheme) - 365 * k
        elif kind in ("y_edge", "y_full"):
            charge[S.LT_YEAR, i] = 365 * int(t[1:])
    need = charge.clone()
    big = 1 << 40
    flags = [k[4:] if k.startswith("att:") else "" for k in kinds]
    for state, flag, y_kind in ((S.LT_REM, "r", "y_full"), (S.LT_REM_EDGE, "e", "y_edge")):
        # Y<k> needs 365 k plus the smallest remainder allowed after it.
        rem = torch.tensor([flag in f for f in flags])
        smallest = int(charge[state][rem].min()) if bool(rem.any()) else big
        ys = torch.tensor([k == y_kind for k in kinds])
        need[S.LT_YEAR, ys] = charge[S.LT_YEAR, ys] + smallest
    lt = torch.tensor([k == "lt" for k in kinds])
    ys = torch.tensor([k in ("y_edge", "y_full") for k in kinds])
    need[S.BETWEEN, lt] = int(need[S.LT_YEAR][ys].min()) if bool(ys.any()) else big
    return charge, need, visit


class GrammarError(EhrgptError, ValueError):
    """A token sequence the grammar refuses; names the sequence, the position and the token."""

    def __init__(self, row: int, position: int, token: str, state: S, what: str = "prefix") -> None:
        where, expected = _WHERE_EXPECTED[state]
        if state == S.ERROR:
            reason = f"token {token} is not a valid token id"
        else:
            reason = f"token {token!r} is not allowed {where} (expected {expected})"
        super().__init__(f"{what} {row}, position {position}: {reason}")
        self.row, self.position, self.token, self.state = row, position, token, state


@dataclass(frozen=True)
class GrammarState:
    """The automaton state of a batch: ``state`` and ``length`` are LongTensors ``[B]``.

    ``length`` counts the tokens consumed so far, ``[PAD]`` excluded. States are immutable:
    :meth:`TimelineGrammar.advance` returns a new one.
    """

    state: torch.Tensor
    length: torch.Tensor

    def __len__(self) -> int:
        return int(self.state.shape[0])

    def __getitem__(self, index: int | slice | torch.Tensor) -> GrammarState:
        """The states of some rows (keeps the batch dimension for an int)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return GrammarState(self.state[index], self.length[index])

    def repeat_interleave(self, n: int) -> GrammarState:
        """Each row ``n`` times in a row (``n`` continuations of each prompt)."""
        return GrammarState(self.state.repeat_interleave(n), self.length.repeat_interleave(n))

    def to(self, device: torch.device | str) -> GrammarState:
        return GrammarState(self.state.to(device), self.length.to(device))


class TimelineGrammar:
    """The timeline grammar of one tokenizer as tables on one device.

    Attributes (all tensors on ``device``):

    - ``token_class`` LongTensor ``[V]``: class id of each token (names in ``class_names``);
    - ``transitions`` LongTensor ``[n_states, n_classes]``: next state (``S.ERROR`` = refused);
    - ``allowed_table`` / ``valid_table`` BoolTensor ``[n_states, V]``: tokens a sampler may
      pick / tokens a given prefix may hold (``valid`` adds ``[OOV]``, ``[PAD]``, ``[START]``);
    - ``finish_cost`` LongTensor ``[n_states]``: fewest tokens to finish, ``[END]`` included;
    - ``closing_table`` BoolTensor ``[n_states, max_need + 1, V]``: the allowed tokens after
      which the record can still finish within ``r`` tokens (see :meth:`closing_mask`).
    """

    def __init__(self, tok: EhrTokenizer, device: torch.device | str | None = None) -> None:
        self.tok = tok
        self.vocab_size = len(tok)
        self.pad_id = tok.token_to_id[PAD]
        self.end_id = tok.token_to_id[END]
        kinds = _classify(tok)
        self.class_names: list[str] = sorted(set(kinds))
        index = {k: c for c, k in enumerate(self.class_names)}
        token_class = torch.tensor([index[k] for k in kinds], dtype=torch.long)
        n_states, n_classes = len(S), len(self.class_names)
        trans = torch.full((n_states, n_classes), int(S.ERROR), dtype=torch.long)
        for s in S:
            for c, kind in enumerate(self.class_names):
                nxt = _step(s, kind)
                if nxt is not None:
                    trans[s, c] = int(nxt)
        counts = torch.bincount(token_class, minlength=n_classes)
        sampled = torch.tensor([k not in _NEVER_SAMPLED for k in self.class_names])
        valid_cls = trans != int(S.ERROR)
        valid_cls[S.ERROR] = False
        allowed_cls = valid_cls & sampled
        allowed_cls[S.DONE, index["pad"]] = True
        # Fewest tokens to reach DONE, over classes that have tokens and may be sampled.
        cost = [_INF] * n_states
        cost[S.DONE] = 0
        usable = allowed_cls & (counts > 0)
        for _ in range(n_states):
            for s in S:
                for c in usable[s].nonzero().flatten().tolist():
                    if s != S.DONE:
                        cost[s] = min(cost[s], 1 + cost[int(trans[s, c])])
        if cost[S.YEAR] >= _INF:
            raise EhrgptError("This vocabulary cannot write a whole record (missing tokens).")
        cost_t = torch.tensor(cost, dtype=torch.long)
        need_cls = (1 + cost_t[trans]).clamp(max=_INF)
        need_cls[~usable] = _INF
        need_cls[S.DONE, index["pad"]] = 0
        self.transitions = trans
        self.token_class = token_class
        self.allowed_table = allowed_cls[:, token_class]
        self.valid_table = valid_cls[:, token_class]
        self.finish_cost = cost_t
        #: With at least this many tokens left, the closing mask equals the allowed mask.
        self.max_need = int(need_cls[need_cls < _INF].max())
        budgets = torch.arange(self.max_need + 1)
        limit = torch.maximum(budgets[None, :], cost_t[:, None])  # [n_states, max_need + 1]
        closing_cls = (need_cls[:, None, :] <= limit[:, :, None]) & usable[:, None, :]
        self.closing_table = closing_cls[:, :, token_class]
        # Flat copies for index_select (several times faster than 2-D fancy indexing on CPU).
        self._trans_flat = trans.reshape(-1)
        self._closing_flat = self.closing_table.reshape(-1, self.vocab_size)
        self._bias: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self.complete_table = torch.zeros(n_states, dtype=torch.bool)
        self.complete_table[[S.BETWEEN, S.DEAD, S.DONE]] = True
        self.charge_table, self.need_table, self.visit_charge = _time_tables(tok, kinds)
        self.vs_id = tok.token_to_id[VS]
        self.ve_id = tok.token_to_id[VE]
        #: Discharge tokens, and the states (inside an inpatient stay) where the probability of
        #: a refused ``[VE]`` goes to them (see :meth:`mask_logits`).
        self.discharge_ids = torch.tensor(
            [i for i, k in enumerate(kinds) if k in ("discharge", "died")], dtype=torch.long
        )
        self.stay_table = torch.zeros(n_states, dtype=torch.bool)
        self.stay_table[[S.IN, S.IN_CODE, S.IN_BIN]] = True
        self.device = torch.device("cpu")
        if device is not None:
            self.to(device)

    # -- device -------------------------------------------------------------------------
    _TABLES = (
        "transitions",
        "token_class",
        "allowed_table",
        "valid_table",
        "finish_cost",
        "closing_table",
        "complete_table",
        "_trans_flat",
        "_closing_flat",
        "charge_table",
        "need_table",
        "visit_charge",
        "discharge_ids",
        "stay_table",
    )

    def to(self, device: torch.device | str) -> TimelineGrammar:
        """Move the tables to ``device`` (in place; returns self)."""
        for name in self._TABLES:
            setattr(self, name, getattr(self, name).to(device))
        self._bias = {}
        self.device = torch.device(device)
        return self

    # -- states -------------------------------------------------------------------------
    @staticmethod
    def state_name(state: int) -> str:
        """The name of a state id (``'OUT'``, ``'BETWEEN'``, ...)."""
        return S(int(state)).name

    def _fresh(self, batch: int) -> GrammarState:
        zeros = torch.zeros(batch, dtype=torch.long, device=self.device)
        return GrammarState(zeros + int(S.YEAR), zeros.clone())

    def _as_ids(self, prefixes: Sequence[Sequence[int]] | torch.Tensor) -> torch.Tensor:
        """A right-padded LongTensor ``[B, T]`` of token ids (``[PAD]`` pads)."""
        if isinstance(prefixes, torch.Tensor):
            ids = prefixes.to(self.device, torch.long)
            return ids if ids.dim() == 2 else ids.unsqueeze(0)
        rows = [torch.as_tensor(list(p), dtype=torch.long) for p in prefixes]
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
        return ids.to(self.device)

    def start(
        self,
        batch: int | None = None,
        prompt_ids: Sequence[Sequence[int]] | torch.Tensor | None = None,
        *,
        check: bool = True,
    ) -> GrammarState:
        """The state after consuming each prefix (a prompt, a whole history, or nothing).

        ``prompt_ids``: one list of ids per sequence, or a LongTensor ``[B, T]`` padded with
        ``[PAD]`` (left or right). One prefix with ``batch > 1`` is repeated. With ``check``
        raises :class:`GrammarError` naming the prefix and the position of the first refused
        token; without it a refused prefix's state is ``S.ERROR`` (see :meth:`is_refused`).
        """
        if prompt_ids is None:
            if batch is None:
                raise ValueError("start() needs a batch size or prompts")
            return self._fresh(batch)
        ids = self._as_ids(prompt_ids)
        if batch is not None and ids.shape[0] != batch:
            if ids.shape[0] != 1:
                raise ValueError(f"{ids.shape[0]} prompts for a batch of {batch}")
            ids = ids.expand(batch, -1)
        return self.consume(self._fresh(ids.shape[0]), ids, check=check)

    def trace(self, ids: torch.Tensor, state: GrammarState | None = None) -> torch.Tensor:
        """The state before each token and after the last: LongTensor ``[B, T + 1]``.

        Refused tokens lead to ``S.ERROR`` (absorbing); nothing is raised.
        """
        ids = self._as_ids(ids)
        self._check_range(ids)
        cur = self._fresh(ids.shape[0]).state if state is None else state.state
        out = torch.empty(ids.shape[1] + 1, ids.shape[0], dtype=torch.long, device=self.device)
        cls = self.token_class[ids.t().contiguous()]
        out[0] = cur
        for t in range(ids.shape[1]):
            cur = self.transitions[cur, cls[t]]
            out[t + 1] = cur
        return out.t()

    def consume(
        self, state: GrammarState, ids: torch.Tensor, *, check: bool = True
    ) -> GrammarState:
        """Advance ``state`` over the columns of ``ids`` ``[B, T]``; with ``check`` raises on a
        refused token (or an id outside the vocabulary), else that row goes to ``S.ERROR``."""
        ids = self._as_ids(ids)
        outside = (ids < 0) | (ids >= self.vocab_size)
        if check:
            self._check_range(ids)
        cls = self.token_class[ids.masked_fill(outside, self.pad_id).t().contiguous()]
        cur = state.state
        for t in range(ids.shape[1]):
            cur = self.transitions[cur, cls[t]]
        cur = cur.masked_fill(outside.any(dim=1), int(S.ERROR))
        bad = (cur == int(S.ERROR)) & (state.state != int(S.ERROR))
        if check and bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            states = self.trace(ids[row : row + 1], state[row])[0]
            pos = int((states[1:] == int(S.ERROR)).nonzero()[0, 0])
            token = self.tok.tokens[int(ids[row, pos])]
            raise GrammarError(row, pos, token, S(int(states[pos])))
        length = state.length + (ids != self.pad_id).sum(dim=1)
        return GrammarState(cur, length)

    def _check_range(self, ids: torch.Tensor) -> None:
        outside = (ids < 0) | (ids >= self.vocab_size)
        if bool(outside.any()):
            row, pos = (int(x) for x in outside.nonzero()[0])
            raise GrammarError(row, pos, f"id {int(ids[row, pos])}", S.ERROR)

    # -- one step -----------------------------------------------------------------------
    def allowed(self, state: GrammarState) -> torch.Tensor:
        """BoolTensor ``[B, V]``: the tokens a sampler may pick next."""
        return self.allowed_table.index_select(0, state.state)

    def advance(
        self, state: GrammarState, token_ids: torch.Tensor, *, check: bool = True
    ) -> GrammarState:
        """The state after one token per sequence (``token_ids`` LongTensor ``[B]``).

        With ``check`` a token the grammar refuses raises :class:`GrammarError` (one host
        sync per call); without it the sequence goes to the absorbing ``S.ERROR`` state.
        ``[OOV]``, ``[PAD]`` and ``[START]`` are consumed where the decoder tolerates them.
        """
        token_ids = token_ids.reshape(-1)
        cls = self.token_class.index_select(0, token_ids)
        nxt = self._trans_flat.index_select(0, state.state * self.transitions.shape[1] + cls)
        if check:
            bad = nxt == int(S.ERROR)
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise GrammarError(
                    row,
                    int(state.length[row]),
                    self.tok.tokens[int(token_ids[row])],
                    S(int(state.state[row])),
                    what="sequence",
                )
        return GrammarState(nxt, state.length + (token_ids != self.pad_id))

    def is_complete(self, state: GrammarState) -> torch.Tensor:
        """BoolTensor ``[B]``: the sequence may stop here (after a visit's ``[VE]``, the death
        visit, or ``[END]``); ``[END]`` is allowed in the first two."""
        return self.complete_table[state.state]

    def time_mask(
        self, state: GrammarState, days_left: torch.Tensor, visit_days_left: torch.Tensor
    ) -> torch.Tensor:
        """BoolTensor ``[B, V]``: tokens that keep the record within ``days_left`` more days
        in all and ``visit_days_left`` more days in the current visit (LongTensors ``[B]``)."""
        need = self.need_table.index_select(0, state.state)
        return (need <= days_left[:, None]) & (
            self.visit_charge[None, :] <= visit_days_left[:, None]
        )

    def spend_time(
        self,
        state: GrammarState,
        token_ids: torch.Tensor,
        days_left: torch.Tensor,
        visit_days_left: torch.Tensor,
        max_visit_days: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The budgets after one token per sequence in ``state`` (before :meth:`advance`)."""
        flat = state.state * self.vocab_size + token_ids
        days = days_left - self.charge_table.reshape(-1).index_select(0, flat)
        visit = visit_days_left - self.visit_charge.index_select(0, token_ids)
        visit = torch.where(token_ids == self.vs_id, max_visit_days, visit)
        return days, visit

    def is_refused(self, state: GrammarState) -> torch.Tensor:
        """BoolTensor ``[B]``: the sequence holds a token the grammar refuses."""
        return state.state == int(S.ERROR)

    def is_done(self, state: GrammarState) -> torch.Tensor:
        """BoolTensor ``[B]``: ``[END]`` was consumed (only ``[PAD]`` is allowed now)."""
        return state.state == int(S.DONE)

    def tokens_to_finish(self, state: GrammarState) -> torch.Tensor:
        """LongTensor ``[B]``: fewest tokens to finish validly, ``[END]`` included."""
        return self.finish_cost[state.state]

    def closing_mask(self, state: GrammarState, remaining: int | torch.Tensor) -> torch.Tensor:
        """BoolTensor ``[B, V]``: allowed tokens after which the record can still finish.

        ``remaining`` (an int or LongTensor ``[B]``) is how many more tokens each sequence may
        take, ``[END]`` included. A token is kept when 1 + the fewest tokens to finish after it
        fits in ``remaining``; so the mask equals :meth:`allowed` until the budget is nearly
        spent, then steers to the shortest ending (discharge, ``[VE]``, ``[END]``). If the
        budget is already too small, the shortest ending is kept (never an empty mask).
        Sampling from this mask at every step with ``remaining = budget - steps`` ends every
        sequence (``[END]`` included) within ``budget`` tokens whenever
        ``budget >= tokens_to_finish`` at the start.
        """
        if isinstance(remaining, int) and remaining >= self.max_need:
            return self.allowed(state)
        return self._closing_flat.index_select(0, self._closing_rows(state, remaining))

    def _closing_rows(self, state: GrammarState, remaining: int | torch.Tensor) -> torch.Tensor:
        """Row ids into the flat closing table (budget ``max_need`` = the allowed mask)."""
        if isinstance(remaining, int):
            budget: int | torch.Tensor = min(max(remaining, 0), self.max_need)
        else:
            budget = remaining.to(state.state.device, torch.long).clamp(0, self.max_need)
        return state.state * (self.max_need + 1) + budget

    def mask_logits(
        self,
        logits: torch.Tensor,
        state: GrammarState,
        remaining: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``logits`` ``[B, V']`` with refused tokens set to ``-inf`` (columns past the
        vocabulary too, for a model whose output is padded to a larger size).

        Inside an inpatient stay ``[VE]`` is refused because the stay closes with its
        discharge first; the probability the model gives ``[VE]`` there goes to the discharge
        tokens, in proportion to theirs (:meth:`fold_stay_end`), so a model that wants the
        stay to end ends it instead of writing more events into it."""
        logits = self.fold_stay_end(logits, state)
        key = (logits.dtype, logits.device)
        if key not in self._bias:
            bias = torch.zeros(self._closing_flat.shape, dtype=logits.dtype, device=logits.device)
            self._bias[key] = bias.masked_fill_(~self._closing_flat, float("-inf"))
        rows = self._closing_rows(state, self.max_need if remaining is None else remaining)
        # One fresh [B, V] buffer, added to in place: much faster on CPU than `logits + bias`.
        out = self._bias[key].index_select(0, rows)
        if logits.shape[-1] > self.vocab_size:
            extra = logits.shape[-1] - self.vocab_size
            out = torch.nn.functional.pad(out, (0, extra), value=-torch.inf)
        return out.add_(logits)

    def fold_stay_end(self, logits: torch.Tensor, state: GrammarState) -> torch.Tensor:
        """``logits`` where, in rows inside an inpatient stay, each discharge token's
        probability ``p_d`` becomes ``p_d * (1 + p([VE]) / sum(p_discharge))``: the discharges
        take ``[VE]``'s share (a no-op for a model that gives ``[VE]`` nothing there)."""
        if not len(self.discharge_ids):
            return logits
        disc = logits.index_select(1, self.discharge_ids)
        gain = torch.nn.functional.softplus(logits[:, self.ve_id] - torch.logsumexp(disc, dim=-1))
        rows = self.stay_table.index_select(0, state.state) & torch.isfinite(gain)
        gain = torch.where(rows, gain, torch.zeros_like(gain))
        return logits.index_add(1, self.discharge_ids, gain[:, None].expand_as(disc).contiguous())


__all__ = ["GrammarError", "GrammarState", "S", "TimelineGrammar"]

"""The sampling engine: batched, key/value-cached, grammar-constrained, with slot refilling.

A fixed number of *slots* (the batch) each hold one sequence. A slot's keys and values live in
a preallocated :class:`SlotCache`; when a sequence finishes (``[END]``), its slot takes the
next prompt at once (its prompt is run through the model, "prefill", while the other slots
wait one step), so little compute goes to padding or to finished sequences.

At each step the logits of every active slot are masked by the timeline grammar
(:class:`~ehrgpt.generation.grammar.TimelineGrammar`): only tokens that keep the timeline valid
can be sampled, and when a sequence's token budget is nearly spent the mask steers it to the
shortest valid ending. Time tokens are also kept within a per-prompt day budget (for example
up to the training data's last date; see :func:`~ehrgpt.tokenizer.decode.day_budget`) and a
visit within :data:`~ehrgpt.tokenizer.decode.MAX_VISIT_DAYS`. Then temperature, top-k and
top-p apply, and one token is drawn per slot from a seeded ``torch.Generator``.

Prompts are token id lists: a demographic prompt (4 tokens) for a new patient, or a real
patient's history (the conditional continuation zero-shot prediction uses; see
:func:`history_prompt`). With the grammar on, a prompt the grammar refuses (a token out of
place, an id outside the vocabulary) is not run: it comes back at once as a
:class:`Generated` with ``finish="refused"`` and the reason, and the batch goes on.

A patient is not limited to the model's context: when a slot's sequence fills the context, the
slot keeps its most recent whole visits behind a demographic prompt rebuilt for the first kept
visit (:mod:`ehrgpt.generation.window`), runs that window through the model again, and goes on
("window shift"); a history longer than the context starts from such a window. The budget is
per patient (``max_tokens_per_patient``, across windows), and what is yielded is the whole
timeline: the original prompt and every token generated (docs/method.md section 8).

**Several continuations of one prompt** (``samples``, what zero-shot prediction draws) share
its prefill: the prompt runs through the model once, and each further continuation's slot
starts from a copy of those keys and values (copy-on-fork), also when it gets a slot only
later (the prefill is kept until the prompt's last continuation has a slot).

**Stopping early**: a ``stop`` rule (see :class:`StopRule`), a step separate from the grammar
mask, looks at each drawn token and may end its continuation at once with a reason of its own
(zero-shot prediction stops a future when the outcome appears or its window has passed,
:mod:`ehrgpt.zeroshot.resolve`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ehrgpt.generation.grammar import GrammarError, GrammarState, S, TimelineGrammar
from ehrgpt.generation.window import WINDOW_KEEP, Windower
from ehrgpt.model import EhrGptForCausalLM
from ehrgpt.tokenizer.decode import MAX_VISIT_DAYS
from ehrgpt.tokenizer.vocab import END, PAD, VE, EhrTokenizer
from ehrgpt.training.data import PROMPT_LEN

#: Budget per patient when none is given: this many contexts.
DEFAULT_BUDGET_CONTEXTS = 4


@dataclass
class SamplingConfig:
    """How tokens are drawn (the documented reference run: temperature 1, top-p 1)."""

    #: New tokens per patient over all windows (``[END]`` included); None: 4 contexts.
    max_tokens_per_patient: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    grammar: bool = True
    #: Share of the context a window shift keeps (see :mod:`ehrgpt.generation.window`).
    window_keep: float = WINDOW_KEEP

    def check(self) -> None:
        if self.max_tokens_per_patient is not None and self.max_tokens_per_patient < 1:
            raise ValueError("max_tokens_per_patient must be at least 1")
        if not 0 < self.window_keep < 1:
            raise ValueError("window_keep must be in (0, 1)")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 = off)")


@dataclass
class Generated:
    """One finished sequence: which prompt, all its tokens (prompt first), why it stopped.

    ``finish``: ``"end"`` (``[END]`` sampled), ``"death"`` (``[END]`` after the death visit),
    ``"budget"`` (the total budget ran out, or ``[END]`` came while it was steering to an end),
    ``"context"`` (the current visit alone outgrew the context; the timeline is cut after its
    last whole visit) or ``"refused"`` (the grammar refused the prompt; nothing was generated
    and ``reason`` says why), or a reason of the ``stop`` rule. ``shifts``: window shifts this
    patient took. ``sample``: which continuation of its prompt (0 .. samples - 1).
    """

    index: int
    token_ids: list[int]
    n_prompt: int
    finish: str
    reason: str = ""  # why the grammar refused the prompt (finish "refused")
    shifts: int = 0
    sample: int = 0


class StopRule(Protocol):
    """Ends continuations early, after the grammar: see :mod:`ehrgpt.zeroshot.resolve`.

    ``reasons[code]`` names the finish of a continuation stopped with ``code`` (code 0: go on).
    """

    reasons: tuple[str, ...]

    def begin(self, rows: torch.Tensor, prompts: list[int]) -> None:
        """Slots ``rows`` start a continuation of the prompts with these indices."""

    def check(self, rows: torch.Tensor, state: GrammarState, choice: torch.Tensor) -> torch.Tensor:
        """LongTensor ``[R]``: a code per row for the tokens ``choice`` drawn in ``state``."""


@dataclass
class EngineStats:
    """Throughput figures of one :meth:`Engine.generate` run."""

    sequences: int = 0
    refused_prompts: int = 0
    new_tokens: int = 0
    prompt_tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    shifts: int = 0  # window shifts (re-prefills of a rebuilt window)
    shift_tokens: int = 0  # tokens run through the model again by those shifts
    shift_seconds: float = 0.0
    shifted_sequences: int = 0  # sequences with at least one shift
    forks: int = 0  # continuations started from a copy of their prompt's prefill
    forked_tokens: int = 0  # prompt tokens those copies saved running through the model

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


_NO_LIMIT = 1 << 40  # days: no time budget


class SlotCache:
    """Keys and values of every slot: ``[layers, slots, kv_heads, max_len, head_dim]``.

    Before each forward, :meth:`select` says which slots take part (``rows``), where their new
    tokens go (``write_pos``) and how many cached positions attention reads (``span``). The
    attention layers call :meth:`update` (the Hugging Face cache method) with the new keys and
    values and get back the whole visible cache of those rows.
    """

    def __init__(
        self,
        n_layers: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (n_layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_len = slots, max_len
        self.rows = torch.arange(slots, device=device)
        self.write_pos = torch.zeros(slots, dtype=torch.long, device=device)
        self.span = 0
        self._all = True

    def select(self, rows: torch.Tensor, write_pos: torch.Tensor, span: int) -> None:
        """Rows of this forward (all slots, or the slots being prefilled), write positions,
        visible length."""
        self.rows, self.write_pos, self.span = rows, write_pos, span
        self._all = len(rows) == self.slots

    def update(
        self, k: torch.Tensor, v: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        pos = self.write_pos[:, None] + torch.arange(t, device=k.device)
        rows = self.rows[:, None]
        kb, vb = self.k[layer_idx], self.v[layer_idx]
        kb[rows, :, pos] = k.transpose(1, 2).to(kb.dtype)
        vb[rows, :, pos] = v.transpose(1, 2).to(vb.dtype)
        if self._all:
            return kb[:, :, : self.span], vb[:, :, : self.span]
        return kb[self.rows, :, : self.span], vb[self.rows, :, : self.span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.span


def _filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k and top-p on ``[R, V]`` float logits (refused tokens are -inf)."""
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > cfg.top_p  # keep the first token past top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def _draw(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One draw per row from ``probs`` [R, V] by inverting the cumulative sum.

    One uniform number per row: on CPU about 20x faster than ``torch.multinomial``. The
    first token whose cumulative probability exceeds the draw always has a probability above
    zero, so masked tokens are never drawn.
    """
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=gen, device=probs.device)
    u = u * cdf[:, -1:] * (1 - 1e-6)
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


@dataclass
class _Prefix:
    """A prompt's prefill, kept for its continuations that get a slot in a later round."""

    fed: Sequence[int]  # what ran through the model (the prompt, or its window)
    since: tuple[int, int]  # (position, day count) of the window start in the prompt
    logits: torch.Tensor  # next-token logits after the prompt [V]
    k: torch.Tensor  # keys [layers, kv_heads, len, head_dim]
    v: torch.Tensor
    state: tuple[int, int]  # grammar state and length after the prompt


class Engine:
    """Generates continuations of prompts with one model; see the module docstring."""

    def __init__(
        self,
        model: EhrGptForCausalLM,
        tok: EhrTokenizer,
        *,
        batch_size: int = 64,
        device: torch.device | str | None = None,
        context: int | None = None,
    ) -> None:
        """``context``: tokens a slot holds before a window shift (default: the model's
        ``max_position_embeddings``; smaller values force shifts, for tests and benchmarks)."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tok = tok
        self.batch_size = batch_size
        self.grammar = TimelineGrammar(tok, device=self.device)
        self.end_id, self.pad_id = tok.token_to_id[END], tok.token_to_id[PAD]
        self.stats = EngineStats()
        self.context = context or getattr(model.config, "max_position_embeddings", None)
        self.windower = Windower(tok)
        self.ve_id = tok.token_to_id[VE]

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        cfg: SamplingConfig | None = None,
        *,
        seed: int = 0,
        on_step=None,
        day_budgets: Sequence[int] | None = None,
        samples: int = 1,
        stop: StopRule | None = None,
    ) -> Iterator[Generated]:
        """Yield each continuation as soon as it finishes (not in prompt order).

        ``samples``: continuations per prompt, sharing its prefill. ``day_budgets``: per
        prompt, the most days its new time tokens may add (none: no limit). ``stop``: a rule
        that may end a continuation early (needs the grammar). ``on_step(n_finished)`` is
        called after every step (for progress bars).
        """
        cfg = cfg or SamplingConfig()
        cfg.check()
        if samples < 1:
            raise ValueError("samples must be at least 1")
        if stop is not None and not cfg.grammar:
            raise ValueError("a stop rule reads the grammar's time accounting: keep the grammar")
        if not prompts:
            return
        started = time.perf_counter()
        c = self.model.config
        budget = cfg.max_tokens_per_patient or DEFAULT_BUDGET_CONTEXTS * (self.context or 1024)
        max_len = max(len(p) for p in prompts) + budget
        if self.context:
            max_len = min(max_len, self.context)
        keep = max(int(max_len * cfg.window_keep), PROMPT_LEN + 2)
        slots = min(self.batch_size, len(prompts) * samples)
        dtype = next(self.model.parameters()).dtype
        cache = SlotCache(
            c.num_hidden_layers,
            slots,
            c.num_key_value_heads,
            c.head_dim,
            max_len,
            dtype=dtype,
            device=self.device,
        )
        gen = torch.Generator(device=self.device).manual_seed(seed)
        g = self.grammar
        dev = self.device

        queue = deque((i, k) for i in range(len(prompts)) for k in range(samples))
        prefixes: dict[int, _Prefix] = {}  # kept prefills of prompts with samples still queued
        refused_ids: set[int] = set()
        index = [-1] * slots  # prompt index per slot (-1 = free)
        sample_of = [0] * slots
        tokens: list[list[int]] = [[] for _ in range(slots)]
        n_prompt = [0] * slots
        pos = torch.zeros(slots, dtype=torch.long, device=dev)  # tokens in the cache
        last = torch.full((slots,), self.pad_id, dtype=torch.long, device=dev)
        new = torch.zeros(slots, dtype=torch.long, device=dev)  # tokens generated
        gstate = torch.zeros(slots, dtype=torch.long, device=dev)
        glen = torch.zeros(slots, dtype=torch.long, device=dev)
        days_left = torch.zeros(slots, dtype=torch.long, device=dev)
        visit_left = torch.zeros(slots, dtype=torch.long, device=dev)
        budgets = list(day_budgets) if day_budgets is not None else None
        finished = 0
        all_rows = torch.arange(slots, device=dev)
        cached = [0] * slots  # host copy of pos
        shifts = [0] * slots  # window shifts per slot
        since = [(PROMPT_LEN, 0)] * slots  # (position, day count) of the current window start

        def finish(r: int, reason: str, ids: list[int]) -> Generated:
            nonlocal finished
            out = Generated(
                index[r], ids, n_prompt[r], reason, shifts=shifts[r], sample=sample_of[r]
            )
            self.stats.shifted_sequences += shifts[r] > 0
            index[r] = -1
            finished += 1
            return out

        def sample(rows: torch.Tensor, logits: torch.Tensor) -> list[Generated]:
            state = GrammarState(gstate[rows], glen[rows])
            logits = logits.float()
            remaining = budget - new[rows]
            if cfg.grammar:
                logits = g.mask_logits(logits, state, remaining)
                logits = self._within_time(logits, state, days_left[rows], visit_left[rows])
            if cfg.temperature == 0:
                choice = logits.argmax(dim=-1)
            else:
                probs = _filter_logits(logits, cfg).softmax(dim=-1)
                choice = _draw(probs, gen)
            stopped = stop.check(rows, state, choice).tolist() if stop is not None else None
            if cfg.grammar:
                days_left[rows], visit_left[rows] = g.spend_time(
                    state, choice, days_left[rows], visit_left[rows], MAX_VISIT_DAYS
                )
                nxt = g.advance(state, choice, check=False)
                gstate[rows], glen[rows] = nxt.state, nxt.length
            new[rows] += 1
            last[rows] = choice
            self.stats.new_tokens += len(rows)
            done: list[Generated] = []
            chosen = choice.tolist()
            if self.end_id in chosen:  # how each ending sequence ended (one host copy)
                ended = self._ending(state, remaining, cfg.grammar)
            for k, (r, t) in enumerate(zip(rows.tolist(), chosen, strict=True)):
                if t == self.end_id:
                    done.append(finish(r, ended[k], tokens[r]))
                    continue
                tokens[r].append(t)
                if stopped is not None and stopped[k]:
                    done.append(finish(r, stop.reasons[stopped[k]], tokens[r]))
                elif int(new[r]) >= budget:
                    done.append(finish(r, "budget", tokens[r]))
            return done

        def shift(full: list[int]) -> Iterator[Generated]:
            """Window shifts of the slots whose sequence filled the cache."""
            t0 = time.perf_counter()
            take, windows = [], []
            for r in full:
                w = self.windower.window(tokens[r], keep=keep, limit=max_len - 1, since=since[r])
                if w is None:  # the current visit alone is longer than the context
                    yield finish(r, "context", self._cut_to_visit(tokens[r], n_prompt[r]))
                    continue
                windows.append(w[0])
                since[r] = (w[1], w[2])
                shifts[r] += 1
                take.append(r)
            if take:
                rows = torch.tensor(take, device=dev)
                logits, _ = self._prefill(cache, rows, windows)
                pos[rows] = torch.tensor([len(w) for w in windows], device=dev)
                for r, w in zip(take, windows, strict=True):
                    cached[r] = len(w)
                self.stats.shifts += len(take)
                self.stats.shift_tokens += sum(len(w) for w in windows)
                yield from sample(rows, logits)
            self.stats.shift_seconds += time.perf_counter() - t0

        def refuse(i: int, reason: str) -> Iterator[Generated]:
            """Every continuation of a prompt that cannot run, at once."""
            nonlocal finished
            refused_ids.add(i)
            self.stats.refused_prompts += 1
            finished += samples
            for k in range(samples):
                yield Generated(i, list(prompts[i]), len(prompts[i]), "refused", reason, sample=k)

        def admit(free: list[int]) -> Iterator[Generated]:
            """Free slots take the next continuations: a prompt new to the engine is run
            through the model once (prefill); its other continuations copy that prefill."""
            items: list[tuple[int, int]] = []
            while queue and len(items) < len(free):
                item = queue.popleft()
                if item[0] not in refused_ids:
                    items.append(item)
            fresh = list(dict.fromkeys(i for i, _ in items if i not in prefixes))
            states: dict[int, tuple[int, int]] = {}
            if fresh and cfg.grammar:
                good, st, refused = self._check_prompts([(i, prompts[i]) for i in fresh])
                for res in refused:
                    yield from refuse(res.index, res.reason)
                states = {
                    i: (int(s), int(n))
                    for (i, _), s, n in zip(
                        good, st.state.tolist(), st.length.tolist(), strict=True
                    )
                }
            fitted: dict[int, tuple[Sequence[int], tuple[int, int]]] = {}
            for i in fresh:
                if i in refused_ids:
                    continue
                fit = self._fit_prompt(prompts[i], keep, max_len)
                if fit is None:
                    yield from refuse(
                        i, f"its last visit alone is longer than the context ({max_len} tokens)"
                    )
                    continue
                fitted[i] = fit
            items = [(i, k) for i, k in items if i not in refused_ids]
            if not items:
                return
            take = free[: len(items)]
            first_slot: dict[int, int] = {}
            for s, (i, _) in zip(take, items, strict=True):
                if i in fitted and i not in first_slot:
                    first_slot[i] = s
            run = list(first_slot)
            fresh_logits: dict[int, torch.Tensor] = {}
            if run:
                rows = torch.tensor([first_slot[i] for i in run], device=dev)
                logits, _ = self._prefill(cache, rows, [fitted[i][0] for i in run])
                fresh_logits = {i: logits[n] for n, i in enumerate(run)}
                self.stats.prompt_tokens += sum(len(fitted[i][0]) for i in run)
            left: dict[int, int] = {}
            for i, k in items:
                left[i] = samples - 1 - k  # continuations of i still queued after this one
            for i in run:
                if left[i] > 0:  # keep the prefill for the continuations that come later
                    n = len(fitted[i][0])
                    s = first_slot[i]
                    prefixes[i] = _Prefix(
                        fitted[i][0],
                        fitted[i][1],
                        fresh_logits[i],
                        cache.k[:, s, :, :n].clone(),
                        cache.v[:, s, :, :n].clone(),
                        states.get(i, (0, 0)),
                    )
            out_logits = []
            for s, (i, k) in zip(take, items, strict=True):
                if i in fitted:
                    fed, win = fitted[i]
                    state, logit = states.get(i, (0, 0)), fresh_logits[i]
                    if first_slot[i] != s:  # a fork of this round's prefill
                        src, n = first_slot[i], len(fed)
                        cache.k[:, s, :, :n] = cache.k[:, src, :, :n]
                        cache.v[:, s, :, :n] = cache.v[:, src, :, :n]
                        self.stats.forks += 1
                        self.stats.forked_tokens += n
                else:  # a fork of an earlier round's prefill
                    pre = prefixes[i]
                    fed, win, state, logit = pre.fed, pre.since, pre.state, pre.logits
                    n = len(fed)
                    cache.k[:, s, :, :n] = pre.k
                    cache.v[:, s, :, :n] = pre.v
                    self.stats.forks += 1
                    self.stats.forked_tokens += n
                index[s], sample_of[s], tokens[s], n_prompt[s] = (
                    i,
                    k,
                    list(prompts[i]),
                    len(prompts[i]),
                )
                shifts[s], since[s], cached[s] = 0, win, len(fed)
                gstate[s], glen[s] = state
                pos[s], new[s] = len(fed), 0
                out_logits.append(logit)
            for i, n_left in left.items():
                if n_left == 0:
                    prefixes.pop(i, None)  # its last continuation has a slot now
            rows = torch.tensor(take, device=dev)
            if cfg.grammar:
                days = [_NO_LIMIT if budgets is None else budgets[i] for i, _ in items]
                days_left[rows] = torch.tensor(days, device=dev)
                visit_left[rows] = MAX_VISIT_DAYS
            if stop is not None:
                stop.begin(rows, [i for i, _ in items])
            yield from sample(rows, torch.stack(out_logits))

        while queue or any(i >= 0 for i in index):
            free = [s for s in range(slots) if index[s] < 0]
            if free and queue:
                yield from admit(free)
            # Window shifts: slots whose sequence filled the cache continue from a rebuilt window.
            full = [s for s in range(slots) if index[s] >= 0 and cached[s] >= max_len]
            if full:
                yield from shift(full)
            active = [s for s in range(slots) if index[s] >= 0]
            if not active:
                continue
            # One decode step. All slots run (a free slot repeats a harmless step at its last
            # position): taking a subset would copy the cache of every layer at every step.
            rows = torch.tensor(active, device=dev)
            p = pos.clamp(max=max_len - 1)
            span = int(p.max()) + 1
            cache.select(all_rows, p, span)
            mask = (torch.arange(span, device=dev)[None, :] <= p[:, None])[:, None, None, :]
            logits = self._logits(last[:, None], p[:, None], mask, cache)[:, -1]
            pos[rows] += 1
            for s in active:
                cached[s] += 1
            self.stats.steps += 1
            yield from sample(rows, logits[rows] if len(active) < slots else logits)
            if on_step is not None:
                on_step(finished)
        self.stats.sequences += len(prompts) * samples
        self.stats.seconds += time.perf_counter() - started

    def _ending(self, state: GrammarState, remaining: torch.Tensor, grammar: bool) -> list[str]:
        """How each row ends if it draws ``[END]`` now: death, budget or end."""
        dead = (state.state == int(S.DEAD)).tolist()
        steered = (remaining <= self.grammar.max_need).tolist() if grammar else [False] * len(dead)
        return [
            "death" if d else "budget" if b else "end" for d, b in zip(dead, steered, strict=True)
        ]

    def _fit_prompt(
        self, prompt: Sequence[int], keep: int, max_len: int
    ) -> tuple[Sequence[int], tuple[int, int]] | None:
        """The prompt (or its window, when it is longer than the cache: a long history) and
        the (position, day count) of its window start; None when no window of whole visits
        fits (its last visit alone is longer than the context)."""
        if len(prompt) < max_len:
            return prompt, (PROMPT_LEN, 0)
        w = self.windower.window(list(prompt), keep=keep, limit=max_len - 1)
        if w is None:
            return None
        return w[0], (w[1], w[2])

    def _cut_to_visit(self, ids: list[int], n_prompt: int) -> list[int]:
        """``ids`` up to and including the last ``[VE]`` (or all of it if there is none)."""
        for k in range(len(ids) - 1, PROMPT_LEN - 1, -1):
            if ids[k] == self.ve_id:
                return ids[: k + 1]
        return ids

    def _within_time(
        self,
        logits: torch.Tensor,
        state: GrammarState,
        days_left: torch.Tensor,
        visit_left: torch.Tensor,
    ) -> torch.Tensor:
        """Masked ``logits`` without the time tokens that exceed a row's budgets (a row whose
        every allowed token would exceed them keeps its grammar mask: never an empty row)."""
        ok = self.grammar.time_mask(state, days_left, visit_left)
        if logits.shape[-1] > ok.shape[-1]:
            ok = torch.nn.functional.pad(ok, (0, logits.shape[-1] - ok.shape[-1]), value=False)
        ok &= logits > float("-inf")
        ok |= ~ok.any(dim=1, keepdim=True)
        return logits.masked_fill(~ok, float("-inf"))

    def _check_prompts(
        self, batch: list[tuple[int, Sequence[int]]]
    ) -> tuple[list[tuple[int, Sequence[int]]], GrammarState, list[Generated]]:
        """Split prompts into those the grammar accepts (with their states) and the refused
        ones, returned as finished :class:`Generated` with the reason."""
        g = self.grammar
        st = g.start(len(batch), [p for _, p in batch], check=False)
        bad = g.is_refused(st).tolist()
        refused = []
        for (i, p), b in zip(batch, bad, strict=True):
            if b:
                try:
                    g.start(1, [p])
                    reason = "refused"
                except GrammarError as exc:
                    reason = str(exc)
                refused.append(Generated(i, list(p), len(p), "refused", reason))
        keep = torch.tensor([not b for b in bad], device=st.state.device)
        good = [item for item, b in zip(batch, bad, strict=True) if not b]
        return good, st[keep], refused

    def _prefill(
        self, cache: SlotCache, rows: torch.Tensor, prompts: list[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run new prompts through the model into their slots.

        Returns the logits at each prompt's last token and the padded prompt ids.
        """
        dev = self.device
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        width = int(lens.max())
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long, device=dev)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        positions = torch.arange(width, device=dev).expand(len(prompts), width)
        keys = positions < lens[:, None]
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
        mask = (causal[None] & keys[:, None, :]) | torch.eye(width, dtype=torch.bool, device=dev)
        cache.select(rows, torch.zeros(len(prompts), dtype=torch.long, device=dev), width)
        hidden = self.model.model(ids, positions, None, mask[:, None], cache=cache)
        last = hidden.last_hidden_state[torch.arange(len(prompts), device=dev), lens - 1]
        return self.model.lm_head(last), ids

    def _logits(self, ids, positions, mask, cache) -> torch.Tensor:
        """Next-token logits only (the time and value heads are not needed to sample)."""
        hidden = self.model.model(ids, positions, None, mask, cache=cache).last_hidden_state
        return self.model.lm_head(hidden)

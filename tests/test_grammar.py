"""The timeline grammar automaton used for constrained sampling (ehrgpt.generation.grammar).

- every record the encoder writes is accepted, token by token (all of Eunomia in the three
  ATT schemes, and hypothesis-made patients with values, inpatient stays, long gaps, death);
- random sampling among the allowed tokens, with the closing mask near the budget, always
  gives sequences the decoder accepts; without the mask it mostly does not;
- invalid prefixes raise an error naming the prefix and the position.
"""

from __future__ import annotations

import datetime as dt
import statistics
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ehrgpt.generation.grammar import GrammarError, GrammarState, S, TimelineGrammar
from ehrgpt.meds_format import columns as mc
from ehrgpt.tokenizer import time_tokens as tt
from ehrgpt.tokenizer.decode import DecodeError, decode_ids, decode_tokens
from ehrgpt.tokenizer.encode import encode_shard
from ehrgpt.tokenizer.values import fit_value_bins, sample_values
from ehrgpt.tokenizer.vocab import EhrTokenizer

SCHEMES = ("day", "cehr_bert", "mix")
CODES = ["SNOMED/1", "SNOMED/2", "RxNorm/3", "LOINC/4"]
VISIT_TYPES = ["VISIT/9202", "VISIT/9201", "VISIT/262", "VISIT/UNKNOWN", "VISIT/9203"]
PROMPT = ["year:2001", "age:40", "GENDER/8532", "RACE/UNKNOWN"]
EPOCH = dt.date(1970, 1, 1)
MEDS_SCHEMA = {
    "subject_id": pl.Int64,
    "time": pl.Datetime("us"),
    "code": pl.String,
    "numeric_value": pl.Float32,
    "visit_id": pl.Int64,
    "end": pl.Datetime("us"),
    "unit": pl.String,
    "value_code": pl.String,
}


def _frame(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=MEDS_SCHEMA, orient="row")


def _tokenizer(scheme: str) -> EhrTokenizer:
    """A small vocabulary with inpatient and other visits, value bins and a categorical value."""
    values = _frame([(1, None, "LOINC/4", float(v), 1, None, "mg", None) for v in range(100)])
    names = [
        *CODES,
        *VISIT_TYPES,
        "GENDER/8532",
        "RACE/8527",
        "DISCHARGE/8536",
        "VAL:SNOMED/9",
        "VAL:SNOMED/10",
    ]
    return EhrTokenizer.build(
        scheme,
        code_counts=dict.fromkeys(names, 1),
        n_subjects=1,
        min_prevalence=0.0,
        value_bins=fit_value_bins([sample_values(values)]),
    )


@pytest.fixture(autouse=True)
def _one_thread():
    """Small [B, V] ops: thread start-up costs more than it saves (much more on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOKENIZERS = {s: _tokenizer(s) for s in SCHEMES}
GRAMMARS = {s: TimelineGrammar(tok) for s, tok in TOKENIZERS.items()}


def _ids(tok: EhrTokenizer, tokens: list[str]) -> list[int]:
    return [tok.token_to_id[t] for t in tokens]


def assert_accepted(grammar: TimelineGrammar, records: list[list[int]]) -> None:
    """Each token is allowed (``[OOV]``: consumable) in the state its prefix reaches, and each
    record ends where it may stop; checked on one padded batch."""
    ids = grammar._as_ids(records)
    states = grammar.trace(ids)
    before = states[:, :-1]
    real = ids != grammar.pad_id
    oov = ids == grammar.tok.token_to_id["[OOV]"]
    valid = grammar.valid_table[before, ids]
    allowed = grammar.allowed_table[before, ids]
    bad = real & ~(allowed | (oov & valid))
    if bool(bad.any()):
        row, pos = (int(x) for x in bad.nonzero()[0])
        tokens = [grammar.tok.tokens[i] for i in records[row]]
        state = grammar.state_name(int(before[row, pos]))
        raise AssertionError(f"record {row} refused at {pos} in {state}: {tokens[: pos + 1]}")
    assert bool(grammar.complete_table[states[:, -1]].all()), "a record ends mid-visit"
    # The same through start(): whole histories are valid prefixes.
    assert torch.equal(grammar.start(len(records), records).state, states[:, -1])


# -- (a) every real record is accepted --------------------------------------------------------


def _eunomia_records(run: Path, tok: EhrTokenizer | None = None) -> list[list[int]]:
    """All token records of a run, or the run's MEDS data re-encoded with ``tok``."""
    if tok is None:
        frame = pl.read_parquet(sorted((run / "tokenized").rglob("*.parquet")))
        return frame["input_ids"].to_list()
    records: list[list[int]] = []
    for path in sorted((run / "meds" / "data").rglob("*.parquet")):
        encoded, _ = encode_shard(pl.read_parquet(path), tok)
        records += encoded["input_ids"].to_list()
    return records


def test_every_eunomia_record_is_accepted(eunomia_run: Path) -> None:
    tok = EhrTokenizer.from_pretrained(eunomia_run / "tokenizer")
    records = _eunomia_records(eunomia_run)
    assert len(records) > 2000
    assert_accepted(TimelineGrammar(tok), records)
    end = tok.token_to_id["[END]"]
    assert_accepted(TimelineGrammar(tok), [[*r, end] for r in records[:50]])


@pytest.mark.parametrize("scheme", ["cehr_bert", "mix"])
def test_eunomia_in_other_att_schemes_is_accepted(eunomia_run: Path, scheme: str) -> None:
    base = EhrTokenizer.from_pretrained(eunomia_run / "tokenizer")
    tok = EhrTokenizer.build(
        scheme,
        code_counts=base.code_counts,
        n_subjects=base.n_subjects,
        min_prevalence=base.min_prevalence,
        value_bins=base.value_bins,
    )
    records = _eunomia_records(eunomia_run, tok)
    long_id = tok.token_to_id[tt.LONG_TOKEN]
    assert sum(long_id in r for r in records) > 100  # long gaps are exercised
    assert_accepted(TimelineGrammar(tok), records)


# Gaps around every threshold of the three schemes, and beyond the 150-year cap.
GAPS = [0, 1, 6, 7, 8, 27, 28, 29, 30, 31, 359, 360, 361, 364, 365, 366, 729, 730, 1079, 1080]
GAPS += [1094, 1095, 1096, 1459, 1460, 54_749, 54_750, 55_000]


@st.composite
def patients(draw: st.DrawFn, subject_id: int = 1) -> list[tuple]:
    """MEDS rows of one patient: visits of all kinds, values, OOV codes, death."""
    rows: list[tuple] = []
    for prefix in ("GENDER/8532", "RACE/8527"):
        if draw(st.booleans()):
            rows.append((subject_id, None, prefix, None, None, None, None, None))
    birth = dt.datetime(1900, 1, 1) + dt.timedelta(days=draw(st.integers(0, 30_000)))
    if draw(st.integers(0, 4)):
        rows.append((subject_id, birth, mc.BIRTH_CODE, None, None, None, None, None))
    day = birth + dt.timedelta(days=draw(st.integers(0, 20_000)))
    for visit_id in range(1, draw(st.integers(1, 5)) + 1):
        if visit_id > 1:
            day += dt.timedelta(days=draw(st.sampled_from(GAPS)))
        vtype = draw(st.sampled_from(VISIT_TYPES))
        start = day
        has_visit_id = draw(st.integers(0, 5)) > 0
        for _ in range(draw(st.integers(0, 4))):
            day += dt.timedelta(days=draw(st.sampled_from([0, 0, 1, 5, 1100])))
            code = draw(st.sampled_from([*CODES, "LOINC/4", "SNOMED/999"]))
            value = vcode = unit = None
            if code == "LOINC/4":
                value = draw(st.one_of(st.none(), st.floats(0, 100, width=32)))
                vcode = draw(st.sampled_from([None, "SNOMED/9", "SNOMED/998"]))
                unit = "mg" if value is not None else None
            vid = visit_id if has_visit_id else None
            rows.append((subject_id, day, code, value, vid, None, unit, vcode))
        end = day
        if has_visit_id:
            if vtype in ("VISIT/9201", "VISIT/262"):
                end = day + dt.timedelta(days=draw(st.integers(0, 12)))
                if draw(st.booleans()):
                    rows.append(
                        (subject_id, end, "DISCHARGE/8536", None, visit_id, None, None, None)
                    )
            rows.append((subject_id, start, vtype, None, visit_id, end, None, None))
        day = end
    if draw(st.booleans()):
        death = day + dt.timedelta(days=draw(st.sampled_from(GAPS)))
        rows.append((subject_id, death, mc.DEATH_CODE, None, None, None, None, None))
    return rows


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(patients(), min_size=1, max_size=4), scheme=st.sampled_from(SCHEMES))
def test_encoder_output_is_accepted(batch: list[list[tuple]], scheme: str) -> None:
    rows = [(i, *r[1:]) for i, p in enumerate(batch) for r in p]
    encoded, _ = encode_shard(_frame(rows), TOKENIZERS[scheme])
    if encoded.height:
        assert_accepted(GRAMMARS[scheme], encoded["input_ids"].to_list())


# -- (b) random sampling among allowed tokens -------------------------------------------------


def _sample(
    grammar: TimelineGrammar,
    *,
    batch: int = 64,
    steps: int = 200,
    seed: int = 0,
    closing: bool = True,
    by_class: bool = False,
    prompt: list[str] | None = None,
) -> tuple[list[list[int]], GrammarState]:
    """Uniform random sampling among the allowed tokens, then ``[END]`` for unfinished rows.

    ``by_class`` draws a token class uniformly first (so time tokens, discharges and death are
    drawn often, not drowned by the many codes). With ``closing`` the mask is the closing mask
    for a budget of ``steps + 1`` tokens (``[END]`` included), else just the allowed mask.
    """
    gen = torch.Generator().manual_seed(seed)
    tok = grammar.tok
    state = grammar.start(batch, [_ids(tok, prompt)] if prompt else None)
    # Masks are unions of whole token classes, so a uniform token among the allowed ones is a
    # class drawn with weight (its size) then a uniform token of it: [B, n_classes] work only.
    order = torch.argsort(grammar.token_class, stable=True)
    sizes = torch.bincount(grammar.token_class, minlength=len(grammar.class_names))
    first = torch.cumsum(sizes, 0) - sizes
    rows = torch.arange(batch)
    out = torch.empty(batch, steps + 1, dtype=torch.long)
    for step in range(steps):
        remaining = steps + 1 - step
        mask = grammar.closing_mask(state, remaining) if closing else grammar.allowed(state)
        assert bool(mask.any(dim=1).all()), "an empty mask"
        open_classes = mask[:, order[first]] & (sizes > 0)
        weight = open_classes.float() if by_class else open_classes * sizes.float()
        cls = torch.multinomial(weight, 1, generator=gen).squeeze(1)
        pick = (torch.rand(batch, generator=gen) * sizes[cls]).long()
        out[:, step] = order[first[cls] + pick]
        assert bool(mask[rows, out[:, step]].all())
        state = grammar.advance(state, out[:, step])
    out[:, steps] = torch.where(grammar.is_done(state), grammar.pad_id, grammar.end_id)
    if closing:
        state = grammar.advance(state, out[:, steps])
    prefix = _ids(tok, prompt) if prompt else []
    return [prefix + r for r in out.tolist()], state


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("by_class", [False, True])
def test_constrained_sampling_always_decodes(scheme: str, by_class: bool) -> None:
    grammar = GRAMMARS[scheme]
    tok = grammar.tok
    rng = np.random.default_rng(0)
    seen: set[str] = set()
    for seed, prompt in enumerate([None, PROMPT, [*PROMPT, "[VS]", "VISIT/9201"]]):
        seqs, state = _sample(grammar, seed=seed, by_class=by_class, prompt=prompt)
        assert bool(grammar.is_done(state).all())
        for ids in seqs:
            tokens = [tok.tokens[i] for i in ids]
            decode_ids(ids, tok, rng=rng)  # raises DecodeError if the grammar let one through
            body = tokens[4:]
            assert not {"[OOV]", "[START]"} & set(body)
            assert not any(t.startswith(("year:", "age:")) for t in body)
            real = [t for t in tokens if t != "[PAD]"]
            assert real[-1] == "[END]" and "[PAD]" not in tokens[: len(real)]
            seen.update(grammar.class_names[c] for c in grammar.token_class[ids].tolist())
    if by_class:  # the structure paths are all exercised
        assert {"death", "discharge", "lt", "y_full", "bin", "cat", "day", "visit_in"} <= seen


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sampling_without_the_closing_mask_mostly_fails(scheme: str) -> None:
    """The same sampler without the closing mask: most sequences are cut inside a visit."""
    grammar = GRAMMARS[scheme]
    seqs, _ = _sample(grammar, closing=False, prompt=PROMPT)
    failures = 0
    for ids in seqs:
        try:
            decode_ids(ids, grammar.tok, rng=np.random.default_rng(0))
        except DecodeError:
            failures += 1
    assert failures > len(seqs) // 2


def test_closing_mask_takes_the_shortest_ending() -> None:
    grammar = GRAMMARS["day"]
    tok = grammar.tok
    prefixes = {
        "prompt": PROMPT,
        "inpatient": [*PROMPT, "[VS]", "VISIT/9201", "LOINC/4"],
        "after LT": [*PROMPT, "[VS]", "VISIT/9202", "[VE]", "LT"],
        "death": [*PROMPT, "[VS]", "VISIT/9202", "[VE]", "D3", "[VS]", "[DEATH]"],
    }
    expected = {"prompt": 4, "inpatient": 3, "after LT": 6, "death": 2}
    for name, prefix in prefixes.items():
        state = grammar.start(1, [_ids(tok, prefix)])
        need = int(grammar.tokens_to_finish(state))
        assert need == expected[name], name
        assert torch.equal(grammar.closing_mask(state, grammar.max_need), grammar.allowed(state))
        for _ in range(need):  # any pick from the tight mask finishes exactly in time
            mask = grammar.closing_mask(state, int(grammar.tokens_to_finish(state)))
            assert bool((mask <= grammar.allowed(state)).all()) and bool(mask.any())
            state = grammar.advance(state, mask.float().multinomial(1).squeeze(1))
        assert bool(grammar.is_done(state).all()), name
    # A budget already too small still gives the shortest ending, never an empty mask.
    state = grammar.start(1, [_ids(tok, prefixes["inpatient"])])
    mask = grammar.closing_mask(state, torch.tensor([0]))
    assert {tok.tokens[i] for i in mask[0].nonzero().flatten().tolist()} == {
        "DISCHARGE/8536",
        "DISCHARGE/UNKNOWN",
    }


def test_after_end_only_pad_and_after_death_only_end() -> None:
    grammar = GRAMMARS["mix"]
    tok = grammar.tok
    dead = [*PROMPT, "[VS]", "VISIT/9202", "[VE]", "M3", "[VS]", "[DEATH]", "[VE]"]
    state = grammar.start(2, [_ids(tok, dead), _ids(tok, [*dead, "[END]"])])
    allowed = grammar.allowed(state)
    assert allowed[0].nonzero().flatten().tolist() == [tok.token_to_id["[END]"]]
    assert allowed[1].nonzero().flatten().tolist() == [tok.token_to_id["[PAD]"]]
    assert grammar.is_complete(state).tolist() == [True, True]
    assert grammar.is_done(state).tolist() == [False, True]


def test_mask_logits_matches_the_masks() -> None:
    grammar = GRAMMARS["day"]
    tok = grammar.tok
    state = grammar.start(3, [_ids(tok, p) for p in ([], PROMPT, [*PROMPT, "[VS]"])])
    logits = torch.randn(3, len(tok) + 5)
    for remaining in (None, 1, torch.tensor([50, 2, 0])):
        out = grammar.mask_logits(logits, state, remaining)
        mask = (
            grammar.allowed(state) if remaining is None else grammar.closing_mask(state, remaining)
        )
        assert torch.equal(torch.isfinite(out[:, : len(tok)]), mask)
        assert torch.equal(out[:, : len(tok)][mask], logits[:, : len(tok)][mask])
        assert bool(torch.isneginf(out[:, len(tok) :]).all())


def test_visit_end_inside_an_inpatient_stay_becomes_its_discharge() -> None:
    """Inside an inpatient stay the grammar refuses ``[VE]`` (the discharge comes first); the
    probability a model gives ``[VE]`` there goes to the discharge tokens, not to more events
    (an under-trained model that wants to close the stay otherwise writes stays of months)."""
    grammar = GRAMMARS["day"]
    tok = grammar.tok
    ve = tok.token_to_id["[VE]"]
    discharges = [i for i, t in enumerate(tok.tokens) if t.startswith("DISCHARGE/")]
    stay = [*PROMPT, "[VS]", "VISIT/9201", "SNOMED/1"]
    visit = [*PROMPT, "[VS]", "VISIT/9202", "SNOMED/1"]
    state = grammar.start(2, [_ids(tok, stay), _ids(tok, visit)])
    logits = torch.zeros(2, len(tok))
    logits[:, ve] = 12.0  # the model wants the visit to end
    logits[:, discharges[0]] = 1.0
    probs = grammar.mask_logits(logits, state).softmax(-1)
    assert probs[0, ve] == 0
    assert probs[0, discharges].sum() > 0.9  # the stay closes
    # ... in proportion to the discharges' own probabilities
    assert torch.isclose(
        probs[0, discharges[0]] / probs[0, discharges[1]], torch.tensor(torch.e), rtol=1e-4
    )
    # Outside an inpatient stay nothing changes; a model that never wants [VE] there neither.
    plain = logits.masked_fill(~grammar.allowed(state), float("-inf"))
    assert torch.equal(grammar.mask_logits(logits, state)[1], plain[1])
    logits[:, ve] = float("-inf")
    plain = logits.masked_fill(~grammar.allowed(state), float("-inf"))
    assert torch.equal(grammar.mask_logits(logits, state), plain)


# -- (c) invalid prefixes -------------------------------------------------------------------

V = [*PROMPT, "[VS]", "VISIT/9202", "SNOMED/1", "[VE]"]  # a whole valid first visit (8 tokens)
INVALID = [
    # (tokens, position of the refused token, whether the decoder refuses the whole too)
    (["age:40"], 0, True),
    (["year:2001", "GENDER/8532"], 1, True),
    ([*PROMPT, "[VE]"], 4, True),
    ([*PROMPT, "[VS]", "[DEATH]", "[VE]"], 5, True),
    ([*PROMPT, "[END]"], 4, True),
    ([*V, "[VS]", "VISIT/9202", "[VE]"], 8, True),
    ([*PROMPT, "[VS]", "VISIT/9202", "VAL:Q1", "[VE]"], 6, True),
    ([*PROMPT, "[VS]", "VISIT/9202", "LOINC/4", "VAL:SNOMED/9", "VAL:Q1", "[VE]"], 8, True),
    ([*PROMPT, "[VS]", "VISIT/9202", "LOINC/4", "VAL:Q1", "VAL:Q2", "[VE]"], 8, True),
    ([*PROMPT, "[VS]", "VISIT/9202", "LOINC/4", "VAL:SNOMED/9", "VAL:SNOMED/10"], 8, True),
    ([*PROMPT, "[VS]", "VISIT/9201", "SNOMED/1", "[VE]"], 7, True),
    ([*PROMPT, "[VS]", "VISIT/9202", "DISCHARGE/8536", "[VE]"], 6, True),
    ([*PROMPT, "[VS]", "VISIT/9201", "DISCHARGE/8536", "SNOMED/1", "[VE]"], 7, True),
    ([*PROMPT, "[VS]", "VISIT/9202", "year:2002", "[VE]"], 6, True),
    ([*PROMPT, "[VS]", "VISIT/9202", "D3", "[VE]"], 6, True),
    ([*V, "LT", "D5", "[VS]", "VISIT/9202", "[VE]"], 9, True),
    ([*V, "D3", "[VS]", "[DEATH]", "[VE]", "D1", "[VS]", "VISIT/9202", "[VE]"], 12, True),
    ([*V, "D3", "[VS]", "[DEATH]", "SNOMED/1", "[VE]"], 11, True),
    ([*V, "[END]", "D3"], 9, True),
    # Stricter than the decoder: what the encoder never writes.
    ([*V, "LT", "Y0", "D5", "[VS]", "VISIT/9202", "[VE]"], 9, False),
    ([*V, "LT", "Y2", "D349", "[VS]", "VISIT/9202", "[VE]"], 10, False),
    ([*PROMPT, "[VS]", "VISIT/9202", "LOINC/4", "i-D1", "VAL:Q1", "[VE]"], 8, False),
    ([*V, "Y4", "[VS]", "VISIT/9202", "[VE]"], 8, False),
]


@pytest.mark.parametrize(("tokens", "position", "decoder_refuses"), INVALID)
def test_invalid_prefix_names_the_position(
    tokens: list[str], position: int, decoder_refuses: bool
) -> None:
    grammar = GRAMMARS["day"]
    tok = grammar.tok
    ids = _ids(tok, tokens)
    with pytest.raises(GrammarError, match=f"prefix 1, position {position}: ") as info:
        grammar.start(2, [_ids(tok, PROMPT), ids])
    assert (info.value.row, info.value.position) == (1, position)
    assert info.value.token == tokens[position]
    if decoder_refuses:
        with pytest.raises(DecodeError):
            decode_tokens(tokens, tok, first_day=0)
    else:
        decode_tokens(tokens, tok, first_day=0)
    # One step at a time: advance() refuses the same token; without the check, ERROR.
    state = grammar.start(1, [ids[:position]])
    bad = torch.tensor([ids[position]])
    with pytest.raises(GrammarError, match=f"sequence 0, position {position}: "):
        grammar.advance(state, bad)
    state = grammar.advance(state, bad, check=False)
    assert state.state.tolist() == [int(S.ERROR)]
    assert not bool(grammar.allowed(state).any())
    assert not bool(grammar.closing_mask(state, 0).any())


def test_prefix_forms_and_bad_ids() -> None:
    grammar = GRAMMARS["cehr_bert"]
    tok = grammar.tok
    a, b = _ids(tok, V), _ids(tok, PROMPT)
    pad = tok.token_to_id["[PAD]"]
    as_lists = grammar.start(2, [a, b])
    left = torch.tensor([a, [pad] * (len(a) - len(b)) + b])
    assert torch.equal(grammar.start(None, left).state, as_lists.state)
    assert as_lists.length.tolist() == [len(a), len(b)]
    assert grammar.start(3, [b]).state.tolist() == [int(S.FIRST_VS)] * 3
    starts = grammar.start(1, [[tok.token_to_id["[START]"], *b]])
    assert starts.state.tolist() == [int(S.FIRST_VS)]
    with pytest.raises(GrammarError, match="position 2: token id 99999 is not a valid"):
        grammar.start(1, [[*b[:2], 99_999]])
    with pytest.raises(ValueError, match="2 prompts for a batch of 3"):
        grammar.start(3, [a, b])


def test_step_is_fast() -> None:
    """allowed() + advance() for a batch of 256 and a 3,000-token vocabulary, on CPU."""
    base = TOKENIZERS["day"]
    tok = EhrTokenizer.build(
        "day",
        code_counts={**dict.fromkeys(base.code_counts, 1), **{f"C/{i}": 1 for i in range(900)}},
        n_subjects=1,
        min_prevalence=0.0,
    )
    assert len(tok) > 3000
    grammar = TimelineGrammar(tok)
    state = grammar.start(256, [_ids(tok, [*PROMPT, "[VS]", "VISIT/9202"])])
    code = torch.full((256,), tok.token_to_id["C/1"])
    times = []
    for _ in range(200):
        t = time.perf_counter()
        grammar.allowed(state)
        state = grammar.advance(state, code)
        times.append(time.perf_counter() - t)
    assert statistics.median(times) < 1e-3

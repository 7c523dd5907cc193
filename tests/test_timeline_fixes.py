"""Edge cases of the timeline found in review (issue 7): unseen structure codes, static codes,
death from a discharge, plausibility of generated timelines, values inside bins, leap years.

Each test runs the real encoder, grammar and decoder on small MEDS frames.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest
import torch

from ehrgpt.errors import EhrgptError
from ehrgpt.generation.grammar import GrammarError, TimelineGrammar
from ehrgpt.generation.prompts import user_prompts
from ehrgpt.meds_format import columns as mc
from ehrgpt.tokenizer.decode import (
    DecodeError,
    Timeline,
    Visit,
    check_plausible,
    decode_ids,
    decode_tokens,
    timeline_to_meds,
)
from ehrgpt.tokenizer.encode import encode_shard
from ehrgpt.tokenizer.fit import fit_tokenizer
from ehrgpt.tokenizer.values import fit_value_bins, sample_values
from ehrgpt.tokenizer.vocab import EhrTokenizer

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
DIED = "DISCHARGE/4216643"
D = dt.datetime


def _frame(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=MEDS_SCHEMA, orient="row")


def _tok(*extra: str, last_date: dt.date | None = dt.date(2020, 12, 31)) -> EhrTokenizer:
    names = ["SNOMED/1", "SNOMED/2", "VISIT/9202", "VISIT/9201", "GENDER/8532", "RACE/8527"]
    return EhrTokenizer.build(
        "day",
        code_counts=dict.fromkeys([*names, *extra], 1),
        n_subjects=1,
        min_prevalence=0.0,
        last_date=last_date,
    )


def _tokens(tok: EhrTokenizer, ids: list[int]) -> list[str]:
    return [tok.tokens[i] for i in ids]


# -- 1. structure codes unseen in training ---------------------------------------------------


def test_unseen_structure_codes_become_their_class_unknown() -> None:
    tok = _tok()
    rows = [
        (1, None, "GENDER/999", None, None, None, None, None),
        (1, None, "RACE/999", None, None, None, None, None),
        (1, D(2000, 1, 1), "VISIT/581478", None, 1, D(2000, 1, 1), None, None),
        (1, D(2000, 1, 1), "SNOMED/1", None, 1, None, None, None),
        (1, D(2000, 2, 1), "VISIT/9201", None, 2, D(2000, 2, 3), None, None),
        (1, D(2000, 2, 1), "SNOMED/2", None, 2, None, None, None),
        (1, D(2000, 2, 3), "DISCHARGE/8536", None, 2, None, None, None),
    ]
    encoded, stats = encode_shard(_frame(rows), tok)
    tokens = _tokens(tok, encoded["input_ids"][0])
    assert tokens == [
        "year:2000",
        "age:UNKNOWN",
        "GENDER/UNKNOWN",
        "RACE/UNKNOWN",
        "[VS]",
        "VISIT/UNKNOWN",
        "SNOMED/1",
        "[VE]",
        "D31",
        "[VS]",
        "VISIT/9201",
        "SNOMED/2",
        "i-D2",
        "DISCHARGE/UNKNOWN",
        "[VE]",
    ]
    assert "[OOV]" not in tokens and stats.oov_tokens == 0
    assert stats.unknown_structure == {
        "GENDER/UNKNOWN": 1,
        "RACE/UNKNOWN": 1,
        "VISIT/UNKNOWN": 1,
        "DISCHARGE/UNKNOWN": 1,
    }
    assert stats.unknown_structure_codes["VISIT/581478"] == 1
    assert stats.summary()["unknown_structure"]["VISIT/UNKNOWN"] == 1
    # The grammar accepts the record as a history prompt, and it decodes.
    TimelineGrammar(tok).start(1, [encoded["input_ids"][0]])
    decode_ids(encoded["input_ids"][0], tok, first_day=encoded["first_day"][0])


def test_an_unseen_inpatient_type_is_an_unknown_visit_without_discharge() -> None:
    tok = _tok()
    assert "VISIT/8971" not in tok  # inpatient-like, but not seen in training
    rows = [
        (1, D(2000, 1, 1), "VISIT/8971", None, 1, D(2000, 1, 5), None, None),
        (1, D(2000, 1, 1), "SNOMED/1", None, 1, None, None, None),
        (1, D(2000, 1, 5), "DISCHARGE/8536", None, 1, None, None, None),
    ]
    encoded, _ = encode_shard(_frame(rows), tok)
    tokens = _tokens(tok, encoded["input_ids"][0])
    assert tokens[4:] == ["[VS]", "VISIT/UNKNOWN", "SNOMED/1", "[VE]"]
    TimelineGrammar(tok).start(1, [encoded["input_ids"][0]])


def test_every_vocabulary_has_the_class_unknowns() -> None:
    tok = EhrTokenizer.build("day", code_counts={}, n_subjects=1)
    for code in ("VISIT/UNKNOWN", "DISCHARGE/UNKNOWN", "GENDER/UNKNOWN", "RACE/UNKNOWN"):
        assert code in tok
    assert tok.id("RACE/123") == tok.token_to_id["RACE/UNKNOWN"]


# -- 2. static codes -------------------------------------------------------------------------


def test_static_codes_stay_out_of_the_vocabulary(tmp_path) -> None:
    rows = [
        (s, None, code, None, None, None, None, None)
        for s in (1, 2)
        for code in ("GENDER/8532", "RACE/8527", "ETHNICITY/38003563")
    ] + [
        (s, D(2000, 1, s), code, None, s, D(2000, 1, s), None, None)
        for s in (1, 2)
        for code in ("VISIT/9202", "SNOMED/1")
    ]
    frame = _frame(rows)
    frame.write_parquet(tmp_path / "0.parquet")
    tok, _ = fit_tokenizer([tmp_path / "0.parquet"], min_prevalence=0.0, progress=False)
    assert "ETHNICITY/38003563" not in tok
    assert {"GENDER/8532", "RACE/8527", "VISIT/9202", "SNOMED/1"} <= set(tok.tokens)
    assert tok.last_date == dt.date(2000, 1, 2)
    _, stats = encode_shard(frame, tok)
    assert stats.static_codes_left_out == 2


def test_the_grammar_never_allows_a_static_code_of_an_old_vocabulary() -> None:
    new = _tok()
    tok = EhrTokenizer("day", [*new.tokens, "ETHNICITY/38003563"])  # an old vocabulary
    grammar = TimelineGrammar(tok)
    prompt = ["year:2000", "age:40", "GENDER/8532", "RACE/8527", "[VS]", "VISIT/9202"]
    state = grammar.start(1, [[tok.token_to_id[t] for t in prompt]])
    eth = tok.token_to_id["ETHNICITY/38003563"]
    assert not bool(grammar.allowed(state)[0, eth])
    assert not bool(grammar.allowed_table[:, eth].any())


# -- 3. death from a discharge ---------------------------------------------------------------


def _died_rows() -> list[tuple]:
    return [
        (1, D(1950, 1, 1), mc.BIRTH_CODE, None, None, None, None, None),
        (1, D(2000, 1, 1), "VISIT/9202", None, 1, D(2000, 1, 1), None, None),
        (1, D(2000, 1, 1), "SNOMED/1", None, 1, None, None, None),
        (1, D(2000, 3, 1), "VISIT/9201", None, 2, D(2000, 3, 4), None, None),
        (1, D(2000, 3, 1), "SNOMED/2", None, 2, None, None, None),
        (1, D(2000, 3, 4), DIED, None, 2, None, None, None),
        # a visit after the death (a data error): left out, counted
        (1, D(2000, 6, 1), "VISIT/9202", None, 3, D(2000, 6, 1), None, None),
        (1, D(2000, 6, 1), "SNOMED/1", None, 3, None, None, None),
    ]


def test_a_discharge_to_death_ends_the_timeline() -> None:
    tok = _tok(DIED)
    encoded, stats = encode_shard(_frame(_died_rows()), tok)
    tokens = _tokens(tok, encoded["input_ids"][0])
    assert tokens[8:] == [
        "D60",
        "[VS]",
        "VISIT/9201",
        "SNOMED/2",
        "i-D3",
        DIED,
        "[VE]",
        "D0",
        "[VS]",
        "[DEATH]",
        "[VE]",
    ]
    assert stats.deaths == 1 and stats.deaths_from_discharge == 1
    assert stats.visits_after_death_left_out == 1 and stats.visits == 2
    TimelineGrammar(tok).start(1, [encoded["input_ids"][0]])
    tl = decode_ids(encoded["input_ids"][0], tok, first_day=encoded["first_day"][0])
    assert tl.death == dt.date(2000, 3, 4) and len(tl.visits) == 2
    # Decoded and encoded again: the same tokens (death once, from both sources).
    again, _ = encode_shard(timeline_to_meds(tl, tok, 1, birth_day=encoded["birth_day"][0]), tok)
    assert again["input_ids"].to_list() == encoded["input_ids"].to_list()


def test_meds_death_and_a_died_discharge_give_one_death_visit() -> None:
    tok = _tok(DIED)
    rows = [*_died_rows()[:6], (1, D(2000, 3, 4), mc.DEATH_CODE, None, None, None, None, None)]
    encoded, stats = encode_shard(_frame(rows), tok)
    tokens = _tokens(tok, encoded["input_ids"][0])
    assert tokens.count("[DEATH]") == 1 and tokens[-4:] == ["D0", "[VS]", "[DEATH]", "[VE]"]
    assert stats.deaths == 1 and stats.deaths_from_discharge == 0


def test_after_a_discharge_to_death_only_the_death_visit() -> None:
    tok = _tok(DIED)
    grammar = TimelineGrammar(tok)
    ids = tok.token_to_id
    prefix = ["year:2000", "age:40", "GENDER/8532", "RACE/8527", "[VS]", "VISIT/9201", DIED]
    state = grammar.start(1, [[ids[t] for t in prefix]])
    assert _allowed(grammar, state) == ["[VE]"]
    state = grammar.advance(state, torch.tensor([ids["[VE]"]]))
    assert _allowed(grammar, state) == ["D0"]
    assert not bool(grammar.is_complete(state)[0])
    for token, then in (("D0", ["[VS]"]), ("[VS]", ["[DEATH]"]), ("[DEATH]", ["[VE]"])):
        state = grammar.advance(state, torch.tensor([ids[token]]))
        assert _allowed(grammar, state) == then
    state = grammar.advance(state, torch.tensor([ids["[VE]"]]))
    assert _allowed(grammar, state) == ["[END]"]
    # A visit after the discharge is refused, by the grammar and by the decoder.
    after = [*prefix, "[VE]", "D3", "[VS]", "VISIT/9202", "SNOMED/1", "[VE]"]
    with pytest.raises(GrammarError, match="zero gap"):
        grammar.start(1, [[ids[t] for t in after]])
    with pytest.raises(DecodeError, match="visit after a discharge to death"):
        decode_tokens(after, tok, first_day=0)
    # Cut right after the discharge (a history prompt): the death is still decoded.
    tl = decode_tokens([*prefix, "[VE]"], tok, first_day=0)
    assert tl.death == dt.date(1970, 1, 1)


def _allowed(grammar: TimelineGrammar, state) -> list[str]:
    allowed = grammar.allowed(state)[0].nonzero().flatten().tolist()
    return [grammar.tok.tokens[i] for i in allowed]


# -- 7. plausibility -------------------------------------------------------------------------


def _timeline(year: int, age: int | None, *visits: tuple[dt.date, dt.date]) -> Timeline:
    return Timeline(
        year, age, "GENDER/8532", "RACE/8527", [Visit("VISIT/9202", s, e) for s, e in visits]
    )


@pytest.mark.parametrize(
    ("timeline", "reason"),
    [
        (
            _timeline(1966, 70, (dt.date(1966, 1, 2), dt.date(1966, 1, 2))),
            "birth year outside 1900..",
        ),
        (
            _timeline(1966, 10, (dt.date(1966, 1, 2), dt.date(2104, 1, 2))),
            "date after the training data",
        ),
        (
            _timeline(
                2015, 115, (dt.date(2015, 8, 1), dt.date(2015, 8, 1)), ((dt.date(2021, 9, 1),) * 2)
            ),
            "age over 120",
        ),
        (
            _timeline(2000, 50, (dt.date(2000, 8, 1), dt.date(2001, 8, 2))),
            "visit longer than 365 days",
        ),
    ],
)
def test_implausible_timelines_are_rejected_by_reason(timeline: Timeline, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        check_plausible(timeline, _tok(last_date=dt.date(2100, 1, 1)))
    assert info.value.reason.startswith(reason)


def test_a_plausible_timeline_passes_and_old_tokenizers_use_today() -> None:
    check_plausible(_timeline(2000, 50, (dt.date(2000, 8, 1), dt.date(2001, 7, 31))), _tok())
    old = _tok(last_date=None)
    assert old.data_end == dt.date.today()
    visits = ((dt.date(2000, 8, 1),) * 2, (dt.date(2021, 8, 1),) * 2)
    check_plausible(_timeline(2000, 50, *visits), old)
    with pytest.raises(DecodeError, match="date after the training data"):
        check_plausible(_timeline(2000, 50, *visits), _tok())


def test_the_last_date_is_saved_with_the_tokenizer(tmp_path) -> None:
    tok = _tok()
    tok.save_pretrained(tmp_path)
    assert EhrTokenizer.from_pretrained(tmp_path).last_date == dt.date(2020, 12, 31)


def test_a_year_after_the_training_data_is_a_clear_error() -> None:
    tok = _tok()
    table = pl.DataFrame(
        {
            "year": ["year:2000"],
            "age": ["age:40"],
            "gender": ["GENDER/8532"],
            "race": ["RACE/8527"],
            "n": [1],
        }
    )
    assert user_prompts(table, 2, tok, 0, year=2020)
    for year in (2100, 2021, 1899):
        with pytest.raises(EhrgptError, match=f"--year {year} is outside 1900..2020"):
            user_prompts(table, 2, tok, 0, year=year)


# -- 8. values drawn inside their bin --------------------------------------------------------


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov distance (numpy only)."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def test_generated_values_follow_the_real_distribution() -> None:
    rng = np.random.default_rng(0)
    real = rng.lognormal(mean=4.0, sigma=0.5, size=4000).astype(np.float32)
    # One subject, one outpatient visit a day, one lab value each: the real encoder and decoder.
    rows = [(1, D(2010, 1, 1), mc.BIRTH_CODE, None, None, None, None, None)]
    for k, v in enumerate(real[:1500]):
        day = D(2011, 1, 1) + dt.timedelta(days=k)
        rows.append((1, day, "VISIT/9202", None, k + 1, day, None, None))
        rows.append((1, day, "LOINC/2345-7", float(v), k + 1, None, "mg/dL", None))
    frame = _frame(rows)
    values = _frame([(1, None, "LOINC/2345-7", float(v), None, None, "mg/dL", None) for v in real])
    tok = EhrTokenizer.build(
        "day",
        code_counts={"LOINC/2345-7": 1, "VISIT/9202": 1},
        n_subjects=1,
        min_prevalence=0.0,
        value_bins=fit_value_bins([sample_values(values)]),
        last_date=dt.date(2020, 1, 1),
    )
    encoded, stats = encode_shard(frame, tok)
    assert stats.values_binned == 1500
    tl = decode_ids(encoded["input_ids"][0], tok, first_day=encoded["first_day"][0])
    synthetic = timeline_to_meds(tl, tok, 1, rng=np.random.default_rng(1))
    drawn = synthetic.filter(pl.col("code") == "LOINC/2345-7")["numeric_value"].to_numpy()
    medians = timeline_to_meds(tl, tok, 1).filter(pl.col("code") == "LOINC/2345-7")
    at_median = medians["numeric_value"].to_numpy()
    assert len(np.unique(at_median)) <= 10  # real records decode to the bin's median
    assert len(np.unique(drawn)) > 1000
    assert _ks(drawn, real) < 0.04 < _ks(at_median, real)
    # Drawn values stay inside their bin: encoding them again gives the same tokens.
    again, _ = encode_shard(synthetic, tok)
    assert again["input_ids"].to_list() == encoded["input_ids"].to_list()


def test_value_bins_without_quantiles_still_load_and_draw() -> None:
    from ehrgpt.tokenizer.values import bins_from_json, bins_to_json

    values = _frame([(1, None, "L", float(v), None, None, "u", None) for v in range(100)])
    bins = fit_value_bins([sample_values(values)])
    old = [{k: v for k, v in item.items() if k != "quantiles"} for item in bins_to_json(bins)]
    loaded = bins_from_json(old)[("L", "u")]
    draws = loaded.sample(3, np.random.default_rng(0), 100)
    assert loaded.low[3] <= draws.min() and draws.max() <= loaded.high[3]


# -- 9. leap years ---------------------------------------------------------------------------


@pytest.mark.parametrize("year", [1900, 2000, 2100, 2019])
def test_a_generated_first_visit_stays_in_its_year(year: int) -> None:
    tok = _tok(last_date=dt.date(2100, 12, 31))
    tokens = [f"year:{year}", "age:40", "GENDER/8532", "RACE/8527", "[VS]", "VISIT/9202", "[VE]"]
    rng = np.random.default_rng(0)
    starts = {decode_tokens(tokens, tok, rng=rng).visits[0].start for _ in range(4000)}
    assert {d.year for d in starts} == {year}
    assert len(starts) == (366 if year == 2000 else 365)

"""Encode and decode are exact inverses (at day resolution) on generated patient timelines.

Hypothesis builds random patients (visits of several types with gaps from 0 days to decades,
multi-day inpatient stays with discharges, events on several days, numeric and categorical
values, death) as MEDS rows, runs the real vectorised encoder, and decodes the tokens back.
"""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ehrgpt.meds_format import columns as mc
from ehrgpt.tokenizer.decode import DecodeError, decode_ids, decode_tokens, timeline_to_meds
from ehrgpt.tokenizer.encode import encode_shard
from ehrgpt.tokenizer.values import fit_value_bins, sample_values
from ehrgpt.tokenizer.vocab import EhrTokenizer

CODES = ["SNOMED/1", "SNOMED/2", "RxNorm/3", "LOINC/4"]
VISIT_TYPES = ["VISIT/9202", "VISIT/9201", "VISIT/262", "VISIT/UNKNOWN", "VISIT/9203"]
EPOCH = dt.date(1970, 1, 1)


@st.composite
def patients(draw, subject_id: int = 1) -> list[tuple]:
    """MEDS rows of one canonical patient (midnight times, visits in order, no overlap)."""
    birth = EPOCH + dt.timedelta(days=draw(st.integers(-20_000, 10_000)))
    rows: list[tuple] = [
        (
            subject_id,
            None,
            draw(st.sampled_from(["GENDER/8532", "GENDER/UNKNOWN"])),
            None,
            None,
            None,
            None,
            None,
        ),
        (
            subject_id,
            None,
            draw(st.sampled_from(["RACE/8527", "RACE/UNKNOWN"])),
            None,
            None,
            None,
            None,
            None,
        ),
        (
            subject_id,
            dt.datetime.combine(birth, dt.time()),
            mc.BIRTH_CODE,
            None,
            None,
            None,
            None,
            None,
        ),
    ]
    cursor = birth + dt.timedelta(days=draw(st.integers(0, 30_000)))
    for visit_id in range(1, draw(st.integers(1, 6)) + 1):
        if visit_id > 1:
            cursor += dt.timedelta(days=draw(st.integers(0, 5_000)))
        vtype = draw(st.sampled_from(VISIT_TYPES))
        start = cursor
        day = start
        for _ in range(draw(st.integers(0, 5))):
            day += dt.timedelta(days=draw(st.sampled_from([0, 0, 1, 3, 1200])))
            code = draw(st.sampled_from(CODES))
            value = (
                draw(st.one_of(st.none(), st.floats(0, 100, width=32)))
                if code == "LOINC/4"
                else None
            )
            vcode = draw(st.sampled_from([None, "SNOMED/9"])) if code == "LOINC/4" else None
            rows.append(
                (
                    subject_id,
                    dt.datetime.combine(day, dt.time()),
                    code,
                    value,
                    visit_id,
                    None,
                    "mg" if value is not None else None,
                    vcode,
                )
            )
        end = day
        if vtype in ("VISIT/9201", "VISIT/262"):
            end = day + dt.timedelta(days=draw(st.integers(0, 12)))
            discharge = draw(st.sampled_from([None, "DISCHARGE/8536"]))
            if discharge:
                rows.append(
                    (
                        subject_id,
                        dt.datetime.combine(end, dt.time()),
                        discharge,
                        None,
                        visit_id,
                        None,
                        None,
                        None,
                    )
                )
        rows.append(
            (
                subject_id,
                dt.datetime.combine(start, dt.time()),
                vtype,
                None,
                visit_id,
                dt.datetime.combine(end, dt.time()),
                None,
                None,
            )
        )
        cursor = end
    if draw(st.booleans()):
        death = cursor + dt.timedelta(days=draw(st.integers(0, 2_000)))
        rows.append(
            (
                subject_id,
                dt.datetime.combine(death, mc.END_OF_DAY),  # date-only, as prepared MEDS has it
                mc.DEATH_CODE,
                None,
                None,
                None,
                None,
                None,
            )
        )
    return rows


def _frame(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={
            "subject_id": pl.Int64,
            "time": pl.Datetime("us"),
            "code": pl.String,
            "numeric_value": pl.Float32,
            "visit_id": pl.Int64,
            "end": pl.Datetime("us"),
            "unit": pl.String,
            "value_code": pl.String,
        },
        orient="row",
    )


def _tokenizer(scheme: str) -> EhrTokenizer:
    values = _frame([(1, None, "LOINC/4", float(v), 1, None, "mg", None) for v in range(100)])
    counts = {
        c: 1
        for c in [
            *CODES,
            *VISIT_TYPES,
            "GENDER/8532",
            "RACE/8527",
            "DISCHARGE/8536",
            "VAL:SNOMED/9",
        ]
    }
    return EhrTokenizer.build(
        scheme,
        code_counts=counts,
        n_subjects=1,
        min_prevalence=0.0,
        value_bins=fit_value_bins([sample_values(values)]),
    )


TOKENIZERS = {s: _tokenizer(s) for s in ("day", "cehr_bert", "mix")}


def _visits_of(frame: pl.DataFrame) -> list[tuple]:
    visits = frame.filter(pl.col("code").str.starts_with("VISIT/")).sort("time")
    return [(r["code"], r["time"].date(), r["end"].date()) for r in visits.iter_rows(named=True)]


def _events_of(frame: pl.DataFrame) -> list[tuple]:
    ev = frame.filter(
        pl.col("time").is_not_null()
        & ~pl.col("code").str.starts_with("VISIT/")
        & ~pl.col("code").str.starts_with("DISCHARGE/")
        & ~pl.col("code").is_in([mc.BIRTH_CODE, mc.DEATH_CODE])
    )
    return sorted(
        (r["time"].date(), r["code"], r["value_code"] or "") for r in ev.iter_rows(named=True)
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=patients())
def test_day_scheme_round_trip_is_exact(rows: list[tuple]) -> None:
    tok = TOKENIZERS["day"]
    frame = _frame(rows)
    encoded, stats = encode_shard(frame, tok)
    assert stats.events_moved_to_visit_start == 0 and stats.visits_moved_after_previous == 0
    record = encoded.row(0, named=True)
    timeline = decode_ids(record["input_ids"], tok, first_day=record["first_day"])
    decoded = timeline_to_meds(timeline, tok, 1, birth_day=record["birth_day"])

    assert _visits_of(decoded) == _visits_of(frame)
    assert _events_of(decoded) == _events_of(frame)
    death = frame.filter(pl.col("code") == mc.DEATH_CODE)["time"].to_list()
    assert decoded.filter(pl.col("code") == mc.DEATH_CODE)["time"].to_list() == death
    # Values come back inside their bin: re-encoding gives the same tokens and days.
    again, _ = encode_shard(decoded, tok)
    assert again["input_ids"].to_list() == encoded["input_ids"].to_list()
    assert again["days"].to_list() == encoded["days"].to_list()


@pytest.mark.parametrize("scheme", ["cehr_bert", "mix"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=patients())
def test_coarse_schemes_round_trip_tokens(scheme: str, rows: list[tuple]) -> None:
    tok = TOKENIZERS[scheme]
    frame = _frame(rows)
    encoded, _ = encode_shard(frame, tok)
    record = encoded.row(0, named=True)
    timeline = decode_ids(record["input_ids"], tok, first_day=record["first_day"])
    decoded = timeline_to_meds(timeline, tok, 1, birth_day=record["birth_day"])
    # tokens -> timeline -> tokens is the identity; visit count and codes are kept.
    again, _ = encode_shard(decoded, tok)
    assert again["input_ids"].to_list() == encoded["input_ids"].to_list()
    assert [v[0] for v in _visits_of(decoded)] == [v[0] for v in _visits_of(frame)]
    assert sorted(e[1] for e in _events_of(decoded)) == sorted(e[1] for e in _events_of(frame))
    # Each gap between visits is kept within the scheme's resolution (15 days).
    original, back = _visits_of(frame), _visits_of(decoded)
    for (_, _, e0), (_, s1, _), (_, _, f0), (_, t1, _) in zip(
        original, original[1:], back, back[1:], strict=False
    ):
        assert abs((s1 - e0).days - (t1 - f0).days) <= 15


def test_out_of_vocabulary_codes_are_counted_not_dropped() -> None:
    tok = TOKENIZERS["day"]
    rows = [
        (7, None, "GENDER/8532", None, None, None, None, None),
        (7, dt.datetime(2000, 1, 1), "VISIT/9202", None, 1, dt.datetime(2000, 1, 1), None, None),
        (7, dt.datetime(2000, 1, 1), "ICD10/NEW", None, 1, None, None, None),
        (7, dt.datetime(2000, 1, 1), "SNOMED/1", None, 1, None, None, None),
    ]
    encoded, stats = encode_shard(_frame(rows), tok)
    tokens = [tok.tokens[i] for i in encoded["input_ids"][0]]
    assert tokens == [
        "year:2000",
        "age:UNKNOWN",
        "GENDER/8532",
        "RACE/UNKNOWN",
        "[VS]",
        "VISIT/9202",
        "[OOV]",
        "SNOMED/1",
        "[VE]",
    ]
    assert stats.oov_tokens == 1 and stats.oov_codes == {"ICD10/NEW": 1}


def test_messy_dates_are_moved_and_counted() -> None:
    tok = TOKENIZERS["day"]
    rows = [
        # an inpatient stay 2000-01-10..15 and an outpatient visit inside it, one event early
        (1, dt.datetime(2000, 1, 10), "VISIT/9201", None, 1, dt.datetime(2000, 1, 15), None, None),
        (1, dt.datetime(2000, 1, 8), "SNOMED/1", None, 1, None, None, None),
        (1, dt.datetime(2000, 1, 12), "VISIT/9202", None, 2, dt.datetime(2000, 1, 12), None, None),
        (1, dt.datetime(2000, 1, 12), "SNOMED/2", None, 2, None, None, None),
    ]
    encoded, stats = encode_shard(_frame(rows), tok)
    # both events: the early one, and the one of the visit moved to the stay's end
    assert stats.events_moved_to_visit_start == 2 and stats.visits_moved_after_previous == 1
    tokens = [tok.tokens[i] for i in encoded["input_ids"][0]]
    assert tokens[4:] == [
        "[VS]",
        "VISIT/9201",
        "SNOMED/1",
        "i-D5",
        "DISCHARGE/UNKNOWN",
        "[VE]",
        "D0",
        "[VS]",
        "VISIT/9202",
        "SNOMED/2",
        "[VE]",
    ]


@pytest.mark.parametrize(
    ("tokens", "reason"),
    [
        (["age:3", "GENDER/UNKNOWN", "RACE/UNKNOWN", "[VS]"], "no year token first"),
        (["year:2000", "age:3", "GENDER/UNKNOWN", "RACE/UNKNOWN"], "nothing after the prompt"),
        (
            ["year:2000", "age:3", "GENDER/UNKNOWN", "RACE/UNKNOWN", "[VS]", "SNOMED/1", "[VE]"],
            "no visit type after [VS]",
        ),
        (
            [
                "year:2000",
                "age:3",
                "GENDER/UNKNOWN",
                "RACE/UNKNOWN",
                "[VS]",
                "VISIT/9202",
                "SNOMED/1",
            ],
            "visit not closed by [VE]",
        ),
        (
            [
                "year:2000",
                "age:3",
                "GENDER/UNKNOWN",
                "RACE/UNKNOWN",
                "[VS]",
                "VISIT/9202",
                "[VE]",
                "D3",
                "[VS]",
                "[DEATH]",
                "[VE]",
                "D1",
                "[VS]",
                "VISIT/9202",
                "[VE]",
            ],
            "[DEATH] not last",
        ),
        (
            [
                "year:2000",
                "age:3",
                "GENDER/UNKNOWN",
                "RACE/UNKNOWN",
                "[VS]",
                "VISIT/9202",
                "[VE]",
                "[VS]",
                "VISIT/9202",
                "[VE]",
            ],
            "expected a time token between visits",
        ),
        (
            [
                "year:2000",
                "age:3",
                "GENDER/UNKNOWN",
                "RACE/UNKNOWN",
                "[VS]",
                "VISIT/9201",
                "SNOMED/1",
                "[VE]",
            ],
            "inpatient visit without discharge",
        ),
        (
            [
                "year:2000",
                "age:3",
                "GENDER/UNKNOWN",
                "RACE/UNKNOWN",
                "[VS]",
                "VISIT/9202",
                "VAL:Q3",
                "[VE]",
            ],
            "value without a code before it",
        ),
    ],
)
def test_invalid_sequences_are_rejected_with_a_reason(tokens: list[str], reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_tokens(tokens, TOKENIZERS["day"], first_day=0)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("birth", "first", "age"),
    [
        (dt.datetime(1916, 1, 3), dt.datetime(1920, 9, 16), 4),  # month*100+day overflowed Int8
        (dt.datetime(1950, 6, 15), dt.datetime(2000, 6, 14), 49),
        (dt.datetime(1950, 6, 15), dt.datetime(2000, 6, 15), 50),
        (dt.datetime(1952, 12, 31), dt.datetime(2000, 1, 1), 47),
    ],
)
def test_age_is_whole_years_at_the_first_visit(birth, first, age) -> None:
    tok = TOKENIZERS["day"]
    rows = [
        (1, birth, mc.BIRTH_CODE, None, None, None, None, None),
        (1, first, "VISIT/9202", None, 1, first, None, None),
        (1, first, "SNOMED/1", None, 1, None, None, None),
    ]
    encoded, _ = encode_shard(_frame(rows), tok)
    assert tok.tokens[encoded["input_ids"][0][1]] == f"age:{age}"

"""Property tests of the time tokens: encode and decode are inverses at each scheme's resolution."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ehrgpt.tokenizer import time_tokens as tt

RESOLUTION = {"day": 0, "cehr_bert": 15, "mix": 15}
gaps = st.integers(min_value=0, max_value=365 * tt.MAX_YEARS)


@pytest.mark.parametrize("scheme", tt.SCHEMES)
@given(days=gaps)
def test_decode_is_inverse_within_resolution(scheme: str, days: int) -> None:
    tokens = tt.att_tokens(days, scheme)
    decoded = tt.att_days(tokens, scheme)
    assert abs(decoded - days) <= RESOLUTION[scheme]
    assert tt.att_tokens(decoded, scheme) == tokens  # tokens -> days -> the same tokens
    assert set(tokens) <= set(tt.att_vocab(scheme))


@pytest.mark.parametrize("scheme", tt.SCHEMES)
def test_long_gaps_keep_their_length(scheme: str) -> None:
    # The reference decodes every LT as 1095 days; here 3 and 30 years stay 3 and 30 years.
    for years in (3, 30):
        days = 365 * years + 100
        assert abs(tt.att_days(tt.att_tokens(days, scheme), scheme) - days) <= RESOLUTION[scheme]


def test_day_scheme_boundaries() -> None:
    assert tt.att_tokens(1079, "day") == ["D1079"]
    assert tt.att_tokens(1080, "day") == ["LT", "Y2", "D350"]
    assert tt.att_tokens(-5, "day") == ["D0"]


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        (7, ["D7"]),
        (8, ["W2"]),
        (30, ["W5"]),
        (31, ["M2"]),
        (360, ["M12"]),
        (361, ["LT", "Y0", "M13"]),
    ],
)
def test_mix_scheme_buckets(days: int, expected: list[str]) -> None:
    assert tt.att_tokens(days, "mix") == expected


@given(days=st.integers(min_value=1, max_value=10_000))
def test_day_tokens_sum_to_the_gap(days: int) -> None:
    tokens = tt.day_tokens(days)
    assert sum(int(t[3:]) for t in tokens) == days
    assert set(tokens) <= set(tt.day_vocab())


def test_unknown_scheme_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown ATT scheme 'week'"):
        tt.att_tokens(3, "week")


@given(days=gaps)
def test_att_parts_recompose(days: int) -> None:
    years, months, rest = tt.att_parts(days)
    assert 365 * years + 30 * months + rest == days
    assert 0 <= months <= 12 and 0 <= rest < 30

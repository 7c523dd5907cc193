"""Prompts for generation: the training population's demographics, a user's, or a real history.

- :func:`demographics` counts the demographic prompts (``year:Y age:A GENDER/g RACE/r``) of a
  prepared run's training split; :func:`population_prompts` draws from them, so the synthetic
  population keeps the real mix.
- :func:`user_prompts` builds prompts from ``--year`` (1900 up to the training data's last
  year), ``--age 60-70`` and ``--gender F``; race (and whatever else is not given) is drawn
  from the training population.
- :func:`history_prompt` cuts a real patient's tokens at a time (the history up to and
  including that day, ending after a whole visit), and, if it is longer than allowed, keeps the
  most recent visits behind a rebuilt demographic prompt (year and age at the first kept visit).

>>> history_prompt([10, 11, 12, 13, 4, 20, 5, 30, 4, 21, 5], [0, 0, 0, 0, 0, 0, 0, 9, 9, 9, 9],
...                cutoff_day=5, vs_id=4, ve_id=5)
[10, 11, 12, 13, 4, 20, 5]
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from ehrgpt.errors import EhrgptError
from ehrgpt.tokenizer.decode import MIN_BIRTH_YEAR
from ehrgpt.tokenizer.vocab import MAX_AGE, VE, VS, YEAR_RANGE, EhrTokenizer

PROMPT_COLUMNS = ("year", "age", "gender", "race")
GENDERS = {"F": "GENDER/8532", "M": "GENDER/8507"}
DEMOGRAPHICS_FILE = "demographics.parquet"


def demographics(run_dir: Path, tok: EhrTokenizer) -> pl.DataFrame:
    """Counts of the training split's demographic prompts: ``year, age, gender, race, n``."""
    files = sorted((Path(run_dir) / "tokenized" / "train").glob("*.parquet"))
    if not files:
        raise EhrgptError(f"{run_dir} has no tokenized training data (tokenized/train/*.parquet).")
    first = pl.scan_parquet(files).select(pl.col("input_ids").list.head(4)).collect()
    rows = [[tok.tokens[i] for i in ids] for ids in first["input_ids"].to_list()]
    frame = pl.DataFrame(rows, schema=list(PROMPT_COLUMNS), orient="row")
    return frame.group_by(PROMPT_COLUMNS).len("n").sort(PROMPT_COLUMNS)


def load_demographics(model_dir: Path, data_dir: Path | None, tok: EhrTokenizer) -> pl.DataFrame:
    """The demographics saved with a model, or counted from ``data_dir``."""
    saved = Path(model_dir) / DEMOGRAPHICS_FILE
    if saved.exists():
        return pl.read_parquet(saved)
    if data_dir is None:
        raise EhrgptError(
            f"{model_dir} holds no {DEMOGRAPHICS_FILE}; give --prompts-from RUN_DIR (the prepared "
            "run the model was trained on) to draw demographic prompts."
        )
    return demographics(data_dir, tok)


def population_prompts(
    table: pl.DataFrame, n: int, tok: EhrTokenizer, seed: int
) -> list[list[int]]:
    """``n`` prompts drawn with replacement, in proportion to the counts."""
    rng = np.random.default_rng(seed)
    weights = table["n"].to_numpy().astype(float)
    picks = rng.choice(table.height, size=n, p=weights / weights.sum())
    rows = table.select(PROMPT_COLUMNS).rows()
    return [[tok.token_to_id[t] for t in rows[i]] for i in picks]


def user_prompts(
    table: pl.DataFrame,
    n: int,
    tok: EhrTokenizer,
    seed: int,
    *,
    year: int | None = None,
    age: tuple[int, int] | None = None,
    gender: str | None = None,
) -> list[list[int]]:
    """Prompts with the given year, age range and gender; the rest drawn from the population."""
    rng = np.random.default_rng(seed)
    pool = table
    if gender is not None:
        code = GENDERS.get(gender.upper(), gender)
        if code not in tok:
            raise EhrgptError(
                f"--gender {gender}: the vocabulary has no {code} token "
                f"(known: {', '.join(t for t in tok.tokens if t.startswith('GENDER/'))})."
            )
        pool = pool.filter(pl.col("gender") == code)
        if pool.is_empty():
            pool = table.with_columns(pl.lit(code).alias("gender"))
    last_year = tok.data_end.year
    if year is not None and not MIN_BIRTH_YEAR <= year <= last_year:
        raise EhrgptError(
            f"--year {year} is outside {MIN_BIRTH_YEAR}..{last_year} (the last year of the "
            "training data); choose a year in that range."
        )
    if age is not None and not (0 <= age[0] <= age[1] <= MAX_AGE):
        raise EhrgptError(f"--age {age[0]}-{age[1]} must be a range within 0-{MAX_AGE}.")
    base = population_prompts(pool, n, tok, seed)
    out = []
    for ids in base:
        tokens = [tok.tokens[i] for i in ids]
        if year is not None:
            tokens[0] = f"year:{year}"
        if age is not None:
            tokens[1] = f"age:{int(rng.integers(age[0], age[1] + 1))}"
        if gender is not None:
            tokens[2] = GENDERS.get(gender.upper(), gender)
        out.append([tok.token_to_id[t] for t in tokens])
    return out


def parse_age(text: str | None) -> tuple[int, int] | None:
    """``"60-70"`` -> (60, 70); ``"65"`` -> (65, 65).

    >>> parse_age("60-70"), parse_age("65"), parse_age(None)
    ((60, 70), (65, 65), None)
    """
    if text is None:
        return None
    lo, _, hi = text.partition("-")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise EhrgptError(f"--age {text!r}: use a whole number or a range like 60-70.") from None


def history_prompt(
    input_ids: Sequence[int],
    days: Sequence[int],
    *,
    cutoff_day: int,
    vs_id: int,
    ve_id: int,
    max_len: int | None = None,
    tok: EhrTokenizer | None = None,
    birth_day: int | None = None,
) -> list[int]:
    """A real history up to and including ``cutoff_day``, ending after a whole visit.

    Longer than ``max_len``: the most recent visits are kept behind a rebuilt prompt (needs
    ``tok`` and ``birth_day`` for the year and age at the first kept visit). Raises
    :class:`EhrgptError` when no visit ends by ``cutoff_day``.
    """
    ids, dys = list(input_ids), list(days)
    ends = [i for i, t in enumerate(ids) if t == ve_id and dys[i] <= cutoff_day]
    if not ends:
        raise EhrgptError(f"no visit of this history ends by day {cutoff_day}")
    ids, dys = ids[: ends[-1] + 1], dys[: ends[-1] + 1]
    if max_len is None or len(ids) <= max_len:
        return ids
    if tok is None:
        raise ValueError("left truncation needs the tokenizer to rebuild the prompt")
    starts = [i for i, t in enumerate(ids) if t == vs_id and len(ids) - i + 4 <= max_len]
    if not starts:
        raise EhrgptError(f"the last visit alone is longer than {max_len} tokens")
    first = starts[0]
    day = dt.date(1970, 1, 1) + dt.timedelta(days=dys[first])
    year = min(max(day.year, YEAR_RANGE[0]), YEAR_RANGE[1])
    if birth_day is None:
        age_token = "age:UNKNOWN"
    else:
        birth = dt.date(1970, 1, 1) + dt.timedelta(days=birth_day)
        age = day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))
        age_token = f"age:{min(max(age, 0), MAX_AGE)}"
    prompt = [tok.token_to_id[f"year:{year}"], tok.token_to_id[age_token], ids[2], ids[3]]
    return prompt + ids[first:]


__all__ = [
    "DEMOGRAPHICS_FILE",
    "VE",
    "VS",
    "demographics",
    "history_prompt",
    "load_demographics",
    "parse_age",
    "population_prompts",
    "user_prompts",
]

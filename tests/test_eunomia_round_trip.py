"""The whole of Eunomia through encode and decode: every patient comes back, dates included."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import polars as pl

from ehrgpt.meds_format import columns as mc
from ehrgpt.tokenizer.decode import decode_ids, timeline_to_meds
from ehrgpt.tokenizer.encode import encode_shard
from ehrgpt.tokenizer.vocab import EhrTokenizer


def _events(frame: pl.DataFrame, tok: EhrTokenizer) -> pl.DataFrame:
    """(subject, day, token) of clinical events, codes outside the vocabulary as [OOV]."""
    ev = frame.filter(
        pl.col("time").is_not_null()
        & ~pl.col("code").str.starts_with(mc.VISIT_PREFIX)
        & ~pl.col("code").str.starts_with(mc.DISCHARGE_PREFIX)
        & ~pl.col("code").is_in([mc.BIRTH_CODE, mc.DEATH_CODE])
    )
    return ev.select(
        "subject_id",
        pl.col("time").dt.date().alias("day"),
        pl.col("code").replace_strict(
            {t: t for t in tok.tokens}, default="[OOV]", return_dtype=pl.String
        ),
    )


def test_every_eunomia_patient_round_trips(eunomia_run: Path) -> None:
    tok = EhrTokenizer.from_pretrained(eunomia_run / "tokenizer")
    stats = json.loads((eunomia_run / "tokenized" / "stats.json").read_text())["all"]
    meds = pl.read_parquet(sorted((eunomia_run / "meds" / "data").rglob("*.parquet")))
    encoded = pl.read_parquet(sorted((eunomia_run / "tokenized").rglob("*.parquet")))
    assert encoded.height == 2694

    decoded = pl.concat(
        timeline_to_meds(
            decode_ids(r["input_ids"], tok, first_day=r["first_day"]),
            tok,
            r["subject_id"],
            birth_day=r["birth_day"],
        )
        for r in encoded.iter_rows(named=True)
    )
    # tokens -> MEDS -> tokens: the identity for every patient, token days included.
    again, _ = encode_shard(decoded, tok)
    joined = encoded.join(again, on="subject_id", suffix="_again")
    assert joined.height == 2694
    assert (joined["input_ids"] == joined["input_ids_again"]).all()
    assert (joined["days"] == joined["days_again"]).all()

    # MEDS -> tokens -> MEDS: every event comes back with its code (or [OOV]) ...
    original, back = _events(meds, tok), _events(decoded, tok)
    assert original.height == back.height == stats["events"]
    assert Counter(original.select("subject_id", "code").iter_rows()) == Counter(
        back.select("subject_id", "code").iter_rows()
    )
    # ... and on its own day, except the few that encoding moved (events dated before their
    # visit, visits starting inside an earlier one), which the counts name.
    lost = Counter(original.iter_rows()) - Counter(back.iter_rows())
    moved_budget = stats["events_moved_to_visit_start"] + 50 * stats["visits_moved_after_previous"]
    assert sum(lost.values()) <= moved_budget
    assert sum(lost.values()) / original.height < 0.01

    # Visits, deaths and birth years survive too.
    n_visits = meds.filter(pl.col("code").str.starts_with(mc.VISIT_PREFIX)).height
    assert decoded.filter(pl.col("code").str.starts_with(mc.VISIT_PREFIX)).height == n_visits
    births = (
        meds.filter(pl.col("code") == mc.BIRTH_CODE).select("subject_id", "time").sort("subject_id")
    )
    births_back = decoded.filter(pl.col("code") == mc.BIRTH_CODE).select("subject_id", "time")
    assert births.equals(births_back.sort("subject_id"))


def test_encoding_in_slices_of_subjects_changes_nothing(eunomia_run: Path) -> None:
    """A shard is encoded a slice of whole subjects at a time (bounded memory): the tokens and
    every count are those of one piece, also for rows not sorted by subject."""
    tok = EhrTokenizer.from_pretrained(eunomia_run / "tokenizer")
    # The split shards one after the other: not sorted by subject as a whole.
    meds = pl.read_parquet(sorted((eunomia_run / "meds" / "data").rglob("*.parquet")))
    assert not meds["subject_id"].is_sorted()
    whole, whole_stats = encode_shard(meds, tok, chunk_rows=meds.height)
    sliced, sliced_stats = encode_shard(meds, tok, chunk_rows=5_000)
    assert whole.height == 2694
    assert sliced.equals(whole)
    assert sliced_stats == whole_stats

"""Vocabulary expansion: Synthea27Nj prepared with ``--vocab-from`` the Eunomia run.

Old ids must not move, new codes come after them, the expanded tokenizer is saved with the
run, and codes that the Eunomia vocabulary lacked stop being ``[OOV]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from ehrgpt.errors import EhrgptError
from ehrgpt.pipelines.prepare import prepare
from ehrgpt.tokenizer.encode import EncodeStats, encode_shard
from ehrgpt.tokenizer.vocab import OOV, EhrTokenizer
from tests.helpers.runs import (
    assert_quality_adds_up,
    meds_frame,
    quality,
    read_json,
    tokens_frame,
    vocab,
)

OOV_KEY = "out-of-vocabulary tokens ([OOV])"


@pytest.fixture(scope="module")
def without_expansion(eunomia_run: Path, synthea_expanded_run: Path) -> EncodeStats:
    """Synthea's MEDS shards encoded with the Eunomia tokenizer as it is (no expansion)."""
    tok = EhrTokenizer.from_pretrained(eunomia_run / "tokenizer")
    stats = EncodeStats()
    for shard in sorted((synthea_expanded_run / "meds" / "data").rglob("*.parquet")):
        stats.merge(encode_shard(pl.read_parquet(shard), tok)[1])
    return stats


def test_old_ids_are_kept_and_new_codes_appended(
    eunomia_run: Path, synthea_expanded_run: Path
) -> None:
    old, new = vocab(eunomia_run), vocab(synthea_expanded_run)
    assert len(new) > len(old)
    # every old token keeps its id; ids stay dense 0..n-1
    assert {t: new[t] for t in old} == old
    assert sorted(new.values()) == list(range(len(new)))
    added = {t: i for t, i in new.items() if t not in old}
    assert min(added.values()) == len(old)
    report = quality(synthea_expanded_run)
    assert report["tokens"]["codes added to the base vocabulary"] == len(added)
    assert report["tokens"]["vocabulary size"] == len(new)
    # the added tokens are codes of the new data (or their categorical values)
    data = meds_frame(synthea_expanded_run)
    train_codes = set(data["code"]) | {f"VAL:{c}" for c in data["value_code"].drop_nulls()}
    assert set(added) <= train_codes
    assert read_json(synthea_expanded_run / "config.json")["vocab_from"] == str(eunomia_run)


def test_expanded_tokenizer_is_saved_with_the_run(
    eunomia_run: Path, synthea_expanded_run: Path
) -> None:
    tok = EhrTokenizer.from_pretrained(synthea_expanded_run / "tokenizer")
    base = EhrTokenizer.from_pretrained(eunomia_run / "tokenizer")
    assert tok.tokens[: len(base)] == base.tokens
    assert (
        len(tok)
        == read_json(synthea_expanded_run / "tokenizer" / "tokenizer_config.json")["vocab_size"]
    )
    assert tok.att_scheme == base.att_scheme
    # counts merged: Eunomia's patients plus Synthea's training patients
    assert tok.n_subjects > base.n_subjects
    # value statistics merged: Eunomia has no numeric values, Synthea brings its bins
    assert not base.value_bins and tok.value_bins
    # the base run's tokenizer is left as it was
    assert vocab(eunomia_run) == base.token_to_id
    # every token id in the tokenized data is a valid id of the saved vocabulary
    ids = tokens_frame(synthea_expanded_run)["input_ids"].explode()
    assert ids.min() >= 0 and ids.max() < len(tok)


def test_codes_oov_without_expansion_are_now_in_vocabulary(
    synthea_expanded_run: Path, synthea_run: Path, without_expansion: EncodeStats
) -> None:
    expanded = quality(synthea_expanded_run)
    assert_quality_adds_up(expanded)
    tok = EhrTokenizer.from_pretrained(synthea_expanded_run / "tokenizer")
    n_oov = expanded["tokens"][OOV_KEY]

    # the Eunomia vocabulary alone leaves thousands of Synthea tokens [OOV]
    assert without_expansion.oov_tokens > 10 * max(n_oov, 1)
    assert without_expansion.oov_tokens > 5_000
    was_oov = set(without_expansion.oov_codes)
    now_known = {c for c in was_oov if c in tok}
    assert len(now_known) > 0.8 * len(was_oov)

    # every code of Synthea's training split is in the vocabulary now (static codes other
    # than gender and race, ETHNICITY/..., have no place in a timeline and stay out)
    train = pl.read_parquet(sorted((synthea_expanded_run / "meds/data/train").glob("*.parquet")))
    train_codes = set(train["code"]) - {"MEDS_BIRTH", "MEDS_DEATH"}
    train_codes = {c for c in train_codes if not c.startswith("ETHNICITY/")}
    train_codes |= {f"VAL:{c}" for c in train["value_code"].drop_nulls()}
    assert {c for c in train_codes if c not in tok} == set()

    # what is still [OOV] comes from tuning / held-out patients only, as with Synthea's own
    # vocabulary, which the expanded one contains
    own = quality(synthea_run)["tokens"][OOV_KEY]
    assert n_oov <= own
    assert set(vocab(synthea_run)) <= set(tok.token_to_id)

    # the tokenized data agrees: [OOV] ids counted in the token rows match the report
    oov_id = tok.token_to_id[OOV]
    ids = tokens_frame(synthea_expanded_run)["input_ids"].explode()
    assert int((ids == oov_id).sum()) == n_oov


def test_expanded_run_tokenizes_the_same_patients(
    synthea_expanded_run: Path, synthea_run: Path
) -> None:
    """Expansion changes ids, not the data: same MEDS rows, same subjects, same lengths."""
    assert meds_frame(synthea_expanded_run).equals(meds_frame(synthea_run))
    a, b = tokens_frame(synthea_expanded_run), tokens_frame(synthea_run)
    assert a["subject_id"].to_list() == b["subject_id"].to_list()
    assert a["n_tokens"].to_list() == b["n_tokens"].to_list()


def test_expansion_keeps_the_time_scheme(
    eunomia_run: Path, tiny_meds: Path, tmp_path: Path
) -> None:
    # The base tokenizer's time tokens keep their meaning: another scheme is refused ...
    with pytest.raises(EhrgptError, match="differs from the scheme of the --vocab-from"):
        prepare(
            str(tiny_meds),
            tmp_path / "mix",
            vocab_from=eunomia_run,
            att_scheme="mix",
            progress=False,
        )
    assert not (tmp_path / "mix").exists()
    # ... and without --att-scheme the base scheme is used and recorded.
    run = prepare(str(tiny_meds), tmp_path / "same", vocab_from=eunomia_run, progress=False)
    config = json.loads((run.run_dir / "config.json").read_text())
    assert config["att_scheme"] == "day"

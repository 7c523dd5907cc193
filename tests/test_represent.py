"""Tasks, labels, leakage-safe histories, embeddings, probes, baseline, fine-tuning (Eunomia)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from sklearn.metrics import average_precision_score, roc_auc_score

from ehrgpt.cli import main
from ehrgpt.errors import EhrgptError
from ehrgpt.pipelines.finetune import finetune
from ehrgpt.pipelines.generate import load_model
from ehrgpt.pipelines.probe import demographic_features
from ehrgpt.pipelines.train import train
from ehrgpt.represent.baseline import count_features
from ehrgpt.represent.embed import embed_ids
from ehrgpt.represent.fewshot import nested_sets, run_fewshot
from ehrgpt.represent.finetune import FinetuneConfig
from ehrgpt.represent.metrics import auprc, auroc, binary_metrics, bootstrap_weights
from ehrgpt.tasks.history import encode_histories
from ehrgpt.tasks.labels import extract_labels, labels_for, read_labels
from tests.helpers.runs import planted_run

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    "tokens_per_row": 128,
    "rows_per_batch": 2,
    "eval_every": 4,
    "checkpoint_every": 4,
    "max_val_batches": 1,
}

#: A task a user writes (not shipped): GI bleed within 2 years after a first diclofenac
#: exposure, one code as an OMOP concept id, one as the data's MEDS code.
USER_TASK = """
description: GI bleed within 730 days after the first diclofenac exposure
predicates:
  diclofenac:
    code: 1124300
  bleed:
    code: SNOMED/74474003
trigger: diclofenac
windows:
  before:
    start: null
    end: trigger
    start_inclusive: true
    end_inclusive: false
    has:
      diclofenac: (None, 0)
  target:
    start: trigger
    end: start + 730d
    start_inclusive: false
    end_inclusive: true
    label: bleed
    index_timestamp: start
"""


@pytest.fixture(scope="module")
def model_dir(eunomia_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained a few steps on Eunomia (speed, not skill, is what tests need)."""
    out = tmp_path_factory.mktemp("represent_model") / "model"
    train(eunomia_run, out, max_steps=2, progress=False, **TINY)
    return out


@pytest.fixture(scope="module")
def user_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("user_task") / "diclofenac_bleed.yaml"
    path.write_text(USER_TASK)
    return path


# -- labels ---------------------------------------------------------------------------------


def test_celecoxib_gi_bleed_labels_match_aces_by_hand(eunomia_run: Path) -> None:
    labels = extract_labels(eunomia_run, "gi_bleed_celecoxib")
    assert (labels.frame.height, int(labels.frame["boolean_value"].sum())) == (1844, 355)
    assert labels.dropped == {}
    assert sum(c["labels"] for c in labels.counts().values()) == 1844
    assert labels.frame["subject_id"].n_unique() == 1844


def test_shipped_tasks_have_positives(eunomia_run: Path) -> None:
    for task in ("gi_bleed", "new_acute_bronchitis"):
        counts = extract_labels(eunomia_run, task).counts()
        assert all(c["positive"] >= 20 for c in counts.values()), (task, counts)


def test_bad_task_files_name_the_file(eunomia_run: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("predicates: {a: {code: X}\n")
    with pytest.raises(EhrgptError, match=r"broken\.yaml is not valid YAML"):
        extract_labels(eunomia_run, broken)
    rejected = tmp_path / "rejected.yaml"
    rejected.write_text(USER_TASK.replace("trigger: diclofenac", "trigger: aspirin"))
    with pytest.raises(EhrgptError, match=r"rejected\.yaml is not a valid ACES task.*aspirin"):
        extract_labels(eunomia_run, rejected)
    with pytest.raises(EhrgptError, match="neither a shipped task"):
        extract_labels(eunomia_run, "no_such_task")
    result = CliRunner().invoke(
        main,
        [
            "labels",
            "--data",
            str(eunomia_run),
            "--task",
            str(rejected),
            "--out",
            str(tmp_path / "l"),
        ],
    )
    assert result.exit_code == 2 and "rejected.yaml" in result.output
    assert not (tmp_path / "l").exists()


def test_absent_code_warns_with_count(eunomia_run: Path, tmp_path: Path, caplog) -> None:
    absent = tmp_path / "absent.yaml"
    absent.write_text(USER_TASK.replace("SNOMED/74474003", "SNOMED/000"))
    with caplog.at_level(logging.WARNING):
        labels = extract_labels(eunomia_run, absent)
    assert "predicate 'bleed' (code SNOMED/000) matches 0 rows" in caplog.text
    assert labels.frame.height > 0 and not labels.frame["boolean_value"].any()


def test_user_labels_count_what_cannot_be_used(eunomia_run: Path, tmp_path: Path) -> None:
    good = extract_labels(eunomia_run, "gi_bleed_celecoxib").frame.head(5).drop("split")
    odd = pl.DataFrame(
        {
            "subject_id": [10**9, int(good["subject_id"][0])],
            "prediction_time": [dt.datetime(2000, 1, 1), dt.datetime(1800, 1, 1)],
            "boolean_value": [True, False],
        }
    )
    path = tmp_path / "mine.parquet"
    pl.concat([good, odd]).write_parquet(path)
    labels = read_labels(path, eunomia_run)
    assert labels.frame.height == 5
    assert labels.dropped == {
        "subject not in the data": 1,
        "prediction time before the first event": 1,
    }
    pl.DataFrame({"subject_id": [1]}).write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(EhrgptError, match=r"lacks column.*prediction_time"):
        read_labels(tmp_path / "bad.parquet", eunomia_run)


# -- leakage ------------------------------------------------------------------------------


def test_events_after_prediction_time_change_nothing(
    eunomia_run: Path, model_dir: Path, tmp_path: Path
) -> None:
    labels = (
        extract_labels(eunomia_run, "gi_bleed_celecoxib").frame.head(40).with_row_index("sample_id")
    )
    planted = planted_run(eunomia_run, labels, tmp_path)
    model, tok = load_model(model_dir)
    views = []
    for run in (eunomia_run, planted):
        meds = pl.read_parquet(sorted((run / "meds" / "data").rglob("*.parquet")))
        assert meds.height > 0
        hist = encode_histories(meds, labels, tok, model.config.max_position_embeddings)
        vectors = embed_ids(model, hist["input_ids"].to_list())
        counts, names = count_features(run, labels)
        views.append((hist, vectors, counts, names, demographic_features(run, labels)))
    (h0, v0, c0, n0, d0), (h1, v1, c1, n1, d1) = views
    planted_rows = pl.read_parquet(sorted((planted / "meds" / "data").rglob("*.parquet"))).height
    assert (
        planted_rows
        > pl.read_parquet(sorted((eunomia_run / "meds" / "data").rglob("*.parquet"))).height
    )
    assert h0["input_ids"].to_list() == h1["input_ids"].to_list()
    for pooling in v0:
        np.testing.assert_array_equal(v0[pooling], v1[pooling])
    assert n0 == n1 and (c0 != c1).nnz == 0
    np.testing.assert_array_equal(d0, d1)


# -- end to end with a user's task --------------------------------------------------------


def test_user_task_through_labels_probe_baseline_finetune(
    eunomia_run: Path, model_dir: Path, user_task: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    common = ["--data", str(eunomia_run)]
    res = runner.invoke(
        main, ["labels", *common, "--task", str(user_task), "--out", str(tmp_path / "labels")]
    )
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == [
        "held_out.parquet",
        "labels.json",
        "train.parquet",
        "tuning.parquet",
    ]
    held = pl.read_parquet(tmp_path / "labels" / "held_out.parquet")
    assert held.columns == ["subject_id", "prediction_time", "boolean_value"]

    res = runner.invoke(
        main,
        [
            "probe",
            "--model",
            str(model_dir),
            *common,
            "--labels",
            str(tmp_path / "labels"),
            "--out",
            str(tmp_path / "probe"),
            "--n-boot",
            "50",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "count baseline: counts, lightgbm" in res.output
    res = runner.invoke(
        main,
        [
            "baseline",
            *common,
            "--task",
            str(user_task),
            "--out",
            str(tmp_path / "baseline"),
            "--n-boot",
            "50",
        ],
    )
    assert res.exit_code == 0, res.output

    for name in ("probe", "baseline"):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        for key in ("auroc", "auroc_ci", "auprc", "brier", "n_subjects", "n_positive"):
            assert key in metrics, (name, key)
        assert metrics["auroc_ci"][0] <= metrics["auroc"] <= metrics["auroc_ci"][1]
        assert metrics["n_subjects"] == held["subject_id"].n_unique()
        assert metrics["n_positive"] == int(held["boolean_value"].sum())
        preds = sorted((tmp_path / name / "predictions").glob("*.parquet"))
        assert preds
        assert pl.read_parquet(preds[0]).columns == [
            "subject_id",
            "prediction_time",
            "boolean_value",
            "predicted_boolean_value",
            "predicted_boolean_probability",
        ]
    probe_metrics = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert set(probe_metrics["baseline"]) == {"counts, logistic", "counts, lightgbm"}
    embeddings = pl.read_parquet(sorted((tmp_path / "probe" / "embeddings").glob("*.parquet")))
    assert embeddings.height == sum(
        pl.read_parquet(p).height for p in (tmp_path / "labels").glob("*.parquet")
    )

    result = finetune(
        model_dir,
        eunomia_run,
        tmp_path / "finetune",
        labels=tmp_path / "labels",
        max_len=64,
        config=FinetuneConfig(max_epochs=1),
        n_boot=50,
        progress=False,
        baseline=False,
    )
    metrics = json.loads((tmp_path / "finetune" / "metrics.json").read_text())
    assert 0 <= metrics["auroc"] <= 1 and result.notes[0][0] == "epoch 0"


def test_outputs_are_all_or_nothing(eunomia_run: Path, model_dir: Path, tmp_path: Path) -> None:
    labels = labels_for(eunomia_run, task="gi_bleed_celecoxib").frame
    only_negatives = tmp_path / "neg.parquet"
    labels.filter(~pl.col("boolean_value")).drop("split").write_parquet(only_negatives)
    res = CliRunner().invoke(
        main,
        [
            "baseline",
            "--data",
            str(eunomia_run),
            "--labels",
            str(only_negatives),
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert res.exit_code == 2 and "only one class" in res.output
    assert not any(p.name.startswith((".b", "b")) for p in tmp_path.iterdir())


# -- metrics and few-shot -------------------------------------------------------------------


def test_metrics_match_scikit_learn_and_bootstrap_resamples_subjects() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.round(rng.random(400) * 0.7 + 0.3 * y, 2)  # ties on purpose
    assert auroc(y, p) == pytest.approx(roc_auc_score(y, p))
    assert auprc(y, p) == pytest.approx(average_precision_score(y, p))
    subjects = np.arange(400) // 4
    w = bootstrap_weights(subjects, 20, seed=1)
    assert (w.reshape(20, 100, 4) == w.reshape(20, 100, 4)[:, :, :1]).all()
    assert (w.sum(axis=1) == 400).all()
    m = binary_metrics(y, p, subject_ids=subjects, n_boot=300, seed=0)
    assert m["auroc_ci"][0] < m["auroc"] < m["auroc_ci"][1]
    assert m["n_subjects"] == 100 and m["n_positive"] == int(y.sum())
    assert binary_metrics(y, p, subject_ids=subjects, n_boot=300, seed=0) == m


def test_fewshot_sets_are_nested_and_balanced() -> None:
    y = np.r_[np.ones(40, int), np.zeros(200, int)]
    sets = nested_sets(y, seed=3)
    assert max(k for _, k in sets) == 32
    for (r, k), idx in sets.items():
        assert y[idx].sum() == k and len(idx) == 2 * k
        smaller = [kk for (rr, kk) in sets if rr == r and kk < k]
        for kk in smaller:
            assert set(sets[(r, kk)]) <= set(idx)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(240, 3)) + y[:, None]
    shots = run_fewshot(
        {"x": (X, X)}, y, np.arange(240), y, heads=("logistic",), ks=(2, 8), replicates=2
    )
    assert shots.height == 5 and shots.filter(pl.col("k") == -1)["auroc"][0] > 0.8

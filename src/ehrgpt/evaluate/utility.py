"""Utility: does a model trained on synthetic patients still work on real ones?

For each task (a shipped task name or an ACES YAML, as for ``ehrgpt labels``), the same ACES
task makes labels on the real run and on the synthetic patients (its OMOP concept ids are
translated with the real run's codes on both sides; :func:`ehrgpt.tasks.labels.extract_labels`).
Features and model are those of ``ehrgpt baseline``'s main result: bucketed code counts and
age (:func:`ehrgpt.represent.baseline.count_features`, the vocabulary of the training rows)
and its LightGBM (:data:`HEADS`, from :mod:`ehrgpt.represent.heads`; the cross-validated
logistic regression is left out, as it costs minutes at 100,000 patients).

- TRTR: trained on the real train (+ tuning) labels;
- TSTR: trained on every synthetic label (every synthetic patient is training data);

both scored on the same real test labels (held_out) by AUROC with its patient-level
bootstrap interval (:func:`ehrgpt.represent.evaluate.evaluate`); the headline figures are
:data:`MAIN_HEAD`'s. A side whose training labels hold
fewer than :data:`MIN_PER_CLASS` positives or negatives is not fitted, nor is anything when
the test labels hold one class; the score's ``note`` says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from ehrgpt.represent.baseline import count_features
from ehrgpt.represent.evaluate import evaluate
from ehrgpt.represent.heads import fit_head, predict
from ehrgpt.tasks.labels import extract_labels, load_task, resolve_task

#: The head of the headline figures (``tstr_auroc``, ``trtr_auroc``).
MAIN_HEAD = "lightgbm"
#: The heads fitted on each side (see the module docstring).
HEADS = (MAIN_HEAD,)
#: Fewest positives and negatives a training side needs to be fitted.
MIN_PER_CLASS = 5
N_BOOT = 1000


@dataclass
class TaskScore:
    """One training cohort's result on one task: metrics per head (``heads``: head ->
    :func:`ehrgpt.represent.metrics.binary_metrics`), label counts, and a ``note`` when it
    could not be fitted (``heads`` is then empty)."""

    task: str
    trained_on: str
    n_train: int
    n_train_positive: int
    n_test: int
    n_test_positive: int
    heads: dict[str, dict] = field(default_factory=dict)
    note: str = ""

    @property
    def auroc(self) -> float:
        """AUROC of :data:`MAIN_HEAD` (nan when not fitted)."""
        main = self.heads.get(MAIN_HEAD)
        return main["auroc"] if main else math.nan


def resolve_tasks(tasks, real: Path) -> list[tuple[str, Path]]:
    """(name, YAML path) of each task, once, in order; each is read and checked by ACES
    against the real run's codes now, before any work (a bad task fails early)."""
    out: dict[str, Path] = {}
    for task in tasks:
        name, path = resolve_task(task)
        load_task(path, real)
        out.setdefault(name, path)
    return list(out.items())


def _why_not(trained_on: str, train: pl.DataFrame, test: pl.DataFrame, test_split: str) -> str:
    """Why a side cannot be fitted and scored ("" when it can).

    >>> t = pl.DataFrame({"boolean_value": [True, False, False]})
    >>> for part in _why_not("synthetic", t, t, "held_out").split(": "):
    ...     print(part)
    the synthetic training labels hold 3 row(s), 1 positive
    too few to train (at least 5 of each class)
    >>> _why_not("real", t.head(0), t, "held_out")
    'the task labels none of the real training patients'
    """
    y_test = test["boolean_value"]
    if y_test.n_unique() < 2:
        return (
            f"the real {test_split} labels hold {test.height} row(s), {int(y_test.sum())} "
            "positive: AUROC needs both classes"
        )
    if train.height == 0:
        return f"the task labels none of the {trained_on} training patients"
    positive = int(train["boolean_value"].sum())
    if min(positive, train.height - positive) < MIN_PER_CLASS:
        return (
            f"the {trained_on} training labels hold {train.height} row(s), {positive} positive: "
            f"too few to train (at least {MIN_PER_CLASS} of each class)"
        )
    return ""


def score_side(
    task: str,
    trained_on: str,
    train_dir: Path,
    train: pl.DataFrame,
    test_dir: Path,
    test: pl.DataFrame,
    *,
    test_split: str = "held_out",
    seed: int = 0,
    n_boot: int = N_BOOT,
) -> TaskScore:
    """Fit each head on count features of ``train`` labels (MEDS data in ``train_dir``) and
    score the ``test`` labels (MEDS data in ``test_dir``), features over the vocabulary of
    ``train``'s ``train`` split."""
    score = TaskScore(
        task,
        trained_on,
        train.height,
        int(train["boolean_value"].sum()),
        test.height,
        int(test["boolean_value"].sum()),
    )
    score.note = _why_not(trained_on, train, test, test_split)
    if score.note:
        return score
    train = train.with_row_index("sample_id")
    test = test.with_row_index("sample_id")
    x_train, vocab = count_features(train_dir, train)
    x_test, _ = count_features(test_dir, test, vocab=vocab)
    y = train["boolean_value"].to_numpy().astype(int)
    groups = train["subject_id"].to_numpy()
    for head in HEADS:
        model = fit_head(head, x_train, y, groups, seed)
        score.heads[head] = evaluate(test, predict(model, x_test), n_boot=n_boot, seed=seed)
    return score


def task_utility(
    real: Path,
    synthetic: Path,
    task: Path,
    *,
    test_split: str = "held_out",
    seed: int = 0,
    n_boot: int = N_BOOT,
) -> dict[str, TaskScore]:
    """TRTR and TSTR of one task: ``{"trtr": ..., "tstr": ...}``.

    ``real``: a prepared run or MEDS folder with splits; ``synthetic``: a MEDS folder;
    ``test_split``: the real split scored (``held_out``; the real training rows are
    ``train`` and ``tuning`` but for the test split).
    """
    name, _ = resolve_task(task)
    real_labels = extract_labels(real, task).frame
    syn_labels = extract_labels(synthetic, task, vocabulary=real).frame.with_columns(
        pl.lit("train").alias("split")
    )
    train_splits = [s for s in ("train", "tuning") if s != test_split]
    real_train = real_labels.filter(pl.col("split").is_in(train_splits))
    test = real_labels.filter(pl.col("split") == test_split)
    common = {"test_split": test_split, "seed": seed, "n_boot": n_boot}
    return {
        "trtr": score_side(name, "real", real, real_train, real, test, **common),
        "tstr": score_side(name, "synthetic", synthetic, syn_labels, real, test, **common),
    }


def interval_text(m: dict | None) -> str:
    """``0.712 [0.650, 0.770]`` (AUROC and its interval) or ``n/a``.

    >>> interval_text({"auroc": 0.7123, "auroc_ci": [0.65, 0.77]})
    '0.712 [0.650, 0.770]'
    """
    if not m or not np.isfinite(m.get("auroc", math.nan)):
        return "n/a"
    lo, hi = m["auroc_ci"]
    return f"{m['auroc']:.3f} [{lo:.3f}, {hi:.3f}]"

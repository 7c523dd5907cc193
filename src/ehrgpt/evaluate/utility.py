"""Utility: does a model trained on synthetic patients still work on real ones?

TSTR (train on synthetic, test on real held_out) against TRTR (train on real train, test on
the same held_out), for each task. The interface is narrow on purpose, so that labels and
features can be swapped (for ACES task labels and the count baseline of
``ehrgpt.represent``) without touching the rest of the evaluation:

- a :class:`Task` makes labels from MEDS events (:meth:`Task.labels`: ``subject_id``,
  ``prediction_time``, ``boolean_value``, the MEDS label schema);
- :func:`count_features` turns events before each prediction time into a sparse matrix;
- :func:`task_auroc` fits a logistic regression on one cohort's labelled patients and
  returns the AUROC on another's (:class:`TaskScore`).

Built-in task (``--task gi_bleed``): GI hemorrhage (SNOMED/74474003) within 365 days after
the first celecoxib (RxNorm/140587) or diclofenac (RxNorm/3355) exposure; patients with the
outcome at or before that exposure are left out. A custom task is written
``OUTCOME@EXPOSURE[,EXPOSURE...][:DAYS]``, for example
``SNOMED/74474003@RxNorm/140587:365``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp

from ehrgpt.errors import EhrgptError
from ehrgpt.evaluate.patients import CodeIndex, code_matrix


@dataclass(frozen=True)
class Task:
    """An outcome within a window after the first exposure (prediction time = that exposure)."""

    name: str
    outcome: str
    exposures: tuple[str, ...]
    window_days: int = 365

    def labels(self, events: pl.DataFrame) -> pl.DataFrame:
        """One label per patient exposed: true when the outcome follows the first exposure
        within the window (after the prediction time, up to ``window_days`` later).

        >>> t = Task("x", "O/1", ("E/1",), 30)
        >>> ev = pl.DataFrame({"subject_id": [1, 1, 2, 2, 3, 3, 4],
        ...     "time": [dt.datetime(2000, 1, d) for d in (1, 9, 1, 1, 2, 1, 1)],
        ...     "code": ["E/1", "O/1", "E/1", "X/1", "E/1", "O/1", "X/1"]})
        >>> t.labels(ev).select("subject_id", "boolean_value").rows()
        [(1, True), (2, False)]
        """
        ev = events.lazy().filter(pl.col("time").is_not_null())
        first = (
            ev.filter(pl.col("code").is_in(list(self.exposures)))
            .group_by("subject_id")
            .agg(pl.col("time").min().alias("prediction_time"))
        )
        outcomes = ev.filter(pl.col("code") == self.outcome).select("subject_id", "time")
        window = dt.timedelta(days=self.window_days)
        per = (
            first.join(outcomes, on="subject_id", how="left")
            .group_by("subject_id", "prediction_time")
            .agg(
                ((pl.col("time") <= pl.col("prediction_time")).fill_null(False))
                .any()
                .alias("prior"),
                (
                    (pl.col("time") > pl.col("prediction_time"))
                    & (pl.col("time") <= pl.col("prediction_time") + window)
                )
                .fill_null(False)
                .any()
                .alias("boolean_value"),
            )
        )
        return (
            per.filter(~pl.col("prior"))
            .select("subject_id", "prediction_time", "boolean_value")
            .sort("subject_id")
            .collect()
        )


BUILTIN_TASKS: dict[str, Task] = {
    "gi_bleed": Task("gi_bleed", "SNOMED/74474003", ("RxNorm/140587", "RxNorm/3355"), 365),
}


def parse_task(text: str) -> Task:
    """A built-in task name or ``OUTCOME@EXPOSURE[,EXPOSURE...][:DAYS]``.

    >>> t = parse_task("SNOMED/1@RxNorm/2,RxNorm/3:30")
    >>> t.outcome, t.exposures, t.window_days
    ('SNOMED/1', ('RxNorm/2', 'RxNorm/3'), 30)
    """
    if text in BUILTIN_TASKS:
        return BUILTIN_TASKS[text]
    outcome, at, rest = text.partition("@")
    exposures, _, days = rest.partition(":")
    if not at or not outcome or not exposures or (days and not days.isdigit()):
        raise EhrgptError(
            f"--task {text!r} is neither a built-in task ({', '.join(BUILTIN_TASKS)}) nor "
            "OUTCOME@EXPOSURE[,EXPOSURE...][:DAYS], e.g. SNOMED/74474003@RxNorm/140587:365."
        )
    return Task(text, outcome, tuple(exposures.split(",")), int(days) if days else 365)


def count_features(
    events: pl.DataFrame, labels: pl.DataFrame, index: CodeIndex, ages: pl.DataFrame
) -> sp.csr_matrix:
    """log(1 + count) of each code at or before the prediction time, and age / 100 then
    (``ages``: ``subject_id``, ``birth``; null birth counts as age 0)."""
    counts = code_matrix(
        events,
        labels["subject_id"].to_numpy(),
        index,
        before=labels.select("subject_id", "prediction_time"),
    )
    counts.data = np.log1p(counts.data)
    age = (
        labels.join(ages.select("subject_id", "birth"), on="subject_id", how="left")
        .select(
            (
                (pl.col("prediction_time") - pl.col("birth")).dt.total_days() / 365.25 / 100
            ).fill_null(0.0)
        )
        .to_numpy()
        .astype(np.float32)
    )
    return sp.hstack([counts, sp.csr_matrix(age)]).tocsr()


@dataclass
class TaskScore:
    """The AUROC of one task for one training cohort (nan with ``note`` when it cannot be
    computed, for example a training set with one class only)."""

    task: str
    auroc: float
    n_train: int
    n_train_positive: int
    n_test: int
    n_test_positive: int
    note: str = ""


def task_auroc(
    train_events: pl.DataFrame,
    train_people: pl.DataFrame,
    test_events: pl.DataFrame,
    test_people: pl.DataFrame,
    task: Task,
    index: CodeIndex,
    *,
    seed: int = 0,
) -> TaskScore:
    """Fit a logistic regression on count features of ``train`` labels, score ``test`` labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    tr, te = task.labels(train_events), task.labels(test_events)
    ytr, yte = tr["boolean_value"].to_numpy(), te["boolean_value"].to_numpy()
    score = TaskScore(task.name, float("nan"), len(ytr), int(ytr.sum()), len(yte), int(yte.sum()))
    if len(set(yte.tolist())) < 2:
        score.note = "the real held_out labels have one class only"
        return score
    if len(set(ytr.tolist())) < 2:
        score.note = f"the training labels have one class only ({len(ytr)} labels)"
        return score
    model = LogisticRegression(solver="liblinear", max_iter=1000, C=0.1, random_state=seed)
    model.fit(count_features(train_events, tr, index, train_people), ytr)
    proba = model.predict_proba(count_features(test_events, te, index, test_people))[:, 1]
    score.auroc = float(roc_auc_score(yte, proba))
    return score

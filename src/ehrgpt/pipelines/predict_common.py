"""What ``probe``, ``baseline`` and ``finetune`` share: splits, fitting heads, results, output.

Training rows are the ``train`` and ``tuning`` splits (heads choose their settings by
cross-validation grouped by subject); every metric is on ``held_out``. Each command writes
``metrics.json`` (its main result's metrics at the top, every result under ``results``, the
count baseline's under ``baseline``), ``predictions/<result>.parquet`` in the meds-evaluation
schema, and the labels it used (``labels/<split>.parquet``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from ehrgpt.errors import EhrgptError
from ehrgpt.represent.baseline import count_features
from ehrgpt.represent.evaluate import check_predictions, evaluate, metric_text, predictions_frame
from ehrgpt.represent.heads import HEADS, fit_head, predict
from ehrgpt.tasks.labels import Labels, write_labels
from ehrgpt.util.atomic import write_json, write_parquet

TRAIN_SPLITS = ("train", "tuning")
TEST_SPLIT = "held_out"


@dataclass
class PredictResult:
    """Metrics of a command's results (and of the count baseline), for the summary table."""

    command: str
    out: Path
    task: str
    counts: dict = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)
    baseline: dict[str, dict] = field(default_factory=dict)
    main: str = ""
    notes: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def rows(self) -> list[tuple[str, str]]:
        labels = ", ".join(
            f"{split} {c['labels']:,} ({c['positive']:,} positive)"
            for split, c in self.counts.items()
        )
        rows = [("task", self.task), ("labels", labels)]
        rows += [(f"{self.command}: {name}", metric_text(m)) for name, m in self.results.items()]
        rows += [(f"count baseline: {name}", metric_text(m)) for name, m in self.baseline.items()]
        rows += self.notes
        rows += [("output folder", str(self.out)), ("seconds", f"{self.seconds:.1f}")]
        return rows

    def metrics(self) -> dict:
        main = self.results.get(self.main, {})
        return {
            **main,
            "command": self.command,
            "task": self.task,
            "main_result": self.main,
            "results": self.results,
            "baseline": self.baseline,
            "labels": self.counts,
        }


def split_masks(frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the training rows (train + tuning) and the test rows (held_out)."""
    split = frame["split"].to_numpy()
    train, test = np.isin(split, TRAIN_SPLITS), split == TEST_SPLIT
    y = frame["boolean_value"].to_numpy()
    for name, mask in (("train + tuning", train), (TEST_SPLIT, test)):
        if len(np.unique(y[mask])) < 2:
            raise EhrgptError(
                f"The labels of the {name} split(s) hold {int(mask.sum())} row(s) and only one "
                "class; a probe needs positives and negatives in both."
            )
    return train, test


def fit_and_score(
    name: str,
    X,
    frame: pl.DataFrame,
    result: dict[str, dict],
    predictions: dict[str, pl.DataFrame],
    *,
    heads=HEADS,
    n_boot: int = 1000,
    seed: int = 0,
) -> None:
    """Fit each head on the training rows of ``X``; score held_out into ``result``."""
    train, test = split_masks(frame)
    y = frame["boolean_value"].to_numpy().astype(int)
    groups = frame["subject_id"].to_numpy()
    for head in heads:
        model = fit_head(head, X[train], y[train], groups[train], seed)
        p = predict(model, X[test])
        key = f"{name}, {head}"
        result[key] = evaluate(frame.filter(pl.Series(test)), p, n_boot=n_boot, seed=seed)
        predictions[key] = predictions_frame(frame.filter(pl.Series(test)), p)


def run_baseline(
    run_dir: Path, frame: pl.DataFrame, *, n_boot: int = 1000, seed: int = 0
) -> tuple[dict[str, dict], dict[str, pl.DataFrame], object]:
    """The count baseline (both heads) on ``frame`` (with ``sample_id``); also its features."""
    X, _ = count_features(run_dir, frame)
    results: dict[str, dict] = {}
    predictions: dict[str, pl.DataFrame] = {}
    fit_and_score("counts", X, frame, results, predictions, n_boot=n_boot, seed=seed)
    return results, predictions, X


def _slug(name: str) -> str:
    return name.replace(", ", "_").replace(" ", "_")


def write_outputs(
    folder: Path, result: PredictResult, predictions: dict[str, pl.DataFrame], labels: Labels
) -> None:
    """``metrics.json``, ``predictions/*.parquet`` (validated) and ``labels/*.parquet``."""
    for name, frame in predictions.items():
        check_predictions(frame)
        write_parquet(Path(folder) / "predictions" / f"{_slug(name)}.parquet", frame)
    write_labels(labels, Path(folder) / "labels")
    write_json(Path(folder) / "metrics.json", result.metrics())

"""Predictions in the meds-evaluation schema, their metrics, and the table rows that show them."""

from __future__ import annotations

import numpy as np
import polars as pl

from ehrgpt.represent.metrics import binary_metrics

THRESHOLD = 0.5


def predictions_frame(labels: pl.DataFrame, p: np.ndarray) -> pl.DataFrame:
    """The meds-evaluation prediction columns for ``labels`` and probabilities ``p``.

    >>> import datetime as dt
    >>> t = dt.datetime(2020, 1, 1)
    >>> labels = pl.DataFrame({"subject_id": [1, 2], "prediction_time": [t, t],
    ...                        "boolean_value": [True, False]})
    >>> predictions_frame(labels, np.array([0.7, 0.2])).columns[3:]
    ['predicted_boolean_value', 'predicted_boolean_probability']
    """
    return labels.select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("prediction_time").cast(pl.Datetime("us")),
        pl.col("boolean_value").cast(pl.Boolean),
        pl.Series("predicted_boolean_value", p >= THRESHOLD),
        pl.Series("predicted_boolean_probability", p.astype(np.float32)),
    )


def check_predictions(frame: pl.DataFrame) -> None:
    """Validate against meds-evaluation's ``PredictionSchema`` when the package is installed."""
    try:
        from meds_evaluation.schema import PredictionSchema
    except ImportError:  # pragma: no cover - optional dependency
        return
    PredictionSchema.align(frame.to_arrow())


def evaluate(labels: pl.DataFrame, p: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics (with patient-level bootstrap intervals) of probabilities ``p`` for ``labels``."""
    return binary_metrics(
        labels["boolean_value"].cast(pl.Int8).to_numpy(),
        p,
        subject_ids=labels["subject_id"].to_numpy(),
        n_boot=n_boot,
        seed=seed,
    )


def metric_text(m: dict) -> str:
    """``AUROC 0.812 [0.741, 0.872]  AUPRC 0.45  Brier 0.120`` for a metrics dict."""
    lo, hi = m["auroc_ci"]
    return (
        f"AUROC {m['auroc']:.3f} [{lo:.3f}, {hi:.3f}]  AUPRC {m['auprc']:.3f}  "
        f"Brier {m['brier']:.3f}"
    )

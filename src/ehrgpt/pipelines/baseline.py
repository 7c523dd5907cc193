"""``ehrgpt baseline``: EHRSHOT-style count features, LightGBM and logistic regression."""

from __future__ import annotations

import time
from pathlib import Path

from ehrgpt.pipelines.output import output_folder
from ehrgpt.pipelines.predict_common import PredictResult, run_baseline, write_outputs
from ehrgpt.tasks.labels import labels_for


def baseline(
    run_dir: Path,
    out: Path,
    *,
    task: str | None = None,
    labels: Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
) -> PredictResult:
    """Fit the count baseline on train + tuning and score it on held_out."""
    started = time.perf_counter()
    found = labels_for(Path(run_dir), task=task, labels=labels)
    frame = found.frame.with_row_index("sample_id")
    with output_folder(Path(out), overwrite=overwrite) as tmp:
        results, predictions, X = run_baseline(Path(run_dir), frame, n_boot=n_boot, seed=seed)
        result = PredictResult(
            "baseline",
            Path(out),
            found.task or str(task),
            found.counts(),
            baseline=results,
            main="counts, lightgbm",
            notes=[("count features", f"{X.shape[1]:,} (codes x 30d/365d/all, and age)")],
        )
        result.results = dict(results)
        result.baseline = {}
        result.seconds = time.perf_counter() - started
        write_outputs(tmp, result, predictions, found)
    return result

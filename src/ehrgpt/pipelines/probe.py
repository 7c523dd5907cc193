"""``ehrgpt probe``: linear probe (and LightGBM) on patient embeddings, beside the count baseline.

Steps: labels (from ``--task`` or ``--labels``) -> embeddings of the leakage-safe histories
(``OUT/embeddings``) -> heads fitted on train + tuning -> held_out metrics with patient-level
bootstrap intervals; the count baseline on the same rows; optionally the EHRSHOT few-shot
protocol (``fewshot.parquet`` and ``fewshot.png``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import polars as pl

from ehrgpt.pipelines.embed import read_embeddings, write_embeddings
from ehrgpt.pipelines.output import output_folder
from ehrgpt.pipelines.predict_common import (
    PredictResult,
    fit_and_score,
    run_baseline,
    split_masks,
    write_outputs,
)
from ehrgpt.represent.baseline import count_features
from ehrgpt.represent.fewshot import plot_fewshot, run_fewshot, summarise
from ehrgpt.tasks.labels import labels_for
from ehrgpt.util.atomic import write_parquet

DEMOGRAPHIC_PREFIXES = ("GENDER/", "RACE/", "ETHNICITY/", "AGE_YEARS")


def demographic_features(run_dir: Path, frame: pl.DataFrame) -> np.ndarray:
    """Age at the prediction time and one-hot gender, race and ethnicity (dense)."""
    X, names = count_features(run_dir, frame)
    cols = [i for i, n in enumerate(names) if n.startswith(DEMOGRAPHIC_PREFIXES)]
    return X[:, cols].toarray()


def probe(
    model_dir: Path,
    run_dir: Path,
    out: Path,
    *,
    task: str | None = None,
    labels: Path | None = None,
    pooling: str = "mean",
    demographics: bool = False,
    fewshot: bool = False,
    baseline: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    token_budget: int = 16384,
    overwrite: bool = False,
    progress: bool = True,
) -> PredictResult:
    """Probe the embeddings of ``model_dir`` on a task; the count baseline beside it."""
    from ehrgpt.pipelines.generate import load_model

    started = time.perf_counter()
    run_dir = Path(run_dir)
    model, tok = load_model(Path(model_dir))
    found = labels_for(run_dir, task=task, labels=labels)
    split_masks(found.frame)
    with output_folder(Path(out), overwrite=overwrite) as tmp:
        embedded = write_embeddings(
            model, tok, run_dir, found, tmp, token_budget=token_budget, progress=progress
        )
        frame, X = read_embeddings(tmp, pooling)
        frame = frame.with_columns(pl.col("sample_id").cast(pl.UInt32))
        if demographics:
            X = np.hstack([X, demographic_features(run_dir, frame.with_row_index("_i"))])
        name = f"embedding ({pooling}{' + demographics' if demographics else ''})"
        results: dict[str, dict] = {}
        predictions: dict[str, pl.DataFrame] = {}
        fit_and_score(name, X, frame, results, predictions, n_boot=n_boot, seed=seed)
        result = PredictResult(
            "probe",
            Path(out),
            found.task or str(task),
            found.counts(),
            results,
            main=f"{name}, logistic",
        )
        if embedded.history.empty:
            result.notes.append(("labels without a history", f"{embedded.history.empty:,}"))
        Xc = None
        if baseline:
            # the baseline sees exactly the rows that have an embedding
            base_frame = frame.drop("sample_id").with_row_index("sample_id")
            result.baseline, base_pred, Xc = run_baseline(
                run_dir, base_frame, n_boot=n_boot, seed=seed
            )
            predictions.update(base_pred)
        if fewshot:
            train, test = split_masks(frame)
            y = frame["boolean_value"].to_numpy().astype(int)
            groups = frame["subject_id"].to_numpy()
            features = {"ehrgpt": (X[train], X[test])}
            if Xc is not None:
                features["counts"] = (Xc[train], Xc[test])
            shots = run_fewshot(features, y[train], groups[train], y[test], seed=seed)
            write_parquet(tmp / "fewshot.parquet", shots)
            plot_fewshot(shots, tmp / "fewshot.png", f"{result.task}: few-shot AUROC (held_out)")
            best = summarise(shots).filter(pl.col("k") == 128)
            for row in best.iter_rows(named=True):
                result.notes.append(
                    (
                        f"few-shot k=128: {row['features']}, {row['head']}",
                        f"AUROC {row['mean']:.3f}",
                    )
                )
            result.notes.append(("few-shot plot", str(Path(out) / "fewshot.png")))
        result.seconds = time.perf_counter() - started
        write_outputs(tmp, result, predictions, found)
    return result

"""``ehrgpt finetune``: the pretrained model and a classification head, trained end to end.

Histories are the leakage-safe ones of ``probe`` (cut at ``max_len`` tokens, default 256 to
keep CPU runs to minutes); training on ``train``, early stopping on ``tuning`` AUROC, metrics
on ``held_out``, beside the count baseline.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl

from ehrgpt.pipelines.output import output_folder
from ehrgpt.pipelines.predict_common import PredictResult, run_baseline, split_masks, write_outputs
from ehrgpt.represent.evaluate import evaluate, predictions_frame
from ehrgpt.represent.finetune import FinetuneConfig, finetune_classifier, predict_proba
from ehrgpt.tasks.history import HistoryStats, build_histories, plan_chunks
from ehrgpt.tasks.labels import labels_for
from ehrgpt.util.atomic import write_json


def finetune(
    model_dir: Path,
    run_dir: Path,
    out: Path,
    *,
    task: str | None = None,
    labels: Path | None = None,
    max_len: int = 256,
    config: FinetuneConfig | None = None,
    baseline: bool = True,
    n_boot: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
) -> PredictResult:
    """Fine-tune ``model_dir`` on a task and score held_out; the count baseline beside it."""
    import torch

    from ehrgpt.pipelines.generate import load_model

    started = time.perf_counter()
    config = config or FinetuneConfig()
    run_dir = Path(run_dir)
    model, tok = load_model(Path(model_dir))
    if torch.cuda.is_available():
        model = model.cuda()
    found = labels_for(run_dir, task=task, labels=labels)
    split_masks(found.frame)
    max_len = min(max_len, int(model.config.max_position_embeddings))
    frame = found.frame.with_row_index("sample_id")
    hist = pl.concat(
        build_histories(plan_chunks(run_dir, frame), tok, max_len, stats=HistoryStats())
    )
    hist = hist.sort("sample_id").drop("sample_id").with_row_index("sample_id")
    ids = [np.asarray(x, np.int64) for x in hist["input_ids"].to_list()]
    y = hist["boolean_value"].to_numpy().astype(int)
    split = hist["split"].to_numpy()
    tr, tu, te = (np.flatnonzero(split == s) for s in ("train", "tuning", "held_out"))
    clf, log = finetune_classifier(
        model, [ids[i] for i in tr], y[tr], [ids[i] for i in tu], y[tu], config, progress=progress
    )
    p = predict_proba(clf, [ids[i] for i in te])
    test = hist[te]
    name = "fine-tuned (last token)"
    result = PredictResult(
        "finetune",
        Path(out),
        found.task or str(task),
        found.counts(),
        {name: evaluate(test, p, n_boot=n_boot, seed=config.seed)},
        main=name,
    )
    predictions = {name: predictions_frame(test, p)}
    for e in log.epochs:
        result.notes.append(
            (
                f"epoch {e['epoch']}",
                f"loss {e['train_loss']:.4f}  tuning AUROC {e['tuning_auroc']:.3f}",
            )
        )
    result.notes.append(("epoch kept", str(log.best_epoch)))
    with output_folder(Path(out), overwrite=overwrite) as tmp:
        if baseline:
            result.baseline, base_pred, _ = run_baseline(
                run_dir, hist.drop("input_ids"), n_boot=n_boot, seed=config.seed
            )
            predictions.update(base_pred)
        result.seconds = time.perf_counter() - started
        write_outputs(tmp, result, predictions, found)
        write_json(
            tmp / "finetune.json",
            {"config": asdict(config), "epochs": log.epochs, "best_epoch": log.best_epoch},
        )
    return result

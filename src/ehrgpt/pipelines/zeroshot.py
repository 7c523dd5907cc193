"""``ehrgpt zeroshot``: risks from sampled futures, beside the count baseline and a probe.

Steps: the task's outcome and window (:mod:`ehrgpt.zeroshot.outcome`) -> its labels on the
evaluated split -> leakage-safe histories up to each prediction time
(:mod:`ehrgpt.tasks.history`) -> ``samples`` futures per history from one shared prefill, each
stopped as soon as it is resolved (:class:`~ehrgpt.generation.engine.Engine` with a
:class:`~ehrgpt.zeroshot.resolve.Resolver`) -> risk = hits / samples per label -> metrics with
patient-level bootstrap intervals, a calibration plot, and the count baseline (fitted on train
+ tuning, scored on the same labels). docs/method.md section 12.

Writes ``OUT/metrics.json``, ``OUT/risks.parquet`` (each label's risk, standard error and
futures by finish), ``OUT/predictions/*.parquet`` (meds-evaluation schema),
``OUT/calibration.png`` and ``OUT/labels/``.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl

from ehrgpt.errors import EhrgptError
from ehrgpt.pipelines.output import output_folder
from ehrgpt.pipelines.predict_common import TRAIN_SPLITS, PredictResult, run_baseline, write_outputs
from ehrgpt.represent.evaluate import evaluate, metric_text, predictions_frame
from ehrgpt.tasks.history import HistoryStats, build_histories, plan_chunks
from ehrgpt.tasks.labels import SPLITS, labels_for, load_task, resolve_task
from ehrgpt.util.atomic import read_json, write_parquet
from ehrgpt.util.progress import Bar
from ehrgpt.zeroshot.outcome import outcome_from_task
from ehrgpt.zeroshot.risk import Tally, plot_calibration

#: What happens to a future still unresolved at ``--max-new-tokens``.
UNRESOLVED_RULES = ("no-hit", "extend")
#: ``--extend-cap`` when none is given: this many times ``--max-new-tokens``.
EXTEND_FACTOR = 4


def zeroshot(
    model_dir: Path,
    run_dir: Path,
    out: Path,
    *,
    task: str,
    labels: Path | None = None,
    samples: int = 20,
    max_new_tokens: int | None = None,
    unresolved: str = "no-hit",
    extend_cap: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    split: str = "held_out",
    batch_size: int = 64,
    baseline: bool = True,
    probe: Path | None = None,
    n_boot: int = 1000,
    chunk_size: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
) -> PredictResult:
    """Zero-shot risks of ``task`` (its labels, or ``labels`` with its outcome) on ``split``
    (``held_out``, ``tuning``, ``train`` or ``all``)."""
    from ehrgpt.generation.engine import Engine, SamplingConfig
    from ehrgpt.pipelines.generate import load_model
    from ehrgpt.zeroshot.resolve import Resolver

    started = time.perf_counter()
    run_dir = Path(run_dir)
    if unresolved not in UNRESOLVED_RULES:
        raise EhrgptError(f"--unresolved {unresolved!r}: use one of {', '.join(UNRESOLVED_RULES)}.")
    if split not in (*SPLITS, "all"):
        raise EhrgptError(f"--split {split!r}: use one of {', '.join(SPLITS)} or all.")
    if samples < 1:
        raise EhrgptError("--samples must be at least 1.")
    model, tok = load_model(Path(model_dir))
    context = int(model.config.max_position_embeddings)
    base_budget = max_new_tokens or context
    budget = base_budget if unresolved == "no-hit" else (extend_cap or EXTEND_FACTOR * base_budget)
    if budget < base_budget:
        raise EhrgptError(f"--extend-cap {budget} is below --max-new-tokens {base_budget}.")

    name, path = resolve_task(task)
    outcome = outcome_from_task(load_task(path, run_dir), path)
    outcome_ids = outcome.token_ids(tok)
    if not outcome_ids:
        raise EhrgptError(
            f"Task {name}: none of its outcome codes ({', '.join(outcome.codes)}) is in the "
            f"vocabulary of {model_dir}, so no sampled future could hold the outcome."
        )
    found = labels_for(run_dir, task=task, labels=labels)
    frame = found.frame.with_row_index("sample_id")
    test = frame if split == "all" else frame.filter(pl.col("split") == split)
    if not test.height:
        raise EhrgptError(f"Task {found.task}: no labels in split {split}.")

    engine = Engine(model, tok, batch_size=batch_size)
    sampling = SamplingConfig(
        max_tokens_per_patient=budget, temperature=temperature, top_k=top_k, top_p=top_p
    )
    tally = Tally(test.height, samples=samples, base_budget=base_budget)
    row_of = {int(s): r for r, s in enumerate(test["sample_id"].to_list())}
    has_prompt = np.zeros(test.height, bool)
    refused: Counter[str] = Counter()
    stats = HistoryStats()
    plan = plan_chunks(run_dir, test, chunk_size)
    bar = Bar(test.height * samples, "zero-shot futures", enabled=progress)
    done = 0
    for chunk, hist in enumerate(build_histories(plan, tok, context, stats=stats)):
        rows = [row_of[int(s)] for s in hist["sample_id"].to_list()]
        pred_day = hist["prediction_time"].dt.date().cast(pl.Int64).to_numpy()
        offsets = hist["last_day"].to_numpy() - pred_day
        resolver = Resolver(engine.grammar, outcome, outcome_ids, offsets, slots=batch_size)
        before = done

        def step(finished: int, before: int = before) -> None:
            rate = engine.stats.new_tokens / max(time.perf_counter() - started, 1e-9)
            bar.update(before + finished, rate=f"{rate:,.0f} tokens/s")

        for res in engine.generate(
            hist["input_ids"].to_list(),
            sampling,
            seed=seed + chunk,
            samples=samples,
            stop=resolver,
            on_step=step,
        ):
            done += 1
            r = rows[res.index]
            if res.finish == "refused":
                refused[res.reason] += res.sample == 0
                continue
            has_prompt[r] = True
            tally.add(r, res.finish, len(res.token_ids) - res.n_prompt)
        bar.update(done)
    bar.close()

    risks = test.hstack(tally.frame())
    scored = risks.filter(pl.Series(has_prompt))
    if not scored.height:
        raise EhrgptError(f"Task {found.task}: no label of split {split} has a usable history.")
    p = scored["risk"].to_numpy()
    metrics = evaluate(scored, p, n_boot=n_boot, seed=seed)
    totals = tally.totals()
    futures = sum(totals.values())
    metrics |= {
        "unresolved_share": tally.unresolved_share(),
        "samples": samples,
        "unresolved_rule": unresolved,
        "max_new_tokens": base_budget,
        "token_budget": budget,
        "futures_by_finish": totals,
        "resolved_past_max_new_tokens": tally.late,
        "outcome": outcome.describe(),
        "split": split,
        "labels_without_history": stats.empty,
        "histories_refused": dict(refused),
        "futures_per_second": futures / max(engine.stats.seconds, 1e-9),
        "new_tokens_per_second": engine.stats.tokens_per_second,
        "prefill_forks": engine.stats.forks,
        "window_shifts": engine.stats.shifts,
    }
    key = f"zero-shot ({samples} futures)"
    result = PredictResult(
        "zeroshot", Path(out), found.task, found.counts(), {key: metrics}, main=key
    )
    predictions = {"zeroshot": predictions_frame(scored, p)}
    result.notes += [
        ("outcome", outcome.describe()),
        ("futures", ", ".join(f"{k} {v:,}" for k, v in totals.items() if v)),
        ("unresolved share", f"{metrics['unresolved_share']:.3f} (rule: {unresolved})"),
        ("futures per second", f"{metrics['futures_per_second']:,.1f}"),
    ]
    skipped = test.height - scored.height
    if skipped:
        why = [f"no history {stats.empty:,}"] + [f"{k}: {v:,}" for k, v in refused.items()]
        result.notes.append((f"labels not scored ({skipped:,})", "; ".join(why)))
    if baseline:
        _add_baseline(result, predictions, run_dir, frame, scored, n_boot=n_boot, seed=seed)
    if probe is not None:
        _add_probe(result, Path(probe))
    with output_folder(Path(out), overwrite=overwrite) as tmp:
        write_parquet(tmp / "risks.parquet", risks.with_columns(pl.Series("scored", has_prompt)))
        plot_calibration(
            scored["boolean_value"].cast(pl.Int8).to_numpy(),
            p,
            tmp / "calibration.png",
            f"{found.task}: zero-shot calibration ({split}, {samples} futures per label)",
        )
        result.notes.append(("calibration plot", str(Path(out) / "calibration.png")))
        result.seconds = time.perf_counter() - started
        write_outputs(tmp, result, predictions, found)
    return result


def _add_baseline(
    result: PredictResult,
    predictions: dict,
    run_dir: Path,
    frame: pl.DataFrame,
    scored: pl.DataFrame,
    *,
    n_boot: int,
    seed: int,
) -> None:
    """The count baseline, fitted on train + tuning and scored on the zero-shot's held_out
    labels (the same rows); skipped, with the reason, when it cannot be fitted."""
    ids = scored.filter(pl.col("split") == "held_out")["sample_id"].implode()
    rows = frame.filter(pl.col("split").is_in(TRAIN_SPLITS) | pl.col("sample_id").is_in(ids))
    rows = rows.drop("sample_id").with_row_index("sample_id")
    try:
        result.baseline, base_pred, _ = run_baseline(run_dir, rows, n_boot=n_boot, seed=seed)
    except EhrgptError as exc:
        result.notes.append(("count baseline", f"skipped: {exc}"))
        return
    predictions.update(base_pred)


def _add_probe(result: PredictResult, folder: Path) -> None:
    """A probe's (or fine-tune's) held_out results from its ``metrics.json``, for the table."""
    path = folder / "metrics.json"
    if not path.exists():
        raise EhrgptError(f"--probe {folder}: no metrics.json (an ehrgpt probe output folder).")
    found = read_json(path)
    if found.get("task") != result.task:
        raise EhrgptError(f"--probe {folder} is task {found.get('task')!r}, not {result.task!r}.")
    for name, m in found.get("results", {}).items():
        result.notes.append((f"{found.get('command', 'probe')}: {name}", metric_text(m)))

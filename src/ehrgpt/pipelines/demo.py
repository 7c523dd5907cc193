"""``ehrgpt demo``: the whole chain on the bundled Eunomia data.

RUN/prepared (MEDS, vocabulary, tokens), RUN/model (a tiny CEHR-GPT), RUN/gi_bleed (the GI-bleed
task: labels, a linear probe on embeddings, zero-shot risks from sampled futures with the count
baseline beside them), RUN/synthetic (synthetic patients as MEDS and as an OMOP CDM DuckDB
file), RUN/evaluation (report.html and metrics.json: fidelity, utility and privacy of the
synthetic patients). Each stage's summary is handed to ``show`` as it finishes; the result's
``rows()`` hold the headline figure of every stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Training steps of the demo's tiny model, and what it changes in the tiny preset: a context
#: of 1024 holds every Eunomia record (p99 652 tokens, longest 892), in rows of 1024, 2 a step
#: (as many tokens a step as tiny's 4 x 512). Chosen from the curve in benchmarks/README.md
#: ("Whole lives"): the best fidelity that trains within about 9 minutes on 2 quiet cores.
DEMO_STEPS = 1000
DEMO_TRAIN = {"max_position_embeddings": 1024, "tokens_per_row": 1024, "rows_per_batch": 2}
#: Synthetic patients the demo generates.
DEMO_PATIENTS = 200
#: The demo's prediction task and futures per label of its zero-shot stage.
DEMO_TASK = "gi_bleed"
DEMO_SAMPLES = 20
STAGES = 7


@dataclass
class DemoResult:
    """The demo's folders and the headline figure of each stage."""

    out: Path
    headlines: list[tuple[str, str]] = field(default_factory=list)

    def rows(self) -> list[tuple[str, str]]:
        """(what, value) pairs for the summary table."""
        return [*self.headlines, ("run folder", str(self.out))]


def demo(
    out: Path,
    *,
    steps: int = DEMO_STEPS,
    patients: int = DEMO_PATIENTS,
    samples: int = DEMO_SAMPLES,
    seed: int = 0,
    progress: bool = True,
    stage: Callable[[str], None] = lambda title: None,
    show: Callable[[str, Any], None] = lambda title, result: None,
) -> DemoResult:
    """Run prepare, train (tiny), the GI-bleed task (labels, probe, zero-shot, count baseline),
    generate and evaluate on Eunomia under ``out``.

    ``stage(title)`` is called before each stage and ``show(title, result)`` after it.
    """
    from ehrgpt.generation.engine import SamplingConfig
    from ehrgpt.pipelines.evaluate import evaluate
    from ehrgpt.pipelines.generate import generate
    from ehrgpt.pipelines.labels import make_labels
    from ehrgpt.pipelines.prepare import prepare
    from ehrgpt.pipelines.probe import probe
    from ehrgpt.pipelines.train import train
    from ehrgpt.pipelines.zeroshot import zeroshot
    from ehrgpt.represent.evaluate import metric_text
    from ehrgpt.tasks import shipped_tasks

    out = Path(out)
    result = DemoResult(out)
    stage(f"ehrgpt demo 1/{STAGES}: prepare Eunomia GiBleed (2,694 patients)")
    prepared = prepare("eunomia", out / "prepared", seed=seed, overwrite=True, progress=progress)
    show("prepare", prepared)
    result.headlines.append(
        ("prepare", f"{prepared.n_subjects:,} patients, {prepared.n_tokens:,} tokens")
    )

    stage(f"ehrgpt demo 2/{STAGES}: pretrain the tiny model ({steps} steps)")
    trained = train(
        out / "prepared",
        out / "model",
        preset="tiny",
        max_steps=steps,
        seed=seed,
        resume=False,
        progress=progress,
        **DEMO_TRAIN,
    )
    show("train", trained)
    result.headlines.append(
        (
            "train: validation perplexity",
            f"{trained.val_ppl:.2f} (unigram {trained.unigram_ppl:.2f})",
        )
    )

    task_dir = out / DEMO_TASK
    stage(f"ehrgpt demo 3/{STAGES}: labels of the {DEMO_TASK} task (ACES)")
    labelled = make_labels(out / "prepared", DEMO_TASK, task_dir / "labels", overwrite=True)
    show("labels", labelled)
    held = labelled.counts.get("held_out", {})
    result.headlines.append(
        (
            f"labels: {DEMO_TASK}",
            f"{sum(c['labels'] for c in labelled.counts.values()):,} labels; held_out "
            f"{held.get('labels', 0):,} ({held.get('positive', 0):,} positive)",
        )
    )

    stage(f"ehrgpt demo 4/{STAGES}: linear probe on the model's embeddings ({DEMO_TASK})")
    probed = probe(
        out / "model",
        out / "prepared",
        task_dir / "probe",
        task=DEMO_TASK,
        labels=task_dir / "labels",
        baseline=False,
        seed=seed,
        overwrite=True,
        progress=progress,
    )
    show("probe (held_out)", probed)

    stage(
        f"ehrgpt demo 5/{STAGES}: zero-shot risks from {samples} sampled futures per label, "
        "beside the count baseline"
    )
    predicted = zeroshot(
        out / "model",
        out / "prepared",
        task_dir / "zeroshot",
        task=DEMO_TASK,
        labels=task_dir / "labels",
        samples=samples,
        probe=task_dir / "probe",
        seed=seed,
        overwrite=True,
        progress=progress,
    )
    show("zero-shot (held_out)", predicted)
    result.headlines += [
        (f"zero-shot AUROC ({samples} futures)", metric_text(predicted.results[predicted.main])),
        ("probe AUROC (mean embedding, logistic)", metric_text(probed.results[probed.main])),
    ]
    result.headlines += [
        (f"count baseline AUROC ({name.split(', ')[-1]})", metric_text(m))
        for name, m in predicted.baseline.items()
    ]

    stage(f"ehrgpt demo 6/{STAGES}: generate {patients} synthetic patients (MEDS + OMOP)")
    generated = generate(
        out / "model",
        patients,
        out / "synthetic",
        fmt="omop-duckdb",
        # Default budget: the longest training record; windows carry patients past the context.
        sampling=SamplingConfig(),
        seed=seed,
        overwrite=True,
        progress=progress,
    )
    show("generate", generated)
    result.headlines.append(
        ("generate: patients written", f"{generated.written:,} of {generated.requested:,}")
    )

    stage(f"ehrgpt demo 7/{STAGES}: evaluate the synthetic patients (fidelity, utility, privacy)")
    evaluated = evaluate(
        out / "prepared",
        out / "synthetic",
        out / "evaluation",
        # Every shipped task (cheap at Eunomia's size), GI bleed (the headline) first.
        tasks=("gi_bleed", *(t for t in shipped_tasks() if t != "gi_bleed")),
        seed=seed,
        overwrite=True,
        progress=progress,
    )
    show("evaluate", evaluated)
    m = evaluated.metrics
    result.headlines += [
        ("evaluate: prevalence r", _fmt(m.get("prevalence_pearson"))),
        ("evaluate: real-vs-synthetic AUROC", _fmt(m.get("discriminator_auroc"))),
        (
            f"evaluate: TSTR / TRTR AUROC ({m.get('utility_task')})",
            f"{_fmt(m.get('tstr_auroc'))} / {_fmt(m.get('trtr_auroc'))}",
        ),
        ("evaluate: membership inference AUC", _fmt(m.get("mia_auc"))),
        ("evaluate: exact copies", _fmt(m.get("exact_copy_rate"))),
        ("report", str(out / "evaluation" / "report.html")),
    ]
    return result


def _fmt(value: float | None) -> str:
    """A metric with 3 decimals, or n/a.

    >>> _fmt(0.93041), _fmt(None)
    ('0.930', 'n/a')
    """
    return "n/a" if value is None or value != value else f"{value:.3f}"

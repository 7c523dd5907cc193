"""``ehrgpt demo``: the whole chain on the bundled Eunomia data.

RUN/prepared (MEDS, vocabulary, tokens), RUN/model (a tiny CEHR-GPT), RUN/synthetic (synthetic
patients as MEDS and as an OMOP CDM DuckDB file), RUN/evaluation (report.html and
metrics.json: fidelity, utility and privacy of the synthetic patients). Each stage's summary is
handed to ``show`` as it finishes; the result's ``rows()`` hold the headline figure of every
stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    steps: int = 300,
    patients: int = 200,
    seed: int = 0,
    progress: bool = True,
    stage: Callable[[str], None] = lambda title: None,
    show: Callable[[str, Any], None] = lambda title, result: None,
) -> DemoResult:
    """Run prepare, train (tiny) and generate on Eunomia under ``out``.

    ``stage(title)`` is called before each stage and ``show(title, result)`` after it.
    """
    from ehrgpt.generation.engine import SamplingConfig
    from ehrgpt.pipelines.evaluate import evaluate
    from ehrgpt.pipelines.generate import generate
    from ehrgpt.pipelines.prepare import prepare
    from ehrgpt.pipelines.train import train
    from ehrgpt.tasks import shipped_tasks

    out = Path(out)
    result = DemoResult(out)
    stage("ehrgpt demo 1/4: prepare Eunomia GiBleed (2,694 patients)")
    prepared = prepare("eunomia", out / "prepared", seed=seed, overwrite=True, progress=progress)
    show("prepare", prepared)
    result.headlines.append(
        ("prepare", f"{prepared.n_subjects:,} patients, {prepared.n_tokens:,} tokens")
    )

    stage(f"ehrgpt demo 2/4: pretrain the tiny model ({steps} steps)")
    trained = train(
        out / "prepared",
        out / "model",
        preset="tiny",
        max_steps=steps,
        seed=seed,
        resume=False,
        progress=progress,
    )
    show("train", trained)
    result.headlines.append(
        (
            "train: validation perplexity",
            f"{trained.val_ppl:.2f} (unigram {trained.unigram_ppl:.2f})",
        )
    )

    stage(f"ehrgpt demo 3/4: generate {patients} synthetic patients (MEDS + OMOP)")
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

    stage("ehrgpt demo 4/4: evaluate the synthetic patients (fidelity, utility, privacy)")
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

"""``ehrgpt evaluate``: fidelity, utility and privacy of synthetic patients against the real
ones, in ``OUT/report.html`` (one self-contained file) and ``OUT/metrics.json``.

Real patients come from a prepared run (``RUN/meds``: train and held_out splits); synthetic
ones from ``ehrgpt generate`` output, a MEDS folder or an OMOP CDM
(:func:`ehrgpt.evaluate.patients.synthetic_meds`). The output folder is built under a
temporary name and renamed at the end, so a failed run leaves nothing behind. The method:
docs/method.md, section 11.
"""

from __future__ import annotations

import itertools
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from ehrgpt.errors import EhrgptError, OutputExistsError
from ehrgpt.evaluate import privacy as pv
from ehrgpt.evaluate.fidelity import Fidelity, fidelity
from ehrgpt.evaluate.patients import (
    CodeIndex,
    Cohort,
    clinical_code_counts,
    code_matrix,
    real_splits,
    synthetic_meds,
)
from ehrgpt.evaluate.utility import MAIN_HEAD, TaskScore, resolve_tasks, task_utility
from ehrgpt.util import atomic
from ehrgpt.util.progress import Steps

#: Headline metrics: metrics.json key -> label of the summary table.
HEADLINES = {
    "prevalence_pearson": "code prevalence Pearson r",
    "cooccurrence_pearson": "co-occurrence Pearson r",
    "kl": "KL(real || synthetic)",
    "discriminator_auroc": "real-vs-synthetic classifier AUROC",
    "tstr_auroc": "TSTR AUROC",
    "trtr_auroc": "TRTR AUROC",
    "mia_auc": "membership inference AUC",
    "nnaa_privacy_loss": "NNAA privacy loss",
    "attribute_f1": "attribute inference F1",
    "reid_risk": "re-identification risk",
    "exact_copy_rate": "exact-copy rate",
}
#: The utility task by default (ACES costs about a minute per task at 100,000 + 100,000
#: patients on 2 cores; see benchmarks/README.md).
DEFAULT_TASKS = ("gi_bleed",)
ATTRIBUTE_SAMPLE = 5_000
KNOWN_CODES = 10


@dataclass
class Evaluation:
    """Everything the report shows (figures are drawn from it by :mod:`ehrgpt.evaluate.report`)."""

    real: str
    synthetic: str
    counts: dict[str, int]
    fidelity: Fidelity
    utility: dict[str, dict[str, TaskScore]]
    membership: pv.Membership
    privacy: dict[str, float]
    top_gaps: pl.DataFrame
    seconds: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict:
        """The content of metrics.json (nan becomes null)."""
        f = self.fidelity
        name, first = next(iter(self.utility.items()), ("", {}))
        out = {
            "prevalence_pearson": f.prevalence_pearson,
            "prevalence_r2": f.prevalence_r2,
            "cooccurrence_pearson": f.cooccurrence_pearson,
            "kl": f.kl,
            "discriminator_auroc": f.discriminator_auroc,
            "tstr_auroc": first["tstr"].auroc if first else float("nan"),
            "trtr_auroc": first["trtr"].auroc if first else float("nan"),
            "utility_task": name,
            "utility_head": MAIN_HEAD,
            **self.privacy,
            "distributions": {
                d.name: {"distance": d.distance_name, "value": d.distance, "ks": d.ks}
                for d in f.distributions
            },
            "utility": {
                task: {
                    kind: {k: v for k, v in vars(s).items() if k not in ("task", "trained_on")}
                    for kind, s in scores.items()
                }
                for task, scores in self.utility.items()
            },
            "patients": self.counts,
            "inputs": {"real": self.real, "synthetic": self.synthetic},
            "seconds": self.seconds,
        }
        return _clean(out)


def _clean(value):
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, float | np.floating):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


@dataclass
class EvaluateResult:
    """What ``ehrgpt evaluate`` wrote, and its headline figures."""

    out: Path
    metrics: dict
    seconds: float

    def rows(self) -> list[tuple[str, str]]:
        """(what, value) pairs for the summary table."""
        rows = []
        for key, label in HEADLINES.items():
            value = self.metrics.get(key)
            rows.append((f"{label} ({key})", "n/a" if value is None else f"{value:.3f}"))
        p = self.metrics["patients"]
        rows += [
            (
                "patients: train / held_out / synthetic",
                f"{p['train']:,} / {p['held_out']:,} / {p['synthetic']:,}",
            ),
            ("seconds", f"{self.seconds:.1f}"),
            ("report", str(self.out / "report.html")),
        ]
        return rows


def evaluate(
    real: Path,
    synthetic: Path,
    out: Path,
    *,
    tasks: Sequence[str | Path] = DEFAULT_TASKS,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> EvaluateResult:
    """Evaluate ``synthetic`` patients against the real run ``real``; write ``out``.

    ``tasks``: utility tasks (shipped names or ACES YAML paths); the first gives the headline
    TSTR and TRTR AUROC.
    """
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"The output folder {out} already exists; choose another --out or pass --overwrite."
        )
    resolved = resolve_tasks(tasks, Path(real))
    build = atomic.tmp_name(out)
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    try:
        evaluation = _evaluate(real, synthetic, build / ".work", resolved, seed, progress)
        shutil.rmtree(build / ".work", ignore_errors=True)
        from ehrgpt.evaluate.report import render_html

        evaluation.seconds["total"] = time.perf_counter() - started
        metrics = evaluation.metrics()
        atomic.write_json(build / "metrics.json", metrics)
        atomic.write_text(build / "report.html", render_html(evaluation))
        atomic.replace_folder(build, out)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return EvaluateResult(out, metrics, time.perf_counter() - started)


def _evaluate(real, synthetic, work: Path, tasks, seed: int, progress: bool) -> Evaluation:
    steps = Steps(7, "evaluate", enabled=progress)
    clock: dict[str, float] = {}

    def step(name: str) -> None:
        steps.advance(name)
        clock[name] = time.perf_counter()

    step("reading patients")
    meds_dir, splits = real_splits(Path(real))
    if "train" not in splits:
        raise EhrgptError(f"--real {real}: the MEDS folder {meds_dir} has no data/train shards.")
    held_split = "held_out" if "held_out" in splits else "tuning" if "tuning" in splits else None
    if held_split is None:
        raise EhrgptError(
            f"--real {real}: the MEDS folder {meds_dir} has neither data/held_out nor data/tuning "
            "shards; privacy and utility need real patients the model did not see."
        )
    syn_dir = synthetic_meds(Path(synthetic), work, progress=progress)
    train = Cohort.from_shards("train", splits["train"])
    held = Cohort.from_shards("held_out", splits[held_split])
    syn = Cohort.from_shards("synthetic", sorted((syn_dir / "data").rglob("*.parquet")))
    real_codes, syn_codes = clinical_code_counts(train.events), clinical_code_counts(syn.events)
    if syn.n == 0 or syn_codes.height == 0:
        raise EhrgptError(
            f"--synthetic {synthetic} holds no synthetic patients with clinical events "
            f"({syn.n} patients); generate some with `ehrgpt generate`."
        )
    shared = set(real_codes["code"]) & set(syn_codes["code"])
    if not shared:
        raise EhrgptError(
            f"--synthetic {synthetic} and --real {real} share no clinical code (e.g. real "
            f"{real_codes['code'][0]!r}, synthetic {syn_codes['code'][0]!r}); compare patients "
            "coded with the same vocabulary."
        )
    index = CodeIndex.of(
        [*real_codes["code"], *syn_codes["code"], *clinical_code_counts(held.events)["code"]]
    )
    counts = {c.name: code_matrix(c.events, c.subject_ids, index) for c in (train, held, syn)}

    step("fidelity")
    fid = fidelity(train, syn, counts["train"], counts["synthetic"], list(index.codes), seed=seed)
    top_gaps = _top_gaps(fid, meds_dir)

    step("utility")
    utility = {
        name: task_utility(Path(real), syn_dir, path, test_split=held_split, seed=seed)
        for name, path in tasks
    }

    step("privacy: vectors")
    binary = {k: _binary(m) for k, m in counts.items()}
    space = pv.VectorSpace.fit(train, [held, syn], len(index))
    x = {
        "train": space.vectors(train.people, binary["train"]),
        "held_out": space.vectors(held.people, binary["held_out"]),
        "synthetic": space.vectors(syn.people, binary["synthetic"]),
    }
    prev = fid.real_prevalence
    head = space.head_columns(prev)
    vec = {k: pv.Vectors.split(m, head) for k, m in x.items()}

    step("privacy: membership")
    d_train, _ = pv.nearest(vec["train"], vec["synthetic"])
    d_held, _ = pv.nearest(vec["held_out"], vec["synthetic"])
    membership = pv.membership_inference(d_train, d_held, seed=seed)

    step("privacy: adversarial accuracy")
    loss, aa_train, aa_held = pv.nnaa_privacy_loss(
        vec["train"], vec["held_out"], vec["synthetic"], seed=seed
    )

    step("privacy: attribute, re-identification, copies")
    common = np.argsort(-prev, kind="stable")[:KNOWN_CODES]
    known = np.r_[np.arange(space.n_demographic), space.n_demographic + common]
    rng = np.random.default_rng(seed)
    targets = x["train"][np.sort(rng.permutation(train.n)[:ATTRIBUTE_SAMPLE])]
    attribute_f1 = pv.attribute_inference(targets, x["synthetic"], known)
    attribute_f1_real = pv.attribute_inference(targets, x["held_out"], known)
    reid = _reid(train, held, syn, binary, _condition_columns(index, prev, meds_dir))
    copies = pv.exact_copy_rate(train.people["sequence_hash"], syn.people["sequence_hash"])
    steps.close()
    clock["end"] = time.perf_counter()

    privacy = {
        "mia_auc": membership.auc,
        "mia_threshold_accuracy": membership.threshold_accuracy,
        "mia_threshold_f1": membership.threshold_f1,
        "nnaa_privacy_loss": loss,
        "nnaa_aa_train": aa_train,
        "nnaa_aa_held_out": aa_held,
        "attribute_f1": attribute_f1,
        "attribute_f1_real": attribute_f1_real,
        "reid_risk": reid,
        "exact_copy_rate": copies,
    }
    names = list(clock)
    seconds = {name: clock[after] - clock[name] for name, after in itertools.pairwise(names)}
    return Evaluation(
        real=str(real),
        synthetic=str(synthetic),
        counts={"train": train.n, "held_out": held.n, "synthetic": syn.n, "codes": len(index)},
        fidelity=fid,
        utility=utility,
        membership=membership,
        privacy=privacy,
        top_gaps=top_gaps,
        seconds=seconds,
    )


def _binary(m: sp.csr_matrix) -> sp.csr_matrix:
    b = m.copy()
    b.data[:] = 1
    return b


def _code_metadata(meds_dir: Path) -> pl.DataFrame | None:
    path = meds_dir / "metadata" / "codes.parquet"
    return pl.read_parquet(path) if path.exists() else None


def _condition_columns(index: CodeIndex, prev: np.ndarray, meds_dir: Path, k: int = 10):
    """Columns of the ``k`` most prevalent conditions (all codes when the metadata has no
    OMOP domains): the quasi-identifying common conditions."""
    meta = _code_metadata(meds_dir)
    order = np.argsort(-prev, kind="stable")
    if meta is not None and "omop_domain" in meta.columns:
        conditions = set(meta.filter(pl.col("omop_domain") == "Condition")["code"])
        chosen = [i for i in order if index.codes[i] in conditions][:k]
        if chosen:
            return np.array(chosen)
    return order[:k]


def _reid(train: Cohort, held: Cohort, syn: Cohort, binary, common: np.ndarray) -> float:
    """Re-identification risk; see :func:`ehrgpt.evaluate.privacy.reidentification_risk`."""
    keys = {
        name: pv.quasi_identifier_keys(c.people, binary[name][:, common])
        for name, c in (("train", train), ("held_out", held), ("synthetic", syn))
    }
    first_syn = (
        pl.DataFrame({"key": keys["synthetic"], "row": np.arange(syn.n)})
        .group_by("key")
        .agg(pl.col("row").min())
    )
    matched = pl.DataFrame({"key": keys["train"], "t": np.arange(train.n)}).join(
        first_syn, on="key", how="left", maintain_order="left"
    )
    learned = np.zeros(train.n)
    hit = matched.filter(pl.col("row").is_not_null())
    if hit.height:
        mask = np.ones(binary["train"].shape[1], np.float32)
        mask[common] = 0
        other_t = binary["train"][hit["t"].to_numpy()] @ sp.diags(mask)
        other_s = binary["synthetic"][hit["row"].to_numpy()]
        overlap = np.asarray(other_t.multiply(other_s).sum(axis=1)).ravel()
        total = np.asarray(other_t.sum(axis=1)).ravel()
        learned[hit["t"].to_numpy()] = np.where(total > 0, overlap / np.maximum(total, 1), 0.0)
    population = np.r_[keys["train"], keys["held_out"]]
    return pv.reidentification_risk(keys["train"], population, keys["synthetic"], learned)


def _top_gaps(fid: Fidelity, meds_dir: Path, k: int = 10) -> pl.DataFrame:
    """The ``k`` codes whose prevalence differs most between real and synthetic patients."""
    frame = pl.DataFrame(
        {"code": fid.codes, "real": fid.real_prevalence, "synthetic": fid.syn_prevalence}
    ).with_columns((pl.col("synthetic") - pl.col("real")).alias("difference"))
    meta = _code_metadata(meds_dir)
    if meta is not None and "description" in meta.columns:
        frame = frame.join(meta.select("code", "description").unique("code"), on="code", how="left")
    else:
        frame = frame.with_columns(pl.lit(None, pl.String).alias("description"))
    return frame.sort(pl.col("difference").abs(), descending=True).head(k)

"""Benchmark: whole synthetic lives against real ones, across training steps and context.

On the Eunomia demo data (prepared once as ``ehrgpt demo`` prepares it), for each setting
``SHAPE@STEPS`` (``tiny@300``, ``ctx1024@3000``, ...) it trains a model (``ehrgpt train``,
seed 0), generates ``--n`` synthetic patients with ``ehrgpt generate``'s defaults (budget: one
more than the longest training record; window shifts past the context) and compares the real
TRAIN patients with the synthetic ones on the targets of issue 12:

- prevalence (share of patients with the code) of every code with real prevalence >= 50%
  within 10% of it (relative);
- Pearson r of prevalence over the codes with real prevalence >= 1%: 0.99 or more;
- tokens per patient (both sides encoded by the run's tokenizer) and age at the last event:
  median, p90 and max each within 10% of the real figure.

Measures come from ``ehrgpt.evaluate`` (``Cohort``, ``code_matrix``, ``prevalence``,
``pearson``, ``tokens_per_patient``, ``summary_quantiles``). Each setting prints a table of
targets with PASS/MISS and its wall time (training + generation); then the cost of window
shifts on the same model, same prompts, same process: the engine with the default budget
(patients past the context are shifted) against a budget of the context less 4 (no shift).

Models and synthetic patients are kept under ``--work`` and reused by a later run (delete a
setting's folders to redo it); results go to ``benchmarks/results/lives.json``.

    nice -n 5 .venv/bin/python benchmarks/lives.py --work /work/lives-runs \\
        --settings tiny@300,tiny@1000,tiny@2000,ctx1024@1000 [--n 1000] [--shift-n 256]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import print_table  # noqa: E402

RESULTS = HERE / "results" / "lives.json"
#: Model shapes beyond the presets: tiny with a context that holds the longest Eunomia record
#: (p99 652 tokens, max 892); rows of 1024 tokens, 2 per step, so a step sees as many tokens
#: (2,048) as tiny's 4 x 512.
SHAPES: dict[str, dict] = {
    "tiny": {},
    "ctx1024": {
        "max_position_embeddings": 1024,
        "tokens_per_row": 1024,
        "rows_per_batch": 2,
    },
}
PREVALENT = 0.5  # codes whose prevalence must match within TOLERANCE
TOLERANCE = 0.10
R_CODES = 0.01  # codes in the prevalence correlation
R_TARGET = 0.99
QUANTILES = ("median", "p90", "max")


@dataclass
class Setting:
    shape: str
    steps: int

    @property
    def name(self) -> str:
        return f"{self.shape}@{self.steps}"

    @classmethod
    def parse(cls, text: str) -> Setting:
        shape, _, steps = text.partition("@")
        if shape not in SHAPES or not steps.isdigit():
            raise SystemExit(f"setting {text!r}: want SHAPE@STEPS, SHAPE in {sorted(SHAPES)}")
        return cls(shape, int(steps))


def prepared(work: Path) -> Path:
    """The demo's prepared Eunomia run (``prepare('eunomia', seed=0)``), made once."""
    run = work / "prepared"
    if not (run / "tokenized" / "train").is_dir():
        from ehrgpt.pipelines.prepare import prepare

        prepare("eunomia", run, seed=0, overwrite=True, progress=False)
    return run


def train_model(data: Path, work: Path, s: Setting) -> dict:
    """Train (or reuse) the model of a setting; its summary with the training wall time."""
    from ehrgpt.pipelines.train import train

    out = work / "models" / s.name
    done = out / "lives_train.json"
    if done.exists():
        return json.loads(done.read_text())
    config = None
    if SHAPES[s.shape]:
        config = work / "configs" / f"{s.shape}.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text("".join(f"{k} = {v}\n" for k, v in SHAPES[s.shape].items()))
    t0 = time.perf_counter()
    r = train(
        data,
        out,
        preset="tiny",
        max_steps=s.steps,
        seed=0,
        resume=False,
        progress=False,
        config_file=config,
    )
    wall = time.perf_counter() - t0
    summary = {
        "wall_s": round(wall, 1),
        "steps": r.steps,
        "epochs": round(r.epochs, 2),
        "stop_reason": r.stop_reason,
        "best_step": r.best_step,
        "val_ppl": round(r.val_ppl, 3),
        "unigram_ppl": round(r.unigram_ppl, 3),
        "tokens_per_s": round(r.tokens_per_second),
        "config": SHAPES[s.shape],
    }
    done.write_text(json.dumps(summary, indent=1))
    return summary


def generate_patients(work: Path, s: Setting, n: int) -> dict:
    """Generate (or reuse) ``n`` patients of a setting with ``ehrgpt generate``'s defaults."""
    from ehrgpt.pipelines.generate import generate

    out = work / "synthetic" / s.name
    summary = out / "generate_summary.json"
    if summary.exists() and json.loads(summary.read_text())["requested"] == n:
        return json.loads(summary.read_text())
    r = generate(work / "models" / s.name, n, out, seed=0, overwrite=True, progress=False)
    return json.loads(summary.read_text()) | {"wall_s": round(r.seconds, 1)}


def compare(real, real_tokens: np.ndarray, syn_dir: Path, tok) -> list[dict]:
    """The targets of issue 12, real train patients against the synthetic ones."""
    from ehrgpt.evaluate.fidelity import pearson, prevalence, summary_quantiles
    from ehrgpt.evaluate.patients import CodeIndex, Cohort, code_matrix, tokens_per_patient

    shards = sorted((syn_dir / "meds" / "data").rglob("*.parquet"))
    syn = Cohort.from_shards("synthetic", shards)
    index = CodeIndex.of(real.events.filter(pl.col("code").is_not_null())["code"].unique())
    rp = prevalence(code_matrix(real.events, real.subject_ids, index, binary=True))
    sp_ = prevalence(code_matrix(syn.events, syn.subject_ids, index, binary=True))
    rows = []
    for j in np.flatnonzero(rp >= PREVALENT):
        rows.append(_row(f"prevalence {index.codes[j]}", rp[j], sp_[j], relative=True))
    common = rp >= R_CODES
    r = pearson(rp[common], sp_[common])
    rows.append(
        {
            "target": f"prevalence r ({int(common.sum())} codes >= {R_CODES:.0%})",
            "real": 1.0,
            "synthetic": round(r, 4),
            "gap": round(r - 1.0, 4),
            "result": "PASS" if r >= R_TARGET else "MISS",
        }
    )
    syn_tokens = tokens_per_patient(shards, tok)["n_tokens"].to_numpy()
    for what, real_x, syn_x in (
        ("tokens per patient", real_tokens, syn_tokens),
        (
            "age at last event",
            real.people["age_last"].drop_nulls().to_numpy(),
            syn.people["age_last"].drop_nulls().to_numpy(),
        ),
    ):
        rq, sq = summary_quantiles(real_x), summary_quantiles(syn_x)
        for q in QUANTILES:
            rows.append(_row(f"{what} {q}", rq[q], sq[q], relative=True))
    rows += _stays(real, syn)
    return rows


def _stays(real, syn) -> list[dict]:
    """Inpatient length of stay (days; not a target of the issue, shown for the record)."""
    from ehrgpt.evaluate.fidelity import summary_quantiles
    from ehrgpt.meds_format import columns as mc

    inpatient = pl.col("type").is_in([f"{mc.VISIT_PREFIX}{c}" for c in mc.INPATIENT_VISIT_CONCEPTS])
    r, s = (c.visits.filter(inpatient)["los_days"].to_numpy() for c in (real, syn))
    rows = []
    for q, rv, sv in (
        ("mean", r.mean() if len(r) else np.nan, s.mean() if len(s) else np.nan),
        ("p90", summary_quantiles(r)["p90"], summary_quantiles(s)["p90"]),
    ):
        rows.append(
            {
                "target": f"inpatient stay days {q} (info)",
                "real": round(float(rv), 3),
                "synthetic": round(float(sv), 3),
                "gap": f"{(sv - rv) / rv:+.1%}" if rv else "-",
                "result": "-",
            }
        )
    return rows


def _row(target: str, real: float, syn: float, *, relative: bool) -> dict:
    gap = (syn - real) / real if real else float("inf")
    return {
        "target": target,
        "real": round(float(real), 3),
        "synthetic": round(float(syn), 3),
        "gap": f"{gap:+.1%}",
        "result": "PASS" if abs(gap) <= TOLERANCE else "MISS",
    }


def shift_cost(work: Path, s: Setting, data: Path, n: int, batch: int) -> list[dict]:
    """Tokens per second with window shifts (the default budget) and without (the context
    less 4), same model, same prompts, same process."""
    from ehrgpt.generation.engine import Engine, SamplingConfig
    from ehrgpt.generation.prompts import load_demographics, population_prompts
    from ehrgpt.pipelines.generate import default_budget, load_model

    model_dir = work / "models" / s.name
    model, tok = load_model(model_dir)
    model.eval()
    context = model.config.max_position_embeddings
    prompts = population_prompts(load_demographics(model_dir, data, tok), n, tok, seed=0)
    rows = []
    for name, budget in (
        ("no shifts", context - 4),
        ("default budget", default_budget(data, context)),
    ):
        engine = Engine(model, tok, batch_size=batch)
        outs = list(engine.generate(prompts, SamplingConfig(max_tokens_per_patient=budget), seed=1))
        st = engine.stats
        rows.append(
            {
                "run": name,
                "budget": budget,
                "seconds": round(st.seconds, 1),
                "new_tokens": st.new_tokens,
                "tokens_per_s": round(st.tokens_per_second),
                "past_context": sum(len(g.token_ids) > context for g in outs),
                "shifts": st.shifts,
                "reprefilled": st.shift_tokens,
                "shift_time": f"{st.shift_seconds / max(st.seconds, 1e-9):.1%}",
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/lives"))
    ap.add_argument("--settings", default="tiny@300,tiny@1000,tiny@2000,ctx1024@1000")
    ap.add_argument("--n", type=int, default=1000, help="synthetic patients per setting")
    ap.add_argument("--shift-n", type=int, default=256, help="patients per side ('0' = skip)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--train-only", action="store_true", help="train the models, then stop")
    ap.add_argument("--plot", type=Path, help="only draw the curve of the saved results (PNG)")
    args = ap.parse_args()
    if args.plot:
        plot(_load_results(), args.plot)
        return
    settings = [Setting.parse(t) for t in args.settings.split(",") if t]

    from ehrgpt.evaluate.patients import Cohort, real_splits
    from ehrgpt.tokenizer.vocab import EhrTokenizer

    data = prepared(args.work)
    trained = {}
    for s in settings:
        print(f"== {s.name}: train", file=sys.stderr, flush=True)
        trained[s.name] = train_model(data, args.work, s)
    if args.train_only:
        print(json.dumps(trained, indent=1))
        return
    tok = EhrTokenizer.from_pretrained(data / "tokenizer")
    real = Cohort.from_shards("train", real_splits(data)[1]["train"])
    real_tokens = pl.read_parquet(data / "tokenized" / "train" / "*.parquet")["n_tokens"].to_numpy()
    results = _load_results()
    results["machine"] = {
        "cores": os.cpu_count(),
        "torch_threads": __import__("torch").get_num_threads(),
        "load_at_start": os.getloadavg(),
    }
    for s in settings:
        print(f"== {s.name}: generate {args.n}", file=sys.stderr, flush=True)
        gen = generate_patients(args.work, s, args.n)
        rows = compare(real, real_tokens, args.work / "synthetic" / s.name, tok)
        shifts = shift_cost(args.work, s, data, args.shift_n, args.batch) if args.shift_n else []
        tr = trained[s.name]
        passed = sum(r["result"] == "PASS" for r in rows)
        n_targets = sum(r["result"] != "-" for r in rows)
        print(
            f"\n{s.name}: {tr['steps']} steps ({tr['epochs']} epochs, stopped: "
            f"{tr['stop_reason'] or '-'}), validation perplexity {tr['val_ppl']:.2f}; "
            f"{gen['written']} of {gen['requested']} patients, ended by {gen['endings']}, "
            f"{gen['shifts']} window shifts in {gen['shifted_patients']} patients; "
            f"train {tr['wall_s']:.0f} s + generate {gen['seconds']:.0f} s = "
            f"{tr['wall_s'] + gen['seconds']:.0f} s; {passed} of {n_targets} targets met"
        )
        print_table([list(r.values()) for r in rows], list(rows[0].keys()))
        if shifts:
            print(f"{s.name}: window shifts, {args.shift_n} patients per side")
            print_table([list(r.values()) for r in shifts], list(shifts[0].keys()))
        results.setdefault("settings", {})[s.name] = {
            "train": tr,
            "generate": {
                k: gen[k]
                for k in (
                    "requested",
                    "written",
                    "rejected",
                    "endings",
                    "shifts",
                    "shifted_patients",
                    "max_tokens_per_patient",
                    "new_tokens",
                    "seconds",
                )
            },
            "targets": rows,
            "passed": passed,
            "window_shifts": shifts,
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "load": os.getloadavg(),
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1, default=_json))
    print(f"results: {RESULTS}")


def plot(results: dict, path: Path) -> None:
    """Prevalence r (dashed: the 0.99 target) and synthetic / real of the medians and p90s
    (band: the 10% target) against training steps, one line per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wanted = [
        ("prevalence r", "prevalence r"),
        ("tokens per patient median", "tokens/patient median"),
        ("tokens per patient p90", "tokens/patient p90"),
        ("age at last event median", "age at last event median"),
        ("age at last event p90", "age at last event p90"),
    ]
    fig, axes = plt.subplots(1, len(wanted), figsize=(3.2 * len(wanted), 3.2), sharey=True)
    by_shape: dict[str, list[tuple[int, dict]]] = {}
    for name, r in results.get("settings", {}).items():
        shape, steps = name.split("@")
        targets = {t["target"].split(" (")[0]: t for t in r["targets"]}
        by_shape.setdefault(shape, []).append((int(steps), targets))
    for ax, (key, title) in zip(axes, wanted, strict=True):
        if key == "prevalence r":
            ax.axhline(R_TARGET, color="0.5", lw=0.8, ls="--")
        else:
            ax.axhspan(1 - TOLERANCE, 1 + TOLERANCE, color="0.9")
            ax.axhline(1.0, color="0.5", lw=0.8)
        for shape, points in sorted(by_shape.items()):
            points.sort()
            ys = [
                t[key]["synthetic"] / t[key]["real"] if t[key]["real"] else float("nan")
                for _, t in points
            ]
            ax.plot([p[0] for p in points], ys, "o-", label=shape)
        ax.set_xscale("log")
        ticks = sorted({p[0] for points in by_shape.values() for p in points})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training steps")
    axes[0].set_ylabel("synthetic / real")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def _load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def _json(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    return asdict(obj) if hasattr(obj, "__dataclass_fields__") else str(obj)


if __name__ == "__main__":
    main()

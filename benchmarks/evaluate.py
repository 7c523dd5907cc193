"""Benchmark: ``ehrgpt evaluate`` at 10k and 100k patients, and its nearest-neighbour search
against a dense numpy search.

Data: Eunomia's prepared MEDS patients replicated (copy ``k``: subject ids offset by
``k * 10**7``, times shifted by ``(37 k + 365) mod 731 - 365`` days, like
``scale_eunomia.py``). For ``N`` patients: a real run with ``N`` train and ``N / 5`` held_out
patients, and ``N`` synthetic patients made the same way from other copies with 10% of their
clinical events dropped at random (seeded), so none is an exact copy.

Measured, each ``ehrgpt evaluate`` in its own subprocess pinned to ``--cores`` CPUs: wall
time and peak RSS of the process tree. In this process: the blockwise search
(:func:`ehrgpt.evaluate.privacy.nearest`, train -> synthetic) against the baseline, a dense
numpy search that holds the whole ``n x n`` distance matrix (only possible at 10k), and the
share of the fp32 matmul peak the blockwise search reaches.

    .venv/bin/python benchmarks/evaluate.py [--sizes 10000,100000] [--cores 2] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure_matmul_peak_gflops, print_table, run_with_peak_rss

RESULTS = Path(__file__).resolve().parent / "results" / "evaluate.json"
STRIDE = 10**7
SHARD = 20_000


def _shift_days(k: int) -> int:
    return (37 * k + 365) % 731 - 365


def _replicate(base: pl.DataFrame, copies: range, n: int, drop: float, seed: int) -> pl.DataFrame:
    """``n`` patients from copies of ``base`` (see the module docstring)."""
    frames = []
    for k in copies:
        f = base.with_columns(
            pl.col("subject_id") + k * STRIDE,
            pl.col("time") + pl.duration(days=_shift_days(k)),
            pl.col("end") + pl.duration(days=_shift_days(k)),
        )
        frames.append(f)
    out = pl.concat(frames)
    ids = out["subject_id"].unique().sort().head(n)
    out = out.filter(pl.col("subject_id").is_in(ids.implode()))
    if drop:
        rng = np.random.default_rng(seed)
        clinical = (
            out["time"].is_not_null()
            & ~out["code"].str.starts_with("VISIT/")
            & (out["code"] != "MEDS_BIRTH")
        )
        keep = ~(clinical.to_numpy() & (rng.random(out.height) < drop))
        out = out.filter(pl.Series(keep))
    return out


def _write(frame: pl.DataFrame, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ids = frame["subject_id"].unique().sort()
    for i in range(0, len(ids), SHARD):
        part = ids[i : i + SHARD]
        frame.filter(pl.col("subject_id").is_in(part.implode())).sort(
            "subject_id", "time"
        ).write_parquet(folder / f"{i // SHARD}.parquet")


def build(base: pl.DataFrame, n: int, work: Path, codes: Path) -> tuple[Path, Path]:
    """A real run folder (train, held_out; ``codes``: the prepared run's ``codes.parquet``,
    which translates the tasks' OMOP concept ids) and a synthetic MEDS folder of ``n``
    patients."""
    per = base["subject_id"].n_unique()
    c_train = -(-n // per)
    c_held = -(-(n // 5) // per)
    real, syn = work / f"real_{n}", work / f"syn_{n}"
    if not real.exists():
        _write(_replicate(base, range(c_train), n, 0.0, 0), real / "meds" / "data" / "train")
        _write(
            _replicate(base, range(c_train, c_train + c_held), n // 5, 0.0, 0),
            real / "meds" / "data" / "held_out",
        )
        (real / "meds" / "metadata").mkdir(parents=True)
        shutil.copy(codes, real / "meds" / "metadata" / "codes.parquet")
        start = c_train + c_held
        _write(
            _replicate(base, range(start, start + c_train), n, 0.1, 1),
            syn / "data" / "train",
        )
    return real, syn


def nn_baseline(real: Path, syn: Path, n: int) -> dict:
    """Blockwise search against a dense numpy search (whole distance matrix) on the same
    vectors; FLOP rate of the blockwise search's dense part."""
    from ehrgpt.evaluate import privacy as pv
    from ehrgpt.evaluate.fidelity import prevalence
    from ehrgpt.evaluate.patients import CodeIndex, Cohort, clinical_code_counts, code_matrix

    train = Cohort.from_shards("train", sorted((real / "meds/data/train").glob("*.parquet")))
    synth = Cohort.from_shards("syn", sorted((syn / "data").rglob("*.parquet")))
    index = CodeIndex.of(
        [*clinical_code_counts(train.events)["code"], *clinical_code_counts(synth.events)["code"]]
    )
    mats = {}
    for c in (train, synth):
        m = code_matrix(c.events, c.subject_ids, index)
        m.data[:] = 1
        mats[c.name] = m
    space = pv.VectorSpace.fit(train, [synth], len(index))
    head = space.head_columns(prevalence(mats["train"]))
    xt = space.vectors(train.people, mats["train"])
    xs = space.vectors(synth.people, mats["syn"])
    vt, vs = pv.Vectors.split(xt, head), pv.Vectors.split(xs, head)
    t0 = time.perf_counter()
    d_block, _ = pv.nearest(vt, vs)
    block_s = time.perf_counter() - t0
    flops = 2.0 * len(vt) * len(vs) * vt.head.shape[1]
    out = {
        "n_queries": len(vt),
        "n_refs": len(vs),
        "head_columns": int(vt.head.shape[1]),
        "tail_columns": int(vt.tail.shape[1]),
        "blockwise_s": block_s,
        "blockwise_gflops": flops / block_s / 1e9,
    }
    if n <= 20_000:
        t0 = time.perf_counter()
        a, b = xt.toarray(), xs.toarray()
        full = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
        d_dense = np.maximum(full.min(axis=1), 0)
        out["dense_s"] = time.perf_counter() - t0
        out["dense_matrix_gb"] = full.nbytes / 1e9
        out["speedup_vs_dense"] = out["dense_s"] / block_s
        out["max_abs_difference"] = float(np.max(np.abs(d_dense - d_block)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--work", default=None, help="Folder for the data (default: a temp folder).")
    ap.add_argument("--keep", action="store_true", help="Keep the data folder.")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.cores))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.cores))
    work = Path(args.work or tempfile.mkdtemp(prefix="ehrgpt_bench_eval_"))
    work.mkdir(parents=True, exist_ok=True)
    peak = measure_matmul_peak_gflops()
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s")

    from ehrgpt.pipelines.prepare import prepare

    run = work / "eunomia"
    if not run.exists():
        prepare("eunomia", run, progress=False)
    base = pl.read_parquet(sorted((run / "meds" / "data").rglob("*.parquet"))).select(
        "subject_id", "time", "code", "numeric_value", "visit_id", "end"
    )
    results = {"matmul_peak_gflops": peak, "cores": args.cores, "sizes": {}}
    rows = []
    cpus = ",".join(str(i) for i in range(args.cores))
    for n in [int(s) for s in args.sizes.split(",")]:
        real, syn = build(base, n, work, run / "meds" / "metadata" / "codes.parquet")
        out = work / f"eval_{n}"
        cmd = [
            "taskset",
            "-c",
            cpus,
            sys.executable,
            "-m",
            "ehrgpt",
            "evaluate",
            "--real",
            real,
            "--synthetic",
            syn,
            "--out",
            out,
            "--overwrite",
            "--no-progress",
        ]
        wall, rss, rc, _ = run_with_peak_rss(cmd)
        if rc != 0:
            raise SystemExit(f"ehrgpt evaluate failed at {n} patients (exit {rc})")
        metrics = json.loads((out / "metrics.json").read_text())
        nn = nn_baseline(real, syn, n)
        entry = {
            "patients": metrics["patients"],
            "wall_s": wall,
            "peak_rss_gb": rss / 1e9,
            "stage_seconds": metrics["seconds"],
            "utility": {k: metrics[k] for k in ("utility_task", "trtr_auroc", "tstr_auroc")},
            "nearest_neighbours": nn,
            "nn_share_of_matmul_peak": nn["blockwise_gflops"] / peak,
        }
        results["sizes"][str(n)] = entry
        rows.append(
            [
                f"{n:,}",
                f"{wall:.1f}",
                f"{rss / 1e9:.2f}",
                f"{nn['blockwise_s']:.2f}",
                f"{nn.get('dense_s', float('nan')):.2f}",
                f"{nn.get('speedup_vs_dense', float('nan')):.2f}x",
                f"{100 * entry['nn_share_of_matmul_peak']:.0f}%",
            ]
        )
    print_table(
        rows,
        [
            "patients",
            "evaluate s",
            "peak RSS GB",
            "NN blockwise s",
            "NN dense s",
            "blockwise vs dense",
            "NN share of matmul peak",
        ],
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {RESULTS}")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Benchmark: patient embeddings, ehrgpt against the reference's feature extraction.

ehrgpt side: ``write_embeddings`` (leakage-safe histories cut from MEDS, re-encoded, length-
batched decoder forward, parquet shards) on one prediction time per Eunomia patient (each
patient's last event), with a model of the reference run's shape (hidden 96, 2 layers, 4
heads, context 1024; speed does not depend on the weights, so it is initialised, not trained).

Reference side: the peer kit's ``features`` stage (``cehrgpt.tools.linear_prob.
compute_cehrgpt_features`` on 2,679 Eunomia patients, shared/peer/run_peer.sh), run again in
the same window when ``--peer WORK_DIR`` points at a finished peer run; otherwise the ratio
uses the figure given with ``--peer-seconds`` (say where it came from).

Printed: patients per second of each, their ratio (goal: at least 10x), and the FLOP rate
reached against the fp32 matmul peak measured in the same process.

    .venv/bin/python benchmarks/embed.py [--run RUN_DIR] [--peer /work/peer-run] [--variants]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure_matmul_peak_gflops, print_table

from ehrgpt.model import EhrGptConfig, EhrGptForCausalLM
from ehrgpt.pipelines.embed import write_embeddings
from ehrgpt.pipelines.prepare import prepare
from ehrgpt.tasks.labels import check_labels
from ehrgpt.tokenizer.vocab import EhrTokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "embed.json"
PEER = Path(__file__).resolve().parents[2] / "shared" / "peer"


def last_event_labels(run: Path) -> pl.DataFrame:
    """One label per patient at its last event (the whole history is embedded)."""
    frame = (
        pl.scan_parquet(sorted((run / "meds" / "data").rglob("*.parquet")))
        .filter(pl.col("time").is_not_null())
        .group_by("subject_id")
        .agg(pl.col("time").max().alias("prediction_time"))
        .with_columns(pl.lit(False).alias("boolean_value"))
        .collect()
    )
    return check_labels(frame, run).frame


def peer_features_seconds(work: Path) -> float:
    """Wall time of the peer kit's features stage, run again now."""
    py = work / "venv" / "bin" / "python"
    data = work / "data"
    env = {
        **os.environ,
        "USE_TF": "0",
        "USE_TORCH": "1",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    out = Path(tempfile.mkdtemp(prefix="peer-features-"))
    cmd = [
        str(py),
        "-u",
        "-m",
        "cehrgpt.tools.linear_prob.compute_cehrgpt_features",
        "--model_name_or_path",
        str(data / "model"),
        "--tokenizer_name_or_path",
        str(data / "model"),
        "--output_dir",
        str(out),
        "--data_folder",
        str(data / "cohort" / "train"),
        "--test_data_folder",
        str(data / "cohort" / "test"),
        "--cohort_folder",
        str(data / "cohort" / "train"),
        "--dataset_prepared_path",
        str(out / "dataset_prepared"),
        "--preprocessing_num_workers",
        "1",
        "--dataloader_num_workers",
        "0",
        "--per_device_eval_batch_size",
        "16",
        "--max_position_embeddings",
        "1024",
        "--report_to",
        "none",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def forward_variants(model, tok, run: Path, labels) -> list[tuple[str, str, str, str]]:
    """The decoder forward over every history as shipped (fp32 eager) and as it could be run
    instead: ``torch.compile`` and int8 dynamic quantization of the linear layers.

    Each row: variant, seconds, time against eager, largest change of a mean embedding.
    """
    import types
    import warnings

    import numpy as np

    from ehrgpt.represent.embed import embed_ids
    from ehrgpt.tasks.history import HistoryStats, build_histories, plan_chunks

    plan = plan_chunks(run, labels.frame.with_row_index("sample_id"), 1024)
    ids = [
        np.asarray(x)
        for h in build_histories(
            plan, tok, int(model.config.max_position_embeddings), stats=HistoryStats()
        )
        for x in h["input_ids"].to_list()
    ]

    def timed(m) -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        out = embed_ids(m, ids)["mean"]
        return time.perf_counter() - start, out

    def wrap(decoder):
        return types.SimpleNamespace(
            model=decoder, config=model.config, parameters=model.parameters, eval=lambda: None
        )

    base_s, base = timed(model)
    rows = [("fp32 eager (shipped)", f"{base_s:.1f}", "1.00", "0")]
    start = time.perf_counter()
    compiled = wrap(torch.compile(model.model, dynamic=True))
    timed(compiled)  # the first pass compiles
    first = time.perf_counter() - start
    s, out = timed(compiled)
    rows.append(
        (
            f"torch.compile (first pass {first:.0f} s)",
            f"{s:.1f}",
            f"{s / base_s:.2f}",
            f"{np.abs(out - base).max():.1e}",
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear}, dtype=torch.qint8
        )
    s, out = timed(quantized)
    rows.append(
        (
            "int8 dynamic (linear layers)",
            f"{s:.1f}",
            f"{s / base_s:.2f}",
            f"{np.abs(out - base).max():.2f}",
        )
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="prepared Eunomia run (else made)")
    ap.add_argument("--peer", type=Path, default=None, help="finished peer run folder")
    ap.add_argument("--peer-seconds", type=float, default=None)
    ap.add_argument("--peer-patients", type=int, default=2679)
    ap.add_argument(
        "--variants",
        action="store_true",
        help="also time the forward compiled and int8-quantized against the shipped one",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    run = args.run or prepare("eunomia", tmp / "run", progress=False).run_dir
    tok = EhrTokenizer.from_pretrained(run / "tokenizer")
    config = EhrGptConfig(
        vocab_size=len(tok),
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=1024,
    )
    model = EhrGptForCausalLM(config).eval()
    labels = last_event_labels(run)
    from ehrgpt.tasks.labels import Labels

    peak = measure_matmul_peak_gflops()
    result = write_embeddings(model, tok, run, Labels(labels), tmp / "emb", progress=False)
    ours = result.n_rows / result.seconds
    # forward FLOPs actually run: 2 per matmul weight per token, plus causal attention
    # (QK^T and AV: about 2 n^2 H per layer for a history of n tokens)
    weights = sum(p.numel() for p in model.model.layers.parameters())
    lengths = pl.read_parquet(sorted((tmp / "emb" / "embeddings").glob("*.parquet")))["n_tokens"]
    attention = 2 * config.num_hidden_layers * config.hidden_size * float((lengths**2).sum())
    flops = 2 * weights * result.n_tokens + attention
    rows = [("ehrgpt embed", result.n_rows, f"{result.seconds:.1f}", f"{ours:.1f}")]
    peer_s, source = args.peer_seconds, "given (--peer-seconds)"
    if args.peer is not None:
        peer_s, source = peer_features_seconds(args.peer), "run now, same window"
    report = {
        "patients": result.n_rows,
        "tokens": result.n_tokens,
        "seconds": result.seconds,
        "patients_per_s": ours,
        "matmul_peak_gflops": peak,
        "share_of_peak": flops / result.seconds / 1e9 / peak,
    }
    if peer_s:
        theirs = args.peer_patients / peer_s
        rows.append(("reference features", args.peer_patients, f"{peer_s:.1f}", f"{theirs:.1f}"))
        report.update(
            peer_seconds=peer_s, peer_patients_per_s=theirs, peer_source=source, ratio=ours / theirs
        )
    print_table(rows, ["what", "patients", "seconds", "patients/s"])
    if peer_s:
        print(f"ratio ehrgpt / reference: {report['ratio']:.1f}x ({source})")
    print(
        f"fp32 matmul peak {peak:.1f} GFLOP/s; embed reached {100 * report['share_of_peak']:.1f}%"
    )
    if args.variants:
        variants = forward_variants(model, tok, run, Labels(labels))
        print_table(variants, ["forward", "seconds", "vs eager", "max change (mean)"])
        report["variants"] = variants
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

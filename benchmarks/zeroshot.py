"""Benchmark: zero-shot futures, ehrgpt's engine against Hugging Face ``generate()``.

Both sides sample ``--samples`` futures of the same GI-bleed held_out histories (Eunomia) with
the same model, in the same process, one after the other:

- **baseline**: ``model.generate(history, num_return_sequences=N, max_new_tokens=B)`` per
  history (the usual way: the N copies of the history run through the model together, and the
  batch runs until its longest future ends);
- **ehrgpt**: :class:`ehrgpt.generation.engine.Engine` with ``samples=N`` (one prefill per
  history, copied to its N slots) and the zero-shot stop rule
  (:class:`ehrgpt.zeroshot.resolve.Resolver`: a future stops when the outcome appears or its
  window has passed; finished slots take the next future at once).

Printed: futures per second of each and their ratio (target: ehrgpt at least 5x), new tokens
per second, prompt tokens run through the model, the FLOP rate against the measured 2-core fp32
matmul peak. With ``--task``, also the wall time of the whole command
(``ehrgpt zeroshot --task gi_bleed --samples 20`` on held_out) and its AUROC.

    .venv/bin/python benchmarks/zeroshot.py --model MODEL_DIR --data RUN_DIR [--task]
    .venv/bin/python benchmarks/zeroshot.py --quick      # tiny random model, fresh Eunomia run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure_matmul_peak_gflops, print_table

RESULTS = Path(__file__).resolve().parent / "results" / "zeroshot.json"


def _setup(work: Path, model: str | None, data: str | None) -> tuple[Path, Path]:
    """(model folder, prepared run): the ones given, or a tiny random model on Eunomia."""
    from ehrgpt.pipelines.prepare import prepare

    run = Path(data) if data else prepare("eunomia", work / "run", progress=False).run_dir
    if model:
        return Path(model), run
    from ehrgpt.generation.prompts import DEMOGRAPHICS_FILE, demographics
    from ehrgpt.model import EhrGptForCausalLM, config_from_preset
    from ehrgpt.tokenizer.vocab import EhrTokenizer

    tok = EhrTokenizer.from_pretrained(run / "tokenizer")
    torch.manual_seed(0)
    out = work / "model"
    EhrGptForCausalLM(config_from_preset("tiny", len(tok), dropout=0.0)).save_pretrained(out)
    tok.save_pretrained(out)
    demographics(run, tok).write_parquet(out / DEMOGRAPHICS_FILE)
    (out / "codes.parquet").write_bytes((run / "meds/metadata/codes.parquet").read_bytes())
    return out, run


def _histories(run: Path, tok, context: int, n: int):
    """The first ``n`` GI-bleed held_out histories and their day offsets."""
    from ehrgpt.tasks.history import build_histories, plan_chunks
    from ehrgpt.tasks.labels import labels_for

    frame = labels_for(run, task="gi_bleed").frame.with_row_index("sample_id")
    frame = frame.filter(pl.col("split") == "held_out").head(n)
    hist = pl.concat(build_histories(plan_chunks(run, frame), tok, context))
    offsets = (hist["last_day"] - hist["prediction_time"].dt.date().cast(pl.Int64)).to_list()
    return hist["input_ids"].to_list(), offsets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: a tiny random model)")
    ap.add_argument("--data", help="prepared Eunomia run (default: prepare one)")
    ap.add_argument("--histories", type=int, default=16, help="GI-bleed held_out histories")
    ap.add_argument("--samples", type=int, default=20, help="futures per history")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="budget per future")
    ap.add_argument("--batch", type=int, default=64, help="ehrgpt engine slots")
    ap.add_argument("--task", action="store_true", help="also time the whole zeroshot command")
    ap.add_argument("--quick", action="store_true", help="8 histories, 96 new tokens")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default); 1 keeps a "
        "shared, oversubscribed machine from stalling both sides",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.histories, args.max_new_tokens = 8, 96

    from ehrgpt.generation.engine import Engine, SamplingConfig
    from ehrgpt.model.modeling import estimate_flops_per_token
    from ehrgpt.pipelines.generate import load_model
    from ehrgpt.tasks.labels import load_task, resolve_task
    from ehrgpt.zeroshot.outcome import outcome_from_task
    from ehrgpt.zeroshot.resolve import Resolver

    work = Path(tempfile.mkdtemp(prefix="ehrgpt_bench_zs_"))
    model_dir, run = _setup(work, args.model, args.data)
    model, tok = load_model(model_dir)
    model.eval()
    context = int(model.config.max_position_embeddings)
    prompts, offsets = _histories(run, tok, context, args.histories)
    _, path = resolve_task("gi_bleed")
    outcome = outcome_from_task(load_task(path, run), path)
    end, n, samples = tok.token_to_id["[END]"], len(prompts), args.samples
    peak = measure_matmul_peak_gflops()
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    flops = estimate_flops_per_token(model.config) / 3  # forward only

    budget = args.max_new_tokens  # past the context: HF runs on (rotary positions), ehrgpt shifts
    torch.manual_seed(0)
    hf_new = hf_prompt = 0
    t = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=0,
                top_p=1.0,
                num_return_sequences=samples,
                max_new_tokens=budget,
                eos_token_id=end,
                pad_token_id=0,
            )
            hf_new += out.shape[0] * (out.shape[1] - ids.shape[1])  # every row runs every step
            hf_prompt += samples * len(p)
    hf_s = time.perf_counter() - t

    engine = Engine(model, tok, batch_size=args.batch)
    resolver = Resolver(engine.grammar, outcome, outcome.token_ids(tok), offsets, slots=args.batch)
    cfg = SamplingConfig(max_tokens_per_patient=budget)
    t = time.perf_counter()
    finishes: dict[str, int] = {}
    for g in engine.generate(prompts, cfg, seed=0, samples=samples, stop=resolver):
        finishes[g.finish] = finishes.get(g.finish, 0) + 1
    our_s = time.perf_counter() - t
    st = engine.stats

    rows = []
    for side, secs, new, prompt in (
        ("HF generate(num_return_sequences)", hf_s, hf_new, hf_prompt),
        ("ehrgpt engine (shared prefill, stop)", our_s, st.new_tokens, st.prompt_tokens),
    ):
        gflops = (new + prompt) * flops / secs / 1e9
        rows.append(
            {
                "side": side,
                "seconds": round(secs, 2),
                "futures_per_s": round(n * samples / secs, 1),
                "new_tokens": new,
                "tokens_per_s": round(new / secs),
                "prompt_tokens_run": prompt,
                "gflops": round(gflops, 2),
                "share_of_peak": round(gflops / peak, 4),
            }
        )
    ratio = rows[1]["futures_per_s"] / rows[0]["futures_per_s"]
    print(
        f"hardware: {device}, fp32 matmul peak {peak:.1f} GFLOP/s; model {model_dir} "
        f"({sum(p.numel() for p in model.parameters()):,} parameters); {n} histories x "
        f"{samples} futures, up to {budget} new tokens each"
    )
    print_table([list(r.values()) for r in rows], list(rows[0].keys()))
    print(f"ehrgpt futures by finish: {finishes}")
    print(f"ratio ehrgpt / HF: {ratio:.2f}x futures per second (target 5x)")

    task = {}
    if args.task:
        from ehrgpt.pipelines.zeroshot import zeroshot

        t = time.perf_counter()
        result = zeroshot(model_dir, run, work / "zs", task="gi_bleed", samples=20, progress=False)
        m = result.results[result.main]
        task = {
            "seconds": round(time.perf_counter() - t, 1),
            "labels": m["n_rows"],
            "auroc": round(m["auroc"], 3),
            "auroc_ci": [round(x, 3) for x in m["auroc_ci"]],
            "unresolved_share": round(m["unresolved_share"], 4),
            "futures_per_s": round(m["futures_per_second"], 1),
        }
        print(
            f"whole task (ehrgpt zeroshot --task gi_bleed --samples 20, held_out): "
            f"{task['seconds']} s for {task['labels']} labels, AUROC {task['auroc']} "
            f"{task['auroc_ci']}, unresolved share {task['unresolved_share']}"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "device": device,
                "peak_gflops": peak,
                "args": vars(args),
                "model": str(model_dir),
                "runs": rows,
                "ratio_futures_per_s": round(ratio, 2),
                "finishes": finishes,
                "task": task,
                "date": time.strftime("%Y-%m-%d %H:%M"),
            },
            indent=1,
        )
    )
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()

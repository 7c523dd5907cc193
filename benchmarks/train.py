"""Benchmark: pretraining tokens/s of ehrgpt against a stock Hugging Face GPT-2, and MFU.

Per preset, in the same run, on the same Eunomia records (the same samples in every step),
fp32, the trainer's AdamW (``make_optimizer``), gradients clipped at 1:

- ehrgpt: ``EhrGptForCausalLM`` on packed rows built as the trainer builds them
  (``EpochPlan``, ``collate_batch`` with ``make_targets``), all four pretraining losses;
- BASELINE: ``transformers.GPT2LMHeadModel`` of the same width, depth, heads, vocabulary,
  context and dropout, one record per row right-padded to the longest, next-token loss only.

Timed steps alternate between the models after the warm-up; tokens/s counts real tokens only;
MFU = tokens/s x FLOPs/token (6N + 12 L H T, T = context) / numpy's fp32 matmul peak (CPU).

    python benchmarks/train.py                  # tiny (4 x 512) and small (2 x 512)
    python benchmarks/train.py --quick          # tiny, 1 warm-up + 3 timed steps
    python benchmarks/train.py --presets small --tokens-per-row 2048 --rows-per-batch 1
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _measure import measure_matmul_peak_gflops, print_table  # noqa: E402
from prepare import _git_commit, _hardware  # noqa: E402

from ehrgpt.model import EhrGptForCausalLM, config_from_preset, estimate_flops_per_token  # noqa: E402
from ehrgpt.pipelines.prepare import prepare as prepare_run  # noqa: E402
from ehrgpt.presets import PRESETS  # noqa: E402
from ehrgpt.tokenizer.vocab import EhrTokenizer  # noqa: E402
from ehrgpt.training.data import load_records  # noqa: E402
from ehrgpt.training.packing import collate_batch  # noqa: E402
from ehrgpt.training.targets import make_targets  # noqa: E402
from ehrgpt.training.trainer import EpochPlan, TrainConfig, make_optimizer  # noqa: E402

TARGET_SPEEDUP = 2.0
TARGET_MFU = 0.40  # for the small preset
#: (tokens per row, rows per step) per preset; the context is cut to the row if longer.
ROWS = {"tiny": (512, 4), "small": (512, 2), "base": (512, 1)}
RESULTS = HERE / "results" / "train.json"


def prepared_data(folder: Path) -> Path:
    """A prepared Eunomia run in ``folder`` (prepared once, then reused)."""
    if not (folder / "tokenized" / "train").is_dir() or not (folder / "tokenizer").is_dir():
        print(f"preparing Eunomia in {folder} ...", file=sys.stderr, flush=True)
        prepare_run("eunomia", folder, overwrite=True, progress=False)
    return folder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def torch_matmul_gflops(device: torch.device, seconds: float) -> float:
    """Best fp32 GFLOP/s of torch n x n matmuls on ``device`` (n = 2048 on CPU, 8192 on GPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device)
    c = a @ a
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, a, out=c)
        _sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def gpt2_flops_per_token(model: torch.nn.Module, context: int) -> float:
    """6N + 12 L H T for GPT-2, N = matmul weights (blocks + the tied output layer)."""
    c = model.config
    n = sum(p.numel() for p in model.transformer.h.parameters() if p.ndim == 2)
    return 6.0 * (n + c.vocab_size * c.n_embd) + 12.0 * c.n_layer * c.n_embd * context


def gpt2_like(config) -> transformers.GPT2LMHeadModel:
    """A stock GPT-2 of ``config``'s width, depth, heads, vocabulary, context and dropout."""
    drop = dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), config.dropout)
    shape = {
        "vocab_size": config.vocab_size,
        "n_positions": config.max_position_embeddings,
        "n_embd": config.hidden_size,
        "n_layer": config.num_hidden_layers,
        "n_head": config.num_attention_heads,
    }
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}  # [PAD] is 0
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape, **drop, **ids))


def ehrgpt_step(model, opt, rows, tok, device) -> tuple[int, int, float]:
    """One trainer step on packed rows: (real tokens, row slots, loss)."""
    arrays = collate_batch(rows, lambda ids: make_targets(ids, tok))
    batch = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
    out = model(**batch)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    real = int((batch["segment_ids"] > 0).sum())
    return real, batch["input_ids"].numel(), float(out.loss.detach())


def gpt2_step(model, opt, samples, device) -> tuple[int, int, float]:
    """One step on one record per row, right-padded to the longest: (real, slots, loss)."""
    ids = np.zeros((len(samples), max(len(s) for s in samples)), np.int64)
    mask = np.zeros_like(ids)
    for i, s in enumerate(samples):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    ids_t, mask_t = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
    out = model(input_ids=ids_t, attention_mask=mask_t, labels=ids_t.masked_fill(mask_t == 0, -100))
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return int(mask.sum()), ids.size, float(out.loss.detach())


def bench_preset(preset: str, tok, records, args, device: torch.device, peak: float) -> dict:
    row, n_rows = args.tokens_per_row or ROWS[preset][0], args.rows_per_batch or ROWS[preset][1]
    context = min(config_from_preset(preset, len(tok)).max_position_embeddings, row)
    drop = {} if args.dropout is None else {"dropout": args.dropout}
    config = config_from_preset(preset, len(tok), max_position_embeddings=context, **drop)
    cfg = TrainConfig(**{**PRESETS[preset].train, "tokens_per_row": row, "rows_per_batch": n_rows})
    plan = EpochPlan(records, tok, context, cfg, args.seed, 0)
    full = [k for k in range(len(plan)) if len(plan.batches[k]) == n_rows]
    batches = [full[i % len(full)] for i in range(args.warmup + args.steps)]
    torch.manual_seed(args.seed)
    ours = EhrGptForCausalLM(config).to(device).train()
    torch.manual_seed(args.seed)
    gpt2 = gpt2_like(config).to(device).train()
    sides = {
        "ehrgpt": (
            lambda k, o: ehrgpt_step(ours, o, plan.samples(k), tok, device),
            make_optimizer(ours, cfg, fused=device.type == "cuda"),
            ours,
            estimate_flops_per_token(config),
        ),
        "gpt2": (
            lambda k, o: gpt2_step(gpt2, o, [s for r in plan.samples(k) for s in r], device),
            make_optimizer(gpt2, cfg, fused=device.type == "cuda"),
            gpt2,
            gpt2_flops_per_token(gpt2, context),
        ),
    }
    log: dict[str, list] = {name: [] for name in sides}
    for k in batches:
        for name, (step, opt, _, _) in sides.items():
            _sync(device)
            t0 = time.perf_counter()
            real, slots, loss = step(k, opt)
            _sync(device)
            log[name].append((time.perf_counter() - t0, real, slots, loss))
    n_samples = [sum(map(len, plan.batches[k])) for k in batches[args.warmup :]]
    rec = {
        "preset": preset,
        "context": context,
        "tokens_per_row": row,
        "rows_per_step": n_rows,
        "dropout": config.dropout,
        "samples_per_step": statistics.mean(n_samples),
    }
    for name, (_, _, model, flops) in sides.items():
        timed = log[name][args.warmup :]
        secs, real = sum(t[0] for t in timed), sum(t[1] for t in timed)
        tps = real / secs
        rec[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "flops_per_token": flops,
            "tokens_per_s": tps,
            "step_s": [t[0] for t in timed],
            "real_tokens_per_step": real / len(timed),
            "padding_share": 1 - real / sum(t[2] for t in timed),
            "gflops": tps * flops / 1e9,
            "mfu": tps * flops / (peak * 1e9),
            "loss_first": log[name][0][3],
            "loss_last": log[name][-1][3],
        }
    rec["speedup"] = rec["ehrgpt"]["tokens_per_s"] / rec["gpt2"]["tokens_per_s"]
    return rec


HEADERS = ["preset", "rows", "model", "params", "tok/step", "padding", "step s", "tokens/s"]
HEADERS += ["GFLOP/s", "MFU", "loss 1st>last"]


def _row(r: dict, name: str) -> list:
    s = r[name]
    return [
        r["preset"],
        f"{r['rows_per_step']}x{r['tokens_per_row']}" if name == "ehrgpt" else "padded",
        name,
        f"{s['params'] / 1e6:.2f}M",
        f"{s['real_tokens_per_step']:,.0f}",
        f"{s['padding_share']:.0%}",
        f"{statistics.median(s['step_s']):.3f}",
        f"{s['tokens_per_s']:,.0f}",
        f"{s['gflops']:.1f}",
        f"{s['mfu']:.1%}",
        f"{s['loss_first']:.2f}>{s['loss_last']:.2f}",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=None, help="comma separated (default tiny,small)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2)")
    p.add_argument("--quick", action="store_true", help="tiny only, 1 warm-up + 3 timed steps")
    p.add_argument("--tokens-per-row", type=int, default=None, help="override ROWS for all")
    p.add_argument("--rows-per-batch", type=int, default=None, help="override ROWS for all")
    p.add_argument("--data", type=Path, default=Path("/tmp/ehrgpt_bench_train/eunomia"))
    p.add_argument("--dropout", type=float, default=None, help="both models (default: preset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    args = p.parse_args(argv)
    presets = (args.presets or ("tiny" if args.quick else "tiny,small")).split(",")
    args.steps = args.steps or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    transformers.logging.set_verbosity_error()
    data = prepared_data(args.data)
    tok = EhrTokenizer.from_pretrained(data / "tokenizer")
    records = load_records(data, "train")
    secs = 0.5 if args.quick else 2.0
    torch_peak = torch_matmul_gflops(device, secs)
    peak = torch_peak if cuda else measure_matmul_peak_gflops(secs)
    hw = _hardware()
    gpu = torch.cuda.get_device_name(device) if cuda else None
    print(
        f"hardware: {gpu or hw['cpu']}, {hw['cpu_count']} CPUs, torch {torch.get_num_threads()} "
        f"threads, {hw['ram_bytes'] / 2**30:.0f} GiB RAM; fp32 matmul peak {peak:.1f} GFLOP/s "
        f"({'torch' if cuda else 'numpy'}; torch's own matmul {torch_peak:.1f})"
    )
    print(f"data: {data}, {len(records):,} training records, {records.n_tokens:,} tokens")
    results = [bench_preset(pr, tok, records, args, device, peak) for pr in presets]
    print()
    print_table([_row(r, name) for r in results for name in ("ehrgpt", "gpt2")], HEADERS)
    print(
        "tokens/s = real (non-padding) tokens / timed seconds; MFU = tokens/s x FLOPs/token "
        f"(6N + 12LHT, T = context) / {peak:.1f} GFLOP/s; same records per step for both\n"
    )
    checks = {}
    for r in results:
        ok = checks[f"{r['preset']}_speedup_ok"] = r["speedup"] >= TARGET_SPEEDUP
        line = (
            f"{r['preset']} (context {r['context']}, dropout {r['dropout']}, "
            f"{r['samples_per_step']:.1f} records/step): ehrgpt {r['speedup']:.2f}x GPT-2 "
            f"tokens/s (target {TARGET_SPEEDUP:.0f}x): {'PASS' if ok else 'FAIL'}; "
            f"MFU {r['ehrgpt']['mfu']:.1%}"
        )
        if r["preset"] == "small":
            ok = checks["small_mfu_ok"] = r["ehrgpt"]["mfu"] >= TARGET_MFU
            line += f" (target {TARGET_MFU:.0%}): {'PASS' if ok else 'FAIL'}"
        print(line)

    doc = {
        "benchmark": "train",
        "when": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hardware": {
            **hw,
            "gpu": gpu,
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "matmul_fp32_gflops": peak,
            "torch_matmul_fp32_gflops": torch_peak,
        },
        "settings": {k: getattr(args, k) for k in ("steps", "warmup", "seed", "dropout")},
        "data": {"path": str(data), "records": len(records), "tokens": records.n_tokens},
        "targets": {"speedup": TARGET_SPEEDUP, "small_mfu": TARGET_MFU},
        "presets": results,
        "checks": checks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

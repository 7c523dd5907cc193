"""Benchmark: synthetic patient generation, ehrgpt's engine against Hugging Face ``generate()``.

Both run the same model on the same demographic prompts (drawn from Eunomia's training split)
with pure sampling (temperature 1, top-p 1, as the reference's documented run), in the same
process, one after the other:

- **baseline**: ``model.generate(...)`` of Hugging Face transformers, with its key/value
  cache, on batches of ``--batch`` prompts (the reference's way: fixed batches that run until
  their longest sequence ends);
- **ehrgpt**: :class:`ehrgpt.generation.engine.Engine` (slot cache, finished sequences'
  slots refilled at once, grammar-constrained sampling).

Printed: generated tokens per second and patients per minute of each, their ratio (target:
ehrgpt at least 3x), the share of ehrgpt's sequences that decode (target: at least 99.5%),
the hardware line (fp32 matmul peak) and the FLOP rate reached. Then the cost of window shifts
(``--shift-n`` patients, same model, same prompts, same process): the engine with a budget of
the context less the prompt (no shift possible) against a budget of 4 contexts (patients that
go on past the context are shifted: their recent visits re-prefilled behind a rebuilt prompt);
tokens per second of each, shifts, re-prefilled tokens and the share of time spent in shifts.
A random model rarely closes a visit; without ``--model`` this part gives the random model an
output bias that closes visits often and never ends a record (so every patient runs the whole
budget: the cost of shifts depends on sizes, not on what the weights learned). Then, with
``--memory``, peak RSS of ``ehrgpt generate`` runs of growing size (flat is the target: output
streams to disk).

    .venv/bin/python benchmarks/generate.py [--model MODEL_DIR] [--n 256] [--quick]
    .venv/bin/python benchmarks/generate.py --model MODEL_DIR --shifts-only [--shift-n 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure_matmul_peak_gflops, print_table, run_with_peak_rss

RESULTS = Path(__file__).resolve().parent / "results" / "generate.json"


def _model_dir(work: Path, given: str | None) -> Path:
    """A model folder: the one given, or a tiny model on a fresh Eunomia run (random init)."""
    if given:
        return Path(given)
    from ehrgpt.generation.prompts import DEMOGRAPHICS_FILE, demographics
    from ehrgpt.model import EhrGptForCausalLM, config_from_preset
    from ehrgpt.pipelines.prepare import prepare
    from ehrgpt.tokenizer.vocab import EhrTokenizer

    run = prepare("eunomia", work / "run", progress=False, overwrite=True).run_dir
    tok = EhrTokenizer.from_pretrained(run / "tokenizer")
    torch.manual_seed(0)
    model = EhrGptForCausalLM(config_from_preset("tiny", len(tok), dropout=0.0))
    out = work / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    demographics(run, tok).write_parquet(out / DEMOGRAPHICS_FILE)
    (out / "codes.parquet").write_bytes((run / "meds/metadata/codes.parquet").read_bytes())
    return out


def _hf_generate(model, prompts: list[list[int]], batch: int, max_new: int, end: int, seed: int):
    torch.manual_seed(seed)
    new_tokens, seqs = 0, []
    for k in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[k : k + batch])  # demographic prompts: all 4 tokens long
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            top_p=1.0,
            top_k=0,
            temperature=1.0,
            max_new_tokens=max_new,
            eos_token_id=end,
            pad_token_id=0,
        )
        for row in out[:, ids.shape[1] :].tolist():
            n = row.index(end) + 1 if end in row else len(row)
            new_tokens += n
            seqs.append(row[:n])
    return new_tokens, seqs


def _steered(model, tok):
    """A copy of a random model whose output bias never ends a record (no ``[END]``, no death)
    and closes visits often (``[VE]``, discharges), so its patients run past the context."""
    import copy

    model = copy.deepcopy(model)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    head.weight = model.lm_head.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[[tok.token_to_id["[END]"], tok.token_to_id["[DEATH]"]]] = -1e4
        closing = [
            i
            for i, t in enumerate(tok.tokens)
            if t == "[VE]" or (t.startswith("DISCHARGE/") and t != "DISCHARGE/4216643")  # death
        ]
        head.bias[closing] = 7.5
    model.lm_head = head
    return model


def _shift_cost(model, tok, prompts: list[list[int]], batch: int) -> list[dict]:
    """Tokens per second without window shifts (budget: the context less the prompt) and with
    them (budget: 4 contexts), same model and prompts."""
    from ehrgpt.generation.engine import Engine, SamplingConfig

    context = model.config.max_position_embeddings
    rows = []
    for name, budget in (("no shifts", context - 4), ("with shifts", 4 * context)):
        engine = Engine(model, tok, batch_size=batch)
        cfg = SamplingConfig(max_tokens_per_patient=budget)
        outs = list(engine.generate(prompts, cfg, seed=1))
        st = engine.stats
        rows.append(
            {
                "run": name,
                "budget": budget,
                "seconds": round(st.seconds, 2),
                "new_tokens": st.new_tokens,
                "tokens_per_s": round(st.tokens_per_second),
                "tokens_per_patient": round(st.new_tokens / len(prompts)),
                "past_context": sum(len(g.token_ids) > context for g in outs),
                "shifts": st.shifts,
                "reprefilled_tokens": st.shift_tokens,
                "shift_time_share": round(st.shift_seconds / max(st.seconds, 1e-9), 4),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: a tiny random model on Eunomia)")
    ap.add_argument("--n", type=int, default=256, help="patients per side")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=256, help="budget per patient")
    ap.add_argument("--shift-n", type=int, default=128, help="patients per side ('0' = skip)")
    ap.add_argument("--memory", default="200,800", help="sizes for the memory runs ('' = skip)")
    ap.add_argument("--shifts-only", action="store_true", help="only the window-shift part")
    ap.add_argument("--quick", action="store_true", help="n=64, max-new-tokens=96, no memory runs")
    args = ap.parse_args()
    if args.quick:
        args.n, args.max_new_tokens, args.memory, args.shift_n = 64, 96, "", 32

    from ehrgpt.generation.engine import Engine, SamplingConfig
    from ehrgpt.generation.prompts import load_demographics, population_prompts
    from ehrgpt.model.modeling import estimate_flops_per_token
    from ehrgpt.pipelines.generate import load_model
    from ehrgpt.tokenizer.decode import DecodeError, decode_ids

    work = Path(tempfile.mkdtemp(prefix="ehrgpt_bench_gen_"))
    model_dir = _model_dir(work, args.model)
    model, tok = load_model(model_dir)
    model.eval()
    prompts = population_prompts(load_demographics(model_dir, None, tok), args.n, tok, seed=0)
    end = tok.token_to_id["[END]"]
    peak = measure_matmul_peak_gflops()
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    if args.shifts_only:
        shift_model = model if args.model else _steered(model, tok)
        shifts = _shift_cost(shift_model, tok, prompts[: args.shift_n], args.batch)
        print(f"hardware: {device}; model {model_dir}; {len(prompts[: args.shift_n])} patients")
        print_table([list(r.values()) for r in shifts], list(shifts[0].keys()))
        out = RESULTS.with_name("generate_shifts.json")
        out.write_text(json.dumps({"device": device, "args": vars(args), "runs": shifts}, indent=1))
        print(f"results: {out}")
        return

    with torch.inference_mode():
        t = time.perf_counter()
        hf_tokens, hf_seqs = _hf_generate(model, prompts, args.batch, args.max_new_tokens, end, 0)
        hf_s = time.perf_counter() - t

    engine = Engine(model, tok, batch_size=args.batch)
    cfg = SamplingConfig(max_tokens_per_patient=args.max_new_tokens)
    t = time.perf_counter()
    ours = list(engine.generate(prompts, cfg, seed=0))
    our_s = time.perf_counter() - t
    our_tokens = engine.stats.new_tokens

    def valid(seqs: list[list[int]]) -> float:
        ok = 0
        for s in seqs:
            try:
                decode_ids(s, tok, first_day=0)
                ok += 1
            except (DecodeError, OverflowError, ValueError):
                pass
        return ok / max(len(seqs), 1)

    flops = estimate_flops_per_token(model.config) / 3  # forward only: 2N of the 6N
    rows = []
    for name, n_tok, secs, seqs in (
        ("HF generate()", hf_tokens, hf_s, [p + s for p, s in zip(prompts, hf_seqs, strict=True)]),
        ("ehrgpt engine", our_tokens, our_s, [g.token_ids for g in ours]),
    ):
        rate = n_tok / secs
        rows.append(
            {
                "side": name,
                "seconds": round(secs, 2),
                "new_tokens": n_tok,
                "tokens_per_s": round(rate),
                "patients_per_min": round(60 * args.n / secs),
                "valid_share": round(valid(seqs), 4),
                "gflops": round(rate * flops / 1e9, 2),
                "share_of_peak": round(rate * flops / 1e9 / peak, 4),
            }
        )
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    patients_speedup = rows[1]["patients_per_min"] / rows[0]["patients_per_min"]
    print(
        f"hardware: {device}, 2-core fp32 matmul peak {peak:.1f} GFLOP/s; model "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; {args.n} patients, batch "
        f"{args.batch}, up to {args.max_new_tokens} new tokens each"
    )
    print_table([list(r.values()) for r in rows], list(rows[0].keys()))
    print(
        f"ratio ehrgpt / HF: {speedup:.2f}x tokens/s, {patients_speedup:.2f}x patients/min "
        f"(target 3x); ehrgpt valid patients {rows[1]['valid_share']:.1%} (target 99.5%)"
    )

    shift_model = model if args.model else _steered(model, tok)
    shifts = (
        _shift_cost(shift_model, tok, prompts[: args.shift_n], args.batch) if args.shift_n else []
    )
    if shifts:
        print_table([list(r.values()) for r in shifts], list(shifts[0].keys()))

    memory = []
    for n in [int(x) for x in args.memory.split(",") if x]:
        out = work / f"gen_{n}"
        cmd = [
            sys.executable,
            "-m",
            "ehrgpt",
            "generate",
            "--model",
            str(model_dir),
            "--num-patients",
            str(n),
            "--out",
            str(out),
            "--max-tokens-per-patient",
            str(args.max_new_tokens),
            "--batch-size",
            str(args.batch),
            "--chunk-size",
            "100",
            "--no-progress",
        ]
        wall, rss, rc, _ = run_with_peak_rss(cmd)
        memory.append(
            {"patients": n, "seconds": round(wall, 1), "peak_rss_mib": rss >> 20, "rc": rc}
        )
    if memory:
        print_table([list(m.values()) for m in memory], list(memory[0].keys()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "device": device,
                "peak_gflops": peak,
                "args": vars(args),
                "sides": rows,
                "speedup": speedup,
                "window_shifts": shifts,
                "patients_speedup": patients_speedup,
                "memory": memory,
            },
            indent=1,
        )
    )
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()

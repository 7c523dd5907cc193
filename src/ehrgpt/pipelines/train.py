"""``ehrgpt train``: a prepared run folder -> a pretrained model folder (Hugging Face layout).

The model folder it writes::

    MODEL_DIR/config.json, model.safetensors     the best model so far (lowest validation loss)
    MODEL_DIR/vocab.json, tokenizer_config.json, value_bins.json, code_counts.json
    MODEL_DIR/README.md                          model card: data, size, training, results
    MODEL_DIR/demographics.parquet               the training split's demographic prompts with
                                                 counts (what ``ehrgpt generate`` draws from)
    MODEL_DIR/codes.parquet                      the run's code metadata (OMOP concept ids and
                                                 domains, for ``generate``'s OMOP output)
    MODEL_DIR/metrics.jsonl                      one line per step (each loss term, lr, tokens/s,
                                                 validation loss and perplexity when evaluated)
    MODEL_DIR/train_config.json                  the resolved settings
    MODEL_DIR/checkpoints/step-NNNNNN/           the last two checkpoints (resume from here)

Running the same command again resumes from the latest checkpoint (``resume=False`` /
``--overwrite`` starts over). Under ``torchrun`` it trains data-parallel (see
:mod:`ehrgpt.training.distributed`). ``init_from`` continues pretraining a model on a run
prepared with ``prepare --vocab-from``: its embedding and output layers grow to the expanded
vocabulary, new rows starting at the mean of the old ones.

Run as a module too: ``python -m ehrgpt train --data RUN --out MODEL`` (same options).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ehrgpt import __version__
from ehrgpt.errors import EhrgptError, OutputExistsError
from ehrgpt.presets import PRESETS
from ehrgpt.training import distributed as D
from ehrgpt.training.trainer import (
    CHECKPOINTS,
    DATA_KEYS,
    METRICS,
    TrainConfig,
    Trainer,
    TrainState,
    _save_pretrained,
    list_checkpoints,
    read_state,
    restore_logs,
    train_fields,
)
from ehrgpt.util import atomic
from ehrgpt.util.config import read_config
from ehrgpt.util.seeding import seed_everything

TRAIN_CONFIG = "train_config.json"
CARD = "README.md"
#: Files that mark a folder as an ehrgpt model folder (safe to replace with --overwrite).
_OURS = (
    TRAIN_CONFIG,
    METRICS,
    CHECKPOINTS,
    "model.safetensors",
    "demographics.parquet",
    "codes.parquet",
)
#: Dense bf16 peak FLOP/s of common GPUs, for the model FLOPs utilisation (MFU).
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


@dataclass
class TrainResult:
    """What ``train`` made, with the headline figures (also in the model card)."""

    model_dir: Path
    steps: int
    planned_steps: int
    epochs: float
    tokens: int
    seconds: float
    tokens_per_second: float
    best_step: int
    val_loss: float
    val_ppl: float
    unigram_ppl: float
    n_parameters: int
    stop_reason: str
    resumed_from: int | None
    device: str
    world_size: int
    preset: str
    data: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, str]]:
        """(what, value) pairs for a summary table."""
        return [
            ("model folder", str(self.model_dir)),
            ("preset / parameters", f"{self.preset} / {self.n_parameters:,}"),
            ("device", f"{self.device} x {self.world_size}"),
            ("steps (planned)", f"{self.steps:,} ({self.planned_steps:,})"),
            ("epochs", f"{self.epochs:.2f}"),
            ("tokens trained", f"{self.tokens:,}"),
            ("training seconds", f"{self.seconds:,.1f}"),
            ("tokens per second", f"{self.tokens_per_second:,.0f}"),
            ("resumed from step", "-" if self.resumed_from is None else str(self.resumed_from)),
            ("stopped because", self.stop_reason or "-"),
            ("best step", str(self.best_step)),
            ("validation loss (all terms)", f"{self.val_loss:.4f}"),
            ("validation perplexity (next token)", f"{self.val_ppl:.2f}"),
            ("unigram perplexity (same tokens)", f"{self.unigram_ppl:.2f}"),
        ]


def _split_settings(values: dict[str, Any], where: str) -> tuple[dict, dict]:
    from ehrgpt.model.configuration import EhrGptConfig

    model_keys = set(EhrGptConfig.__dataclass_fields__) - {"vocab_size"}
    model, train = {}, {}
    for key, value in values.items():
        if key in model_keys:
            model[key] = value
        elif key in train_fields():
            train[key] = value
        else:
            raise EhrgptError(
                f"Unknown setting {key!r} in {where}. Model settings: "
                f"{', '.join(sorted(model_keys))}. Training settings: "
                f"{', '.join(sorted(train_fields()))}."
            )
    return model, train


def _is_ours(folder: Path) -> bool:
    return any((folder / name).exists() for name in _OURS)


def _prepare_out(out: Path, resume: bool, dist: D.DistInfo) -> Path | None:
    """Check or clear the model folder; the latest checkpoint to resume from, if any."""
    error = None
    if dist.is_main:
        if out.exists() and not out.is_dir():
            error = f"--out {out} is a file, not a folder."
        elif out.exists() and any(out.iterdir()) and not _is_ours(out):
            error = (
                f"The folder {out} exists and is not an ehrgpt model folder; choose another --out."
            )
        elif out.exists() and not resume:
            shutil.rmtree(out)
        if error is None:
            out.mkdir(parents=True, exist_ok=True)
            for tmp in (out / CHECKPOINTS).glob(".step-*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True)
    error = D.broadcast_object(error, dist)
    if error:
        raise OutputExistsError(error)
    found = list_checkpoints(out) if resume else []
    return found[-1] if found else None


def _check_same_stream(out: Path, settings: dict[str, Any]) -> None:
    path = out / TRAIN_CONFIG
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    for key in (*DATA_KEYS, "seed", "context", "data"):
        old = saved.get("train", {}).get(key, saved.get(key))
        new = settings.get("train", {}).get(key, settings.get(key))
        if old != new:
            raise EhrgptError(
                f"{out} was trained with {key}={old!r}, this run asks for {new!r}; resuming "
                "would not continue the same data stream. Use the same settings, or pass "
                "--overwrite to start again."
            )


def grow_vocabulary(model: torch.nn.Module, new_size: int) -> int:
    """Grow the input embedding and output layer to ``new_size`` rows; returns rows added.

    New rows start at the mean of the old rows (output bias likewise), so new codes begin as
    an "average code" rather than noise.
    """
    emb = model.get_input_embeddings()
    old_size, dim = emb.weight.shape
    if new_size < old_size:
        raise EhrgptError(
            f"The data's vocabulary ({new_size} tokens) is smaller than the model's "
            f"({old_size}); prepare the data with --vocab-from the model's run."
        )
    if new_size == old_size:
        return 0
    with torch.no_grad():
        new_emb = torch.nn.Embedding(new_size, dim, padding_idx=emb.padding_idx)
        new_emb.to(emb.weight.device, emb.weight.dtype)
        new_emb.weight[:old_size] = emb.weight
        new_emb.weight[old_size:] = emb.weight.mean(0)
        model.set_input_embeddings(new_emb)
        head = model.get_output_embeddings()
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        if head is not None:
            new_head = torch.nn.Linear(dim, new_size, bias=head.bias is not None)
            new_head.to(head.weight.device, head.weight.dtype)
            if tied:
                new_head.weight = new_emb.weight
            else:
                new_head.weight[:old_size] = head.weight
                new_head.weight[old_size:] = head.weight.mean(0)
            if head.bias is not None:
                new_head.bias[:old_size] = head.bias
                new_head.bias[old_size:] = head.bias.mean()
            model.set_output_embeddings(new_head)
    model.config.vocab_size = new_size
    return new_size - old_size


def _check_vocab_extends(old_dir: Path, tok) -> None:
    from ehrgpt.tokenizer.vocab import EhrTokenizer

    old = EhrTokenizer.from_pretrained(old_dir)
    if old.att_scheme != tok.att_scheme or tok.tokens[: len(old)] != old.tokens:
        raise EhrgptError(
            f"The vocabulary of the data does not extend the one of {old_dir} (old ids must "
            f"stay the same); prepare the data with `ehrgpt prepare --vocab-from {old_dir}`."
        )


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and not f.name.startswith("."):
            atomic.copy_file(f, dst / f.name)


def _save_demographics(data: Path, out: Path, tok) -> None:
    """What ``ehrgpt generate`` needs from the data: the training split's demographic prompts
    with counts, the code metadata (OMOP concept ids and domains) and the real concept rows
    (for the OMOP output), and the data's largest subject and visit ids (synthetic ids start
    above them), so a model folder generates alone."""
    from ehrgpt.generation.prompts import DEMOGRAPHICS_FILE, demographics

    atomic.write_parquet(out / DEMOGRAPHICS_FILE, demographics(data, tok))
    from ehrgpt.meds_format.dataset import OMOP_CONCEPTS_FILE
    from ehrgpt.pipelines.generate import DATA_IDS_FILE, training_max_ids

    for name in ("codes.parquet", OMOP_CONCEPTS_FILE):
        meta = data / "meds" / "metadata" / name
        if meta.exists():
            atomic.copy_file(meta, out / name)
    ids = training_max_ids(data)
    if ids is not None:
        atomic.write_json(out / DATA_IDS_FILE, {"max_subject_id": ids[0], "max_visit_id": ids[1]})


def _save_best(model, out: Path, tokenizer_dir: Path, state: TrainState) -> None:
    tmp = out / ".best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _save_pretrained(model, tmp)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
    _copy_tokenizer(tokenizer_dir, out)
    best = {"step": state.step, "val_loss": state.best_val_loss, "val_ppl": state.best_val_ppl}
    atomic.write_json(out / "best.json", best)


def _n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


def train(
    data: Path,
    out: Path,
    *,
    preset: str | None = None,
    config_file: Path | None = None,
    max_steps: int | None = None,
    seed: int | None = None,
    init_from: Path | None = None,
    resume: bool = True,
    progress: bool = True,
    **overrides: Any,
) -> TrainResult:
    """Pretrain (or continue pretraining) a model on the prepared run ``data``.

    Settings come from the ``preset`` (model shape and training defaults), then the TOML
    ``config_file``, then ``overrides`` (model fields such as ``hidden_size`` or training
    fields such as ``lr``, ``tokens_per_row``, ``eval_every``; see :class:`TrainConfig`).
    ``preset`` (default ``tiny``), ``seed`` (default 0), ``max_steps`` and ``init_from`` may
    also be set in the file; arguments given here win.
    """
    from ehrgpt.model.configuration import EhrGptConfig, config_from_preset
    from ehrgpt.model.modeling import EhrGptForCausalLM, estimate_flops_per_token
    from ehrgpt.tokenizer.vocab import EhrTokenizer
    from ehrgpt.training.data import load_records
    from ehrgpt.training.targets import make_targets

    data, out = Path(data).resolve(), Path(out).resolve()
    settings = read_config(config_file) if config_file else {}
    preset = preset or settings.get("preset", "tiny")
    seed = int(settings.get("seed", 0) if seed is None else seed)
    max_steps = settings.get("max_steps") if max_steps is None else max_steps
    init_from = settings.get("init_from") if init_from is None else init_from
    for key in ("preset", "seed", "max_steps", "init_from"):
        settings.pop(key, None)
    if preset not in PRESETS:
        raise EhrgptError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}.")
    model_set, train_set = _split_settings(settings, str(config_file))
    model_over, train_over = _split_settings(overrides, "the overrides")
    model_set.update(model_over)
    train_set.update(train_over)
    cfg = TrainConfig(**{**PRESETS[preset].train, **train_set})
    cfg.check()
    tok_dir = data / "tokenizer"
    tok = EhrTokenizer.from_pretrained(tok_dir)

    dist = D.init(cfg.device)
    try:
        latest = _prepare_out(out, resume, dist)
        if init_from is not None:
            init_from = Path(init_from).resolve()
            if not (init_from / "config.json").exists():
                raise EhrgptError(f"--init-from {init_from} holds no model (config.json).")
            if model_set:
                raise EhrgptError(
                    "The model's shape comes from --init-from; drop the model settings "
                    f"{', '.join(sorted(model_set))}."
                )
            _check_vocab_extends(init_from, tok)
            config = EhrGptConfig.from_pretrained(init_from)
        else:
            try:
                config = config_from_preset(preset, len(tok), **model_set)
            except (ValueError, TypeError) as exc:
                raise EhrgptError(f"Model settings: {exc}") from None
        resolved = {
            "command": "train",
            "ehrgpt_version": __version__,
            "data": str(data),
            "preset": preset,
            "seed": seed,
            "max_steps": max_steps,
            "init_from": str(init_from) if init_from else None,
            "context": int(config.max_position_embeddings),
            "model": {k: v for k, v in config.to_dict().items() if not k.startswith("_")},
            "train": asdict(cfg),
        }
        state = None
        if latest is not None:
            _check_same_stream(out, resolved)
            state = read_state(latest)
            if dist.is_main:
                restore_logs(out, latest, state.step)
            config = EhrGptConfig.from_pretrained(latest)
            if config.vocab_size != len(tok):
                raise EhrgptError(
                    f"The checkpoint {latest} has a vocabulary of {config.vocab_size} tokens, "
                    f"the data {len(tok)}; use the same --data or pass --overwrite."
                )
        elif dist.is_main:
            (out / METRICS).unlink(missing_ok=True)
            (out / "data_log.jsonl").unlink(missing_ok=True)
        if dist.is_main:
            _save_demographics(data, out, tok)
            atomic.write_json(out / TRAIN_CONFIG, resolved)
        D.barrier(dist)

        seed_everything(seed)
        added = 0
        if latest is None and init_from is not None:
            model = EhrGptForCausalLM.from_pretrained(init_from)
            added = grow_vocabulary(model, len(tok))
        else:
            model = EhrGptForCausalLM(config)
        seed_everything(seed + 1_000_003 * dist.rank)

        train_records = load_records(data, "train")
        val_records = load_records(data, "tuning")
        if not len(train_records):
            raise EhrgptError(f"{data} has no training records of 20 tokens or more.")
        if not len(val_records):
            raise EhrgptError(f"{data} has no tuning records to validate on.")

        trainer = Trainer(
            model,
            tok,
            train_records,
            val_records,
            cfg,
            out,
            make_targets=make_targets,
            dist=dist,
            seed=seed,
            max_steps=max_steps,
            progress=progress,
            on_best=lambda m, st: _save_best(m, out, tok_dir, st),
            init_state=state,
            checkpoint=latest,
        )
        if added:
            trainer.state.data["vocabulary_rows_added"] = added
        st = trainer.fit()
        if dist.enabled:
            hashes = D.gather_objects(D.parameter_hash(trainer.raw), dist)
            if dist.is_main:
                (out / "distributed.json").write_text(
                    json.dumps(
                        {"world_size": dist.world_size, "backend": dist.backend, "hashes": hashes},
                        indent=1,
                    )
                )
        flops = estimate_flops_per_token(trainer.raw.config)
        result = TrainResult(
            model_dir=out,
            steps=st.step,
            planned_steps=st.planned_steps,
            epochs=st.step / max(trainer.steps_per_epoch, 1),
            tokens=st.tokens_seen,
            seconds=st.train_seconds,
            tokens_per_second=st.tokens_seen / max(st.train_seconds, 1e-9),
            best_step=st.best_step,
            val_loss=st.best_val_loss,
            val_ppl=st.best_val_ppl,
            unigram_ppl=trainer.unigram_ppl,
            n_parameters=_n_parameters(trainer.raw),
            stop_reason=st.stop_reason,
            resumed_from=None if latest is None else int(latest.name.split("-")[1]),
            device=str(dist.device),
            world_size=dist.world_size,
            preset=preset if init_from is None else f"from {init_from.name}",
            data={**st.data, "flops_per_token": flops},
        )
        if dist.is_main:
            peak = _peak_flops(dist.device)
            write_model_card(out, result, resolved, trainer.raw.config, peak)
        D.shutdown(dist)
        return result
    except BaseException:
        D.shutdown(dist, wait=False)
        raise


def _fmt(x: float, digits: int = 3) -> str:
    return (
        "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"
    )


def write_model_card(
    out: Path, result: TrainResult, settings: dict, config, peak_flops: float | None
) -> Path:
    """``MODEL_DIR/README.md``: what data, what size, how it was trained, what it reached."""
    d = result.data
    run = Path(settings["data"])
    source = "?"
    if (run / "config.json").exists():
        source = json.loads((run / "config.json").read_text()).get("source", "?")
    train = settings["train"]
    tokens_per_step = (
        train["tokens_per_row"] * train["rows_per_batch"] * train["grad_accum"]
    ) * result.world_size
    achieved = d["flops_per_token"] * result.tokens_per_second
    rate = f"{achieved / 1e12:.2f} TFLOP/s" if achieved >= 1e11 else f"{achieved / 1e9:.2f} GFLOP/s"
    mfu = f"{achieved / peak_flops:.1%}" if peak_flops else "n/a (no known peak for this device)"
    last_val = {}
    if (out / METRICS).exists():
        for r in atomic.read_jsonl(out / METRICS):
            if r.get("step") == result.best_step and "val_losses" in r:
                last_val = r["val_losses"]
    samples = d.get("samples_epoch0", {})
    ratio = result.unigram_ppl / result.val_ppl if result.val_ppl else math.nan
    lines = [
        "---",
        "library_name: transformers",
        "tags: [ehrgpt, cehr-gpt, ehr, omop, meds, synthetic-data]",
        "---",
        "",
        f"# ehrgpt model ({result.preset}) trained on `{source}`",
        "",
        "A CEHR-GPT style decoder over patient timelines (demographic prompt, visits, "
        "artificial time tokens), with next-token, time-decomposition, time-to-visit and "
        f"value heads. Trained by ehrgpt {__version__} on "
        f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        "## Data",
        "",
        f"- prepared run: `{run}` (source: `{source}`), vocabulary: {config.vocab_size:,} tokens"
        + (
            f" ({d['vocabulary_rows_added']:,} added to the model it continued from)"
            if d.get("vocabulary_rows_added")
            else ""
        ),
        f"- training split: {d.get('train_records', 0):,} records, "
        f"{d.get('train_tokens', 0):,} tokens; {d.get('train_records_dropped_short', 0):,} "
        "records under 20 tokens dropped",
        f"- samples in epoch 0: {samples.get('whole', 0):,} whole (with [END]), "
        f"{samples.get('truncated', 0):,} right-truncated at a visit end, "
        f"{samples.get('window', 0):,} random visit windows (prompt rebuilt), "
        f"{samples.get('cut', 0):,} cut inside a visit",
        f"- validation (tuning split): {d.get('val_records', 0):,} records, "
        f"{d.get('val_label_tokens', 0):,} next-token targets",
        "",
        "## Model",
        "",
        "| hidden | layers | heads | MLP | context | parameters | FLOPs / token (train) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {config.hidden_size} | {config.num_hidden_layers} | {config.num_attention_heads} "
        f"| {config.intermediate_size} | {config.max_position_embeddings} "
        f"| {result.n_parameters:,} | {d['flops_per_token'] / 1e6:,.1f} M |",
        "",
        "## Training",
        "",
        "| what | value |",
        "|---|---|",
        f"| steps (planned) | {result.steps:,} ({result.planned_steps:,}) |",
        f"| epochs | {result.epochs:.2f} |",
        f"| tokens per step | {tokens_per_step:,} ({train['tokens_per_row']:,}-token packed rows)"
        " |",
        f"| tokens trained | {result.tokens:,} |",
        f"| optimiser | AdamW, lr {train['lr']:g}, weight decay {train['weight_decay']:g}, "
        f"{train['schedule']} decay after {train['warmup_ratio']:.0%} warmup, clip "
        f"{train['grad_clip']:g} |",
        f"| device | {result.device} x {result.world_size} |",
        f"| training time | {result.seconds:,.0f} s |",
        f"| throughput | {result.tokens_per_second:,.0f} tokens/s, {rate}, MFU {mfu} |",
        f"| stopped because | {result.stop_reason} |",
        f"| seed | {settings['seed']} |",
        "",
        f"## Results on the tuning split (best step {result.best_step})",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| validation loss (sum of the heads' losses) | {_fmt(result.val_loss)} |",
        f"| validation perplexity (next token) | {_fmt(result.val_ppl, 2)} |",
        f"| unigram baseline perplexity (same tokens) | {_fmt(result.unigram_ppl, 2)} |",
        f"| unigram / model perplexity | {_fmt(ratio, 2)} x |",
        *(f"| validation {k} loss | {_fmt(v)} |" for k, v in sorted(last_val.items())),
        "",
        "## Use",
        "",
        "```python",
        "import ehrgpt  # registers the model with the Auto classes",
        "from transformers import AutoModelForCausalLM",
        "from ehrgpt.tokenizer.vocab import EhrTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{out}")',
        f'tokenizer = EhrTokenizer.from_pretrained("{out}")',
        "```",
        "",
        "Trained on de-identified or synthetic records only if its data was; a model of patient "
        "timelines can memorise rare records, so check privacy (ehrgpt evaluate) before "
        "sharing it or data generated with it.",
        "",
    ]
    path = out / CARD
    atomic.write_text(path, "\n".join(lines))
    return path

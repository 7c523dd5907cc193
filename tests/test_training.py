"""Training on Eunomia: sample rules, packing, the trainer, resume after SIGKILL, DDP under
torchrun, and continued pretraining on an expanded vocabulary.

Models here are tiny (32 hidden, 2 layers, context 128) and runs a handful of steps, so the
whole file takes well under a minute or two on 2 cores.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from ehrgpt.errors import EhrgptError, OutputExistsError
from ehrgpt.model import EhrGptConfig, EhrGptForCausalLM
from ehrgpt.pipelines.prepare import prepare
from ehrgpt.pipelines.train import grow_vocabulary, train
from ehrgpt.tokenizer.vocab import END, VE, VS, EhrTokenizer
from ehrgpt.training import distributed as D
from ehrgpt.training.data import PROMPT_LEN, age_in_years, load_records, materialize, prompt_ids
from ehrgpt.training.packing import IGNORE_INDEX, collate_batch
from ehrgpt.training.targets import make_targets
from ehrgpt.training.trainer import (
    EpochPlan,
    TrainConfig,
    Trainer,
    lr_lambda,
    make_optimizer,
)
from ehrgpt.util.atomic import read_jsonl

CONTEXT = 128
#: A tiny model and data stream for fast runs (settings of train(); also a TOML file).
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": CONTEXT,
    "tokens_per_row": 256,
    "rows_per_batch": 1,
    "eval_every": 4,
    "checkpoint_every": 4,
    "max_val_batches": 4,
    "log_data": True,
}
REPO = Path(__file__).resolve().parents[1]


def _toml(path: Path, settings: dict) -> Path:
    lines = []
    for key, value in settings.items():
        text = str(value).lower() if isinstance(value, bool) else repr(value)
        lines.append(f"{key} = {text}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def tok(eunomia_run: Path) -> EhrTokenizer:
    return EhrTokenizer.from_pretrained(eunomia_run / "tokenizer")


@pytest.fixture(scope="module")
def records(eunomia_run: Path):
    return load_records(eunomia_run, "train")


@pytest.fixture(scope="module")
def tiny_model(eunomia_run: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny model trained 8 steps on Eunomia (in process), and its result."""
    out = tmp_path_factory.mktemp("tiny_model") / "model"
    return train(eunomia_run, out, max_steps=8, progress=False, **TINY)


# -- records and samples ------------------------------------------------------------------


def test_short_records_are_dropped_and_counted(eunomia_run: Path, tmp_path: Path) -> None:
    frame = pl.read_parquet(eunomia_run / "tokenized" / "train" / "0.parquet").head(30)
    short = frame.head(7).with_columns(
        pl.col("input_ids").list.head(12), pl.col("days").list.head(12)
    )
    run = tmp_path / "run"
    (run / "tokenized" / "train").mkdir(parents=True)
    pl.concat([short, frame.tail(23)]).write_parquet(run / "tokenized" / "train" / "0.parquet")
    recs = load_records(run, "train")
    assert (len(recs), recs.dropped_short) == (23, 7)
    assert np.all(recs.lengths >= 20)
    assert list(recs.subject_ids) == sorted(frame.tail(23)["subject_id"])
    with pytest.raises(EhrgptError, match="tokenized"):
        load_records(run, "tuning")


def test_prompt_rule_matches_the_encoder(records, tok: EhrTokenizer) -> None:
    """The prompt rebuilt from a record's first [VS] day is the prompt the encoder wrote."""
    for i in range(len(records)):
        rec = records[i]
        assert rec.input_ids[PROMPT_LEN] == tok.token_to_id[VS]
        rebuilt = prompt_ids(
            tok, int(rec.days[PROMPT_LEN]), rec.birth_day, *map(int, rec.input_ids[2:4])
        )
        assert rebuilt.tolist() == rec.input_ids[:PROMPT_LEN].tolist(), rec.subject_id


def test_samples_follow_the_truncation_rules(records, tok: EhrTokenizer) -> None:
    plan = EpochPlan(records, tok, CONTEXT, TrainConfig(tokens_per_row=256), seed=3, epoch=0)
    vs, ve, end = tok.token_to_id[VS], tok.token_to_id[VE], tok.token_to_id[END]
    long = 0
    for p in plan.pieces:
        rec = records[p.record]
        ids = rec.input_ids
        sample = materialize(rec, p, tok)
        assert len(sample) == p.length <= CONTEXT
        if p.kind == "whole":
            assert sample[:-1].tolist() == ids.tolist() and sample[-1] == end
            continue
        long += 1
        assert end not in sample.tolist() and sample[-1] == ve
        if p.kind == "truncated":
            assert sample.tolist() == ids[: p.stop].tolist()
            # the last [VE] that fits: no later one within the context
            assert not np.any(ids[p.stop : CONTEXT] == ve)
        else:
            assert p.kind == "window"
            assert sample[PROMPT_LEN] == vs and p.start >= PROMPT_LEN and ids[p.start] == vs
            assert sample[PROMPT_LEN:].tolist() == ids[p.start : p.stop].tolist()
            # the prompt is the one of the window's first visit, not the record's
            day = int(rec.days[p.start])
            year = (dt.date(1970, 1, 1) + dt.timedelta(days=day)).year
            assert tok.tokens[sample[0]] == f"year:{year}"
            assert tok.tokens[sample[1]] == f"age:{age_in_years(rec.birth_day, day)}"
            assert sample[2:4].tolist() == ids[2:4].tolist()
            # windows are full: the rest of the record from the start would not fit
            assert len(ids) - p.start > CONTEXT - PROMPT_LEN
    assert plan.counts["cut"] == 0
    assert long > 300
    share = plan.counts["window"] / long
    assert 0.35 < share < 0.65, plan.counts
    # deterministic per (seed, epoch), different across epochs
    again = EpochPlan(records, tok, CONTEXT, TrainConfig(tokens_per_row=256), seed=3, epoch=0)
    other = EpochPlan(records, tok, CONTEXT, TrainConfig(tokens_per_row=256), seed=3, epoch=1)
    assert again.pieces == plan.pieces and again.batches == plan.batches
    assert other.batches != plan.batches


def test_packed_batches_keep_records_apart(records, tok: EhrTokenizer) -> None:
    cfg = TrainConfig(tokens_per_row=256, rows_per_batch=3)
    plan = EpochPlan(records, tok, CONTEXT, cfg, seed=0, epoch=0)
    used = [i for batch in plan.batches for row in batch for i in row]
    assert sorted(used) == list(range(len(records)))  # every record once per epoch
    for b in range(5):
        rows = plan.samples(b)
        batch = collate_batch(rows, lambda s: make_targets(s, tok))
        assert batch["input_ids"].shape[0] == len(rows) <= 3
        for r, samples in enumerate(rows):
            seg, pos = batch["segment_ids"][r], batch["position_ids"][r]
            labels, ids = batch["labels"][r], batch["input_ids"][r]
            at = 0
            for k, sample in enumerate(samples, start=1):
                n = len(sample)
                assert (seg[at : at + n] == k).all()
                assert pos[at : at + n].tolist() == list(range(n))
                assert ids[at : at + n].tolist() == sample.tolist()
                assert labels[at : at + n - 1].tolist() == sample[1:].tolist()
                assert labels[at + n - 1] == IGNORE_INDEX  # never the next record's token
                at += n
            assert at <= cfg.tokens_per_row
            assert (seg[at:] == 0).all() and (labels[at:] == IGNORE_INDEX).all()
            assert np.isnan(batch["time_gap"][r, at:]).all()


def test_schedule_and_weight_decay_groups() -> None:
    f = lr_lambda(200, 0.01, "cosine", 0.1)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 98 / 198)))
    assert f(200) == pytest.approx(0.1)
    assert lr_lambda(100, 0.1, "linear", 0.0)(55) == pytest.approx(0.5)
    model = EhrGptForCausalLM(
        EhrGptConfig(
            vocab_size=40,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    decay, no_decay = make_optimizer(model, TrainConfig(), fused=False).param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_grow_vocabulary_starts_new_rows_at_the_mean() -> None:
    torch.manual_seed(0)
    model = EhrGptForCausalLM(
        EhrGptConfig(
            vocab_size=40,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    old = model.get_input_embeddings().weight.detach().clone()
    assert grow_vocabulary(model, 45) == 5
    new = model.get_input_embeddings().weight
    assert new.shape == (45, 16) and model.config.vocab_size == 45
    assert torch.equal(new[:40], old)
    assert torch.allclose(new[40:], old.mean(0).expand(5, 16))
    assert model.get_output_embeddings().weight is new  # still tied
    out = model(torch.tensor([[1, 44, 42]]), labels=torch.tensor([[44, 42, -100]]))
    assert out.logits.shape == (1, 3, 45) and torch.isfinite(out.loss)
    assert grow_vocabulary(model, 45) == 0
    with pytest.raises(EhrgptError, match="smaller"):
        grow_vocabulary(model, 30)


# -- training in process ------------------------------------------------------------------


def test_train_writes_a_loadable_model_folder(
    tiny_model, eunomia_run: Path, tok: EhrTokenizer
) -> None:
    out = tiny_model.model_dir
    for name in (
        "config.json",
        "model.safetensors",
        "vocab.json",
        "tokenizer_config.json",
        "README.md",
        "metrics.jsonl",
        "train_config.json",
        "demographics.parquet",
    ):
        assert (out / name).exists(), name
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [
        "step-000004",
        "step-000008",
    ]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        terms = {"next_token", "time_year", "time_month", "time_day", "time_to_visit"}
        assert terms <= set(r["losses"])
        assert r["losses"]["time_decomposition"] == pytest.approx(
            sum(r["losses"][k] for k in ("time_year", "time_month", "time_day"))
        )
        # a term without targets (no numeric values, so no value bins) is left out, not 0
        assert ("value" in r["losses"]) == bool(tok.value_bins)
        assert r["lr"] > 0 and r["tokens_per_s"] > 0 and r["tokens"] > 0
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(r["val_ppl"] == pytest.approx(np.exp(r["val_losses"]["next_token"])) for r in evals)
    res = tiny_model
    assert res.steps == 8 and res.stop_reason == "planned steps reached"
    assert res.unigram_ppl > 1 and np.isfinite(res.val_ppl)
    assert res.data["train_records_dropped_short"] == 0 and res.data["train_records"] > 2000
    card = (out / "README.md").read_text()
    for needle in ("unigram baseline perplexity", "parameters", "tokens/s", "eunomia"):
        assert needle in card, needle
    # the folder loads with from_pretrained and reproduces the logged validation perplexity
    model = EhrGptForCausalLM.from_pretrained(out).eval()
    saved = EhrTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(saved) and saved.tokens == tok.tokens
    val = load_records(eunomia_run, "tuning")
    cfg = TrainConfig(tokens_per_row=256, rows_per_batch=1)
    plan = EpochPlan(val, tok, CONTEXT, cfg, seed=0, epoch=10**6, shuffle=False)
    total, n = 0.0, 0
    for b in range(TINY["max_val_batches"]):
        batch = collate_batch(plan.samples(b), lambda s: make_targets(s, tok))
        with torch.no_grad():
            got = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
        total += float(got.losses["next_token"] * got.n_targets["next_token"])
        n += int(got.n_targets["next_token"])
    assert np.exp(total / n) == pytest.approx(res.val_ppl, rel=1e-4)
    assert json.loads((out / "best.json").read_text())["step"] == res.best_step


def test_rerun_resumes_and_extends(tiny_model, eunomia_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    shutil.copytree(tiny_model.model_dir, out)
    again = train(eunomia_run, out, max_steps=8, progress=False, **TINY)
    assert (again.steps, again.resumed_from) == (8, 8)  # already done: nothing trained
    more = train(eunomia_run, out, max_steps=10, progress=False, **TINY)
    assert (more.steps, more.resumed_from) == (10, 8)
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert steps == list(range(1, 11))
    with pytest.raises(EhrgptError, match="tokens_per_row"):
        train(eunomia_run, out, max_steps=12, progress=False, **{**TINY, "tokens_per_row": 512})
    fresh = train(eunomia_run, out, max_steps=2, resume=False, progress=False, **TINY)
    assert fresh.resumed_from is None
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]


def test_bad_settings_and_foreign_folders(eunomia_run: Path, tmp_path: Path) -> None:
    with pytest.raises(EhrgptError, match="Unknown setting 'hiden_size'"):
        train(eunomia_run, tmp_path / "m", hiden_size=3)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_text("meow")
    with pytest.raises(OutputExistsError, match="not an ehrgpt model folder"):
        train(eunomia_run, other, max_steps=1, resume=False, progress=False, **TINY)
    assert (other / "cat.jpg").exists()


# -- the step's loss: micro-batches and ranks ---------------------------------------------


def _first_step(
    run: Path, out: Path, rows_per_batch: int, grad_accum: int, dist: D.DistInfo | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Gradients and logged record of a first trainer step on Eunomia (no dropout, fp32).

    The epoch's packed rows do not depend on how they are cut into batches, so the step holds
    the rows 0 .. rows_per_batch x grad_accum x ranks - 1 of epoch 0 however it is split.
    """
    dist = dist or D.DistInfo()
    out.mkdir(parents=True, exist_ok=True)
    tok = EhrTokenizer.from_pretrained(run / "tokenizer")
    torch.manual_seed(0)
    config = EhrGptConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=CONTEXT,
        dropout=0.0,
    )
    cfg = TrainConfig(
        tokens_per_row=256,
        rows_per_batch=rows_per_batch,
        grad_accum=grad_accum,
        max_val_batches=1,
        device="cpu",
        precision="fp32",
    )
    trainer = Trainer(
        EhrGptForCausalLM(config),
        tok,
        load_records(run, "train"),
        load_records(run, "tuning"),
        cfg,
        out,
        make_targets=make_targets,
        dist=dist,
        seed=0,
        max_steps=1,
        progress=False,
    )
    grads: dict[str, torch.Tensor] = {}

    def keep(*_) -> None:  # the gradients the optimizer is about to use
        for name, p in trainer.raw.named_parameters():
            grads[name] = p.grad.detach().clone()

    trainer.optimizer.register_step_pre_hook(keep)
    trainer.fit()
    record = read_jsonl(out / "metrics.jsonl")[0] if dist.is_main else {}
    return grads, record


def _assert_same_step(got: tuple[dict, dict], want: tuple[dict, dict]) -> None:
    (grads, record), (want_grads, want_record) = got, want
    assert grads.keys() == want_grads.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7, msg=name)
    assert record["loss"] == pytest.approx(want_record["loss"], rel=1e-5)
    for term, value in want_record["losses"].items():
        assert record["losses"][term] == pytest.approx(value, rel=1e-5), term
    assert record["tokens"] == want_record["tokens"]


def test_accumulated_micro_batches_give_the_gradient_of_one_batch(
    eunomia_run: Path, records, tok: EhrTokenizer, tmp_path: Path
) -> None:
    """4 accumulated batches of 2 rows = 1 batch of 8 rows: each loss term is a sum over the
    step's targets divided by their count, not a mean of the micro-batches' means."""
    plan = EpochPlan(records, tok, CONTEXT, TrainConfig(tokens_per_row=256, rows_per_batch=2), 0, 0)
    shares = []
    for b in range(4):
        batch = collate_batch(plan.samples(b), lambda s: make_targets(s, tok))
        shares.append(np.isfinite(batch["time_gap"]).sum() / (batch["labels"] >= 0).sum())
    assert max(shares) > 1.05 * min(shares)  # the micro-batches hold time targets unevenly
    one = _first_step(eunomia_run, tmp_path / "one", rows_per_batch=8, grad_accum=1)
    four = _first_step(eunomia_run, tmp_path / "four", rows_per_batch=2, grad_accum=4)
    assert one[1]["batches"] == [0] and four[1]["batches"] == [0, 1, 2, 3]
    _assert_same_step(four, one)


def test_two_ranks_give_the_gradient_of_one_process(eunomia_run: Path, tmp_path: Path) -> None:
    """2 gloo ranks x 2 accumulated batches of 2 rows = 1 process with a batch of 8 rows."""
    if not torch.distributed.is_gloo_available():
        pytest.skip("gloo is not available in this torch build")
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "tests.test_training",  # the __main__ block below
        str(eunomia_run),
        str(out),
    ]
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env["PYTHONPATH"]])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ddp = torch.load(out / "first_step.pt", weights_only=False)
    assert ddp["record"]["batches"] == [0, 1, 2, 3]
    one = _first_step(eunomia_run, tmp_path / "one", rows_per_batch=8, grad_accum=1)
    _assert_same_step((ddp["grads"], ddp["record"]), one)


# -- subprocesses: SIGKILL and resume, torchrun ---------------------------------------------


def _run_module(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ehrgpt", "train", *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def test_sigkill_then_resume_continues_the_same_run(
    eunomia_run: Path, records, tok: EhrTokenizer, tmp_path: Path
) -> None:
    steps = 16
    config = _toml(tmp_path / "train.toml", {**TINY, "debug_step_sleep": 0.25})
    out = tmp_path / "model"
    args = [
        "--data",
        str(eunomia_run),
        "--out",
        str(out),
        "--config",
        str(config),
        "--max-steps",
        str(steps),
        "--no-progress",
    ]
    proc = _run_module(args)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    # wait for the checkpoint of step 8 and two steps past it, then kill -9
    while time.monotonic() < deadline and proc.poll() is None:
        ready = (out / "checkpoints" / "step-000008").is_dir() and metrics.exists()
        if ready and len(read_jsonl(metrics)) >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    killed = read_jsonl(metrics)
    assert proc.returncode == -signal.SIGKILL and 10 <= len(killed) < steps

    resumed = _run_module(args)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from step" in output and "train: summary" in output
    rows = read_jsonl(metrics)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # no gap, no repeat
    # the steps redone after the checkpoint give the losses the killed run had logged
    for before, after in zip(killed, rows, strict=False):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-4), after["step"]
        assert after["batches"] == before["batches"]
    assert all(r["batches"] == [r["step"] - 1] for r in rows)
    # the data: one pass over the epoch's first batches, each record once
    log = read_jsonl(out / "data_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    seen = [s for r in log for rank in r["ranks"] for s in rank["subjects"]]
    assert len(seen) == len(set(seen))
    plan = EpochPlan(
        records,
        tok,
        CONTEXT,
        TrainConfig(**{k: v for k, v in TINY.items() if k in TrainConfig.__dataclass_fields__}),
        seed=0,
        epoch=0,
    )
    assert seen == [s for b in range(steps) for s in plan.subjects(b)]
    state = json.loads(
        (out / "checkpoints" / f"step-{steps:06d}" / "trainer_state.json").read_text()
    )
    assert (state["step"], state["epoch"], state["next_batch"], state["done"]) == (
        steps,
        0,
        steps,
        True,
    )


def test_torchrun_two_ranks_share_the_epoch(eunomia_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed")
    if not torch.distributed.is_gloo_available():
        pytest.skip("gloo is not available in this torch build")
    out = tmp_path / "model"
    config = _toml(tmp_path / "train.toml", TINY)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "ehrgpt",
        "train",
        "--data",
        str(eunomia_run),
        "--out",
        str(out),
        "--config",
        str(config),
        "--max-steps",
        "4",
        "--no-progress",
    ]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("train: summary") == 1  # only rank 0 reports
    info = json.loads((out / "distributed.json").read_text())
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    assert len(set(info["hashes"])) == 1  # identical weights on both ranks
    log = read_jsonl(out / "data_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    batches, subjects = [], []
    for r in log:
        r0, r1 = r["ranks"]
        assert (r0["rank"], r1["rank"]) == (0, 1)
        assert not set(r0["subjects"]) & set(r1["subjects"])
        batches += r0["batches"] + r1["batches"]
        subjects += r0["subjects"] + r1["subjects"]
    assert sorted(batches) == list(range(8)) and len(subjects) == len(set(subjects))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["batches"] == [0, 1]


# -- continued pretraining ----------------------------------------------------------------


def _renamed_meds(run: Path, folder: Path, n_codes: int = 15) -> tuple[Path, set[str]]:
    """A MEDS copy of ``run/meds`` whose most frequent SNOMED codes get new names."""
    shutil.copytree(run / "meds", folder)
    shards = sorted((folder / "data").rglob("*.parquet"))
    codes = pl.read_parquet(shards)["code"]
    top = (
        codes.filter(codes.str.starts_with("SNOMED/")).value_counts(sort=True)["code"].head(n_codes)
    )
    renamed = {c: c.replace("SNOMED/", "LOCAL/") for c in top}
    for shard in shards:
        frame = pl.read_parquet(shard)
        frame.with_columns(pl.col("code").replace(renamed)).write_parquet(shard)
    return folder, set(renamed.values())


def test_init_from_grows_the_vocabulary_and_continues(
    tiny_model, eunomia_run: Path, tmp_path: Path
) -> None:
    meds, new_codes = _renamed_meds(eunomia_run, tmp_path / "meds")
    run = prepare(str(meds), tmp_path / "run2", vocab_from=eunomia_run, progress=False).run_dir
    old_tok = EhrTokenizer.from_pretrained(tiny_model.model_dir)
    new_tok = EhrTokenizer.from_pretrained(run / "tokenizer")
    assert new_tok.tokens[: len(old_tok)] == old_tok.tokens and new_codes <= set(new_tok.tokens)
    base = EhrGptForCausalLM.from_pretrained(tiny_model.model_dir)

    out = tmp_path / "continued"
    model_keys = set(EhrGptConfig.__dataclass_fields__)
    settings = {k: v for k, v in TINY.items() if k not in model_keys}
    res = train(run, out, init_from=tiny_model.model_dir, max_steps=3, progress=False, **settings)
    assert res.steps == 3 and res.data["vocabulary_rows_added"] == len(new_tok) - len(old_tok) > 0
    model = EhrGptForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(new_tok)
    assert model.config.hidden_size == base.config.hidden_size
    # it continued from the base model (3 small steps away), it did not start afresh
    a = base.get_input_embeddings().weight
    b = model.get_input_embeddings().weight[: len(old_tok)]
    assert (b - a).abs().max() < 0.05 < a.abs().max()
    assert EhrTokenizer.from_pretrained(out).tokens == new_tok.tokens
    assert "added to the model it continued from" in (out / "README.md").read_text()
    with pytest.raises(EhrgptError, match="shape comes from --init-from"):
        train(
            run,
            tmp_path / "x",
            init_from=tiny_model.model_dir,
            max_steps=1,
            progress=False,
            hidden_size=64,
        )
    # a model whose vocabulary the data does not extend is refused
    with pytest.raises(EhrgptError, match="does not extend"):
        train(eunomia_run, tmp_path / "y", init_from=out, max_steps=1, progress=False, **settings)


def test_cli_command_help_and_errors(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ehrgpt.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["train", "--help"])
    assert result.exit_code == 0
    for option in (
        "--data",
        "--out",
        "--preset",
        "--config",
        "--max-steps",
        "--seed",
        "--init-from",
        "--no-progress",
        "--overwrite",
    ):
        assert option in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(main, ["train", "--data", str(empty), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "tokenizer" in result.output and "Traceback" not in result.output


if __name__ == "__main__":  # one rank of test_two_ranks_give_the_gradient_of_one_process
    info = D.init("cpu")
    grads, record = _first_step(Path(sys.argv[1]), Path(sys.argv[2]), 2, 2, info)
    if info.is_main:
        torch.save({"grads": grads, "record": record}, Path(sys.argv[2]) / "first_step.pt")
    D.shutdown(info)

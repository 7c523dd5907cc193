"""The generation engine and ``ehrgpt generate`` on a small real model and the Eunomia vocabulary.

The model is small and freshly initialised (training is tested elsewhere): what is tested here
is the machinery (cache, refilling slots, grammar, decoding, sinks, resume, processes), which
must hold for any weights.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import meds
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from ehrgpt.generation.engine import Engine, SamplingConfig
from ehrgpt.generation.prompts import history_prompt
from ehrgpt.model import EhrGptForCausalLM
from ehrgpt.pipelines.generate import generate, load_model
from ehrgpt.tokenizer.decode import MAX_VISIT_DAYS, DecodeError, decode_ids
from ehrgpt.tokenizer.vocab import VE, VS, EhrTokenizer
from tests.helpers.runs import small_model_dir


@pytest.fixture(scope="module")
def model_dir(eunomia_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model folder laid out like ``ehrgpt train`` output (weights, tokenizer, ...)."""
    return small_model_dir(eunomia_run, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def records(eunomia_run: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted((eunomia_run / "tokenized" / "train").glob("*.parquet")))


def test_engine_matches_full_recomputation(model_dir: Path, records: pl.DataFrame) -> None:
    # Greedy decoding with the slot cache, 3 slots for 7 prompts of different lengths (slots
    # are refilled mid-run), equals recomputing the whole sequence at every step.
    model, tok = load_model(model_dir)
    prompts = [ids[: 4 + 3 * k] for k, ids in enumerate(records["input_ids"].to_list()[:7])]
    cfg = SamplingConfig(max_tokens_per_patient=12, temperature=0.0, grammar=False)
    got = {g.index: g.token_ids for g in Engine(model, tok, batch_size=3).generate(prompts, cfg)}
    end = tok.token_to_id["[END]"]
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            seq = torch.tensor([prompt])
            for _ in range(12):
                nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
                if int(nxt) == end:
                    break
                seq = torch.cat([seq, nxt], dim=1)
            assert got[i] == seq[0].tolist()


@pytest.mark.parametrize("grammar", [True, False])
def test_grammar_makes_every_patient_decode(
    model_dir: Path, records: pl.DataFrame, grammar: bool
) -> None:
    model, tok = load_model(model_dir)
    prompts = [ids[:4] for ids in records["input_ids"].to_list()[:48]]
    cfg = SamplingConfig(max_tokens_per_patient=120, grammar=grammar)
    failures = 0
    for g in Engine(model, tok, batch_size=16).generate(prompts, cfg, seed=3):
        try:
            decode_ids(g.token_ids, tok, first_day=0)
        except DecodeError:
            failures += 1
    if grammar:
        assert failures == 0
    else:  # the same model without the grammar: most patients are invalid
        assert failures > len(prompts) // 2


def test_sampling_is_reproducible(model_dir: Path, records: pl.DataFrame) -> None:
    model, tok = load_model(model_dir)
    prompts = [ids[:4] for ids in records["input_ids"].to_list()[:10]]
    cfg = SamplingConfig(max_tokens_per_patient=40, top_k=50, top_p=0.9, temperature=0.8)

    def run(seed: int) -> dict[int, list[int]]:
        return {
            g.index: g.token_ids
            for g in Engine(model, tok, batch_size=4).generate(prompts, cfg, seed=seed)
        }

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_conditional_continuation_keeps_the_history(model_dir: Path, records: pl.DataFrame) -> None:
    model, tok = load_model(model_dir)
    row = records.row(0, named=True)
    vs, ve = tok.token_to_id[VS], tok.token_to_id[VE]
    cutoff = row["days"][len(row["days"]) // 2]
    history = history_prompt(row["input_ids"], row["days"], cutoff_day=cutoff, vs_id=vs, ve_id=ve)
    assert history[-1] == ve and len(history) < len(row["input_ids"])
    short = history_prompt(
        row["input_ids"],
        row["days"],
        cutoff_day=cutoff,
        vs_id=vs,
        ve_id=ve,
        max_len=40,
        tok=tok,
        birth_day=row["birth_day"],
    )
    assert len(short) <= 40 and short[4] == vs and short[-1] == ve
    assert tok.tokens[short[0]].startswith("year:") and tok.tokens[short[1]].startswith("age:")
    cfg = SamplingConfig(max_tokens_per_patient=60)
    outs = list(Engine(model, tok, batch_size=4).generate([history] * 4, cfg, seed=1))
    for g in outs:
        assert g.token_ids[: len(history)] == history
        timeline = decode_ids(g.token_ids, tok, first_day=row["first_day"])
        assert timeline.visits[0].start.toordinal() - 719163 == row["first_day"]


def test_a_refused_prompt_is_counted_not_the_end_of_the_batch(
    model_dir: Path, records: pl.DataFrame
) -> None:
    # A history whose visit type is [OOV] (as tokenizers before per-class UNKNOWN tokens wrote
    # for an unseen visit concept) and an id outside the vocabulary, among good prompts.
    model, tok = load_model(model_dir)
    good = [ids[:4] for ids in records["input_ids"].to_list()[:6]]
    vs, ve, oov = (tok.token_to_id[t] for t in ("[VS]", "[VE]", "[OOV]"))
    prompts = [good[0], [*good[0], vs, oov, ve], *good[1:], [*good[1], len(tok) + 5]]
    cfg = SamplingConfig(max_tokens_per_patient=30)
    engine = Engine(model, tok, batch_size=3)
    outs = {g.index: g for g in engine.generate(prompts, cfg, seed=0)}
    assert sorted(outs) == list(range(len(prompts)))
    refused = {i for i, g in outs.items() if g.finish == "refused"}
    assert refused == {1, len(prompts) - 1} and engine.stats.refused_prompts == 2
    assert "[OOV]" in outs[1].reason and "position 5" in outs[1].reason
    for i in set(outs) - refused:
        decode_ids(outs[i].token_ids, tok, first_day=0)


def test_time_tokens_stay_within_the_day_budget(model_dir: Path, records: pl.DataFrame) -> None:
    # Random weights sample gaps of years; the budgets keep every record within its days, and
    # every visit within MAX_VISIT_DAYS.
    model, tok = load_model(model_dir)
    prompts = [ids[:4] for ids in records["input_ids"].to_list()[:32]]
    budgets = [0, 30, 400, 5000] * 8
    cfg = SamplingConfig(max_tokens_per_patient=150)
    spans = []
    for g in Engine(model, tok, batch_size=16).generate(prompts, cfg, seed=2, day_budgets=budgets):
        tl = decode_ids(g.token_ids, tok, first_day=0)
        last = max([v.end for v in tl.visits] + ([tl.death] if tl.death else []))
        spans.append((last - tl.visits[0].start).days)
        assert spans[-1] <= budgets[g.index]
        assert all((v.end - v.start).days <= MAX_VISIT_DAYS for v in tl.visits)
    assert max(spans) > 400  # the budget is used, not just zero


def _meds_subjects(meds_dir: Path) -> list[int]:
    return (
        pl.read_parquet(sorted((meds_dir / "data").rglob("*.parquet")))["subject_id"]
        .unique()
        .to_list()
    )


def test_generate_writes_valid_meds_and_omop(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    sampling = SamplingConfig(max_tokens_per_patient=150)
    result = generate(
        model_dir,
        40,
        out,
        fmt="omop-duckdb",
        sampling=sampling,
        seed=1,
        batch_size=16,
        chunk_size=15,
        progress=False,
    )
    assert result.written == 40 and not result.rejected
    # The summary says how patients ended and how many window shifts there were.
    assert sum(result.endings.values()) == 40 and set(result.endings) <= {"end", "death", "budget"}
    rows = dict(result.rows())
    assert rows["window shifts"] == "0 (in 0 patients)" and rows["ended by"]
    shards = sorted((out / "meds" / "data").rglob("*.parquet"))
    for shard in shards:
        meds.DataSchema.validate(pq.read_table(shard))
    subjects = _meds_subjects(out / "meds")
    assert sorted(subjects) == [result.id_offset + i for i in range(40)]
    con = duckdb.connect(str(out / "omop.duckdb"), read_only=True)
    persons = con.execute("SELECT count(*), min(person_id) FROM person").fetchall()[0]
    assert persons == (40, result.id_offset)
    orphans = con.execute(
        "SELECT count(*) FROM condition_occurrence c ANTI JOIN person p USING (person_id)"
    ).fetchall()[0][0]
    assert orphans == 0
    assert not (out / ".parts").exists()


def test_generate_refuses_an_existing_folder(model_dir: Path, tmp_path: Path) -> None:
    from ehrgpt.errors import OutputExistsError

    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="--resume"):
        generate(model_dir, 2, tmp_path / "out", progress=False)


def _id_offset(out: Path) -> int:
    return json.loads((out / "generate_summary.json").read_text())["id_offset"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ehrgpt", "generate", *args]


def test_interrupted_run_resumes(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "resume"
    args = [
        "--model",
        str(model_dir),
        "--n",
        "240",
        "--out",
        str(out),
        "--max-tokens-per-patient",
        "100",
        "--batch-size",
        "16",
        "--chunk-size",
        "40",
        "--no-progress",
    ]
    proc = subprocess.Popen(_cli(*args))
    parts = out / ".parts" / "rank-0" / "data"
    deadline = time.time() + 120
    while time.time() < deadline and not list(parts.rglob("*.parquet")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list(parts.rglob("*.parquet"))
    assert done, "no chunk finished before the kill"
    subprocess.run(_cli(*args, "--resume"), check=True)
    subjects = _meds_subjects(out / "meds")
    assert sorted(subjects) == [_id_offset(out) + i for i in range(240)]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_two_processes_split_the_work(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "ehrgpt",
        "generate",
        "--model",
        str(model_dir),
        "--num-patients",  # torchrun's own parser takes --n for one of its options
        "30",
        "--out",
        str(out),
        "--max-tokens-per-patient",
        "60",
        "--batch-size",
        "8",
        "--no-progress",
    ]
    subprocess.run(cmd, check=True, timeout=600)
    subjects = _meds_subjects(out / "meds")
    assert sorted(subjects) == [_id_offset(out) + i for i in range(30)]


# -- whole lives: window shifts past the context (docs/method.md section 8) ---------------

SHIFT_CONTEXT = 40


def _reference_greedy(model, tok, prompt: list[int], budget: int, context: int) -> list[int]:
    """Greedy, grammar-masked decoding that recomputes the current window from scratch at every
    step, rebuilding the window the way the engine does when it fills the context."""
    from ehrgpt.generation.engine import _NO_LIMIT
    from ehrgpt.generation.window import WINDOW_KEEP, Windower
    from ehrgpt.tokenizer.decode import MAX_VISIT_DAYS

    masks = Engine(model, tok)  # only for its time mask, the step after the grammar's
    g, w = masks.grammar, Windower(tok)
    end = tok.token_to_id["[END]"]
    full, window = list(prompt), list(prompt)
    max_len = min(context, len(prompt) + budget)
    keep = int(max_len * WINDOW_KEEP)
    days, visit = torch.tensor([_NO_LIMIT]), torch.tensor([MAX_VISIT_DAYS])
    with torch.no_grad():
        for new in range(budget):
            if len(window) > max_len:  # the engine shifts when the last token has no room
                window = w.window(full, keep=keep, limit=max_len - 1)[0]
                # The rebuilt window leaves the grammar where the whole sequence was.
                assert g.start(1, [window]).state.tolist() == g.start(1, [full]).state.tolist()
            logits = model(torch.tensor([window])).logits[:, -1].float()
            state = g.start(1, [window])
            logits = masks._within_time(
                g.mask_logits(logits, state, budget - new), state, days, visit
            )
            nxt = logits.argmax(-1)
            days, visit = g.spend_time(state, nxt, days, visit, MAX_VISIT_DAYS)
            if int(nxt) == end:
                break
            full.append(int(nxt))
            window.append(int(nxt))
    return full


def _steered(model: EhrGptForCausalLM, tok: EhrTokenizer, ve_bias: float) -> EhrGptForCausalLM:
    """The random model with an output bias that never ends a record (no ``[END]``, no death)
    and closes visits often (``[VE]``, discharges), so it writes many short visits; unbiased,
    it ends at once or stays in one visit."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    head.weight = model.lm_head.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[[tok.token_to_id["[END]"], tok.token_to_id["[DEATH]"]]] = -1e4
        closing = [
            i
            for i, t in enumerate(tok.tokens)
            if t == VE or (t.startswith("DISCHARGE/") and t != "DISCHARGE/4216643")  # not death
        ]
        head.bias[closing] = ve_bias
    model.lm_head = head
    return model


def test_greedy_after_window_shifts_matches_recomputation(
    model_dir: Path, records: pl.DataFrame
) -> None:
    # The engine's tokens after each shift equal a fresh prefill of the rebuilt window.
    model, tok = load_model(model_dir)
    model = _steered(model, tok, 1.0)  # about 9 standard deviations of its logits
    prompts = [ids[:4] for ids in records["input_ids"].to_list()[:3]]
    budget = 90
    cfg = SamplingConfig(max_tokens_per_patient=budget, temperature=0.0)
    engine = Engine(model, tok, batch_size=2, context=SHIFT_CONTEXT)
    got = {g.index: g for g in engine.generate(prompts, cfg)}
    assert engine.stats.shifts >= 6 and all(g.shifts >= 2 for g in got.values())
    assert {g.finish for g in got.values()} == {"budget"}
    for i, prompt in enumerate(prompts):
        assert got[i].token_ids == _reference_greedy(model, tok, prompt, budget, SHIFT_CONTEXT)


def test_patients_longer_than_the_context_decode_whole(
    model_dir: Path, records: pl.DataFrame
) -> None:
    from ehrgpt.generation.window import Windower

    model, tok = load_model(model_dir)
    model = _steered(model, tok, 7.5)  # a visit holds a few tokens when sampled
    prompts = [ids[:4] for ids in records["input_ids"].to_list()[:12]]
    cfg = SamplingConfig(max_tokens_per_patient=200)
    engine = Engine(model, tok, batch_size=5, context=SHIFT_CONTEXT)
    outs = list(engine.generate(prompts, cfg, seed=2))
    assert len(outs) == 12 and sum(g.shifts for g in outs) == engine.stats.shifts > 0
    w, vs = Windower(tok), tok.token_to_id[VS]
    long = [g for g in outs if len(g.token_ids) > SHIFT_CONTEXT]
    assert long
    for g in outs:
        assert len(g.token_ids) - g.n_prompt <= 200
        # The whole timeline, rebuilt prompts left out: one prompt, then visits only.
        assert not any(tok.tokens[t].startswith("year:") for t in g.token_ids[4:])
        timeline = decode_ids(g.token_ids, tok, first_day=0)
        starts = [k for k, t in enumerate(g.token_ids) if t == vs]
        first = timeline.visits[0].start
        # Exact dates across windows: the last visit (or death) is where the day count says.
        last = timeline.death or timeline.visits[-1].start
        assert (last - first).days == w.days_before(g.token_ids, starts[-1])
    assert {g.finish for g in outs} <= {"end", "death", "budget", "context"}


def test_history_longer_than_the_context_continues(model_dir: Path, records: pl.DataFrame) -> None:
    model, tok = load_model(model_dir)
    lengths = records["n_tokens"].to_list()
    row = records.row(max(range(len(lengths)), key=lengths.__getitem__), named=True)
    vs, ve = tok.token_to_id[VS], tok.token_to_id[VE]
    history = history_prompt(
        row["input_ids"], row["days"], cutoff_day=row["days"][-1], vs_id=vs, ve_id=ve
    )
    assert len(history) > 3 * SHIFT_CONTEXT
    cfg = SamplingConfig(max_tokens_per_patient=60)
    outs = list(
        Engine(model, tok, batch_size=2, context=SHIFT_CONTEXT).generate([history] * 2, cfg)
    )
    for g in outs:
        assert g.token_ids[: len(history)] == history
        timeline = decode_ids(g.token_ids, tok, first_day=row["first_day"])
        assert timeline.visits[0].start.toordinal() - 719163 == row["first_day"]


def test_default_budget_is_above_the_longest_training_record(
    eunomia_run: Path, records: pl.DataFrame
) -> None:
    from ehrgpt.pipelines.generate import default_budget

    assert default_budget(eunomia_run, 512) == max(records["n_tokens"].to_list()) + 1
    assert default_budget(None, 512) == 4 * 512

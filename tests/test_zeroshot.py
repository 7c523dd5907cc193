"""Zero-shot prediction: outcome and window from ACES tasks, exact time accounting, prefix-shared
sampling, and risks from scripted models whose futures are known (Eunomia)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from ehrgpt.cli import main
from ehrgpt.errors import EhrgptError
from ehrgpt.generation.engine import Engine, SamplingConfig
from ehrgpt.generation.grammar import TimelineGrammar
from ehrgpt.model import EhrGptConfig, EhrGptForCausalLM
from ehrgpt.pipelines.zeroshot import zeroshot
from ehrgpt.tasks.labels import extract_labels, load_task, resolve_task
from ehrgpt.tokenizer.vocab import VE, VS, EhrTokenizer
from ehrgpt.zeroshot.outcome import Outcome, outcome_from_task
from ehrgpt.zeroshot.resolve import Resolver
from tests.helpers.runs import planted_run, small_model_dir, tokens_frame

BLEED = "SNOMED/74474003"


def scripted_model_dir(run: Path, out: Path, favoured: list[str], *, context: int = 512) -> Path:
    """A model folder whose next-token logits are +20 for ``favoured`` tokens and -20 for all
    others, whatever the history: the blocks add nothing (zero output projections), every
    input embedding is the same vector, and the untied output layer scores it. Under the
    grammar, its futures follow the favoured tokens wherever they are allowed."""
    small_model_dir(run, out, context=context)
    tok = EhrTokenizer.from_pretrained(out)
    config = EhrGptConfig.from_pretrained(out)
    config.tie_word_embeddings = False
    model = EhrGptForCausalLM(config)
    ids = [tok.token_to_id[t] for t in favoured]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        h = config.hidden_size
        model.lm_head.weight.fill_(-20.0 / h)
        model.lm_head.weight[ids] = 20.0 / h
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def held_out_labels(eunomia_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 held_out GI-bleed labels (a label file keeps the scripted runs short)."""
    labels = extract_labels(eunomia_run, "gi_bleed").frame
    part = labels.filter(pl.col("split") == "held_out").head(40).drop("split")
    path = tmp_path_factory.mktemp("zeroshot_labels") / "held_out.parquet"
    part.write_parquet(path)
    return path


# -- the outcome and window of a task -------------------------------------------------------


def test_shipped_tasks_read_as_codes_in_a_window(eunomia_run: Path) -> None:
    _, path = resolve_task("gi_bleed")
    o = outcome_from_task(load_task(path, eunomia_run), path)
    assert (o.name, o.codes, o.start_days, o.end_days) == ("gi_bleed", (BLEED,), 0, 365)
    assert not o.start_inclusive and o.end_inclusive
    _, path = resolve_task("new_acute_bronchitis")
    o = outcome_from_task(load_task(path, eunomia_run), path)
    assert (o.codes, o.end_days) == (("SNOMED/10509002",), 1095)


TASK = """
predicates:
  nsaid:
    code: 1118084
  bleed:
    code: {bleed}
  other:
    code: 260139
  either:
    expr: {either}
trigger: nsaid
windows:
  gap:
    start: trigger
    end: start + 30d
    start_inclusive: false
    end_inclusive: true
    index_timestamp: {index}
  target:
    start: gap.end
    end: {end}
    start_inclusive: false
    end_inclusive: true
    label: {label}
"""


def _task(tmp_path: Path, **kw) -> Path:
    values = {
        "bleed": "192671",
        "either": "or(bleed, other)",
        "index": "start",
        "end": "start + 335d",
        "label": "either",
    }
    path = tmp_path / f"task{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(TASK.format(**(values | kw)))
    return path


def test_window_chains_and_or_predicates_are_read(eunomia_run: Path, tmp_path: Path) -> None:
    path = _task(tmp_path)
    o = outcome_from_task(load_task(path, eunomia_run), path)
    assert o.codes == (BLEED, "SNOMED/10509002")
    assert (o.start_days, o.end_days) == (30, 365)
    path = _task(tmp_path, index="end")  # predicting at day 30: the window is days (0, 335]
    o = outcome_from_task(load_task(path, eunomia_run), path)
    assert (o.start_days, o.end_days) == (0, 335)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"either": "and(bleed, other)"}, "not an or(...)"),
        ({"bleed": "192671\n    value_min: 1"}, "value or column condition"),
        ({"end": "start -> bleed"}, "at an event or the record's edge"),
        (None, "before the prediction time"),
    ],
)
def test_tasks_that_are_not_codes_in_a_window_are_refused(
    eunomia_run: Path, tmp_path: Path, change: dict | None, reason: str
) -> None:
    if change is None:
        path = tmp_path / "early.yaml"
        path.write_text(EARLY)
    else:
        path = _task(tmp_path, **change)
    with pytest.raises(EhrgptError, match="cannot be predicted zero-shot") as err:
        outcome_from_task(load_task(path, eunomia_run), path)
    assert reason in str(err.value) and str(path) in str(err.value)


#: A label window (days 0-30 after the trigger) that ends before the prediction (day 30).
EARLY = """
predicates:
  nsaid:
    code: 1118084
  bleed:
    code: 192671
trigger: nsaid
windows:
  early:
    start: trigger
    end: start + 30d
    start_inclusive: false
    end_inclusive: true
    label: bleed
  later:
    start: early.end
    end: start + 30d
    start_inclusive: false
    end_inclusive: true
    index_timestamp: start
"""


# -- exact time accounting -------------------------------------------------------------------


def test_resolver_counts_days_exactly_as_the_data_holds_them(eunomia_run: Path) -> None:
    """Real timelines cut after a middle visit: at every visit start and event of the rest, the
    days the resolver counted from the cut equal the data's days (gaps, day tokens inside
    inpatient visits, long gaps ``LT Y<k> D<n>``)."""
    tok = EhrTokenizer.from_pretrained(eunomia_run / "tokenizer")
    grammar = TimelineGrammar(tok)
    rows = tokens_frame(eunomia_run).filter(pl.col("n_tokens") > 40).head(300)
    ve, pad = tok.token_to_id[VE], tok.token_to_id["[PAD]"]
    prompts, rests, rest_days = [], [], []
    for ids, days in zip(rows["input_ids"].to_list(), rows["days"].to_list(), strict=True):
        ends = [i for i, t in enumerate(ids) if t == ve]
        if len(ends) < 3:
            continue
        cut = ends[len(ends) // 2]
        prompts.append(ids[: cut + 1])
        rests.append(ids[cut + 1 :])
        rest_days.append(np.asarray(days[cut + 1 :]) - days[cut])
    n, width = len(prompts), max(len(r) for r in rests)
    never = Outcome("none", (), 0, 10**9, False, True)
    resolver = Resolver(grammar, never, [], [0] * n, slots=n)
    all_rows = torch.arange(n)
    resolver.begin(all_rows, list(range(n)))
    state = grammar.start(n, prompts)
    body = {tok.token_to_id[VS]} | {i for i, t in enumerate(tok.tokens) if "/" in t}
    checked = lt_groups = 0
    for j in range(width):
        choice = torch.tensor([r[j] if j < len(r) else pad for r in rests])
        assert not resolver.check(all_rows, state, choice).any()
        state = grammar.advance(state, choice)
        for k in range(n):
            if j < len(rests[k]) and rests[k][j] in body:
                assert int(resolver.elapsed[k]) == rest_days[k][j], (k, j)
                checked += 1
            lt_groups += j < len(rests[k]) and tok.tokens[rests[k][j]] == "LT"
    assert checked > 5000 and lt_groups > 20


def test_futures_resolve_at_the_window_edge(eunomia_run: Path) -> None:
    """A 365-day window, end included: a gap of 366 days passes it; the same gap from a history
    that ended a day before the prediction day reaches day 365, where the outcome still hits;
    a long gap passes the window at its year token, before the remainder is drawn."""
    tok = EhrTokenizer.from_pretrained(eunomia_run / "tokenizer")
    grammar = TimelineGrammar(tok)
    prompt = tokens_frame(eunomia_run)["input_ids"][0].to_list()
    prompt = prompt[: max(i for i, t in enumerate(prompt[:200]) if t == tok.token_to_id[VE]) + 1]
    o = Outcome("x", (BLEED,), 0, 365, False, True)

    def codes(offset: int, future: list[str]) -> list[int]:
        resolver = Resolver(grammar, o, o.token_ids(tok), [offset], slots=1)
        row = torch.tensor([0])
        resolver.begin(row, [0])
        state, out = grammar.start(1, [prompt]), []
        for t in future:
            choice = torch.tensor([tok.token_to_id[t]])
            out.append(int(resolver.check(row, state, choice)[0]))
            state = grammar.advance(state, choice)
        return out

    assert codes(0, ["D366"]) == [2]
    assert codes(-1, ["D366", "[VS]", "VISIT/9202", BLEED]) == [0, 0, 0, 1]
    assert codes(0, ["D365", "[VS]", "VISIT/9202", BLEED]) == [0, 0, 0, 1]
    assert codes(0, ["LT", "Y3"]) == [0, 2]


# -- prefix-shared sampling ------------------------------------------------------------------


def test_shared_prefill_matches_separate_prompts(eunomia_run: Path, tmp_path: Path) -> None:
    """Greedy futures of 3 histories x 5 samples with shared prefills (also across rounds:
    only 4 slots) equal those of the 15 prompts run one by one; sampled futures differ."""
    model_dir = small_model_dir(eunomia_run, tmp_path / "model", context=256)
    model = EhrGptForCausalLM.from_pretrained(model_dir)
    tok = EhrTokenizer.from_pretrained(model_dir)
    ids = tokens_frame(eunomia_run)["input_ids"].head(3).to_list()
    ve = tok.token_to_id[VE]
    prompts = [p[: [i for i, t in enumerate(p) if t == ve][1] + 1] for p in ids]
    greedy = SamplingConfig(max_tokens_per_patient=24, temperature=0)
    shared = Engine(model, tok, batch_size=4)
    out = sorted(
        (g.index, g.sample, g.token_ids) for g in shared.generate(prompts, greedy, samples=5)
    )
    assert shared.stats.forks == 12 and shared.stats.prompt_tokens == sum(map(len, prompts))
    alone = Engine(model, tok, batch_size=1)
    for i, p in enumerate(prompts):
        (single,) = alone.generate([p], greedy)
        assert all(t == single.token_ids for j, _, t in out if j == i)
    sampled = Engine(model, tok, batch_size=8).generate(
        prompts[:1], SamplingConfig(max_tokens_per_patient=24), samples=8, seed=3
    )
    assert len({tuple(g.token_ids) for g in sampled}) > 1


# -- risks from scripted models ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("favoured", "risk", "unresolved"),
    [
        # next visit one day later, holding the outcome: every future hits
        (["D1", "[VS]", "VISIT/9202", BLEED], 1.0, 0.0),
        # the next visit 5 years later: every window passes
        (["LT", "Y5", "[VS]", "VISIT/9202", "SNOMED/40055000", "[VE]"], 0.0, 0.0),
        # same-day visits without the outcome: nothing resolves before the budget
        (["D0", "[VS]", "VISIT/9202", "[VE]", "SNOMED/40055000"], 0.0, 1.0),
    ],
    ids=["always-hit", "window-passes", "unresolved"],
)
def test_scripted_futures_give_the_known_risk(
    eunomia_run: Path,
    held_out_labels: Path,
    tmp_path: Path,
    favoured: list[str],
    risk: float,
    unresolved: float,
) -> None:
    model_dir = scripted_model_dir(eunomia_run, tmp_path / "model", favoured)
    out = tmp_path / "zs"
    result = zeroshot(
        model_dir,
        eunomia_run,
        out,
        task="gi_bleed",
        labels=held_out_labels,
        samples=3,
        max_new_tokens=60,
        n_boot=50,
        baseline=False,
        progress=False,
    )
    risks = pl.read_parquet(out / "risks.parquet").filter("scored")
    assert risks.height > 30
    assert set(risks["risk"].to_list()) == {risk}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["unresolved_share"] == unresolved
    assert result.results[result.main]["n_rows"] == risks.height
    assert result.task == "gi_bleed"  # labels given with --task are named after the task
    if unresolved:  # every future counted: 3 per label, none dropped
        assert metrics["futures_by_finish"]["budget"] == 3 * risks.height


def test_unresolved_futures_can_be_extended(
    eunomia_run: Path, held_out_labels: Path, tmp_path: Path
) -> None:
    """A model whose visits come 100 days apart passes a 365-day window after 4 visits (about
    20 tokens): within a 60-token budget, not within 8 unless extended."""
    favoured = ["D100", "[VS]", "VISIT/9202", "[VE]", "SNOMED/40055000"]
    model_dir = scripted_model_dir(eunomia_run, tmp_path / "model", favoured)
    shares = {}
    for rule in ("no-hit", "extend"):
        zeroshot(
            model_dir,
            eunomia_run,
            tmp_path / rule,
            task="gi_bleed",
            labels=held_out_labels,
            samples=2,
            max_new_tokens=8,
            unresolved=rule,
            extend_cap=200,
            n_boot=20,
            baseline=False,
            progress=False,
        )
        shares[rule] = json.loads((tmp_path / rule / "metrics.json").read_text())
    assert shares["no-hit"]["unresolved_share"] == 1.0
    assert shares["extend"]["unresolved_share"] == 0.0
    assert shares["extend"]["resolved_past_max_new_tokens"] > 0


def test_histories_that_cannot_be_prompts_are_counted(
    eunomia_run: Path, held_out_labels: Path, tmp_path: Path
) -> None:
    """With a 16-token context, histories whose last visit alone is longer are refused by
    reason; the others are scored."""
    model_dir = scripted_model_dir(
        eunomia_run, tmp_path / "model", ["D1", "[VS]", "VISIT/9202", BLEED], context=16
    )
    result = zeroshot(
        model_dir,
        eunomia_run,
        tmp_path / "zs",
        task="gi_bleed",
        labels=held_out_labels,
        samples=2,
        n_boot=20,
        baseline=False,
        progress=False,
    )
    metrics = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    refused = sum(metrics["histories_refused"].values())
    assert refused > 0
    assert metrics["n_rows"] + refused + metrics["labels_without_history"] == 40
    assert any(name.startswith("labels not scored") for name, _ in result.rows())


# -- leakage and the command -------------------------------------------------------------------


def test_outcomes_planted_after_the_prediction_time_change_no_risk(
    eunomia_run: Path, held_out_labels: Path, tmp_path: Path
) -> None:
    model_dir = small_model_dir(eunomia_run, tmp_path / "model", context=256)
    labels = pl.read_parquet(held_out_labels).with_row_index("sample_id")
    planted = planted_run(eunomia_run, labels, tmp_path)
    risks = []
    for run in (eunomia_run, planted):
        out = tmp_path / f"zs_{run.name}"
        zeroshot(
            model_dir,
            run,
            out,
            task="gi_bleed",
            labels=held_out_labels,
            samples=4,
            max_new_tokens=40,
            n_boot=20,
            baseline=False,
            progress=False,
        )
        risks.append(pl.read_parquet(out / "risks.parquet"))
    cols = ["subject_id", "prediction_time", "risk", "n_hit", "n_window", "n_budget"]
    assert risks[0].select(cols).equals(risks[1].select(cols))
    assert risks[0]["n_budget"].sum() < risks[0].height * 4  # futures did resolve


def test_zeroshot_command(eunomia_run: Path, tmp_path: Path) -> None:
    """The command on all held_out GI-bleed labels: metrics.json keys, calibration plot,
    predictions in the meds-evaluation schema, the count baseline beside."""
    model_dir = small_model_dir(eunomia_run, tmp_path / "model", context=256)
    out = tmp_path / "zs"
    args = ["zeroshot", "--model", str(model_dir), "--data", str(eunomia_run)]
    args += ["--task", "gi_bleed", "--samples", "2", "--max-new-tokens", "30"]
    args += ["--out", str(out), "--n-boot", "50", "--no-progress"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "zero-shot (2 futures)" in result.output and "count baseline" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    keys = ("auroc", "auroc_ci", "auprc", "brier", "n_subjects", "n_positive", "unresolved_share")
    assert all(k in metrics for k in keys)
    assert metrics["baseline"] and metrics["labels"]["held_out"]["labels"] >= metrics["n_rows"]
    assert (out / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    pred = pl.read_parquet(out / "predictions" / "zeroshot.parquet")
    assert pred.columns[-1] == "predicted_boolean_probability"
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "already exists" in again.output

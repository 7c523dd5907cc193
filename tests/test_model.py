"""The ehrgpt model, its losses and the targets that feed them.

Losses and logits are checked against an independent re-implementation in plain torch ops
(one record at a time, explicit rotations, softmax attention, torch.distributions.Gamma), on
a model whose weights are scaled up so that attention patterns and head outputs are far from
uniform (a leak across records or into padding would show).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ehrgpt.model import (
    EhrGptConfig,
    EhrGptForCausalLM,
    EhrGptModel,
    config_from_preset,
    estimate_flops_per_token,
)
from ehrgpt.model.modeling import LOSS_TERMS, count_targets
from ehrgpt.presets import PRESETS
from ehrgpt.tokenizer.time_tokens import att_days, att_parts, is_att_token
from ehrgpt.tokenizer.vocab import EhrTokenizer
from ehrgpt.training.targets import make_targets

V = 40
TARGETS = ("labels", "time_year", "time_month", "time_day", "time_gap", "value_bin")


def small_config(**overrides) -> EhrGptConfig:
    settings = {
        "vocab_size": V,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "dropout": 0.0,
        **overrides,
    }
    return EhrGptConfig(**settings)


def scaled_model(config: EhrGptConfig, seed: int = 0) -> EhrGptForCausalLM:
    """A model with large random weights (far from the near-uniform outputs of the init)."""
    torch.manual_seed(seed)
    model = EhrGptForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.ndim > 1 else 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> EhrGptForCausalLM:
    return scaled_model(small_config())


# -- an independent forward pass ---------------------------------------------------------


def reference_heads(model: EhrGptForCausalLM, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Head outputs for ONE record (1-D ids, positions 0..n-1), written with plain ops."""
    c, n = model.config, len(ids)
    hd, nh = c.head_dim, c.num_attention_heads

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.layer_norm_eps) * w

    # Rotate each pair (x_j, x_{j + hd/2}) by angle pos * theta^(-2j/hd).
    freqs = c.rope_theta ** (-torch.arange(hd // 2, dtype=torch.float32) * 2 / hd)
    angle = torch.arange(n, dtype=torch.float32)[:, None] * freqs[None]

    def rotate(x):
        a, b = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], -1)

    x = model.model.embed_tokens.weight[ids]
    causal = torch.ones(n, n).tril().bool()
    for layer in model.model.layers:
        h = rms(x, layer.attn_norm.weight)
        q, k, v = (h @ layer.attn.qkv_proj.weight.T).split(c.hidden_size, dim=-1)
        q, k, v = (t.reshape(n, nh, hd).transpose(0, 1) for t in (q, k, v))
        scores = rotate(q) @ rotate(k).transpose(-1, -2) / math.sqrt(hd)
        weights = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)
        x = x + (weights @ v).transpose(0, 1).reshape(n, -1) @ layer.attn.o_proj.weight.T
        h = rms(x, layer.mlp_norm.weight)
        gate, up = (h @ layer.mlp.gate_up_proj.weight.T).chunk(2, dim=-1)
        x = x + (gate * torch.sigmoid(gate) * up) @ layer.mlp.down_proj.weight.T
    x = rms(x, model.model.norm.weight)

    def head(layer):
        return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)

    gap = torch.log1p(torch.exp(head(model.time_gap_head))).clamp(1e-3, 1e3)
    return {
        "logits": head(model.lm_head),
        "time_year": head(model.time_year_head),
        "time_month": head(model.time_month_head),
        "time_day": head(model.time_day_head),
        "value_bin": head(model.value_head),
        "shape": gap[:, 0],
        "rate": gap[:, 1],
    }


def reference_losses(model, records: list[tuple[torch.Tensor, dict]]) -> dict[str, float]:
    """Each loss as the mean over the positions (of all records) where its target exists."""
    per_term: dict[str, list[torch.Tensor]] = {k: [] for k in TARGETS}
    for ids, targets in records:
        with torch.no_grad():
            out = reference_heads(model, ids)
        for name, logits_key in (
            ("labels", "logits"),
            ("time_year", "time_year"),
            ("time_month", "time_month"),
            ("time_day", "time_day"),
            ("value_bin", "value_bin"),
        ):
            t = targets[name]
            for pos in torch.nonzero(t != -100).flatten().tolist():
                logp = torch.log_softmax(out[logits_key][pos], dim=-1)
                per_term[name].append(-logp[t[pos]])
        gap = targets["time_gap"]
        for pos in torch.nonzero(torch.isfinite(gap) & (gap >= 0)).flatten().tolist():
            gamma = torch.distributions.Gamma(out["shape"][pos], out["rate"][pos])
            per_term["time_gap"].append(-gamma.log_prob(gap[pos] + 1.0))

    def mean(name):
        return float(torch.stack(per_term[name]).mean()) if per_term[name] else 0.0

    losses = {
        "next_token": mean("labels"),
        "time_year": mean("time_year"),
        "time_month": mean("time_month"),
        "time_day": mean("time_day"),
        "time_to_visit": mean("time_gap"),
        "value": mean("value_bin"),
    }
    losses["time_decomposition"] = losses["time_year"] + losses["time_month"] + losses["time_day"]
    return losses


# -- hand-built records and batches --------------------------------------------------------


def hand_record(n: int, seed: int, att_at=(), value_at=()) -> tuple[torch.Tensor, dict]:
    """Random ids (no [PAD]) with targets: next token, ATT parts/gaps and value bins at the
    given positions (gaps chosen to cover 0 days, days, months and years)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n,), generator=g)
    labels = torch.full((n,), -100)
    labels[:-1] = ids[1:]
    targets = {
        "labels": labels,
        **{k: torch.full((n,), -100) for k in ("time_year", "time_month", "time_day")},
        "time_gap": torch.full((n,), float("nan")),
        "value_bin": torch.full((n,), -100),
    }
    for i, pos in enumerate(att_at):
        gap = (0, 12, 45, 400, 1500, 20_000)[(seed + i) % 6]
        targets["time_gap"][pos] = float(gap)
        for name, part in zip(("time_year", "time_month", "time_day"), att_parts(gap), strict=True):
            targets[name][pos] = part
    for i, pos in enumerate(value_at):
        targets["value_bin"][pos] = (seed + 3 * i) % 10
    return ids, targets


def pack(records, width: int) -> dict[str, torch.Tensor]:
    """Records side by side in one row (segment ids 1, 2, ...; positions restart), padded."""
    batch = {
        "input_ids": torch.zeros(width, dtype=torch.long),
        "position_ids": torch.zeros(width, dtype=torch.long),
        "segment_ids": torch.zeros(width, dtype=torch.long),
        **{k: torch.full((width,), -100) for k in TARGETS if k != "time_gap"},
        "time_gap": torch.full((width,), float("nan")),
    }
    start = 0
    for seg, (ids, targets) in enumerate(records, start=1):
        end = start + len(ids)
        batch["input_ids"][start:end] = ids
        batch["position_ids"][start:end] = torch.arange(len(ids))
        batch["segment_ids"][start:end] = seg
        for k in TARGETS:
            batch[k][start:end] = targets[k]
        start = end
    assert start <= width
    return batch


def stack(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


# -- losses ---------------------------------------------------------------------------------


def test_losses_match_an_independent_computation(model):
    a = hand_record(10, 1, att_at=(2, 5, 7), value_at=(3,))
    b = hand_record(6, 2, att_at=(1,), value_at=(0, 4))
    c = hand_record(8, 3, att_at=(0, 6), value_at=())
    batch = stack([pack([a], 14), pack([b, c], 14)])  # row 0 padded, row 1 two records
    out = model(**batch)
    expected = reference_losses(model, [a, b, c])
    assert set(out.losses) == set(expected)
    for name, value in expected.items():
        assert out.losses[name].item() == pytest.approx(value, rel=1e-5, abs=1e-5), name
    total = sum(expected[k] for k in ("next_token", "time_decomposition", "time_to_visit", "value"))
    assert out.loss.item() == pytest.approx(total, rel=1e-5)
    assert out.n_targets["next_token"].item() == 9 + 5 + 7
    assert out.n_targets["time_to_visit"].item() == 6
    assert out.n_targets["value"].item() == 3


def test_loss_weights_come_from_the_config():
    config = small_config(
        next_token_weight=0.5, time_decomposition_weight=2.0, time_to_visit_weight=0.0
    )
    model = scaled_model(config)
    rec = hand_record(12, 4, att_at=(3, 8), value_at=(5,))
    out = model(**stack([pack([rec], 12)]))
    lo = {k: v.item() for k, v in out.losses.items()}
    expected = 0.5 * lo["next_token"] + 2.0 * lo["time_decomposition"] + lo["value"]
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_padding_changes_no_loss(model):
    rec = hand_record(11, 5, att_at=(2, 9), value_at=(4,))
    alone = model(**stack([pack([rec], 11)]))  # one segment, no padding: the is_causal path
    for width in (12, 20):
        padded = model(**stack([pack([rec], width)]))
        assert padded.losses.keys() == alone.losses.keys()
        for name in alone.losses:
            torch.testing.assert_close(
                padded.losses[name], alone.losses[name], rtol=1e-6, atol=1e-6
            )
            assert padded.n_targets[name] == alone.n_targets[name]
        torch.testing.assert_close(padded.logits[0, :11], alone.logits[0], rtol=1e-5, atol=1e-5)


def test_padding_rows_are_not_counted(model):
    """A batch row that is all padding adds nothing (the reference divides by padded counts)."""
    rec = hand_record(9, 6, att_at=(4,), value_at=(2,))
    one = model(**stack([pack([rec], 16)]))
    two = model(**stack([pack([rec], 16), pack([], 16)]))
    for name in one.losses:
        torch.testing.assert_close(two.losses[name], one.losses[name], rtol=1e-6, atol=1e-6)


def test_a_loss_without_targets_is_zero_and_keeps_the_graph(model):
    rec = hand_record(8, 7)  # no ATT, no value
    out = model(**stack([pack([rec], 8)]))
    assert out.losses["value"].item() == 0.0 and out.losses["time_to_visit"].item() == 0.0
    assert out.n_targets["value"].item() == 0
    out.loss.backward()
    assert model.value_head.weight.grad is not None  # DDP needs every head in the graph
    model.zero_grad()


def test_micro_batches_with_the_step_counts_give_the_batch_gradient():
    """Each micro-batch's sums over the step's counts add up to the whole batch's loss and
    gradient, with terms (value, time) spread very unevenly over the micro-batches."""
    config = small_config(time_to_visit_weight=0.5, value_weight=2.0)
    rows = [
        pack([hand_record(12, 20, att_at=(2,), value_at=(1, 3, 5, 7, 9))], 12),
        pack([hand_record(12, 21, att_at=(1, 4, 6, 8), value_at=())], 12),
        pack([hand_record(12, 22, att_at=(), value_at=(2,))], 12),
        pack([hand_record(7, 23, att_at=(3,), value_at=(4,)), hand_record(5, 24)], 12),
    ]
    torch.manual_seed(0)
    whole = EhrGptForCausalLM(config)
    whole(**stack(rows)).loss.backward()
    torch.manual_seed(0)
    split = EhrGptForCausalLM(config)
    micro = [stack(rows[:1]), stack(rows[1:])]
    counts = {k: sum(count_targets(b)[k] for b in micro) for k in LOSS_TERMS}
    assert counts == count_targets(stack(rows))
    total = 0.0
    for batch in micro:
        loss = split.total_loss(split(**batch).loss_sums, counts)
        loss.backward()
        total += loss.item()
    with torch.no_grad():
        assert total == pytest.approx(whole(**stack(rows)).loss.item(), rel=1e-5)
    for (name, p), q in zip(whole.named_parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    # the mean of the micro-batches' means is another, wrong, loss
    with torch.no_grad():
        means = sum(split(**b).loss.item() for b in micro) / len(micro)
    assert abs(means - total) > 0.1


# -- packing ------------------------------------------------------------------------------


def test_a_packed_record_sees_only_itself(model):
    a = hand_record(7, 8)
    b = hand_record(9, 9)
    b_alone = model(b[0][None]).logits[0]
    a_alone = model(a[0][None]).logits[0]
    row = pack([a, b], 20)
    packed = model(row["input_ids"][None], row["position_ids"][None], row["segment_ids"][None])
    torch.testing.assert_close(packed.logits[0, 7:16], b_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.logits[0, :7], a_alone, rtol=1e-5, atol=1e-5)
    # Positions derived from the segments are the same as explicit ones.
    derived = model(row["input_ids"][None], segment_ids=row["segment_ids"][None])
    torch.testing.assert_close(derived.logits, packed.logits)
    # And the logits match the independent forward pass.
    torch.testing.assert_close(
        b_alone, reference_heads(model, b[0])["logits"], rtol=1e-4, atol=1e-4
    )


def test_attention_mask_is_the_same_as_segments(model):
    ids = torch.randint(1, V, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    out = model(ids, attention_mask=mask)
    torch.testing.assert_close(
        out.logits[1, :6], model(ids[1:, :6]).logits[0], rtol=1e-5, atol=1e-5
    )


def test_gradient_checkpointing_gives_the_same_gradients():
    model = scaled_model(small_config()).train()
    batch = stack([pack([hand_record(10, 10, att_at=(3,), value_at=(5,))], 12)])
    model(**batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(**batch).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6)


def test_grouped_query_attention_runs(model):
    gqa = scaled_model(small_config(num_key_value_heads=2))
    rec = hand_record(9, 11)
    alone = gqa(rec[0][None]).logits[0, :9]
    packed = gqa(**stack([pack([hand_record(5, 12), rec], 16)])).logits[0, 5:14]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


# -- Hugging Face plumbing -------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_with_auto_classes(tmp_path: Path, tie: bool):
    model = scaled_model(small_config(tie_word_embeddings=tie))
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, EhrGptConfig) and config.model_type == "ehrgpt"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, EhrGptForCausalLM)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    batch = stack([pack([hand_record(9, 13, att_at=(2,), value_at=(6,))], 12)])
    before, after = model(**batch), loaded(**batch)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.loss, after.loss)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, EhrGptModel)


def test_vocabulary_expansion_keeps_old_rows():
    model = scaled_model(small_config())
    old = model.model.embed_tokens.weight.detach().clone()
    model.resize_token_embeddings(V + 5)
    assert model.config.vocab_size == V + 5
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.model.embed_tokens.weight[:V], old)
    assert model(torch.tensor([[V + 4, 3]])).logits.shape == (1, 2, V + 5)


def test_presets_sizes(capsys):
    sizes = {}
    for name in PRESETS:
        config = config_from_preset(name, vocab_size=3000)
        with torch.device("meta"):  # no memory, no init
            sizes[name] = EhrGptForCausalLM(config).num_parameters()
        assert estimate_flops_per_token(config) > 6 * sizes[name]
    with capsys.disabled():
        print(
            "\npreset parameters (vocab 3,000):", {k: f"{v / 1e6:.1f}M" for k, v in sizes.items()}
        )
    assert 0.5e6 < sizes["tiny"] < 3e6
    assert 15e6 < sizes["small"] < 45e6
    assert 100e6 < sizes["base"] < 130e6
    base = config_from_preset("base", vocab_size=3000)
    assert (base.hidden_size, base.num_hidden_layers, base.max_position_embeddings) == (
        768,
        14,
        4096,
    )
    with pytest.raises(ValueError, match="preset"):
        config_from_preset("huge", vocab_size=10)
    with pytest.raises(ValueError, match="num_attention_heads"):
        config_from_preset("tiny", vocab_size=10, num_attention_heads=3)


# -- targets on real Eunomia records --------------------------------------------------------


@pytest.fixture(scope="module")
def eunomia_records(eunomia_run: Path) -> tuple[EhrTokenizer, list[np.ndarray]]:
    tokenizer = EhrTokenizer.from_pretrained(eunomia_run / "tokenizer")
    files = sorted((eunomia_run / "tokenized" / "train").glob("*.parquet"))
    ids = pl.read_parquet(files, columns=["input_ids"])["input_ids"].to_list()
    return tokenizer, [np.asarray(x, dtype=np.int64) for x in ids]


def expected_att_gaps(tokens: list[str], scheme: str) -> dict[int, int]:
    """Start position -> gap of every ATT, walking the tokens left to right."""
    gaps, i = {}, 0
    while i < len(tokens):
        if tokens[i] == "LT":
            gaps[i] = att_days(tokens[i : i + 3], scheme)
            i += 3
        elif is_att_token(tokens[i]):
            gaps[i] = att_days(tokens[i : i + 1], scheme)
            i += 1
        else:
            i += 1
    return gaps


def test_targets_on_eunomia(eunomia_records):
    tokenizer, records = eunomia_records
    config = small_config()
    n_att = n_long = 0
    for ids in records[:400]:
        tokens = [tokenizer.tokens[i] for i in ids]
        t = make_targets(ids, tokenizer)
        assert all(len(v) == len(ids) for v in t.values())
        np.testing.assert_array_equal(t["labels"][:-1], ids[1:])
        assert t["labels"][-1] == -100
        gaps = expected_att_gaps(tokens, tokenizer.att_scheme)
        before = {start - 1: gap for start, gap in gaps.items() if start >= 1}
        assert set(np.flatnonzero(np.isfinite(t["time_gap"]))) == set(before)
        for pos, gap in before.items():
            assert t["time_gap"][pos] == gap
            parts = (t["time_year"][pos], t["time_month"][pos], t["time_day"][pos])
            assert parts == att_parts(gap)
        n_att += len(before)
        n_long += sum(tokens[s] == "LT" for s in gaps)
        for name in ("time_year", "time_month", "time_day"):
            assert set(np.flatnonzero(t[name] != -100)) == set(before)
        assert t["time_year"].max() < config.n_year_classes
        assert t["time_month"].max() < config.n_month_classes
        assert t["time_day"].max() < config.n_day_classes
        is_bin = [tok.startswith("VAL:Q") for tok in tokens[1:]]
        np.testing.assert_array_equal(t["value_bin"][:-1] != -100, is_bin)
    assert n_att > 1000 and n_long > 100  # both single-token and LT-triple ATTs were checked


def test_value_targets_sit_before_bin_tokens(eunomia_records):
    """Eunomia has no numeric values: put bins after lab codes of a real record."""
    tokenizer, records = eunomia_records
    ids = records[0]
    labs = [i for i in range(len(ids)) if tokenizer.tokens[ids[i]].startswith("LOINC/")]
    out, bins = [], {}
    for i, token in enumerate(ids):
        out.append(token)
        if i in labs:
            bins[len(out) - 1] = len(out) % 10
            out.append(tokenizer.bin_base + len(out) % 10)
    t = make_targets(torch.tensor(out), tokenizer)
    assert isinstance(t["value_bin"], torch.Tensor)
    found = torch.nonzero(t["value_bin"] != -100).flatten().tolist()
    assert {i: int(t["value_bin"][i]) for i in found} == bins


def test_tiny_model_trains_a_step_on_eunomia(eunomia_records):
    tokenizer, records = eunomia_records
    config = config_from_preset("tiny", vocab_size=len(tokenizer), dropout=0.0)
    torch.manual_seed(0)
    model = EhrGptForCausalLM(config)
    rows = []
    for pair in (records[:2], records[2:4]):
        recs = []
        for ids in pair:
            ids = torch.from_numpy(ids[:120])
            targets = make_targets(ids, tokenizer)
            recs.append((ids, targets))
        rows.append(pack(recs, 250))
    batch = stack(rows)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    assert out.n_targets["time_to_visit"] > 0 and out.n_targets["value"] == 0
    # Initial losses on the scale of log(classes): the Gamma head starts sensible.
    assert out.losses["next_token"].item() == pytest.approx(math.log(len(tokenizer)), rel=0.1)
    assert out.losses["time_to_visit"].item() < 15
    out.loss.backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.step()
    assert model(**batch).loss.item() < out.loss.item()


def test_attention_extends_to_a_kv_cache(model):
    """The attention module takes earlier keys/values: last token alone == full pass."""
    from ehrgpt.model.modeling import rotary_cos_sin

    attn = model.model.layers[0].attn
    x = torch.randn(1, 7, model.config.hidden_size)
    cos, sin = rotary_cos_sin(torch.arange(7)[None], model.config.head_dim, model.config.rope_theta)
    full, _ = attn(x, cos, sin, None)
    _, past = attn(x[:, :6], cos[..., :6, :], sin[..., :6, :], None)
    last, (k, _) = attn(x[:, 6:], cos[..., 6:, :], sin[..., 6:, :], None, past_key_value=past)
    assert k.shape[2] == 7
    torch.testing.assert_close(last, full[:, 6:], rtol=1e-5, atol=1e-5)


def test_bfloat16_autocast_trains(model):
    batch = stack([pack([hand_record(10, 14, att_at=(3,), value_at=(5,))], 12)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert out.losses["time_to_visit"].dtype == torch.float32
    assert torch.isfinite(out.loss)
    out.loss.backward()
    model.zero_grad()


def test_import_ehrgpt_is_enough_for_the_auto_classes(tmp_path: Path):
    """A fresh process: ``import ehrgpt`` then the Auto classes load a saved model, and
    ``import ehrgpt`` alone imports neither torch nor transformers (the CLI stays quick)."""
    import subprocess
    import sys

    config = config_from_preset("tiny", vocab_size=50, num_hidden_layers=1)
    EhrGptForCausalLM(config).save_pretrained(tmp_path)
    script = f"""
import sys
import ehrgpt
assert "torch" not in sys.modules and "transformers" not in sys.modules
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
assert type(m).__name__ == "EhrGptForCausalLM", type(m)
assert type(AutoModel.from_pretrained({str(tmp_path)!r})).__name__ == "EhrGptModel"
assert type(AutoConfig.from_pretrained({str(tmp_path)!r})).__name__ == "EhrGptConfig"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]

"""The ehrgpt decoder and its pretraining heads (Hugging Face single-model-file style).

A decoder-only transformer over patient timelines, with four heads trained together
(docs/method.md section 7):

1. next token: cross-entropy over the vocabulary;
2. time decomposition: where the next token starts an ATT, its (years, months, days) parts,
   three cross-entropies, **summed** (each part is its own question, as in the reference);
3. time to next visit: Gamma negative log-likelihood of ``gap + 1`` days (the shift makes a
   same-day gap of 0 valid), shape and rate from a softplus head clamped to [1e-3, 1e3];
4. value: where the next token is a value bin ``VAL:Q<k>``, cross-entropy over the bins.

Each loss is the mean over exactly the positions where its target exists (``-100``, or a
non-finite / negative gap, means "no target"); padding never enters a count (the reference
divides by counts that include padding and masks the value loss at the wrong position).
Targets are built per record by :func:`ehrgpt.training.targets.make_targets`; the model only
consumes them.

The forward also returns each term's **sum** over its target positions (``loss_sums``) and
its count (``n_targets``), so that a step made of several micro-batches (gradient
accumulation, data-parallel ranks) can divide each sum by the count of the *whole step*
(:func:`count_targets` before the forwards, then :meth:`EhrGptForCausalLM.total_loss`):
a sparse term (values, time) is then weighted by target, not by micro-batch. The weights of
the terms live in the config and are applied in :func:`combine_losses` only.

Block design (choices, against the reference's GPT-2 and Qwen2 backbones):

- **pre-norm RMSNorm + SwiGLU MLP** (Llama / Qwen2 blocks): RMSNorm is as stable as LayerNorm
  and cheaper; SwiGLU trains better than GELU at the same parameter count (Shazeer 2020). The
  presets size the MLP at 8/3 of hidden so a block costs what a GPT-2 block of the same width
  costs, so ``base`` matches the authors' 768-hidden, 14-layer recipe.
- **rotary positions over ``position_ids``**, which restart at 0 for each packed record (the
  reference's GPT-2 variant has no position signal at all). No position table: any length runs.
- **attention with** :func:`torch.nn.functional.scaled_dot_product_attention`. Sample packing:
  ``segment_ids`` [B, T] name the record of each token (0 = padding); attention is causal and
  block-diagonal, so no record sees another. A row with one segment and no padding takes the
  ``is_causal=True`` fast path (flash kernels on GPU); otherwise one boolean [B, 1, T, T] mask
  is built per forward and shared by all layers. Its cost grows with T^2, so packed rows should
  be about the context length (a FlexAttention block mask is the way to go beyond that).
- no biases, tied input/output embeddings, GPT-2 initialisation (std 0.02, residual output
  projections scaled by 1/sqrt(2 x layers)); the Gamma head starts at an exponential with a
  mean of 100 days so that its first losses are on the scale of the cross-entropies.

>>> import torch
>>> from ehrgpt.model import EhrGptConfig, EhrGptForCausalLM
>>> _ = torch.manual_seed(0)
>>> model = EhrGptForCausalLM(EhrGptConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
...                                        num_attention_heads=2, intermediate_size=64))
>>> ids = torch.randint(7, 50, (1, 6))
>>> labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
>>> out = model(ids, labels=labels)
>>> out.logits.shape, sorted(out.losses), bool(out.loss > 0)
(torch.Size([1, 6, 50]), ['next_token'], True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput

from ehrgpt.model.configuration import EhrGptConfig

__all__ = [
    "IGNORE_INDEX",
    "LOSS_TERMS",
    "EhrGptForCausalLM",
    "EhrGptModel",
    "EhrGptOutput",
    "EhrGptPreTrainedModel",
    "block_causal_mask",
    "combine_losses",
    "count_targets",
    "estimate_flops_per_token",
    "gamma_nll",
    "positions_from_segments",
]

IGNORE_INDEX = -100
#: Range of the Gamma shape and rate (as in the reference).
GAMMA_CLAMP = (1e-3, 1e3)
#: The Gamma head starts at shape 1, rate 1/GAP_PRIOR_DAYS (an exponential with this mean).
GAP_PRIOR_DAYS = 100.0

#: The loss terms: each is a sum over the positions that have its target, divided by their
#: number. The three time parts are each a mean of their own; their sum is the
#: ``time_decomposition`` loss of docs/method.md section 7.
LOSS_TERMS = ("next_token", "time_year", "time_month", "time_day", "time_to_visit", "value")
#: The forward argument that holds each term's target.
TERM_TARGETS = {
    "next_token": "labels",
    "time_year": "time_year",
    "time_month": "time_month",
    "time_day": "time_day",
    "time_to_visit": "time_gap",
    "value": "value_bin",
}
#: The config field that weights each term in the total.
TERM_WEIGHTS = {
    "next_token": "next_token_weight",
    "time_year": "time_decomposition_weight",
    "time_month": "time_decomposition_weight",
    "time_day": "time_decomposition_weight",
    "time_to_visit": "time_to_visit_weight",
    "value": "value_weight",
}
TIME_PARTS = ("time_year", "time_month", "time_day")


# -- loss accounting ------------------------------------------------------------------------


def has_target(term: str, target: torch.Tensor) -> torch.Tensor:
    """Where ``target`` (of loss ``term``) exists: not -100; for the gap, finite and >= 0.

    >>> has_target("time_to_visit", torch.tensor([3.0, float("nan"), -1.0, 0.0])).tolist()
    [True, False, False, True]
    >>> has_target("value", torch.tensor([2, -100])).tolist()
    [True, False]
    """
    if term == "time_to_visit":
        return torch.isfinite(target) & (target >= 0)
    return target != IGNORE_INDEX


def count_targets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Positions with a target, per loss term, in a batch of forward arguments.

    Terms whose target is not in ``batch`` are left out. A trainer adds these counts over the
    micro-batches (and ranks) of an optimizer step before running any forward.

    >>> b = {"labels": torch.tensor([[5, 6, -100]]), "time_gap": torch.tensor([[1.0, 2.0, 3.0]])}
    >>> {k: int(v) for k, v in count_targets(b).items()}
    {'next_token': 2, 'time_to_visit': 3}
    """
    return {
        term: has_target(term, batch[key]).sum()
        for term, key in TERM_TARGETS.items()
        if batch.get(key) is not None
    }


def combine_losses(
    sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor], config: EhrGptConfig
) -> torch.Tensor:
    """The total loss: sum over terms of weight x (sum of the term) / (its count).

    ``counts`` may be those of a whole optimizer step while ``sums`` are one micro-batch's:
    the gradients of the micro-batches then add up to the gradient of the step's loss. A term
    without targets adds 0 (its sum is 0) and stays in the graph.

    >>> c = EhrGptConfig(vocab_size=10, hidden_size=8, num_attention_heads=2, value_weight=0.5)
    >>> sums = {"next_token": torch.tensor(6.0), "value": torch.tensor(3.0)}
    >>> float(combine_losses(sums, {"next_token": 3, "value": 2}, c))
    2.75
    """
    total = 0.0
    for term, value in sums.items():
        n = counts[term]
        n = n.clamp(min=1) if isinstance(n, torch.Tensor) else max(n, 1)
        total = total + getattr(config, TERM_WEIGHTS[term]) * value / n
    return total


# -- attention helpers ------------------------------------------------------------------------


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever the segment id changes along a row.

    Adjacent records must have different ids (the packer numbers them 1, 2, 3...). Rotary
    attention depends only on position differences, so restarting changes no score in exact
    arithmetic; it keeps the angles of a packed record the ones it gets alone or in generation.

    >>> positions_from_segments(torch.tensor([[1, 1, 1, 2, 2, 0]])).tolist()
    [[0, 1, 2, 0, 1, 0]]
    """
    idx = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor | None:
    """Boolean [B, 1, T, T] mask (True = may attend): causal and within one segment.

    ``None`` when every row is a single segment, where plain ``is_causal`` attention is the
    same thing and faster. Padding (segment 0) attends only to padding, so no row is empty.

    >>> block_causal_mask(torch.tensor([[1, 1, 2]]))[0, 0].int().tolist()
    [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    >>> block_causal_mask(torch.tensor([[3, 3, 3]])) is None
    True
    """
    if bool((segment_ids == segment_ids[:, :1]).all()):
        return None
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines [B, 1, T, head_dim] of the rotary angles at ``position_ids`` [B, T]."""
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32)
    inv_freq = theta ** (-exponents / head_dim)
    angles = position_ids[..., None].float() * inv_freq  # [B, T, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the halves of ``x`` [B, H, T, D] by the angles (the ``rotate_half`` layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# -- blocks ---------------------------------------------------------------------------------


class EhrGptAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention with rotary positions.

    ``past_key_value`` (keys and values of earlier tokens, [B, H_kv, T_past, D]) is prepended
    and the new keys and values are returned. ``cache`` is any object with the Hugging Face
    cache method ``update(k, v, layer_idx) -> (k_all, v_all)`` (a ``DynamicCache`` in
    ``generate()``, or the slot cache of :mod:`ehrgpt.generation.engine`). With earlier tokens
    and more than one new token, the caller passes the mask (``is_causal`` would align to the
    top-left corner).
    """

    def __init__(self, config: EhrGptConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        width = (self.n_head + 2 * self.n_kv) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=False)
        self.o_proj._residual_proj = True  # GPT-2 init: std / sqrt(2 x layers)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache=None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, _ = x.shape
        sizes = (self.n_head * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim)
        q, k, v = self.qkv_proj(x).split(sizes, dim=-1)
        q = q.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        elif past_key_value is not None:
            k = torch.cat([past_key_value[0], k], dim=2)
            v = torch.cat([past_key_value[1], v], dim=2)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            # No dropout on attention weights (as Llama / Qwen2): with it, torch leaves the
            # fused kernels for a path that builds the whole matrix and a random mask
            # (about a quarter of a CPU training step); dropout stays on the residual stream.
            dropout_p=0.0,
            is_causal=mask is None and k.shape[2] == t,
            enable_gqa=self.n_kv != self.n_head,
        )
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)
        return self.o_proj(y), (k, v)


class EhrGptMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, gate and up in one matmul."""

    def __init__(self, config: EhrGptConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.down_proj._residual_proj = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class EhrGptBlock(GradientCheckpointingLayer):
    """Pre-norm decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: EhrGptConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = EhrGptAttention(config, layer_idx)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = EhrGptMLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache=None,
    ) -> torch.Tensor:
        attended = self.attn(self.attn_norm(x), cos, sin, mask, cache=cache)[0]
        x = x + self.resid_dropout(attended)
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))


# -- models ---------------------------------------------------------------------------------


class EhrGptPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the Hugging Face plumbing shared by the ehrgpt models."""

    config_class = EhrGptConfig
    config: EhrGptConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EhrGptBlock"]  # noqa: RUF012 (Hugging Face class attribute)
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # Hugging Face calls this once per module, leaves first, and skips modules without
        # parameters of their own; so the special cases are marked on the Linear layers.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "_residual_proj", False):
                std /= math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "_gamma_head", False):
                # softplus^-1 of shape 1 and rate 1 / GAP_PRIOR_DAYS.
                start = torch.tensor([1.0, 1.0 / GAP_PRIOR_DAYS])
                init.copy_(module.bias, torch.log(torch.expm1(start)))
            elif module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.RMSNorm):
            init.ones_(module.weight)


class EhrGptModel(EhrGptPreTrainedModel):
    """The decoder: token embeddings, blocks, final norm -> hidden states [B, T, hidden]."""

    def __init__(self, config: EhrGptConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(EhrGptBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
    ) -> BaseModelOutput:
        """Hidden states of ``input_ids`` [B, T].

        Args:
            input_ids: token ids [B, T].
            position_ids: rotary positions [B, T]; default: from ``segment_ids``, restarting at
                0 for each segment.
            segment_ids: record of each token [B, T] (0 = padding); attention stays inside a
                segment. Default: ``attention_mask`` (1 = token, 0 = padding), else one segment.
            attention_mask: the usual Hugging Face padding mask [B, T_past + T], used only
                without segment_ids; or a boolean [B, 1, T, T_past + T] mask used as it is.
            cache: a key/value cache (see :class:`EhrGptAttention`) holding earlier tokens.
        """
        past = cache.get_seq_length() if cache is not None else 0
        if (attention_mask is not None and attention_mask.dim() == 4) or past:
            mask, position_ids = _cached_mask_and_positions(
                input_ids, past, position_ids, attention_mask
            )
        else:
            if segment_ids is None:
                segment_ids = (
                    attention_mask.long()
                    if attention_mask is not None
                    else torch.ones_like(input_ids)
                )
            if position_ids is None:
                position_ids = positions_from_segments(segment_ids)
            mask = block_causal_mask(segment_ids)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        x = self.embed_dropout(self.embed_tokens(input_ids))
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache=cache)
        return BaseModelOutput(last_hidden_state=self.norm(x))


def _cached_mask_and_positions(
    input_ids: torch.Tensor,
    past: int,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Mask and positions for new tokens that follow ``past`` cached ones.

    A 4-D boolean mask is used as given (the caller also gives positions). A 2-D padding mask
    [B, past + T] gives positions by counting real tokens and a causal mask that skips padding;
    without one, positions continue from ``past`` and one new token needs no mask.
    """
    t = input_ids.shape[1]
    if attention_mask is not None and attention_mask.dim() == 4:
        if position_ids is None:
            raise ValueError("a 4-D attention mask needs position_ids")
        return attention_mask.bool(), position_ids
    device = input_ids.device
    if attention_mask is None:
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=device).expand(input_ids.shape[0], t)
        if t == 1:
            return None, position_ids
        keys = torch.ones(input_ids.shape[0], past + t, dtype=torch.bool, device=device)
    else:
        keys = attention_mask[:, -(past + t) :].bool()
        if position_ids is None:
            position_ids = (keys.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
        if t == 1 and bool(keys.all()):
            return None, position_ids
    causal = torch.ones(t, past + t, dtype=torch.bool, device=device).tril(diagonal=past)
    # Every query sees itself, so a padding query never has an empty row (NaN in SDPA).
    itself = torch.eye(t, past + t, dtype=torch.bool, device=device).roll(past, dims=1)
    return ((causal[None] & keys[:, None, :]) | itself[None])[:, None], position_ids


@dataclass
class EhrGptOutput(ModelOutput):
    """What :class:`EhrGptForCausalLM` returns.

    Attributes:
        loss: weighted sum of the losses whose targets were given (``None`` if none were).
        logits: next-token logits [B, T, vocab].
        losses: each loss term, detached: ``next_token``, ``time_year``, ``time_month``,
            ``time_day``, ``time_decomposition`` (the sum of the three), ``time_to_visit``,
            ``value``.
        loss_sums: each term of :data:`LOSS_TERMS` summed over its target positions, in the
            graph (fp32): with counts of a whole optimizer step, :meth:`total_loss` gives the
            exact step loss of a micro-batch.
        n_targets: positions each loss averaged over (:func:`count_targets`).
        time_year_logits, time_month_logits, time_day_logits: parts of the next ATT [B, T, C].
        time_gap_shape, time_gap_rate: Gamma parameters of (next gap in days + 1) [B, T].
        value_logits: bin of the next value token [B, T, n_value_bins].
        last_hidden_state: final normed hidden states [B, T, hidden].
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] | None = None
    loss_sums: dict[str, torch.Tensor] | None = None
    n_targets: dict[str, torch.Tensor] | None = None
    time_year_logits: torch.Tensor | None = None
    time_month_logits: torch.Tensor | None = None
    time_day_logits: torch.Tensor | None = None
    time_gap_shape: torch.Tensor | None = None
    time_gap_rate: torch.Tensor | None = None
    value_logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    cache: object | None = None

    def expected_time_gap(self) -> torch.Tensor:
        """Mean of the predicted gap to the next visit in days (shape / rate - 1) [B, T]."""
        return self.time_gap_shape / self.time_gap_rate - 1.0


def gamma_nll(shape: torch.Tensor, rate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of ``x`` > 0 under Gamma(shape, rate), elementwise."""
    return torch.lgamma(shape) - shape * rate.log() - (shape - 1) * x.log() + rate * x


def _ce_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the positions whose target is not -100 (fp32)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        target.reshape(-1).long(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


class EhrGptForCausalLM(EhrGptPreTrainedModel, GenerationMixin):
    """The pretraining model: the decoder plus next-token, time and value heads.

    It also runs under Hugging Face ``generate()`` (with its key/value cache); ehrgpt's own
    engine (:mod:`ehrgpt.generation.engine`) is faster and keeps timelines valid.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config: EhrGptConfig) -> None:
        super().__init__(config)
        h = config.hidden_size
        self.model = EhrGptModel(config)
        self.lm_head = nn.Linear(h, config.vocab_size, bias=False)
        self.time_year_head = nn.Linear(h, config.n_year_classes)
        self.time_month_head = nn.Linear(h, config.n_month_classes)
        self.time_day_head = nn.Linear(h, config.n_day_classes)
        self.time_gap_head = nn.Linear(h, 2)  # softplus -> (shape, rate)
        self.time_gap_head._gamma_head = True
        self.value_head = nn.Linear(h, config.n_value_bins)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        time_year: torch.Tensor | None = None,
        time_month: torch.Tensor | None = None,
        time_day: torch.Tensor | None = None,
        time_gap: torch.Tensor | None = None,
        value_bin: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
    ) -> EhrGptOutput:
        """Run the decoder and the heads; with targets, the losses (all targets [B, T]).

        Args:
            input_ids, position_ids, segment_ids, attention_mask: as in :class:`EhrGptModel`.
            labels: the next token (already shifted), -100 where there is none.
            time_year, time_month, time_day: parts of the next ATT's gap, -100 elsewhere.
            time_gap: the next ATT's gap in days (float), NaN or negative elsewhere.
            value_bin: bin (0..n_value_bins-1) of the next token if it is a value bin, else -100.
            cache: a key/value cache of earlier tokens (``generate()`` passes one).
            use_cache, return_dict: accepted for ``generate()``; outputs are always a dict.
            logits_to_keep: if > 0, heads run on the last ``logits_to_keep`` positions only.
        """
        del use_cache, return_dict
        h = self.model(
            input_ids, position_ids, segment_ids, attention_mask, cache=cache
        ).last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        gap_params = F.softplus(self.time_gap_head(h).float()).clamp(*GAMMA_CLAMP)
        out = EhrGptOutput(
            logits=self.lm_head(h),
            time_year_logits=self.time_year_head(h),
            time_month_logits=self.time_month_head(h),
            time_day_logits=self.time_day_head(h),
            time_gap_shape=gap_params[..., 0],
            time_gap_rate=gap_params[..., 1],
            value_logits=self.value_head(h),
            last_hidden_state=h,
            cache=cache,
        )
        targets = {
            "labels": labels,
            "time_year": time_year,
            "time_month": time_month,
            "time_day": time_day,
            "time_gap": time_gap,
            "value_bin": value_bin,
        }
        counts = count_targets(targets)
        if not counts:
            return out
        sums = self._loss_sums(out, targets, counts)
        out.loss = self.total_loss(sums, counts)
        out.loss_sums = sums
        losses = {k: sums[k].detach() / counts[k].clamp(min=1) for k in sums}
        parts = [k for k in TIME_PARTS if k in sums]
        if parts:  # a sum of three means, docs/method.md section 7
            losses["time_decomposition"] = sum(losses[k] for k in parts)
            counts["time_decomposition"] = counts[parts[0]]
        out.losses = losses
        out.n_targets = {k: n.detach() for k, n in counts.items()}
        return out

    def _loss_sums(
        self,
        out: EhrGptOutput,
        targets: dict[str, torch.Tensor | None],
        counts: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Each term's loss summed over the positions that have its target (fp32)."""
        logits = {
            "next_token": out.logits,
            "time_year": out.time_year_logits,
            "time_month": out.time_month_logits,
            "time_day": out.time_day_logits,
            "value": out.value_logits,
        }
        sums: dict[str, torch.Tensor] = {}
        for term in counts:
            target = targets[TERM_TARGETS[term]]
            if term == "time_to_visit":
                valid = has_target(term, target)
                sums[term] = gamma_nll(
                    out.time_gap_shape[valid],
                    out.time_gap_rate[valid],
                    target[valid].float() + 1.0,
                ).sum()
            else:
                sums[term] = _ce_sum(logits[term], target)
        return sums

    def total_loss(
        self, loss_sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The weighted total of ``loss_sums`` divided by ``counts`` (see :func:`combine_losses`).

        A trainer passes one micro-batch's ``loss_sums`` with the counts of its whole
        optimizer step; the forward's own ``loss`` is this with the batch's own counts.
        """
        return combine_losses(loss_sums, counts, self.config)


def estimate_flops_per_token(config: EhrGptConfig, seq_len: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token, nanoGPT / PaLM style: 6N + 12 L H T.

    ``N`` counts the parameters that take part in matmuls (the embedding lookup does not, the
    output layer and heads do); the attention term uses ``seq_len`` (default: the context),
    counting the whole T x T score matrix as PaLM does. For packed rows of short records, pass
    the mean record length to count only the attention that the block mask lets through.

    >>> from ehrgpt.model.configuration import config_from_preset
    >>> f = estimate_flops_per_token(config_from_preset("base", vocab_size=3000))
    >>> round(f / 1e6)
    1138
    """
    c = config
    t = c.max_position_embeddings if seq_len is None else seq_len
    qkv = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    per_layer = qkv + c.hidden_size * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    heads = c.vocab_size + c.n_year_classes + c.n_month_classes + c.n_day_classes + 2
    n = c.num_hidden_layers * per_layer + c.hidden_size * (heads + c.n_value_bins)
    return 6.0 * n + 12.0 * c.num_hidden_layers * c.hidden_size * t


AutoConfig.register("ehrgpt", EhrGptConfig, exist_ok=True)
AutoModel.register(EhrGptConfig, EhrGptModel, exist_ok=True)
AutoModelForCausalLM.register(EhrGptConfig, EhrGptForCausalLM, exist_ok=True)

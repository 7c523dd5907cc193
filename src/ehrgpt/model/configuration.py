"""Configuration of the ehrgpt model (Hugging Face ``configuration_*.py`` style).

``EhrGptConfig`` holds the shape of the decoder and of its four heads. The model never needs
token ids of the vocabulary: the collator (:mod:`ehrgpt.training.targets`) turns token ids into
the targets of every head, and the model only consumes them.

The presets (model shape and training defaults) are in :mod:`ehrgpt.presets`.

>>> config = config_from_preset("tiny", vocab_size=3085, dropout=0.0)
>>> config.hidden_size, config.num_hidden_layers, config.max_position_embeddings, config.dropout
(128, 4, 512, 0.0)
>>> config.model_type, config.head_dim
('ehrgpt', 32)
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ehrgpt.presets import PRESETS
from ehrgpt.tokenizer.time_tokens import MAX_YEARS

__all__ = ["EhrGptConfig", "config_from_preset"]


class EhrGptConfig(PretrainedConfig):
    """Shape of an ehrgpt decoder and of its heads (``model_type = "ehrgpt"``).

    Args:
        vocab_size: tokens in the vocabulary (``len(tokenizer)``).
        hidden_size: width of the residual stream.
        num_hidden_layers: decoder blocks.
        num_attention_heads: query heads; ``hidden_size`` must divide by it, into an even head size.
        num_key_value_heads: key/value heads (grouped-query attention); ``None`` = as many as query
            heads (plain multi-head attention, the default of every preset).
        intermediate_size: width of the SwiGLU MLP.
        max_position_embeddings: longest record (context) the model is trained for. Rotary
            positions have no table, so this is a statement of the training context, used by the
            packer, by generation and by :func:`estimate_flops_per_token`.
        rope_theta: base of the rotary frequencies.
        dropout: dropout on embeddings, attention weights and residual branches.
        layer_norm_eps: epsilon of the RMS norms.
        initializer_range: standard deviation of the normal initialisation.
        pad_token_id: id of ``[PAD]`` (0 in every ehrgpt vocabulary).
        n_value_bins: classes of the value head (the tokenizer's ``VAL:Q0..Q9``).
        n_year_classes: classes of the years part of a gap (0..150 years: ``MAX_YEARS + 1``).
        n_month_classes: classes of the months part (0..12).
        n_day_classes: classes of the days part (0..29).
        next_token_weight, time_decomposition_weight, time_to_visit_weight, value_weight:
            weights of the four losses in the total (1.0 each, as in the reference).
        tie_word_embeddings: the output layer shares the input embedding matrix.
    """

    model_type = "ehrgpt"

    vocab_size: int = 3000
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    intermediate_size: int = 384
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    n_value_bins: int = 10
    n_year_classes: int = MAX_YEARS + 1
    n_month_classes: int = 13
    n_day_classes: int = 30
    next_token_weight: float = 1.0
    time_decomposition_weight: float = 1.0
    time_to_visit_weight: float = 1.0
    value_weight: float = 1.0
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must divide by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("The head size (hidden_size / num_attention_heads) must be even.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide by "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads


def config_from_preset(name: str, vocab_size: int, **overrides: Any) -> EhrGptConfig:
    """The config of preset ``name`` for a vocabulary of ``vocab_size`` tokens, with overrides.

    Raises:
        ValueError: ``name`` is not a preset, or an override is not a config field.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = set(EhrGptConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model setting(s) {', '.join(unknown)} for preset {name!r}")
    return EhrGptConfig(**{**PRESETS[name].model, "vocab_size": int(vocab_size), **overrides})

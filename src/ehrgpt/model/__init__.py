"""The ehrgpt model: config, decoder, pretraining heads; importing it registers ``"ehrgpt"``
with ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM``.

>>> from transformers import AutoConfig
>>> type(AutoConfig.for_model("ehrgpt")).__name__
'EhrGptConfig'
"""

from ehrgpt.model.configuration import EhrGptConfig, config_from_preset
from ehrgpt.model.modeling import (
    IGNORE_INDEX,
    EhrGptForCausalLM,
    EhrGptModel,
    EhrGptOutput,
    EhrGptPreTrainedModel,
    block_causal_mask,
    estimate_flops_per_token,
    gamma_nll,
    positions_from_segments,
)

__all__ = [
    "IGNORE_INDEX",
    "EhrGptConfig",
    "EhrGptForCausalLM",
    "EhrGptModel",
    "EhrGptOutput",
    "EhrGptPreTrainedModel",
    "block_causal_mask",
    "config_from_preset",
    "estimate_flops_per_token",
    "gamma_nll",
    "positions_from_segments",
]

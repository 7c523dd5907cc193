"""Model sizes and their training defaults, in one table.

========  ======  ======  =====  ============  =======  ======  ==============================
preset    hidden  layers  heads  intermediate  context  lr      meant for
========  ======  ======  =====  ============  =======  ======  ==============================
tiny      128     4       4      384           512      2e-3    Eunomia on 2 CPU cores in minutes
small     512     8       8      1408          2048     5e-4    one GPU, a few hours
base      768     14      12     2048          4096     2e-4    the authors' recipe (~110M)
========  ======  ======  =====  ============  =======  ======  ==============================

``intermediate`` is the width of the SwiGLU MLP: 8/3 of hidden (rounded to a multiple of 64)
gives the parameter count and FLOPs of a GELU MLP of width 4 x hidden, so ``base`` has the size
of the authors' GPT-2 recipe (768 hidden, 14 layers). Training rows are as long as the context:
attention over a packed row costs O(row^2) (one dense block-diagonal mask), so on CPU 4 rows of
512 train about 5x faster than 1 row of 2048; ``small`` and ``base`` keep the authors' 16,384
tokens per batch.

>>> PRESETS["tiny"].model["hidden_size"], PRESETS["tiny"].train["lr"]
(128, 0.002)
>>> preset_names()
('tiny', 'small', 'base')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A named model shape (``EhrGptConfig`` fields) with its training defaults
    (``TrainConfig`` fields)."""

    name: str
    meant_for: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny",
        "Eunomia on 2 CPU cores in minutes",
        model={
            "hidden_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 384,
            "max_position_embeddings": 512,
            "dropout": 0.1,
        },
        train={
            "tokens_per_row": 512,
            "rows_per_batch": 4,
            "lr": 2e-3,
            "epochs": 3,
            "eval_every": 50,
            "checkpoint_every": 50,
        },
    ),
    "small": Preset(
        "small",
        "one GPU, a few hours",
        model={
            "hidden_size": 512,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "intermediate_size": 1408,
            "max_position_embeddings": 2048,
            "dropout": 0.1,
        },
        train={
            "tokens_per_row": 2048,
            "rows_per_batch": 8,
            "lr": 5e-4,
            "epochs": 10,
            "eval_every": 200,
            "checkpoint_every": 200,
        },
    ),
    "base": Preset(
        "base",
        "the authors' recipe",
        model={
            "hidden_size": 768,
            "num_hidden_layers": 14,
            "num_attention_heads": 12,
            "intermediate_size": 2048,
            "max_position_embeddings": 4096,
            "dropout": 0.0,
        },
        train={
            "tokens_per_row": 4096,
            "rows_per_batch": 4,
            "lr": 2e-4,
            "epochs": 10,
            "eval_every": 500,
            "checkpoint_every": 500,
        },
    ),
}


def preset_names() -> tuple[str, ...]:
    """The preset names, smallest first."""
    return tuple(PRESETS)

"""One way to seed every random number generator ehrgpt uses, and to read the process rank."""

from __future__ import annotations

import os
import random

import numpy as np


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and (when installed) PyTorch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    torch.manual_seed(seed)


def rank() -> int:
    """This process's rank under ``torchrun`` (0 when run alone).

    >>> rank() >= 0
    True
    """
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes ``torchrun`` started (1 when run alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))

"""Prediction tasks: ACES task definitions that ship with ehrgpt, labels, leakage-safe histories.

Shipped tasks (``ehrgpt labels --task NAME``) are the YAML files of this folder; any other
ACES YAML is given by its path.
"""

from __future__ import annotations

from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent


def shipped_tasks() -> dict[str, Path]:
    """Name -> YAML path of the tasks that ship with ehrgpt.

    >>> sorted(shipped_tasks())[:2]
    ['gi_bleed', 'gi_bleed_celecoxib']
    """
    return {p.stem: p for p in sorted(TASK_DIR.glob("*.yaml"))}

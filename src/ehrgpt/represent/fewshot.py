"""The EHRSHOT few-shot protocol: heads trained on k positives and k negatives.

k runs over :data:`KS` (and "all", the whole training set, once), 5 replicates; within a
replicate the smaller sets are nested in the larger ones (the first k of one shuffled order of
the positives and one of the negatives). Each set trains each head, scored by AUROC on
held_out; the plot shows the mean over replicates against k, with the range as a band.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from ehrgpt.represent.heads import fit_head, predict
from ehrgpt.represent.metrics import auroc

KS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
REPLICATES = 5
ALL = -1


def nested_sets(y: np.ndarray, ks=KS, replicates: int = REPLICATES, seed: int = 0):
    """``{(replicate, k): row indices}``: k positives and k negatives, nested within a replicate.

    Values of k above the number of positives (or negatives) are left out.

    >>> y = np.array([1, 0, 1, 0, 0, 1, 0, 1])
    >>> sets = nested_sets(y, ks=(1, 2, 8), replicates=2)
    >>> sorted(sets), len(sets[(0, 2)])
    ([(0, 1), (0, 2), (1, 1), (1, 2)], 4)
    >>> set(sets[(0, 1)]) <= set(sets[(0, 2)]), int(y[sets[(1, 2)]].sum())
    (True, 2)
    """
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    sets = {}
    for r in range(replicates):
        rng = np.random.default_rng(seed + r)
        p, n = rng.permutation(pos), rng.permutation(neg)
        for k in ks:
            if k <= min(len(p), len(n)):
                sets[(r, k)] = np.sort(np.concatenate([p[:k], n[:k]]))
    return sets


def run_fewshot(
    features: dict[str, tuple],
    y_train: np.ndarray,
    groups: np.ndarray,
    y_test: np.ndarray,
    *,
    heads=("logistic", "lightgbm"),
    ks=KS,
    replicates: int = REPLICATES,
    seed: int = 0,
) -> pl.DataFrame:
    """AUROC on the test rows for each feature set, head, k and replicate.

    ``features`` maps a name (``ehrgpt``, ``counts``) to ``(X_train, X_test)``. Rows:
    ``features, head, k, replicate, auroc`` (k = -1 for "all").
    """
    sets = nested_sets(y_train, ks, replicates, seed)
    sets[(0, ALL)] = np.arange(len(y_train))
    rows = []
    for name, (X_train, X_test) in features.items():
        for head in heads:
            for (r, k), idx in sets.items():
                model = fit_head(head, X_train[idx], y_train[idx], groups[idx], seed + r)
                rows.append((name, head, k, r, auroc(y_test, predict(model, X_test))))
    return pl.DataFrame(rows, schema=["features", "head", "k", "replicate", "auroc"], orient="row")


def summarise(frame: pl.DataFrame) -> pl.DataFrame:
    """Mean, min and max AUROC over replicates per feature set, head and k."""
    return (
        frame.group_by("features", "head", "k")
        .agg(
            pl.col("auroc").mean().alias("mean"),
            pl.col("auroc").min().alias("min"),
            pl.col("auroc").max().alias("max"),
            pl.len().alias("replicates"),
        )
        .sort("features", "head", "k")
    )


def plot_fewshot(frame: pl.DataFrame, path: Path, title: str) -> None:
    """AUROC against k (log scale; "all" at the right), one line per feature set and head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(frame)
    ks = sorted(k for k in summary["k"].unique() if k != ALL)
    x_all = (ks[-1] * 2) if ks else 1
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"ehrgpt": "-", "counts": "--"}
    for (name, head), part in summary.group_by("features", "head", maintain_order=True):
        part = part.sort("k")
        x = np.where(part["k"].to_numpy() == ALL, x_all, part["k"].to_numpy())
        order = np.argsort(x)
        label = f"{'ehrgpt embedding' if name == 'ehrgpt' else 'count baseline'}, {head}"
        line = ax.plot(
            x[order],
            part["mean"].to_numpy()[order],
            styles.get(name, "-"),
            marker="o",
            ms=3,
            label=label,
        )[0]
        ax.fill_between(
            x[order],
            part["min"].to_numpy()[order],
            part["max"].to_numpy()[order],
            color=line.get_color(),
            alpha=0.12,
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks([*ks, x_all], [*map(str, ks), "all"])
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("k (positives = negatives per training set)")
    ax.set_ylabel("AUROC on held_out")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)

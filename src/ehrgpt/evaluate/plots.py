"""The report's figures: matplotlib (Agg backend, no display) rendered to PNG ``data:`` URIs,
so the HTML file carries every plot inside it."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from ehrgpt.evaluate.fidelity import Distribution

REAL, SYN, HELD = "#1f77b4", "#ff7f0e", "#2ca02c"
_SIZE = (5.2, 3.6)


def _uri(fig) -> str:
    buf = io.BytesIO()
    fig.subplots_adjust(left=0.13, right=0.97, top=0.9, bottom=0.2)
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def scatter(x: np.ndarray, y: np.ndarray, *, xlabel: str, ylabel: str, title: str) -> str:
    """Real (x) against synthetic (y) values with the identity line."""
    fig, ax = plt.subplots(figsize=_SIZE)
    top = float(max(np.max(x, initial=0), np.max(y, initial=0), 1e-6)) * 1.05
    ax.plot([0, top], [0, top], color="grey", lw=1, ls="--", label="y = x")
    ax.scatter(x, y, s=8, alpha=0.6, color=SYN, edgecolors="none")
    ax.set(xlim=(0, top), ylim=(0, top), xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(loc="upper left", frameon=False)
    return _uri(fig)


def distribution(d: Distribution, *, max_categories: int = 12) -> str:
    """Real and synthetic overlaid: histograms (numeric) or side-by-side bars (categorical)."""
    fig, ax = plt.subplots(figsize=_SIZE)
    if d.kind == "categorical":
        keys = sorted(set(d.real) | set(d.synthetic), key=lambda k: -d.real.get(k, 0.0))
        keys = keys[:max_categories]
        pos = np.arange(len(keys))
        ax.bar(pos - 0.2, [d.real.get(k, 0) for k in keys], 0.4, color=REAL, label="real")
        ax.bar(pos + 0.2, [d.synthetic.get(k, 0) for k in keys], 0.4, color=SYN, label="synthetic")
        ax.set_xticks(pos, keys, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(d.unit)
    else:
        both = np.concatenate([d.real, d.synthetic])
        if len(both):
            lo, hi = np.percentile(both, [0.5, 99.5])
            if hi <= lo:
                lo, hi = lo - 0.5, hi + 0.5
            bins = np.linspace(lo, hi, 40)
            for values, color, label in ((d.real, REAL, "real"), (d.synthetic, SYN, "synthetic")):
                if len(values):
                    ax.hist(
                        np.clip(values, lo, hi),
                        bins=bins,
                        density=True,
                        histtype="stepfilled",
                        alpha=0.5,
                        color=color,
                        label=label,
                    )
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel=d.unit, ylabel="density")
    ax.set_title(d.name)
    ax.legend(frameon=False)
    return _uri(fig)


def distances(member: np.ndarray, nonmember: np.ndarray) -> str:
    """Distance to the closest synthetic record, training against held_out patients."""
    fig, ax = plt.subplots(figsize=_SIZE)
    both = np.concatenate([member, nonmember])
    hi = float(np.percentile(both, 99)) if len(both) else 1.0
    bins = np.linspace(0, max(hi, 1.0), 40)
    ax.hist(
        np.clip(member, 0, hi),
        bins=bins,
        density=True,
        histtype="stepfilled",
        alpha=0.5,
        color=REAL,
        label="training (members)",
    )
    ax.hist(
        np.clip(nonmember, 0, hi),
        bins=bins,
        density=True,
        histtype="stepfilled",
        alpha=0.5,
        color=HELD,
        label="held_out (non-members)",
    )
    ax.set(
        xlabel="squared distance to the closest synthetic patient",
        ylabel="density",
        title="distance to closest synthetic record",
    )
    ax.legend(frameon=False)
    return _uri(fig)


def bars(
    labels: list[str],
    groups: dict[str, list[float]],
    *,
    ylabel: str,
    title: str,
    intervals: dict[str, list[list[float]]] | None = None,
) -> str:
    """Grouped bars (e.g. TSTR and TRTR AUROC per task), with ``intervals`` (per group, a
    ``[low, high]`` per bar) as error bars; nan bars are left empty."""
    fig, ax = plt.subplots(figsize=_SIZE)
    pos = np.arange(len(labels))
    width = 0.8 / max(len(groups), 1)
    for k, ((name, values), color) in enumerate(
        zip(groups.items(), (SYN, REAL, HELD), strict=False)
    ):
        vals = np.nan_to_num(np.asarray(values, float), nan=0.0)
        err = None
        if intervals and name in intervals:
            ci = np.asarray(intervals[name], float).reshape(-1, 2)
            err = np.abs(np.stack([vals - ci[:, 0], ci[:, 1] - vals]))  # nan: no error bar
        x = pos + (k - (len(groups) - 1) / 2) * width
        ax.bar(x, vals, width, color=color, label=name, yerr=err, capsize=3)
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    long = max((len(label) for label in labels), default=0) * len(labels) > 40
    ax.set_xticks(pos, labels, rotation=20 if long else 0, ha="right" if long else "center")
    ax.set(ylim=(0, 1), ylabel=ylabel, title=title)
    ax.legend(frameon=False)
    return _uri(fig)

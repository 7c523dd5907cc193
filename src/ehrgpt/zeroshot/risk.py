"""From sampled futures to risks: counts by how each future ended, risk, its standard error.

Every future of a prediction is counted, whatever its end (docs/method.md section 12):

- ``hit``: the outcome appeared inside the window;
- ``window``: the window passed without it; ``end`` / ``death``: the timeline ended (``[END]``,
  or death) without it; these are resolved as no hit;
- ``budget`` / ``context``: the token budget ran out, or one visit outgrew the context, before
  either happened: **unresolved**. They stay in the denominator as no hit (the reference drops
  them, so its denominator changes from patient to patient). The ``extend`` rule gives every
  future a larger budget instead (``--extend-cap``), and reports how many needed it.

risk = hits / samples, with its binomial standard error ``sqrt(risk (1 - risk) / samples)``.

>>> t = Tally(2, samples=4, base_budget=10)
>>> for i, finish, n in [(0, "hit", 3), (0, "window", 5), (0, "budget", 10), (0, "end", 2),
...                      (1, "hit", 12), (1, "hit", 4), (1, "window", 9), (1, "context", 8)]:
...     t.add(i, finish, n)
>>> t.risk().tolist(), t.std_error().round(3).tolist(), t.unresolved_share()
([0.25, 0.5], [0.217, 0.25], 0.25)
>>> t.totals()["hit"], t.late
(3, 1)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from ehrgpt.util.atomic import write_with

#: How a future can end, in the order of the count columns.
FINISHES = ("hit", "window", "end", "death", "budget", "context")
RESOLVED = ("hit", "window", "end", "death")
UNRESOLVED = ("budget", "context")


class Tally:
    """Counts of futures per prediction and finish."""

    def __init__(self, n: int, *, samples: int, base_budget: int) -> None:
        self.counts = np.zeros((n, len(FINISHES)), np.int32)
        self.samples = samples
        self.base_budget = base_budget
        self.late = 0  # resolved futures that needed more than the base budget (extend rule)
        self._col = {f: k for k, f in enumerate(FINISHES)}

    def add(self, i: int, finish: str, new_tokens: int) -> None:
        """One future of prediction ``i`` ended with ``finish`` after ``new_tokens`` tokens."""
        self.counts[i, self._col[finish]] += 1
        if finish in RESOLVED and new_tokens > self.base_budget:
            self.late += 1

    def risk(self) -> np.ndarray:
        return self.counts[:, 0] / self.samples

    def std_error(self) -> np.ndarray:
        p = self.risk()
        return np.sqrt(p * (1 - p) / self.samples)

    def unresolved_share(self) -> float:
        unresolved = self.counts[:, [self._col[f] for f in UNRESOLVED]].sum()
        return float(unresolved / max(self.counts.sum(), 1))

    def totals(self) -> dict[str, int]:
        return {f: int(self.counts[:, k].sum()) for k, f in enumerate(FINISHES)}

    def frame(self) -> pl.DataFrame:
        """``risk``, ``risk_se`` and one count column per finish (``n_hit`` ...)."""
        return pl.DataFrame(
            {
                "risk": self.risk(),
                "risk_se": self.std_error(),
                **{f"n_{f}": self.counts[:, k] for k, f in enumerate(FINISHES)},
            }
        )


def calibration_bins(y: np.ndarray, p: np.ndarray, bins: int = 10) -> pl.DataFrame:
    """Observed rate against mean predicted risk in bins of equal count (ties kept together).

    >>> y = np.array([0, 0, 1, 0, 1, 1]); p = np.array([0.1, 0.1, 0.2, 0.6, 0.7, 0.9])
    >>> calibration_bins(y, p, bins=3).select("predicted", "observed", "n").rows()
    [(0.1, 0.0, 2), (0.4, 0.5, 2), (0.8, 1.0, 2)]
    """
    y, p = np.asarray(y, float), np.asarray(p, float)
    first = np.searchsorted(np.sort(p), p, side="left")  # ties share their first rank
    group = first * bins // max(len(p), 1)
    frame = pl.DataFrame({"y": y, "p": p})
    return (
        frame.with_columns(pl.Series("bin", group))
        .group_by("bin")
        .agg(
            pl.col("p").mean().alias("predicted"),
            pl.col("y").mean().alias("observed"),
            pl.len().alias("n"),
        )
        .sort("bin")
        .with_columns(
            (pl.col("observed") * (1 - pl.col("observed")) / pl.col("n")).sqrt().alias("se")
        )
    )


def plot_calibration(
    y: np.ndarray, p: np.ndarray, path: Path, title: str, *, bins: int = 10
) -> pl.DataFrame:
    """Reliability diagram (observed rate against predicted risk, with binomial error bars)
    above a histogram of the risks; returns the bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = calibration_bins(y, p, bins)
    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="perfect calibration")
    ax.errorbar(
        table["predicted"].to_numpy(),
        table["observed"].to_numpy(),
        yerr=1.96 * table["se"].to_numpy(),
        marker="o",
        ms=4,
        capsize=3,
        label="zero-shot risk (95% CI)",
    )
    ax.set_ylabel("observed rate")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    hist.hist([p[y == 0], p[y == 1]], bins=20, range=(0, 1), label=["negative", "positive"])
    hist.set_xlabel("predicted risk (share of sampled futures with the outcome)")
    hist.set_ylabel("labels")
    hist.legend(fontsize=8)
    fig.tight_layout()
    write_with(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return table


__all__ = ["FINISHES", "RESOLVED", "UNRESOLVED", "Tally", "calibration_bins", "plot_calibration"]

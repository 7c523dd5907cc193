"""Numeric values as bin tokens: per (code, unit), 10 equal-count bins of the trimmed values.

Fitting follows docs/method.md section 4: a uniform sample of at most 10,000 values per (code, unit)
(merged across shards with weights), values beyond 3 standard deviations trimmed, the 10%..90%
quantiles as bin edges, and at least 40 values needed to bin at all. Each bin keeps its
lowest, middle and highest value, and 11 quantiles (0%, 10%, ..., 100% of the values inside
it): decoding a real record gives back the bin's middle value, decoding a generated one draws
a number inside the bin from its quantiles (a piecewise-linear inverse distribution function),
so synthetic values follow the real distribution within each bin instead of taking 10 values.

>>> import polars as pl
>>> frame = pl.DataFrame({"code": ["LAB"] * 100, "unit": ["mg"] * 100,
...                       "numeric_value": [float(v) for v in range(100)]})
>>> bins = fit_value_bins([sample_values(frame, seed=0)])
>>> bins[("LAB", "mg")].edges[:3]
[9.5, 19.5, 29.5]
>>> assign_bins(frame.head(3).vstack(frame.tail(1)), bins)["bin"].to_list()
[0, 0, 0, 9]
>>> bins[("LAB", "mg")].quantiles[0][::5]
[0.0, 4.5, 9.0]
>>> draws = bins[("LAB", "mg")].sample(0, np.random.default_rng(0), 1000)
>>> bool(draws.min() >= 0.0 and draws.max() <= 9.0), len(np.unique(draws)) > 100
(True, True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import polars as pl

N_BINS = 10
#: Quantiles kept per bin (0%, 10%, ..., 100%) to draw generated values from.
N_QUANTILES = 11
MIN_VALUES = 40
SAMPLE_SIZE = 10_000
TRIM_SD = 3.0


@dataclass
class ValueBins:
    """The bins of one (code, unit): 9 inner edges, and per bin its low, middle and high value
    and its quantiles (empty in files written before they were kept)."""

    edges: list[float]
    low: list[float]
    mid: list[float]
    high: list[float]
    count: int
    quantiles: list[list[float]] = field(default_factory=list)

    def representative(self, bin_index: int) -> float:
        """The value a bin token of a real record decodes to (the bin's median)."""
        return self.mid[bin_index]

    def sample(
        self, bin_index: int, rng: np.random.Generator, size: int | None = None
    ) -> np.ndarray | float:
        """Values drawn inside a bin: the inverse of its piecewise-linear distribution function
        through the stored quantiles (uniform between low and high without them)."""
        q = (
            self.quantiles[bin_index]
            if self.quantiles
            else [self.low[bin_index], self.high[bin_index]]
        )
        u = rng.random(size)
        return np.interp(u, np.linspace(0.0, 1.0, len(q)), q)


def sample_values(frame: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    """A per-(code, unit) uniform sample of at most 10,000 numeric values, with total counts.

    ``frame`` needs ``code``, ``unit`` and ``numeric_value``; rows without a finite value are
    ignored. Returns ``code, unit, n, values`` (one row per key).
    """
    vals = frame.select("code", "unit", "numeric_value").filter(
        pl.col("numeric_value").is_not_null() & pl.col("numeric_value").is_finite()
    )
    return vals.group_by("code", "unit").agg(
        pl.len().alias("n"),
        pl.col("numeric_value")
        .cast(pl.Float64)
        .sample(n=pl.min_horizontal(pl.len(), SAMPLE_SIZE), seed=seed)
        .alias("values"),
    )


def _weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    cum = np.cumsum(w) - 0.5 * w
    cum /= w.sum()
    return np.interp(qs, cum, v)


def _bin_quantiles(values: np.ndarray, weights: np.ndarray) -> list[float]:
    """The 0%, 10%, ..., 100% quantiles of one bin's (weighted) values; the ends are the
    bin's lowest and highest value, so draws never leave the bin."""
    qs = _weighted_quantiles(values, weights, np.linspace(0.0, 1.0, N_QUANTILES))
    qs[0], qs[-1] = values.min(), values.max()
    return [float(v) for v in np.maximum.accumulate(qs)]


def fit_value_bins(samples: list[pl.DataFrame]) -> dict[tuple[str, str | None], ValueBins]:
    """Merge per-shard samples and cut 10 equal-count bins per (code, unit) with >= 40 values."""
    if not samples:
        return {}
    merged = pl.concat(samples).with_columns((pl.col("n") / pl.col("values").list.len()).alias("w"))
    bins: dict[tuple[str, str | None], ValueBins] = {}
    for (code, unit), group in merged.group_by("code", "unit"):
        total = int(group["n"].sum())
        if total < MIN_VALUES:
            continue
        values = np.concatenate([np.asarray(v, dtype=np.float64) for v in group["values"]])
        weights = np.concatenate(
            [np.full(len(v), w) for v, w in zip(group["values"], group["w"], strict=True)]
        )
        mean = np.average(values, weights=weights)
        sd = np.sqrt(np.average((values - mean) ** 2, weights=weights))
        keep = np.abs(values - mean) <= TRIM_SD * sd if sd > 0 else np.ones(len(values), bool)
        values, weights = values[keep], weights[keep]
        # Edges as float32 numbers, like the values in MEDS, so binning never depends on rounding.
        edges = _weighted_quantiles(values, weights, np.arange(1, N_BINS) / N_BINS)
        edges = edges.astype(np.float32).astype(np.float64)
        index = np.searchsorted(edges, values, side="right")
        low, mid, high, quantiles = [], [], [], []
        for b in range(N_BINS):
            inside, w = values[index == b], weights[index == b]
            if len(inside):
                low.append(float(inside.min()))
                mid.append(float(np.sort(inside)[len(inside) // 2]))  # a real value
                high.append(float(inside.max()))
                quantiles.append(_bin_quantiles(inside, w))
            else:  # repeated edges leave a bin empty: it decodes to its edge
                edge = float(edges[min(b, N_BINS - 2)])
                low.append(edge)
                mid.append(edge)
                high.append(edge)
                quantiles.append([edge] * N_QUANTILES)
        bins[(str(code), None if unit is None else str(unit))] = ValueBins(
            [float(e) for e in edges], low, mid, high, total, quantiles
        )
    return dict(sorted(bins.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")))


def assign_bins(frame: pl.DataFrame, bins: dict[tuple[str, str | None], ValueBins]) -> pl.DataFrame:
    """Add ``bin`` (0..9, null where there is no value or no bins) for rows with a value.

    A value equal to an edge goes to the upper bin; values outside the trimmed range go to the
    first or last bin.
    """
    if not bins:
        return frame.with_columns(pl.lit(None, pl.Int8).alias("bin"))
    table = pl.DataFrame(
        {
            "code": [k[0] for k in bins],
            "unit": [k[1] for k in bins],
            **{f"_e{i}": [b.edges[i] for b in bins.values()] for i in range(N_BINS - 1)},
        },
        schema={
            "code": pl.String,
            "unit": pl.String,
            **{f"_e{i}": pl.Float64 for i in range(N_BINS - 1)},
        },
    )
    joined = frame.join(table, on=["code", "unit"], how="left", nulls_equal=True)
    value = pl.col("numeric_value").cast(pl.Float64)
    count = pl.sum_horizontal(
        [(value >= pl.col(f"_e{i}")).cast(pl.Int8) for i in range(N_BINS - 1)]
    )
    has = value.is_not_null() & value.is_finite() & pl.col("_e0").is_not_null()
    return joined.with_columns(
        pl.when(has).then(count).otherwise(None).cast(pl.Int8).alias("bin")
    ).drop([f"_e{i}" for i in range(N_BINS - 1)])


def bins_to_json(bins: dict[tuple[str, str | None], ValueBins]) -> list[dict]:
    """A JSON-ready list of bins (for tokenizer files)."""
    return [{"code": k[0], "unit": k[1], **asdict(v)} for k, v in bins.items()]


def bins_from_json(items: list[dict]) -> dict[tuple[str, str | None], ValueBins]:
    """The inverse of :func:`bins_to_json`."""
    out = {}
    for item in items:
        item = dict(item)
        key = (item.pop("code"), item.pop("unit"))
        out[key] = ValueBins(**item)
    return out

"""Fidelity: how close synthetic patients are to the real training patients, code by code and
distribution by distribution (docs/method.md, section 11).

Every function takes sparse code matrices or plain arrays, so it works the same on 500 and on
100,000 patients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
import scipy.sparse as sp

from ehrgpt.evaluate.patients import Cohort
from ehrgpt.meds_format import columns as mc

KL_EPSILON = 1e-10


def wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    """Earth mover's distance between two samples of one variable (in its unit).

    >>> wasserstein(np.array([0.0, 1.0]), np.array([2.0, 3.0]))
    2.0
    >>> wasserstein(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]))
    0.0
    """
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    if not len(a) or not len(b):
        return float("nan")
    grid = np.sort(np.concatenate([a, b]))
    widths = np.diff(grid)
    cdf_a = np.searchsorted(a, grid[:-1], side="right") / len(a)
    cdf_b = np.searchsorted(b, grid[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * widths))


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs (0 to 1).

    >>> ks_statistic(np.array([1.0, 2.0, 3.0, 4.0]), np.array([3.0, 4.0, 5.0, 6.0]))
    0.5
    """
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    if not len(a) or not len(b):
        return float("nan")
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    """Total variation distance of two categorical distributions given as shares (0 to 1).

    >>> total_variation({"a": 0.5, "b": 0.5}, {"a": 1.0})
    0.5
    """
    keys = set(p) | set(q)
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation (nan when either side is constant).

    >>> round(pearson(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 7.0])), 4)
    0.9934
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def summary_quantiles(x: np.ndarray) -> dict[str, float]:
    """Median, 90th percentile and maximum of a sample (nan when empty).

    >>> summary_quantiles(np.arange(1.0, 11.0))
    {'median': 5.5, 'p90': 9.1, 'max': 10.0}
    """
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if not len(x):
        return {"median": float("nan"), "p90": float("nan"), "max": float("nan")}
    return {
        "median": float(np.median(x)),
        "p90": round(float(np.quantile(x, 0.9)), 10),
        "max": float(x.max()),
    }


def prevalence(binary: sp.csr_matrix) -> np.ndarray:
    """Share of patients (rows) that have each code (column).

    >>> prevalence(sp.csr_matrix(np.array([[1, 0], [1, 1]]))).tolist()
    [1.0, 0.5]
    """
    n = max(binary.shape[0], 1)
    return np.asarray(binary.sum(axis=0)).ravel() / n


def kl_divergence(real_counts: np.ndarray, syn_counts: np.ndarray) -> float:
    """KL(real || synthetic) over code frequencies; a code the synthetic data lacks gets
    probability 1e-10.

    >>> kl_divergence(np.array([5, 5]), np.array([5, 5]))
    0.0
    >>> round(kl_divergence(np.array([1, 1]), np.array([1, 0])), 3)
    10.82
    """
    p = np.asarray(real_counts, float)
    q = np.asarray(syn_counts, float)
    p = p / max(p.sum(), 1e-300)
    q = q / max(q.sum(), 1e-300)
    q = np.where(q > 0, q, KL_EPSILON)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def cooccurrence(binary: sp.csr_matrix, columns: np.ndarray) -> np.ndarray:
    """Share of patients having both codes, for every pair of ``columns`` (upper triangle,
    row by row).

    >>> m = sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 1]], dtype=np.float32))
    >>> cooccurrence(m, np.array([0, 1, 2])).tolist()
    [0.5, 0.5, 0.0]
    """
    sub = binary[:, columns]
    both = (sub.T @ sub).toarray() / max(binary.shape[0], 1)
    iu = np.triu_indices(len(columns), k=1)
    return both[iu]


def discriminator_auroc(
    real: sp.csr_matrix, synthetic: sp.csr_matrix, *, folds: int = 5, seed: int = 0
) -> float:
    """Cross-validated AUROC of a logistic regression telling real rows from synthetic ones
    (0.5: indistinguishable). The larger side is subsampled so both weigh the same."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rng = np.random.default_rng(seed)
    n = min(real.shape[0], synthetic.shape[0])
    if n < folds:
        return float("nan")
    r = real[rng.choice(real.shape[0], n, replace=False)]
    s = synthetic[rng.choice(synthetic.shape[0], n, replace=False)]
    x = sp.vstack([r, s]).tocsr()
    y = np.r_[np.ones(n), np.zeros(n)]
    model = LogisticRegression(solver="liblinear", max_iter=1000, C=1.0)
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, proba))


def patient_features(counts: sp.csr_matrix, people: pl.DataFrame) -> sp.csr_matrix:
    """Count features of a patient: log(1 + count) of each code, then age / 100 at the first
    visit, (first year - 1900) / 100, and log(1 + visits)."""
    logc = counts.copy()
    logc.data = np.log1p(logc.data)
    dense = np.column_stack(
        [
            people["age"].fill_null(0).to_numpy() / 100.0,
            (people["first_year"].fill_null(1900).to_numpy() - 1900) / 100.0,
            np.log1p(people["n_visits"].to_numpy()),
        ]
    ).astype(np.float32)
    return sp.hstack([logc, sp.csr_matrix(dense)]).tocsr()


@dataclass
class Distribution:
    """One variable compared: real and synthetic samples (numeric) or shares (categorical)."""

    name: str
    unit: str
    kind: str  # "numeric" or "categorical"
    real: np.ndarray | dict[str, float]
    synthetic: np.ndarray | dict[str, float]
    distance_name: str = ""
    distance: float = float("nan")
    ks: float = float("nan")


def _numeric(name: str, unit: str, real, syn) -> Distribution:
    real = np.asarray(real, float)
    syn = np.asarray(syn, float)
    real, syn = real[np.isfinite(real)], syn[np.isfinite(syn)]
    return Distribution(
        name,
        unit,
        "numeric",
        real,
        syn,
        "Wasserstein",
        wasserstein(real, syn),
        ks_statistic(real, syn),
    )


def _shares(series: pl.Series) -> dict[str, float]:
    counts = series.value_counts()
    total = max(int(counts["count"].sum()), 1)
    return {str(k): int(v) / total for k, v in counts.iter_rows()}


def distributions(real: Cohort, syn: Cohort, *, max_labs: int = 4) -> list[Distribution]:
    """The per-patient, per-visit and lab-value distributions of section 11 of docs/method.md."""
    rp, sp_ = real.people, syn.people
    out = [
        _numeric("age at first visit", "years", rp["age"].drop_nulls(), sp_["age"].drop_nulls()),
        _numeric(
            "year of first visit",
            "year",
            rp["first_year"].drop_nulls(),
            sp_["first_year"].drop_nulls(),
        ),
        _numeric("visits per patient", "visits", rp["n_visits"], sp_["n_visits"]),
        _numeric("events per patient", "events", rp["n_events"], sp_["n_events"]),
    ]
    rs, ss = _shares(real.visits["type"]), _shares(syn.visits["type"])
    out.append(
        Distribution(
            "visit types",
            "share of visits",
            "categorical",
            rs,
            ss,
            "total variation",
            total_variation(rs, ss),
        )
    )
    out.append(
        _numeric(
            "days between visits",
            "days",
            real.visits["gap_days"].drop_nulls(),
            syn.visits["gap_days"].drop_nulls(),
        )
    )
    inpatient = pl.col("type").is_in(
        [f"{mc.VISIT_PREFIX}{c}" for c in sorted(mc.INPATIENT_VISIT_CONCEPTS)]
    )
    out.append(
        _numeric(
            "inpatient length of stay",
            "days",
            real.visits.filter(inpatient)["los_days"],
            syn.visits.filter(inpatient)["los_days"],
        )
    )
    labs = (
        real.events.filter(
            pl.col("numeric_value").is_not_null() & pl.col("numeric_value").is_finite()
        )
        .group_by("code")
        .len()
        .sort(["len", "code"], descending=[True, False])
        .head(max_labs)["code"]
        .to_list()
    )
    for code in labs:
        values = [
            c.events.filter((pl.col("code") == code) & pl.col("numeric_value").is_not_null())[
                "numeric_value"
            ].to_numpy()
            for c in (real, syn)
        ]
        out.append(_numeric(f"value of {code}", "", *values))
    return out


@dataclass
class Fidelity:
    """Fidelity figures and what the report plots."""

    codes: list[str]
    real_prevalence: np.ndarray
    syn_prevalence: np.ndarray
    prevalence_pearson: float
    prevalence_r2: float
    cooccurrence_pearson: float
    real_cooccurrence: np.ndarray
    syn_cooccurrence: np.ndarray
    kl: float
    discriminator_auroc: float
    distributions: list[Distribution] = field(default_factory=list)


def fidelity(
    real: Cohort,
    syn: Cohort,
    real_counts: sp.csr_matrix,
    syn_counts: sp.csr_matrix,
    codes: list[str],
    *,
    top_pairs: int = 100,
    max_discriminator: int = 10_000,
    seed: int = 0,
) -> Fidelity:
    """All fidelity figures of synthetic patients against the real training patients.

    ``real_counts`` / ``syn_counts``: code count matrices of the two cohorts over ``codes``
    (rows in the order of each cohort's ``people``)."""
    rb = real_counts.copy()
    rb.data[:] = 1
    sb = syn_counts.copy()
    sb.data[:] = 1
    rprev, sprev = prevalence(rb), prevalence(sb)
    r = pearson(rprev, sprev)
    top = np.argsort(-rprev, kind="stable")[: min(top_pairs, len(codes))]
    top = top[rprev[top] > 0]
    rc, sc = cooccurrence(rb, top), cooccurrence(sb, top)
    kl = kl_divergence(
        np.asarray(real_counts.sum(axis=0)).ravel(), np.asarray(syn_counts.sum(axis=0)).ravel()
    )
    rng = np.random.default_rng(seed)
    n = min(real.n, syn.n, max_discriminator)
    ri = np.sort(rng.choice(real.n, n, replace=False))
    si = np.sort(rng.choice(syn.n, n, replace=False))
    auc = discriminator_auroc(
        patient_features(real_counts[ri], real.people[ri]),
        patient_features(syn_counts[si], syn.people[si]),
        seed=seed,
    )
    return Fidelity(
        codes=codes,
        real_prevalence=rprev,
        syn_prevalence=sprev,
        prevalence_pearson=r,
        prevalence_r2=r * r,
        cooccurrence_pearson=pearson(rc, sc),
        real_cooccurrence=rc,
        syn_cooccurrence=sc,
        kl=kl,
        discriminator_auroc=auc,
        distributions=distributions(real, syn),
    )

"""AUROC, AUPRC and Brier score with patient-level bootstrap intervals.

The bootstrap resamples subjects, not rows: a subject with several prediction times enters a
replicate with all of them, as often as it is drawn (rows are correlated within a subject, so
row resampling gives intervals that are too narrow). Each replicate is a vector of row weights
(how often the row's subject was drawn), and the metrics are computed with weights, all
replicates at once on scores sorted once.

>>> y = np.array([0, 0, 1, 1]); p = np.array([0.1, 0.4, 0.35, 0.8])
>>> round(auroc(y, p), 3), round(auprc(y, p), 3), round(brier(y, p), 4)
(0.75, 0.833, 0.1581)
>>> m = binary_metrics(y, p, subject_ids=np.array([1, 2, 3, 4]), n_boot=200, seed=0)
>>> m["auroc"], m["n_subjects"], m["n_positive"], len(m["auroc_ci"])
(0.75, 4, 2, 2)
"""

from __future__ import annotations

import numpy as np

#: Confidence level of the intervals.
LEVEL = 0.95


def _grouped(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by descending score, and the index of each row's group of tied scores."""
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    group = np.concatenate([[0], np.cumsum(ps[1:] != ps[:-1])])
    return order, group, ps


def _weighted(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AUPRC (average precision) for each row of weights ``w`` [R, N]."""
    y = np.asarray(y, bool)
    order, group, _ = _grouped(y, np.asarray(p, float))
    ys, ws = y[order], w[:, order]
    n_groups = int(group[-1]) + 1 if len(group) else 0
    # weighted positives and negatives per tied-score group, descending score
    pos = np.zeros((w.shape[0], n_groups))
    neg = np.zeros((w.shape[0], n_groups))
    np.add.at(pos.T, group[ys], ws[:, ys].T)
    np.add.at(neg.T, group[~ys], ws[:, ~ys].T)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    w_pos, w_neg = tp[:, -1], fp[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        # a positive beats the negatives of lower groups, ties count half
        below = w_neg[:, None] - fp
        roc = (pos * (below + 0.5 * neg)).sum(axis=1) / (w_pos * w_neg)
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        pr = (pos * precision).sum(axis=1) / w_pos
    return roc, pr


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN with one class only."""
    return float(_weighted(y, p, np.ones((1, len(y))))[0][0])


def auprc(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision (the step-wise area under the precision-recall curve)."""
    return float(_weighted(y, p, np.ones((1, len(y))))[1][0])


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared error of the probabilities."""
    return float(np.mean((np.asarray(p, float) - np.asarray(y, float)) ** 2))


def bootstrap_weights(subject_ids: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Row weights [n_boot, N]: how often each row's subject is drawn in each replicate.

    >>> w = bootstrap_weights(np.array([7, 7, 9]), 3, seed=0)
    >>> w.shape, bool((w[:, 0] == w[:, 1]).all()), w.sum(axis=1).tolist() == [w[i, 0] * 2 + w[i, 2]
    ...     for i in range(3)]
    ((3, 3), True, True)
    """
    subjects, index = np.unique(subject_ids, return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(subjects), size=(n_boot, len(subjects)))
    counts = np.zeros((n_boot, len(subjects)))
    np.add.at(counts, (np.repeat(np.arange(n_boot), len(subjects)), draws.ravel()), 1)
    return counts[:, index]


def _interval(values: np.ndarray) -> list[float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return [float("nan"), float("nan")]
    tail = (1 - LEVEL) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def binary_metrics(
    y: np.ndarray,
    p: np.ndarray,
    *,
    subject_ids: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    chunk: int = 100,
) -> dict:
    """AUROC, AUPRC, Brier and their 95% patient-level bootstrap intervals, and the counts."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    roc, pr = _weighted(y, p, np.ones((1, len(y))))
    rocs, prs, briers = [], [], []
    for start in range(0, n_boot, chunk):
        w = bootstrap_weights(subject_ids, min(chunk, n_boot - start), seed + start)
        r, a = _weighted(y, p, w)
        rocs.append(r)
        prs.append(a)
        briers.append((w * (p - y) ** 2).sum(axis=1) / w.sum(axis=1))
    return {
        "auroc": float(roc[0]),
        "auroc_ci": _interval(np.concatenate(rocs)),
        "auprc": float(pr[0]),
        "auprc_ci": _interval(np.concatenate(prs)),
        "brier": brier(y, p),
        "brier_ci": _interval(np.concatenate(briers)),
        "n_rows": len(y),
        "n_subjects": len(np.unique(subject_ids)),
        "n_positive": int(y.sum()),
        "n_boot": n_boot,
    }

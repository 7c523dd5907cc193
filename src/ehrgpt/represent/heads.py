"""Prediction heads on fixed features: logistic regression (cross-validated) and LightGBM.

Logistic regression follows the reference's probe (scikit-learn ``LogisticRegressionCV``,
scoring AUROC) with folds grouped by subject, so no subject is on both sides of a fold; dense
features are standardised, sparse counts are ``log1p``-transformed and max-abs scaled.
LightGBM uses fixed, small-data settings (EHRSHOT's count baseline is a LightGBM).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

HEADS = ("logistic", "lightgbm")
CS = np.logspace(-4, 2, 8)


def _folds(y: np.ndarray, groups: np.ndarray, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = int(min(5, np.bincount(y.astype(int), minlength=2).min()))
    if n_splits < 2:
        return None
    return list(
        StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(
            np.zeros(len(y)), y, groups
        )
    )


def fit_logistic(X, y: np.ndarray, groups: np.ndarray, seed: int = 0):
    """Scaler + logistic regression, C chosen by grouped CV on AUROC (fixed C=1 under 2 folds)."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, MaxAbsScaler, StandardScaler

    if sp.issparse(X):
        scale = [FunctionTransformer(lambda m: m.log1p(), accept_sparse=True), MaxAbsScaler()]
    else:
        scale = [StandardScaler()]
    folds = _folds(y, groups, seed)
    if folds is None:
        clf = LogisticRegression(C=1.0, tol=1e-3, max_iter=300)
    else:
        clf = LogisticRegressionCV(Cs=CS, cv=folds, scoring="roc_auc", tol=1e-3, max_iter=300)
    model = make_pipeline(*scale, clf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X, y)
    return model


def fit_lightgbm(X, y: np.ndarray, groups: np.ndarray, seed: int = 0):
    """A LightGBM classifier with small-data settings."""
    import lightgbm as lgb

    del groups
    model = lgb.LGBMClassifier(
        n_estimators=200,
        learning_rate=0.05,
        num_leaves=15,
        min_child_samples=max(1, min(20, len(y) // 10)),
        subsample=0.8,
        subsample_freq=1,
        colsample_bytree=0.8,
        random_state=seed,
        n_jobs=1,
        verbose=-1,
    )
    model.fit(X.astype(np.float32) if sp.issparse(X) else X, y)
    return model


def fit_head(head: str, X, y: np.ndarray, groups: np.ndarray, seed: int = 0):
    """Fit one of :data:`HEADS`."""
    fit = {"logistic": fit_logistic, "lightgbm": fit_lightgbm}[head]
    return fit(X, np.asarray(y, int), groups, seed)


def predict(model, X) -> np.ndarray:
    """Probability of the positive class."""
    if sp.issparse(X) and "LGBM" in type(model).__name__:
        X = X.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.predict_proba(X)[:, 1]

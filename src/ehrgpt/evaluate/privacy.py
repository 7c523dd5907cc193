"""Privacy: whether synthetic patients give away the training patients (docs/method.md,
section 11).

A patient is a vector: age at the first visit scaled to [0, 1] by the training ages, one-hot
gender and race, and a multi-hot of clinical codes. Distances are squared Euclidean.
Nearest neighbours are searched block by block (:func:`nearest`): the frequent columns are
a dense float32 block multiplied with BLAS, the rare ones a sparse product, and only a
``block x n_reference`` slice of distances ever exists, never an ``n x n`` matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp

from ehrgpt.evaluate.patients import Cohort

#: The reference's membership-inference threshold on the squared distance, and sample size.
MIA_THRESHOLD = 5.0
MIA_SAMPLE = 5_000
#: Re-identification: the matching-error adjustment lambda (Yan et al. 2022, after El Emam et
#: al. 2020), the commonly used acceptable risk, and the share of a patient's other codes a
#: matched synthetic record must hold for the attacker to "learn something new".
REID_LAMBDA = 0.23
REID_ACCEPTABLE = 0.09
REID_LEARN_SHARE = 0.5
#: Distances held in memory at once by :func:`nearest` (float32 values).
BLOCK_VALUES = 32_000_000


@dataclass
class Vectors:
    """Patients as vectors: ``head`` (dense float32, frequent columns), ``tail`` (sparse, the
    rest) and each row's squared norm."""

    head: np.ndarray
    tail: sp.csr_matrix
    sqnorm: np.ndarray

    @classmethod
    def split(cls, x: sp.csr_matrix, head_columns: np.ndarray) -> Vectors:
        """Cut ``x`` into a dense head (``head_columns``) and a sparse tail (the others)."""
        x = sp.csr_matrix(x, dtype=np.float32)
        mask = np.zeros(x.shape[1], bool)
        mask[head_columns] = True
        head = x[:, np.flatnonzero(mask)].toarray()
        tail = x[:, np.flatnonzero(~mask)].tocsr()
        sq = np.asarray(x.multiply(x).sum(axis=1), dtype=np.float64).ravel()
        return cls(np.ascontiguousarray(head), tail, sq)

    def __len__(self) -> int:
        return self.head.shape[0]

    def rows(self, idx: np.ndarray) -> Vectors:
        return Vectors(self.head[idx], self.tail[idx], self.sqnorm[idx])


def nearest(
    queries: Vectors, refs: Vectors, *, exclude_self: bool = False, block: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Squared distance from each query to its nearest reference, and that reference's row.

    ``exclude_self``: queries and refs are the same rows; a row is not its own neighbour.

    >>> x = sp.csr_matrix(np.array([[0, 0], [1, 0], [5, 5]], dtype=np.float32))
    >>> v = Vectors.split(x, np.array([0]))
    >>> d, i = nearest(v, v, exclude_self=True)
    >>> d.tolist(), i.tolist()
    ([1.0, 1.0, 41.0], [1, 0, 1])
    """
    n_ref = len(refs)
    block = block or max(1, min(4096, BLOCK_VALUES // max(n_ref, 1)))
    best = np.full(len(queries), np.inf, np.float64)
    arg = np.zeros(len(queries), np.int64)
    if n_ref == 0:
        return best, arg
    ref_head_t = np.ascontiguousarray(refs.head.T)
    ref_tail_t = refs.tail.T.tocsr() if refs.tail.nnz else None
    for start in range(0, len(queries), block):
        stop = min(start + block, len(queries))
        gram = queries.head[start:stop] @ ref_head_t
        if ref_tail_t is not None:
            qt = queries.tail[start:stop]
            if qt.nnz:
                gram += (qt @ ref_tail_t).toarray()
        dist = gram
        dist *= -2.0
        dist += queries.sqnorm[start:stop, None].astype(np.float32)
        dist += refs.sqnorm[None, :].astype(np.float32)
        if exclude_self:
            rows = np.arange(stop - start)
            dist[rows, start + rows] = np.inf
        idx = np.argmin(dist, axis=1)
        arg[start:stop] = idx
        best[start:stop] = np.maximum(dist[np.arange(stop - start), idx], 0.0)
    return best, arg


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC of ``scores`` for binary ``labels`` (ties count one half); nan with one class.

    >>> roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.75
    """
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = np.asarray(scores)[order]
    ranks = np.empty(len(s), float)
    # average ranks over ties
    _, first, counts = np.unique(s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def f1(tp: float, fp: float, fn: float) -> float:
    """F1 from counts (0 when nothing was predicted or true).

    >>> f1(2, 1, 1)
    0.6666666666666666
    """
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


# -- vectors --------------------------------------------------------------------------------


@dataclass
class VectorSpace:
    """How people become vectors: the age scale and the gender, race and code columns."""

    age_min: float
    age_max: float
    genders: list[str]
    races: list[str]
    n_codes: int

    @classmethod
    def fit(cls, train: Cohort, others: list[Cohort], n_codes: int) -> VectorSpace:
        ages = train.people["age"].drop_nulls()
        people = [train.people, *[c.people for c in others]]
        return cls(
            float(ages.min()) if len(ages) else 0.0,
            float(ages.max()) if len(ages) else 1.0,
            sorted(set().union(*[set(p["gender"].to_list()) for p in people])),
            sorted(set().union(*[set(p["race"].to_list()) for p in people])),
            n_codes,
        )

    @property
    def n_demographic(self) -> int:
        return 1 + len(self.genders) + len(self.races)

    def demographics(self, people: pl.DataFrame) -> sp.csr_matrix:
        """Scaled age, one-hot gender, one-hot race."""
        n = people.height
        span = max(self.age_max - self.age_min, 1.0)
        age = (people["age"].fill_null(self.age_min).to_numpy() - self.age_min) / span
        g = {v: i for i, v in enumerate(self.genders)}
        r = {v: i for i, v in enumerate(self.races)}
        gi = np.array([1 + g[v] for v in people["gender"].to_list()], np.int64)
        ri = np.array([1 + len(g) + r[v] for v in people["race"].to_list()], np.int64)
        rows = np.r_[np.arange(n), np.arange(n), np.arange(n)]
        cols = np.r_[np.zeros(n, np.int64), gi, ri]
        data = np.r_[age, np.ones(2 * n)].astype(np.float32)
        return sp.csr_matrix((data, (rows, cols)), shape=(n, self.n_demographic))

    def vectors(self, people: pl.DataFrame, binary_codes: sp.csr_matrix) -> sp.csr_matrix:
        return sp.hstack([self.demographics(people), binary_codes]).tocsr()

    def head_columns(self, code_prevalence: np.ndarray, max_head: int = 512) -> np.ndarray:
        """Demographic columns plus the most prevalent code columns (dense in the search)."""
        k = min(max_head, len(code_prevalence))
        top = np.argsort(-code_prevalence, kind="stable")[:k]
        return np.r_[np.arange(self.n_demographic), self.n_demographic + np.sort(top)]


# -- attacks --------------------------------------------------------------------------------


@dataclass
class Membership:
    auc: float
    threshold_accuracy: float
    threshold_f1: float
    member_distance: np.ndarray
    nonmember_distance: np.ndarray


def membership_inference(d_train: np.ndarray, d_held: np.ndarray, *, seed: int = 0) -> Membership:
    """Members (train) against non-members (held_out) by distance to the closest synthetic
    record: the AUC of ``-distance`` as a membership score (0.5 = no leak), and the
    reference's attack (member when the squared distance is under 5) over at most
    5,000 + 5,000 records.

    >>> m = membership_inference(np.array([0.0, 0.0, 1.0]), np.array([9.0, 9.0, 1.0]))
    >>> round(m.auc, 3), m.threshold_accuracy
    (0.944, 0.8333333333333334)
    """
    scores = -np.r_[d_train, d_held]
    labels = np.r_[np.ones(len(d_train)), np.zeros(len(d_held))]
    rng = np.random.default_rng(seed)
    a = d_train[rng.permutation(len(d_train))[:MIA_SAMPLE]]
    b = d_held[rng.permutation(len(d_held))[:MIA_SAMPLE]]
    tp, fn = float((a < MIA_THRESHOLD).sum()), float((a >= MIA_THRESHOLD).sum())
    fp, tn = float((b < MIA_THRESHOLD).sum()), float((b >= MIA_THRESHOLD).sum())
    total = max(tp + fn + fp + tn, 1)
    return Membership(roc_auc(scores, labels), (tp + tn) / total, f1(tp, fp, fn), d_train, d_held)


def adversarial_accuracy(real: Vectors, syn: Vectors, d_rs: np.ndarray | None = None) -> float:
    """Nearest-neighbour adversarial accuracy of Yale et al.: the share of real records whose
    nearest synthetic record is farther than their nearest other real record, averaged with
    the same share for synthetic records (0.5 = synthetic and real are interchangeable)."""
    if d_rs is None:
        d_rs, _ = nearest(real, syn)
    d_rr, _ = nearest(real, real, exclude_self=True)
    d_sr, _ = nearest(syn, real)
    d_ss, _ = nearest(syn, syn, exclude_self=True)
    return 0.5 * (float(np.mean(d_rs > d_rr)) + float(np.mean(d_sr > d_ss)))


def nnaa_privacy_loss(
    train: Vectors, held: Vectors, syn: Vectors, *, max_n: int = 20_000, seed: int = 0
) -> tuple[float, float, float]:
    """``AA(held_out) - AA(train)`` on equal-size samples (near 0 is ideal; positive when
    synthetic records sit closer to training patients than to unseen ones). Returns the loss,
    AA(train) and AA(held_out)."""
    rng = np.random.default_rng(seed)
    n = min(len(train), len(held), len(syn), max_n)
    if n < 2:
        return float("nan"), float("nan"), float("nan")
    s = syn.rows(np.sort(rng.choice(len(syn), n, replace=False)))
    t = train.rows(np.sort(rng.choice(len(train), n, replace=False)))
    h = held.rows(np.sort(rng.choice(len(held), n, replace=False)))
    aa_train, aa_held = adversarial_accuracy(t, s), adversarial_accuracy(h, s)
    return aa_held - aa_train, aa_train, aa_held


def attribute_inference(
    targets: sp.csr_matrix, database: sp.csr_matrix, known: np.ndarray
) -> float:
    """Micro F1 of an attacker who knows the ``known`` columns of each target (age, gender,
    race, common codes), finds the nearest record of ``database`` on them, and guesses the
    target's other codes as that record's."""
    unknown = np.setdiff1d(np.arange(targets.shape[1]), known)
    q = Vectors.split(targets[:, known], np.arange(len(known)))
    r = Vectors.split(database[:, known], np.arange(len(known)))
    _, idx = nearest(q, r)
    truth = targets[:, unknown]
    guess = database[idx][:, unknown]
    tp = float(truth.multiply(guess).sum())
    return f1(tp, float(guess.sum()) - tp, float(truth.sum()) - tp)


def reidentification_risk(
    train_keys: np.ndarray,
    population_keys: np.ndarray,
    syn_keys: np.ndarray,
    learned_share: np.ndarray,
) -> float:
    """Meaningful identity disclosure risk over quasi-identifier keys (El Emam et al. 2020, as
    used by Yan et al. 2022): ``lambda * max(A, B)`` with
    ``A = 1/N sum_s I_s R_s / F_s`` and ``B = 1/n sum_s I_s R_s / f_s`` over the n training
    patients s; f_s and F_s the sizes of s's quasi-identifier class among training patients
    and in the real population (N patients), I_s = 1 when a synthetic patient has the same
    quasi-identifiers, R_s = 1 when that synthetic patient holds at least half of s's other
    codes (``learned_share``, computed by the caller for the matched record).

    >>> keys = np.array([1, 2, 3, 3])
    >>> round(reidentification_risk(keys, keys, np.array([1, 3]), np.ones(4)), 4)
    0.115
    """
    if not len(train_keys):
        return float("nan")
    _, inv_t, counts_t = np.unique(train_keys, return_inverse=True, return_counts=True)
    f = counts_t[inv_t]
    uniq_p, counts_p = np.unique(population_keys, return_counts=True)
    pos = np.searchsorted(uniq_p, train_keys)
    pos = np.clip(pos, 0, len(uniq_p) - 1)
    big_f = np.where(uniq_p[pos] == train_keys, counts_p[pos], f)
    matched = np.isin(train_keys, syn_keys)
    learned = np.asarray(learned_share) >= REID_LEARN_SHARE
    hit = (matched & learned).astype(float)
    a = float(np.sum(hit / big_f)) / max(len(population_keys), 1)
    b = float(np.sum(hit / f)) / len(train_keys)
    return REID_LAMBDA * max(a, b)


def quasi_identifier_keys(people: pl.DataFrame, common: sp.csr_matrix) -> np.ndarray:
    """One integer per patient for (5-year age band, gender, race, which of the common codes
    they have); equal keys = indistinguishable on the quasi-identifiers.

    >>> p = pl.DataFrame({"age": [41, 44, 46], "gender": ["F", "F", "F"], "race": ["A"] * 3})
    >>> k = quasi_identifier_keys(p, sp.csr_matrix(np.zeros((3, 2))))
    >>> bool(k[0] == k[1]), bool(k[1] == k[2])
    (True, False)
    """
    bits = np.zeros(people.height, np.uint64)
    c = common.tocoo()
    np.bitwise_or.at(bits, c.row, (np.uint64(1) << c.col.astype(np.uint64)))
    frame = pl.DataFrame(
        {
            "band": (people["age"].fill_null(-5) // 5).to_numpy(),
            "gender": people["gender"],
            "race": people["race"],
            "bits": bits,
        }
    )
    return frame.hash_rows(seed=0).to_numpy()


def exact_copy_rate(train_hashes: pl.Series, syn_hashes: pl.Series) -> float:
    """Share of synthetic patients (with at least one clinical code) whose ordered code
    sequence equals a training patient's.

    >>> exact_copy_rate(pl.Series([1, 2, None]), pl.Series([2, 3, None]))
    0.5
    """
    syn = syn_hashes.drop_nulls()
    if not len(syn):
        return float("nan")
    return float(syn.is_in(train_hashes.drop_nulls().implode()).mean())

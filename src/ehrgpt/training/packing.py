"""Sample packing: samples concatenated into rows of a fixed token budget (docs/method.md
section 6).

Each row holds whole samples only; ``position_ids`` restart at 0 and ``segment_ids`` count
1, 2, ... per sample (0 = padding), so the model's attention can be block-diagonal and no
sample sees another. An epoch's rows and their order depend only on (seed, epoch).

>>> rows = pack_rows([5, 3, 4, 2, 6], budget=8, rng=None)
>>> rows, [sum([5, 3, 4, 2, 6][i] for i in r) for r in rows]
([[0, 1], [2, 3], [4]], [8, 6, 6])
>>> row = collate_row([np.array([7, 8, 9]), np.array([5, 6])], length=6)
>>> row["input_ids"].tolist(), row["position_ids"].tolist(), row["segment_ids"].tolist()
([7, 8, 9, 5, 6, 0], [0, 1, 2, 0, 1, 0], [1, 1, 1, 2, 2, 0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

#: Per-position target fill value where a position has no target (padding included).
IGNORE_INDEX = -100


def pack_rows(
    lengths: Sequence[int],
    budget: int,
    rng: np.random.Generator | None,
    *,
    max_open: int = 64,
) -> list[list[int]]:
    """Group sample indices into rows whose lengths sum to at most ``budget``.

    Samples are taken in a random order (``rng``; ``None`` keeps the given order) and put in
    the first open row with room (first fit over at most ``max_open`` open rows, so the cost
    stays linear); when too many rows are open the fullest is closed. The rows come back in
    a random order too.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > budget:
        raise ValueError(f"a sample of {lengths.max()} tokens exceeds the row budget {budget}")
    order = rng.permutation(len(lengths)) if rng is not None else np.arange(len(lengths))
    closed: list[list[int]] = []
    open_rows: list[list[int]] = []
    room: list[int] = []
    for i in order.tolist():
        n = int(lengths[i])
        for k, r in enumerate(room):
            if r >= n:
                open_rows[k].append(i)
                room[k] -= n
                if room[k] == 0:
                    closed.append(open_rows.pop(k))
                    room.pop(k)
                break
        else:
            open_rows.append([i])
            room.append(budget - n)
            if len(open_rows) > max_open:
                k = int(np.argmin(room))
                closed.append(open_rows.pop(k))
                room.pop(k)
    rows = closed + open_rows
    if rng is not None:
        rows = [rows[k] for k in rng.permutation(len(rows))]
    return rows


def batch_rows(rows: list[list[int]], rows_per_batch: int) -> list[list[list[int]]]:
    """Consecutive rows grouped into batches (the last batch may be smaller)."""
    return [rows[i : i + rows_per_batch] for i in range(0, len(rows), rows_per_batch)]


def collate_row(
    samples: Sequence[np.ndarray],
    length: int,
    targets: Sequence[dict[str, np.ndarray]] | None = None,
    fills: dict[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """One packed row of ``length`` positions: ids, positions, segments and per-sample targets.

    ``targets`` (one dict per sample, arrays as long as the sample) are concatenated and padded
    with ``fills[key]`` (``-100`` for integer targets, NaN for float ones by default).
    """
    ids = np.zeros(length, np.int64)
    pos = np.zeros(length, np.int64)
    seg = np.zeros(length, np.int64)
    out_t: dict[str, np.ndarray] = {}
    if targets:
        for key, arr in targets[0].items():
            arr = np.asarray(arr)
            fill = (fills or {}).get(
                key, np.nan if np.issubdtype(arr.dtype, np.floating) else IGNORE_INDEX
            )
            dtype = np.float32 if np.issubdtype(arr.dtype, np.floating) else np.int64
            out_t[key] = np.full(length, fill, dtype)
    at = 0
    for k, sample in enumerate(samples):
        n = len(sample)
        ids[at : at + n] = sample
        pos[at : at + n] = np.arange(n)
        seg[at : at + n] = k + 1
        if targets:
            for key, arr in targets[k].items():
                out_t[key][at : at + n] = np.asarray(arr)
        at += n
    if at > length:
        raise ValueError(f"row of {at} tokens does not fit length {length}")
    return {"input_ids": ids, "position_ids": pos, "segment_ids": seg, **out_t}


def collate_batch(
    rows: Sequence[Sequence[np.ndarray]],
    make_targets: Callable[[np.ndarray], dict] | None = None,
    *,
    pad_to_multiple: int = 8,
    length: int | None = None,
) -> dict[str, np.ndarray]:
    """Rows of samples -> arrays of shape (rows, length), padded to the longest row.

    ``make_targets(sample_ids)`` gives a sample's per-position targets (labels, time parts,
    ...), computed per sample so that no target crosses from one sample into the next.
    """
    if length is None:
        longest = max((sum(len(s) for s in row) for row in rows), default=1)
        length = -(-longest // pad_to_multiple) * pad_to_multiple
    out_rows = []
    for row in rows:
        targets = [_as_numpy(make_targets(s)) for s in row] if make_targets else None
        out_rows.append(collate_row(row, length, targets))
    return {key: np.stack([r[key] for r in out_rows]) for key in out_rows[0]}


def _as_numpy(targets: dict) -> dict[str, np.ndarray]:
    out = {}
    for key, value in targets.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        out[key] = np.asarray(value)
    return out

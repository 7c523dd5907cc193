"""Patient embeddings: one vector per history, from the pretrained decoder's last hidden layer.

Two poolings, both over tokens that pretraining saw (no appended ``[LINEAR_PROB]`` token, whose
embedding the reference never trains, docs/method.md section 10):

- ``last``: the hidden state of the history's last token (it has attended to all of it);
- ``mean``: the mean hidden state over the history's tokens.

Histories are sorted by length and packed into batches under a token budget (rows x longest
row), padded on the right. Right padding needs no mask: causal attention keeps every real
token from seeing the padding after it, so the fused ``is_causal`` kernel runs. No key/value
cache, no heads (only the decoder runs), ``torch.inference_mode``, bf16 autocast on CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

POOLINGS = ("last", "mean")


def length_batches(lengths: np.ndarray, token_budget: int) -> list[np.ndarray]:
    """Indices of batches, longest histories first, each with rows x longest <= token_budget.

    >>> [b.tolist() for b in length_batches(np.array([5, 90, 10, 60, 7]), token_budget=120)]
    [[1], [3, 2], [4, 0]]
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, current, longest = [], [], 0
    for i in order:
        n = int(lengths[i])
        width = max(longest, n)
        if current and width * (len(current) + 1) > token_budget:
            batches.append(np.array(current))
            current, width = [], n
        current.append(int(i))
        longest = width
    if current:
        batches.append(np.array(current))
    return batches


def pool(hidden: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """Last-token and mean pooling of right-padded hidden states [B, T, H].

    >>> h = torch.arange(12.0).reshape(2, 3, 2)
    >>> out = pool(h, torch.tensor([3, 1]))
    >>> out["last"].tolist(), out["mean"].tolist()
    ([[4.0, 5.0], [6.0, 7.0]], [[2.0, 3.0], [6.0, 7.0]])
    """
    b, t, _ = hidden.shape
    rows = torch.arange(b, device=hidden.device)
    last = hidden[rows, lengths - 1]
    keep = (torch.arange(t, device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)
    mean = (hidden * keep[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)
    return {"last": last, "mean": mean}


@torch.inference_mode()
def embed_ids(
    model,
    input_ids: Sequence[np.ndarray],
    *,
    token_budget: int = 16384,
    device: torch.device | str | None = None,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Embeddings (float32 [N, hidden] per pooling) of token-id arrays, in input order."""
    device = torch.device(device or next(model.parameters()).device)
    model.eval()
    decoder = model.model if hasattr(model, "model") else model
    lengths = np.array([len(x) for x in input_ids])
    hidden = model.config.hidden_size
    out = {p: np.zeros((len(lengths), hidden), np.float32) for p in POOLINGS}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for batch in length_batches(lengths, token_budget):
        width = int(lengths[batch].max())
        ids = np.full((len(batch), width), pad_id, np.int64)
        for row, i in enumerate(batch):
            ids[row, : lengths[i]] = input_ids[i]
        x = torch.from_numpy(ids).to(device)
        n = torch.from_numpy(lengths[batch]).to(device)
        with autocast:
            h = decoder(x, segment_ids=torch.ones_like(x)).last_hidden_state
        for name, value in pool(h.float(), n).items():
            out[name][batch] = value.cpu().numpy()
    return out

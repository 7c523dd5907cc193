"""Fine-tuning: the pretrained decoder and a classification head, trained end to end.

The head reads the last token's hidden state (the same pooling as the ``last`` embedding).
AdamW, a larger learning rate for the new head than for the pretrained body, batches of
histories of similar length under a token budget, binary cross-entropy; after each epoch the
tuning AUROC is measured and the best epoch's weights are kept (early stopping with patience).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ehrgpt.represent.embed import length_batches
from ehrgpt.represent.metrics import auroc
from ehrgpt.util.progress import track


class Classifier(nn.Module):
    """Decoder + linear head on the last token."""

    def __init__(self, causal_lm) -> None:
        super().__init__()
        self.decoder = causal_lm.model
        self.head = nn.Linear(causal_lm.config.hidden_size, 1)
        self.head.weight.data.normal_(0, 0.02)
        self.head.bias.data.zero_()

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.decoder(ids, segment_ids=torch.ones_like(ids)).last_hidden_state
        last = h[torch.arange(ids.shape[0], device=ids.device), lengths - 1]
        return self.head(last).squeeze(-1)


@dataclass
class FinetuneConfig:
    """Settings of :func:`finetune_classifier`."""

    max_epochs: int = 4
    patience: int = 1
    lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    token_budget: int = 8192
    seed: int = 0


@dataclass
class FinetuneLog:
    """Per-epoch training loss and tuning AUROC, and the epoch kept."""

    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = -1


def _batch(ids: Sequence[np.ndarray], idx: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = np.array([len(ids[i]) for i in idx])
    x = np.zeros((len(idx), int(lengths.max())), np.int64)
    for row, i in enumerate(idx):
        x[row, : lengths[row]] = ids[i]
    return torch.from_numpy(x).to(device), torch.from_numpy(lengths).to(device)


@torch.inference_mode()
def predict_proba(
    clf: Classifier, ids: Sequence[np.ndarray], token_budget: int = 16384
) -> np.ndarray:
    """Probabilities for token-id arrays, in input order."""
    clf.eval()
    device = next(clf.parameters()).device
    out = np.zeros(len(ids), np.float32)
    lengths = np.array([len(x) for x in ids])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for idx in length_batches(lengths, token_budget):
        x, n = _batch(ids, idx, device)
        with autocast:
            out[idx] = torch.sigmoid(clf(x, n).float()).cpu().numpy()
    return out


def finetune_classifier(
    causal_lm,
    train_ids: Sequence[np.ndarray],
    y_train: np.ndarray,
    tune_ids: Sequence[np.ndarray],
    y_tune: np.ndarray,
    config: FinetuneConfig | None = None,
    progress: bool = False,
) -> tuple[Classifier, FinetuneLog]:
    """Train decoder + head on the training histories; keep the epoch best on tuning AUROC."""
    config = config or FinetuneConfig()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    clf = Classifier(causal_lm)
    device = next(clf.parameters()).device
    opt = torch.optim.AdamW(
        [
            {"params": clf.decoder.parameters(), "lr": config.lr},
            {"params": clf.head.parameters(), "lr": config.head_lr},
        ],
        weight_decay=config.weight_decay,
    )
    lengths = np.array([len(x) for x in train_ids])
    y_t = torch.tensor(np.asarray(y_train, np.float32), device=device)
    log, best_score, best_state, waited = FinetuneLog(), -np.inf, None, 0
    for epoch in range(config.max_epochs):
        clf.train()
        batches = length_batches(lengths, config.token_budget)
        total = 0.0
        order = rng.permutation(len(batches))
        sizes = [len(batches[b]) for b in order]
        for b in track(
            order,
            len(order),
            f"finetune epoch {epoch + 1}",
            unit="histories",
            weight=sizes,
            enabled=progress,
        ):
            idx = batches[b]
            x, n = _batch(train_ids, idx, device)
            loss = nn.functional.binary_cross_entropy_with_logits(clf(x, n), y_t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clf.parameters(), 1.0)
            opt.step()
            total += float(loss.detach()) * len(idx)
        score = auroc(np.asarray(y_tune), predict_proba(clf, tune_ids))
        log.epochs.append(
            {"epoch": epoch, "train_loss": total / len(lengths), "tuning_auroc": score}
        )
        if score > best_score:
            best_score, best_state, waited = score, copy.deepcopy(clf.state_dict()), 0
            log.best_epoch = epoch
        else:
            waited += 1
            if waited > config.patience:
                break
    if best_state is not None:
        clf.load_state_dict(best_state)
    return clf, log

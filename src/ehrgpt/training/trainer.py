"""The training loop: packed batches, AdamW, warmup + cosine, validation, checkpoints, resume.

One optimizer step uses ``grad_accum`` batches on each rank (``rows_per_batch`` packed rows of
``tokens_per_row`` tokens each). Its loss is the model's own total over all of them: each term
is summed over every target position of the step and divided by the step's count of its
targets (counted before the forwards, added over ranks), so the gradient does not depend on
how the step is split into micro-batches and ranks; the weights of the terms are the model
config's, applied by the model (``total_loss``) only. The loop

- clips gradients at ``grad_clip``, uses bf16 autocast on CUDA devices that support it (fp32
  otherwise), warms the learning rate up linearly over ``warmup_ratio`` of the planned steps,
  then decays it (cosine or linear) to ``min_lr_ratio`` of the peak;
- logs every step to ``MODEL_DIR/metrics.jsonl`` (each loss term on its own, lr, grad norm,
  tokens/s, the global batch indices used) and, every ``eval_every`` steps, the validation
  loss and perplexity on the tuning split; the best model so far is written to ``MODEL_DIR``
  in Hugging Face layout; training stops early after ``patience`` evaluations without
  improvement;
- writes a checkpoint every ``checkpoint_every`` steps to ``MODEL_DIR/checkpoints/step-NNNNNN``
  (model, optimizer, scheduler, RNG states of every rank, the data position, metrics so far),
  atomically (a temporary folder renamed), keeping the last ``keep_checkpoints``.

The data position is (epoch, index of the next batch in the epoch's order); that order depends
only on (seed, epoch), so a resumed run sees exactly the batches the interrupted run had not
trained on yet.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ehrgpt.errors import EhrgptError
from ehrgpt.model.modeling import LOSS_TERMS, TIME_PARTS, count_targets
from ehrgpt.training import distributed as D
from ehrgpt.training.data import Piece, Records, materialize, plan_counts, plan_epoch
from ehrgpt.training.packing import IGNORE_INDEX, batch_rows, collate_batch, pack_rows
from ehrgpt.util import atomic
from ehrgpt.util.atomic import fsync_dir
from ehrgpt.util.progress import Bar
from ehrgpt.util.seeding import seed_everything

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
DATA_LOG = "data_log.jsonl"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainConfig:
    """Settings of the optimisation and of the data stream (not of the model's shape)."""

    tokens_per_row: int = 2048
    rows_per_batch: int = 1
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.01
    schedule: str = "cosine"
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    epochs: int = 10
    eval_every: int = 50
    max_val_batches: int | None = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    patience: int = 5
    window_prob: float = 0.5
    device: str = "auto"
    precision: str = "auto"
    log_data: bool = False
    debug_step_sleep: float = 0.0

    def check(self) -> None:
        if self.schedule not in ("cosine", "linear"):
            raise EhrgptError(f"schedule must be 'cosine' or 'linear', not {self.schedule!r}.")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise EhrgptError(f"precision must be auto, fp32 or bf16, not {self.precision!r}.")
        for name in ("tokens_per_row", "rows_per_batch", "grad_accum", "epochs"):
            if getattr(self, name) < 1:
                raise EhrgptError(f"{name} must be at least 1, not {getattr(self, name)}.")
        for name in ("eval_every", "checkpoint_every", "keep_checkpoints", "patience"):
            if getattr(self, name) < 1:
                raise EhrgptError(f"{name} must be at least 1, not {getattr(self, name)}.")


#: Settings that fix the data stream: a resumed run must use the same values.
DATA_KEYS = ("tokens_per_row", "rows_per_batch", "grad_accum", "window_prob")


def train_fields() -> set[str]:
    return {f.name for f in fields(TrainConfig)}


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint as ``trainer_state.json``."""

    step: int = 0
    epoch: int = 0
    next_batch: int = 0
    planned_steps: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    best_val_loss: float = math.inf
    best_val_ppl: float = math.inf
    best_step: int = -1
    evals_without_improvement: int = 0
    last_val: dict[str, Any] | None = None
    done: bool = False
    stop_reason: str = ""
    world_size: int = 1
    seed: int = 0
    data: dict[str, Any] = field(default_factory=dict)


# -- the epoch's data ---------------------------------------------------------------------


class EpochPlan:
    """The samples, packed rows and batch order of one epoch (a function of seed and epoch)."""

    def __init__(
        self,
        records: Records,
        tok,
        context: int,
        cfg: TrainConfig,
        seed: int,
        epoch: int,
        *,
        shuffle: bool = True,
    ) -> None:
        rng = np.random.default_rng([seed, epoch])
        self.records, self.tok, self.epoch = records, tok, epoch
        self.pieces: list[Piece] = plan_epoch(
            records, context, tok, rng, window_prob=cfg.window_prob
        )
        rows = pack_rows(
            [p.length for p in self.pieces], cfg.tokens_per_row, rng if shuffle else None
        )
        self.batches = batch_rows(rows, cfg.rows_per_batch)
        self.counts = plan_counts(self.pieces)

    def __len__(self) -> int:
        return len(self.batches)

    def samples(self, index: int) -> list[list[np.ndarray]]:
        return [
            [materialize(self.records[self.pieces[i].record], self.pieces[i], self.tok) for i in r]
            for r in self.batches[index]
        ]

    def subjects(self, index: int) -> list[int]:
        return [
            int(self.records.subject_ids[self.pieces[i].record])
            for r in self.batches[index]
            for i in r
        ]


def lr_lambda(total: int, warmup_ratio: float, schedule: str, min_ratio: float) -> Callable:
    """Multiplier of the peak learning rate at each step (linear warmup, then decay).

    >>> f = lr_lambda(100, 0.1, "cosine", 0.1)
    >>> [round(f(s), 3) for s in (0, 9, 10, 55, 100)]
    [0.1, 1.0, 1.0, 0.55, 0.1]
    """
    warmup = max(1, math.ceil(warmup_ratio * total))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return min_ratio + (1 - min_ratio) * (1 - progress)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (no decay on norms, biases, scalars)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2)}
    if fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def unigram_perplexity(train_counts: np.ndarray, eval_labels: np.ndarray) -> float:
    """Perplexity of a unigram model (add-one smoothing) fitted on ``train_counts``.

    >>> round(unigram_perplexity(np.array([3, 1]), np.array([0, 0, 1])), 3)
    1.89
    """
    probs = (train_counts + 1.0) / (train_counts.sum() + len(train_counts))
    return float(np.exp(-np.log(probs[eval_labels]).mean()))


# -- the trainer --------------------------------------------------------------------------


class Trainer:
    """Runs training on one rank; rank 0 writes every file."""

    def __init__(
        self,
        model: torch.nn.Module,
        tok,
        train_records: Records,
        val_records: Records,
        cfg: TrainConfig,
        out: Path,
        *,
        make_targets: Callable[[np.ndarray, Any], dict],
        dist: D.DistInfo,
        seed: int,
        max_steps: int | None,
        progress: bool = True,
        on_best: Callable[[torch.nn.Module, TrainState], None] | None = None,
        init_state: TrainState | None = None,
        checkpoint: Path | None = None,
    ) -> None:
        self.cfg, self.tok, self.out, self.dist, self.seed = cfg, tok, Path(out), dist, seed
        self.records, self.val_records = train_records, val_records
        self.context = int(model.config.max_position_embeddings)
        if cfg.tokens_per_row < self.context:
            raise EhrgptError(
                f"tokens_per_row ({cfg.tokens_per_row}) must be at least the model context "
                f"({self.context})."
            )
        self.make_targets = lambda ids: make_targets(ids, tok)
        self.raw = model.to(dist.device)
        self.model = D.wrap_ddp(self.raw, dist)
        self.progress_enabled = progress and dist.is_main
        self.on_best = on_best
        cuda = dist.device.type == "cuda"
        use_bf16 = cfg.precision == "bf16" or (
            cfg.precision == "auto" and cuda and torch.cuda.is_bf16_supported()
        )
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.optimizer = make_optimizer(self.raw, cfg, fused=cuda)
        self.state = init_state or TrainState(seed=seed, world_size=dist.world_size)
        self.per_step = cfg.grad_accum * dist.world_size
        self._zero = torch.zeros((), dtype=torch.long, device=dist.device)
        first = self._plan(0)  # epoch 0 fixes steps per epoch and the unigram baseline
        self.steps_per_epoch = len(first) // self.per_step
        if self.steps_per_epoch < 1:
            raise EhrgptError(
                f"The training split makes {len(first)} batches, fewer than one optimizer step "
                f"needs ({cfg.grad_accum} accumulation x {dist.world_size} ranks); lower "
                "tokens_per_row, rows_per_batch or grad_accum."
            )
        if not self.state.done or max_steps is not None:
            planned = max_steps if max_steps is not None else cfg.epochs * self.steps_per_epoch
            if self.state.done and self.state.stop_reason != "early stopping":
                self.state.done = planned <= self.state.step
            self.state.planned_steps = planned
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_lambda(self.state.planned_steps, cfg.warmup_ratio, cfg.schedule, cfg.min_lr_ratio),
        )
        self._epoch_cache = first
        self._val = self._val_batches()
        self.unigram_ppl = self._unigram(first)
        self.state.data = {
            **self.state.data,
            "train_records": len(train_records),
            "train_records_dropped_short": train_records.dropped_short,
            "train_tokens": train_records.n_tokens,
            "val_records": len(val_records),
            "val_records_dropped_short": val_records.dropped_short,
            "val_label_tokens": int(self._val_n_labels),
            "samples_epoch0": first.counts,
            "batches_per_epoch": len(first),
            "steps_per_epoch": self.steps_per_epoch,
            "unigram_val_ppl": self.unigram_ppl,
        }
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)

    # -- data -------------------------------------------------------------------------
    def _plan(self, epoch: int) -> EpochPlan:
        cached = getattr(self, "_epoch_cache", None)
        if cached is not None and cached.epoch == epoch:
            return cached
        plan = EpochPlan(self.records, self.tok, self.context, self.cfg, self.seed, epoch)
        self._epoch_cache = plan
        return plan

    def _tensors(self, rows: list[list[np.ndarray]]) -> dict[str, torch.Tensor]:
        arrays = collate_batch(rows, self.make_targets)
        return {
            k: torch.from_numpy(v).to(self.dist.device, non_blocking=True)
            for k, v in arrays.items()
        }

    def _val_batches(self) -> list[dict[str, torch.Tensor]]:
        plan = EpochPlan(
            self.val_records, self.tok, self.context, self.cfg, self.seed, 10**6, shuffle=False
        )
        indices = list(range(len(plan)))
        if self.cfg.max_val_batches is not None:
            indices = indices[: self.cfg.max_val_batches]
        labels = []
        mine = []
        for k in indices:
            batch = self._tensors(plan.samples(k))
            lab = batch["labels"].cpu().numpy()
            labels.append(lab[lab != IGNORE_INDEX])
            if k % self.dist.world_size == self.dist.rank:
                mine.append(batch)
        self._val_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self._val_n_labels = len(self._val_labels)
        return mine

    def _unigram(self, plan: EpochPlan) -> float:
        counts = np.zeros(len(self.tok), np.int64)
        for p in plan.pieces:
            ids = materialize(self.records[p.record], p, self.tok)
            counts += np.bincount(ids[1:], minlength=len(counts))[: len(counts)]
        if not len(self._val_labels):
            return math.nan
        return unigram_perplexity(counts, self._val_labels)

    # -- one step ---------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.autocast_dtype)

    def _train_step(self, plan: EpochPlan, batch_ids: list[int]) -> tuple[dict, int]:
        """One optimizer step over this rank's micro-batches ``batch_ids``.

        The step's loss is the model's total over every target of the step, on all ranks:
        each term's sum divided by the step's count of its targets (:func:`count_targets`
        on every micro-batch, added over ranks, before any forward). Each micro-batch
        backpropagates its share, ``model.total_loss(its sums, the step's counts)``, times the
        number of ranks (DDP averages gradients over ranks), so the gradients add up to the
        gradient of the step's loss however the step is split (docs/method.md, losses).
        """
        self.model.train()
        batches = [self._tensors(plan.samples(b)) for b in batch_ids]
        counts = self._step_counts(batches)
        sums: dict[str, torch.Tensor] = {}
        for a, batch in enumerate(batches):
            last = a == len(batches) - 1
            sync = (
                self.model.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()
            )
            with sync:
                with self._autocast():
                    out = self.model(**batch)
                loss = self.raw.total_loss(out.loss_sums, counts)
                (loss * self.dist.world_size).backward()
            _add(sums, {k: v.detach() for k, v in out.loss_sums.items()})
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum((batch["segment_ids"] > 0).sum() for batch in batches)
        losses, n_tokens = self._reduce(sums, counts, tokens)
        losses["grad_norm"] = float(grad_norm)
        return losses, n_tokens

    def _step_counts(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Targets of each loss term in the whole step: this rank's batches, over all ranks."""
        counts: dict[str, torch.Tensor] = {}
        for batch in batches:
            _add(counts, count_targets(batch))
        packed = torch.stack([counts.get(k, self._zero) for k in LOSS_TERMS])
        packed = D.all_reduce_sum(packed, self.dist)
        return {k: packed[i] for i, k in enumerate(LOSS_TERMS) if k in counts}

    def _reduce(
        self,
        sums: dict[str, torch.Tensor],
        counts: dict[str, torch.Tensor],
        tokens: torch.Tensor | int,
    ) -> tuple[dict[str, float], int]:
        """Loss sums added over ranks -> the model's total and each term's mean, as floats.

        ``counts`` are already global. ``loss`` is the model's total over all the targets
        (what was optimised); a term without any target (no value tokens in the data, say)
        is left out rather than logged as 0.
        """
        packed = torch.stack(
            [sums.get(k, self._zero).double() for k in LOSS_TERMS]
            + [torch.as_tensor(tokens, device=self.dist.device).double()]
        )
        packed = D.all_reduce_sum(packed, self.dist).cpu().tolist()
        total = {k: torch.tensor(packed[i]) for i, k in enumerate(LOSS_TERMS) if k in counts}
        n = {k: counts[k].cpu().double() for k in total}
        losses = {"loss": float(self.raw.total_loss(total, n))}
        losses |= {k: float(total[k] / n[k]) for k in total if n[k] > 0}
        parts = [losses[k] for k in TIME_PARTS if k in losses]
        if parts:  # a sum of three means, as the model reports it
            losses["time_decomposition"] = sum(parts)
        return losses, int(packed[-1])

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation loss (the model's total) and perplexity on the tuning split, all ranks."""
        self.raw.eval()
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, torch.Tensor] = {}
        for batch in self._val:
            with self._autocast():
                out = self.raw(**batch)
            _add(sums, out.loss_sums)
            _add(counts, count_targets(batch))
        # A rank without a validation batch still joins the all-reduce, with zeros.
        packed = torch.stack([counts.get(k, self._zero) for k in LOSS_TERMS])
        packed = D.all_reduce_sum(packed, self.dist)
        counts = {k: packed[i] for i, k in enumerate(LOSS_TERMS) if packed[i] > 0}
        losses, _ = self._reduce(sums, counts, 0)
        return {
            "val_loss": losses.pop("loss"),
            "val_ppl": math.exp(min(losses.get("next_token", math.nan), 50.0)),
            "val_losses": losses,
        }

    # -- the loop ---------------------------------------------------------------------
    def fit(self) -> TrainState:
        st, cfg = self.state, self.cfg
        bar = Bar(
            st.planned_steps,
            "Training",
            done=st.step,
            fields={"loss": "-"},
            enabled=self.progress_enabled,
        )
        session_tokens, session_start = 0, time.perf_counter()
        try:
            while not st.done and st.step < st.planned_steps:
                plan = self._plan(st.epoch)
                if st.next_batch + self.per_step > len(plan):
                    st.epoch += 1
                    st.next_batch = 0
                    plan = self._plan(st.epoch)
                    if len(plan) < self.per_step:
                        raise EhrgptError("An epoch has fewer batches than one step needs.")
                t0 = time.perf_counter()
                mine = D.rank_batches(st.next_batch, cfg.grad_accum, self.dist)
                lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
                losses, n_tokens = self._train_step(plan, mine)
                if cfg.debug_step_sleep:
                    time.sleep(cfg.debug_step_sleep)
                seconds = time.perf_counter() - t0
                record: dict[str, Any] = {
                    "step": st.step + 1,
                    "epoch": st.epoch,
                    "batches": list(range(st.next_batch, st.next_batch + self.per_step)),
                    "loss": losses.pop("loss"),
                    "grad_norm": losses.pop("grad_norm"),
                    "losses": losses,
                    "lr": lr,
                    "tokens": n_tokens,
                    "tokens_per_s": n_tokens / max(seconds, 1e-9),
                    "step_s": seconds,
                }
                if cfg.log_data:
                    self._log_data(st, plan, mine)
                st.step += 1
                st.next_batch += self.per_step
                st.tokens_seen += n_tokens
                st.train_seconds += seconds
                session_tokens += n_tokens
                last = st.step >= st.planned_steps
                if st.step % cfg.eval_every == 0 or last:
                    self._eval_into(record)
                if last and not st.done:
                    st.done, st.stop_reason = True, "planned steps reached"
                record["elapsed_s"] = st.train_seconds
                if self.dist.is_main:
                    atomic.append_jsonl(self.out / METRICS, record)
                if st.step % cfg.checkpoint_every == 0 or st.done:
                    self.save_checkpoint()
                bar.update(
                    st.step,
                    loss=f"{record['loss']:.3f}",
                    rate=f"{record['tokens_per_s']:,.0f} tok/s",
                )
        finally:
            bar.close()
        st.data["session_tokens_per_s"] = session_tokens / max(
            time.perf_counter() - session_start, 1e-9
        )
        return st

    def _eval_into(self, record: dict[str, Any]) -> None:
        st = self.state
        val = self.evaluate()
        record.update(val)
        st.last_val = {"step": st.step, **val}
        if val["val_loss"] < st.best_val_loss:
            st.best_val_loss, st.best_val_ppl, st.best_step = (
                val["val_loss"],
                val["val_ppl"],
                st.step,
            )
            st.evals_without_improvement = 0
            record["best"] = True
            if self.dist.is_main and self.on_best is not None:
                self.on_best(self.raw, st)
            D.barrier(self.dist)
        else:
            st.evals_without_improvement += 1
            if st.evals_without_improvement >= self.cfg.patience:
                st.done, st.stop_reason = True, "early stopping"

    def _log_data(self, st: TrainState, plan: EpochPlan, mine: list[int]) -> None:
        entry = {
            "rank": self.dist.rank,
            "batches": mine,
            "subjects": [s for b in mine for s in plan.subjects(b)],
        }
        every = D.gather_objects(entry, self.dist)
        if self.dist.is_main:
            atomic.append_jsonl(
                self.out / DATA_LOG, {"step": st.step + 1, "epoch": st.epoch, "ranks": every}
            )

    # -- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-NNNNNN`` atomically (rank 0), keep the last few."""
        st = self.state
        rng = D.gather_objects(_rng_state(), self.dist)
        folder = self.out / CHECKPOINTS / f"step-{st.step:06d}"
        if self.dist.is_main:
            tmp = folder.with_name(f".{folder.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _save_pretrained(self.raw, tmp)
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                },
                tmp / "optimizer.pt",
            )
            torch.save(rng, tmp / "rng.pt")
            if (self.out / METRICS).exists():
                shutil.copyfile(self.out / METRICS, tmp / METRICS)
            atomic.write_json(tmp / STATE_FILE, asdict(st))
            fsync_dir(tmp)
            atomic.replace_folder(tmp, folder)
            for old in list_checkpoints(self.out)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        D.barrier(self.dist)
        return folder

    def _load_checkpoint(self, folder: Path) -> None:
        from safetensors.torch import load_file

        weights = load_file(str(folder / "model.safetensors"), device="cpu")
        missing, unexpected = self.raw.load_state_dict(weights, strict=False)
        tied = {k for k in missing if _is_tied(self.raw, k)}
        if set(missing) - tied or unexpected:
            raise EhrgptError(
                f"The checkpoint {folder} does not match the model (missing "
                f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})."
            )
        self.raw.tie_weights()
        opt = torch.load(folder / "optimizer.pt", map_location=self.dist.device, weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        # The lr schedule follows the plan of this run (its total may have changed).
        schedule = lr_lambda(
            self.state.planned_steps,
            self.cfg.warmup_ratio,
            self.cfg.schedule,
            self.cfg.min_lr_ratio,
        )
        self.scheduler.lr_lambdas = [schedule] * len(self.optimizer.param_groups)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * schedule(self.scheduler.last_epoch)
        states = torch.load(folder / "rng.pt", weights_only=False)
        if len(states) == self.dist.world_size:
            _set_rng_state(states[self.dist.rank])
        else:  # another number of ranks: a fresh, distinct seed per rank
            seed_everything(self.seed + 7919 * (self.state.step + 1) + self.dist.rank)


# -- helpers ------------------------------------------------------------------------------


def _add(into: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Add ``values`` to the running totals ``into``, key by key."""
    for key, value in values.items():
        into[key] = into[key] + value if key in into else value


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints under ``out/checkpoints``, oldest first."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).exists()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def read_state(folder: Path) -> TrainState:
    data = json.loads((folder / STATE_FILE).read_text())
    known = {f.name for f in fields(TrainState)}
    return TrainState(**{k: v for k, v in data.items() if k in known})


def restore_logs(out: Path, checkpoint: Path, step: int) -> None:
    """Put back the metrics of ``checkpoint`` and cut the data log after ``step``."""
    saved = checkpoint / METRICS
    if saved.exists():
        atomic.copy_file(saved, out / METRICS)
    else:
        (out / METRICS).unlink(missing_ok=True)
    log = out / DATA_LOG
    if log.exists():
        kept = [r for r in atomic.read_jsonl(log) if r.get("step", 0) <= step]
        atomic.write_jsonl(log, kept)


def _save_pretrained(model: torch.nn.Module, folder: Path) -> None:
    """``save_pretrained`` without transformers' progress bar."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    names = tied.keys() if isinstance(tied, dict) else tied
    return key in names or (
        key.endswith("weight") and "lm_head" in key and model.config.tie_word_embeddings
    )


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

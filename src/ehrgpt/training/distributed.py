"""Data-parallel training: one process per device, started by ``torchrun``.

``ehrgpt train`` is the same entry point alone or under ``torchrun``::

    torchrun --nproc_per_node=4 -m ehrgpt train --data RUN --out MODEL     # 4 GPUs, NCCL
    torchrun --nproc_per_node=2 -m ehrgpt train --data RUN --out MODEL     # 2 CPU procs, gloo

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init` then joins the
process group (NCCL when CUDA is present, gloo otherwise), puts each process on
``cuda:LOCAL_RANK`` and wraps the model in ``DistributedDataParallel``. Every rank builds the
same deterministic batch order for an epoch (it depends only on seed and epoch) and takes a
disjoint block of it: at optimizer step ``k`` with ``A`` accumulation steps and ``W`` ranks,
the global batches ``k*A*W .. (k+1)*A*W - 1`` are used and rank ``r`` takes
``k*A*W + r*A .. k*A*W + r*A + A - 1``. The data position in a checkpoint is this global index,
so a run can resume on another number of ranks. Only rank 0 writes files; all ranks read the
checkpoint to resume (the output folder must be on a file system every rank can see).

Models that do not fit one GPU: wrap the model in FSDP2 instead of DDP
(``torch.distributed.fsdp.fully_shard`` on each decoder block, then on the whole model), which
shards parameters, gradients and optimizer state over the ranks; the batch sharding above is
unchanged. Checkpoints then need ``torch.distributed.checkpoint`` (each rank writes its shard)
or a full state dict gathered on rank 0 (``get_model_state_dict(..., full_state_dict=True,
cpu_offload=True)``) before ``save_pretrained``. ehrgpt's presets (up to ~120M parameters, a
few GB of training state) fit one GPU, so only DDP is implemented.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, its device and the backend in use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto") -> DistInfo:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1), pick the device.

    ``device``: ``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = None
    if world > 1:
        backend = "nccl" if use_cuda else "gloo"
        if not tdist.is_initialized():
            kwargs: dict[str, Any] = {"timeout": dt.timedelta(minutes=30)}
            if use_cuda:
                kwargs["device_id"] = dev
            tdist.init_process_group(backend=backend, **kwargs)
        if not use_cuda:
            # Share the cores between the processes of this node.
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistInfo(rank, world, local, dev, backend)


def shutdown(info: DistInfo, *, wait: bool = True) -> None:
    """Leave the process group (a no-op when alone); ``wait=False`` after an error."""
    if info.enabled and tdist.is_initialized():
        if wait:
            tdist.barrier()
        tdist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        tdist.barrier()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (returned as is when alone)."""
    if info.enabled:
        values = values.clone()
        tdist.all_reduce(values, op=tdist.ReduceOp.SUM)
    return values


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` in rank order (on every rank)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def rank_batches(step_start: int, accumulation: int, info: DistInfo) -> list[int]:
    """Global batch indices this rank trains on at the step whose first batch is ``step_start``.

    >>> rank_batches(12, 3, DistInfo(rank=1, world_size=2))
    [15, 16, 17]
    """
    first = step_start + info.rank * accumulation
    return list(range(first, first + accumulation))


def parameter_hash(model: torch.nn.Module) -> str:
    """A SHA-256 of all parameters (to check that ranks hold the same weights)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``model`` when there is more than one rank."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    # Every head takes part in every forward (a loss over zero targets is a 0 in the graph),
    # so DDP need not search for unused parameters.
    return DistributedDataParallel(model, device_ids=ids)

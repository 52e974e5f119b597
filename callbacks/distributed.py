"""Keeping pruning correct under DistributedDataParallel.

PyTorch's DDP keeps references to the parameters it was built with (its gradient buckets and reducer), so a
surgery that replaces parameters must re-wrap the model. And every rank must end a surgery with the same model:
``check_ranks`` compares a hash of each rank's architecture and weights and stops the run on a mismatch.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn


class RanksInconsistentError(RuntimeError):
    """The processes of a distributed run hold different models."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of every tensor of the state dict (name, dtype, shape and bytes): architecture and weights."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())  # the shape before flattening: the architecture
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Broadcast buffers (BatchNorm running statistics) from rank 0, as DDP does before every forward pass; between
    two forward passes each rank's statistics may have drifted on its own data."""
    if _distributed():
        for b in model.buffers():
            dist.broadcast(b, src=0)


def check_ranks(model: nn.Module, where: str) -> dict:
    """Compare every rank's model with rank 0's; raise ``RanksInconsistentError`` on every rank if one differs.

    Returns ``{"world_size", "ranks_consistent", "hash"}``. A collective: all ranks must call it together.
    """
    if not _distributed():
        return {"world_size": 1, "ranks_consistent": True, "hash": model_fingerprint(model)}
    sync_buffers(model)
    mine = model_fingerprint(model)
    hashes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(hashes, mine)
    bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if bad:
        raise RanksInconsistentError(
            f"after {where}: the model on rank(s) {bad} differs from rank 0's (architecture/weights hash "
            f"{hashes[bad[0]][:12]} vs {hashes[0][:12]}). The ranks no longer train the same network; stopping "
            "rather than averaging gradients of different models. Resume from the last checkpoint; if it recurs, "
            "report it with the config.")
    return {"world_size": len(hashes), "ranks_consistent": True, "hash": mine}


def end_distributed(strategy=None) -> None:
    """Leave the process group on every rank at the end of a successful run: a barrier, then
    ``destroy_process_group``.

    Lightning destroys only NCCL groups at exit. A gloo group (DDP on CPUs) left to the interpreter's finalisation
    can abort the process (SIGABRT, "terminate called without an active exception"), and Lightning then kills every
    rank of a run that had finished. Not for error paths: a rank that raised must not wait at a barrier for ranks
    that may be inside another collective. ``strategy``: the trainer's, whose barrier names each rank's GPU to NCCL.
    """
    if dist.is_available() and dist.is_initialized():
        # every rank is done with the group (rank 0 writes the report meanwhile) ...
        strategy.barrier("end") if strategy is not None else dist.barrier()
        dist.destroy_process_group()  # ... before any rank tears its connections down


def rewrap_ddp(trainer) -> bool:
    """After a surgery, wrap the (new) parameters in a fresh DistributedDataParallel, as Lightning does at fit
    start. Returns True when the model was re-wrapped."""
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    if not isinstance(getattr(strategy, "model", None), DistributedDataParallel):
        return False
    strategy.model = strategy.lightning_module  # drop the old wrapper and its buckets
    strategy.configure_ddp()
    return True

"""Samplers that make data order reproducible and shard it correctly over processes.

Both subclass ``DistributedSampler`` so that Lightning leaves them in place under DDP (it only injects its own
sampler when the loader has none of that type) and calls ``set_epoch`` on them each epoch.

* ``TrainSampler``: a permutation drawn from ``seed + epoch`` (not from the global RNG), sharded over the
  ranks, yielding ``(index, augmentation_seed)`` pairs. The dataset seeds its augmentation per sample from that
  seed, so what epoch ``e`` feeds the model does not depend on the number of loader workers nor on whether the
  run was resumed from a checkpoint: a resumed run replays exactly the batches an uninterrupted run sees.
* ``EvalSampler``: rank ``r`` of ``W`` takes images ``r, r + W, r + 2W, ...`` with no padding, so distributed
  evaluation counts every test image exactly once (``DistributedSampler`` pads by repeating images, which
  double-counts them in mAP).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class TrainSampler(DistributedSampler):
    def __init__(self, dataset, seed: int = 0, drop_last: bool = False, num_replicas: int | None = None,
                 rank: int | None = None):
        world, r = _world()
        super().__init__(dataset, num_replicas=world if num_replicas is None else num_replicas,
                         rank=r if rank is None else rank, shuffle=True, seed=seed, drop_last=drop_last)

    def __iter__(self):
        indices = list(super().__iter__())  # seed + epoch permutation, this rank's shard
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        return iter([(i, (base + i) % (2**63 - 1)) for i in indices])


class EvalSampler(DistributedSampler):
    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None):
        world, r = _world()
        super().__init__(dataset, num_replicas=world if num_replicas is None else num_replicas,
                         rank=r if rank is None else rank, shuffle=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples

"""Samplers that make data order reproducible and shard it correctly over processes.

Both subclass ``DistributedSampler`` so that Lightning leaves them in place under DDP (it only injects its own
sampler when the loader has none of that type) and calls ``set_epoch`` on them each epoch.

* ``TrainSampler``: a permutation drawn from ``seed + epoch`` (not from the global RNG), cut into global
  batches shared out over the ranks, yielding ``(index, augmentation_seed)`` pairs. The dataset seeds its augmentation per sample from that
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
    """Shuffled training order from ``seed + epoch``, cut into *global* batches of ``batch_size x replicas``
    images; rank r takes slice r of every global batch. So global batch k holds the same images whatever the
    number of devices (a 2-GPU run sees what a 1-GPU run with the same global batch sees). The trailing partial
    global batch is dropped; a data set smaller than one global batch is cycled to fill it."""

    def __init__(self, dataset, batch_size: int, seed: int = 0, num_replicas: int | None = None,
                 rank: int | None = None):
        world, r = _world()
        super().__init__(dataset, num_replicas=world if num_replicas is None else num_replicas,
                         rank=r if rank is None else rank, shuffle=True, seed=seed, drop_last=False)
        self.batch_size = int(batch_size)
        global_batch = self.batch_size * self.num_replicas
        self.num_batches = max(1, len(dataset) // global_batch)
        self.num_samples = self.num_batches * self.batch_size
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self):
        n = len(self.dataset)
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(n, generator=g).tolist()
        global_batch = self.batch_size * self.num_replicas
        if n < global_batch:
            perm = (perm * math.ceil(global_batch / n))[:global_batch]
        out = []
        for k in range(self.num_batches):
            start = k * global_batch + self.rank * self.batch_size
            out.extend(perm[start:start + self.batch_size])
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        return iter([(i, (base + i) % (2**63 - 1)) for i in out])

    def __len__(self) -> int:
        return self.num_samples


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

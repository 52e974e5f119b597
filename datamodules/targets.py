"""A detection batch's targets, packed: what ``collate`` hands from a loader worker to the training process.

Per image a target is a dict of small tensors (boxes, labels, difficult, the original VOC boxes, size, index). As a
list of dicts, a batch of 32 is 256 tensors, and every one of them costs twice: a loader worker sends a batch to the
main process tensor by tensor (shared memory and a file descriptor each), and Lightning copies it to the GPU tensor by
tensor. Packed, the batch is one tensor per field. On this project's 2-core CPU the train loader went from 597 to
915 images/s with 2 workers at batch 32 (``python -m benchmarks.bench_loader --workers 0 1 2``: the main process no
longer caps it); see benchmarks/README.md.
"""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import Tensor


class DetectionTargets:
    """One batch's targets: per field, every image's rows in one tensor (in image order), and each image's row count.

    It reads as the list of per-image dicts it replaces: ``len(targets)``, ``targets[i]`` (a dict of views into the
    packed tensors), slices, iteration. Batched code takes the packed tensors directly: ``field(key)`` and
    ``counts(key)`` (``lightning_modules.box_ops.packed_field`` accepts either form). ``to`` and ``pin_memory`` let
    Lightning's ``batch_to_device`` and the DataLoader's pinning thread move it whole. A field whose per-image tensors
    are scalars (``index``) is stacked, one element per image.
    """

    def __init__(self, fields: dict[str, Tensor], counts: dict[str, list[int]], scalars: tuple[str, ...] = ()):
        lengths = {len(c) for c in counts.values()}
        if set(fields) != set(counts) or len(lengths) > 1:
            raise ValueError("DetectionTargets: every field needs one count per image")
        self._fields = fields
        self._counts = counts
        self._scalars = tuple(scalars)
        self._len = lengths.pop() if lengths else 0
        self._starts = {k: [0, *accumulate(c)][:-1] for k, c in counts.items()}

    @classmethod
    def from_list(cls, targets: list[dict[str, Tensor]]) -> DetectionTargets:
        """Pack per-image dicts (all with the same keys; each field's tensors agree past dim 0)."""
        if not targets:
            return cls({}, {})
        keys = list(targets[0])
        if any(list(t) != keys for t in targets):
            raise ValueError("DetectionTargets: every image's target needs the same fields")
        fields, counts, scalars = {}, {}, []
        for k in keys:
            parts = [t[k] for t in targets]
            if all(p.ndim == 0 for p in parts):
                fields[k], counts[k] = torch.stack(parts), [1] * len(parts)
                scalars.append(k)
            else:
                fields[k], counts[k] = torch.cat(parts), [len(p) for p in parts]
        return cls(fields, counts, tuple(scalars))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int | slice) -> dict[str, Tensor] | DetectionTargets:
        """Image ``i``'s dict (views), or for a slice the targets of those images (packed again; views when the
        slice is contiguous)."""
        if isinstance(i, slice):
            images = range(self._len)[i]
            if images.step != 1 or not images:
                return DetectionTargets.from_list([self[j] for j in images])
            lo, hi = images.start, images.stop
            fields = {k: v[lo:hi] if k in self._scalars else
                      v[self._starts[k][lo]:self._starts[k][hi - 1] + self._counts[k][hi - 1]]
                      for k, v in self._fields.items()}
            return DetectionTargets(fields, {k: c[lo:hi] for k, c in self._counts.items()}, self._scalars)
        if not isinstance(i, int):
            raise TypeError(f"DetectionTargets indices are integers or slices, not {type(i).__name__}")
        if not -self._len <= i < self._len:
            raise IndexError(f"image {i} of a batch of {self._len}")
        i %= self._len
        return {k: v[i] if k in self._scalars else v[self._starts[k][i]:self._starts[k][i] + self._counts[k][i]]
                for k, v in self._fields.items()}

    def __iter__(self):
        return (self[i] for i in range(self._len))

    def field(self, key: str) -> Tensor:
        """Every image's ``key`` rows, in image order (a scalar field: one element per image)."""
        return self._fields[key]

    def counts(self, key: str) -> list[int]:
        """How many rows of ``field(key)`` belong to each image."""
        return list(self._counts[key])

    def _map(self, fn) -> DetectionTargets:
        return DetectionTargets({k: fn(v) for k, v in self._fields.items()}, self._counts, self._scalars)

    def to(self, device, non_blocking: bool | None = None) -> DetectionTargets:
        """On ``device``; a copy to a GPU is non-blocking (stream-ordered, and safe from pinned memory) unless told
        otherwise: Lightning's ``batch_to_device`` asks only tensors for that."""
        device = torch.device(device)
        if non_blocking is None:
            non_blocking = device.type == "cuda"
        return self._map(lambda v: v.to(device, non_blocking=non_blocking))

    def pin_memory(self, device=None) -> DetectionTargets:
        return self._map(lambda v: v.pin_memory())

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._fields.items())
        return f"DetectionTargets({self._len} images; {shapes})"

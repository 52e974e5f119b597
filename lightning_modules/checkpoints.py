"""Checkpoint files: safe loading with clear errors, and atomic writes.

* ``read_checkpoint``: a Lightning checkpoint loaded with ``weights_only=True``, with clear errors for missing,
  truncated or foreign files.
* ``AtomicCheckpointIO``: Lightning's checkpoint IO, but every write goes to a temporary file that is fsynced and
  renamed over the target, so a crash never leaves a half-written ``last.ckpt``.

Kept apart from ``export.py`` so that the LightningModules can read checkpoints without importing the exporter
(which imports them): no import circle.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (missing, truncated, corrupt or not one of ours)."""


# ----------------------------------------------------------------------------------------------- checkpoints
def read_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """Load a checkpoint with ``weights_only=True`` (no pickled code runs), or fail saying what is wrong.
    ``mmap=True`` maps the tensors lazily (a cheap validity check + metadata read before Lightning loads it)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {p} is empty (0 bytes): the write that made it was interrupted")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {p} holds objects that are not plain tensors/containers and was refused by "
            f"weights_only=True loading ({str(err).splitlines()[0]}). Only load checkpoints you trust.") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {p} is truncated or corrupt ({str(err).splitlines()[0]}); use an earlier checkpoint "
            "(the run's checkpoints/ folder keeps last.ckpt and the latest epoch)") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{p} is not a Lightning checkpoint of SSDDetector (no 'state_dict')")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to ``<path>.tmp``, fsyncs, then renames over ``<path>``: readers see the old file or the new one,
    never half of one. Loads with clear errors for truncated files."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        target = str(path)
        if "://" in target:  # remote filesystems: Lightning's own (fsspec) writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        return read_checkpoint(path, map_location=map_location or "cpu")


def model_state_dict(ckpt: dict) -> dict[str, Tensor]:
    """The ``SSD`` weights of an ``SSDDetector`` checkpoint (its ``model.`` entries, prefix removed)."""
    return {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}

"""How fast a run trains, and what limits the rate: the data pipeline or the training step.

``TrainingThroughput`` times every training batch of rank 0: the *wait* (from the end of one step to the start of
the next: the DataLoader handing over the next batch and its copy to the device) and the *step* (forward, loss,
backward, optimiser, the callbacks' batch hooks). On a GPU it synchronises at the end of each step (``sync_cuda``),
so that a step's time is the device's and the wait is time the device sat idle, not time the CPU spent queueing
kernels ahead. Per epoch it logs ``perf/images_per_s`` (all ranks), ``perf/data_wait_share`` and ``perf/step_ms``;
``train.py`` adds it to every run and writes ``summary()`` into ``summary.json`` under ``training``: the rate of the
first and the last epoch (before and after pruning), and which of the two limited it. (Lightning's
``ThroughputMonitor`` logs samples/s and FLOPs but not the split between waiting for data and computing, which is
the question here.)
"""

from __future__ import annotations

import statistics
import time

import torch
from pytorch_lightning import Callback

WAIT_SHARE_LIMIT = 0.1  # waiting more than this share of the loop: the data pipeline limits the rate


class TrainingThroughput(Callback):
    """Per-epoch training rate and where the time goes (rank 0's view; images counted over all ranks)."""

    def __init__(self, sync_cuda: bool = True):
        self.sync_cuda = sync_cuda
        self.epochs: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self._waits: list[float] = []
        self._steps: list[float] = []
        self._images = 0
        self._last_end: float | None = None
        self._start: float | None = None

    def _sync(self, pl_module) -> None:
        if self.sync_cuda and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._reset()
        self._sync(pl_module)
        self._last_end = time.perf_counter()  # the first batch's wait includes starting the workers

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._start = time.perf_counter()
        if self._last_end is not None:
            self._waits.append(self._start - self._last_end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._sync(pl_module)
        end = time.perf_counter()
        if self._start is not None:
            self._steps.append(end - self._start)
        self._last_end = end
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._images += int(images.shape[0]) if hasattr(images, "shape") else 0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._steps:
            return
        # the first wait starts the workers (persistent ones only once): reported, but not in the steady share
        first_wait, waits = self._waits[0], self._waits[1:]
        loop = sum(self._steps[1:]) + sum(waits)
        world = max(int(getattr(trainer, "world_size", 1)), 1)
        steady_images = self._images * (len(self._steps) - 1) / len(self._steps)
        epoch = {
            "epoch": int(trainer.current_epoch),
            "images_per_s": round(steady_images * world / loop, 2) if loop > 0 else None,
            "data_wait_share": round(sum(waits) / loop, 4) if loop > 0 else None,
            "step_ms": round(statistics.median(self._steps) * 1e3, 2),
            "wait_ms": round(statistics.median(waits) * 1e3, 2) if waits else None,
            "first_batch_wait_s": round(first_wait, 3),
            "batches": len(self._steps),
        }
        self.epochs.append(epoch)
        if trainer.is_global_zero:
            metrics = {f"perf/{k}": v for k, v in epoch.items()
                       if k in ("images_per_s", "data_wait_share", "step_ms") and v is not None}
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step)

    def summary(self) -> dict | None:
        """``summary.json``'s ``training``: first and last epoch's rate, the last epoch's split, and the verdict."""
        timed = [e for e in self.epochs if e["images_per_s"] is not None]
        if not timed:
            return None
        first, last = timed[0], timed[-1]
        share = last["data_wait_share"]
        limit = ("data loading" if share > WAIT_SHARE_LIMIT else "the training step") + (
            f" (the step waited for its batch {share:.0%} of the last epoch's loop; more than "
            f"{WAIT_SHARE_LIMIT:.0%} means the data pipeline limits the rate)")
        return {"images_per_s_first_epoch": first["images_per_s"], "images_per_s_last_epoch": last["images_per_s"],
                "step_ms_last_epoch": last["step_ms"], "data_wait_share_last_epoch": share, "limited_by": limit,
                "epochs": timed}

    def state_dict(self) -> dict:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epochs = list(state_dict.get("epochs", []))

"""How fast a run trains, and what limits the rate: the data pipeline or the training step.

``TrainingThroughput`` times every training batch of rank 0: the *wait* (from the end of one step to the start of
the next: the DataLoader handing over the next batch and its copy to the device) and the *step* (forward, loss,
backward, optimiser, the callbacks' batch hooks). Per epoch it logs ``perf/images_per_s`` (all ranks),
``perf/data_wait_share`` and ``perf/step_ms``; ``train.py`` adds it to every run and writes ``summary()`` into
``summary.json`` under ``training``: the rate of the first and the last epoch (before and after pruning), and which
of the two limited it. (Lightning's ``ThroughputMonitor`` logs samples/s and FLOPs but not the split between
waiting for data and computing, which is the question here.)

On a GPU the measurement must not slow what it measures: a synchronisation after every step would leave the device
idle while the host fetches and copies the next batch. So it synchronises three times per epoch (at its start,
after the first step, which also starts the workers and is left out of the steady figures, and at its end) and times
the device with CUDA events recorded around each step, read at the epoch's end: ``step_ms`` is a step's device time,
the rate is the steady images over the device's time from the end of the first step to the end of the last, and
``device_idle_share`` is the part of that span outside any step (waiting for the host: the next batch, its copy,
Lightning's loop). ``data_wait_share`` stays the host's share of the loop spent waiting for the loader. The verdict
adds a third answer on a GPU: "the host between and within steps" when the device sat idle but not for the loader.
``sync_every_step=True`` synchronises after every step instead (the sixteenth session's way: host-clock step times,
at the cost of an idle device between steps).
"""

from __future__ import annotations

import statistics
import time

import torch
from pytorch_lightning import Callback

WAIT_SHARE_LIMIT = 0.1  # waiting more than this share of the loop: the data pipeline limits the rate


class TrainingThroughput(Callback):
    """Per-epoch training rate and where the time goes (rank 0's view; images counted over all ranks)."""

    def __init__(self, sync_every_step: bool = False):
        self.sync_every_step = sync_every_step
        self.epochs: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self._waits: list[float] = []
        self._steps: list[float] = []
        self._events: list[tuple] = []  # on a GPU without per-step syncs: (start, end) CUDA events of each step
        self._images = 0
        self._last_end: float | None = None
        self._start: float | None = None

    @staticmethod
    def _cuda(pl_module) -> bool:
        return pl_module.device.type == "cuda"

    def _new_event(self):
        """A timing CUDA event, recorded now on the current stream."""
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _sync(self, pl_module) -> None:
        if self._cuda(pl_module):
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._reset()
        self._sync(pl_module)
        self._last_end = time.perf_counter()  # the first batch's wait includes starting the workers

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._start = time.perf_counter()
        if self._last_end is not None:
            self._waits.append(self._start - self._last_end)
        if self._cuda(pl_module) and not self.sync_every_step:
            self._events.append((self._new_event(), None))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        events = self._cuda(pl_module) and not self.sync_every_step
        if events and self._events and self._events[-1][1] is None:
            self._events[-1] = (self._events[-1][0], self._new_event())
        if not events or not self._steps:  # every step, or only the first (the steady loop starts after it)
            self._sync(pl_module)
        end = time.perf_counter()
        if self._start is not None:
            self._steps.append(end - self._start)
        self._last_end = end
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._images += int(images.shape[0]) if hasattr(images, "shape") else 0

    def _device_times(self, pl_module) -> tuple[list[float], float] | None:
        """Each step's device seconds and the device's seconds from the end of the first step to the end of the
        last (synchronises once: every event has completed)."""
        events = [(a, b) for a, b in self._events if b is not None]
        if len(events) < 2:
            return None
        self._sync(pl_module)
        steps = [a.elapsed_time(b) / 1e3 for a, b in events]
        return steps, events[0][1].elapsed_time(events[-1][1]) / 1e3

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._steps:
            return
        # the first wait starts the workers (persistent ones only once): reported, but not in the steady share
        first_wait, waits = self._waits[0], self._waits[1:]
        host_loop = sum(self._steps[1:]) + sum(waits)  # = the host's clock from the end of the first step to the last
        loop, steps, idle = host_loop, self._steps, None
        device = self._device_times(pl_module) if self._events else None
        if device is not None:
            steps, loop = device
            idle = max(0.0, 1 - sum(steps[1:]) / loop) if loop > 0 else None
        world = max(int(getattr(trainer, "world_size", 1)), 1)
        steady_images = self._images * (len(self._steps) - 1) / len(self._steps)
        epoch = {
            "epoch": int(trainer.current_epoch),
            "images_per_s": round(steady_images * world / loop, 2) if loop > 0 else None,
            "data_wait_share": round(sum(waits) / host_loop, 4) if host_loop > 0 else None,
            "step_ms": round(statistics.median(steps) * 1e3, 2),
            "wait_ms": round(statistics.median(waits) * 1e3, 2) if waits else None,
            "first_batch_wait_s": round(first_wait, 3),
            "batches": len(self._steps),
        }
        if idle is not None:
            epoch["device_idle_share"] = round(idle, 4)
        self.epochs.append(epoch)
        if trainer.is_global_zero:
            metrics = {f"perf/{k}": v for k, v in epoch.items()
                       if k in ("images_per_s", "data_wait_share", "step_ms", "device_idle_share") and v is not None}
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step)

    def summary(self) -> dict | None:
        """``summary.json``'s ``training``: first and last epoch's rate, the last epoch's split, and the verdict."""
        timed = [e for e in self.epochs if e["images_per_s"] is not None]
        if not timed:
            return None
        first, last = timed[0], timed[-1]
        share, idle = last["data_wait_share"], last.get("device_idle_share")
        why = (f"the step waited for its batch {share:.0%} of the last epoch's loop; more than "
               f"{WAIT_SHARE_LIMIT:.0%} means the data pipeline limits the rate")
        if share > WAIT_SHARE_LIMIT:
            limit = "data loading"
        elif idle is None or idle <= WAIT_SHARE_LIMIT:
            limit = "the training step"
        else:  # the device waited, but not for the loader: Python, kernel launches, Lightning's loop, host syncs
            limit = "the host between and within steps"
        if idle is not None:
            why += f"; the device was idle {idle:.0%} of it"
        out = {"images_per_s_first_epoch": first["images_per_s"], "images_per_s_last_epoch": last["images_per_s"],
               "step_ms_last_epoch": last["step_ms"], "data_wait_share_last_epoch": share,
               "limited_by": f"{limit} ({why})", "epochs": timed}
        if idle is not None:
            out["device_idle_share_last_epoch"] = idle
        return out

    def state_dict(self) -> dict:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epochs = list(state_dict.get("epochs", []))

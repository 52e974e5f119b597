"""The learning rate of the retraining after a surgery: continue the run's schedule, or restart it.

Le & Hua 2021 ("Network Pruning That Matters: A Case Study on Retraining Variants", ICLR) show that with a fixed
retraining budget a pruned network retrains better with a learning rate that goes back up and then decays to 0 over
the budget (their one-cycle "CLR", after Renda et al. 2020's learning-rate rewinding) than at the small rate the
original schedule has reached by then: a large step lets the smaller network leave the basin the dense one was in.
Here the retraining budget is whatever is left of the run: ``restart_lr`` replaces the step-wise ``LambdaLR`` factor
from the surgery on by a linear ramp from the current factor to ``peak`` (over ``ramp`` of the remaining steps),
then a cosine from ``peak`` to 0 at the run's last step.

The restart is a plain closure (``LambdaLR`` checkpoints no closure state), so its numbers travel in the pruning
state instead and the callback installs it again when a run resumes.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
from torch.optim.lr_scheduler import LambdaLR

RETRAIN_LR = ("continue", "restart")


def check_retrain_lr(retrain_lr: str, peak: float, ramp: float) -> None:
    if retrain_lr not in RETRAIN_LR:
        raise ValueError(f"retrain_lr must be one of {RETRAIN_LR}, got {retrain_lr!r}")
    if not peak > 0:
        raise ValueError(f"retrain_lr_peak is a multiple of the configured lr and must be > 0, got {peak}")
    if not 0 <= ramp < 1:
        raise ValueError(f"retrain_lr_ramp is a fraction of the remaining steps, in [0, 1), got {ramp}")


def restarted_factor(start: int, end: int, peak: float, ramp: float, from_factor: float):
    """The learning-rate factor (of the configured lr) at scheduler step ``it`` >= ``start``."""
    span = max(end - start, 1)
    up = int(round(ramp * span))

    def factor(it: int) -> float:
        t = it - start
        if t < up:
            return from_factor + (peak - from_factor) * max(t, 0) / up
        return peak * 0.5 * (1 + math.cos(math.pi * min(t - up, span - up) / max(span - up, 1)))

    return factor


def _step_scheduler(trainer: pl.Trainer) -> LambdaLR:
    configs = getattr(trainer, "lr_scheduler_configs", None) or []
    if not configs:
        raise ValueError("retrain_lr: restart rewrites the learning-rate schedule, and the module's "
                         "configure_optimizers returns no scheduler")
    cfg = configs[0]
    if not isinstance(cfg.scheduler, LambdaLR) or cfg.interval != "step":
        raise ValueError(f"retrain_lr: restart needs a per-step LambdaLR schedule (interval 'step'); the module has "
                         f"{type(cfg.scheduler).__name__} per {cfg.interval}")
    return cfg.scheduler


def restart_lr(trainer: pl.Trainer, peak: float = 1.0, ramp: float = 0.1) -> dict:
    """From the current step to the run's last one, replace the schedule by ramp-to-``peak`` + cosine-to-0; returns
    the restart's numbers (kept in the checkpoint and in the surgery's record)."""
    sched = _step_scheduler(trainer)
    start = int(sched.last_epoch)
    end = int(trainer.estimated_stepping_batches)
    from_factor = float(sched.get_last_lr()[0] / sched.base_lrs[0]) if sched.base_lrs[0] else 0.0
    spec = {"start": start, "end": max(end, start + 1), "peak": float(peak), "ramp": float(ramp),
            "from_factor": from_factor}
    install_restart(trainer, spec)
    return spec


def install_restart(trainer: pl.Trainer, spec: dict) -> None:
    """Put the restarted schedule ``spec`` into the run's scheduler and set the optimiser's rates for the next step."""
    sched = _step_scheduler(trainer)
    factor = restarted_factor(spec["start"], spec["end"], spec["peak"], spec["ramp"], spec["from_factor"])
    sched.lr_lambdas = [factor for _ in sched.optimizer.param_groups]
    for group, base in zip(sched.optimizer.param_groups, sched.base_lrs):
        group["lr"] = base * factor(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


class LRRestartState:
    """For a callback that restarts the learning rate itself (the baselines): keeps the restart in the callback's
    checkpoint state and installs it again when a run resumes. (``StructuredSurgery`` keeps it in the pruning state.)"""

    lr_restart: dict | None = None

    def state_dict(self) -> dict:
        return {"lr_restart": self.lr_restart}

    def load_state_dict(self, state: dict) -> None:
        self.lr_restart = state.get("lr_restart")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lr_restart:  # a resumed run: LambdaLR does not checkpoint the restarted schedule
            install_restart(trainer, self.lr_restart)

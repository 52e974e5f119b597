"""The pruning methods our table compares with, as Lightning callbacks usable from a config.

* ``OneShotFilterPruning(criterion="l1norm")``: Li et al. 2017 ("Pruning Filters for Efficient ConvNets"):
  at one epoch boundary, each layer keeps its filters of largest L1 norm, to given widths; then retraining.
* ``OneShotFilterPruning(criterion="tp_global_magnitude")``: Torch-Pruning's ``MagnitudePruner`` with global
  ranking (L1 group magnitude), its pruning ratio searched so the pruned model has ``target_params``.
* Lightning's own ``ModelPruning`` (unstructured, global L1) is used as is from the config.

Both one-shot variants remove the filters with the same dependency-graph surgery (and optimiser-state transfer)
as StructuredSurgery, so the table compares *which* filters go and *when*, not the surgery code.
"""

from __future__ import annotations

import copy

import pytorch_lightning as pl
import torch
import torch_pruning as tp
from pytorch_lightning.callbacks import Callback, ModelPruning

from callbacks.report import measure_model
from callbacks.retrain import LRRestartState, check_retrain_lr, restart_lr
from callbacks.surgery import prune_filters


def l1norm_selection(model, channels: dict[str, int]) -> dict[str, list[int]]:
    """Per layer, the filters of smallest L1 norm beyond the ``channels`` widths (Li et al. 2017)."""
    sel = {}
    for name, width in channels.items():
        conv = model.layers[name]
        if width >= conv.out_channels:
            continue
        norms = conv.weight.detach().abs().flatten(1).sum(1)
        sel[name] = norms.argsort()[: conv.out_channels - width].tolist()
    return sel


def _tp_pruner(model, size: int, ratio: float, round_to: int):
    # what the pruning contract never cuts: the network's never_prune layers and every non-conv consumer (SSD's
    # heads, a classifier's linear layers), whose *outputs* are the predictions
    convs = set(model.layers.values())
    ignored = [model.layers[n] for n in model.never_prune if n in model.layers]
    ignored += [m for n in model.layers for m in model.consumers(n) if m not in convs]
    ignored += [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return tp.pruner.MagnitudePruner(
        model, torch.zeros(1, 3, size, size, device=next(model.parameters()).device),
        importance=tp.importance.GroupMagnitudeImportance(p=1), global_pruning=True, pruning_ratio=ratio,
        ignored_layers=ignored, round_to=round_to, customized_pruners=model.tp_pruners())


def tp_global_selection(model, size: int, ratio: float, round_to: int = 8) -> dict[str, list[int]]:
    """The filters Torch-Pruning's global magnitude pruner removes at ``ratio`` (decided by TP, applied by us)."""
    names = {id(m): n for n, m in model.layers.items()}
    sel: dict[str, list[int]] = {}
    was_training = model.training
    try:
        with torch.enable_grad():
            pruner = _tp_pruner(model, size, ratio, round_to)
            for group in pruner.step(interactive=True):
                root = group[0].dep.target.module
                if id(root) in names:
                    sel.setdefault(names[id(root)], []).extend(int(i) for i in group[0].idxs)
    finally:  # Torch-Pruning's tracer calls model.eval(): retraining would otherwise run with BatchNorm frozen
        model.train(was_training)
    return sel


def _count(model, size: int, measure: str) -> int:
    if measure == "params":
        return sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    macs, _ = tp.utils.count_ops_and_params(copy.deepcopy(model).eval(), torch.zeros(1, 3, size, size, device=device))
    return int(macs)


def tp_ratio_for_params(model, size: int, target_params: int, round_to: int = 8, steps: int = 14,
                        measure: str = "params") -> tuple[float, int]:
    """Binary search of the global pruning ratio whose pruned model has the parameter count (or, with
    ``measure="macs"``, the MACs) closest to ``target_params``. Returns (ratio, the count it gives): the caller must
    check that it got there (the layers Torch-Pruning may not touch, conv1_1 and the heads, can hold more)."""
    def params_at(ratio: float) -> int:
        trial = copy.deepcopy(model)
        prune_filters(trial, tp_global_selection(trial, size, ratio, round_to))
        return _count(trial, size, measure)

    lo, hi = 0.0, 0.99
    best = (0.0, _count(model, size, measure))
    for _ in range(steps):
        mid = (lo + hi) / 2
        n = params_at(mid)
        if abs(n - target_params) < abs(best[1] - target_params):
            best = (mid, n)
        if n > target_params:
            lo = mid
        else:
            hi = mid
    return best


class OneShotFilterPruning(LRRestartState, Callback):
    """Prune once at the end of epoch ``epoch``, then keep training (the baselines' "prune, then retrain").

    ``retrain_lr`` / ``retrain_lr_peak`` / ``retrain_lr_ramp``: the learning rate after the cut, as in
    ``StructuredSurgery`` (``"continue"`` the schedule, as a user fine-tuning a Torch-Pruning model would, or
    ``"restart"`` it: ``callbacks/retrain.py``), so a baseline can be given the same retraining as ours."""

    def __init__(self, criterion: str, epoch: int, channels: dict[str, int] | None = None,
                 target_params: int | None = None, round_to: int = 8, params_tolerance: float = 0.03,
                 target_macs: int | None = None, retrain_lr: str = "continue", retrain_lr_peak: float = 1.0,
                 retrain_lr_ramp: float = 0.1):
        check_retrain_lr(retrain_lr, retrain_lr_peak, retrain_lr_ramp)
        self.retrain_lr, self.retrain_lr_peak, self.retrain_lr_ramp = retrain_lr, retrain_lr_peak, retrain_lr_ramp
        self.lr_restart: dict | None = None
        if criterion not in ("l1norm", "tp_global_magnitude"):
            raise ValueError(f"criterion must be 'l1norm' or 'tp_global_magnitude', got {criterion!r}")
        if criterion == "l1norm" and not channels:
            raise ValueError("l1norm needs the target widths (channels)")
        if criterion == "tp_global_magnitude" and bool(target_params) == bool(target_macs):
            raise ValueError("tp_global_magnitude needs target_params or target_macs (one of them)")
        self.target_macs = target_macs
        self.criterion, self.epoch, self.channels = criterion, epoch, channels
        self.target_params, self.round_to = target_params, round_to
        self.params_tolerance = params_tolerance
        self.done = False
        self.reached: dict | None = None  # what the equal-params search got: {target, params, ratio, within}
        # the architecture before the cut, for the run's report (train.py reads it as it reads ours' pruning state)
        self.dense_stats: dict | None = None

    def state_dict(self) -> dict:
        return {"done": self.done, "reached": self.reached, "dense_stats": self.dense_stats, **super().state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.done = state["done"]
        self.reached = state.get("reached")
        self.dense_stats = state.get("dense_stats")
        super().load_state_dict(state)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.done or trainer.current_epoch != self.epoch:
            return
        model, size = pl_module.model, pl_module.hparams.size
        if self.criterion == "l1norm":
            sel = l1norm_selection(model, self.channels)
        else:
            measure, target = ("params", self.target_params) if self.target_params else ("macs", self.target_macs)
            ratio, got = tp_ratio_for_params(model, size, target, self.round_to, measure=measure)
            within = abs(got - target) <= self.params_tolerance * target
            self.reached = {"measure": measure, "target": target, "got": got, "ratio": ratio, "within": within}
            if not within:
                import warnings

                warnings.warn(f"Torch-Pruning global magnitude could not reach {target:,} {measure} (within "
                              f"{self.params_tolerance:.0%}): the closest is {got:,} at ratio {ratio:.3f}; this is not "
                              f"an equal-{measure} comparison", stacklevel=2)
            sel = tp_global_selection(model, size, ratio, self.round_to)
        self.dense_stats = measure_model(trainer, pl_module, with_map=False)
        prune_filters(model, sel, trainer.optimizers[0])
        pl_module.hparams["channels"] = model.channels
        if self.retrain_lr == "restart":
            self.lr_restart = restart_lr(trainer, self.retrain_lr_peak, self.retrain_lr_ramp)
        self.done = True


class ScheduleRestart(LRRestartState, Callback):
    """No pruning: only the learning-rate restart of ``retrain_lr="restart"`` (``callbacks/retrain.py``) at the end of
    epoch ``epoch``. On the dense config it is the dense run with ours' retraining schedule: whether a gain of the
    restart comes from the pruned network or from the schedule alone."""

    def __init__(self, epoch: int, retrain_lr_peak: float = 1.0, retrain_lr_ramp: float = 0.1):
        check_retrain_lr("restart", retrain_lr_peak, retrain_lr_ramp)
        self.epoch, self.peak, self.ramp = epoch, retrain_lr_peak, retrain_lr_ramp
        self.lr_restart: dict | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lr_restart is None and trainer.current_epoch == self.epoch:
            self.lr_restart = restart_lr(trainer, self.peak, self.ramp)


class ModelPruningOnce(ModelPruning):
    """Lightning's ``ModelPruning`` (global unstructured L1 masks on every conv weight), applied once at the start
    of epoch ``prune_epoch`` with ``amount`` of the weights, masks kept through retraining and made permanent at
    the end. (Lightning applies ``amount`` again every epoch by default; once is the comparable setting.)"""

    def __init__(self, amount: float, prune_epoch: int):
        self.prune_epoch = prune_epoch
        # use_lottery_ticket_hypothesis=False: Lightning's default rewinds the surviving weights to their values at
        # the start of training, which would make this "prune, then retrain from initialisation", not fine-tuning
        super().__init__("l1_unstructured", amount=amount, use_global_unstructured=True,
                         apply_pruning=self._apply, make_pruning_permanent=True, verbose=0,
                         use_lottery_ticket_hypothesis=False)

    def _apply(self, epoch: int) -> bool:
        return epoch == self.prune_epoch

    def setup(self, trainer, pl_module, stage):
        self._parameters_to_prune = [(m, "weight") for m in pl_module.model.modules() if isinstance(m, torch.nn.Conv2d)]
        super().setup(trainer, pl_module, stage)


class HookTimer(Callback):
    """Times the pruning callbacks' hooks (and the dense measurement they trigger) per epoch, and every epoch's
    wall time; writes ``<run>/hook_times.json`` at the end of fit. Put it first in ``trainer.callbacks``."""

    NAMES = ("SparsityInduction", "FilterSelection", "StructuredSurgery")
    HOOKS = ("on_before_optimizer_step", "on_train_batch_end", "on_train_epoch_end", "on_train_epoch_start")

    def __init__(self):
        self.per_epoch: dict[int, dict[str, float]] = {}
        self.epoch_start: dict[int, float] = {}
        self.epoch_seconds: dict[int, float] = {}

    def _wrap(self, trainer, owner, attr, key):
        import time

        fn = getattr(owner, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                e = self.per_epoch.setdefault(trainer.current_epoch, {})
                e[key] = e.get(key, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, timed)

    def setup(self, trainer, pl_module, stage):
        import callbacks.sparsity as sp
        import callbacks.surgery as su

        for cb in trainer.callbacks:
            if type(cb).__name__ in self.NAMES:
                for h in self.HOOKS:
                    if h in type(cb).__dict__:
                        self._wrap(trainer, cb, h, type(cb).__name__)
        self._wrap(trainer, sp, "measure_model", "dense_measurement")
        self._wrap(trainer, su, "measure_model", "dense_measurement")

    def on_train_epoch_start(self, trainer, pl_module):
        import time

        now = time.perf_counter()
        e = trainer.current_epoch
        if e - 1 in self.epoch_start:
            self.epoch_seconds[e - 1] = now - self.epoch_start[e - 1]
        self.epoch_start[e] = now

    def on_fit_end(self, trainer, pl_module):
        import json
        import time
        from pathlib import Path

        last = max(self.epoch_start)
        self.epoch_seconds.setdefault(last, time.perf_counter() - self.epoch_start[last])
        out = {"epoch_seconds": self.epoch_seconds, "hooks": self.per_epoch}
        (Path(trainer.default_root_dir) / "hook_times.json").write_text(json.dumps(out, indent=2))

"""StructuredSurgery: paper A's stage 3 — physically remove the selected filters, then retrain.

The channel surgery itself is Torch-Pruning's dependency graph: removing conv l's output channels also removes
every consumer's input channels (the next conv, the BatchNorm channels, SSD's L2Norm scales and loc/conf heads, a
classifier's first linear layer). Written here: the transfer of the optimiser state (momentum) to the surviving
weights, so training continues where it was. What is model-specific (custom layers' pruners, which channels index
each parameter, SSD's branch dropping) comes from the network through the pruning contract
(``lightning_modules/contract.py``).
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
import torch_pruning as tp
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from callbacks.report import measure_model
from callbacks.distributed import check_ranks, rewrap_ddp
from callbacks.retrain import check_retrain_lr, install_restart, restart_lr
from callbacks.state import find_state
from lightning_modules.contract import PrunableNet


def _index(t: Tensor, d0: Tensor | None, d1: Tensor | None, width1: int | None = None) -> Tensor:
    """``t`` with the kept entries of dim 0 and dim 1. ``width1``: the dim-1 layer's width before the surgery; a
    dim 1 that is a multiple of it (a linear layer after a flatten: ``span`` columns per channel) keeps every
    column of each kept channel."""
    if d0 is not None:
        t = t.index_select(0, d0.to(t.device))
    if d1 is not None and t.dim() > 1:
        span = t.shape[1] // width1 if width1 else 1
        cols = (d1[:, None] * span + torch.arange(span)).flatten() if span > 1 else d1
        t = t.index_select(1, cols.to(t.device))
    return t


def prune_filters(model: PrunableNet, selection: dict[str, list[int]], optimizer: torch.optim.Optimizer | None = None) -> None:
    """Remove ``selection[layer]`` filters from ``model`` in place (Torch-Pruning), and carry the optimiser's
    per-parameter state (momentum, Adam moments) over to the surviving entries."""
    selection = {k: sorted(set(v)) for k, v in selection.items() if v}
    if not selection:
        return
    for name, idx in selection.items():
        n = model.layers[name].out_channels
        if len(idx) >= n:
            raise ValueError(f"cannot remove all {n} filters of {name}")
    widths = dict(model.channels)
    keep = {name: torch.tensor(sorted(set(range(model.layers[name].out_channels)) - set(idx)))
            for name, idx in selection.items()}
    named = dict(model.named_parameters())
    old_names = {id(p): n for n, p in named.items()}
    dims = model.param_dims()
    saved_state = {}
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p in optimizer.state:
                    saved_state[old_names[id(p)]] = optimizer.state.pop(p)
    was_training = model.training
    model.eval()
    with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=model.example_input(),
                                                   customized_pruners=model.tp_pruners())
    with torch.no_grad():
        for name, idx in selection.items():
            group = dg.get_pruning_group(model.layers[name], tp.prune_conv_out_channels, idxs=idx)
            group.prune()
    model.train(was_training)
    new_named = dict(model.named_parameters())
    for pname, p in new_named.items():  # verify every parameter has the shape our bookkeeping predicts
        old = named[pname]
        d0, d1 = dims.get(pname, (None, None))
        expected = _index(old, keep.get(d0) if d0 else None, keep.get(d1) if d1 else None, widths.get(d1)).shape
        if p.shape != expected:
            raise RuntimeError(f"surgery gave {pname} the shape {tuple(p.shape)}, expected {tuple(expected)}")
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [new_named[old_names[id(p)]] for p in group["params"]]
        for pname, st in saved_state.items():
            d0, d1 = dims.get(pname, (None, None))
            k0, k1 = (keep.get(d0) if d0 else None), (keep.get(d1) if d1 else None)
            p = new_named[pname]
            optimizer.state[p] = {key: (_index(v, k0, k1, widths.get(d1)) if isinstance(v, Tensor) and v.shape == named[pname].shape else v)
                                  for key, v in st.items()}


def drop_branches(model: PrunableNet, k: int) -> None:
    """Keep only the first k detection branches (paper A's "pruned-kdet"), for networks that have branches."""
    if not hasattr(model, "drop_branches"):
        raise TypeError(f"{type(model).__name__} has no detection branches to drop (StructuredSurgery.num_branches)")
    model.drop_branches(k)


def surgery_line(record: dict, phases: int, dense: dict | None, macs: int, before: dict, after: dict) -> str:
    """One console line per surgery: which, when, the size and MACs against the dense model, the widths cut."""
    parts = [f"surgery {record['phase'] + 1}/{phases} (end of epoch {record['epoch']}): params {record['params']:,}"]
    if dense:
        parts[0] += f" ({dense['params'] / record['params']:.2f}x smaller), MACs {macs / 1e6:,.1f}M " \
                    f"({dense['macs'] / macs:.2f}x fewer)"
    cut = [f"{n} {before[n]}->{after.get(n, 0)}" for n in before if after.get(n, 0) != before[n]]
    parts.append("widths " + (", ".join(cut) if cut else "unchanged"))
    return "; ".join(parts)


class StructuredSurgery(Callback):
    """Removes the filters ``FilterSelection`` chose, at each phase's surgery boundary, and keeps training.

    After the surgery the model is a plain, smaller ``nn.Module``; the optimiser keeps its state for the surviving
    weights and the learning-rate schedule continues. The masks of the phase are dropped (retraining is free).
    Before the first surgery it measures the dense model (params, MACs, size, CPU latency, test mAP@0.5) for the
    compression report (taken just before the first threshold zeroes anything); after every surgery it logs the new size and the width of every layer.

    Args:
        num_branches: after the last surgery keep only the first k detection branches ("pruned-kdet").
        measure_dense_map: evaluate the dense model on the test split before the first surgery (for summary.json).
        init_from: the kept filters' weights after the surgery: ``"current"`` (as trained up to the surgery, the
            threshold's zeros included) or ``"l1"`` (paper A: the un-thresholded weights Θ_L1 at the end of the
            phase's L1 window).
        retrain_lr: the learning rate after each surgery: ``"continue"`` the run's schedule, or ``"restart"`` it
            for the smaller network (Le & Hua 2021's one-cycle retraining, after Renda et al. 2020's learning-rate
            rewinding; ``callbacks/retrain.py``): a linear ramp from the current rate to ``retrain_lr_peak`` x the
            configured lr over ``retrain_lr_ramp`` of the remaining steps, then a cosine to 0 at the run's end.
    """

    pruning_stage = "StructuredSurgery"

    def __init__(self, num_branches: int | None = None, measure_dense_map: bool = True, init_from: str = "current",
                 retrain_lr: str = "continue", retrain_lr_peak: float = 1.0, retrain_lr_ramp: float = 0.1):
        if init_from not in ("current", "l1"):
            raise ValueError(f"init_from must be 'current' or 'l1', got {init_from!r}")
        check_retrain_lr(retrain_lr, retrain_lr_peak, retrain_lr_ramp)
        self.retrain_lr, self.retrain_lr_peak, self.retrain_lr_ramp = retrain_lr, retrain_lr_peak, retrain_lr_ramp
        self.num_branches = num_branches
        self.measure_dense_map = measure_dense_map
        self.init_from = init_from

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        state = find_state(trainer)
        state.measure_dense_map = self.measure_dense_map
        state.keep_l1_weights = self.init_from == "l1"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = find_state(trainer)
        if state.lr_restart:  # a resumed run: the restarted schedule lives in the pruning state, not in LambdaLR
            install_restart(trainer, state.lr_restart)

    @staticmethod
    @torch.no_grad()
    def restore_l1_weights(model: PrunableNet, layers: list[str], state) -> None:
        """Paper A, stage 3: the smaller model starts from the *un-thresholded* L1-trained weights Θ_L1 of the kept
        filters (the threshold only decided which filters go)."""
        for name in layers:
            saved = state.l1_weights.pop(name, None)
            if saved is None:
                continue
            w = model.layers[name].weight
            if saved.shape != w.shape:
                raise RuntimeError(f"Θ_L1 of {name} has shape {tuple(saved.shape)}, the layer {tuple(w.shape)}")
            w.copy_(saved.to(w.device, w.dtype))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = find_state(trainer)
        self._surgeries(trainer, pl_module, state)
        self._log_curve(pl_module, state)

    def _macs(self, model: PrunableNet) -> int:
        """MACs of the current architecture (counted once per architecture: the curve is logged every epoch)."""
        key = (tuple(model.channels.items()), getattr(model, "num_branches", None))
        if getattr(self, "_macs_key", None) != key:
            from callbacks.report import model_stats

            self._macs_key, self._macs_value = key, model_stats(model, latency=False)["macs"]
        return self._macs_value

    def _log_curve(self, pl_module, state) -> None:
        """The compression curve (params and MACs per epoch, and their ratios to the dense model) for W&B, and the
        phase and size in the progress bar."""
        params = sum(p.numel() for p in pl_module.model.parameters())
        macs = self._macs(pl_module.model)
        pl_module.log("model/params", float(params))
        pl_module.log("model/macs", float(macs))
        if state.dense_stats:
            pl_module.log("model/params_x", state.dense_stats["params"] / params)
            pl_module.log("model/macs_x", state.dense_stats["macs"] / macs)
        pl_module.log("phase", float(len(state.surgeries)), prog_bar=True)
        pl_module.log("params_k", params / 1e3, prog_bar=True)

    def _surgeries(self, trainer, pl_module, state) -> None:
        for i, phase in enumerate(state.phases):
            if phase.selection_epoch != trainer.current_epoch or any(s["phase"] == i for s in state.surgeries):
                continue
            if state.dense_stats is None:  # normally measured by SparsityInduction before its first threshold
                state.dense_stats = measure_model(trainer, pl_module, with_map=self.measure_dense_map)
            t0 = time.perf_counter()
            before = dict(pl_module.model.channels)
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            if self.init_from == "l1":
                self.restore_l1_weights(pl_module.model, phase.layers, state)
            prune_filters(pl_module.model, state.selection, optimizer)
            if i == len(state.phases) - 1 and self.num_branches:
                drop_branches(pl_module.model, self.num_branches)
            seconds = time.perf_counter() - t0
            if hasattr(pl_module, "architecture_changed"):  # the contract's optional hook: memory format, recompile
                pl_module.architecture_changed()
            # every rank must now hold the same model; then DDP is rebuilt around the new parameters
            ranks = check_ranks(pl_module.model, f"the surgery of phase {i}")
            rewrap_ddp(trainer)
            for name in phase.layers:
                state.masks.pop(name, None)
            # later masks (none by construction) would be stale; the architecture now travels in hparams
            pl_module.hparams["channels"] = pl_module.model.channels
            if hasattr(pl_module.model, "num_branches"):
                pl_module.hparams["num_branches"] = pl_module.model.num_branches
            record = {"phase": i, "epoch": trainer.current_epoch, "seconds": round(seconds, 4),
                      "removed": {k: len(v) for k, v in state.selection.items()},
                      "params": sum(p.numel() for p in pl_module.model.parameters()),
                      "world_size": ranks["world_size"], "ranks_consistent": ranks["ranks_consistent"],
                      "model_hash": ranks["hash"]}
            if self.retrain_lr == "restart":
                state.lr_restart = record["lr_restart"] = restart_lr(trainer, self.retrain_lr_peak, self.retrain_lr_ramp)
            state.surgeries.append(record)
            state.selection = {}
            pl_module.log(f"prune/phase{i}/surgery_seconds", seconds)
            pl_module.log("prune/params", float(record["params"]))
            for name, width in pl_module.model.channels.items():
                pl_module.log(f"prune/width/{name}", float(width))
            if trainer.is_global_zero:
                rank_zero_info(surgery_line(record, len(state.phases), state.dense_stats, self._macs(pl_module.model),
                                            before, pl_module.model.channels))

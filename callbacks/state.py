"""The pruning schedule (declared once) and the small state the three pruning callbacks share.

A schedule is a list of phases (paper A prunes SSD in 4). Each phase names its layers (the papers' layer
names) and its epoch windows, all counted in epochs, actions happening at epoch boundaries:

* ``l1_epochs: [a, b]`` — L1 sparsity training during epochs a .. b-1; at the end of epoch b-1 the improved
  global threshold zeroes the phase's small weights (masks hold them at zero from then on);
* ``surgery_epoch: c`` (>= b, default b) — at the end of epoch c-1 the filters are selected and removed;
* retraining (plain loss) runs from epoch c until the next phase starts (or training ends).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor



class ScheduleError(ValueError):
    """A pruning schedule that cannot run; raised at start-up."""


@dataclass
class Phase:
    """One pruning phase: its layers and its epoch windows (see module docstring)."""

    layers: list[str]
    l1_epochs: tuple[int, int]
    surgery_epoch: int | None = None
    target_sparsity: float | None = None  # overrides SparsityInduction's target_sparsity for this phase

    def __post_init__(self):
        self.layers = list(self.layers)
        self.l1_epochs = (int(self.l1_epochs[0]), int(self.l1_epochs[1]))
        if self.surgery_epoch is None:
            self.surgery_epoch = self.l1_epochs[1]

    @property
    def threshold_epoch(self) -> int:
        """Last epoch of the L1 window: the threshold is applied when it ends."""
        return self.l1_epochs[1] - 1

    @property
    def selection_epoch(self) -> int:
        """Epoch at whose end selection and surgery run."""
        return int(self.surgery_epoch) - 1


def validate_schedule(phases: list[Phase], names: list[str] | tuple[str, ...], max_epochs: int | None) -> None:
    """Fail at start-up, with a message saying what to change, on a schedule that cannot run (``names``: the
    network's layers in order, ``layer_names()`` of the pruning contract)."""
    names = list(names)
    if not phases:
        raise ScheduleError("the pruning schedule is empty: give at least one phase")
    prev_end = 0
    for i, p in enumerate(phases):
        unknown = [n for n in p.layers if n not in names]
        if unknown:
            raise ScheduleError(f"phase {i}: unknown layer(s) {unknown}; the model's layers are: {', '.join(names)}")
        order = [names.index(n) for n in p.layers]
        if order != sorted(order) or len(set(order)) != len(order):
            raise ScheduleError(f"phase {i}: layers must be distinct and in network order, got {p.layers}")
        a, b = p.l1_epochs
        if not 0 <= a < b:
            raise ScheduleError(f"phase {i}: l1_epochs must be [start, end) with 0 <= start < end, got {[a, b]}")
        if p.target_sparsity is not None and not 0.0 <= p.target_sparsity < 1.0:
            raise ScheduleError(f"phase {i}: target_sparsity must be in [0, 1), got {p.target_sparsity}")
        if p.surgery_epoch < b:
            raise ScheduleError(f"phase {i}: surgery_epoch {p.surgery_epoch} comes before the end of its L1 window {b}")
        if a < prev_end:
            raise ScheduleError(
                f"phase {i}: its L1 window starts at epoch {a}, before phase {i - 1}'s surgery at epoch {prev_end} "
                "(windows overlap); start it at or after that epoch")
        prev_end = p.surgery_epoch
        if max_epochs is not None and max_epochs > 0 and p.surgery_epoch >= max_epochs:
            raise ScheduleError(
                f"phase {i}: surgery at epoch {p.surgery_epoch} is not before trainer.max_epochs={max_epochs}; "
                "the pruned model would never be retrained. Raise max_epochs or move the phase earlier.")


@dataclass
class PruningState:
    """What the callbacks share and what a checkpoint must carry to resume mid-schedule."""

    phases: list[Phase]
    masks: dict[str, Tensor] = field(default_factory=dict)  # layer -> bool keep-mask of its weight
    thresholds: dict[int, float] = field(default_factory=dict)  # phase -> tau
    selection: dict[str, list[int]] = field(default_factory=dict)  # layer -> filter indices to remove
    surgeries: list[dict] = field(default_factory=list)  # one record per surgery done
    dense_stats: dict | None = None
    measure_dense_map: bool = True
    l1_rms: dict[int, dict[str, float]] = field(default_factory=dict)  # phase -> layer -> rms(W_l) as its L1 window began
    l1_weights: dict[str, Tensor] = field(default_factory=dict)  # layer -> Θ_L1, un-thresholded (if a surgery wants it)
    keep_l1_weights: bool = False  # set by StructuredSurgery(init_from="l1")
    l1_candidates: dict[str, Tensor] = field(default_factory=dict)  # layer -> channels under L1 (l1_target below_budget)
    taylor: dict[str, Tensor] = field(default_factory=dict)  # layer -> sum over steps of (gamma g_gamma + beta g_beta)^2
    taylor_steps: int = 0  # the steps summed in ``taylor`` (since the last epoch start)
    lr_restart: dict | None = None  # the retraining's restarted schedule (StructuredSurgery retrain_lr="restart")

    def active_l1_phase(self, epoch: int) -> Phase | None:
        for p in self.phases:
            if p.l1_epochs[0] <= epoch < p.l1_epochs[1]:
                return p
        return None

    def phase_index(self, phase: Phase) -> int:
        return self.phases.index(phase)

    def state_dict(self) -> dict:
        return {
            "masks": {k: v.cpu() for k, v in self.masks.items()},
            "thresholds": dict(self.thresholds),
            "selection": {k: list(v) for k, v in self.selection.items()},
            "surgeries": list(self.surgeries),
            "dense_stats": self.dense_stats,
            "l1_rms": {int(k): dict(v) for k, v in self.l1_rms.items()},
            "l1_weights": {k: v.cpu() for k, v in self.l1_weights.items()},
            "l1_candidates": {k: v.cpu() for k, v in self.l1_candidates.items()},
            "taylor": {k: v.cpu() for k, v in self.taylor.items()},
            "taylor_steps": self.taylor_steps,
            "lr_restart": self.lr_restart,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.masks = {k: v.bool() for k, v in sd.get("masks", {}).items()}
        self.thresholds = {int(k): float(v) for k, v in sd.get("thresholds", {}).items()}
        self.selection = {k: list(v) for k, v in sd.get("selection", {}).items()}
        self.surgeries = list(sd.get("surgeries", []))
        self.dense_stats = sd.get("dense_stats")
        self.l1_rms = {int(k): dict(v) for k, v in sd.get("l1_rms", {}).items()}
        self.l1_weights = dict(sd.get("l1_weights", {}))
        self.l1_candidates = {k: v.bool() for k, v in sd.get("l1_candidates", {}).items()}
        self.taylor = dict(sd.get("taylor", {}))
        self.taylor_steps = int(sd.get("taylor_steps", 0))
        self.lr_restart = sd.get("lr_restart")


def find_state(trainer) -> PruningState:
    """The state owned by the trainer's ``SparsityInduction`` callback (which declares the schedule)."""
    for cb in trainer.callbacks:
        if isinstance(getattr(cb, "state", None), PruningState):
            return cb.state
    raise RuntimeError("FilterSelection and StructuredSurgery need a SparsityInduction callback, which declares "
                       "the pruning schedule; add it to trainer.callbacks before them")


PRUNING_STAGES = ("SparsityInduction", "FilterSelection", "StructuredSurgery")  # each callback's ``pruning_stage``


def callback_order_check(trainer) -> None:
    """The three pruning callbacks, once each, in stage order (each names its stage in ``pruning_stage``)."""
    kinds = [cb.pruning_stage for cb in trainer.callbacks if getattr(cb, "pruning_stage", None) in PRUNING_STAGES]
    if kinds and PRUNING_STAGES[0] not in kinds:
        raise ScheduleError(f"{' and '.join(kinds)} need a SparsityInduction callback, which declares the pruning "
                            "schedule; add it to trainer.callbacks before them")
    expected = [k for k in PRUNING_STAGES if k in kinds]
    if kinds != expected or len(kinds) != len(set(kinds)):
        raise ScheduleError("pruning callbacks must appear once each, in the order SparsityInduction, FilterSelection, "
                            f"StructuredSurgery; got {kinds}")


@torch.no_grad()
def apply_masks(model, masks: dict[str, Tensor], optimizer=None) -> None:
    """Zero masked weights (and their optimiser state, so momentum cannot revive them). A mask shaped like the
    layer's weight masks weights; a 1-D mask masks whole channels: the layer's BatchNorm scale and shift, so a
    masked channel outputs exactly zero (sparsity on BatchNorm scales)."""
    for name, mask in masks.items():
        if mask.dim() == 1:
            bn = model.norms[name] if name in getattr(model, "norms", {}) else None
            params = [bn.weight, bn.bias] if bn is not None and bn.weight.shape == mask.shape else []
        else:
            w = model.layers[name].weight
            params = [w] if w.shape == mask.shape else []
        for p in params:
            m = mask.to(p.device)
            p.mul_(m)
            if optimizer is not None:
                st = optimizer.state.get(p, {})
                for key in ("momentum_buffer", "exp_avg"):
                    if isinstance(st.get(key), Tensor):
                        st[key].mul_(m)

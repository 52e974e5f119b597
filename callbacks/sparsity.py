"""SparsityInduction: paper A's stage 1 — L1 training of a phase's weights, then the improved global threshold.

It declares the pruning schedule and owns the state the three pruning callbacks share.
"""

from __future__ import annotations

import warnings

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from callbacks.budget import BilinearCost, architecture_cost, channel_macs, consumer_weight, kept_widths
from callbacks.report import measure_model
from callbacks.selection import kept_width, prunable_layers
from callbacks.state import Phase, PruningState, ScheduleError, apply_masks, callback_order_check, validate_schedule
from lightning_modules.contract import check_prunable, consumer_columns


def rms(w: Tensor) -> float:
    return float(w.detach().float().pow(2).mean().sqrt().clamp(min=1e-12))


def normalised_magnitudes(weights: dict[str, Tensor], scale: dict[str, float] | None = None) -> dict[str, Tensor]:
    """|w| / s_l: the layer-normalised magnitude the improved global threshold compares with one tau.

    A plain global magnitude threshold over-prunes layers whose weights are small (wide layers such as
    conv6/conv7, METHOD.md); normalising each layer by its scale s_l puts all layers on one scale. ``scale``
    gives s_l per layer (e.g. the RMS before L1 training); by default s_l = rms(W_l) now.
    """
    out = {}
    for name, w in weights.items():
        s_l = scale[name] if scale is not None else rms(w)
        out[name] = w.detach().float().abs() / max(s_l, 1e-12)
    return out


def tau_for_sparsity(norm: dict[str, Tensor], sparsity: float) -> float:
    """The tau that zeroes the fraction ``sparsity`` of the phase's weights."""
    flat = torch.cat([v.flatten().cpu() for v in norm.values()])
    k = int(round(sparsity * flat.numel()))
    if k <= 0:
        return 0.0
    return float(flat.kthvalue(min(k, flat.numel())).values)


def layer_relative(scores: Tensor) -> Tensor:
    """A layer's channel scores divided by their mean (Torch-Pruning's mean normaliser)."""
    return scores / scores.mean().clamp(min=1e-12)


def masks_for_tau(norm: dict[str, Tensor], tau: float) -> dict[str, Tensor]:
    return {name: v > tau for name, v in norm.items()}


@torch.no_grad()
def group_l1(model, name: str) -> Tensor:
    """Per channel of ``name``: the mean over the tensors its removal cuts (filter, bias, BatchNorm scale and shift,
    its column in every consumer) of that slice's L1 norm (Torch-Pruning's group magnitude, p=1, mean reduction)."""
    conv = model.layers[name]
    c = conv.out_channels
    parts = [conv.weight.detach().abs().flatten(1).sum(1)]
    if conv.bias is not None:
        parts.append(conv.bias.detach().abs())
    if name in model.norms:
        parts += [model.norms[name].weight.detach().abs(), model.norms[name].bias.detach().abs()]
    parts += [consumer_columns(m, c).abs().sum(1) for m in model.consumers(name)]
    return torch.stack([p.float() for p in parts]).mean(0)


class SparsityInduction(Callback):
    """L1 sparsity training and the improved global threshold, per phase of ``schedule``.

    During a phase's L1 window, adds ``l1_lambda * sign(W)`` to the gradients of the phase's conv weights (the
    subgradient of ``l1_lambda * sum ||W_l||_1``; ``l1_mode="gradient"``, paper A with SGD), or, with
    ``l1_mode="proximal"``, soft-thresholds them after each optimiser step by ``lr * l1_lambda`` (for Adam-type
    optimisers, whose per-weight normalisation turns a gradient-side L1 term into a step of fixed size ~lr that
    ignores ``l1_lambda``). When the window ends, zeroes every weight whose layer-normalised magnitude
    |w| / s_l is <= one global tau. ``threshold_norm`` picks s_l: ``"rms"`` = rms(W_l) now (after L1 training, so it
    cancels a layer-wide shrink that L1 training caused), ``"rms_before_l1"`` = rms(W_l) when the phase's L1 window
    began (a layer that L1 training shrank as a whole is cut harder: the signal paper A's L1 stage creates),
    ``"none"`` = 1 (a plain global magnitude threshold). tau is chosen by ``threshold_mode``:

    * ``target_sparsity``: tau zeroes ``target_sparsity`` of the phase's weights (a phase may set its own);
    * ``max_map_drop``: the largest sparsity (binary search, ``search_steps`` evaluations) whose VOC mAP@0.5 on
      ``search_batches`` validation batches drops by at most ``max_map_drop`` (absolute).

    Zeroed weights (and their momentum) are held at exactly zero after every optimiser step until the surgery.

    ``sparsity_on="bn_scale"`` (BatchNorm models) works on channels instead of weights: the L1 term acts on the
    BatchNorm scales gamma of the filters the phase may remove (Liu et al. 2017, "Network Slimming": with BatchNorm
    after a conv, an L1 term on the conv weights only rescales them), channels are ranked by one global score and the
    lowest are masked (gamma and beta held at 0). The score is |gamma| (``channel_score="gamma"``) or |gamma| times
    how strongly the consumers read the channel (``"gamma_g"``: paper A's G_i, as a magnitude over the next conv and
    the detection heads), optionally divided by its layer's mean score (``score_norm="layer_mean"``, as Torch-Pruning's
    mean normaliser: a layer whose scales L1 training shrank as a whole is not wiped out), divided by (the channel's
    relative MAC cost) ** ``cost_exponent`` (0: cost-blind; ``"balance"``, with a params and a MACs budget: the
    exponent in [0, 1] at which the pruned model spends both budgets alike, searched each time channels are ranked and
    logged as ``prune/phase<i>/cost_exponent``; cost-blind, a tight MACs budget binds and leaves parameters unspent,
    fully priced the params budget does and MACs are left); or ``"group_l1"``, the mean L1 norm of everything the
    channel's removal deletes (its filter, bias, BatchNorm scale and shift, and its columns in every consumer):
    Torch-Pruning's ``GroupMagnitudeImportance(p=1)`` (DepGraph, Fang et al. 2023), here as a channel score; or
    ``"taylor"``, the first-order Taylor estimate of the loss change when the channel's BatchNorm output is removed,
    (gamma * dL/dgamma + beta * dL/dbeta) ** 2 per step, averaged over the steps of the last epoch (Molchanov et al.
    2019, "Importance Estimation for Neural Network Pruning", the criterion on BatchNorm gates): a loss-based score
    that sees which channels the data set needs; its raw values differ by orders of magnitude between layers, so use
    it with ``score_norm="layer_mean"`` (benchmarks/README.md: raw, a MACs budget left one layer wide and the rest at
    ``min_width``); or ``"taylor_gamma_g"``, the geometric mean of the two, each first taken relative to its layer's
    mean (the Taylor score as its square root, so both are linear in the channel's scale): a channel goes when the
    loss barely needs it *and* its consumers barely read it (a data-driven and a weight-driven criterion together:
    the Taylor score alone won on facemask and lost on the synthetic set to ``gamma_g``; measured, the mix ties
    ``taylor`` on facemask and loses 1.2 points on the synthetic set: benchmarks/README.md, "Five seeds of the
    default"). ``taylor_loss`` picks the loss whose change the Taylor score estimates: ``"train"``, the training
    loss (its gradients are free: the training backward already computed them), or ``"class_balanced"``, the module's
    ``class_balanced_loss()`` (every class weighted by its inverse label frequency, so each counts as much as it does
    in mAP or mean per-class accuracy; one extra backward pass per step in the epochs whose scores are read). The
    training loss is dominated by the frequent classes, so its Taylor score cuts first the channels only a rare class
    uses; on facemask almost all of the drop against the dense run is in the rare class ``without_mask`` (the
    pattern Hooker et al. 2019, "What Do Compressed Deep Neural Networks Forget?", describe). Measured, the
    class-balanced score is level with the training loss's (paired medians +0.1 points on facemask over 5 seeds, -0.3
    on the synthetic set over 3) and the rare class's AP does not move: benchmarks/README.md, "A class-balanced Taylor
    score". How many
    go: ``target_sparsity`` (a fraction of channels), ``max_map_drop``, or a budget ``target_params_x`` and/or
    ``target_macs_x`` (dense / x, met by the architecture the selection will keep: ``callbacks/budget.py``; with both,
    the fewest channels go that meet both: a size budget and a speed budget at once), or an absolute one,
    ``target_params`` / ``target_macs`` (a deployment limit; e.g. paper A's "200x" of the full VGG16 is 75,000
    parameters, which a ``width_mult`` 0.25 run then meets at about 12.6x).

    ``target_channels`` (``bn_scale`` only) gives the architecture instead of a budget: each named layer keeps that many
    channels, its best-scored ones (e.g. paper A's Table 1 widths, or another tool's): the score then only decides
    *which* channels of a layer go, not how many.

    ``l1_target="below_budget"`` (``bn_scale`` only) puts the L1 pressure only on the channels that would go if the
    threshold were taken now: at the start of each epoch of the L1 window the channels are ranked as above, those at
    or under the budget's tau become the candidates, and the proximal step shrinks *their* gamma and beta towards 0
    while every other channel trains freely. The channels that stay are not shrunk for the whole window (with
    ``"all"`` every scale is), and the ones that go fade out over the window instead of being cut at once, so the
    surgery removes channels that already output ~0. This is the targeted penalty of Wang et al. 2021, "Neural
    Pruning via Growing Regularization" (GReg-1: regularise only the filters chosen for removal), with paper A's
    sparsity-then-threshold order kept; the candidates are re-chosen every epoch, so a channel may still come back.
    The dense model is then measured when the window starts, before any channel is shrunk.

    ``fill_budget`` (with a budget): the global tau stops at the first architecture that meets *every* budget, so
    with two (params and MACs) the one that binds last leaves the other partly unspent (taylor scores with a 4x
    params and a 2.75x MACs budget: ~4.8x params). Filling then puts channels back, the best-scored block of
    ``round_to`` channels first over all layers, as long as the architecture stays within every budget (a greedy
    knapsack fill, as NetAdapt / AMC spend a resource budget to its limit instead of stopping under it). It stops when
    no block fits any more, so with two budgets the model ends at one of them and may stay under the other: e.g. on
    facemask (`benchmarks/sweep/tcbf.yaml`, seeds 3 and 4) at 4.5x / 4.7x params with the MACs exactly at theirs
    (198.94 M against 198.95 M), because every block left would have cost MACs the budget no longer had.
    ``fill_swap`` then trades: one block out of a layer, the other layers filled greedily again, kept when the kept
    channels' scores add up to more; repeated until no trade adds any (a local search of the two-budget knapsack).
    A block of an expensive early layer can so buy several blocks of cheap late ones. The candidates of the threshold
    search, the fill, the trades and ``cost_exponent: balance`` are priced by ``callbacks.budget.BilinearCost``
    (exact, without building a network; made once per architecture) and the chosen widths checked by building them.

    Every channel mask (the candidates, the threshold, ``target_channels``) keeps exactly the width the surgery keeps:
    at least ``FilterSelection.min_width``, rounded up to its ``round_to``, the best-scored channels. A channel that
    only the rounding keeps is therefore never masked or faded: masked, its scale and shift sit at 0 and it would
    leave the surgery dead (ReLU(0) passes no gradient) while counting in the parameters.
    """

    pruning_stage = "SparsityInduction"

    def __init__(
        self,
        schedule: list[Phase],
        l1_lambda: float = 1e-4,
        l1_mode: str = "gradient",
        threshold_mode: str = "target_sparsity",
        target_sparsity: float = 0.5,
        max_map_drop: float = 0.01,
        search_batches: int = 5,
        search_steps: int = 6,
        threshold_norm: str = "rms",
        sparsity_on: str = "weights",
        cost_exponent: float | str = 0.0,
        channel_score: str = "gamma",
        score_norm: str = "none",
        target_params_x: float | None = None,
        target_macs_x: float | None = None,
        target_params: int | None = None,
        target_macs: int | None = None,
        l1_target: str = "all",
        target_channels: dict[str, int] | None = None,
        fill_budget: bool = False,
        fill_swap: bool = False,
        taylor_loss: str = "train",
    ):
        if threshold_mode not in ("target_sparsity", "max_map_drop"):
            raise ValueError(f"threshold_mode must be 'target_sparsity' or 'max_map_drop', got {threshold_mode!r}")
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}")
        phases = [p if isinstance(p, Phase) else Phase(**p) for p in schedule]
        self.state = PruningState(phases)
        self.l1_lambda = l1_lambda
        if l1_mode not in ("gradient", "proximal"):
            raise ValueError(f"l1_mode must be 'gradient' or 'proximal', got {l1_mode!r}")
        self.l1_mode = l1_mode
        self.threshold_mode = threshold_mode
        self.target_sparsity = target_sparsity
        self.max_map_drop = max_map_drop
        self.search_batches = search_batches
        self.search_steps = search_steps
        if threshold_norm not in ("rms", "rms_before_l1", "none"):
            raise ValueError(f"threshold_norm must be 'rms', 'rms_before_l1' or 'none', got {threshold_norm!r}")
        self.threshold_norm = threshold_norm
        if sparsity_on not in ("weights", "bn_scale"):
            raise ValueError(f"sparsity_on must be 'weights' or 'bn_scale', got {sparsity_on!r}")
        self.sparsity_on = sparsity_on
        if target_params and target_params_x or target_macs and target_macs_x:
            raise ValueError("give a budget either as a ratio (target_params_x / target_macs_x) or as a count "
                             "(target_params / target_macs), not both")
        for k, v in {"target_params": target_params, "target_macs": target_macs}.items():
            if v is not None and v <= 0:
                raise ValueError(f"{k} is a count and must be > 0, got {v}")
        self.target_params, self.target_macs = target_params, target_macs
        budget = bool(target_params_x or target_macs_x or target_params or target_macs)
        if (budget or cost_exponent) and sparsity_on != "bn_scale":
            raise ValueError("cost_exponent, target_params(_x) and target_macs(_x) work on channels: sparsity_on: bn_scale")
        for k, v in {"target_params_x": target_params_x, "target_macs_x": target_macs_x}.items():
            if v is not None and v <= 1.0:
                raise ValueError(f"{k} is a compression ratio against the dense model and must be > 1, got {v}")
        if isinstance(cost_exponent, str) and cost_exponent != "balance":
            raise ValueError(f"cost_exponent is a number (0: cost-blind) or 'balance', got {cost_exponent!r}")
        if cost_exponent == "balance" and not ((target_params_x or target_params) and (target_macs_x or target_macs)):
            raise ValueError("cost_exponent: balance spends a params and a MACs budget alike: give both "
                             "(target_params(_x) and target_macs(_x))")
        self.cost_exponent = cost_exponent
        if channel_score not in ("gamma", "gamma_g", "group_l1", "taylor", "taylor_gamma_g"):
            raise ValueError("channel_score must be 'gamma', 'gamma_g', 'group_l1', 'taylor' or 'taylor_gamma_g', "
                             f"got {channel_score!r}")
        if channel_score.startswith("taylor") and sparsity_on != "bn_scale":
            raise ValueError(f"channel_score: {channel_score} scores BatchNorm gates: it needs sparsity_on: bn_scale")
        self.channel_score = channel_score
        if score_norm not in ("none", "layer_mean"):
            raise ValueError(f"score_norm must be 'none' or 'layer_mean', got {score_norm!r}")
        self.score_norm = score_norm
        self.target_params_x, self.target_macs_x = target_params_x, target_macs_x
        if l1_target not in ("all", "below_budget"):
            raise ValueError(f"l1_target must be 'all' or 'below_budget', got {l1_target!r}")
        if l1_target == "below_budget" and sparsity_on != "bn_scale":
            raise ValueError("l1_target: below_budget ranks channels: it needs sparsity_on: bn_scale")
        if l1_target == "below_budget" and threshold_mode == "max_map_drop" and not (budget or target_channels):
            raise ValueError("l1_target: below_budget needs to know how many channels go before the threshold: give "
                             "a budget (target_params(_x), target_macs(_x)), target_channels or threshold_mode: "
                             "target_sparsity")
        self.l1_target = l1_target
        if target_channels and sparsity_on != "bn_scale":
            raise ValueError("target_channels picks channels: it needs sparsity_on: bn_scale")
        if target_channels and budget:
            raise ValueError("give either target_channels (the widths) or a budget (target_params(_x) / target_macs(_x))")
        self.target_channels = dict(target_channels or {})
        if fill_budget and not budget:
            raise ValueError("fill_budget spends what a budget leaves: give target_params(_x) and/or target_macs(_x)")
        self.fill_budget = fill_budget
        if fill_swap and not fill_budget:
            raise ValueError("fill_swap improves on fill_budget's fill: set fill_budget: true as well")
        self.fill_swap = fill_swap
        if taylor_loss not in ("train", "class_balanced"):
            raise ValueError(f"taylor_loss must be 'train' or 'class_balanced', got {taylor_loss!r}")
        if taylor_loss != "train" and not channel_score.startswith("taylor"):
            raise ValueError(f"taylor_loss: {taylor_loss} chooses the loss of a Taylor score: it needs channel_score "
                             f"taylor or taylor_gamma_g, got {channel_score!r}")
        self.taylor_loss = taylor_loss
        self._l1_where: tuple | None = None  # _proximal_step's entry masks, with the terms they belong to
        self._pricer_cache: tuple | None = None  # (architecture, measures) -> BilinearCost or None: _pricer

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.preflight(trainer, pl_module, trainer.datamodule)

    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule, datamodule) -> None:
        """Refuse a schedule that cannot run on this model, trainer and data (``ScheduleError``, saying what to
        change). ``setup`` calls it; ``train.py`` calls it as well before the run starts logging, so a typo in a
        schedule leaves no W&B run behind. Reads only: the same answer both times."""
        callback_order_check(trainer)
        if self.threshold_mode == "max_map_drop" and getattr(datamodule, "val_is_test", False):
            raise ScheduleError("threshold_mode max_map_drop chooses the threshold on validation data, and the "
                                "validation split is the test split: carve one out of the training data with "
                                "--data.val_fraction 0.1 (or name one with --data.val_set)")
        # fast_dev_run forces a single epoch: a smoke test of the wiring, not of the schedule's length
        check_prunable(pl_module)
        validate_schedule(self.state.phases, pl_module.model.layer_names(),
                          None if trainer.fast_dev_run else trainer.max_epochs)
        for p in self.state.phases:
            missing = [n for n in p.layers if n not in pl_module.model.layers]
            if missing:
                raise ScheduleError(f"schedule names layers the model does not have (dropped branches?): {missing}")
        widths = pl_module.model.channels
        bad = {n: w for n, w in self.target_channels.items() if n not in widths or not 1 <= int(w) <= widths[n]}
        if bad:
            raise ScheduleError(f"target_channels {bad}: each must name a layer of the model with 1 <= width <= its "
                                f"current width ({widths})")
        if self.channel_score.startswith("taylor") and min(p.l1_epochs[0] for p in self.state.phases) < 1:
            raise ScheduleError("channel_score: taylor averages the gradients of the epoch before a channel is scored: "
                                "start the first L1 window at epoch 1 or later")
        if self.taylor_loss == "class_balanced" and not callable(getattr(pl_module, "class_balanced_loss", None)):
            raise TypeError(f"taylor_loss: class_balanced differentiates the module's class-balanced loss, and "
                            f"{type(pl_module).__name__} has no class_balanced_loss() (the optional part of the pruning "
                            "contract, lightning_modules/contract.py); use taylor_loss: train")
        if self.sparsity_on == "bn_scale" and not len(getattr(pl_module.model, "norms", {})):
            raise ScheduleError("sparsity_on: bn_scale induces sparsity on BatchNorm scales; the model has no "
                                "BatchNorm (set --model.batch_norm true, or sparsity_on: weights)")

    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.state.load_state_dict(state_dict)

    # ------------------------------------------------------------------ L1 and masks
    def l1_params(self, pl_module, phase: Phase) -> list[Tensor]:
        """What the L1 term acts on: the phase's conv weights, or (``bn_scale``) the BatchNorm scales of the
        filters the phase may remove."""
        model = pl_module.model
        if self.sparsity_on == "weights":
            return [model.layers[n].weight for n in phase.layers]
        last = self.state.phase_index(phase) == len(self.state.phases) - 1
        return [model.norms[n].weight for n in prunable_layers(phase, last, model.never_prune) if n in model.norms]

    def l1_terms(self, pl_module, phase: Phase) -> list[tuple[Tensor, Tensor | None]]:
        """(tensor, which of its entries the L1 term acts on; None = all): ``l1_params``, or with
        ``l1_target="below_budget"`` the gamma and beta of the candidate channels only."""
        if self.l1_target != "below_budget":
            return [(w, None) for w in self.l1_params(pl_module, phase)]
        norms = pl_module.model.norms
        return [(t, m.to(t.device)) for n, m in self.state.l1_candidates.items() if n in norms
                for t in (norms[n].weight, norms[n].bias) if t.shape == m.shape]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if (self.channel_score.startswith("taylor") and self.taylor_loss == "train"
                and self._taylor_read_after(trainer.current_epoch)):
            self._accumulate_taylor(pl_module, None)
        phase = self.state.active_l1_phase(trainer.current_epoch)
        if phase is None or self.l1_lambda == 0 or self.l1_mode != "gradient":
            return
        with torch.no_grad():
            for w, m in self.l1_terms(pl_module, phase):
                if w.grad is not None:
                    w.grad.add_(torch.sign(w) if m is None else torch.sign(w) * m, alpha=self.l1_lambda)

    def _taylor_layers(self, pl_module) -> list[str]:
        norms = pl_module.model.norms
        return sorted({n for p in self.state.phases for n in p.layers if n in norms})

    def _taylor_read_after(self, epoch: int) -> bool:
        """Whether the Taylor sums of this epoch are read at its end or at the next epoch's start."""
        for p in self.state.phases:
            if self.l1_target == "below_budget" and p.l1_epochs[0] <= epoch + 1 < p.l1_epochs[1]:
                return True  # the candidates of the next L1 epoch
            if self.l1_target != "below_budget" and p.threshold_epoch == epoch:
                return True  # the threshold at this epoch's end
        return False

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        """``taylor_loss="class_balanced"``: before the training backward, the gradients of the module's
        class-balanced loss with respect to the BatchNorm gates (one extra backward pass, only in the epochs whose
        scores are read), averaged over the ranks under DDP, go into the Taylor sums."""
        if self.taylor_loss != "class_balanced" or not self._taylor_read_after(trainer.current_epoch):
            return
        norms = pl_module.model.norms
        names = self._taylor_layers(pl_module)
        params = [t for n in names for t in (norms[n].weight, norms[n].bias) if t is not None]
        grads = torch.autograd.grad(pl_module.class_balanced_loss(), params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if trainer.world_size > 1:  # one flat all-reduce: every rank then holds the same sums
            flat = torch.cat([g.reshape(-1) for g in grads])
            flat = trainer.strategy.reduce(flat, reduce_op="mean")
            grads = list(flat.split([g.numel() for g in grads]))
        self._accumulate_taylor(pl_module, {id(p): g.view_as(p) for p, g in zip(params, grads)})

    @torch.no_grad()
    def _accumulate_taylor(self, pl_module, grads: dict | None) -> None:
        """Add this step's (gamma g_gamma + beta g_beta) ** 2 of every prunable channel: the raw training gradients
        (``grads`` None: this hook runs before clipping and before a gradient-side L1 term is added), or the given
        ones (id(parameter) -> gradient: the class-balanced loss's). Only in the epochs whose sums are read
        (``_taylor_read_after``), and as a few multi-tensor operations over all layers, not a few per layer: on a GPU
        every operation is a kernel launch, and this runs every step."""
        norms, st = pl_module.model.norms, self.state

        def grad(t):
            return t.grad if grads is None else grads.get(id(t))

        names = [n for n in self._taylor_layers(pl_module) if grad(norms[n].weight) is not None]
        if names:
            terms = torch._foreach_mul([grad(norms[n].weight).float() for n in names],
                                       [norms[n].weight.float() for n in names])
            with_bias = [i for i, n in enumerate(names)
                         if norms[n].bias is not None and grad(norms[n].bias) is not None]
            if with_bias:
                torch._foreach_addcmul_([terms[i] for i in with_bias],
                                        [grad(norms[names[i]].bias).float() for i in with_bias],
                                        [norms[names[i]].bias.float() for i in with_bias])
            torch._foreach_mul_(terms, terms)
            prev = [st.taylor.get(n) for n in names]
            running = [i for i, (p, t) in enumerate(zip(prev, terms)) if p is not None and p.shape == t.shape]
            if running:
                torch._foreach_add_([terms[i] for i in running], [prev[i].to(terms[i].device) for i in running])
            st.taylor.update(zip(names, terms))
        st.taylor_steps += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        phase = self.state.active_l1_phase(trainer.current_epoch)
        if phase is not None and self.l1_mode == "proximal" and self.l1_lambda > 0 and trainer.optimizers:
            self._proximal_step(pl_module, phase, trainer.optimizers[0])
        if self.state.masks:
            apply_masks(pl_module.model, self.state.masks, trainer.optimizers[0] if trainer.optimizers else None)

    @torch.no_grad()
    def _proximal_step(self, pl_module, phase, optimizer) -> None:
        """Soft-threshold after the optimiser step: |w| shrinks by lr * l1_lambda, stopping at exactly 0 (the
        proximal operator of the L1 term, decoupled from the optimiser as AdamW decouples weight decay). Entries the
        term does not act on (``l1_target="below_budget"``) shrink by 0, i.e. stay exactly as they are. A few
        multi-tensor operations over every tensor of the term (on a GPU each operation is a kernel launch)."""
        terms = self.l1_terms(pl_module, phase)
        if not terms:
            return
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        ws = [w for w, _ in terms]
        cached = self._l1_where  # which entries the term acts on, as 1.0 / 0.0: made again when the terms change
        if (cached is None or cached[0] is not self.state.l1_candidates or len(cached[1]) != len(ws)
                or any(a is not b for a, b in zip(cached[1], ws))):
            self._l1_where = cached = (self.state.l1_candidates, ws,
                                       [torch.ones_like(w) if m is None else m.to(w.dtype) for w, m in terms])
        amount = torch._foreach_mul(cached[2], [lr_of.get(id(w), 0.0) * self.l1_lambda for w in ws])
        magnitude = torch._foreach_abs(ws)
        torch._foreach_sub_(magnitude, amount)
        torch._foreach_clamp_min_(magnitude, 0.0)
        torch._foreach_mul_(magnitude, torch._foreach_sign(ws))
        torch._foreach_copy_(ws, magnitude)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        for i, phase in enumerate(self.state.phases):
            if phase.l1_epochs[0] == trainer.current_epoch and i not in self.state.l1_rms:
                self.state.l1_rms[i] = {n: rms(pl_module.model.layers[n].weight) for n in phase.layers}
        phase = self.state.active_l1_phase(trainer.current_epoch)
        if self.l1_target == "below_budget" and phase is not None:
            self.choose_candidates(trainer, pl_module, self.state.phase_index(phase))
        self.state.taylor, self.state.taylor_steps = {}, 0  # each epoch's scores come from its own steps

    @torch.no_grad()
    def choose_candidates(self, trainer, pl_module, index: int) -> None:
        """``l1_target="below_budget"``: the channels the threshold would remove now get the L1 term this epoch."""
        if self.state.dense_stats is None:  # the dense model, before any channel is shrunk
            self.state.dense_stats = measure_model(trainer, pl_module, with_map=self.state.measure_dense_map)
            key = f"{pl_module.quality}_before_pruning_epoch"
            if key in self.state.dense_stats:  # taken before this epoch: at the last one's end
                self.state.dense_stats[key] = trainer.current_epoch - 1
        masks, tau = self._channel_masks(trainer, pl_module, index)
        self.state.l1_candidates = {n: ~m for n, m in masks.items()}
        self._candidate_tau = tau
        total = sum(m.numel() for m in self.state.l1_candidates.values())
        pl_module.log(f"prune/phase{index}/l1_candidates",
                      sum(int(m.sum()) for m in self.state.l1_candidates.values()) / max(total, 1))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        for i, phase in enumerate(self.state.phases):
            if phase.threshold_epoch == trainer.current_epoch and i not in self.state.thresholds:
                self.threshold(trainer, pl_module, i)

    # ------------------------------------------------------------------ the improved global threshold
    @torch.no_grad()
    def threshold(self, trainer, pl_module, index: int) -> float:
        phase = self.state.phases[index]
        if self.state.dense_stats is None:  # the dense model, before anything is zeroed (compression report)
            self.state.dense_stats = measure_model(trainer, pl_module, with_map=self.state.measure_dense_map)
        if self.sparsity_on == "bn_scale":
            return self._threshold_channels(trainer, pl_module, index)
        weights = {n: pl_module.model.layers[n].weight for n in phase.layers}
        if self.state.keep_l1_weights:  # Θ_L1, for a surgery that initialises the kept filters from it (paper A)
            self.state.l1_weights.update({n: w.detach().clone() for n, w in weights.items()})
        if self.threshold_norm == "rms_before_l1" and index in self.state.l1_rms:
            norm = normalised_magnitudes(weights, self.state.l1_rms[index])
        elif self.threshold_norm == "none":
            norm = normalised_magnitudes(weights, {n: 1.0 for n in weights})
        else:
            norm = normalised_magnitudes(weights)
        if self.threshold_mode == "target_sparsity":
            target = self.target_sparsity if phase.target_sparsity is None else phase.target_sparsity
            tau = tau_for_sparsity(norm, target)
        else:
            tau = self._search_tau(trainer, pl_module, norm, list(weights.values()))
        tau = float(trainer.strategy.broadcast(tau, src=0))
        masks = masks_for_tau(norm, tau)
        if trainer.world_size > 1:  # decided once: every rank takes rank 0's masks
            device = next(iter(masks.values())).device
            masks = {n: m.to(device) for n, m in trainer.strategy.broadcast({n: m.cpu() for n, m in masks.items()}, src=0).items()}
        self.state.masks.update(masks)
        self.state.thresholds[index] = tau
        apply_masks(pl_module.model, masks, trainer.optimizers[0] if trainer.optimizers else None)
        total = sum(m.numel() for m in masks.values())
        zeros = sum(int((~m).sum()) for m in masks.values())
        pl_module.log(f"prune/phase{index}/tau", tau)
        pl_module.log(f"prune/phase{index}/sparsity", zeros / total)
        for name, m in masks.items():
            pl_module.log(f"prune/sparsity/{name}", 1.0 - m.float().mean().item())
        return tau

    @torch.no_grad()
    def _threshold_channels(self, trainer, pl_module, index: int) -> float:
        """``bn_scale``: one global tau on the channel scores (``_channel_scores``: |gamma| as in Liu et al. 2017,
        "Network Slimming", or another ``channel_score``, optionally normalised) over the filters the phase may
        remove, or exactly the faded-out candidates (``l1_target="below_budget"``); channels at or under tau are
        masked (gamma and beta held at 0, so the channel outputs 0 and its removal changes nothing)."""
        if self.l1_target == "below_budget" and self.state.l1_candidates:
            # what was faded out is what goes (the candidates met the budget when they were chosen)
            masks = {n: ~c.to(pl_module.model.norms[n].weight.device) for n, c in self.state.l1_candidates.items()}
            tau = getattr(self, "_candidate_tau", float("nan"))
        else:
            masks, tau = self._channel_masks(trainer, pl_module, index)
        self.state.masks.update(masks)
        self.state.thresholds[index] = tau
        self.state.l1_candidates = {}
        apply_masks(pl_module.model, masks, trainer.optimizers[0] if trainer.optimizers else None)
        total = sum(m.numel() for m in masks.values())
        pl_module.log(f"prune/phase{index}/tau", tau)
        pl_module.log(f"prune/phase{index}/sparsity", sum(int((~m).sum()) for m in masks.values()) / max(total, 1))
        return tau

    @torch.no_grad()
    def _channel_scores(self, pl_module, index: int) -> dict[str, Tensor]:
        """One score per channel of the phase's prunable layers (``channel_score``, ``score_norm``,
        ``cost_exponent``); the lowest go."""
        phase = self.state.phases[index]
        model = pl_module.model
        last = index == len(self.state.phases) - 1
        gammas = {n: model.norms[n].weight.detach().abs() for n in prunable_layers(phase, last, model.never_prune) if n in model.norms}
        if self.channel_score == "group_l1":
            gammas = {n: group_l1(model, n) for n in gammas}
        if self.channel_score == "taylor":
            gammas = {n: self._taylor_score(n, g) for n, g in gammas.items()}
        if self.channel_score == "gamma_g":  # paper A's two-layer view: a channel counts as much as it is read
            gammas = {n: g * consumer_weight(model, n) for n, g in gammas.items()}
        if self.channel_score == "taylor_gamma_g":  # both criteria, each relative to its layer's mean
            gammas = {n: (layer_relative(self._taylor_score(n, g).sqrt())
                          * layer_relative(g * consumer_weight(model, n))).sqrt() for n, g in gammas.items()}
        if self.score_norm == "layer_mean":  # each layer's scores relative to its mean: no layer collapses as a whole
            gammas = {n: layer_relative(g) for n, g in gammas.items()}
        if isinstance(self.cost_exponent, str) or not self.cost_exponent:  # "balance": priced in _channel_masks
            return gammas
        return self._priced(gammas, channel_macs(model), self.cost_exponent)

    @staticmethod
    def _priced(scores: dict[str, Tensor], cost: dict[str, float], exponent: float) -> dict[str, Tensor]:
        """MAC-aware ranking: each score / (``cost``, the MACs of one of its layer's channels, relative to the mean
        over the scored layers) ** ``exponent``."""
        if not exponent:
            return scores
        mean = sum(cost[n] for n in scores) / len(scores)
        return {n: g / (max(cost[n], 1.0) / mean) ** exponent for n, g in scores.items()}

    def _taylor_score(self, name: str, gamma: Tensor) -> Tensor:
        acc = self.state.taylor.get(name)
        if acc is None or acc.shape != gamma.shape or not self.state.taylor_steps:
            raise ScheduleError(f"channel_score taylor: no gradients of {name} were summed since the last epoch began "
                                "(the score needs an epoch of training steps before it is read)")
        return acc.to(gamma.device) / self.state.taylor_steps

    def _channel_masks(self, trainer, pl_module, index: int) -> tuple[dict[str, Tensor], float]:
        """Keep-masks of the phase's channels and the tau behind them (NaN for ``target_channels``: no tau).

        Each layer's mask keeps exactly the width the surgery will keep (``FilterSelection``'s ``min_width`` and
        ``round_to``), its best-scored channels: a channel under tau that the rounding puts back is *not* masked
        or faded. Masked, its BatchNorm scale and shift sit at 0, so after the surgery it would output ReLU(0) = 0
        with zero gradient: a dead channel that counts in the parameters (9-16 % of the channels of the 4x demo
        models at ``round_to: 8`` before this was fixed: benchmarks/README.md, "Dead channels")."""
        scores = self._channel_scores(pl_module, index)
        min_width, round_to = self._selection_rounding(trainer)
        if self.cost_exponent == "balance":
            cost = channel_macs(pl_module.model)
            exponent = float(trainer.strategy.broadcast(
                self._balanced_exponent(trainer, pl_module, scores, cost, min_width, round_to), src=0))
            scores = self._priced(scores, cost, exponent)
            pl_module.log(f"prune/phase{index}/cost_exponent", exponent)
        if self.target_channels:
            counts = {n: int(self.target_channels.get(n, sc.numel())) for n, sc in scores.items()}
            tau = float("nan")
        else:
            tau = float(trainer.strategy.broadcast(self._channel_tau(trainer, pl_module, index, scores), src=0))
            counts = {n: int(m.sum()) for n, m in masks_for_tau(scores, tau).items()}
            if self.fill_budget:
                counts = trainer.strategy.broadcast(self._fill(pl_module.model, scores, counts, min_width, round_to), src=0)
            if not self._priced_widths_hold(pl_module.model, counts, min_width, round_to):
                return self._channel_masks(trainer, pl_module, index)  # again, every candidate built and counted
        masks = {}
        for n, sc in scores.items():
            keep = torch.zeros_like(sc, dtype=torch.bool)
            keep[sc.argsort(descending=True, stable=True)[: kept_width(counts[n], sc.numel(), min_width, round_to)]] = True
            masks[n] = keep
        return masks, tau

    def _pricer(self, model) -> BilinearCost | None:
        """``BilinearCost`` of the budgets' measures over every layer's width, made once per architecture (the
        masks of an L1 window do not change it; a surgery does), or None where it does not reproduce
        ``architecture_cost`` at the present widths (then every candidate is built and counted). With it the
        threshold search, the fill, the swap and ``cost_exponent: balance`` price thousands of candidate widths
        without building a network: at full SSD300 width a build and MAC count takes ~1-2 s on a CPU core."""
        measures = tuple(self._budgets())
        key = (tuple(model.channels.items()), measures)
        if self._pricer_cache is None or self._pricer_cache[0] != key:
            cost = BilinearCost(model, list(model.channels), measures)
            self._pricer_cache = (key, cost if cost.exact_at(dict(model.channels)) else None)
        return self._pricer_cache[1]

    def _cost(self, model, widths: dict[str, int], measure: str) -> int:
        """``architecture_cost`` at ``widths`` (the layers not named at their present width), priced by ``_pricer``
        where it can."""
        pricer, widths = self._pricer(model), dict(model.channels, **widths)
        return pricer(widths, measure) if pricer else architecture_cost(model, widths, measure)

    def _priced_widths_hold(self, model, counts: dict[str, int], min_width: int, round_to: int) -> bool:
        """The chosen widths, built and counted, meet every budget; if the pricing said so wrongly, it is dropped
        for this architecture (with a warning) and False returned, so the caller chooses again without it."""
        budgets = self._budgets()
        if not budgets or self._pricer(model) is None:
            return True
        widths = dict(model.channels, **{n: kept_width(c, model.channels[n], min_width, round_to)
                                         for n, c in counts.items()})
        if all(architecture_cost(model, widths, m) <= b for m, (b, _) in budgets.items()):
            return True
        warnings.warn("the priced widths exceed a budget when the network is built; choosing again with every "
                      "candidate built and counted", stacklevel=2)
        self._pricer_cache = (self._pricer_cache[0], None)
        return False

    def _widths_for(self, trainer, pl_module, scores: dict[str, Tensor], min_width: int, round_to: int
                    ) -> dict[str, int]:
        """The widths the selection keeps when ``scores`` are thresholded for the budget(s) (and filled)."""
        tau = self._tau_for_budget(trainer, pl_module, scores)
        counts = {n: int(m.sum()) for n, m in masks_for_tau(scores, tau).items()}
        if self.fill_budget:
            return self._fill(pl_module.model, scores, counts, min_width, round_to)
        return {n: kept_width(c, scores[n].numel(), min_width, round_to) for n, c in counts.items()}

    def _balanced_exponent(self, trainer, pl_module, scores: dict[str, Tensor], cost: dict[str, float],
                           min_width: int, round_to: int, steps: int = 6) -> float:
        """``cost_exponent: balance``: the exponent in [0, 1] at which the pruned architecture spends its params and
        its MACs budget alike (bisection on spent MACs - spent params, ``steps`` halvings; the evaluated exponent
        whose two spent fractions are closest). Cost-blind (0) the MACs budget binds when it is the tighter of the
        two in the costly high-resolution layers; the more the ranking prices MACs, the more of them it spares and
        the more parameters it keeps instead, until the params budget binds."""
        budgets = self._budgets()
        model = pl_module.model

        def gap(exponent: float) -> float:
            widths = dict(model.channels, **self._widths_for(trainer, pl_module, self._priced(scores, cost, exponent),
                                                             min_width, round_to))
            spent = {m: self._cost(model, widths, m) / b for m, (b, _) in budgets.items()}
            return spent["macs"] - spent["params"]

        tried = {0.0: gap(0.0), 1.0: gap(1.0)}
        if tried[0.0] <= 0 or tried[1.0] >= 0:  # already balanced or params-bound cost-blind; MACs-bound even at 1
            return min(tried, key=lambda e: abs(tried[e]))
        lo, hi = 0.0, 1.0
        for _ in range(steps):
            mid = (lo + hi) / 2
            tried[mid] = gap(mid)
            lo, hi = (mid, hi) if tried[mid] > 0 else (lo, mid)
        return min(tried, key=lambda e: abs(tried[e]))

    @staticmethod
    def _selection_rounding(trainer) -> tuple[int, int]:
        """``FilterSelection``'s ``min_width`` and ``round_to`` (1, 1 without one): the widths the surgery keeps."""
        from callbacks.selection import FilterSelection

        sel = next((cb for cb in getattr(trainer, "callbacks", ()) if isinstance(cb, FilterSelection)), None)
        return (sel.min_width, sel.round_to) if sel else (1, 1)

    def _channel_tau(self, trainer, pl_module, index: int, scores: dict[str, Tensor]) -> float:
        phase = self.state.phases[index]
        if self.target_params_x or self.target_macs_x or self.target_params or self.target_macs:
            return self._tau_for_budget(trainer, pl_module, scores)
        if self.threshold_mode == "target_sparsity":
            return tau_for_sparsity(scores, self.target_sparsity if phase.target_sparsity is None else phase.target_sparsity)
        bns = [pl_module.model.norms[n] for n in scores]
        return self._search_tau(trainer, pl_module, scores, [t for bn in bns for t in (bn.weight, bn.bias)])

    def _budgets(self) -> dict[str, tuple[float, str]]:
        """Each budget: measure -> (the most it may cost, where that figure comes from)."""
        budgets = {m: (self.state.dense_stats[m] / x, f"dense / {x}") for m, x in
                   (("params", self.target_params_x), ("macs", self.target_macs_x)) if x}
        budgets.update({m: (float(n), "given") for m, n in (("params", self.target_params), ("macs", self.target_macs))
                        if n})
        return budgets

    def budget_report(self, final: dict) -> dict | None:
        """What each budget allowed and what the final model costs, for ``summary.json``: ``{measure: {"budget",
        "from", "final", "spent", "final_x"}}`` per budget (``spent``: final / budget, 1.0 at the limit; ``final_x``:
        dense / final) and ``binding``, the measure spent the most. With two budgets one binds and the other is met
        with room to spare, so a "4x params" config may end at 6x: e.g. at ``width_mult`` 0.25 on facemask the 2.9x
        MACs budget binds on two of three seeds and leaves 5.3-6.1x fewer params (benchmarks/README.md, "A
        twice-wider network on facemask"). None without a budget."""
        budgets = self._budgets() if self.state.dense_stats else {}
        if not budgets:
            return None
        dense = self.state.dense_stats
        report = {m: {"budget": round(b), "from": src, "final": int(final[m]), "spent": round(final[m] / b, 4),
                      "final_x": round(dense[m] / final[m], 4)} for m, (b, src) in budgets.items()}
        return {**report, "binding": max(budgets, key=lambda m: report[m]["spent"])}

    @torch.no_grad()
    def _fill(self, model, scores: dict[str, Tensor], counts: dict[str, int], min_width: int, round_to: int
              ) -> dict[str, int]:
        """``fill_budget``: channels per layer after putting back, best-scored block first, every block of
        ``round_to`` channels that keeps the architecture within all budgets (widths as FilterSelection keeps them).
        A block that does not fit never fits later (putting channels back elsewhere only adds cost), so each layer is
        priced at most once more than it grows. Then, with ``fill_swap``, ``_swap`` trades blocks between layers."""
        budgets = self._budgets()
        widths = {n: kept_width(c, scores[n].numel(), min_width, round_to) for n, c in counts.items()}
        ranked = {n: sc.sort(descending=True, stable=True).values for n, sc in scores.items()}

        def fits(trial: dict[str, int]) -> bool:
            arch = dict(model.channels, **trial)
            return all(self._cost(model, arch, m) <= b for m, (b, _) in budgets.items())

        widths = self._greedy_fill(widths, ranked, fits, min_width, round_to)
        return self._swap(model, widths, ranked, min_width, round_to) if self.fill_swap else widths

    @staticmethod
    def _greedy_fill(widths: dict[str, int], ranked: dict[str, Tensor], fits, min_width: int, round_to: int,
                     frozen: frozenset = frozenset()) -> dict[str, int]:
        """Put back the best-scored next block of ``round_to`` channels over the layers not ``frozen`` while
        ``fits(widths)``; a layer whose next block does not fit is not tried again."""
        step = max(round_to, 1)
        full = set(frozen)
        while True:
            blocks = {n: float(ranked[n][widths[n]: widths[n] + step].mean()) for n in widths
                      if n not in full and widths[n] < ranked[n].numel()}
            if not blocks:
                return widths
            n = max(blocks, key=blocks.get)
            trial = dict(widths, **{n: kept_width(widths[n] + step, ranked[n].numel(), min_width, round_to)})
            if fits(trial):
                widths = trial
            else:
                full.add(n)

    def _swap(self, model, widths: dict[str, int], ranked: dict[str, Tensor], min_width: int, round_to: int
              ) -> dict[str, int]:
        """``fill_swap``: after the greedy fill one budget is spent and the other often is not (the MACs budget binds
        and ~10-20 % of the parameter budget is left on facemask). Trade: take one block of ``round_to`` channels out
        of a layer, greedily fill the others again, and keep the trade that adds the most score in all (the sum of
        the kept channels' scores: what the fill ranks by); repeat until no trade adds any. A block of an expensive
        early layer can so buy several blocks of cheap late ones. Every trade strictly adds score, so it ends.

        Candidates are priced with ``BilinearCost`` (no network built per trial); the result is checked against
        ``architecture_cost`` and dropped, with a warning, if that disagrees."""
        budgets = self._budgets()
        if self._pricer(model) is None:
            warnings.warn("fill_swap: this network's parameters / MACs are not bilinear in its widths (tied or shared "
                          "channels?); keeping the greedy fill", stacklevel=2)
            return widths
        total = {n: torch.cat([r.new_zeros(1), r.double().cumsum(0)]).tolist() for n, r in ranked.items()}

        def value(w: dict[str, int]) -> float:
            return sum(total[n][w[n]] for n in w)

        def fits(w: dict[str, int]) -> bool:
            return all(self._cost(model, w, m) <= b for m, (b, _) in budgets.items())

        step = max(round_to, 1)
        best, best_value = widths, value(widths)
        while True:
            trades = []
            for n, w in best.items():
                fewer = kept_width(w - step, ranked[n].numel(), min_width, round_to)
                if fewer < w:
                    trial = self._greedy_fill(dict(best, **{n: fewer}), ranked, fits, min_width, round_to,
                                              frozenset({n}))
                    trades.append((value(trial), trial))
            got, trial = max(trades, key=lambda t: t[0], default=(best_value, best))
            if got <= best_value + 1e-9:
                break
            best, best_value = trial, got
        arch = dict(model.channels, **best)
        if any(architecture_cost(model, arch, m) > b for m, (b, _) in budgets.items()):  # BilinearCost was wrong
            warnings.warn("fill_swap: the traded widths exceed a budget when the network is built; keeping the greedy "
                          "fill", stacklevel=2)
            return widths
        return best

    @torch.no_grad()
    def _tau_for_budget(self, trainer, pl_module, scores: dict[str, Tensor], steps: int = 14) -> float:
        """The smallest channel sparsity whose pruned architecture (widths as FilterSelection keeps them) meets the
        budget(s): dense params / ``target_params_x`` (or ``target_params``) and/or dense MACs / ``target_macs_x`` (or
        ``target_macs``) (binary search)."""
        budgets = self._budgets()
        min_width, round_to = self._selection_rounding(trainer)
        model = pl_module.model

        def over_budget(sparsity: float) -> dict[str, int]:
            """The measures whose budget the architecture at ``sparsity`` exceeds, with their cost."""
            widths = kept_widths(model, masks_for_tau(scores, tau_for_sparsity(scores, sparsity)), min_width, round_to)
            cost = {m: self._cost(model, widths, m) for m in budgets}
            return {m: c for m, c in cost.items() if c > budgets[m][0]}

        lo, hi = 0.0, 0.99
        if over := over_budget(hi):
            m, c = next(iter(over.items()))
            raise ScheduleError(f"the {m} budget {budgets[m][0]:,.0f} ({budgets[m][1]}) cannot be met by "
                                f"removing channels of this phase's layers (at 99 % of them: {c:,}); lower the target")
        for _ in range(steps):
            mid = (lo + hi) / 2
            if over_budget(mid):
                lo = mid
            else:
                hi = mid
        return tau_for_sparsity(scores, hi)

    def _eval_map(self, trainer, pl_module) -> float:
        """The module's quality figure (the pruning contract's ``evaluate``) on ``search_batches`` validation batches."""
        return pl_module.evaluate(trainer.datamodule.val_dataloader(), self.search_batches)

    @torch.no_grad()
    def _search_tau(self, trainer, pl_module, scores: dict[str, Tensor], params: list[Tensor]) -> float:
        """Largest sparsity whose validation-subset mAP drop stays within ``max_map_drop`` (binary search). Each
        candidate is applied with ``apply_masks`` (weight masks, or channel masks on BatchNorm) and undone by
        restoring ``params``, the tensors those masks touch."""
        original = [p.detach().clone() for p in params]
        base = self._eval_map(trainer, pl_module)
        lo, hi, best = 0.0, 0.99, 0.0
        for _ in range(self.search_steps):
            mid = (lo + hi) / 2
            apply_masks(pl_module.model, masks_for_tau(scores, tau_for_sparsity(scores, mid)))
            drop = base - self._eval_map(trainer, pl_module)
            for p, o in zip(params, original):
                p.copy_(o)
            if drop <= self.max_map_drop:
                best, lo = mid, mid
            else:
                hi = mid
        return tau_for_sparsity(scores, best)

"""FilterSelection: paper A's stage 2 — which filters to remove, from the sparsity of two consecutive layers."""

from __future__ import annotations

import math

import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from callbacks.state import Phase, find_state
from lightning_modules.contract import consumer_columns


def splevel(t: Tensor, dim: int) -> Tensor:
    """Fraction of zero weights per slice along ``dim`` (``dim=0``: per filter F_i, ``dim=1``: per column G_i)."""
    t = t.transpose(0, dim) if dim else t
    return (t == 0).flatten(1).float().mean(dim=1)


def kept_width(kept: int, width: int, min_width: int = 1, round_to: int = 1) -> int:
    """The width a layer keeps: at least ``min_width`` (or all it has), rounded *up* to a multiple of ``round_to``."""
    target = max(kept, min(min_width, width))
    if round_to > 1:
        target = min(width, int(math.ceil(target / round_to) * round_to))
    return target


def select_filters(
    weights: dict[str, Tensor],
    layers: list[str],
    next_layer: dict[str, str | None],
    s_F: float,
    s_F_min: float,
    s_G: float,
    min_width: int = 1,
    round_to: int = 1,
    extra_consumers: dict[str, list[Tensor]] | None = None,
) -> dict[str, list[int]]:
    """Paper A's rule: remove filter i of layer l iff
    ``splevel(F_i) >= s'_F and (splevel(F_i) >= s_F or splevel(G_i) >= s_G)``,
    with F_i = W_l[i] and G_i = W_{l+1}[:, i], on the thresholded weights.

    Layers are visited in order and each removal updates the statistics the next layer reads: layer l+1's F
    rows are measured on the input channels that survive layer l's removals. A layer keeps at least
    ``min_width`` filters, and its kept width is rounded *up* to a multiple of ``round_to`` (filters put
    back are the least sparse of those selected). ``s_F_min`` is the paper's s'_F.

    ``extra_consumers`` adds, per layer, other weights that read its output channels (a source layer's loc/conf
    heads): G_i then spans column i of the next conv *and* of each of them (all of layer l's consumers).
    """
    removed_inputs: dict[str, Tensor] = {}  # layer -> bool mask of surviving input channels
    selection: dict[str, list[int]] = {}
    for name in layers:
        w = weights[name]
        keep_in = removed_inputs.get(name)
        w_eff = w[:, keep_in] if keep_in is not None else w
        sp_f = splevel(w_eff, 0)
        nxt = next_layer.get(name)
        consumers = ([weights[nxt]] if nxt is not None and nxt in weights else []) + list((extra_consumers or {}).get(name, []))
        if consumers:  # zeros over the columns of every consumer, counted together
            zeros = sum((c.transpose(0, 1) == 0).flatten(1).sum(1).float() for c in consumers)
            sp_g = zeros / sum(c[:, 0].numel() for c in consumers)
        else:
            sp_g = torch.zeros_like(sp_f)
        prune = (sp_f >= s_F_min) & ((sp_f >= s_F) | (sp_g >= s_G))
        n = w.shape[0]
        kept = n - int(prune.sum())
        target = kept_width(kept, n, min_width, round_to)
        if target > kept:  # put back the least sparse of the selected filters
            cand = torch.nonzero(prune).squeeze(1)
            order = cand[torch.argsort(sp_f[cand], stable=True)]
            prune[order[: target - kept]] = False
        idx = torch.nonzero(prune).squeeze(1)
        selection[name] = idx.tolist()
        if nxt is not None:
            mask = torch.ones(n, dtype=torch.bool, device=w.device)
            mask[idx] = False
            removed_inputs[nxt] = mask
    return selection


def prunable_layers(phase: Phase, is_last_phase: bool, never_prune: tuple[str, ...] = ()) -> list[str]:
    """A phase prunes its layers except those the network never prunes (``never_prune``, e.g. SSD's input layer
    conv1_1) and its last layer, which is the first layer of the next phase (phases share their boundary layer); the
    final phase prunes its last layer too (F rule only: nothing follows it in the trunk)."""
    layers = [n for n in phase.layers if n not in never_prune]
    if not is_last_phase and layers and layers[-1] == phase.layers[-1]:
        layers = layers[:-1]
    return layers


def trunk_successors(names: list[str] | tuple[str, ...], present: set[str]) -> dict[str, str | None]:
    """The next prunable layer (in network order) after each layer still present."""
    names = [n for n in names if n in present]
    return {a: b for a, b in zip(names, names[1:] + [None])}


class FilterSelection(Callback):
    """Selects the filters to remove at each phase's surgery boundary (paper A, stage 2).

    Args:
        s_F: a filter whose own sparsity reaches this is removed (given it also reaches ``s_F_min``).
        s_F_min: the paper's s'_F, the sparsity a filter must reach at all before it can be removed.
        s_G: a filter whose *column in the next layer* reaches this sparsity is removed (given ``s_F_min``).
        min_width: never leave a layer with fewer filters than this.
        round_to: round each kept width up to a multiple of this (8 or 16 run fast on real hardware).
        g_over: ``"next_conv"``: G_i is column i of the next trunk convolution only; ``"all_consumers"`` (paper A's
            definition: every layer that reads channel i): also the loc/conf head columns of a source layer
            (conv4_3, conv7, conv8_2, ...).
    """

    pruning_stage = "FilterSelection"

    def __init__(self, s_F: float = 0.7, s_F_min: float = 0.3, s_G: float = 0.7, min_width: int = 8, round_to: int = 1,
                 g_over: str = "next_conv"):
        if g_over not in ("next_conv", "all_consumers"):
            raise ValueError(f"g_over must be 'next_conv' or 'all_consumers', got {g_over!r}")
        self.g_over = g_over
        for k, v in {"s_F": s_F, "s_F_min": s_F_min, "s_G": s_G}.items():
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{k} must be in [0, 1], got {v}")
        if min_width < 1 or round_to < 1:
            raise ValueError("min_width and round_to must be >= 1")
        self.s_F, self.s_F_min, self.s_G = s_F, s_F_min, s_G
        self.min_width, self.round_to = min_width, round_to

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        state = find_state(trainer)
        for i, phase in enumerate(state.phases):
            done = any(s["phase"] == i for s in state.surgeries)
            if phase.selection_epoch == trainer.current_epoch and not done and not state.selection:
                state.selection = self.select(pl_module, phase, i == len(state.phases) - 1, state.masks)
                state.selection = trainer.strategy.broadcast(state.selection, src=0)
                for name, idx in state.selection.items():
                    pl_module.log(f"prune/selected/{name}", float(len(idx)))

    @torch.no_grad()
    def select(self, pl_module, phase: Phase, is_last_phase: bool, masks: dict[str, Tensor] | None = None) -> dict[str, list[int]]:
        model = pl_module.model
        weights = {n: conv.weight.detach() for n, conv in model.layers.items()}
        for name, mask in (masks or {}).items():  # a masked channel (BatchNorm scale at 0) is a fully sparse F_i
            if mask.dim() == 1 and name in weights and mask.numel() == weights[name].shape[0]:
                weights[name] = weights[name] * mask.to(weights[name]).view(-1, 1, 1, 1)
        layers = prunable_layers(phase, is_last_phase, model.never_prune)
        nxt = trunk_successors(model.layer_names(), set(model.layers))
        extra = None
        if self.g_over == "all_consumers":  # the next conv is G already; add every other reader (heads, a linear)
            convs = set(model.layers.values())
            # consumer_columns: (channel, its weights); transposed, as select_filters reads a conv weight's columns
            extra = {n: [consumer_columns(c, model.channels[n]).T for c in model.consumers(n) if c not in convs]
                     for n in model.layers}
        return select_filters(weights, layers, nxt, self.s_F, self.s_F_min, self.s_G, self.min_width, self.round_to,
                              extra)

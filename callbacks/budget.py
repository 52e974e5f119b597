"""Who reads a layer's channels, what a channel costs, and what an architecture costs: for pruning to a budget
(parameters or MACs) rather than to a fraction, and for paper A's G_i over every consumer.

Users deploy for size *and* speed: a criterion that ranks channels by importance alone keeps the expensive
high-resolution layers (conv1-conv4 of SSD run at 300-38 px) as wide as the cheap late ones. Here each channel gets
its MAC cost (its own convolution, plus the input slice it feeds in every consumer: the next convolution and, for a
source layer, its loc/conf heads), and a candidate set of widths is priced by rebuilding the model at those widths.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_modules.contract import consumer_columns


@torch.no_grad()
def channel_macs(model: nn.Module) -> dict[str, float]:
    """MACs that one output channel of each layer costs per input: producing it (H*W*C_in*k*k of its conv) plus
    reading it (H'*W'*C_out'*k'*k' in each convolution that consumes it; out_features * columns per channel in a
    linear layer after a flatten)."""
    hw: dict[nn.Module, int] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: hw.__setitem__(mod, o.shape[-1] * o.shape[-2]))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    model.eval()
    try:
        model(model.example_input())
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    channels = model.channels

    def read_cost(layer: nn.Module, producer: str) -> float:  # MACs per *input* channel of a consumer
        if isinstance(layer, nn.Linear):
            return layer.out_features * layer.in_features / channels[producer]
        return hw[layer] * layer.out_channels * layer.kernel_size[0] * layer.kernel_size[1] / layer.groups

    cost = {}
    for name, conv in model.layers.items():
        own = hw[conv] * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        cost[name] = float(own + sum(read_cost(c, name) for c in model.consumers(name)))
    return cost


@torch.no_grad()
def consumer_weight(model: nn.Module, name: str) -> Tensor:
    """How strongly the layers that read ``name``'s channels use each channel: for every consumer (the next trunk
    conv and, for a source layer, its loc/conf heads) the L1 norm of column i, divided by that consumer's mean
    column norm; averaged over the consumers. 1 = an ordinary channel; ~0 = its readers ignore it (paper A's G_i,
    as a magnitude rather than a count of zeros)."""
    readers = model.consumers(name)
    if not readers:
        return torch.ones(model.layers[name].out_channels, device=model.layers[name].weight.device)
    cols = [consumer_columns(c, model.layers[name].out_channels).abs().sum(1) for c in readers]
    return sum(c / c.mean().clamp(min=1e-12) for c in cols) / len(cols)


def kept_widths(model: nn.Module, masks: dict[str, Tensor], min_width: int = 1, round_to: int = 1) -> dict[str, int]:
    """Widths after removing the masked channels, as FilterSelection keeps them (at least ``min_width``, rounded up
    to a multiple of ``round_to``)."""
    from callbacks.selection import kept_width

    widths = dict(model.channels)
    for name, keep in masks.items():
        widths[name] = kept_width(int(keep.sum()), widths[name], min_width, round_to)
    return widths


def architecture_cost(model: nn.Module, widths: dict[str, int], measure: str) -> int:
    """Parameters or MACs (one input) of ``model``'s architecture at ``widths`` (the contract's ``at_widths``).

    The network is built under a forked RNG, so a budget search leaves the global torch RNG as it found it. The data
    order and augmentation never read it (``TrainSampler`` seeds them from the run's seed and the epoch) and the
    networks here have no dropout, but anything that draws from it later would otherwise depend on how many
    candidates a search counted."""
    with torch.random.fork_rng(devices=[]):
        arch = model.at_widths(widths)
    if measure == "params":
        return sum(p.numel() for p in arch.parameters())
    import torch_pruning as tp

    macs, _ = tp.utils.count_ops_and_params(arch.eval(), arch.example_input())
    return int(macs)


class BilinearCost:
    """Parameters and MACs of ``model``'s architecture as functions of the widths of ``names`` (every other layer
    at its present width), evaluated without building a network.

    In a chain of convolutions, heads and linear layers both measures are *bilinear* in the widths: a convolution
    costs (its width) x (its input's width) x (a constant), a BatchNorm, a head or a bias (a width) x (a constant).
    So ``cost(w) = cost(b) + sum_n g_n (w_n - b_n) + sum_(a, c) h_ac (w_a - b_a)(w_c - b_c)`` over the pairs where
    ``c`` reads ``a``'s channels, exactly, with ``b`` all ones (the cheapest network to build). The coefficients
    come from ``architecture_cost`` itself (the contract's ``at_widths``): one network at ``b``, one per layer with
    that layer one wider, one per pair with both one wider. ``exact_at(widths)`` checks a prediction against
    ``architecture_cost``: a network whose cost is not of this form (widths tied across layers, a channel read
    twice) fails it, and the caller keeps what it had.
    """

    def __init__(self, model: nn.Module, names: list[str], measures: tuple[str, ...]):
        self.model, self.names, self.measures = model, list(names), tuple(measures)
        by_module = {id(m): n for n, m in model.layers.items()}
        varying = set(self.names)
        self.pairs = sorted({(a, by_module[id(c)]) for a in self.names for c in model.consumers(a)
                             if by_module.get(id(c)) in varying})
        self.base = {n: 1 for n in self.names}

        def cost(**wider: int) -> dict[str, int]:
            widths = {**model.channels, **self.base, **wider}
            return {m: architecture_cost(model, widths, m) for m in self.measures}

        self.at_base = cost()
        one = {n: cost(**{n: 2}) for n in self.names}
        both = {(a, c): cost(**{a: 2, c: 2}) for a, c in self.pairs}
        self.linear = {m: {n: one[n][m] - self.at_base[m] for n in self.names} for m in self.measures}
        self.bilinear = {m: {(a, c): both[a, c][m] - one[a][m] - one[c][m] + self.at_base[m] for a, c in self.pairs}
                         for m in self.measures}

    def __call__(self, widths: dict[str, int], measure: str) -> int:
        d = {n: widths[n] - 1 for n in self.names}
        lin = self.linear[measure]
        return (self.at_base[measure] + sum(lin[n] * d[n] for n in self.names)
                + sum(h * d[a] * d[c] for (a, c), h in self.bilinear[measure].items()))

    def exact_at(self, widths: dict[str, int]) -> bool:
        arch = dict(self.model.channels, **widths)
        return all(self(widths, m) == architecture_cost(self.model, arch, m) for m in self.measures)

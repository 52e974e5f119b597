"""The one contract between the pruning callbacks and a network: what ``callbacks/`` may ask of a model.

The callbacks import this module and nothing model-specific; a LightningModule that wants pruning keeps its network
in ``self.model`` implementing ``PrunableNet`` and implements ``PrunableModule`` itself. SSD300/512
(``lightning_modules.ssd.SSD`` + ``SSDDetector``) implement it. The import graph has no circles::

    train.py -> callbacks/ -> lightning_modules/contract.py <- lightning_modules/{ssd,detector}.py
                          \\-> datamodules/ (never)            datamodules/ (never imported by either)

``PrunableNet`` (the ``nn.Module`` that is cut):

* ``layers`` — every prunable convolution, in network order, under the papers' names (``conv1_1`` ...); its BatchNorm,
  if any, in ``norms`` under the same name;
* ``layer_names()`` — the names of the full (unpruned) architecture in order, for checking schedules;
* ``never_prune`` — layers whose filters are never removed (e.g. the input layer);
* ``consumers(name)`` — every layer that reads ``name``'s output channels: the next convolution, detection heads,
  or the first ``nn.Linear`` after a flatten (channel i is then its input columns ``i*k .. (i+1)*k - 1``);
* ``example_input(batch)`` — an input for tracing, counting MACs and timing;
* ``at_widths(widths)`` — a fresh network of the same architecture at other widths (pricing a candidate);
* ``param_dims()`` — for each parameter, whose channels index its dim 0 and dim 1 (the optimiser state follows
  a surgery through it);
* ``tp_pruners()`` — Torch-Pruning pruners for custom layers the dependency graph must cut too.

``PrunableModule`` (the LightningModule): ``model`` (a ``PrunableNet``), ``quality`` (the name of its quality
figure: ``"map50"`` for detectors, ``"top1"`` for classifiers) and ``evaluate(loader, max_batches)`` returning it;
optionally ``architecture_changed()``, which the surgery calls after it changed the widths (both modules use it to
keep channels-last and to compile the network afresh: ``lightning_modules.common.NetRunner``), and
``class_balanced_loss()``, the loss of its last training step with every class weighted by its inverse label
frequency, which ``SparsityInduction(taylor_loss="class_balanced")`` differentiates (both modules have it:
``lightning_modules.common.ClassBalance``).
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class PrunableNet(Protocol):
    layers: nn.ModuleDict
    norms: nn.ModuleDict
    never_prune: tuple[str, ...]

    @property
    def channels(self) -> dict[str, int]: ...

    def layer_names(self) -> tuple[str, ...]: ...

    def consumers(self, name: str) -> list[nn.Module]: ...

    def example_input(self, batch: int = 1) -> Tensor: ...

    def at_widths(self, widths: dict[str, int]) -> nn.Module: ...

    def param_dims(self) -> dict[str, tuple[str | None, str | None]]: ...

    def tp_pruners(self) -> dict[type, Any]: ...


@runtime_checkable
class PrunableModule(Protocol):
    model: PrunableNet
    quality: str

    def evaluate(self, loader: Iterable, max_batches: int | None = None) -> float: ...


def consumer_columns(consumer: nn.Module, channels: int) -> Tensor:
    """The weights through which ``consumer`` reads each of the ``channels`` input channels, one row per channel:
    a convolution's ``weight[:, i]``, or a linear layer's input columns of channel i (after a flatten)."""
    w = consumer.weight.detach()
    if isinstance(consumer, nn.Linear):
        return w.view(w.shape[0], channels, -1).transpose(0, 1).flatten(1)
    return w.transpose(0, 1).flatten(1)


def chain_param_dims(names: list[str]) -> dict[str, tuple[str | None, str | None]]:
    """``param_dims`` of a chain of convolutions ``layers.<name>`` with BatchNorms ``norms.<name>``: each conv's
    dim 0 is its own channels, dim 1 the previous layer's."""
    prev = dict(zip(names[1:], names[:-1]))
    dims: dict[str, tuple[str | None, str | None]] = {}
    for n in names:
        dims[f"layers.{n}.weight"] = (n, prev.get(n))
        dims[f"layers.{n}.bias"] = (n, None)
        dims[f"norms.{n}.weight"] = (n, None)
        dims[f"norms.{n}.bias"] = (n, None)
    return dims


def check_prunable(pl_module) -> None:
    """A clear message when a LightningModule does not implement the contract."""
    missing = [k for k in ("model", "quality", "evaluate") if not hasattr(pl_module, k)]
    if not missing and not isinstance(pl_module.model, PrunableNet):
        missing = [f"model.{k}" for k in ("layers", "norms", "never_prune", "channels", "layer_names", "consumers",
                                          "example_input", "at_widths", "param_dims", "tp_pruners")
                   if not hasattr(pl_module.model, k)]
    if missing:
        raise TypeError(f"{type(pl_module).__name__} cannot be pruned: it lacks {', '.join(missing)} "
                        "(the pruning contract, lightning_modules/contract.py)")

"""What the LightningModules share: the non-finite-loss error, the validation / test hooks and the class counts
behind a class-balanced loss."""

from __future__ import annotations

import warnings

import torch
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch import Tensor


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or Inf."""


def check_loss_finite(loss: Tensor, step: int, parts: dict[str, Tensor] | None = None, advice: str = "") -> None:
    """Raise ``NonFiniteLossError`` if the training loss is NaN or Inf, here or, under DDP, on any rank. ``parts``:
    the loss's terms, named in the message (read from the device only then); ``advice``: what to do about it.

    Under DDP this is a collective (one all-reduce of a flag per rank, where the single-process check already reads
    one value back): every rank stops at the step where any rank's loss broke, and says why. Otherwise the ranks
    whose loss was finite would go on into the gradient all-reduce with the one that stopped: with gloo they die there
    of a "connection closed by peer" traceback, with NCCL across nodes they can wait until the process group's timeout
    (30 min of idle GPUs); only the ranks Lightning launched as its own children are killed with the first.
    """
    import torch.distributed as dist

    bad = ~torch.isfinite(loss.detach())
    where = ""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flags = torch.zeros(dist.get_world_size(), device=loss.device)
        flags[dist.get_rank()] = bad.float()
        dist.all_reduce(flags)
        ranks = flags.nonzero().flatten().tolist()
        if not ranks:
            return
        where = f" on rank {ranks[0]}" if len(ranks) == 1 else f" on ranks {ranks}"
        if not bad:  # this rank's loss is fine: it stops with the others
            raise NonFiniteLossError(f"training loss became non-finite{where} at global step {step} (this rank's: "
                                     f"{loss.item():.4g}); every rank stopped. {advice}".rstrip())
    elif not bad:
        return
    terms = f" ({', '.join(f'{k} {v.item():.4g}' for k, v in parts.items())})" if parts else ""
    raise NonFiniteLossError(f"training loss became {loss.item()}{where} at global step {step}{terms}. "
                             f"{advice}".rstrip())


class LossGuard:
    """Where a LightningModule checks its training loss (``check_loss_finite``): in the training step where reading
    it is free (a CPU), after the backward has been queued where the read waits for the device (a GPU).

    In the training step the read stops the host until the device has run the forward and the loss, and only then
    does it queue the backward's kernels, so the device idles at the start of every backward. ``guard_loss`` keeps the
    loss (on CUDA it also starts a copy of the "non-finite" flag to pinned host memory and records an event after
    it), and ``on_after_backward`` reads it: on CUDA it waits only for that event (for the loss), while the
    backward's kernels run. Still before the optimiser step (and before any callback's
    ``on_before_optimizer_step``), so the run still stops before a broken update; a non-finite loss's backward is
    computed and thrown away. Under DDP ``check_loss_finite``'s collective runs there, on every rank."""

    _pending_loss_check: tuple | None = None

    def guard_loss(self, loss: Tensor, parts: dict[str, Tensor] | None = None, advice: str = "") -> None:
        import torch.distributed as dist

        step = self.global_step
        if _reads_are_free(self):
            check_loss_finite(loss, step, parts, advice)
            return
        flag, ready = None, None
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if loss.device.type == "cuda" and not distributed:
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(~torch.isfinite(loss.detach()), non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        parts = {k: v.detach() for k, v in parts.items()} if parts else None
        self._pending_loss_check = (loss.detach(), parts, step, advice, flag, ready)

    def on_after_backward(self) -> None:
        pending, self._pending_loss_check = self._pending_loss_check, None
        if pending is None:
            return
        loss, parts, step, advice, flag, ready = pending
        if ready is not None:
            ready.synchronize()  # the loss's flag is on the host; the backward keeps running
            if not bool(flag):
                return
        check_loss_finite(loss, step, parts, advice)


# Under DDP Lightning advises ``sync_dist=True`` for every tensor logged once per epoch. Our ``val/`` and ``test/``
# figures come from torchmetrics metrics, whose ``compute()`` already gathered every rank's state: each rank logs
# the same value, and one more all-reduce per figure would change nothing (or, as a mean over 3+ ranks, its last
# bit). So that advice, and only for these names, is not printed.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test)/",
                        category=PossibleUserWarning)


def _reads_are_free(module) -> bool:
    """Whether reading a logged tensor back costs nothing but the copy (on a CPU), not a wait for the device."""
    from lightning_modules import box_ops

    return box_ops.reads_are_free(module.device)


def log_training_loss(module, value: Tensor, batch_size: int | None = None, lr: float | None = None) -> None:
    """Log the training loss (``train/loss``) and the learning rate (``lr``) every step, and show them in the
    progress bar without stalling a GPU.

    Lightning turns every value logged with ``prog_bar=True`` into a Python number at the end of *every* batch
    (``.item()``, whatever the progress bar), and a float logged every step becomes a device tensor first. On a GPU
    that is a host synchronisation after the optimiser step: the device then idles while the host runs Lightning's
    loop, fetches and copies the next batch and launches the next forward. So on a GPU the per-step values go to the
    loggers only (converted every ``log_every_n_steps``) and the bar shows ``loss_epoch``, the previous epoch's mean
    (accumulated on the device, read once per epoch); on a CPU, where reading is free, the bar shows the step's
    values as before."""
    each_step = _reads_are_free(module)
    module.log("train/loss", value, prog_bar=each_step, batch_size=batch_size)
    if not each_step:
        module.log("loss_epoch", value.detach(), on_step=False, on_epoch=True, prog_bar=True, logger=False,
                   batch_size=batch_size)
    # ``self.log`` makes a float a tensor on the module's device: on a GPU a blocking copy, which waits for the step's
    # queued kernels. So there the learning rate is logged only at the steps the loggers write (as Lightning's own
    # LearningRateMonitor does).
    if lr is not None and (each_step or _logs_this_step(module)):
        module.log("lr", lr, prog_bar=each_step, batch_size=batch_size)


def _logs_this_step(module) -> bool:
    trainer = getattr(module, "_trainer", None)
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


class EvalHooks:
    """Lightning's validation and test hooks, routed to the module's ``_eval_step(batch, stage)`` and
    ``_eval_epoch_end(stage)`` (stage ``"val"`` or ``"test"``)."""

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")


class ClassBalance:
    """The running count of each class's training labels (objects for a detector, images for a classifier) and the
    class weights it gives: ``w_c = n / (K n_c)`` over the K classes seen so far (n labels in all), so that every class
    weighs as much in a loss as every other, as it does in mAP or mean per-class accuracy, and the labels' mean weight
    is 1. A module calls ``_count_labels`` in its training step and implements ``class_balanced_loss()`` (the
    optional part of the pruning contract, ``lightning_modules/contract.py``): the loss of its last training step
    with these weights, its graph still alive until that step's backward. The counts live in the checkpoint."""

    _class_counts: Tensor | None = None
    _last_step: tuple | None = None

    def _count_labels(self, labels: Tensor, num_classes: int) -> None:
        # a scatter, not ``bincount``: on a GPU bincount reads the labels' maximum back to size its output (a host
        # sync in every training step); labels outside [0, num_classes) go to an extra bin that is dropped
        labels = labels.detach().flatten().long()
        labels = torch.where((labels >= 0) & (labels < num_classes), labels, num_classes)
        counts = torch.zeros(num_classes + 1, dtype=torch.long, device=labels.device).scatter_add_(
            0, labels, torch.ones_like(labels))[:num_classes]
        self._class_counts = counts if self._class_counts is None else self._class_counts.to(counts.device) + counts

    def _step_outputs(self) -> tuple:
        """What the training step kept for ``class_balanced_loss`` (its outputs and targets)."""
        if self._last_step is None:
            raise RuntimeError("class_balanced_loss: no training step has run yet")
        return self._last_step

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._last_step = None  # the step's outputs are not kept past its backward

    def class_weights(self) -> Tensor:
        """One weight per class (float32, on the counts' device); 1 for a class not seen yet."""
        if self._class_counts is None:
            raise RuntimeError("class_weights: no training labels were counted yet (call it after a training step)")
        c = self._class_counts.float()
        seen = c > 0
        return torch.where(seen, c.sum() / (seen.sum().clamp(min=1) * c.clamp(min=1)), torch.ones_like(c))

    def _save_class_counts(self, checkpoint: dict) -> None:
        if self._class_counts is not None:
            checkpoint["class_counts"] = self._class_counts.cpu().tolist()

    def _load_class_counts(self, checkpoint: dict) -> None:
        if "class_counts" in checkpoint:
            self._class_counts = torch.tensor(checkpoint["class_counts"], dtype=torch.long)


OPTIMIZERS = ("sgd", "adamw")  # what configure_optimizers builds (SGD with momentum, or AdamW)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile(compile) -> None:
    if compile not in (False, True, None) and compile not in COMPILE_MODES:
        raise ValueError(f"compile must be true, false or a torch.compile mode {COMPILE_MODES}, got {compile!r}")


class NetRunner:
    """How a LightningModule runs its network ``self.model``: the memory format (``hparams.channels_last``) and
    ``torch.compile`` (``hparams.compile``: true or a mode name, e.g. ``reduce-overhead`` for CUDA graphs at small
    batches). ``architecture_changed()`` is what the surgery calls after it changed the widths: new tensors are made
    channels-last again and the network is compiled afresh (a compiled graph is specialised to the old shapes)."""

    def apply_memory_format(self) -> None:
        import torch

        if self.hparams.get("channels_last"):
            self.model.to(memory_format=torch.channels_last)

    def compile_net(self) -> None:
        import torch

        mode = self.hparams.get("compile")
        self.__dict__.pop("_compiled_net", None)  # not a submodule: the state dict keeps the plain keys
        if mode:
            torch._dynamo.reset()  # drop graphs (and guards) of the old architecture
            self.__dict__["_compiled_net"] = torch.compile(self.model, mode=None if mode is True else mode)

    def net(self):
        """The network to call: compiled when ``compile`` is set, else ``self.model``."""
        compiled = self.__dict__.get("_compiled_net")
        return self.model if compiled is None else compiled

    def architecture_changed(self) -> None:
        self.apply_memory_format()
        self.compile_net()


def fold_batchnorm(net):
    """In place, for inference: every ``BatchNorm2d`` of ``net.norms`` folded into the convolution of the same name
    in ``net.layers`` (its running statistics and affine parameters become the conv's weight scale and bias, through
    ``torch.nn.utils.fusion.fuse_conv_bn_eval``) and replaced by ``Identity``. Exact up to float rounding; what ONNX
    export does by constant folding. A network without ``layers`` / ``norms`` is returned unchanged. Returns ``net``."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    norms, layers = getattr(net, "norms", None), getattr(net, "layers", None)
    if not isinstance(norms, nn.ModuleDict) or not isinstance(layers, nn.ModuleDict):
        return net
    for name, bn in list(norms.items()):
        if isinstance(bn, nn.BatchNorm2d) and isinstance(layers[name] if name in layers else None, nn.Conv2d):
            layers[name] = fuse_conv_bn_eval(layers[name].eval(), bn.eval())
            norms[name] = nn.Identity()
    return net


def deploy_copy(net):
    """The inference form of a network, as deployed and as timed: an eval-mode copy with BatchNorm folded into the
    convolutions and weights in channels-last memory format (feed it channels-last inputs). On a CPU this is about
    1.7-2x faster than the training form at batch 1: NCHW max pooling and unfolded BatchNorm on the wide early feature
    maps cost more than the convolutions (benchmarks/README.md, "Where a pruned model's CPU time goes")."""
    import copy

    import torch

    return fold_batchnorm(copy.deepcopy(net).eval()).to(memory_format=torch.channels_last)

"""Which operations of a real fit would make a GPU wait for the host, per training batch, and where they are.

On a GPU the host queues kernels ahead of the device; an operation that needs a value back on the host (``.item()``,
``int(t)``, ``.tolist()`` of a device tensor, ``nonzero``, a boolean-mask index, ``torch.equal``, ``unique``,
``bincount``) blocks until the device has caught up, and so does a tensor made from host data on the device
(``torch.tensor(x, device=cuda)``, a blocking copy). One in the middle of a step costs little (the backward's
kernels are queued right after); one after the optimiser step leaves the device idle while the host runs
Lightning's loop and fetches and copies the next batch. This runs the demo's fit (shrunk: a few batches per epoch, no logger) on the CPU under a
``TorchDispatchMode`` that records every such operation with the place in our code, or Lightning's, that called it,
between the start of a training batch and the end of the epoch's training batches (validation and epoch ends left
out), and prints them per training batch.

    python -m benchmarks.bench_syncs                 # the fit as it runs on a CPU
    python -m benchmarks.bench_syncs --as-on-a-gpu   # the module's logging, the loss and the optimiser as on a GPU
    python -m benchmarks.bench_syncs --as-on-a-gpu --launches  # instead: every operation that would launch a kernel

On a GPU ``torch.cuda.set_sync_debug_mode("warn")`` reports the real synchronisations; this is the CPU's view of
the same code paths. Operations on CPU tensors (e.g. Adam's step counters, kept on the CPU) are listed too, though
they do not wait for a GPU.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import traceback

import pytorch_lightning as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::masked_select", "aten::_unique2",
           "aten::unique_consecutive", "aten::unique_dim",
           "aten::bincount"}  # on a GPU bincount reads its input's maximum back to size its output
# a tensor made from host data (``torch.tensor(...)``, e.g. Lightning's ``self.log`` of a float): on a GPU made there
# by a blocking copy, which waits for the device; not counted where our code makes it in pinned memory and copies it
# without blocking (these functions), nor in the data sets (on the host, in the loader's workers)
NON_BLOCKING_MAKERS = ("to_device",)


class SyncProbe(TorchDispatchMode):
    """Counts the operations that would wait for a GPU, by (operation, caller), while ``active``."""

    def __init__(self):
        super().__init__()
        self.active = False
        self.where: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active:
            name = func._schema.name
            if name == "aten::index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                             for i in args[1] if i is not None):
                name = "aten::index (boolean mask)"
            elif name == "aten::repeat_interleave" and "output_size" not in (kwargs or {}):
                name = "aten::repeat_interleave (no output_size)"
            elif name == "aten::lift_fresh":
                name = "aten::lift_fresh (a tensor from host data)"
            if name in SYNCING or "(" in name:
                where = caller()
                if not (name.startswith("aten::lift_fresh") and (where.endswith(NON_BLOCKING_MAKERS)
                                                                  or where.startswith("datamodules/"))):
                    self.where[(name, where)] += 1
        return func(*args, **(kwargs or {}))


class LaunchProbe(SyncProbe):
    """Counts every operation that would launch a kernel on a GPU, by the file and function that called it, while
    ``active``: the host's share of a step on a GPU grows with this count (a few microseconds of launch and Python
    dispatch each). Not counted: views and aliases (``detach``), reads of a value (``.item()``: the sync probe's;
    the optimiser's step counts, which stay on the CPU) and tensors made from host data. A multi-tensor (foreach)
    operation counts once, though a GPU may launch it in a few chunks."""

    NOT_LAUNCHES = ("aten::lift_fresh", "aten::_local_scalar_dense")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active:
            returns = func._schema.returns
            alias = returns[0].alias_info if returns else None
            name = func._schema.name
            if not (alias is not None and not alias.is_write) and name.startswith("aten::") \
                    and name not in self.NOT_LAUNCHES:
                self.where[(func._schema.name, caller(lines=False))] += 1
        return func(*args, **(kwargs or {}))


def caller(lines: bool = True) -> str:
    """The innermost frame outside torch: ``path:line function`` (paths from the repository or site-packages)."""
    for f in reversed(traceback.extract_stack()[:-3]):
        if "/torch/optim/" in f.filename:  # Adam's step counts, kept on the CPU on a GPU too
            return "torch.optim's per-parameter step counts (CPU tensors: no GPU wait)" if lines else "torch.optim step"
        if "/torch/" not in f.filename:
            if "site-packages/" in f.filename:
                path = f.filename.split("site-packages/")[-1]
            else:
                path = os.path.relpath(f.filename, ROOT)
            return f"{path}:{f.lineno} {f.name}" if lines else f"{path} {f.name}"
    return "?"


class Window(pl.Callback):
    """Switches the probe on from each training batch's start to the epoch's validation or end."""

    def __init__(self, probe: SyncProbe):
        self.probe, self.batches = probe, 0

    def on_train_batch_start(self, *args):
        self.probe.active = True

    def on_train_batch_end(self, *args):
        self.batches += 1

    def on_validation_start(self, *args):
        self.probe.active = False

    def on_train_epoch_end(self, *args):
        self.probe.active = False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="experiments/demo.yaml")
    ap.add_argument("--batches", type=int, default=4, help="training batches per epoch")
    ap.add_argument("--as-on-a-gpu", action="store_true",
                    help="the module's logging, the loss and the optimiser as on a GPU (no per-step progress-bar "
                         "values, the sync-free loss, the multi-tensor optimiser step)")
    ap.add_argument("--launches", action="store_true",
                    help="count every operation that would launch a kernel on a GPU, by caller, instead")
    args = ap.parse_args()

    import train

    if args.as_on_a_gpu:  # the module's logging and the loss take their GPU paths
        import lightning_modules.box_ops as box_ops

        box_ops.reads_are_free = lambda device: False
        # and the optimiser its multi-tensor (foreach) form, the default on a GPU (on a CPU: a loop over parameters)
        import torch.optim.optimizer as optimizer

        optimizer._get_foreach_kernels_supported_devices = lambda: ["cpu", "cuda"]
    probe = LaunchProbe() if args.launches else SyncProbe()
    window = Window(probe)
    init = pl.Trainer.__init__

    @functools.wraps(init)  # LightningCLI reads the Trainer's options from this signature
    def with_window(self, *a, **k):
        k["callbacks"] = [window, *(k.get("callbacks") or [])]  # first: off before the others' epoch ends
        init(self, *a, **k)

    pl.Trainer.__init__ = with_window
    try:
        with probe:
            train.main(["--config", args.config, "--trainer.logger", "false", "--trainer.limit_train_batches",
                        str(args.batches), "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
                        "--trainer.default_root_dir", "runs/bench_syncs", "--run_name", "probe"])
    finally:
        pl.Trainer.__init__ = init
    batches = max(window.batches, 1)
    if args.launches:
        by_caller: collections.Counter = collections.Counter()
        for (_, where), n in probe.where.items():
            by_caller[where] += n
        print(f"\n{window.batches} training batches; operations that would launch a GPU kernel, per batch: "
              f"{sum(by_caller.values()) / batches:.1f}\n")
        print("| per batch | called from |")
        print("| --- | --- |")
        for where, n in by_caller.most_common():
            if n / batches >= 0.5:
                print(f"| {n / batches:.1f} | {where} |")
        return
    print(f"\n{window.batches} training batches; operations that would wait for a GPU, per batch:\n")
    print("| per batch | operation | called from |")
    print("| --- | --- | --- |")
    for (name, where), n in probe.where.most_common():
        print(f"| {n / batches:.2f} | {name} | {where} |")


if __name__ == "__main__":
    main()

"""Importable test doubles for CLI runs (``--model.class_path tests.helpers.NaNAfterDetector``)."""

import torch
from pytorch_lightning.callbacks import Callback

from lightning_modules.detector import SSDDetector


class NaNAfterDetector(SSDDetector):
    """An SSD whose loss turns NaN from global step ``nan_step`` on, to exercise the NaN guard."""

    def __init__(self, *args, nan_step: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_step = nan_step

    def forward(self, images):
        loc, conf = super().forward(images)
        if self.training and self.global_step >= self.nan_step:
            loc = loc * torch.tensor(float("nan"))
        return loc, conf


class SlowStepDetector(SSDDetector):
    """An SSD that sleeps ``SSD_SLOW_STEP_S`` seconds per training step (so a test can kill it mid-epoch) and, with
    ``SSD_STEP_LOG``, appends "epoch batch" to that file as each step starts; its arithmetic is SSDDetector's."""

    def training_step(self, batch, batch_idx):
        import os
        import time

        if os.environ.get("SSD_STEP_LOG"):
            with open(os.environ["SSD_STEP_LOG"], "a") as f:
                f.write(f"{self.current_epoch} {batch_idx}\n")
        time.sleep(float(os.environ.get("SSD_SLOW_STEP_S", "0")))
        return super().training_step(batch, batch_idx)


class PerturbOneRank(Callback):
    """At the end of epoch ``epoch``, nudges one weight on rank ``rank`` only (a silent divergence between
    processes), to check that the post-surgery rank comparison catches it."""

    def __init__(self, rank: int = 1, epoch: int = 0):
        self.rank, self.epoch = rank, epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.global_rank == self.rank and trainer.current_epoch == self.epoch:
            with torch.no_grad():
                pl_module.model.layers["conv1_1"].weight[0, 0, 0, 0] += 1.0


class AssertTrainMode(Callback):
    """Fails the run if any training step runs with the module (or a BatchNorm inside it) in eval mode: a pruning
    callback that traced the model must give it back in training mode."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        frozen = [n for n, m in pl_module.named_modules() if not m.training]
        if frozen:
            raise AssertionError(f"epoch {trainer.current_epoch} step {batch_idx}: modules in eval mode: {frozen[:5]}")

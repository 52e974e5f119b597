"""Importable test doubles for CLI runs (``--model.class_path tests.helpers.NaNAfterDetector``)."""

import torch

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

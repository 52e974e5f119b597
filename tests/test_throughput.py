"""TrainingThroughput: the per-epoch training rate, and whether the data pipeline or the step limits it."""

import time

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from callbacks.throughput import TrainingThroughput


class _Images(Dataset):
    def __init__(self, n: int, delay_s: float):
        self.n, self.delay_s = n, delay_s

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(self.delay_s)  # decoding + augmenting one image
        return torch.rand(3, 8, 8), torch.tensor(i % 2)


class _Net(pl.LightningModule):
    def __init__(self, step_delay_s: float):
        super().__init__()
        self.net, self.step_delay_s = nn.Linear(192, 2), step_delay_s

    def training_step(self, batch, batch_idx):
        time.sleep(self.step_delay_s)  # the network's forward and backward
        x, y = batch
        return nn.functional.cross_entropy(self.net(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, data_delay_s, step_delay_s, epochs=2):
    cb = TrainingThroughput()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    # 6 batches of 4 per epoch; the loader in the main process, so a slow sample is a wait of the training loop
    trainer.fit(_Net(step_delay_s), DataLoader(_Images(24, data_delay_s), batch_size=4, num_workers=0))
    return cb


@pytest.mark.parametrize("data_delay_s, step_delay_s, limited_by", [(0.02, 0.0, "data loading"),
                                                                     (0.0, 0.05, "the training step")])
def test_throughput_names_what_limits_the_rate(tmp_path, data_delay_s, step_delay_s, limited_by):
    s = _fit(tmp_path, data_delay_s, step_delay_s).summary()
    assert s["limited_by"].startswith(limited_by), s
    assert len(s["epochs"]) == 2 and all(e["batches"] == 6 for e in s["epochs"])
    # rate = images / (steps + waits) over the steady batches: at most what the delays allow, and not far under it
    # (the rest of a step, a tiny network and Lightning's hooks, takes a few ms; more on a loaded machine)
    ideal = 4 / (4 * data_delay_s + step_delay_s)
    assert 0.3 * ideal <= s["images_per_s_last_epoch"] <= 1.05 * ideal, (ideal, s)
    if limited_by == "data loading":
        assert s["data_wait_share_last_epoch"] > 0.5
    else:
        assert s["data_wait_share_last_epoch"] < 0.1 and s["step_ms_last_epoch"] >= 50


def test_throughput_survives_a_checkpoint_round_trip():
    cb = TrainingThroughput()
    cb.epochs = [{"epoch": 0, "images_per_s": 10.0, "data_wait_share": 0.5, "step_ms": 1.0}]
    again = TrainingThroughput()
    again.load_state_dict(cb.state_dict())
    assert again.epochs == cb.epochs and again.summary()["images_per_s_first_epoch"] == 10.0

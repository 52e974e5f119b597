"""TrainingThroughput: the per-epoch training rate, and whether the data pipeline or the step limits it."""

import time

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from callbacks.throughput import TrainingThroughput
from lightning_modules.common import LossGuard


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


def _fit(tmp_path, data_delay_s, step_delay_s, epochs=2, cb=None):
    cb = cb or TrainingThroughput()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    # 6 batches of 4 per epoch; the loader in the main process, so a slow sample is a wait of the training loop
    trainer.fit(_Net(step_delay_s), DataLoader(_Images(24, data_delay_s), batch_size=4, num_workers=0))
    return cb


# data-limited, step-limited. The step-limited case sleeps 0.2 s a step: the loader's few ms of fetch and collate per
# batch (more on a loaded machine: 6.6 ms beside three training runs) stay far under the callback's 10 % line (at
# 0.05 s a step they crossed it there)
_CASES = [(0.02, 0.0, "data loading"), (0.0, 0.2, "the training step")]


@pytest.mark.parametrize("data_delay_s, step_delay_s, limited_by", _CASES)
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
        assert s["data_wait_share_last_epoch"] < 0.1 and s["step_ms_last_epoch"] >= 1e3 * step_delay_s


def test_throughput_survives_a_checkpoint_round_trip():
    cb = TrainingThroughput()
    cb.epochs = [{"epoch": 0, "images_per_s": 10.0, "data_wait_share": 0.5, "step_ms": 1.0}]
    again = TrainingThroughput()
    again.load_state_dict(cb.state_dict())
    assert again.epochs == cb.epochs and again.summary()["images_per_s_first_epoch"] == 10.0
    # a device idle for a third of the loop while the host hardly waited for data: the host limits, not the loader
    again.epochs.append({"epoch": 1, "images_per_s": 12.0, "data_wait_share": 0.02, "step_ms": 1.0,
                         "device_idle_share": 0.33})
    s = again.summary()
    assert s["limited_by"].startswith("the host between and within steps") and "idle 33%" in s["limited_by"]
    assert s["device_idle_share_last_epoch"] == 0.33


class _EventClock:
    """A stand-in for a CUDA timing event on this CPU-only machine: on a CPU the work is done when the host's
    clock says so, so an event's time is the host's at its record."""

    def __init__(self):
        self.t = time.perf_counter()

    def elapsed_time(self, later) -> float:
        return (later.t - self.t) * 1e3  # milliseconds, as torch.cuda.Event's


class _AsIfOnAGpu(TrainingThroughput):
    """The GPU path's bookkeeping (events around each step, two synchronisations per epoch) run on a CPU."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def _cuda(self, pl_module) -> bool:
        return True

    def _new_event(self):
        return _EventClock()

    def _sync(self, pl_module) -> None:
        self.syncs += 1


@pytest.mark.parametrize("data_delay_s, step_delay_s, limited_by", _CASES)
def test_throughput_on_a_gpu_times_steps_with_events_and_syncs_three_times_per_epoch(tmp_path, data_delay_s,
                                                                                     step_delay_s, limited_by):
    """Without a synchronisation after every step (which would idle the device between steps): the steps are
    timed by events read at the epoch's end, and the host synchronises three times per epoch (at its start, after
    its first step, and at its end to read the events), whatever the number of steps. The device's idle share says
    whether the device waited."""
    cb = _fit(tmp_path, data_delay_s, step_delay_s, cb=_AsIfOnAGpu())
    s = cb.summary()
    assert cb.syncs == 2 * 3  # 2 epochs of 6 steps: 3 per epoch, not one per step
    assert s["limited_by"].startswith(limited_by), s
    ideal = 4 / (4 * data_delay_s + step_delay_s)
    assert 0.3 * ideal <= s["images_per_s_last_epoch"] <= 1.05 * ideal, (ideal, s)
    if limited_by == "data loading":
        assert s["device_idle_share_last_epoch"] > 0.5 and s["data_wait_share_last_epoch"] > 0.5
    else:
        assert s["device_idle_share_last_epoch"] < 0.1 and s["step_ms_last_epoch"] >= 1e3 * step_delay_s


class _LoggingNet(_Net):
    def training_step(self, batch, batch_idx):
        from lightning_modules.common import log_training_loss

        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x.flatten(1)), y)
        log_training_loss(self, loss, batch_size=len(x), lr=0.1)
        return loss


class _CountReads(pl.Callback):
    """Counts the values Lightning reads back from logged tensors (``.item()``: a host sync on a GPU) from the
    start of each training batch to the start of the next, epoch ends and validation excluded."""

    def __init__(self):
        self.reads, self.batches, self.active = 0, 0, False

    def on_train_batch_start(self, *args):
        self.active = True

    def on_train_batch_end(self, *args):
        self.batches += 1

    def on_validation_start(self, *args):
        self.active = False

    def on_train_epoch_end(self, *args):  # the epoch's figures are read once per epoch: fine
        self.active = False


@pytest.mark.parametrize("reads_are_free", [True, False])
def test_training_loss_reaches_the_bar_without_a_read_per_step_on_a_gpu(tmp_path, monkeypatch, reads_are_free):
    """Lightning converts every ``prog_bar`` value to a number at every batch's end: a GPU would wait there for the
    whole step. ``log_training_loss`` shows the step's loss in the bar on a CPU only; on a GPU (faked here: reads
    are not free) the bar shows the previous epoch's mean and nothing is read back per step, while the loggers
    still get ``train/loss`` and ``lr``. Nor is the learning rate (a float) made a device tensor at every step
    (a blocking copy to a GPU): only at the steps the loggers write."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    import lightning_modules.common as common

    monkeypatch.setattr(common, "_reads_are_free", lambda module: reads_are_free)
    counter = _CountReads()

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if counter.active and func is torch.ops.aten._local_scalar_dense.default and any(
                    "logger_connector" in f.filename for f in traceback.extract_stack()):
                counter.reads += 1
            if counter.active and func is torch.ops.aten.lift_fresh.default and any(
                    f.name == "__to_tensor" for f in traceback.extract_stack()):  # self.log of a float
                made.append(trainer.global_step)
            return func(*args, **(kwargs or {}))

    made = []  # the steps at which a logged float became a tensor
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=[counter], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, log_every_n_steps=5)
    with Reads():
        trainer.fit(_LoggingNet(0.0), DataLoader(_Images(24, 0.0), batch_size=4, num_workers=0))
    assert counter.batches == 12
    if reads_are_free:  # the step's loss and lr, read at every batch's end
        assert counter.reads >= 2 * counter.batches
        assert {"train/loss", "lr"} <= trainer.progress_bar_metrics.keys()
        assert len(made) == 12
    else:
        assert counter.reads == 0
        assert made == [4, 9]  # the 5th and the 10th step, the ones the loggers write
        assert "loss_epoch" in trainer.progress_bar_metrics and "train/loss" not in trainer.progress_bar_metrics
    assert {"train/loss", "lr"} <= trainer.logged_metrics.keys()


class _GuardedNet(LossGuard, _Net):
    """A net whose loss turns NaN at global step 3, checked by ``LossGuard`` (the detector's and classifier's)."""

    def __init__(self):
        super().__init__(0.0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x.flatten(1)), y)
        if self.global_step == 3:
            loss = loss * float("nan")
        self.guard_loss(loss, {"ce": loss}, advice="Lower the lr.")
        return loss


@pytest.mark.parametrize("reads_are_free", [True, False])
def test_the_loss_check_waits_for_the_device_only_after_the_backward_is_queued(tmp_path, monkeypatch, reads_are_free):
    """``LossGuard``: on a CPU the loss is checked in the training step; where reading it waits for the device (a GPU,
    faked here) the check runs after the backward was queued (``on_after_backward``; on CUDA it waits on an event
    after the loss only). Either way the run stops at the broken step with the message, before its optimiser step:
    the weights are those after the last good step."""
    import traceback

    import lightning_modules.box_ops as box_ops
    from lightning_modules.common import NonFiniteLossError

    monkeypatch.setattr(box_ops, "reads_are_free", lambda device: reads_are_free)
    net = _GuardedNet()
    snapshots = {}

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            snapshots[trainer.global_step] = [p.detach().clone() for p in module.parameters()]

        def on_before_optimizer_step(self, trainer, module, optimizer):
            snapshots["grads_finite_at_step_%d" % trainer.global_step] = all(
                torch.isfinite(p.grad).all() for p in module.parameters())

    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[Snapshot()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"training loss became nan at global step 3 \(ce nan\)\. Lower") as err:
        trainer.fit(net, DataLoader(_Images(24, 0.0), batch_size=4, num_workers=0))
    frames = [f.name for f in traceback.extract_tb(err.value.__traceback__)]
    assert ("on_after_backward" in frames) != reads_are_free and ("training_step" in frames) == reads_are_free
    assert "grads_finite_at_step_3" not in snapshots  # no callback saw the broken step's gradients
    for p, q in zip(net.parameters(), snapshots[3]):  # no optimiser step after the last good one
        assert torch.equal(p, q)


def test_throughput_figures_from_a_scripted_clock(monkeypatch):
    """The figures themselves, on a clock the test sets: 4 batches of 4 images on each of 2 ranks, each step 0.2 s,
    the first batch after 1 s (the workers starting: left out of the steady figures), the others after 0.1 s. The
    steady loop is the last 3 steps and their waits (0.9 s): 3 x 4 x 2 images / 0.9 s, waiting a third of it (data
    loading limits). On a GPU the device's steps fill 0.6 s of the same 0.9 s: idle a third of it."""
    from types import SimpleNamespace

    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])  # the callback's clock and the fake events'
    trainer = SimpleNamespace(world_size=2, current_epoch=0, is_global_zero=True, loggers=[], global_step=0)
    module = SimpleNamespace(device=torch.device("cpu"))
    batch = (torch.zeros(4, 3, 2, 2), torch.zeros(4))
    for cb in (TrainingThroughput(), _AsIfOnAGpu()):
        now[0] = 0.0
        cb.on_train_epoch_start(trainer, module)
        for i, wait in enumerate([1.0, 0.1, 0.1, 0.1]):
            now[0] += wait
            cb.on_train_batch_start(trainer, module, batch, i)
            now[0] += 0.2
            cb.on_train_batch_end(trainer, module, None, batch, i)
        cb.on_train_epoch_end(trainer, module)
        (e,) = cb.epochs
        assert e["images_per_s"] == pytest.approx(26.67) and e["data_wait_share"] == pytest.approx(0.3333)
        assert (e["step_ms"], e["wait_ms"], e["first_batch_wait_s"], e["batches"]) == (200.0, 100.0, 1.0, 4)
        assert cb.summary()["limited_by"].startswith("data loading (the step waited for its batch 33%")
        assert e.get("device_idle_share") == (pytest.approx(0.3333) if isinstance(cb, _AsIfOnAGpu) else None)

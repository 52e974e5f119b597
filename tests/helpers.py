"""Importable test doubles for CLI runs (``--model.class_path tests.helpers.NaNAfterDetector``)."""

from pathlib import Path

import torch
import yaml
from pytorch_lightning.callbacks import Callback

from lightning_modules.detector import SSDDetector


class NaNAfterDetector(SSDDetector):
    """An SSD whose loss turns NaN from global step ``nan_step`` on (on rank ``nan_rank`` only, if given), to exercise
    the NaN guard."""

    def __init__(self, *args, nan_step: int = 3, nan_rank: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_step, self.nan_rank = nan_step, nan_rank

    def forward(self, images):
        loc, conf = super().forward(images)
        mine = self.nan_rank is None or self.nan_rank == self.global_rank
        if self.training and self.global_step >= self.nan_step and mine:
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


def read_wandb_run(run_dir) -> dict:
    """What an offline W&B run recorded, read back from its ``run-<id>.wandb`` file: ``config`` and ``summary`` (key ->
    value), ``history`` (list of dicts). The file is W&B's record log (a LevelDB-style log of protobuf records:
    7-byte header ``:W&B`` + magic + version, then 32 KiB blocks of records with a 7-byte header each: crc32,
    length, type FULL/FIRST/MIDDLE/LAST); W&B itself ships no Python reader for it any more."""
    import json
    import struct
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2 as pb

    path = next(Path(run_dir).glob("run-*.wandb"))
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, records, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(parts)
            parts = b""
    out = {"config": {}, "summary": {}, "history": []}
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind in ("config", "run"):  # the config given to wandb.init travels in the run record
            items = rec.config.update if kind == "config" else rec.run.config.update
            out["config"].update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in items})
        elif kind == "summary":
            out["summary"].update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in rec.summary.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return out


class AssertCompiledMatchesEager(Callback):
    """At every epoch start: the module runs a compiled network (``--model.compile``) wrapping exactly the current
    ``pl_module.model`` (compiled afresh after a surgery), whose output equals the eager network's; records the
    widths it saw in ``SSD_COMPILE_LOG`` (one line per epoch), so a test can see the surgeries happened."""

    def on_train_epoch_start(self, trainer, pl_module):
        import os

        from torch._dynamo.eval_frame import OptimizedModule

        net = pl_module.net()
        assert isinstance(net, OptimizedModule) and net._orig_mod is pl_module.model, type(net)
        was = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                x = pl_module.model.example_input(2).to(pl_module.device)
                for a, b in zip(net(x), pl_module.model(x)):
                    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
        finally:
            pl_module.train(was)
        if os.environ.get("SSD_COMPILE_LOG"):
            with open(os.environ["SSD_COMPILE_LOG"], "a") as f:
                f.write(f"{sum(pl_module.model.channels.values())}\n")


class LossAsOnAGpu(Callback):
    """The module's MultiBox loss in its GPU form (sync-free; so, under ``--model.compile``, the compiled graph) on a
    CPU; at every epoch's end: under ``--model.compile`` the compiled loss was built and never fell back to eager."""

    def setup(self, trainer, pl_module, stage):
        pl_module.loss_fn.sync_free = True

    def on_train_epoch_end(self, trainer, pl_module):
        from lightning_modules import box_ops

        if pl_module.loss_fn.compile:
            assert box_ops._COMPILED_LOSS is not None, "the compiled loss never ran"
            assert "the MultiBox loss" not in box_ops._COMPILE_FAILED, box_ops._COMPILE_FAILED


def shrunk_default_config(config: str, out_dir, params_x: float, macs_x: float):
    """A ``*_default.yaml`` config (the default method on the BatchNorm SSD) with its callbacks as written and only the
    schedule shrunk to 4 CPU epochs of 2 batches (fade over epochs 1-2, cut at the end of 2): the budgets stay. Checks
    that the config names the budgets the test expects; returns the path of the shrunk copy in ``out_dir``."""
    cfg = yaml.safe_load(Path(config).read_text())
    assert cfg["model"]["init_args"]["batch_norm"] and cfg["model"]["init_args"]["pretrained_backbone"]
    sparsity = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("SparsityInduction"))["init_args"]
    assert (sparsity["target_params_x"], sparsity["target_macs_x"]) == (params_x, macs_x)
    sparsity["schedule"][0]["l1_epochs"] = [1, 3]
    cfg["trainer"].update(max_steps=-1, max_epochs=4, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1,
                          check_val_every_n_epoch=4, precision="32", accelerator="cpu", logger=False,
                          default_root_dir=str(Path(out_dir) / "runs"))
    path = Path(out_dir) / "default.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path

"""Distributed training and evaluation: samplers, metric sync, the global batch, and (slow) the whole pruning
pipeline under DDP with 2 CPU processes (gloo) against 1 process."""

import json
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from datamodules.samplers import EvalSampler, TrainSampler
from tests.conftest import run_train
from tests.test_prune_train import shrunken_demo


@pytest.mark.parametrize("n", [1, 5, 12, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_sampler_counts_every_image_exactly_once(n, world):
    seen = [i for r in range(world) for i in EvalSampler(range(n), num_replicas=world, rank=r)]
    assert sorted(seen) == list(range(n))
    assert sum(len(EvalSampler(range(n), num_replicas=world, rank=r)) for r in range(world)) == n


@pytest.mark.parametrize("world", [2, 4])
def test_train_sampler_global_batches_do_not_depend_on_world_size(world):
    n, per_device = 50, 3
    one = TrainSampler(range(n), batch_size=per_device * world, seed=7, num_replicas=1, rank=0)
    shards = [TrainSampler(range(n), batch_size=per_device, seed=7, num_replicas=world, rank=r) for r in range(world)]
    for epoch in (0, 3):
        one.set_epoch(epoch)
        for s in shards:
            s.set_epoch(epoch)
        ref = list(one)
        parts = [list(s) for s in shards]
        assert all(len(p) == len(ref) // world for p in parts)
        for k in range(len(ref) // (per_device * world)):  # global batch k: the same images, same seeds
            batch = [x for p in parts for x in p[k * per_device:(k + 1) * per_device]]
            assert batch == ref[k * per_device * world:(k + 1) * per_device * world]
    one.set_epoch(1)
    assert [i for i, _ in one] != [i for i, _ in ref]  # a new order every epoch


def test_train_sampler_gives_each_image_a_new_augmentation_seed_every_epoch_and_run():
    """An image's augmentation seed changes from epoch to epoch (else every epoch would repeat the same crops and
    flips) and from run seed to run seed, and is the same when the same epoch is replayed (a resumed run)."""
    def seeds(seed, epoch):
        s = TrainSampler(range(40), batch_size=8, seed=seed, num_replicas=1, rank=0)
        s.set_epoch(epoch)
        return dict(iter(s))

    e0, e1, other = seeds(7, 0), seeds(7, 1), seeds(8, 0)
    assert len(e0) == len(e1) == len(other) == 40
    assert all(e0[i] != e1[i] for i in e0) and all(e0[i] != other[i] for i in e0)
    assert seeds(7, 1) == e1 and len(set(e0.values())) == 40


def test_global_batch_must_divide_over_devices(tmp_path):
    from datamodules.voc import DataError, VOCDataModule
    from tests.voc_fixture import tiny_voc

    tiny_voc(tmp_path)  # the data module checks its split files when it is built
    dm = VOCDataModule(root=str(tmp_path), train_sets=[(2007, "trainval")], classes=["cat", "dog"], batch_size=8)
    dm.trainer = SimpleNamespace(world_size=3)
    with pytest.raises(DataError, match="global batch size and must divide evenly over 3"):
        dm.per_device_batch_size()
    dm.trainer = SimpleNamespace(world_size=4)
    assert dm.per_device_batch_size() == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_case(seed, n_images=13, classes=3):
    g = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(n_images):
        k, m = int(torch.randint(0, 6, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        xy = torch.rand(k + m, 2, generator=g) * 200
        wh = torch.rand(k + m, 2, generator=g) * 80 + 10
        boxes = torch.cat([xy, xy + wh], 1)
        preds.append({"boxes": boxes[:k] + torch.rand(k, 4, generator=g) * 10, "scores": torch.rand(k, generator=g),
                      "labels": torch.randint(0, classes, (k,), generator=g)})
        targets.append({"boxes": boxes[k:], "labels": torch.randint(0, classes, (m,), generator=g),
                        "difficult": torch.rand(m, generator=g) < 0.2})
    return preds, targets


def _metric_worker(rank, world, port, out):
    from lightning_modules.metrics import VOCMeanAveragePrecision

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    preds, targets = _random_case(0)
    metric = VOCMeanAveragePrecision(3)
    idx = list(EvalSampler(range(len(preds)), num_replicas=world, rank=rank))
    metric.update([preds[i] for i in idx], [targets[i] for i in idx])
    res = metric.compute()
    if rank == 0:
        torch.save({k: v for k, v in res.items()}, out)
    dist.destroy_process_group()


def test_distributed_evaluation_equals_one_process(tmp_path):
    from lightning_modules.metrics import VOCMeanAveragePrecision

    port = _free_port()
    out = tmp_path / "res.pt"
    mp.spawn(_metric_worker, args=(3, port, str(out)), nprocs=3, join=True)
    preds, targets = _random_case(0)
    single = VOCMeanAveragePrecision(3)
    single.update(preds, targets)
    ref, got = single.compute(), torch.load(out)
    assert torch.allclose(got["map"], ref["map"]) and torch.allclose(got["ap_per_class"], ref["ap_per_class"], equal_nan=True)


def _end_worker(rank, world, port, out):
    from callbacks.distributed import end_distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    t = torch.full((2,), float(rank))
    dist.all_reduce(t)
    end_distributed()
    torch.save({"sum": t, "initialized": dist.is_initialized()}, f"{out}.{rank}")


def test_every_rank_leaves_the_process_group_at_the_end(tmp_path):
    # Lightning destroys only NCCL groups at exit; a gloo group left to interpreter finalisation can abort a rank
    from callbacks.distributed import end_distributed

    end_distributed()  # one process, no group: nothing to do
    port = _free_port()
    mp.spawn(_end_worker, args=(2, port, str(tmp_path / "r")), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"r.{rank}")
        assert got["initialized"] is False and got["sum"].tolist() == [1.0, 1.0]


def _nan_worker(rank, world, port, out):
    from lightning_modules.common import NonFiniteLossError, check_loss_finite

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    check_loss_finite(torch.tensor(1.5), 7)  # finite everywhere: nothing happens
    try:
        check_loss_finite(torch.tensor(float("nan") if rank == 1 else 2.5), 8,
                          {"loc": torch.tensor(1.0), "conf": torch.tensor(float("nan"))}, "Lower the lr.")
        msg = "no error"
    except NonFiniteLossError as err:
        msg = str(err)
    torch.save(msg, f"{out}.{rank}")
    dist.destroy_process_group()


def test_a_nan_loss_on_one_rank_stops_every_rank(tmp_path):
    from lightning_modules.common import NonFiniteLossError, check_loss_finite

    check_loss_finite(torch.tensor(0.3), 1)
    with pytest.raises(NonFiniteLossError, match=r"^training loss became inf at global step 4 \(loc inf\)\. Lower"):
        check_loss_finite(torch.tensor(float("inf")), 4, {"loc": torch.tensor(float("inf"))}, "Lower the lr.")
    port = _free_port()
    mp.spawn(_nan_worker, args=(2, port, str(tmp_path / "m")), nprocs=2, join=True)
    msgs = [torch.load(tmp_path / f"m.{r}") for r in (0, 1)]
    assert msgs[1] == "training loss became nan on rank 1 at global step 8 (loc 1, conf nan). Lower the lr."
    assert msgs[0] == ("training loss became non-finite on rank 1 at global step 8 (this rank's: 2.5); every rank "
                       "stopped. Lower the lr.")


class _Strategy:
    """What ``rewrap_ddp`` uses of Lightning's DDPStrategy: the wrapper, the module, and ``configure_ddp``."""

    def __init__(self, module):
        from torch.nn.parallel import DistributedDataParallel

        self.lightning_module, self.model = module, DistributedDataParallel(module)

    def configure_ddp(self):
        from torch.nn.parallel import DistributedDataParallel

        self.model = DistributedDataParallel(self.lightning_module)


def _ranks_worker(rank, world, port, out):
    from callbacks.distributed import RanksInconsistentError, check_ranks, rewrap_ddp
    from lightning_modules.detector import SSDDetector

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    got = {}
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    with torch.no_grad():
        model[1].running_mean.fill_(rank)  # each rank's statistics drifted on its own data
    got["same"] = check_ranks(model, "a surgery")
    got["running_mean"] = model[1].running_mean.tolist()
    with torch.no_grad():
        model[0].weight[0, 0] += rank  # rank 1's weights are no longer rank 0's
    try:
        check_ranks(model, "a surgery")
        got["differ"] = "no error"
    except RanksInconsistentError as err:
        got["differ"] = str(err)
    # SSD's loss normaliser: the mean number of positives over the ranks
    got["num_pos"] = SSDDetector._mean_over_ranks(torch.tensor(float(rank + 1))).item()
    # a surgery replaces a layer: the wrapper is rebuilt around the new parameters, whose gradients are averaged
    net = torch.nn.Sequential(torch.nn.Linear(3, 4))
    trainer = SimpleNamespace(strategy=_Strategy(net))
    net[0] = torch.nn.Linear(3, 2)
    got["rewrapped"] = rewrap_ddp(trainer)
    trainer.strategy.model(torch.full((1, 3), float(rank + 1))).sum().backward()
    got["grad"] = net[0].weight.grad.tolist()
    torch.save(got, f"{out}.{rank}")
    dist.destroy_process_group()


def test_ranks_share_one_model_one_loss_normaliser_and_one_gradient(tmp_path):
    """``check_ranks`` after a surgery: BatchNorm statistics that drifted per rank are taken from rank 0, and a
    weight that differs stops every rank naming the odd one; the positives' count is averaged over the ranks; a
    re-wrapped model averages the gradients of the surgery's new parameters."""
    from callbacks.distributed import model_fingerprint, rewrap_ddp

    a, b = torch.nn.Module(), torch.nn.Module()
    a.register_buffer("w", torch.zeros(2, 3))
    b.register_buffer("w", torch.zeros(3, 2))
    assert model_fingerprint(a) != model_fingerprint(b)  # the same bytes in another shape: another architecture
    assert rewrap_ddp(SimpleNamespace(strategy=SimpleNamespace(model=a))) is False  # not under DDP: nothing to do
    port = _free_port()
    mp.spawn(_ranks_worker, args=(2, port, str(tmp_path / "r")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r.{r}") for r in (0, 1))
    assert r0["same"]["ranks_consistent"] and r0["same"]["world_size"] == 2 and r0["same"]["hash"] == r1["same"]["hash"]
    assert r0["running_mean"] == r1["running_mean"] == [0.0] * 4
    for r in (r0, r1):
        assert r["differ"].startswith("after a surgery: the model on rank(s) [1] differs from rank 0's")
        assert r["num_pos"] == 1.5 and r["rewrapped"] is True
    assert r0["grad"] == r1["grad"] == [[1.5] * 3] * 2  # inputs 1 and 2: the mean gradient of the two ranks


def _ddp_config(tmp_path, extra_callbacks=()):
    path = shrunken_demo(tmp_path, max_epochs=4)
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["callbacks"] = list(extra_callbacks) + cfg["trainer"]["callbacks"]
    cfg["trainer"]["limit_train_batches"] = None  # whole epochs: 12 images = 3 global batches of 4
    cfg["trainer"]["limit_val_batches"] = None
    cfg["model"]["init_args"]["batch_norm"] = False
    path.write_text(yaml.safe_dump(cfg))
    return path


# SyncBatchNorm needs GPUs; without BatchNorm 2 processes compute the 1-process gradient of the same global batch
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    cfg = _ddp_config(tmp_path)
    one = run_train(["--config", str(cfg), "--run_name", "one"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_train(["--config", str(cfg), "--run_name", "two", *DDP], env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    # no advice to all-reduce the val / test figures: torchmetrics already did (lightning_modules/common.py)
    assert "self.log('val/" not in two.stderr and "self.log('test/" not in two.stderr
    s1 = json.loads((tmp_path / "runs/one/summary.json").read_text())
    s2 = json.loads((tmp_path / "runs/two/summary.json").read_text())
    assert s2["world_size"] == 2 and s2["ranks_consistent"] is True and s1["world_size"] == 1
    c1 = torch.load(tmp_path / "runs/one/checkpoints/last.ckpt", weights_only=True)
    c2 = torch.load(tmp_path / "runs/two/checkpoints/last.ckpt", weights_only=True)
    st1 = next(v for k, v in c1["callbacks"].items() if "SparsityInduction" in k)
    st2 = next(v for k, v in c2["callbacks"].items() if "SparsityInduction" in k)
    assert len(st2["surgeries"]) == len(st1["surgeries"]) == 3
    assert all(r["world_size"] == 2 and r["ranks_consistent"] for r in st2["surgeries"])
    assert s2["channels"] == s1["channels"]
    # every test image counted once: the 2-process test mAP equals one process's evaluation of the same final weights
    ev = run_train(["--config", str(cfg), "--run_name", "eval2", "--evaluate", str(tmp_path / "runs/two/checkpoints/last.ckpt")])
    assert ev.returncode == 0, ev.stderr[-3000:]
    s_ev = json.loads((tmp_path / "runs/eval2/summary.json").read_text())
    assert s_ev["world_size"] == 1 and s2["final"]["map50"] == s_ev["final"]["map50"]


@pytest.mark.slow
def test_ddp_rank_mismatch_stops_the_run(tmp_path):
    cfg = _ddp_config(tmp_path, [{"class_path": "tests.helpers.PerturbOneRank", "init_args": {"rank": 1, "epoch": 0}}])
    proc = run_train(["--config", str(cfg), "--run_name", "bad", *DDP], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "differs from rank 0" in proc.stderr and "surgery of phase 0" in proc.stderr


def test_slurm_run_name_and_requeue_checkpoint(tmp_path, monkeypatch):
    import time as _time

    import train

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert train.default_run_name() == "slurm-4242"  # every srun task, and the requeued job, agree
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert train.default_run_name() == "torchrun-abc"
    assert train.newest_checkpoint(tmp_path) is None  # --ckpt_path auto on a fresh run: start from scratch
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert train.newest_checkpoint(tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    _time.sleep(0.02)
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"x")  # Lightning's SIGUSR1 (requeue) checkpoint, newer
    assert train.newest_checkpoint(tmp_path) == str(tmp_path / "hpc_ckpt_1.ckpt")


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank_without_a_launcher(tmp_path):
    """Ranks started apart, as srun or a per-node launcher starts them (Lightning then kills no other rank when one
    dies): a NaN loss on rank 1 alone stops rank 0 at the same step too, with the reason. Before, rank 0 went on into
    the gradient all-reduce: with gloo it died there of a traceback ("Connection closed by peer ... a remote worker
    crashing"), with NCCL across nodes it would wait until the process group's timeout."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    cfg = yaml.safe_load(_ddp_config(tmp_path).read_text())
    port = _free_port()
    procs = []
    for rank in (0, 1):  # one "node" each; each its own copy of the data (the same seed: the same images)
        cfg["data"]["init_args"]["root"] = str(tmp_path / f"syn{rank}")
        path = tmp_path / f"rank{rank}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {**{k: v for k, v in os.environ.items() if k != "SSD_RUN_DIR"}, "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "NODE_RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "train.py", "--config", str(path), "--run_name", f"nan{rank}",
             "--model.class_path", "tests.helpers.NaNAfterDetector", "--model.init_args.nan_step", "1",
             "--model.init_args.nan_rank", "1", "--trainer.num_nodes", "2", "--trainer.devices", "1",
             "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode != 0 for p in procs), errs
    assert "training loss became nan on rank 1 at global step 1" in errs[1], errs[1][-2000:]
    assert "training loss became non-finite on rank 1 at global step 1" in errs[0], errs[0][-2000:]

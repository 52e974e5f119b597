"""Pruned models that survive: resume at every stage of the schedule, export round trips, ONNX parity,
evaluate / predict / export from the command line, corrupt and mismatched files, atomic checkpoint writes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import ROOT, run_train
from tests.test_prune_train import shrunken_demo

# P0 thresholds at the end of epoch 0 but its surgery waits until the end of epoch 1 (masked retraining in
# between), P1 prunes at the end of epoch 2, so the checkpoints of epochs 0..2 are: masks active before any
# surgery (mid-phase), after the first surgery, after the second.
SCHEDULE = [
    {"layers": ["conv4_3", "conv5_1", "conv5_2", "conv5_3", "conv6", "conv7"], "l1_epochs": [0, 1], "surgery_epoch": 2},
    {"layers": ["conv7", "conv8_1", "conv8_2", "conv9_1", "conv9_2"], "l1_epochs": [2, 3]},
]


def _config(tmp_path: Path) -> Path:
    path = shrunken_demo(tmp_path, max_epochs=4, schedule=SCHEDULE)
    cfg = yaml.safe_load(path.read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["save_top_k"] = -1  # keep every epoch's checkpoint
    path.write_text(yaml.safe_dump(cfg))
    return path


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted pruning run (4 epochs, 2 surgeries), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("persist")
    os.environ.pop("SSD_RUN_DIR", None)
    cfg = _config(tmp)
    _ok(run_train(["--config", str(cfg), "--run_name", "full"], env={"WANDB_MODE": "offline"}))
    run = tmp / "runs" / "full"
    return {"tmp": tmp, "cfg": cfg, "run": run, "summary": json.loads((run / "summary.json").read_text())}


def _state(ckpt_path):
    return torch.load(ckpt_path, map_location="cpu", weights_only=True)


def _pruning_state(ckpt):
    return next(v for k, v in ckpt["callbacks"].items() if "SparsityInduction" in k)


@pytest.mark.parametrize("epoch,stage", [(0, "mid-phase, masks active, before any surgery"),
                                         (1, "after the first surgery"), (2, "after the second surgery")])
def test_resume_at_each_stage_matches_uninterrupted(trained, epoch, stage):
    ckpt = next((trained["run"] / "checkpoints").glob(f"epoch={epoch}-*.ckpt"))
    state = _pruning_state(_state(ckpt))
    assert len(state["surgeries"]) == epoch and bool(state["masks"]) == (epoch == 0), stage
    name = f"resume{epoch}"
    _ok(run_train(["--config", str(trained["cfg"]), "--run_name", name, "--ckpt_path", str(ckpt)]))
    run = trained["tmp"] / "runs" / name
    s = json.loads((run / "summary.json").read_text())
    assert s["channels"] == trained["summary"]["channels"]
    no_latency = lambda d: {k: v for k, v in d.items() if k != "latency_ms"}  # latency: timed at the end
    assert no_latency(s["dense"]) == no_latency(trained["summary"]["dense"])  # travels in the pruning state
    a, b = _state(trained["run"] / "checkpoints/last.ckpt"), _state(run / "checkpoints/last.ckpt")
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    # data order and augmentation are seeded per epoch and sample: the resumed run is bit-identical
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_run_exports_and_export_round_trips(trained):
    from lightning_modules.export import load_detector, onnx_param_count
    from lightning_modules.ssd import load_exported

    s = trained["summary"]
    assert set(s["export"]) == {"safetensors", "json", "onnx"}
    # the dense architecture is reported as it was before the surgeries, not as the final widths
    assert s["dense_channels"] != s["channels"] and set(s["dense_channels"]) == set(s["channels"])
    assert all(s["dense_channels"][k] >= v for k, v in s["channels"].items())
    spec = json.loads(Path(s["export"]["json"]).read_text())
    assert spec["architecture"]["channels"] == s["channels"] and spec["classes"] == ["circle", "square", "triangle", "star", "cross"]
    assert spec["input"]["size"] == [300, 300] and spec["decode"]["nms_threshold"] == 0.45
    model = load_exported(Path(s["export"]["json"]).parent)
    ckpt = load_detector(trained["run"] / "checkpoints/last.ckpt")
    x = torch.randint(0, 256, (2, 3, 300, 300), dtype=torch.uint8)
    with torch.no_grad():
        ref = ckpt(x)
        out = model(ckpt.preprocess(x))
    assert all(torch.equal(r, o) for r, o in zip(ref, out))
    assert sum(p.numel() for p in model.parameters()) == s["final"]["params"]
    # ONNX: BatchNorm folds into the convolutions, so its weights are the pruned model's minus BN's affine
    # parameters, plus the 6 normalisation constants (mean, std)
    bn = sum(2 * m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert onnx_param_count(s["export"]["onnx"]) == s["final"]["params"] - bn + 6 < s["dense"]["params"]


def test_onnx_matches_pytorch(tmp_path):
    import onnxruntime as ort

    from lightning_modules.export import export_onnx, onnx_param_count
    from lightning_modules.ssd import build_ssd

    channels = {"conv4_3": 24, "conv5_3": 16, "conv6": 40, "conv7": 56, "conv8_2": 24}
    for bn in (False, True):
        model = build_ssd(300, 6, channels, width_mult=0.125, num_branches=5, batch_norm=bn).eval()
        with torch.no_grad():  # trained-like biases (the exporter would share identical all-zero initialisers)
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        if bn:  # non-trivial statistics, so folding is exercised
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
        path = export_onnx(model, tmp_path / f"m{bn}.onnx")
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        x = torch.randint(0, 256, (3, 3, 300, 300)).float()
        loc, conf = sess.run(None, {"images": x.numpy()})
        from lightning_modules.export import NormalizedSSD

        with torch.no_grad():
            rloc, rconf = NormalizedSSD(model)(x)
        assert loc.shape == tuple(rloc.shape) and conf.shape == tuple(rconf.shape)
        assert np.abs(loc - rloc.numpy()).max() <= 1e-4 and np.abs(conf - rconf.numpy()).max() <= 1e-4
        n_bn = sum(2 * m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        assert onnx_param_count(path) == sum(p.numel() for p in model.parameters()) - n_bn + 6  # + mean, std


def test_evaluate_export_and_checkpoint_from_cli(trained):
    s = trained["summary"]
    export_dir = str(Path(s["export"]["json"]).parent)
    for source in (export_dir, str(trained["run"] / "checkpoints/last.ckpt")):
        proc = _ok(run_train(["--config", str(trained["cfg"]), "--evaluate", source, "--run_name", "eval" + str(len(source))]))
        ev = json.loads(Path(proc.stdout.strip().splitlines()[-1][len("summary: "):]).read_text())
        assert set(ev) == set(s) - {"training"} and "training" in s  # evaluating trains nothing: no training rate
        assert ev["final"]["map50"] == pytest.approx(s["final"]["map50"], abs=1e-6)
        assert ev["channels"] == s["channels"] and ev["final"]["params"] == s["final"]["params"]
        assert ev["export"] == {"evaluated": source}
    # an export trained on other classes is refused with a clear message
    proc = run_train(["--config", str(trained["cfg"]), "--evaluate", export_dir, "--data.classes", "[a, b, c, d, e]",
                      "--data.root", str(trained["tmp"] / "other")])
    assert proc.returncode == 2 and "was trained on classes" in proc.stderr


def test_predict_and_export_on_demand(trained, tmp_path):
    import cv2

    images = tmp_path / "imgs"
    images.mkdir()
    src = sorted((trained["tmp"] / "syn" / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))[:3]
    for i, f in enumerate(src):
        img = cv2.imread(str(f))
        if i == 1:
            img = cv2.resize(img, (200, 120))  # any size
        cv2.imwrite(str(images / (f.stem + (".png" if i == 2 else ".jpg"))), img)
    (images / "notes.txt").write_text("not an image")
    ckpt = trained["run"] / "checkpoints/last.ckpt"
    proc = subprocess.run([sys.executable, "train.py", "--export", str(ckpt), "--out", str(tmp_path / "exp")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name for p in (tmp_path / "exp").iterdir()} == {"model.safetensors", "model.json", "model.onnx"}
    proc = subprocess.run([sys.executable, "train.py", "--predict", str(tmp_path / "exp"), "--images", str(images),
                           "--out", str(tmp_path / "pred"), "--score_threshold", "0.0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dets = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert set(dets["images"]) == {p.name for p in images.iterdir() if p.suffix != ".txt"}
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.png")) == sorted(f.stem + ".png" for f in src)
    small = cv2.imread(str(tmp_path / "pred" / (src[1].stem + ".png")))
    assert small.shape[:2] == (120, 200)
    for boxes in dets["images"].values():
        for d in boxes:
            assert len(d["box"]) == 4 and 0 <= d["score"] <= 1 and d["class"] in dets["classes"]
    # the predictions equal what the checkpoint gives
    from lightning_modules.export import load_detector, predict_images

    det = load_detector(ckpt)
    ref = predict_images(det, [cv2.cvtColor(cv2.imread(str(images / (src[0].stem + ".jpg"))), cv2.COLOR_BGR2RGB)])[0]
    got = dets["images"][src[0].stem + ".jpg"]
    assert len(got) == len(ref["scores"]) > 0
    # one to one, in any order among near-equal scores (the folded network's last bits reorder ties such as
    # 0.09408063 / 0.09408051)
    left = list(zip(ref["boxes"].tolist(), ref["scores"].tolist(), ref["labels"].tolist()))
    for d in got:
        match = next((i for i, (box, score, label) in enumerate(left)
                      if d["label"] == label and d["box"] == pytest.approx(box, abs=0.006)
                      and d["score"] == pytest.approx(score, abs=6e-5)), None)
        assert match is not None, f"{d} is not among the checkpoint's detections"
        assert d["class"] == dets["classes"][d["label"]]
        left.pop(match)
    assert [d["score"] for d in got] == sorted((d["score"] for d in got), reverse=True)


def test_corrupt_and_mismatched_files(trained, tmp_path):
    from lightning_modules.export import CheckpointError, load_detector, read_checkpoint
    from lightning_modules.ssd import WeightsMismatchError, load_exported

    export_dir = Path(trained["summary"]["export"]["json"]).parent
    ckpt = trained["run"] / "checkpoints/last.ckpt"
    # truncated checkpoint: a clear message, from python and from the CLI
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(bad)
    proc = run_train(["--config", str(trained["cfg"]), "--ckpt_path", str(bad), "--run_name", "bad"])
    assert proc.returncode == 2 and "truncated or corrupt" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(tmp_path / "empty.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt")
    # truncated safetensors, broken JSON
    for name, damage in (("model.safetensors", lambda b: b[: len(b) // 3]), ("model.json", lambda b: b[:-20])):
        d = tmp_path / f"broken_{name}"
        d.mkdir()
        for f in export_dir.iterdir():
            data = f.read_bytes()
            (d / f.name).write_bytes(damage(data) if f.name == name else data)
        with pytest.raises(ValueError, match="corrupt"):
            load_exported(d)
    # mismatched architecture: the first mismatched layer and both shapes
    d = tmp_path / "mismatch"
    d.mkdir()
    for f in export_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    spec = json.loads((d / "model.json").read_text())
    spec["architecture"]["channels"]["conv5_3"] += 8
    (d / "model.json").write_text(json.dumps(spec))
    w = trained["summary"]["channels"]["conv5_3"]
    with pytest.raises(WeightsMismatchError, match=rf"layers\.conv5_3\.weight has shape \({w}, .*expects \({w + 8}, "):
        load_exported(d)
    # a checkpoint's weights into a model of another width
    from lightning_modules.detector import SSDDetector

    dense = SSDDetector(["circle", "square", "triangle", "star", "cross"], width_mult=0.125, batch_norm=True)
    state = read_checkpoint(ckpt)
    state.pop("architecture")
    torch.save(state, tmp_path / "noarch.ckpt")
    with pytest.raises(WeightsMismatchError, match="layers.conv4_3.weight has shape"):
        dense.load_weights(str(tmp_path / "noarch.ckpt"))
    assert load_detector(ckpt).model.channels == trained["summary"]["channels"]


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    from lightning_modules.export import AtomicCheckpointIO, read_checkpoint

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, path)
    real_save = torch.save

    def crash(obj, f, *a, **k):  # writes half a checkpoint, then the process "dies"
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert read_checkpoint(path)["epoch"] == 1  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_same_widths(trained, tmp_path):
    """Kill -9 during epoch 2 (after the first surgery), resume from last.ckpt: same final widths and weights."""
    cfg = yaml.safe_load(trained["cfg"].read_text())
    cfg["trainer"]["limit_train_batches"] = 3
    path = tmp_path / "kill.yaml"
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "runs")
    cfg["data"]["init_args"]["root"] = str(trained["tmp"] / "syn")
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "SSD_RUN_DIR"}
    env["SSD_SLOW_STEP_S"] = "1.0"  # tests.helpers: widen the window in which the kill lands mid-epoch
    steps = tmp_path / "steps.log"
    env["SSD_STEP_LOG"] = str(steps)  # tests.helpers: one line "epoch batch" per training step started
    proc = subprocess.Popen([sys.executable, "train.py", "--config", str(path), "--run_name", "k",
                             "--model.class_path", "tests.helpers.SlowStepDetector"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = tmp_path / "runs" / "k" / "checkpoints"
    deadline = time.time() + 300
    while not (steps.is_file() and "2 0" in steps.read_text().splitlines()):  # epoch 2's first step has started
        assert proc.poll() is None and time.time() < deadline, "training ended before the kill"
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = steps.read_text().splitlines()[-1]
    assert last in ("2 0", "2 1"), f"the kill landed outside epoch 2 (last step started: {last})"  # of 3 steps
    assert list(ckpt_dir.glob("epoch=1-*.ckpt")) and not list(ckpt_dir.glob("epoch=2-*.ckpt"))
    _ok(run_train(["--config", str(path), "--run_name", "k2", "--ckpt_path", str(ckpt_dir / "last.ckpt"),
                   "--model.class_path", "tests.helpers.SlowStepDetector"], env={"SSD_SLOW_STEP_S": "0"}))
    s = json.loads((tmp_path / "runs" / "k2" / "summary.json").read_text())
    assert s["channels"] == trained["summary"]["channels"]
    a, b = _state(trained["run"] / "checkpoints/last.ckpt"), _state(tmp_path / "runs/k2/checkpoints/last.ckpt")
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_ckpt_path_auto_resumes_the_same_run_and_wandb_run(trained, tmp_path):
    cfg = yaml.safe_load(trained["cfg"].read_text())
    cfg["trainer"]["logger"] = {"class_path": "pytorch_lightning.loggers.WandbLogger",
                                "init_args": {"project": "ssd-pruning-test", "log_model": False}}
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "runs")
    cfg["data"]["init_args"]["root"] = str(trained["tmp"] / "syn")
    path = tmp_path / "wandb.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {"WANDB_MODE": "offline"}
    first = _ok(run_train(["--config", str(path), "--run_name", "w", "--ckpt_path", "auto"], env=env))
    assert "resuming from" not in first.stderr  # nothing to resume yet: a fresh start
    s1 = json.loads((tmp_path / "runs/w/summary.json").read_text())
    second = _ok(run_train(["--config", str(path), "--run_name", "w", "--ckpt_path", "auto",
                            "--trainer.max_epochs", "5"], env=env))
    assert f"resuming from {tmp_path / 'runs/w/checkpoints/last.ckpt'}" in second.stderr
    s2 = json.loads((tmp_path / "runs/w/summary.json").read_text())
    assert _state(tmp_path / "runs/w/checkpoints/last.ckpt")["epoch"] == 4
    assert s2["channels"] == s1["channels"]
    run_id = lambda d: Path(d).name.rsplit("-", 1)[-1]  # offline-run-<time>-<id>
    assert run_id(s1["wandb_dir"]) == run_id(s2["wandb_dir"])  # the same W&B run, continued


def test_restarted_learning_rate_follows_each_surgery_and_survives_resume(tmp_path):
    """StructuredSurgery(retrain_lr="restart"): after each surgery the learning rate ramps back to the peak and decays
    to 0 at the run's last step; the restart lives in the pruning state, so a run resumed after a surgery (whose
    rebuilt LambdaLR knows nothing of it) trains bit for bit as the uninterrupted one."""
    path = shrunken_demo(tmp_path, max_epochs=4)  # 3 steps per epoch, surgeries at the ends of epochs 0, 1, 2
    cfg = yaml.safe_load(path.read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("StructuredSurgery"):
            cb["init_args"] = {**(cb.get("init_args") or {}), "retrain_lr": "restart", "retrain_lr_peak": 0.8}
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["save_top_k"] = -1
    path.write_text(yaml.safe_dump(cfg))
    _ok(run_train(["--config", str(path), "--run_name", "full"]))
    run = tmp_path / "runs" / "full"
    lr = cfg["model"]["init_args"]["lr"]
    after_second = _state(next((run / "checkpoints").glob("epoch=1-*.ckpt")))
    spec = _pruning_state(after_second)["lr_restart"]
    assert (spec["start"], spec["end"], spec["peak"]) == (6, 12, 0.8)
    assert after_second["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(lr * spec["from_factor"])
    from callbacks.retrain import restarted_factor

    third = _pruning_state(_state(next((run / "checkpoints").glob("epoch=2-*.ckpt"))))["lr_restart"]
    assert third["start"] == 9 and third["from_factor"] == pytest.approx(restarted_factor(6, 12, 0.8, 0.1, spec["from_factor"])(9))
    final = _state(run / "checkpoints/last.ckpt")
    assert final["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    _ok(run_train(["--config", str(path), "--run_name", "resumed", "--ckpt_path",
                   str(next((run / "checkpoints").glob("epoch=1-*.ckpt")))]))
    resumed = _state(tmp_path / "runs/resumed/checkpoints/last.ckpt")
    for k, v in final["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k


def test_restarted_learning_rate_goes_on_from_the_reached_rate_up_to_the_peak_and_down_to_zero():
    """``restart_lr`` at step 3 of a 20-step run whose schedule had reached 0.9 ** 3 of the lr: the rate goes on from
    there (no jump), ramps linearly to the peak over 20 % of the 17 remaining steps, then follows a cosine to 0 at
    the last step and stays there."""
    from types import SimpleNamespace

    from callbacks.retrain import restart_lr, restarted_factor

    f = restarted_factor(0, 20, peak=0.8, ramp=0.2, from_factor=0.1)  # ramp over 4 steps, cosine over 16
    assert [round(f(t), 6) for t in (0, 2, 4, 12, 20, 25)] == [0.1, 0.45, 0.8, 0.4, 0.0, 0.0]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.9 ** it)
    for _ in range(3):
        opt.step()
        sched.step()
    trainer = SimpleNamespace(lr_scheduler_configs=[SimpleNamespace(scheduler=sched, interval="step")],
                              estimated_stepping_batches=20)
    spec = restart_lr(trainer, peak=1.0, ramp=0.2)
    assert spec == {"start": 3, "end": 20, "peak": 1.0, "ramp": 0.2, "from_factor": pytest.approx(0.729)}
    rates = [opt.param_groups[0]["lr"]]
    for _ in range(17):
        opt.step()
        sched.step()
        rates.append(opt.param_groups[0]["lr"])
    up = round(0.2 * 17)  # 3 steps up
    assert rates[0] == pytest.approx(0.5 * 0.729) and rates[up] == pytest.approx(0.5)
    assert rates[:up + 1] == sorted(rates[:up + 1]) and rates[up:] == sorted(rates[up:], reverse=True)
    assert rates[-1] == pytest.approx(0.0, abs=1e-12)


class _NotATensor:
    """A pickled object in a checkpoint: what ``weights_only`` loading refuses (it could run code on load)."""


def test_export_load_and_predict_keep_the_decoding_settings_overrides_and_image_sizes(tmp_path, monkeypatch):
    """Without training: the export's model.json holds the run's decoding settings; ``load_detector`` from an export
    and from a checkpoint takes them, with ``overrides`` winning; predictions come back in pixels of each image
    (x by its width, y by its height) and ``predict_folder`` writes those scoring at least the threshold; a
    checkpoint holding a pickled object is refused."""
    import cv2

    from lightning_modules.detector import SSDDetector
    from lightning_modules.export import (CheckpointError, export_detector, load_detector, predict_folder,
                                          predict_images, read_checkpoint)

    det = SSDDetector(["cat", "dog"], width_mult=0.0625, conf_threshold=0.05, nms_threshold=0.3, top_k=50)
    paths = export_detector(det, tmp_path / "exp", onnx=False)
    decode = json.loads(Path(paths["json"]).read_text())["decode"]
    assert decode == {"conf_threshold": 0.05, "nms_threshold": 0.3, "top_k": 50, "box_coder_weights": [10, 10, 5, 5]}
    ckpt = {"state_dict": {f"model.{k}": v for k, v in det.model.state_dict().items()},
            "hyper_parameters": dict(det.hparams),
            "architecture": {"channels": det.model.channels, "num_branches": det.model.num_branches}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    for source in (tmp_path / "exp", tmp_path / "last.ckpt"):
        hp = load_detector(source, conf_threshold=0.5).hparams
        assert (hp.conf_threshold, hp.nms_threshold, hp.top_k) == (0.5, 0.3, 50), source

    def fixed(images):  # two detections per image, in normalised xyxy
        return [{"boxes": torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]]),
                 "scores": torch.tensor([0.9, 0.2]), "labels": torch.tensor([1, 0])} for _ in images]

    monkeypatch.setattr(det, "predict_batch", fixed)
    wide = np.zeros((120, 200, 3), np.uint8)
    (got,) = predict_images(det, [wide])
    torch.testing.assert_close(got["boxes"], torch.tensor([[20.0, 24, 100, 72], [0, 0, 200, 120]]))
    (tmp_path / "imgs").mkdir()
    cv2.imwrite(str(tmp_path / "imgs" / "wide.jpg"), wide)
    out = json.loads(predict_folder(det, tmp_path / "imgs", tmp_path / "pred", score_threshold=0.3).read_text())
    assert out["images"] == {"wide.jpg": [{"box": [20.0, 24.0, 100.0, 72.0], "score": 0.9, "label": 1,
                                           "class": "dog"}]}
    assert (tmp_path / "pred" / "wide.png").is_file() and "skipped" not in out
    # a corrupt file among them is skipped with a warning and listed; two files of one stem are drawn apart; the
    # drawn PNGs never go into the images folder itself; a folder of nothing readable is an error
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not an image")
    cv2.imwrite(str(tmp_path / "imgs" / "wide.png"), wide)
    with pytest.warns(UserWarning, match=r"1 of 3 images in .*imgs unreadable or corrupt, skipped .*: broken\.jpg"):
        out = json.loads(predict_folder(det, tmp_path / "imgs", tmp_path / "pred2").read_text())
    assert sorted(out["images"]) == ["wide.jpg", "wide.png"]
    assert out["skipped"] == {"broken.jpg": "unreadable or corrupt image"}
    assert sorted(p.name for p in (tmp_path / "pred2").glob("*.png")) == ["wide.jpg.png", "wide.png.png"]
    with pytest.raises(FileNotFoundError, match="is the images folder"):
        predict_folder(det, tmp_path / "imgs", tmp_path / "imgs" / ".." / "imgs")
    # one image file instead of a folder; a file that is not an image, or nothing at all, is refused
    one = json.loads(predict_folder(det, tmp_path / "imgs" / "wide.jpg", tmp_path / "one").read_text())
    assert list(one["images"]) == ["wide.jpg"] and [p.name for p in (tmp_path / "one").glob("*.png")] == ["wide.png"]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"notes\.txt is not an image \(\.jpg, "):
        predict_folder(det, tmp_path / "notes.txt", tmp_path / "pred4")
    with pytest.raises(FileNotFoundError, match="is neither an image nor a folder of images"):
        predict_folder(det, tmp_path / "nowhere", tmp_path / "pred4")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="none of the 1 images in .*bad could be read"):
        predict_folder(det, tmp_path / "bad", tmp_path / "pred3")

    torch.save({**ckpt, "extra": _NotATensor()}, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match="Only load checkpoints you trust"):
        read_checkpoint(tmp_path / "pickled.ckpt")

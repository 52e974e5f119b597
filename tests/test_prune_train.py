"""The pruning callbacks inside a real fit: the demo config shrunk to seconds."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, run_train


def shrunken_demo(tmp_path: Path, max_epochs: int = 4, schedule=None, config: str = "experiments/demo_phases.yaml") -> Path:
    cfg = yaml.safe_load((ROOT / config).read_text())
    cfg["trainer"]["max_epochs"] = max_epochs
    cfg["trainer"]["limit_train_batches"] = 3
    cfg["trainer"]["limit_val_batches"] = 1
    cfg["trainer"]["check_val_every_n_epoch"] = 1
    cfg["trainer"]["logger"] = False
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "runs")
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("SparsityInduction"):
            cb["init_args"]["schedule"] = schedule or [
                {"layers": ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2", "conv4_3"], "l1_epochs": [0, 1]},
                {"layers": ["conv4_3", "conv5_1", "conv5_2", "conv5_3", "conv6", "conv7"], "l1_epochs": [1, 2]},
                {"layers": ["conv7", "conv8_1", "conv8_2", "conv9_1", "conv9_2", "conv10_1", "conv10_2", "conv11_1", "conv11_2"], "l1_epochs": [2, 3]},
            ]
    d = cfg["data"]["init_args"]
    d.update(root=str(tmp_path / "syn"), batch_size=4)
    d["synthetic"].update(num_train=12, num_test=4)
    path = tmp_path / "demo_small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_whole_method_in_one_fit(tmp_path):
    proc = run_train(["--config", str(shrunken_demo(tmp_path)), "--run_name", "p"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "runs/p/summary.json").read_text())
    assert s["final"]["params"] < s["dense"]["params"] and s["compression"]["params_x"] > 1
    assert {"map50_before_pruning", "map50_before_pruning_epoch", "latency_ms", "macs"} <= set(s["dense"])
    assert "map50" not in s["dense"]  # a mid-training snapshot is not an equal-budget dense figure
    ckpt = torch.load(tmp_path / "runs/p/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["architecture"]["channels"] == s["channels"]
    state = next(v for k, v in ckpt["callbacks"].items() if "SparsityInduction" in k)
    assert [r["phase"] for r in state["surgeries"]] == [0, 1, 2] and state["masks"] == {}
    # the pruned checkpoint loads without the config and runs
    from lightning_modules.detector import SSDDetector

    model = SSDDetector.load_from_checkpoint(tmp_path / "runs/p/checkpoints/last.ckpt", map_location="cpu")
    assert model.model.channels == s["channels"]
    model.eval()(torch.zeros(1, 3, 300, 300, dtype=torch.uint8))


def test_paper_mode_in_one_fit(tmp_path):
    """experiments/demo_paper.yaml shrunk: threshold searched on the carved validation split, tau normalised by the
    RMS before L1, G over all consumers, kept filters from Theta_L1, SGD."""
    cfg = shrunken_demo(tmp_path, config="experiments/demo_paper.yaml")
    proc = run_train(["--config", str(cfg), "--run_name", "paper"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "runs/paper/summary.json").read_text())
    ckpt = torch.load(tmp_path / "runs/paper/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if "SparsityInduction" in k)
    assert [r["phase"] for r in state["surgeries"]] == [0, 1, 2]
    assert set(state["l1_rms"]) == {0, 1, 2} and state["l1_weights"] == {}  # Θ_L1 used up by the surgeries
    assert s["final"]["params"] <= s["dense"]["params"]
    hp = yaml.safe_load((tmp_path / "runs/paper/config.yaml").read_text())
    assert hp["model"]["init_args"]["optimizer"] == "sgd" and hp["data"]["init_args"]["val_fraction"] == 0.1


def test_bn_scale_sparsity_removes_exactly_the_masked_channels(tmp_path):
    """sparsity_on: bn_scale — L1 (proximal, AdamW) on BatchNorm scales, one tau on |gamma|, the masked channels
    are the removed filters."""
    cfg = shrunken_demo(tmp_path, max_epochs=3, schedule=[
        {"layers": ["conv4_3", "conv5_1", "conv5_2", "conv5_3", "conv6", "conv7"], "l1_epochs": [0, 1], "surgery_epoch": 2}])
    raw = yaml.safe_load(cfg.read_text())
    for cb in raw["trainer"]["callbacks"]:
        if cb["class_path"].endswith("SparsityInduction"):
            cb["init_args"].update(sparsity_on="bn_scale", l1_mode="proximal", l1_lambda=2.0, target_sparsity=0.5)
        if cb["class_path"].endswith("FilterSelection"):
            cb["init_args"].update(s_F=1.0, s_F_min=1.0, s_G=1.0, round_to=1, min_width=1)
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["save_top_k"] = -1
    cfg.write_text(yaml.safe_dump(raw))
    proc = run_train(["--config", str(cfg), "--run_name", "bn"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    masked = torch.load(next((tmp_path / "runs/bn/checkpoints").glob("epoch=0-*.ckpt")), map_location="cpu",
                        weights_only=True)
    state = next(v for k, v in masked["callbacks"].items() if "SparsityInduction" in k)
    dead = {n: int((~m).sum()) for n, m in state["masks"].items()}
    # the only phase is the last: all its layers may lose filters (conv1_1 alone is never pruned)
    assert set(dead) == {"conv4_3", "conv5_1", "conv5_2", "conv5_3", "conv6", "conv7"}
    assert all(m.dim() == 1 for m in state["masks"].values())
    assert sum(dead.values()) == round(0.5 * sum(m.numel() for m in state["masks"].values()))
    for n, m in state["masks"].items():  # masked channels: gamma and beta at exactly 0
        assert (masked["state_dict"][f"model.norms.{n}.weight"][~m] == 0).all()
        assert (masked["state_dict"][f"model.norms.{n}.bias"][~m] == 0).all()
    s = json.loads((tmp_path / "runs/bn/summary.json").read_text())
    from lightning_modules.ssd import resolve_channels

    full = resolve_channels(300, None, 0.125)
    assert {n: full[n] - s["channels"][n] for n in dead} == dead  # exactly the masked channels went


def test_bn_scale_to_a_params_budget_with_mac_aware_ranking(tmp_path):
    """target_params_x: the threshold is searched so the pruned model has at most dense / x parameters (widths as
    FilterSelection rounds them), with channels ranked by |gamma| / (relative MAC cost) ** cost_exponent."""
    cfg = shrunken_demo(tmp_path, max_epochs=2, schedule=[
        {"layers": ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2",
                    "conv4_3", "conv5_1", "conv5_2", "conv5_3", "conv6", "conv7", "conv8_1", "conv8_2"], "l1_epochs": [0, 1]}])
    raw = yaml.safe_load(cfg.read_text())
    for cb in raw["trainer"]["callbacks"]:
        if cb["class_path"].endswith("SparsityInduction"):
            cb["init_args"].update(sparsity_on="bn_scale", l1_mode="proximal", l1_lambda=1.0, target_params_x=3.0,
                                   cost_exponent=0.5, channel_score="gamma_g", score_norm="layer_mean")
        if cb["class_path"].endswith("FilterSelection"):
            cb["init_args"].update(s_F=1.0, s_F_min=1.0, s_G=1.0)
    cfg.write_text(yaml.safe_dump(raw))
    proc = run_train(["--config", str(cfg), "--run_name", "budget"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "runs/budget/summary.json").read_text())
    budget = s["dense"]["params"] / 3.0
    assert 0.85 * budget <= s["final"]["params"] <= budget
    from lightning_modules.ssd import resolve_channels

    full = resolve_channels(300, None, 0.125)
    early = ["conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2"]
    assert any(s["channels"][n] < full[n] for n in early)  # the costly high-resolution layers are cut too


def test_bad_schedule_fails_at_start_up(tmp_path):
    cfg = shrunken_demo(tmp_path, schedule=[{"layers": ["conv5_1", "conv_oops"], "l1_epochs": [0, 1]}])
    proc = run_train(["--config", str(cfg)])
    assert proc.returncode != 0 and "unknown layer(s) ['conv_oops']" in proc.stderr


@pytest.mark.slow  # torch.compile on CPU: a few compilations (~2-4 min)
def test_compiled_training_recompiles_after_each_surgery(tmp_path):
    """--model.compile true: the fit runs the compiled network, every surgery recompiles it at the new widths (the
    compiled output matches the eager one at every epoch start), and the checkpoint keeps the plain keys. The loss
    runs in its GPU form, so compiled too (through a surgery's reset of every compiled graph)."""
    cfg = shrunken_demo(tmp_path, max_epochs=3, schedule=[
        {"layers": ["conv4_3", "conv5_1", "conv5_2", "conv5_3", "conv6", "conv7"], "l1_epochs": [0, 1]}])
    raw = yaml.safe_load(cfg.read_text())
    raw["trainer"]["callbacks"][:0] = [{"class_path": "tests.helpers.AssertCompiledMatchesEager"},
                                       {"class_path": "tests.helpers.LossAsOnAGpu"}]
    cfg.write_text(yaml.safe_dump(raw))
    log = tmp_path / "compile.log"
    proc = run_train(["--config", str(cfg), "--run_name", "c", "--model.compile", "true"],
                     env={"SSD_COMPILE_LOG": str(log)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    widths = [int(x) for x in log.read_text().split()]
    assert len(widths) == 3 and widths[0] > widths[1] == widths[2]  # epoch 1 and 2 ran the pruned network
    s = json.loads((tmp_path / "runs/c/summary.json").read_text())
    assert s["final"]["params"] < s["dense"]["params"]
    ckpt = torch.load(tmp_path / "runs/c/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert not any("_orig_mod" in k or "compiled" in k for k in ckpt["state_dict"])
    # --predict --compile: the same detections as the eager network
    images = tmp_path / "imgs"
    images.mkdir()
    for f in sorted((tmp_path / "syn" / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))[:2]:
        (images / f.name).write_bytes(f.read_bytes())
    got = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        p = run_train(["--predict", str(tmp_path / "runs/c/export"), "--images", str(images), "--out",
                       str(tmp_path / name), "--score_threshold", "0.0", *extra])
        assert p.returncode == 0, p.stderr[-3000:]
        got[name] = json.loads((tmp_path / name / "detections.json").read_text())["images"]
    assert got["eager"].keys() == got["compiled"].keys()
    for k, dets in got["eager"].items():  # the 20 best scores (deeper down, near-ties may swap or cross 0.01)
        top = lambda ds: sorted((d["score"] for d in ds), reverse=True)[:20]  # noqa: E731
        assert len(dets) > 0 and top(got["compiled"][k]) == pytest.approx(top(dets), abs=1e-4)

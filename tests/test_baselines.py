"""The comparison baselines of benchmarks/bench_methods.py run inside a real fit and do what they claim."""

import json

import pytest
import torch
import yaml

from tests.conftest import run_train
from tests.test_prune_train import shrunken_demo

PRUNING = ("SparsityInduction", "FilterSelection", "StructuredSurgery")


def _baseline_config(tmp_path, callback):
    path = shrunken_demo(tmp_path, max_epochs=2)
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["callbacks"] = [callback, {"class_path": "tests.helpers.AssertTrainMode"}] + [
        cb for cb in cfg["trainer"]["callbacks"] if not cb["class_path"].endswith(PRUNING)]
    cfg["trainer"]["max_epochs"] = 3  # two epochs of retraining after the prune at the end of epoch 0
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_l1norm_selection_keeps_largest_filters():
    from benchmarks.baselines import l1norm_selection
    from lightning_modules.ssd import build_ssd

    model = build_ssd(300, 3, width_mult=0.125)
    with torch.no_grad():
        model.layers["conv5_1"].weight.copy_(torch.arange(64.0).view(64, 1, 1, 1).expand_as(model.layers["conv5_1"].weight))
    assert sorted(l1norm_selection(model, {"conv5_1": 40})["conv5_1"]) == list(range(24))


def test_tp_global_selection_leaves_the_model_in_training_mode():
    from benchmarks.baselines import tp_global_selection, tp_ratio_for_params
    from lightning_modules.ssd import build_ssd

    model = build_ssd(300, 3, width_mult=0.125, batch_norm=True).train()
    assert tp_global_selection(model, 300, 0.5)
    assert all(m.training for m in model.modules())
    ratio, params = tp_ratio_for_params(model, 300, 200_000)
    assert all(m.training for m in model.modules()) and abs(params - 200_000) < 0.05 * 200_000


def test_model_pruning_baseline_does_not_rewind_weights():
    from benchmarks.baselines import ModelPruningOnce

    assert ModelPruningOnce(amount=0.5, prune_epoch=1)._use_lottery_ticket_hypothesis is False


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["l1norm", "tp_global_magnitude", "modelpruning"])
def test_baselines_prune_inside_a_fit(tmp_path, kind):
    if kind == "modelpruning":
        cb = {"class_path": "benchmarks.baselines.ModelPruningOnce", "init_args": {"amount": 0.6, "prune_epoch": 0}}
    elif kind == "l1norm":
        cb = {"class_path": "benchmarks.baselines.OneShotFilterPruning",
              "init_args": {"criterion": "l1norm", "epoch": 0, "channels": {"conv5_3": 16, "conv6": 40, "conv7": 24},
                            "retrain_lr": "restart"}}  # ours' learning-rate restart, as bench row tp_params_restart
    else:
        cb = {"class_path": "benchmarks.baselines.OneShotFilterPruning",
              "init_args": {"criterion": "tp_global_magnitude", "epoch": 0, "target_params": 200_000}}
    proc = run_train(["--config", str(_baseline_config(tmp_path, cb)), "--run_name", kind])
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "runs" / kind / "summary.json").read_text())
    from lightning_modules.export import load_detector

    model = load_detector(tmp_path / "runs" / kind / "export").model
    params = sum(p.numel() for p in model.parameters())
    if kind != "modelpruning":  # the report's dense side: the architecture before the cut, timed beside the final one
        assert s["dense"]["params"] == 529_028 > s["final"]["params"] == params
        assert s["compression"]["params_x"] == pytest.approx(529_028 / params, abs=1e-4)
        assert s["dense_channels"]["conv6"] > s["channels"]["conv6"] and s["dense"]["latency_ms"] > 0
    if kind == "modelpruning":  # unstructured: same size, zeros inside
        assert s["final"]["params"] == 529_028
        zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert zeros / conv == pytest.approx(0.6, abs=0.01)
    elif kind == "l1norm":
        assert {k: s["channels"][k] for k in ("conv5_3", "conv6", "conv7")} == {"conv5_3": 16, "conv6": 40, "conv7": 24}
        ckpt = torch.load(tmp_path / "runs" / kind / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
        state = next(v for k, v in ckpt["callbacks"].items() if "OneShotFilterPruning" in k)
        assert (state["lr_restart"]["start"], state["lr_restart"]["end"]) == (3, 9)  # restarted at the cut, to the end
        assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    else:
        assert 150_000 < params <= 260_000


def test_tp_ratio_search_reaches_a_macs_target():
    from benchmarks.baselines import _count, tp_global_selection, tp_ratio_for_params
    from callbacks.surgery import prune_filters
    from lightning_modules.ssd import build_ssd

    model = build_ssd(300, 3, width_mult=0.125, batch_norm=True)
    target = _count(model, 300, "macs") // 2
    ratio, got = tp_ratio_for_params(model, 300, target, measure="macs", steps=10)
    assert abs(got - target) < 0.05 * target
    prune_filters(model, tp_global_selection(model, 300, ratio))
    assert _count(model, 300, "macs") == got


def test_scratch_baseline_scales_every_width_to_the_target_params(tmp_path):
    from benchmarks.bench_methods import uniform_widths
    from lightning_modules.classifier import VGGClassifier, export_classifier
    from lightning_modules.ssd import build_ssd, save_exported

    dense = build_ssd(300, 4, width_mult=0.125, batch_norm=True)
    save_exported(dense, tmp_path / "det", ["a", "b", "c"])
    args, got = uniform_widths(tmp_path / "det", 120_000)
    assert args[0] == "--model.channels" and abs(got - 120_000) < 0.03 * 120_000
    channels = json.loads(args[1])
    assert sum(p.numel() for p in build_ssd(300, 4, channels, batch_norm=True).parameters()) == got
    ratios = [channels[k] / w for k, w in dense.channels.items() if w >= 32]  # one factor, up to rounding
    assert max(ratios) - min(ratios) < 0.05 and 0.3 < ratios[0] < 0.7

    clf = VGGClassifier(["x", "y"], size=32, width_mult=0.25)
    export_classifier(clf, tmp_path / "clf", onnx=False)
    args, got = uniform_widths(tmp_path / "clf", 50_000)
    assert args[2:] == ["--model.hidden", args[3]] and abs(got - 50_000) < 0.03 * 50_000
    small = VGGClassifier(["x", "y"], size=32, channels=json.loads(args[1]), hidden=int(args[3]))
    assert sum(p.numel() for p in small.model.parameters()) == got


def test_scratch_widths_baseline_rebuilds_the_pruned_architecture_fresh(tmp_path):
    from benchmarks.bench_methods import architecture_args
    from lightning_modules.classifier import VGGClassifier, export_classifier
    from lightning_modules.detector import SSDDetector
    from lightning_modules.ssd import build_ssd, save_exported

    dense = build_ssd(300, 4, width_mult=0.125, batch_norm=True)
    pruned_widths = {k: max(1, w // (2 + i % 3)) for i, (k, w) in enumerate(dense.channels.items())}
    pruned = build_ssd(300, 4, pruned_widths, num_branches=4, batch_norm=True)
    save_exported(pruned, tmp_path / "det", ["a", "b", "c"])
    args = architecture_args(tmp_path / "det")
    assert args[0::2] == ["--model.channels", "--model.num_branches"]
    fresh = SSDDetector(["a", "b", "c"], width_mult=0.125, batch_norm=True, channels=json.loads(args[1]),
                        num_branches=int(args[3])).model
    assert fresh.channels == pruned.channels and fresh.num_branches == 4
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in pruned.parameters()]

    clf = VGGClassifier(["x", "y"], size=32, width_mult=0.25, hidden=40)
    export_classifier(clf, tmp_path / "clf", onnx=False)
    args = architecture_args(tmp_path / "clf")
    assert args[2:] == ["--model.hidden", "40"] and json.loads(args[1]) == clf.model.channels


def test_schedule_restart_alone_restarts_the_dense_run(tmp_path):
    """bench row dense_restart: ours' learning-rate restart on the dense network, nothing pruned."""
    cb = {"class_path": "benchmarks.baselines.ScheduleRestart", "init_args": {"epoch": 0, "retrain_lr_peak": 0.5}}
    proc = run_train(["--config", str(_baseline_config(tmp_path, cb)), "--run_name", "restart"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "runs/restart/summary.json").read_text())
    assert s["final"]["params"] == 529_028
    ckpt = torch.load(tmp_path / "runs/restart/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if "ScheduleRestart" in k)
    assert (state["lr_restart"]["start"], state["lr_restart"]["end"], state["lr_restart"]["peak"]) == (3, 9, 0.5)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_one_shot_baseline_with_restart_resumes_bit_for_bit(tmp_path):
    """OneShotFilterPruning(retrain_lr: restart) keeps its restart in its own checkpoint state: a run resumed after
    the cut (rebuilt at the pruned widths, with a LambdaLR that knows nothing of the restart) trains exactly as the
    uninterrupted one."""
    cb = {"class_path": "benchmarks.baselines.OneShotFilterPruning",
          "init_args": {"criterion": "l1norm", "epoch": 0, "channels": {"conv5_3": 16, "conv6": 40, "conv7": 24},
                        "retrain_lr": "restart", "retrain_lr_peak": 0.7}}
    path = _baseline_config(tmp_path, cb)
    cfg = yaml.safe_load(path.read_text())
    for c in cfg["trainer"]["callbacks"]:
        if c["class_path"].endswith("ModelCheckpoint"):
            c["init_args"]["save_top_k"] = -1  # every epoch's checkpoint
    path.write_text(yaml.safe_dump(cfg))
    proc = run_train(["--config", str(path), "--run_name", "full"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = tmp_path / "runs/full/checkpoints"
    after_cut = next(ckpts.glob("epoch=0-*.ckpt"))
    state = next(v for k, v in torch.load(after_cut, map_location="cpu", weights_only=True)["callbacks"].items()
                 if "OneShotFilterPruning" in k)
    assert state["done"] and state["lr_restart"]["peak"] == 0.7
    proc = run_train(["--config", str(path), "--run_name", "resumed", "--ckpt_path", str(after_cut)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "runs/resumed/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert a["state_dict"]["model.layers.conv6.weight"].shape[0] == 40
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    full, resumed = (json.loads((tmp_path / f"runs/{n}/summary.json").read_text()) for n in ("full", "resumed"))
    assert resumed["dense_channels"] == full["dense_channels"] != full["channels"]  # the dense side survives a resume
    assert resumed["compression"]["params_x"] == full["compression"]["params_x"] > 1


def test_bench_writes_one_config_per_run_and_refuses_a_stale_baseline(tmp_path, monkeypatch):
    """Benches of several seeds may share one --out at once: each run's config is its own file (a baseline's target
    comes from its seed's run of ours), and a finished baseline pruned to another target is not reused silently."""
    import argparse

    from benchmarks import bench_methods as bm

    ours_params = {0: 280_608, 1: 426_248}
    reached = {}

    def fake_run(out, name, cfg, seed, train_args, reference):
        assert cfg == out / f"{name}.yaml"
        if name.startswith("tp_params"):
            init = yaml.safe_load(cfg.read_text())["trainer"]["callbacks"][0]["init_args"]
            reached[seed] = {"target": init["target_params"]}
        return {"final": {"params": ours_params[seed], "macs": 1}, "channels": {}}

    monkeypatch.setattr(bm, "_run", fake_run)
    monkeypatch.setattr(bm, "_callback_state", lambda run, name: {"reached": reached.get(int(run.name[-1]))})
    args = argparse.Namespace(config="experiments/demo.yaml", paper_config="experiments/demo_paper.yaml",
                              methods=["dense", "ours", "tp_params"], prune_epoch=3)
    for seed in (0, 1):
        bm.run_seed(args, tmp_path, seed, [])
    for seed in (0, 1):
        init = yaml.safe_load((tmp_path / f"tp_params-s{seed}.yaml").read_text())["trainer"]["callbacks"][0]["init_args"]
        assert init["target_params"] == ours_params[seed]
    reached[1] = {"target": ours_params[0]}  # seed 1's baseline on disk was pruned to seed 0's target
    monkeypatch.setattr(bm, "_run", lambda out, name, cfg, seed, *a: {"final": {"params": ours_params[seed],
                                                                                 "macs": 1}, "channels": {}})
    with pytest.raises(RuntimeError, match="stale"):
        bm.run_seed(args, tmp_path, 1, [])


def test_bench_prunes_ours_to_torch_pruning_operating_point(tmp_path, monkeypatch):
    """``ours_at_tp``: ours with its budgets replaced by tp_params' final params and MACs (absolute budgets, no
    ``_x`` budgets left), a finished run pruned to another point refused; ``--methods`` is checked up front."""
    import argparse
    import subprocess
    import sys

    from benchmarks import bench_methods as bm

    tp_final = {"params": 283_744, "macs": 380_567_432}
    budgets = {}

    def fake_run(out, name, cfg, seed, train_args, reference):
        final = tp_final if name.startswith("tp_params") else {"params": 280_608, "macs": 700_280_776}
        return {"final": final, "channels": {}, "budgets": budgets.get(name, {})}

    monkeypatch.setattr(bm, "_run", fake_run)
    monkeypatch.setattr(bm, "_callback_state", lambda run, name: {"reached": {"target": 280_608}})
    args = argparse.Namespace(config="experiments/demo.yaml", paper_config="experiments/demo_paper.yaml",
                              methods=["dense", "ours", "tp_params", "ours_at_tp"], prune_epoch=3)
    bm.run_seed(args, tmp_path, 0, [])
    cfg = yaml.safe_load((tmp_path / "ours_at_tp-s0.yaml").read_text())
    init = next(cb["init_args"] for cb in cfg["trainer"]["callbacks"] if cb["class_path"].endswith("SparsityInduction"))
    assert (init["target_params"], init["target_macs"]) == (283_744, 380_567_432)
    assert "target_params_x" not in init and "target_macs_x" not in init
    assert init["l1_target"] == "below_budget" and init["fill_budget"] is True  # the rest of ours as it is
    ours = yaml.safe_load((tmp_path / "ours-s0.yaml").read_text())
    classes = [[cb["class_path"] for cb in c["trainer"]["callbacks"]] for c in (ours, cfg)]
    assert classes[0] == classes[1]
    budgets["ours_at_tp-s0"] = {"params": {"budget": 283_744}, "macs": {"budget": 700_280_776}, "binding": "macs"}
    with pytest.raises(RuntimeError, match="stale"):
        bm.run_seed(args, tmp_path, 0, [])
    for methods, message in (("dense,ours,ours_at_tp", "add tp_params"), ("dense,ours,tp", "unknown method")):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_methods", "--methods", methods,
                               "--out", str(tmp_path / "x")], capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr

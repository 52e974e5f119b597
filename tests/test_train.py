"""train.py end to end: every experiment YAML on shrunken data, CLI overrides, bad configs, NaN guard, W&B."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import run_train
from tests.helpers import shrunk_default_config
from tests.voc_fixture import tiny_voc

SUMMARY_KEYS = {"params", "macs", "size_mb", "map50", "latency_ms"}


def _summary(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("summary: "), proc.stdout[-2000:]
    path = Path(last[len("summary: "):])
    if not path.is_absolute():
        path = Path(__file__).resolve().parents[1] / path
    return path, json.loads(path.read_text())


def _demo_args(tmp_path, *extra):
    return ["--config", "experiments/demo.yaml", "--trainer.default_root_dir", str(tmp_path / "runs"),
            "--data.root", str(tmp_path / "syn"), "--data.synthetic.num_train", "8", "--data.synthetic.num_test", "4",
            "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.logger", "false", *extra]


def test_demo_fast_dev_run_writes_summary(tmp_path):
    proc = run_train(_demo_args(tmp_path, "--trainer.fast_dev_run", "true"))
    path, s = _summary(proc)
    assert SUMMARY_KEYS - {"map50"} <= set(s["dense"]) and SUMMARY_KEYS <= set(s["final"])
    assert "map50" not in s["dense"] and "reference" not in s  # no pruning: no "before pruning" figure to report
    assert set(s["compression"]) == {"params_x", "size_x", "macs_x", "speedup_x"}
    assert s["compression"]["params_x"] == 1.0 and s["channels"]["conv7"] == 128
    # the reported mAP is what the exported model gives on the test split, evaluated here independently
    assert s["final"]["map50"] == pytest.approx(_independent_map50(Path(s["export"]["json"]).parent, tmp_path / "syn"),
                                                abs=1e-6)
    assert s["final"]["map50"] == s["test_metrics"]["test/map50"]
    # --reference: the drop against an equal-budget dense run (here: the same run again)
    proc = run_train(_demo_args(tmp_path, "--trainer.fast_dev_run", "true", "--reference", str(path.parent)))
    _, r = _summary(proc)
    assert r["reference"]["run"] == str(path.parent) and r["reference"]["map50"] == s["final"]["map50"]
    assert r["drop"]["map50"] == pytest.approx(s["final"]["map50"] - r["final"]["map50"], abs=1e-6)
    assert r["drop"]["params_x"] == 1.0
    proc = run_train(_demo_args(tmp_path, "--trainer.fast_dev_run", "true", "--reference", str(tmp_path / "nowhere")))
    assert proc.returncode == 2 and "no summary.json there" in proc.stderr


def test_a_runs_saved_config_runs_again_as_it_is(tmp_path):
    limits = ("--trainer.max_epochs", "7", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
              "--trainer.limit_test_batches", "1")
    path, _ = _summary(run_train(_demo_args(tmp_path, *limits, "--run_name", "first")))
    saved = path.parent / "config.yaml"
    assert "Unable to serialize" not in saved.read_text()  # nothing in it that cannot be parsed back
    again, _ = _summary(run_train(["--config", str(saved), "--trainer.fast_dev_run", "true", "--run_name", "again"]))
    assert again.parent.name == "again"


def test_summary_says_how_fast_the_run_trained_and_what_limited_it(tmp_path):
    """Every run gets TrainingThroughput (train.py adds it): per epoch images/s, the step's share waiting for data,
    in summary.json's ``training``, and in the checkpoint (so a resumed run keeps the epochs before it)."""
    args = _demo_args(tmp_path, "--trainer.max_epochs", "7", "--trainer.limit_train_batches", "3",
                      "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1", "--run_name", "rate")
    args[args.index("--data.synthetic.num_train") + 1] = "12"
    path, s = _summary(run_train(args))
    t = s["training"]
    assert [e["epoch"] for e in t["epochs"]] == list(range(7)) and all(e["batches"] == 3 for e in t["epochs"])
    assert t["images_per_s_first_epoch"] > 0 and t["images_per_s_last_epoch"] > 0 and t["step_ms_last_epoch"] > 0
    assert 0 <= t["data_wait_share_last_epoch"] < 1
    assert t["limited_by"].split(" (")[0] in ("data loading", "the training step")
    ckpt = torch.load(path.parent / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("TrainingThroughput"))
    assert [e["epoch"] for e in state["epochs"]] == list(range(7))


def test_reference_budget_differences():
    from callbacks.report import config_differences

    a = {"seed_everything": 0, "trainer": {"max_epochs": 11, "callbacks": [1], "logger": False},
         "model": {"init_args": {"lr": 0.002}}}
    b = {"seed_everything": 1, "trainer": {"max_epochs": 11, "callbacks": [2, 3], "logger": True},
         "model": {"init_args": {"lr": 0.001}}}
    assert config_differences(a, b) == ["model.init_args.lr: 0.002 vs 0.001", "seed_everything: 0 vs 1"]
    assert config_differences(a, a) == []
    plug = lambda addr: {"trainer": {"plugins": [f"Unable to serialize instance <x.AtomicCheckpointIO object at {addr}>"]}}
    assert config_differences(plug("0x7fe08038f610"), plug("0x7f500a597250")) == []


def _independent_map50(export_dir: Path, root: Path) -> float:
    from datamodules.voc import VOCDataModule
    from lightning_modules.export import load_detector
    from lightning_modules.metrics import VOCMeanAveragePrecision

    det = load_detector(export_dir)
    dm = VOCDataModule(root=str(root), train_sets=[(2007, "trainval")], test_set=(2007, "test"), classes=det.classes,
                       batch_size=4, num_workers=0)
    dm.setup("test")
    metric = VOCMeanAveragePrecision(len(det.classes))
    with torch.no_grad():
        for images, targets in dm.test_dataloader():
            preds, gts, _, _ = det.metric_inputs(det.predict_batch(images), targets)
            metric.update(preds, gts)
    return float(metric.compute()["map"])


@pytest.mark.parametrize("config,size", [("voc_ssd300", 300), ("voc_ssd512", 512)])
def test_voc_experiments_fast_dev_run(tmp_path, config, size):
    tiny_voc(tmp_path / "voc", classes=("cat", "dog"), year=2007)
    tiny_voc(tmp_path / "voc", classes=("dog", "person"), year=2012)
    proc = run_train(["--config", f"experiments/{config}.yaml", "--trainer.default_root_dir", str(tmp_path / "runs"),
                      "--data.root", str(tmp_path / "voc"), "--data.batch_size", "2", "--data.num_workers", "0",
                      "--model.pretrained_backbone", "false", "--trainer.fast_dev_run", "true",
                      "--trainer.accelerator", "cpu", "--trainer.logger", "false"])
    path, s = _summary(proc)
    # full-width SSD with the 20 VOC classes, both years read, the standard default boxes
    from datamodules.voc import VOC_CLASSES

    assert s["final"]["params"] == {300: 26_285_486, 512: 27_188_676}[size]
    spec = json.loads(Path(s["export"]["json"]).read_text())
    assert spec["classes"] == list(VOC_CLASSES) and spec["priors"]["num_priors"] == {300: 8732, 512: 24564}[size]
    # per-class AP: defined exactly for the classes with non-difficult objects in the VOC2007 test split
    ap = s["final"]["ap50_per_class"]
    assert list(ap) == list(VOC_CLASSES) and {c for c, v in ap.items() if v is not None} == {"cat", "dog"}
    assert s["final"]["map50"] == s["test_metrics"]["test/map50"] == pytest.approx((ap["cat"] + ap["dog"]) / 2)


def test_any_voc_format_dataset_and_overrides(tmp_path):
    tiny_voc(tmp_path / "pets", classes=("cat", "dog"))
    proc = run_train(["--config", "experiments/demo.yaml", "--trainer.default_root_dir", str(tmp_path / "runs"),
                      "--data.root", str(tmp_path / "pets"), "--data.train_sets", "[[2007, trainval]]",
                      "--data.test_set", "[2007, test]", "--data.classes", "[cat, dog]",
                      "--data.batch_size", "2", "--data.num_workers", "0", "--trainer.max_epochs", "12",
                      "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
                      "--run_name", "pets"])
    path, s = _summary(proc)
    cfg = yaml.safe_load((path.parent / "config.yaml").read_text())
    assert cfg["data"]["init_args"]["batch_size"] == 2 and cfg["trainer"]["max_epochs"] == 12
    ckpt = torch.load(path.parent / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["hyper_parameters"]["classes"] == ["cat", "dog"]  # num_classes follows the data
    assert ckpt["state_dict"]["model.head.classification_head.module_list.0.bias"].shape[0] == 4 * 3


def test_missing_data_root_stops_with_clear_message(tmp_path):
    proc = run_train(["--config", "experiments/voc_ssd300.yaml", "--data.root", str(tmp_path / "nowhere"),
                      "--model.pretrained_backbone", "false", "--trainer.logger", "false",
                      "--trainer.default_root_dir", str(tmp_path / "runs")])
    assert proc.returncode == 2
    assert "nowhere/VOCdevkit/VOC2007/ImageSets/Main/trainval.txt" in proc.stderr
    assert "--data.download true" in proc.stderr and "Traceback" not in proc.stderr


def test_a_parse_report_of_an_unknown_shape_keeps_jsonargparse_full_report():
    """short_parse_error follows one class's nested keys down to its error line; where that class's report ends
    without one (the next line is a sibling branch of the union), it answers None and the full report stays."""
    from train import short_parse_error

    known = ('Parser key "data":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
             "    - Problem with given class_path 'datamodules.voc.VOCDataModule':\n"
             '        Parser key "batch_size":\n          Expected a <class \'int\'>. Got value: abc\n'
             "    - Expected a <class 'NoneType'>\n")
    assert short_parse_error(known, []) == "data.batch_size (VOCDataModule): Expected a <class 'int'>. Got value: abc"
    unknown = ('Parser key "data":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
               "    - Problem with given class_path 'datamodules.voc.VOCDataModule':\n"
               "    - Expected a <class 'NoneType'>\n")
    assert short_parse_error(unknown, []) is None
    assert short_parse_error("something else entirely", ["--run_name"]) is None


@pytest.mark.parametrize("args,edit,message", [
    (["--model.learning_rate", "0.1"], None, "error: model (SSDDetector): no option 'learning_rate'. Its options: "
                                             "classes, size, channels,"),
    (["--data.batchsize", "4"], None, "error: data (VOCDataModule): no option 'batchsize'; did you mean 'batch_size'? "
                                      "Its options: root, train_sets,"),
    ([], ("l1_mode: proximal ", "l1_mod: proximal "), "error: trainer.callbacks (SparsityInduction): no option "
                                                      "'l1_mod'; did you mean 'l1_mode'? Its options: schedule,"),
    ([], ("l1_epochs: [4, 6]", "l1_epoch: [4, 6]"), "error: trainer.callbacks.schedule (Phase): no option 'l1_epoch'; "
                                                    "did you mean 'l1_epochs'? Its options: layers, l1_epochs, "
                                                    "surgery_epoch, target_sparsity. (all options: python train.py "
                                                    "--help)"),
    ([], ("max_epochs: 11", "max_epoch: 11"), "error: Group 'trainer' does not accept option 'max_epoch'; did you mean "
                                              "'max_epochs'? (all options: python train.py --help)"),
    (["--model.width_mult", "wide"], None, "error: model.width_mult (SSDDetector): Expected a <class 'float'>. Got "
                                           "value: wide (all options: python train.py --help)"),
    (["--trainer.max_epoch", "1"], None, "error: unrecognized arguments: --trainer.max_epoch 1; did you mean "
                                         "'--trainer.max_epochs'? (all options: python train.py --help)"),
    (["--runname", "x"], None, "error: unrecognized arguments: --runname x; did you mean '--run_name'? (all options: "
                               "python train.py --help)"),
    ("experiments/voc_ssd300_defualt.yaml", None, "error: --config {cwd}/experiments/voc_ssd300_defualt.yaml: file does "
                                                  "not exist; did you mean 'voc_ssd300_default.yaml'? The configs in "
                                                  "{cwd}/experiments: cifar10_vgg16.yaml,"),
])
def test_a_wrong_config_key_or_value_is_one_line_with_the_closest_option(tmp_path, monkeypatch, capsys, args, edit,
                                                                           message):
    """A misspelt or abbreviated option on the command line or in a config file (in a callback's block, in a nested
    Phase, in the trainer group), a value of the wrong type, an unknown argument, a misspelt --config: one line naming
    where, the closest option and the accepted ones; no usage block, no dump of the config. (In process: train.py's __main__
    prints a ConfigError as "error: ..." with exit status 2, the next test runs that end to end.)"""
    from train import ConfigError, main

    monkeypatch.setenv("WANDB_MODE", "offline")
    config = Path("experiments/demo.yaml")
    if isinstance(args, str):  # a misspelt --config
        config, args, message = Path(args), [], message.format(cwd=Path.cwd())
    if edit:
        text = config.read_text()
        assert text.count(edit[0]) == 1
        config = tmp_path / "typo.yaml"
        config.write_text(text.replace(*edit))
    with pytest.raises(ConfigError) as err:
        main(["--config", str(config), *args])
    assert f"error: {err.value}".startswith(message), str(err.value)
    printed = capsys.readouterr()
    assert "usage:" not in printed.err + printed.out and "Given value" not in printed.err + printed.out


def test_a_misspelt_option_ends_the_command_with_one_line_and_status_2(tmp_path):
    proc = run_train(["--config", "experiments/demo.yaml", "--data.batchsize", "4"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: data (VOCDataModule): no option 'batchsize'; did you mean 'batch_size'? Its options: root, ")
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr and "Given value" not in proc.stderr


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    proc = run_train(_demo_args(tmp_path, "--model.class_path", "tests.helpers.NaNAfterDetector",
                                "--model.init_args.nan_step", "3",
                                "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                                "--run_name", "nan"))
    assert proc.returncode == 1
    assert "training loss became nan at global step 3" in proc.stderr and "Traceback" not in proc.stderr
    ckpt = tmp_path / "runs" / "nan" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, weights_only=False, map_location="cpu")
    assert state["global_step"] == 2 and all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_wandb_offline_without_credentials(tmp_path):
    # fast_dev_run would replace the logger by a dummy: run the demo's epochs on one batch each instead
    args = _demo_args(tmp_path, "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1")
    args = args[: args.index("--trainer.logger")] + args[args.index("--trainer.logger") + 2:]
    e = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    e["HOME"] = str(tmp_path)
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "train.py", *args], cwd=Path(__file__).resolve().parents[1], env=e,
                          capture_output=True, text=True, timeout=600)
    path, s = _summary(proc)
    assert s["wandb_dir"] and Path(s["wandb_dir"]).is_dir()
    assert f"wandb sync {s['wandb_dir']}" in proc.stdout


def test_from_trained_variant_starts_from_a_checkpoint(tmp_path):
    from datamodules.voc import VOC_CLASSES
    from lightning_modules.detector import SSDDetector

    tiny_voc(tmp_path / "voc", classes=("cat", "dog"), year=2007)
    tiny_voc(tmp_path / "voc", classes=("dog", "person"), year=2012)
    trained = SSDDetector(list(VOC_CLASSES))
    ckpt = tmp_path / "trained.ckpt"
    torch.save({"state_dict": trained.state_dict(), "architecture": {"channels": trained.model.channels, "num_branches": 6}}, ckpt)
    base = ["--config", "experiments/voc_ssd300_from_trained.yaml", "--trainer.default_root_dir", str(tmp_path / "runs"),
            "--data.root", str(tmp_path / "voc"), "--data.batch_size", "2", "--data.num_workers", "0",
            "--trainer.fast_dev_run", "true", "--trainer.accelerator", "cpu", "--trainer.logger", "false"]
    proc = run_train(base)
    assert proc.returncode != 0 and "--model.init_checkpoint" in proc.stderr
    path, s = _summary(run_train(base + ["--model.init_checkpoint", str(ckpt)]))
    assert s["final"]["params"] == 26_285_486


@pytest.mark.parametrize("size,params_x,macs_x", [(300, 7.7, 2.5), pytest.param(512, 4.9, 2.25, marks=pytest.mark.slow)])
def test_voc_default_configs_prune_to_their_budgets(tmp_path, size, params_x, macs_x):
    """experiments/voc_ssd{300,512}_default.yaml (the default method on the BatchNorm SSD) with its callbacks as
    written and only the schedule shrunk (epochs, not the budgets): one fit on a tiny VOC set ends at the config's
    parameter and MACs budgets."""
    tiny_voc(tmp_path / "voc", classes=("cat", "dog"), year=2007)
    tiny_voc(tmp_path / "voc", classes=("dog", "person"), year=2012)
    path = shrunk_default_config(f"experiments/voc_ssd{size}_default.yaml", tmp_path, params_x, macs_x)
    proc = run_train(["--config", str(path), "--data.root", str(tmp_path / "voc"), "--data.batch_size", "2",
                      "--data.num_workers", "0", "--data.val_fraction", "0.25", "--model.pretrained_backbone", "false",
                      "--model.width_mult", "0.25", "--run_name", "d"])
    path, s = _summary(proc)
    assert s["compression"]["params_x"] >= params_x and s["compression"]["macs_x"] >= macs_x
    assert s["compression"]["params_x"] < params_x * 1.3  # fill_budget spends the budget, it does not undershoot it

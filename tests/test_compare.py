"""``train.py --compare``: the table's numbers against the summaries, the pictures, grouping; the W&B keys."""

import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from callbacks.compare import CompareError, compare, flat_summary, pareto_front, run_meta
from tests.conftest import run_train
from tests.helpers import read_wandb_run
from tests.test_prune_train import shrunken_demo

LAYERS = {"conv1_1": 8, "conv1_2": 8, "conv2_1": 16, "conv7": 128}


def _write_run(root: Path, name: str, method: str, dataset: str, seed: int, map50: float, params: int, macs: int,
               latency: float, channels: dict, task: str = "detection") -> Path:
    run = root / name
    run.mkdir(parents=True)
    metric = "top1" if task == "classification" else "map50"
    summary = {
        "run": {"name": name, "method": method, "dataset": dataset, "model": "SSD300 x0.125", "seed": seed,
                "task": task, "epochs": 11},
        "dense": {"params": 1000, "macs": 4_000_000, "size_mb": 0.004, "latency_ms": 10.0},
        "final": {"params": params, "macs": macs, "size_mb": params * 4 / 1e6, "latency_ms": latency, metric: map50},
        "compression": {"params_x": round(1000 / params, 4), "size_x": round(1000 / params, 4),
                        "macs_x": round(4e6 / macs, 4), "speedup_x": round(10 / latency, 4)},
        "channels": channels, "dense_channels": LAYERS,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def _rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("run",) and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells
    return rows


def test_table_numbers_groups_and_pictures(tmp_path):
    half = {k: v // 2 for k, v in LAYERS.items()}
    _write_run(tmp_path / "r", "dense-s0", "dense", "facemask", 0, 0.40, 1000, 4_000_000, 10.0, LAYERS)
    _write_run(tmp_path / "r", "dense-s1", "dense", "facemask", 1, 0.50, 1000, 4_000_000, 10.0, LAYERS)
    _write_run(tmp_path / "r", "ours-s1", "ours", "facemask", 1, 0.47, 250, 1_000_000, 5.0, half)
    _write_run(tmp_path / "r", "tp-s1", "tp_global_magnitude", "facemask", 1, 0.45, 260, 800_000, 4.0, half)
    _write_run(tmp_path / "r", "cls-s0", "ours", "cifar10", 0, 0.91, 100, 50_000, 1.0, half, task="classification")
    (tmp_path / "r" / "not-a-run").mkdir()  # swept up by the glob, skipped
    res = compare([str(tmp_path / "r" / "*")], tmp_path / "out")
    md = res["table"].read_text()
    rows = _rows(md)
    assert set(rows) == {"dense-s0", "dense-s1", "ours-s1", "tp-s1", "cls-s0"}
    # ours-s1 is compared with the dense run of its own seed: 0.50 - 0.47 = 3 points, ratios against that run
    ours = rows["ours-s1"]
    assert ours[3] == "ours" and ours[5] == "0.4700" and ours[6] == "dense-s1" and ours[7] == "3.00"
    assert ours[8] == "250" and ours[9] == "4.00" and ours[10] == "1.0" and ours[11] == "4.00"
    assert ours[14] == "5.00" and ours[15] == "2.00"
    assert rows["tp-s1"][7] == "5.00" and rows["tp-s1"][11] == "5.00"
    # a different data set and task: its own section, no reference, ratios from its own summary (marked *)
    assert "## facemask (detection)" in md and "## cifar10 (classification)" in md
    assert rows["cls-s0"][6] == "-" and rows["cls-s0"][9] == "10.00*"
    assert md.index("cls-s0") > md.index("## cifar10")
    names = sorted(p.name for p in res["images"])
    assert names == ["pareto_cifar10_classification.png", "pareto_facemask_detection.png",
                     "widths_cifar10_classification.png", "widths_facemask_detection.png"]
    for p in res["images"]:
        with Image.open(p) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 800 and im.size[1] > 300


def test_pareto_front_and_bad_arguments(tmp_path):
    pts = [(1.0, 0.5), (2.0, 0.6), (2.0, 0.55), (3.0, 0.4), (0.5, 0.2)]
    assert pareto_front(pts) == [4, 0, 1]  # (2.0, 0.55) and (3.0, 0.4) are beaten
    with pytest.raises(CompareError, match="matches nothing"):
        compare([str(tmp_path / "nothing-*")], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompareError, match="not a run folder"):
        compare([str(tmp_path / "empty")], tmp_path / "out")


def test_run_meta_names_method_dataset_model_seed():
    cfg = yaml.safe_load(Path("experiments/demo.yaml").read_text())
    assert run_meta(cfg) == {"method": "ours", "dataset": "synthetic", "model": "SSD300 x0.125", "seed": 0,
                             "task": "detection", "epochs": 11}
    paper = yaml.safe_load(Path("experiments/demo_paper.yaml").read_text())
    assert run_meta(paper)["method"] == "paper"
    cfg["trainer"]["callbacks"] = [cb for cb in cfg["trainer"]["callbacks"] if "Sparsity" not in cb["class_path"]
                                   and "Filter" not in cb["class_path"] and "Surgery" not in cb["class_path"]]
    cfg["data"]["init_args"].update(synthetic=None, root="../shared/data/facemask/")
    assert run_meta(cfg)["method"] == "dense" and run_meta(cfg)["dataset"] == "facemask"


ALL_LAYERS = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2",
              "conv4_3", "conv5_1", "conv5_2", "conv5_3", "conv6", "conv7", "conv8_1", "conv8_2", "conv9_1", "conv9_2",
              "conv10_1", "conv10_2", "conv11_1", "conv11_2"]


def _variant(tmp_path: Path, name: str, *, pruning: bool = True, target_x: float | None = None, wandb: bool = False):
    """experiments/demo.yaml shrunk (4 epochs, its one budget phase at epochs 1-2), with another budget or none."""
    (tmp_path / name).mkdir()
    cfg_path = shrunken_demo(tmp_path / name, max_epochs=4, config="experiments/demo.yaml",
                             schedule=[{"layers": ALL_LAYERS, "l1_epochs": [1, 3]}])
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["data"]["init_args"]["root"] = str(tmp_path / "syn")  # one data set for all four runs
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "runs")
    cbs = cfg["trainer"]["callbacks"]
    if not pruning:
        cbs[:] = [cb for cb in cbs if not cb["class_path"].startswith("callbacks.")]
    for cb in cbs:
        if target_x is not None and cb["class_path"].endswith("SparsityInduction"):
            cb["init_args"]["target_params_x"] = target_x
    if wandb:
        cfg["trainer"]["logger"] = {"class_path": "pytorch_lightning.loggers.WandbLogger",
                                    "init_args": {"project": "ssd-pruning-test", "log_model": False}}
    cfg_path.write_text(yaml.safe_dump(cfg))
    return cfg_path


@pytest.mark.slow  # four trainings (~2.5 min)
def test_compare_demo_dense_and_two_targets_end_to_end_with_wandb_keys(tmp_path):
    """Four real (tiny) runs: the demo (logged to an offline W&B run), its dense reference and two other targets;
    --compare puts them side by side and logs the pictures to W&B; the W&B keys are read back from the run files."""
    procs = {}
    for name, kw in {"dense": dict(pruning=False), "demo": dict(wandb=True), "x3": dict(target_x=3.0),
                     "x6": dict(target_x=6.0)}.items():
        procs[name] = run_train(["--config", str(_variant(tmp_path, name, **kw)), "--run_name", name])
        assert procs[name].returncode == 0, procs[name].stderr[-3000:]
    summaries = {n: json.loads((tmp_path / "runs" / n / "summary.json").read_text()) for n in procs}
    # one console line per surgery, with the size against the dense model
    assert re.search(r"surgery 1/1 \(end of epoch 2\): params [\d,]+ \([\d.]+x smaller\), MACs",
                     procs["demo"].stdout + procs["demo"].stderr)
    assert summaries["dense"]["run"]["method"] == "dense" and summaries["x3"]["run"]["method"] == "ours"
    params = {n: summaries[n]["final"]["params"] for n in procs}
    assert params["x6"] < params["demo"] < params["x3"] < params["dense"]

    out = tmp_path / "cmp"
    proc = run_train(["--compare", str(tmp_path / "runs" / "*"), "--out", str(out), "--wandb_project", "cmp-test"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows((out / "compare.md").read_text())
    assert set(rows) == set(procs)
    dense = summaries["dense"]["final"]
    for name, s in summaries.items():
        r, f = rows[name], s["final"]
        assert r[5] == f"{f['map50']:.4f}" and r[8] == f"{f['params']:,}" and r[10] == f"{f['macs'] / 1e6:.1f}"
        if name != "dense":
            assert r[6] == "dense"
            assert r[7] == f"{round(100 * (dense['map50'] - f['map50']), 2):.2f}"
            assert r[9] == f"{round(dense['params'] / f['params'], 3):.2f}"
            assert r[11] == f"{round(dense['macs'] / f['macs'], 3):.2f}"
    for png in ("pareto_synthetic_detection.png", "widths_synthetic_detection.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG"
    cmp_run = next((out / "wandb").glob("offline-run-*"))
    assert len(list((cmp_run / "files" / "media" / "images").rglob("*.png"))) == 2

    # the demo's offline W&B run: grouping keys in its config, flat summary keys, the widths table, the curve
    s = summaries["demo"]
    wb = read_wandb_run(s["wandb_dir"])
    assert {"method": "ours", "dataset": "synthetic", "model": "SSD300 x0.125", "seed": 0}.items() <= wb["config"].items()
    expected = flat_summary(s)
    assert {"final/map50", "final/params", "dense/params", "dense/map50_before_pruning", "compression/params_x",
            "compression/macs_x", "budgets/params/spent", "budgets/macs/spent", "budgets/binding"} <= set(expected)
    for k, v in expected.items():
        assert wb["summary"][k] == pytest.approx(v) if isinstance(v, float) else wb["summary"][k] == v, k
    assert wb["summary"]["widths/_type"] == "table-file" and wb["summary"]["widths/nrows"] == len(s["dense_channels"])
    curve = [h for h in wb["history"] if "model/params" in h]
    assert len(curve) == 4 and curve[0]["model/params"] == s["dense"]["params"] > curve[-1]["model/params"]
    assert curve[-1]["model/params"] == s["final"]["params"]
    # Lightning logs a float32 scalar: MACs above 2**24 arrive rounded to float32 (a relative error under 6e-8)
    assert curve[-1]["model/macs"] == pytest.approx(s["final"]["macs"], rel=1e-7, abs=0)


def test_reference_is_a_dense_run_of_the_same_schedule_and_each_run_is_listed_once(tmp_path):
    """A dense run trained for other epochs is no equal-budget reference: the pruned run falls back on its own
    summary's ratios (marked *). A run named twice (a folder and its summary.json) is one row."""
    half = {k: v // 2 for k, v in LAYERS.items()}
    dense = _write_run(tmp_path / "r", "dense", "dense", "facemask", 0, 0.50, 1000, 4_000_000, 10.0, LAYERS)
    pruned = _write_run(tmp_path / "r", "ours", "ours", "facemask", 0, 0.45, 500, 2_000_000, 8.0, half)
    s = json.loads((dense / "summary.json").read_text())
    s["run"]["epochs"] = 22
    (dense / "summary.json").write_text(json.dumps(s))
    res = compare([str(dense), str(pruned), str(pruned / "summary.json")], tmp_path / "out")
    assert [r.name for r in res["runs"]] == ["dense", "ours"]
    ours = _rows(res["table"].read_text())["ours"]
    assert ours[6] == "-" and ours[7] == "-" and ours[9] == "2.00*" and ours[15] == "1.25*"


def test_wandb_summary_keys_and_width_rows():
    """What W&B dashboards get: flat ``section/key`` summary keys (a per-class dict one level deeper, lists joined)
    and one row per layer with its kept fraction."""
    from callbacks.compare import widths_rows

    summary = {"final": {"map50": 0.5, "ap50_per_class": {"cat": 0.4, "dog": 0.6}, "latency_ms": None},
               "dense": {"map50": 0.6}, "compression": {"params_x": 4.0}, "budgets": {"binding": ["params", "macs"]},
               "channels": {"conv1_1": 2, "conv7": 96}, "dense_channels": {"conv1_1": 8, "conv7": 128}}
    assert flat_summary(summary) == {"final/map50": 0.5, "final/ap50_per_class/cat": 0.4,
                                     "final/ap50_per_class/dog": 0.6, "dense/map50": 0.6,
                                     "compression/params_x": 4.0, "budgets/binding": "params; macs"}
    assert widths_rows(summary) == [["conv1_1", 8, 2, 0.25], ["conv7", 128, 96, 0.75]]


def test_reference_drop_is_reference_minus_final_and_names_budget_differences(tmp_path):
    """``--reference``: the quality drop (positive = the pruned model is worse), the ratios reference / final, and
    the settings in which the two runs differ outside the pruning callbacks and the logger."""
    from callbacks.report import reference_drop

    ref = tmp_path / "dense"
    ref.mkdir()
    (ref / "summary.json").write_text(json.dumps({"final": {"map50": 0.6, "params": 4000, "macs": 9000,
                                                            "size_mb": 16.0, "latency_ms": 10.0}}))
    cfg = {"seed_everything": 0, "trainer": {"max_epochs": 11, "callbacks": [{"class_path": "a.Dense"}],
                                             "logger": False}, "model": {"init_args": {"lr": 0.01}}}
    (ref / "config.yaml").write_text(yaml.safe_dump(cfg))
    final = {"map50": 0.5, "params": 1000, "macs": 3000, "size_mb": 4.0, "latency_ms": 4.0}
    mine = {**cfg, "trainer": {"max_epochs": 12, "callbacks": [{"class_path": "callbacks.SparsityInduction"}],
                               "logger": True}}
    reference, drop, differences = reference_drop(ref, final, mine)
    assert reference == {"run": str(ref), "map50": 0.6, "params": 4000, "macs": 9000, "size_mb": 16.0,
                         "latency_ms": 10.0}
    assert drop == {"map50": pytest.approx(0.1), "params_x": 4.0, "macs_x": 3.0, "size_mb_x": 4.0,
                    "latency_ms_x": 2.5}
    assert differences == ["trainer.max_epochs: 11 vs 12"]  # callbacks and logger differ too: not budget

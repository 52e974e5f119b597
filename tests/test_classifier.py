"""The VGG16 classifier on the pruning contract, CIFAR-10 / GTSRB in torchvision's on-disk layouts, and a CPU run
that ends compressed."""

import csv
import json
import pickle
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from callbacks.surgery import prune_filters
from datamodules.classification import CIFAR10DataModule, GTSRBDataModule, ImageArrayDataset
from datamodules.voc import DataError
from lightning_modules.classifier import build_vgg16
from lightning_modules.contract import PrunableNet
from tests.conftest import run_train


def test_vgg16_size_and_contract():
    import torch_pruning as tp

    m = build_vgg16(10).eval()
    macs, params = tp.utils.count_ops_and_params(m, torch.zeros(1, 3, 32, 32))
    assert params == 14_991_946 and round(macs / 1e6, 1) == 314.3  # as the module docstring states
    assert isinstance(m, PrunableNet) and m.layer_names()[0] == "conv1_1" and len(m.layer_names()) == 13
    assert m.consumers("conv5_3") == [m.classifier[0]] and m.consumers("conv1_1") == [m.layers["conv1_2"]]


@pytest.mark.parametrize("size", [32, 64])
def test_surgery_through_the_flatten_is_exact(size):
    """Removing zeroed filters (conv5_3 included: its columns in the first linear layer go, s*s per channel)
    leaves the logits unchanged; the optimiser state follows."""
    torch.manual_seed(0)
    m = build_vgg16(5, width_mult=0.25, size=size).double().eval()
    sel = {"conv1_1": [0, 3], "conv3_2": [5], "conv5_3": [1, 2, 7]}
    with torch.no_grad():
        for name, idx in sel.items():
            m.layers[name].weight[idx] = 0
            m.layers[name].bias[idx] = 0
            m.norms[name].weight[idx] = 0
            m.norms[name].bias[idx] = 0
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    for p in m.parameters():
        opt.state[p]["momentum_buffer"] = torch.arange(p.numel(), dtype=p.dtype).view_as(p)
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        before = m(x)
    old_w = m.classifier[0].weight.detach().clone()
    prune_filters(m, sel, opt)
    with torch.no_grad():
        after = m(x)
    assert (before - after).abs().max() < 1e-8
    span = (size // 32) ** 2
    assert m.classifier[0].in_features == (128 - 3) * span
    keep = [i for i in range(128) if i not in sel["conv5_3"]]
    cols = torch.tensor([c * span + j for c in keep for j in range(span)])
    assert torch.equal(m.classifier[0].weight, old_w[:, cols])
    buf = opt.state[m.classifier[0].weight]["momentum_buffer"]
    full = torch.arange(old_w.numel(), dtype=torch.float64).view_as(old_w)
    assert torch.equal(buf, full[:, cols])


def cifar_fixture(root: Path, per_batch: int = 24, test: int = 40) -> Path:
    """cifar-10-batches-py with the real pickle format (small batches)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n, label):
        labels = rng.integers(0, 10, n).tolist()
        data = np.zeros((n, 3, 32, 32), np.uint8)
        for i, lab in enumerate(labels):  # a learnable pattern: the class sets the colour of a square
            data[i, lab % 3, 4 + lab:20 + lab, 4:20] = 200 + lab * 5
        data += rng.integers(0, 30, data.shape, dtype=np.uint8)
        return {"batch_label": label, "labels": labels, "data": data.reshape(n, -1), "filenames": [f"{i}.png" for i in range(n)]}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_batch, f"training batch {i} of 5")))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(test, "testing batch 1 of 1")))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_cases_per_batch": per_batch}))
    return root


def test_cifar10_reads_the_pickles_splits_and_limits(tmp_path):
    root = cifar_fixture(tmp_path / "c")
    dm = CIFAR10DataModule(str(root), val_fraction=0.2, train_limit=50, batch_size=8, num_workers=0)
    assert dm.classes[:2] == ("airplane", "automobile") and len(dm.classes) == 10
    dm.setup("fit")
    assert len(dm.val_ds) == 24 and len(dm.train_ds) == 50 and len(dm.test_ds) == 40
    img, label = dm.train_ds[(0, 123)]  # (index, seed): augmented
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and 0 <= label < 10
    assert torch.equal(dm.train_ds[(0, 123)][0], img)  # the same seed, the same augmentation
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.long
    again = CIFAR10DataModule(str(root), val_fraction=0.2, train_limit=50, batch_size=8, num_workers=0)
    again.setup("fit")
    assert np.array_equal(again.train_ds.labels, dm.train_ds.labels)  # a fixed seeded order
    with pytest.raises(DataError, match="cifar-10-batches-py not found"):  # when built, before a run starts
        CIFAR10DataModule(str(tmp_path / "none"), batch_size=8)
    (root / "cifar-10-batches-py" / "data_batch_4").rename(root / "aside")
    with pytest.raises(DataError, match="cifar-10-batches-py/data_batch_4 not found"):
        CIFAR10DataModule(str(root), batch_size=8)
    (root / "aside").rename(root / "cifar-10-batches-py" / "data_batch_4")
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR batch file"):
        CIFAR10DataModule(str(root), batch_size=8).setup("fit")


def test_cifar10_pixels_splits_and_augmentation_are_as_the_format_and_the_recipe_say(tmp_path):
    """CIFAR-10's row layout: 1,024 red bytes, then green, then blue, each row by row; the validation images are
    carved out of training (none in both, none lost); the augmentation is "pad 4, random 32x32 crop, horizontal
    flip": all 9 x 9 offsets and both flip states occur, never a vertical flip; the module normalises with CIFAR's
    mean and std."""
    from lightning_modules.classifier import CIFAR_MEAN, CIFAR_STD, VGGClassifier

    root = cifar_fixture(tmp_path / "c")
    raw = pickle.loads((root / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    dm = CIFAR10DataModule(str(root), val_fraction=0.25, batch_size=8, num_workers=0)
    images, labels = dm.read_split(train=True)
    row = np.asarray(raw["data"][0], np.uint8)
    for y, x, c in ((0, 0, 0), (5, 9, 1), (31, 2, 2), (17, 30, 0)):
        assert images[0][y, x, c] == row[c * 1024 + y * 32 + x]
    assert labels[:24].tolist() == raw["labels"]
    dm.setup("fit")
    train, val = ({im.tobytes() for im in ds.images} for ds in (dm.train_ds, dm.val_ds))  # all unique (noise)
    assert len(train) == 90 and len(val) == 30 and not train & val and train | val == {im.tobytes() for im in images}

    img = np.arange(32 * 32 * 3, dtype=np.int64).reshape(32, 32, 3)  # every pixel unique
    ds = ImageArrayDataset([img], np.zeros(1), 32, "crop_flip")
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
    crops = {(dy, dx): padded[dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)}
    found = set()
    for seed in range(200):
        got = ds[(0, seed)][0].permute(1, 2, 0).numpy()
        hits = [(dy, dx, flip) for (dy, dx), crop in crops.items() for flip in (False, True)
                if np.array_equal(got, crop[:, ::-1] if flip else crop)]
        assert len(hits) == 1, seed  # a shifted crop, flipped left-right or not: nothing else
        found.add(hits[0])
    assert {h[0] for h in found} == {h[1] for h in found} == set(range(9)) and {h[2] for h in found} == {False, True}

    module = VGGClassifier(list(dm.classes), width_mult=0.0625)
    x = torch.tensor([[[[0]], [[128]], [[255]]]], dtype=torch.uint8)
    want = [(v / 255 - m) / s for v, m, s in zip((0, 128, 255), CIFAR_MEAN, CIFAR_STD)]
    torch.testing.assert_close(module.preprocess(x).flatten(), torch.tensor(want))


def gtsrb_fixture(root: Path) -> Path:
    """torchvision's GTSRB layout: Training/<class>/*.ppm (+ GT csv) and Final_Test/Images + GT-final_test.csv."""
    base = root / "gtsrb"
    rng = np.random.default_rng(0)
    for cls in (0, 14, 42):
        d = base / "GTSRB" / "Training" / f"{cls:05d}"
        d.mkdir(parents=True)
        for i in range(4):
            cv2.imwrite(str(d / f"00000_{i:05d}.ppm"), rng.integers(0, 255, (30 + i, 28, 3), dtype=np.uint8))
    test = base / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    rows = []
    for i, cls in enumerate((0, 14, 42, 14)):
        name = f"{i:05d}.ppm"
        cv2.imwrite(str(test / name), rng.integers(0, 255, (40, 44, 3), dtype=np.uint8))
        rows.append([name, 44, 40, 1, 1, 40, 36, cls])
    with open(base / "GT-final_test.csv", "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        w.writerows(rows)
    return root


def test_gtsrb_reads_torchvision_layout_and_resizes(tmp_path):
    root = gtsrb_fixture(tmp_path / "g")
    dm = GTSRBDataModule(str(root), image_size=32, val_fraction=0.25, batch_size=4, num_workers=0)
    assert len(dm.classes) == 43 and dm.classes[14] == "stop"
    dm.setup("fit")
    # validation holds out whole tracks: here every class folder is one track of 4 frames (00000_0000i.ppm)
    assert len(dm.train_ds) == 8 and len(dm.val_ds) == 4 and sorted(dm.test_ds.labels.tolist()) == [0, 14, 14, 42]
    # the class id is the folder's name (torchvision numbers the folders it finds: 0, 1, 2 here)
    assert sorted({*dm.train_ds.labels.tolist(), *dm.val_ds.labels.tolist()}) == [0, 14, 42]
    img, label = dm.train_ds[(0, 7)]
    assert img.shape == (3, 32, 32) and label in (0, 14, 42)
    plain = dm.train_ds[0][0]
    assert torch.equal(img, plain)  # no flip, no crop: resize only
    with pytest.raises(DataError, match="none/gtsrb not found"):  # when built, before a run starts
        GTSRBDataModule(str(tmp_path / "none"), batch_size=4)
    (root / "gtsrb" / "GT-final_test.csv").rename(root / "aside.csv")
    with pytest.raises(DataError, match="gtsrb/GT-final_test.csv not found"):
        GTSRBDataModule(str(root), batch_size=4)
    with pytest.raises(DataError, match="GTSRB test split not readable"):  # download: prepare_data fetches, no check
        GTSRBDataModule(str(root), download=True, batch_size=4).read_split(train=False)


def test_gtsrb_validation_holds_out_whole_tracks_and_cifar_single_images(tmp_path):
    """GTSRB's training images are tracks (``<track>_<frame>.ppm``, 30 frames of one sign): no track may lie on both
    sides of the validation split, which takes whole tracks in a seeded order until it holds at least the asked
    fraction; CIFAR-10's split stays a plain seeded permutation of single images."""
    base = tmp_path / "g" / "gtsrb" / "GTSRB"
    rng = np.random.default_rng(0)
    for cls, tracks in ((0, 3), (14, 5), (42, 2)):
        for t in range(tracks):
            for f in range(3 + t % 2):  # tracks of 3 or 4 frames
                d = base / "Training" / f"{cls:05d}"
                d.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(d / f"{t:05d}_{f:05d}.ppm"), rng.integers(0, 255, (30, 28, 3), dtype=np.uint8))
    gtsrb_fixture(tmp_path / "t")  # its test split
    (base / "Final_Test").symlink_to(tmp_path / "t" / "gtsrb" / "GTSRB" / "Final_Test")
    (base.parent / "GT-final_test.csv").symlink_to(tmp_path / "t" / "gtsrb" / "GT-final_test.csv")
    n = sum(3 + t % 2 for tracks in (3, 5, 2) for t in range(tracks))
    for seed in range(4):
        dm = GTSRBDataModule(str(tmp_path / "g"), val_fraction=0.3, val_seed=seed, batch_size=4, num_workers=0)
        dm.setup("fit")
        track = lambda p: (Path(p).parent.name, Path(p).name.split("_")[0])  # noqa: E731
        val, train = {track(p) for p in dm.val_ds.images}, {track(p) for p in dm.train_ds.images}
        assert not val & train and len(val | train) == 10
        assert len(dm.val_ds) + len(dm.train_ds) == n
        assert round(0.3 * n) <= len(dm.val_ds) < round(0.3 * n) + 4  # at most one track over the fraction
    root = cifar_fixture(tmp_path / "c")
    dm = CIFAR10DataModule(str(root), val_fraction=0.2, val_seed=3, batch_size=4, num_workers=0)
    dm.setup("fit")
    images, _ = dm.read_split(train=True)
    order = np.random.default_rng(3).permutation(len(images))
    k = round(0.2 * len(images))
    assert [a.tobytes() for a in dm.val_ds.images] == [images[i].tobytes() for i in order[:k]]
    assert [a.tobytes() for a in dm.train_ds.images] == [images[i].tobytes() for i in order[k:]]


def paper_config_in_three_short_phases(first_epoch: int) -> dict:
    """experiments/cifar10_vgg16_paper.yaml with its 3 phases one epoch each from ``first_epoch`` on, 80 % sparsity."""
    cfg = yaml.safe_load(Path("experiments/cifar10_vgg16_paper.yaml").read_text())
    blocks = [["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3"],
              ["conv3_3", "conv4_1", "conv4_2", "conv4_3"], ["conv4_3", "conv5_1", "conv5_2", "conv5_3"]]
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("SparsityInduction"):
            cb["init_args"].update(threshold_mode="target_sparsity", target_sparsity=0.8, l1_lambda=1e-3, schedule=[
                {"layers": layers, "l1_epochs": [first_epoch + i, first_epoch + i + 1]} for i, layers in enumerate(blocks)])
    return cfg


def test_cifar10_config_runs_on_cpu_and_ends_compressed(tmp_path):
    """experiments/cifar10_vgg16_paper.yaml shrunk to a CPU run: the three pruning callbacks on the classifier, top-1
    in summary.json, the same summary shape as the detector's, an ONNX export."""
    root = cifar_fixture(tmp_path / "c")
    cfg = paper_config_in_three_short_phases(first_epoch=1)
    path = tmp_path / "cifar_small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = ["--config", str(path), "--trainer.max_epochs", "5", "--trainer.precision", "32", "--trainer.accelerator",
            "cpu", "--trainer.logger", "false", "--trainer.check_val_every_n_epoch", "1", "--model.width_mult", "0.125",
            "--model.lr", "0.05", "--data.root", str(root), "--data.batch_size", "16", "--data.num_workers", "0",
            "--data.val_fraction", "0.2", "--trainer.default_root_dir", str(tmp_path / "runs"), "--run_name", "c"]
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "runs" / "c" / "summary.json").read_text())
    assert {"dense", "final", "compression", "channels", "export"} <= set(s)
    assert 0.0 <= s["final"]["top1"] <= 1.0 and "top5" in s["final"] and "map50" not in s["final"]
    assert s["final"]["params"] < s["dense"]["params"] and s["compression"]["params_x"] > 1.5
    assert "top1_before_pruning" in s["dense"] and s["run"]["task"] == "classification"
    assert Path(s["export"]["onnx"]).is_file()
    import onnxruntime as ort

    sess = ort.InferenceSession(s["export"]["onnx"])
    out = sess.run(None, {"images": np.zeros((2, 3, 32, 32), np.float32)})[0]
    assert out.shape == (2, 10)


def test_default_classifier_config_meets_its_parameter_budget(tmp_path):
    """experiments/cifar10_vgg16.yaml (the default method: the targeted fade to an absolute parameter budget) shrunk
    to a CPU run: the final model has at most target_params parameters."""
    root = cifar_fixture(tmp_path / "c")
    cfg = yaml.safe_load(Path("experiments/cifar10_vgg16.yaml").read_text())
    sp = next(cb for cb in cfg["trainer"]["callbacks"] if cb["class_path"].endswith("SparsityInduction"))["init_args"]
    assert sp["l1_target"] == "below_budget" and sp["target_params"] == 120000
    sp["target_params"] = 60000
    sp["schedule"][0]["l1_epochs"] = [1, 3]
    path = tmp_path / "cifar_default.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = ["--config", str(path), "--trainer.max_epochs", "4", "--trainer.precision", "32", "--trainer.accelerator",
            "cpu", "--trainer.logger", "false", "--model.width_mult", "0.125", "--model.lr", "0.05", "--data.root",
            str(root), "--data.batch_size", "16", "--data.num_workers", "0", "--data.val_fraction", "0.2",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--run_name", "d"]
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "runs" / "d" / "summary.json").read_text())
    assert 0.85 * 60000 <= s["final"]["params"] <= 60000 < s["dense"]["params"]


@pytest.mark.slow  # a training and four tool runs (~1 min)
def test_classifier_evaluate_export_and_predict_from_the_run(tmp_path):
    """--evaluate from the export and from the checkpoint, --export of a checkpoint, --predict: class + score."""
    root = cifar_fixture(tmp_path / "c")
    cfg = yaml.safe_load(Path("experiments/cifar10_vgg16.yaml").read_text())
    cfg["trainer"]["callbacks"] = [cb for cb in cfg["trainer"]["callbacks"] if not cb["class_path"].startswith("callbacks.")]
    (tmp_path / "dense.yaml").write_text(yaml.safe_dump(cfg))
    base = ["--config", str(tmp_path / "dense.yaml"), "--trainer.precision", "32", "--trainer.accelerator", "cpu",
            "--trainer.logger", "false", "--model.width_mult", "0.125", "--data.root", str(root), "--data.batch_size",
            "16", "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path / "runs")]
    proc = run_train(base + ["--trainer.max_epochs", "1", "--run_name", "t"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    for src in (str(tmp_path / "runs" / "t" / "export"), str(tmp_path / "runs" / "t" / "checkpoints" / "last.ckpt")):
        ev = run_train(base + ["--evaluate", src, "--run_name", "ev"])
        assert ev.returncode == 0, ev.stderr[-3000:]
        e = json.loads((tmp_path / "runs" / "ev" / "summary.json").read_text())
        assert e["final"]["top1"] == pytest.approx(s["final"]["top1"], abs=1e-6)
    ex = run_train(["--export", str(tmp_path / "runs" / "t" / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "ex")])
    assert ex.returncode == 0, ex.stderr[-3000:]
    assert (tmp_path / "ex" / "model.onnx").is_file()
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        cv2.imwrite(str(imgs / f"{i}.png"), np.full((40, 50, 3), 60 * i, np.uint8))
    (imgs / "broken.jpg").write_bytes(b"not an image")  # skipped, listed, and the rest predicted
    pr = run_train(["--predict", str(tmp_path / "ex"), "--images", str(imgs), "--out", str(tmp_path / "pred")])
    assert pr.returncode == 0, pr.stderr[-3000:]
    assert "1 of 4 images" in pr.stderr and "broken.jpg" in pr.stderr
    preds = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert sorted(preds["images"]) == ["0.png", "1.png", "2.png"]
    assert preds["skipped"] == {"broken.jpg": "unreadable or corrupt image"}
    assert all(p["class"] in preds["classes"] and 0 <= p["score"] <= 1 for p in preds["images"].values())


def test_facemask_crops_are_a_gtsrb_layout_the_datamodule_reads(tmp_path):
    """benchmarks/facemask_crops.py (the classification stand-in measured in benchmarks/README.md): every box of a
    VOC-format set becomes a crop in torchvision's GTSRB layout, training crops from trainval, test crops from test."""
    from benchmarks.facemask_crops import FACEMASK_CLASSES, crop_box, write_crops
    from tests.voc_fixture import tiny_voc

    voc = tiny_voc(tmp_path / "voc", classes=FACEMASK_CLASSES, n=8)
    counts = write_crops(voc, tmp_path / "crops", min_side=1)
    anns = {which: [ET.parse(p) for p in sorted((voc / "VOCdevkit" / "VOC2007" / "Annotations").glob("*.xml"))
                    if (p.stem in (voc / "VOCdevkit/VOC2007/ImageSets/Main" / f"{which}.txt").read_text().split())]
            for which in ("trainval", "test")}
    for which, split in (("train", "trainval"), ("test", "test")):
        names = [o.findtext("name") for t in anns[split] for o in t.iter("object")]
        assert sum(counts[which].values()) == len(names) and counts[which] == Counter(names)
    dm = GTSRBDataModule(str(tmp_path / "crops"), batch_size=4, val_fraction=0.0, num_workers=0)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_ds) == sum(counts["train"].values()) and len(dm.test_ds) == sum(counts["test"].values())
    labels = {int(dm.test_ds[i][1]) for i in range(len(dm.test_ds))}
    assert labels <= {0, 1, 2}
    img = np.arange(100 * 80 * 3, dtype=np.uint8).reshape(100, 80, 3)
    crop = crop_box(img, np.array([11, 21, 30, 60], np.float32), margin=0.1)  # 20 x 40 box, 2 / 4 px margins
    assert crop.shape[:2] == (48, 24)
    assert crop_box(img, np.array([1, 1, 80, 100], np.float32), margin=0.5).shape[:2] == (100, 80)  # clipped


def _pruned_classifier_config(tmp_path: Path) -> Path:
    """experiments/cifar10_vgg16_paper.yaml with three short phases (surgeries at the ends of epochs 0, 1 and 2)."""
    cfg = paper_config_in_three_short_phases(first_epoch=0)
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["save_top_k"] = -1  # every epoch's checkpoint
    cfg["trainer"].update(max_epochs=4, precision="32", accelerator="cpu", logger=False, check_val_every_n_epoch=1,
                          default_root_dir=str(tmp_path / "runs"))
    cfg["model"]["init_args"].update(width_mult=0.125, lr=0.05)
    cfg["data"]["init_args"].update(root=str(cifar_fixture(tmp_path / "c")), batch_size=16, num_workers=0,
                                    val_fraction=0.2)
    path = tmp_path / "cifar_pruned.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow  # three short classifier fits (~1 min)
def test_classifier_resume_after_a_surgery_matches_uninterrupted(tmp_path):
    """Resume of a pruned classifier from the checkpoint after its first surgery: same widths, bit-identical weights
    and optimiser state at the end (the pruning state, the data order and the augmentation travel with it)."""
    cfg = _pruned_classifier_config(tmp_path)
    full = run_train(["--config", str(cfg), "--run_name", "full"])
    assert full.returncode == 0, full.stderr[-3000:]
    ckpt = next((tmp_path / "runs/full/checkpoints").glob("epoch=1-*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert len(next(v for k, v in state["callbacks"].items() if "SparsityInduction" in k)["surgeries"]) == 2
    res = run_train(["--config", str(cfg), "--run_name", "resumed", "--ckpt_path", str(ckpt)])
    assert res.returncode == 0, res.stderr[-3000:]
    s1, s2 = (json.loads((tmp_path / f"runs/{r}/summary.json").read_text()) for r in ("full", "resumed"))
    assert s2["channels"] == s1["channels"] and s2["final"]["top1"] == s1["final"]["top1"]
    assert s1["final"]["params"] < s1["dense"]["params"]  # the surgeries did cut
    a, b = (torch.load(tmp_path / f"runs/{r}/checkpoints/last.ckpt", weights_only=True) for r in ("full", "resumed"))
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


@pytest.mark.slow  # a 1-process and a 2-process fit (~1 min)
def test_classifier_ddp_prunes_alike_on_every_rank(tmp_path):
    """DDP on CPU (2 processes): the three surgeries happen on both ranks with the same widths, and the test top-1
    counts every test image once (it equals a 1-process evaluation of the final weights)."""
    cfg = _pruned_classifier_config(tmp_path)
    two = run_train(["--config", str(cfg), "--run_name", "two", "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                    env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    s2 = json.loads((tmp_path / "runs/two/summary.json").read_text())
    assert s2["world_size"] == 2 and s2["ranks_consistent"] is True
    st = next(v for k, v in torch.load(tmp_path / "runs/two/checkpoints/last.ckpt", weights_only=True)["callbacks"].items()
              if "SparsityInduction" in k)
    assert len(st["surgeries"]) == 3 and all(r["world_size"] == 2 and r["ranks_consistent"] for r in st["surgeries"])
    assert s2["final"]["params"] < s2["dense"]["params"]
    ev = run_train(["--config", str(cfg), "--run_name", "eval", "--evaluate", str(tmp_path / "runs/two/checkpoints/last.ckpt")])
    assert ev.returncode == 0, ev.stderr[-3000:]
    s_ev = json.loads((tmp_path / "runs/eval/summary.json").read_text())
    assert s_ev["world_size"] == 1 and s_ev["final"]["top1"] == s2["final"]["top1"]


def test_top1_is_the_fraction_of_images_right_on_an_imbalanced_set():
    """top-1 counts images (micro average), not the mean per-class recall (torchmetrics' default "macro")."""
    from lightning_modules.classifier import VGGClassifier

    m = VGGClassifier(["a", "b", "c"], width_mult=0.125)
    m.forward = lambda images: torch.tensor([[5.0, 0.0, 0.0]]).expand(images.shape[0], 3)  # always "a"
    images, labels = torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.tensor([0] * 8 + [1] * 2)
    assert m.evaluate([(images[:6], labels[:6]), (images[6:], labels[6:])]) == pytest.approx(0.8)  # macro: 0.5
    m._eval_step((images, labels), "test")
    assert float(m.metrics["test_top1"].compute()) == pytest.approx(0.8)


def test_classifier_class_balanced_loss_weighs_each_class_by_its_inverse_frequency():
    """The classifier's class_balanced_loss (for SparsityInduction(taylor_loss: class_balanced)): the last training
    step's cross-entropy weighted n / (K n_c) by the running label counts, which a checkpoint carries."""
    import torch.nn.functional as F

    from lightning_modules.classifier import VGGClassifier

    torch.manual_seed(0)
    m = VGGClassifier(["a", "b", "c"], width_mult=0.125)
    m.log = lambda *a, **k: None
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 0, 0, 1])
    loss = m.training_step((images, labels), 0)
    assert torch.allclose(m.class_weights(), torch.tensor([4 / 6, 2.0, 1.0]))  # class c unseen: weight 1
    logits = m._last_step[0]
    assert torch.allclose(m.class_balanced_loss(), F.cross_entropy(logits, labels, weight=m.class_weights()))
    assert not torch.allclose(m.class_balanced_loss(), loss)
    ckpt = {}
    m.on_save_checkpoint(ckpt)
    fresh = VGGClassifier(["a", "b", "c"], width_mult=0.125)
    fresh.on_load_checkpoint(ckpt)
    assert torch.allclose(fresh.class_weights(), m.class_weights())
    m.on_train_batch_end(None, None, 0)
    with pytest.raises(RuntimeError, match="no training step"):
        m.class_balanced_loss()


def test_classifier_stops_on_a_non_finite_loss_with_the_advice():
    from lightning_modules.classifier import VGGClassifier
    from lightning_modules.common import NonFiniteLossError

    m = VGGClassifier(["a", "b", "c"], width_mult=0.125)
    m.log = lambda *a, **k: None
    images, labels = torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1])
    m.training_step((images, labels), 0)  # finite: no error
    m.forward = lambda images: torch.full((images.shape[0], 3), float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"training loss became nan at global step 0\. .*--model\.warmup_epochs"):
        m.training_step((images, labels), 1)

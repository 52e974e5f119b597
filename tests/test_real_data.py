"""Real-world VOC-format data as users bring it: odd images, odd boxes, odd class names, missing files, one or many
classes, classes missing from the test split, `--data.classes auto` and a validation split carved from training."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from PIL import Image

from datamodules.transforms import ssd_eval_transform, ssd_train_transform
from datamodules.voc import (DataError, VOCDataModule, VOCDataset, apply_orientation, collate, count_class_names,
                             resolve_classes)
from lightning_modules.box_ops import MultiBoxLoss
from lightning_modules.ssd import build_ssd
from tests.conftest import run_train
from tests.voc_fixture import write_voc, xml_text

ODD_NAMES = ["green vegetable", "Carr's Ginger Lemon Cremes", "Star Tidbits 'O' Ring", "v1.2 part", "Äpfel-Größe"]


def _layout(root: Path) -> Path:
    base = root / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    return base


def _split(base: Path, name: str, ids: list[str]) -> None:
    (base / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(ids) + "\n")


def _marker_image(w: int, h: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """RGB image, dark everywhere but a pure red box (x1, y1, x2, y2 continuous pixels)."""
    img = np.full((h, w, 3), 20, np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = (255, 0, 0)
    return img


# ---------------------------------------------------------------------------------------------- images as they come
@pytest.mark.parametrize("ext,mode", [(".jpg", "RGB"), (".jpeg", "L"), (".JPG", "CMYK"), (".png", "RGBA"),
                                      (".png", "I;16"), (".bmp", "RGB"), (".Jpeg", "RGB"), (".TIF", "RGB"),
                                      (".webp", "RGB")])
def test_image_formats_become_8bit_rgb_with_boxes_on_the_object(tmp_path, ext, mode):
    base = _layout(tmp_path)
    w, h, box = 96, 64, (30, 10, 70, 50)
    rgb = _marker_image(w, h, box)
    path = base / "JPEGImages" / f"img{ext}"
    if mode == "I;16":  # 16-bit: cv2 writes 16-bit PNGs (BGR order); the red box at full 16-bit scale
        cv2.imwrite(str(path), (rgb[..., ::-1].astype(np.uint16) * 257))
    else:
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".webp": "WEBP"}
        Image.fromarray(rgb).convert(mode).save(path, format=fmt[ext.lower()], **({"lossless": True} if
                                                                                  ext == ".webp" else {}))
    (base / "Annotations" / "img.xml").write_text(xml_text("img", w, h, [("cat", (31, 11, 70, 50), False)]))
    _split(base, "trainval", ["img"])
    ds = VOCDataset(tmp_path, [(2007, "trainval")], ("cat",), ssd_eval_transform(300))
    assert ds.items[0].image_path.name == f"img{ext}"
    img = ds.load_image(ds.items[0])
    assert img.dtype == np.uint8 and img.shape == (h, w, 3)
    inside, outside = img[15:45, 35:65].reshape(-1, 3).mean(0), img[:8, :20].reshape(-1, 3).mean(0)
    if mode == "L":  # gray: the box is brighter than the background in every channel
        assert (inside > outside + 30).all()
    else:  # the red box is red (R high, G and B low), the background is dark
        assert inside[0] > 200 and inside[1] < 60 and inside[2] < 60, inside
        assert outside.max() < 60, outside


def test_image_extension_preference_and_xml_filename_ignored(tmp_path):
    base = _layout(tmp_path)
    Image.fromarray(_marker_image(40, 30, (0, 0, 5, 5))).save(base / "JPEGImages" / "a.png")
    Image.fromarray(_marker_image(40, 30, (0, 0, 5, 5))).save(base / "JPEGImages" / "a.jpg")
    (base / "Annotations" / "a.xml").write_text(xml_text("a", 40, 30, [("cat", (2, 2, 20, 20), False)], filename="x.png"))
    _split(base, "trainval", ["a"])
    ds = VOCDataset(tmp_path, [(2007, "trainval")], ("cat",), ssd_eval_transform(300))
    assert ds.items[0].image_path.name == "a.jpg"
    # the preference holds in any case, and of names differing only in case the first in sorted order is taken
    (base / "JPEGImages" / "a.jpg").rename(base / "JPEGImages" / "a.JPG")
    Image.fromarray(_marker_image(40, 30, (0, 0, 5, 5))).save(base / "JPEGImages" / "a.Jpg", format="JPEG")
    Image.fromarray(_marker_image(40, 30, (0, 0, 5, 5))).save(base / "JPEGImages" / "a.TIFF", format="TIFF")
    ds = VOCDataset(tmp_path, [(2007, "trainval")], ("cat",), ssd_eval_transform(300))
    assert ds.items[0].image_path.name == "a.JPG"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(orientation):
    img = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    pil = Image.fromarray(img)
    exif = pil.getexif()
    exif[0x0112] = orientation
    pil.info["exif"] = exif.tobytes()
    from PIL import ImageOps

    ref = np.asarray(ImageOps.exif_transpose(Image.fromarray(img), in_place=False) if orientation == 1 else
                     Image.fromarray(img).transpose({2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                                                     4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                                                     6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                                                     8: Image.Transpose.ROTATE_90}[orientation]))
    np.testing.assert_array_equal(apply_orientation(img, orientation), ref)


def test_exif_rotated_jpeg_boxes_follow_the_displayed_image(tmp_path):
    """A phone photo: pixels stored landscape with EXIF orientation 6 (display rotated 90 deg clockwise); the
    annotation tool drew the box on the displayed (portrait) image."""
    base = _layout(tmp_path)
    shown = _marker_image(60, 100, (10, 50, 40, 90))  # displayed: 60 wide, 100 high
    stored = np.rot90(shown, k=1)  # what the camera wrote (orientation 6 turns it back clockwise)
    pil = Image.fromarray(np.ascontiguousarray(stored))
    exif = pil.getexif()
    exif[0x0112] = 6
    pil.save(base / "JPEGImages" / "p.jpg", exif=exif.tobytes(), quality=95)
    (base / "Annotations" / "p.xml").write_text(xml_text("p", 60, 100, [("cat", (11, 51, 40, 90), False)]))
    _split(base, "trainval", ["p"])
    ds = VOCDataset(tmp_path, [(2007, "trainval")], ("cat",), ssd_eval_transform(300))
    ann = ds.items[0]
    assert (ann.width, ann.height, ann.orientation) == (60, 100, 6)
    img = ds.load_image(ann)
    assert img.shape == (100, 60, 3)
    assert img[55:85, 15:35, 0].mean() > 200 and img[5:40, :, 0].mean() < 60


# ---------------------------------------------------------------------------------------------- boxes as tools write them
def test_odd_boxes_and_sizes_repaired_with_one_summary_warning(tmp_path):
    base = _layout(tmp_path)
    for i in range(3):
        Image.fromarray(_marker_image(100, 80, (10, 10, 30, 30))).save(base / "JPEGImages" / f"i{i}.jpg")
    (base / "Annotations" / "i0.xml").write_text(xml_text("i0", 100, 80, [
        ("cat", (42.857142857142854, 10.5, 60.25, 70.75), False),  # floats: kept as they are
        ("cat", (0, 0, 30, 30), False),                           # 0-based: clipped to 1
        ("cat", (50, 10, 101, 81), False),                        # 1 px past the border: clipped
        ("cat", (20, 20, 20, 40), False),                         # one pixel wide (x1 == x2, inclusive): kept
        ("cat", (20, 20, 19, 40), False),                         # zero area (x2 - x1 + 1 == 0): dropped
        ("cat", (40, 30, 20, 50), False),                         # inverted: dropped
        ("cat", (150, 90, 170, 99), False),                       # outside the image: dropped
        ("cat", ("nan", 1, 20, 20), False),                       # not a number: dropped
    ]))
    # <size> missing, and <size> disagreeing with the image (the image's own size wins)
    (base / "Annotations" / "i1.xml").write_text(
        "<annotation><object><name>cat</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>99</xmax><ymax>70</ymax>"
        "</bndbox></object></annotation>")
    (base / "Annotations" / "i2.xml").write_text(xml_text("i2", 50, 40, [("cat", (5, 5, 90, 70), False)]))
    _split(base, "trainval", ["i0", "i1", "i2"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = VOCDataset(tmp_path, [(2007, "trainval")], ("cat",), ssd_train_transform(300))
    repaired = [str(w.message) for w in caught if "odd annotations repaired" in str(w.message)]
    assert len(repaired) == 1, [str(w.message) for w in caught]
    msg = repaired[0]
    for text in ("2 boxes past the image border clipped", "2 zero-area or inverted boxes dropped",
                 "1 boxes entirely outside the image dropped", "1 boxes with a non-numeric",
                 "1 annotations without a usable <size>", "1 annotations whose <size> disagrees"):
        assert text in msg, msg
    i0, i1, i2 = ds.items
    kept = i0.boxes[np.argsort(i0.boxes[:, 0])]  # (the fixture shuffles the objects)
    np.testing.assert_allclose(kept, [[1, 1, 30, 30], [20, 20, 20, 40], [42.857142857142854, 10.5, 60.25, 70.75],
                                      [50, 10, 100, 80]], rtol=1e-6)
    assert (i1.width, i1.height) == (100, 80) and (i2.width, i2.height) == (100, 80)
    np.testing.assert_allclose(i2.boxes, [[5, 5, 90, 70]])  # kept: it lies inside the real image
    model = build_ssd(300, 2, width_mult=0.0625)
    for _ in range(4):  # random crops of these boxes: never NaN
        images, targets = collate([ds[(0, 1)], ds[(1, 2)], ds[(2, 3)]])
        loc, conf = model(images.float())
        assert torch.isfinite(MultiBoxLoss()(loc, conf, model.priors, targets)["loss"])


# ---------------------------------------------------------------------------------------------- missing files
def test_missing_xml_or_image_names_the_id_and_both_paths(tmp_path):
    base = _layout(tmp_path)
    Image.fromarray(_marker_image(40, 30, (0, 0, 5, 5))).save(base / "JPEGImages" / "ok.jpg")
    Image.fromarray(_marker_image(40, 30, (0, 0, 5, 5))).save(base / "JPEGImages" / "noxml.jpg")
    for i in ("ok", "noimg"):
        (base / "Annotations" / f"{i}.xml").write_text(xml_text(i, 40, 30, [("cat", (2, 2, 20, 20), False)]))
    _split(base, "trainval", ["ok", "noxml", "noimg"])
    with pytest.raises(DataError) as err:
        VOCDataset(tmp_path, [(2007, "trainval")], ("cat",), ssd_eval_transform(300))
    msg = str(err.value)
    assert "id 'noxml'" in msg and "trainval.txt" in msg
    assert f"{base / 'Annotations' / 'noxml.xml'} (missing)" in msg and str(base / "JPEGImages" / "noxml.jpg") in msg
    with pytest.warns(UserWarning, match=r"2 bad samples skipped .*id 'noxml'"):
        ds = VOCDataset(tmp_path, [(2007, "trainval")], ("cat",), ssd_eval_transform(300), skip_bad_samples=True)
    assert [a.image_id for a in ds.items] == ["ok"]
    assert any("id 'noimg'" in s and "noimg.{jpg,jpeg,png,bmp,tif,tiff,webp} (missing)" in s for s in ds.skipped)


# ---------------------------------------------------------------------------------------------- class lists
def _named_voc(root: Path, train: dict[str, list[str]], test: dict[str, list[str]]) -> Path:
    """One object per listed name; ids -> names. Images 120x100."""
    samples, splits = {}, {"trainval": list(train), "test": list(test)}
    for image_id, names in {**train, **test}.items():
        samples[image_id] = (120, 100, [(n, (10 + 20 * j, 10, 40 + 20 * j, 60), False) for j, n in enumerate(names)])
    write_voc(root, 2007, splits, samples)
    return root


def test_split_file_from_windows_with_file_names_for_ids(tmp_path):
    """A split file saved by Notepad (byte-order mark, CRLF) that lists image file names (``b.jpg``) for some ids."""
    base = write_voc(tmp_path, 2007, {}, {i: (60, 40, [("cat", (5, 5, 30, 30), False)]) for i in ("a", "b", "c.d")})
    (base / "ImageSets" / "Main" / "trainval.txt").write_bytes("\ufeffa\r\nb.jpg\r\nc.d\r\n".encode("utf-8"))
    ds = VOCDataset(tmp_path, [(2007, "trainval")], ("cat",), ssd_eval_transform(300))
    assert [a.image_id for a in ds.items] == ["a", "b", "c.d"]
    assert [a.image_path.name for a in ds.items] == ["a.jpg", "b.jpg", "c.d.jpg"]


def test_test_images_that_are_also_training_images_are_reported(tmp_path):
    samples = {i: (60, 40, [("cat", (5, 5, 30, 30), False)]) for i in "abcde"}
    write_voc(tmp_path, 2007, {"trainval": ["a", "b", "c"], "test": ["c", "d", "b"], "val": ["e"]}, samples)
    with pytest.warns(UserWarning, match=r"2 of the 3 images of the test split .*test\.txt\) are also training images "
                                         r"\(e\.g\. c, b\)"):
        VOCDataModule(root=str(tmp_path), train_sets=[(2007, "trainval")], test_set=(2007, "test"), classes=["cat"])
    with warnings.catch_warnings():  # disjoint splits, and a validation split of its own: nothing to say
        warnings.simplefilter("error")
        VOCDataModule(root=str(tmp_path), train_sets=[(2007, "trainval")], test_set=(2007, "val"), classes=["cat"])
        VOCDataModule(root=str(tmp_path), train_sets=[(2007, "trainval")], test_set=(2007, "val"),
                      val_set=(2007, "val"), classes=["cat"])
    with pytest.warns(UserWarning, match=r"2 of the 3 images of the validation split .*\(e\.g\. b, c\)"):
        VOCDataModule(root=str(tmp_path), train_sets=[(2007, "test")], test_set=(2007, "val"),
                      val_set=(2007, "trainval"), classes=["cat"])


def test_auto_classes_by_frequency_then_name_and_variants_reported(tmp_path):
    _named_voc(tmp_path, {"a": ["dog", "cat", "Dog"], "b": ["cat", "bird", "dog "], "c": ["ant"]}, {"t": ["cat"]})
    counts, _ = count_class_names(tmp_path, [(2007, "trainval")])
    assert counts == {"dog": 2, "cat": 2, "Dog": 1, "bird": 1, "ant": 1}
    with pytest.warns(UserWarning, match=r"differ only in case or whitespace: 'dog' \(1\) / 'Dog' \(1\) / 'dog ' \(1\)"):
        assert resolve_classes("auto", tmp_path, [(2007, "trainval")]) == ["cat", "dog", "Dog", "ant", "bird"]
    with pytest.raises(DataError, match="list of class names or 'auto'"):
        resolve_classes("automatic", tmp_path, [(2007, "trainval")])
    with pytest.raises(DataError, match="generated from the class list"):
        VOCDataModule(root=str(tmp_path / "none"), classes="auto", synthetic={"num_train": 4})


@pytest.mark.parametrize("num_classes", [1, 2, 50])
def test_fit_and_test_with_one_two_fifty_classes(tmp_path, num_classes):
    """Any number of classes; one class never in the test split (AP None, excluded, warned) and test images
    without objects."""
    from lightning_modules.detector import SSDDetector

    classes = [f"class {i}" for i in range(num_classes)]
    train = {f"tr{i}": [classes[i % num_classes], classes[(i + 1) % num_classes]] for i in range(6)}
    test = {"te0": [classes[0]], "te1": [], "te2": []}  # two test images hold no object
    _named_voc(tmp_path, train, test)
    dm = VOCDataModule(root=str(tmp_path), train_sets=[(2007, "trainval")], test_set=(2007, "test"), classes=classes,
                       batch_size=3, num_workers=0, augment="light")
    model = SSDDetector(classes, width_mult=0.0625, batch_norm=True, optimizer="adamw", warmup_iters=0)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = trainer.test(model, datamodule=dm, verbose=False)[0]
    ap = model.ap_per_class["test"]
    assert list(ap) == classes
    assert ap["class 0"] is not None and all(ap[c] is None for c in classes[1:])
    assert results["test/map50"] == pytest.approx(ap["class 0"])  # the mean over classes that have test objects
    if num_classes > 1:
        assert any("no (non-difficult) objects of class(es) 'class 1'" in str(w.message) for w in caught)
    assert "test/ap50/class 0" in results and "test/ap50/class 1" not in results


# ---------------------------------------------------------------------------------------------- validation split
def test_val_fraction_is_a_fixed_seeded_part_of_training(tmp_path):
    _named_voc(tmp_path, {f"tr{i:02d}": ["cat"] for i in range(20)}, {"te": ["cat"]})

    def split(**kw):
        dm = VOCDataModule(root=str(tmp_path), train_sets=[(2007, "trainval")], test_set=(2007, "test"),
                           classes=["cat"], batch_size=2, num_workers=0, **kw)
        dm.setup("fit")
        return dm, [a.image_id for a in dm.train_ds.items], [a.image_id for a in dm.val_ds.items]

    dm, train, val = split(val_fraction=0.2)
    assert len(val) == 4 and len(train) == 16 and not set(train) & set(val) and "te" not in val
    assert not dm.val_is_test
    assert split(val_fraction=0.2)[2] == val  # fixed
    assert split(val_fraction=0.2, val_seed=1)[2] != val  # seeded
    dm, train, val = split()
    assert dm.val_is_test and val == ["te"] and len(train) == 20
    with pytest.raises(DataError, match="val_fraction"):
        split(val_fraction=1.0)


def test_threshold_search_refuses_the_test_split(tmp_path):
    from callbacks.sparsity import SparsityInduction
    from callbacks.state import ScheduleError
    from lightning_modules.detector import SSDDetector

    _named_voc(tmp_path, {f"tr{i}": ["cat"] for i in range(4)}, {"te": ["cat"]})
    dm = VOCDataModule(root=str(tmp_path), train_sets=[(2007, "trainval")], test_set=(2007, "test"), classes=["cat"],
                       batch_size=2, num_workers=0)
    cb = SparsityInduction(schedule=[{"layers": ["conv7", "conv8_1"], "l1_epochs": [0, 1]}], threshold_mode="max_map_drop")
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=[cb], enable_progress_bar=False)
    with pytest.raises(ScheduleError, match="--data.val_fraction"):
        trainer.fit(SSDDetector(["cat"], width_mult=0.0625), datamodule=dm)


# ---------------------------------------------------------------------------------------------- from the command line
def _cli(tmp_path, root, *extra):
    return ["--config", "experiments/demo.yaml", "--trainer.default_root_dir", str(tmp_path / "runs"),
            "--data.root", str(root), "--data.synthetic", "null", "--data.batch_size", "2", "--data.num_workers", "0",
            "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1", "--trainer.logger", "false", *extra]


@pytest.mark.parametrize("config,root_error", [("experiments/demo.yaml", "VOC data root not found: "),
                                               ("experiments/gtsdb_ssd512.yaml", "FullIJCNN2013 not found. "),
                                               ("experiments/cifar10_vgg16.yaml", "cifar-10-batches-py not found. "),
                                               ("experiments/gtsrb_vgg16.yaml", "gtsrb not found. ")])
def test_a_missing_data_root_stops_in_one_line_before_the_run_starts(tmp_path, config, root_error):
    """A typo in --data.root: one line naming the path, no traceback, and no run folder or W&B run left behind."""
    proc = run_train(["--config", config, "--data.root", str(tmp_path / "nowhere"), "--run_name", "typo",
                      "--trainer.default_root_dir", str(tmp_path / "runs"),
                      *(["--model.pretrained_backbone", "false"] if "ssd" in config or "demo" in config else []),
                      *(["--data.synthetic", "null", "--data.classes", "[cat]"] if "demo" in config else [])],
                     env={"WANDB_MODE": "offline"}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and root_error in last and str(tmp_path / "nowhere") in last
    assert "Traceback" not in proc.stderr and "Namespace(" not in proc.stderr
    assert not (tmp_path / "runs" / "typo").exists()


@pytest.mark.parametrize("args,message", [
    (["--data.image_size", "320"], "error: SSDDetector: size must be 300 or 512, got 320"),
    (["--model.optimizer", "adam"], "error: SSDDetector: optimizer must be one of ('sgd', 'adamw'), got 'adam'"),
    (["--data.batch_size", "0"], "error: data.batch_size must be a whole number >= 1 (the global batch), got 0"),
    (["--data.num_workers", "-1"], "error: data.num_workers must be a whole number >= 0, got -1"),
    ("l1_mode: proximl", "error: SparsityInduction: l1_mode must be 'gradient' or 'proximal', got 'proximl'"),
])
def test_a_setting_a_class_refuses_stops_in_one_line_naming_the_class(tmp_path, args, message):
    """A value the model, data module or a callback refuses when it is built: its own message and the class, not a
    dump of every argument, and no run folder or W&B run left behind."""
    config = "experiments/demo.yaml"
    if isinstance(args, str):  # a typo inside a callback's block of a config file
        text = Path(config).read_text()
        assert text.count("l1_mode: proximal ") == 1
        config = tmp_path / "typo.yaml"
        config.write_text(text.replace("l1_mode: proximal ", args + " "))
        args = []
    proc = run_train(["--config", str(config), "--run_name", "typo", "--trainer.default_root_dir",
                      str(tmp_path / "runs"), *args], env={"WANDB_MODE": "offline"}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in proc.stderr and "Namespace(" not in proc.stderr
    assert not (tmp_path / "runs" / "typo").exists()


@pytest.mark.parametrize("change,message", [
    (["--trainer.max_epochs", "3"], "error: phase 0: surgery at epoch 6 is not before trainer.max_epochs=3; the pruned "
                                    "model would never be retrained. Raise max_epochs or move the phase earlier."),
    ("no SparsityInduction", "error: FilterSelection and StructuredSurgery need a SparsityInduction callback, which "
                             "declares the pruning schedule; add it to trainer.callbacks before them"),
])
def test_a_schedule_that_cannot_run_stops_before_the_wandb_run_starts(tmp_path, change, message):
    """A schedule the trainer or model cannot run (found by the callbacks' checks, which ran only when fit set up,
    after the W&B run had begun): one line, no W&B folder and no run folder left behind."""
    config, args = Path("experiments/demo.yaml"), change
    if isinstance(change, str):
        raw = yaml.safe_load(config.read_text())
        raw["trainer"]["callbacks"] = [cb for cb in raw["trainer"]["callbacks"]
                                       if cb["class_path"] != "callbacks.SparsityInduction"]
        config, args = tmp_path / "edited.yaml", []
        config.write_text(yaml.safe_dump(raw))
    proc = run_train(["--config", str(config), "--run_name", "bad", "--trainer.default_root_dir",
                      str(tmp_path / "runs"), *args], env={"WANDB_MODE": "offline"}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in proc.stderr and "wandb" not in proc.stderr.lower()
    assert not (tmp_path / "runs" / "bad").exists()


def test_a_librarys_own_failure_keeps_its_full_report():
    """config_error shortens only what the project's own code refused; a library's ValueError inside a constructor
    (here the standard library's JSON parser) is left to jsonargparse's full report."""
    import json as std_json

    from train import ConfigError, config_error

    class Refuses:
        def __init__(self, text: str):
            std_json.loads(text) if text.startswith("{") else self.check(text)

        def check(self, text: str):
            raise ValueError(f"text must start with '{{', got {text!r}")

    def wrapped(text: str) -> ValueError:
        try:
            try:
                Refuses(text)
            except ValueError as err:
                raise ValueError("Does not validate against any of the Union subtypes ...") from err
        except ValueError as outer:
            return outer

    assert config_error(wrapped("{not json")) is None
    ours = config_error(wrapped("plain"))
    assert isinstance(ours, ConfigError) and str(ours) == "Refuses: text must start with '{', got 'plain'"
    assert config_error(ValueError("not wrapped")) is None


def test_one_class_auto_run_fits_tests_and_exports(tmp_path):
    _named_voc(tmp_path / "cells", {f"tr{i}": ["cell"] * (1 + i % 3) for i in range(6)}, {"te0": ["cell"], "te1": []})
    proc = run_train(_cli(tmp_path, tmp_path / "cells", "--data.classes", "auto", "--run_name", "one"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "classes (auto, from the training annotations, objects per class): 'cell' 12" in proc.stderr
    run = tmp_path / "runs" / "one"
    s = json.loads((run / "summary.json").read_text())
    assert list(s["final"]["ap50_per_class"]) == ["cell"] and s["final"]["map50"] >= 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["init_args"]["classes"] == ["cell"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["classes"] == ["cell"] and ckpt["datamodule_hyper_parameters"]["classes"] == ["cell"]
    assert json.loads(Path(s["export"]["json"]).read_text())["classes"] == ["cell"]
    assert Path(s["export"]["onnx"]).is_file()


def test_odd_class_names_from_the_command_line_and_yaml(tmp_path):
    names = ODD_NAMES[:3]
    # the third class never occurs in the test split
    _named_voc(tmp_path / "shop", {f"tr{i}": [names[i % 3], names[(i + 1) % 3]] for i in range(6)},
               {"te0": [names[0], names[1]], "te1": []})
    cli = "[" + ", ".join(f'"{n}"' for n in names) + "]"
    proc = run_train(_cli(tmp_path, tmp_path / "shop", "--data.classes", cli, "--run_name", "odd"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"no (non-difficult) objects of class(es) {names[2]!r}" in proc.stderr
    s = json.loads((tmp_path / "runs" / "odd" / "summary.json").read_text())
    assert list(s["final"]["ap50_per_class"]) == names and s["final"]["ap50_per_class"][names[2]] is None
    # the same names in a YAML file (as the README writes them), and the rest of ODD_NAMES, parse unchanged
    extra = tmp_path / "names.yaml"
    extra.write_text("data:\n  init_args:\n    classes:\n" + "".join(f"      - {json.dumps(n, ensure_ascii=False)}\n"
                                                              for n in ODD_NAMES), encoding="utf-8")
    proc = run_train(["--config", "experiments/demo.yaml", "--config", str(extra), "--print_config"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load(proc.stdout)["data"]["init_args"]["classes"] == ODD_NAMES

"""COCO and GTSDB data in their real on-disk formats (written here), the COCO priors and both configs end to end."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from datamodules.coco import COCODataModule
from datamodules.gtsdb import GTSRB_CLASSES, SUPER_CATEGORIES, GTSDBDataModule
from datamodules.voc import DataError
from tests.conftest import run_train
from tests.helpers import shrunk_default_config

CATS = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]  # COCO ids: not contiguous


def _img(path: Path, w: int, h: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def coco_fixture(root: Path) -> Path:
    """train2017: 4 images (one without annotations, one with a crowd box); val2017: 2 images (one empty)."""
    for split, n in (("train2017", 4), ("val2017", 2)):
        images, anns = [], []
        for i in range(n):
            name = f"{i + 1:012d}.jpg"
            _img(root / split / name, 96, 64, i)
            images.append({"id": i + 1, "file_name": name, "width": 96, "height": 64})
        if split == "train2017":
            anns = [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 40], "iscrowd": 0, "area": 1200},
                    {"id": 11, "image_id": 1, "category_id": 18, "bbox": [50, 5, 20, 20], "iscrowd": 0, "area": 400},
                    {"id": 12, "image_id": 2, "category_id": 3, "bbox": [0, 0, 96, 64], "iscrowd": 1, "area": 6144},
                    {"id": 13, "image_id": 2, "category_id": 3, "bbox": [5, 5, 20, 10], "iscrowd": 0, "area": 200},
                    {"id": 14, "image_id": 4, "category_id": 18, "bbox": [60, 30, 50, 50], "iscrowd": 0, "area": 2500}]
        else:
            anns = [{"id": 20, "image_id": 1, "category_id": 3, "bbox": [20, 10, 40, 30], "iscrowd": 0, "area": 1200}]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return root


def test_coco_ids_crowd_and_images_without_objects(tmp_path):
    # augment "light": the SSD crop, unseeded on a plain index, may drop the box the label check below reads
    dm = COCODataModule(str(coco_fixture(tmp_path / "coco")), image_size=300, batch_size=2, num_workers=0,
                        augment="light")
    assert dm.classes == ("person", "car", "dog")  # category-id order, names from the JSON
    dm.setup("fit")
    dm.setup("test")
    train = {a.image_id: a for a in dm.train_ds.items}
    assert set(train) == {"1", "2", "4"}  # image 3 has no objects: not trained on ...
    assert {a.image_id for a in dm.test_ds.items} == {"1", "2"}  # ... but an empty image is kept for evaluation
    np.testing.assert_array_equal(train["1"].boxes, [[11, 21, 40, 60], [51, 6, 70, 25]])  # [x+1, y+1, x+w, y+h]
    assert train["1"].labels.tolist() == [0, 2]  # category 18 -> label 2
    # the crowd box is a difficult object: never trained on (the training dataset drops it), ignored in evaluation
    from datamodules.coco import load_coco

    read = {a.image_id: a for a in load_coco(tmp_path / "coco", "train2017", dm.classes)}
    assert read["2"].difficult.tolist() == [True, False] and read["2"].labels.tolist() == [1, 1]
    assert train["2"].difficult.tolist() == [False] and train["2"].labels.tolist() == [1]
    img, target = dm.train_ds[1]
    assert img.shape == (3, 300, 300) and target["labels"].tolist() == [1]
    np.testing.assert_array_equal(train["4"].boxes, [[61, 31, 96, 64]])  # clipped to the 96x64 image
    # a subset of the categories, in the order given
    sub = COCODataModule(str(tmp_path / "coco"), classes=["dog", "person"], batch_size=2, num_workers=0)
    sub.setup("fit")
    assert {a.image_id: a.labels.tolist() for a in sub.train_ds.items} == {"1": [1, 0], "4": [0]}
    assert COCODataModule.model_classes({"root": str(tmp_path / "coco")}) == ["person", "car", "dog"]


def test_coco_annotation_file_is_parsed_once_for_the_class_link_and_the_setup(tmp_path, monkeypatch):
    from datamodules import coco

    calls = []
    real = coco.read_coco
    monkeypatch.setattr(coco, "read_coco", lambda root, split: calls.append(split) or real(root, split))
    root = coco_fixture(tmp_path / "coco")
    classes = COCODataModule.model_classes({"root": str(root)})  # what train.py does while parsing the command line
    dm = COCODataModule(str(root), classes=classes, batch_size=2, num_workers=0)
    dm.setup("fit")
    assert calls.count("train2017") == 1 and len(dm.train_ds.items) == 3
    # a file changed on disk between the class link and the setup is read again, not served stale
    path = root / "annotations/instances_train2017.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "categories": data["categories"] + [{"id": 90, "name": "toothbrush"}]}))
    assert COCODataModule.model_classes({"root": str(root)})[-1] == "toothbrush" and calls.count("train2017") == 2
    data["annotations"] = data["annotations"][:1]
    path.write_text(json.dumps(data))
    items = coco.load_coco(root, "train2017", tuple(classes))
    assert calls.count("train2017") == 3 and sum(len(a.labels) for a in items) == 1


def test_coco_bad_input_names_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        COCODataModule(str(tmp_path / "nowhere"))
    root = coco_fixture(tmp_path / "coco")
    ann = root / "annotations" / "instances_train2017.json"
    good = json.loads(ann.read_text())
    ann.write_text(ann.read_text()[:-20])
    with pytest.raises(DataError, match="instances_train2017.json: not a readable COCO annotation file"):
        COCODataModule(str(root))
    data = json.loads(json.dumps(good))
    data["images"][0]["file_name"] = "missing.jpg"
    ann.write_text(json.dumps(data))
    dm = COCODataModule(str(root), batch_size=2, num_workers=0)
    with pytest.raises(DataError, match=r"instances_train2017.json: image 1 \(missing.jpg\) not found"):
        dm.setup("fit")
    data = json.loads(json.dumps(good))
    data["annotations"][0]["category_id"] = 99
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match="instances_train2017.json: annotation 10 has category_id 99"):
        COCODataModule(str(root), batch_size=2, num_workers=0).setup("fit")
    data = json.loads(json.dumps(good))
    data["annotations"][0]["image_id"] = 77
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match="annotation 10 points at image id 77"):
        COCODataModule(str(root), batch_size=2, num_workers=0).setup("fit")
    ann.write_text(json.dumps(good))
    with pytest.raises(DataError, match="which .* does not have"):
        COCODataModule(str(root), classes=["person", "zebra"])


def gtsdb_fixture(root: Path, n: int = 6) -> Path:
    """FullIJCNN2013 with ``n`` small .ppm images; 00002 has no signs."""
    folder = root / "FullIJCNN2013"
    for i in range(n):
        _img(folder / f"{i:05d}.ppm", 136, 80, i)
    lines = ["00000.ppm;10;12;29;31;14", "00000.ppm;60;20;75;35;1", "00001.ppm;100;40;135;79;33",
             "00003.ppm;5;5;20;20;18", "00004.ppm;30;30;50;50;38", "00005.ppm;70;10;90;30;12"]
    (folder / "gt.txt").write_text("\n".join(lines) + "\n")
    return root


def test_gtsdb_split_boxes_and_super_categories(tmp_path):
    root = gtsdb_fixture(tmp_path / "gtsdb")
    # augment "light" (photometric + flip): the SSD crop, unseeded on a plain index, may drop a box (a flaky label check)
    dm = GTSDBDataModule(str(root), train_ids=(0, 4), test_ids=(4, 6), image_size=300, batch_size=2, num_workers=0,
                         augment="light")
    assert dm.classes == GTSRB_CLASSES and len(dm.classes) == 43
    dm.setup("fit")
    dm.setup("test")
    train = {a.image_id: a for a in dm.train_ds.items}
    assert sorted(train) == ["00000", "00001", "00002", "00003"]  # the image without signs is kept
    assert len(train["00002"].boxes) == 0
    np.testing.assert_array_equal(train["00000"].boxes, [[11, 13, 30, 32], [61, 21, 76, 36]])  # 0-based inclusive +1
    assert train["00000"].labels.tolist() == [14, 1] and (train["00000"].width, train["00000"].height) == (136, 80)
    assert sorted(a.image_id for a in dm.test_ds.items) == ["00004", "00005"]
    img, target = dm.train_ds[0]
    assert img.shape == (3, 300, 300) and target["labels"].tolist() == [14, 1]
    sup = GTSDBDataModule(str(root), train_ids=(0, 4), test_ids=(4, 6), super_categories=True, batch_size=2,
                          num_workers=0)
    assert sup.classes == SUPER_CATEGORIES
    sup.setup("fit")
    # stop -> other, speed limit 30 -> prohibitory, turn right ahead -> mandatory, general caution -> danger
    assert {a.image_id: a.labels.tolist() for a in sup.train_ds.items} == {
        "00000": [3, 0], "00001": [2], "00002": [], "00003": [1]}


def test_one_pixel_wide_and_zero_area_boxes_are_read_alike_in_every_format(tmp_path):
    """The same objects written as VOC XML (1-based inclusive), COCO JSON (0-based x, y, w, h) and GTSDB gt.txt
    (0-based inclusive) give the same boxes: one pixel wide or tall is an object (VOC x1 == x2, COCO w == 1, GTSDB
    left == right), zero wide is not (VOC x2 == x1 - 1, COCO w == 0, GTSDB right == left - 1)."""
    from collections import Counter

    from datamodules.coco import load_coco
    from datamodules.gtsdb import load_gtsdb
    from datamodules.voc import parse_voc_xml
    from tests.voc_fixture import xml_text

    # 1-based inclusive: one pixel wide, one pixel tall, an ordinary box, zero wide, zero tall
    boxes = [(20, 10, 20, 30), (40, 15, 60, 15), (5, 5, 30, 40), (70, 10, 69, 30), (70, 40, 90, 39)]
    kept = sorted(list(map(float, b)) for b in boxes[:3])
    xml = tmp_path / "a.xml"
    xml.write_text(xml_text("a", 96, 64, [("cat", b, False) for b in boxes]))
    fixes = Counter()
    voc = parse_voc_xml(xml, tmp_path / "a.jpg", "a", {"cat": 0}, fixes)
    assert sorted(voc.boxes.tolist()) == kept and fixes == Counter(empty=2)

    coco = tmp_path / "coco"
    _img(coco / "train2017" / "000000000001.jpg", 96, 64, 0)
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1,
             "bbox": [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1]} for i, (x1, y1, x2, y2) in enumerate(boxes)]
    (coco / "annotations").mkdir()
    (coco / "annotations" / "instances_train2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "000000000001.jpg", "width": 96, "height": 64}], "annotations": anns,
        "categories": [{"id": 1, "name": "cat"}]}))
    with pytest.warns(UserWarning, match="2 zero-area or inverted boxes dropped"):
        (read,) = load_coco(coco, "train2017", ("cat",))
    assert sorted(read.boxes.tolist()) == kept

    folder = tmp_path / "gtsdb" / "FullIJCNN2013"
    _img(folder / "00000.ppm", 96, 64, 0)
    (folder / "gt.txt").write_text("".join(f"00000.ppm;{x1 - 1};{y1 - 1};{x2 - 1};{y2 - 1};14\n"
                                           for x1, y1, x2, y2 in boxes))
    with pytest.warns(UserWarning, match="2 zero-area or inverted boxes dropped"):
        (sign,) = [a for a in load_gtsdb(tmp_path / "gtsdb", (0, 1), False, GTSRB_CLASSES) if a.image_id == "00000"]
    assert sorted(sign.boxes.tolist()) == kept


def test_gtsdb_bad_input_names_the_file(tmp_path):
    with pytest.raises(DataError, match="FullIJCNN2013 not found"):
        GTSDBDataModule(str(tmp_path / "nowhere"), batch_size=2).setup("fit")
    root = gtsdb_fixture(tmp_path / "gtsdb")
    gt = root / "FullIJCNN2013" / "gt.txt"
    good = gt.read_text()
    gt.write_text(good + "00001.ppm;1;2;3\n")
    with pytest.raises(DataError, match=r"gt.txt line 7: '00001.ppm;1;2;3' is not file;left;top;right;bottom;classId"):
        GTSDBDataModule(str(root), batch_size=2).setup("fit")
    gt.write_text(good + "00001.ppm;1;2;30;40;43\n")
    with pytest.raises(DataError, match="gt.txt line 7: unknown class id 43"):
        GTSDBDataModule(str(root), batch_size=2).setup("fit")
    gt.write_text(good + "00042.ppm;1;2;30;40;3\n")
    with pytest.raises(DataError, match="names image\\(s\\) that are not there: 00042.ppm"):
        GTSDBDataModule(str(root), batch_size=2).setup("fit")
    with pytest.raises(DataError, match="not GTSDB classes"):
        GTSDBDataModule(str(root), classes=["stop", "unicorn"])


def test_ssd300_coco_builder_matches_the_reference_parameter_count():
    """SSD300 with 81 classes and the COCO default boxes: 34,305,206 parameters, the count of torchvision's
    ``ssd300_vgg16(num_classes=81)`` (the original Caffe SSD300 COCO model's classes); at torchvision's 91 COCO
    classes 35,641,826, the figure torchvision's model card gives for ``SSD300_VGG16_Weights.COCO_V1``."""
    import torchvision

    from lightning_modules.ssd import build_ssd, export_spec

    coco = build_ssd(300, 81, prior_sizes="coco300")
    assert sum(p.numel() for p in coco.parameters()) == 34_305_206
    tv = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=81)
    assert sum(p.numel() for p in tv.parameters()) == 34_305_206
    assert sum(p.numel() for p in build_ssd(300, 91, prior_sizes="coco300").parameters()) == 35_641_826
    assert coco.priors.shape == (8732, 4)
    voc = build_ssd(300, 81)
    assert coco.priors[:, 2:].min() < voc.priors[:, 2:].min()  # smaller default boxes than VOC's
    spec = export_spec(coco, [f"c{i}" for i in range(80)])
    assert spec["priors"]["min_sizes"] == [21, 45, 99, 153, 207, 261] and spec["architecture"]["prior_sizes"] == "coco300"
    with pytest.raises(ValueError, match="needs 6 min_sizes"):
        build_ssd(300, 3, prior_sizes={"min_sizes": [10, 20], "max_sizes": [20, 40]})


@pytest.mark.parametrize("config,fixture", [("experiments/coco_ssd300.yaml", coco_fixture),
                                            ("experiments/gtsdb_ssd512.yaml", gtsdb_fixture)])
def test_configs_shrink_to_a_cpu_run(tmp_path, config, fixture):
    """Both YAMLs run on CPU with the README's shrink arguments, and the export keeps the data set's priors."""
    root = fixture(tmp_path / "data")
    args = ["--config", config, "--trainer.fast_dev_run", "true", "--model.width_mult", "0.125",
            "--model.pretrained_backbone", "false", "--trainer.precision", "32", "--trainer.accelerator", "cpu",
            "--trainer.logger", "false", "--data.root", str(root), "--data.batch_size", "2", "--data.num_workers", "0",
            "--data.val_fraction", "0.34", "--trainer.default_root_dir", str(tmp_path / "runs"), "--run_name", "r"]
    if "gtsdb" in config:
        args += ["--data.train_ids", "[0, 4]", "--data.test_ids", "[4, 6]"]
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert s["final"]["params"] > 0 and "coco_map" in s["final"]
    spec = json.loads(Path(s["export"]["json"]).read_text())
    if "coco" in config:
        assert spec["classes"] == ["person", "car", "dog"] and spec["priors"]["min_sizes"][0] == 21
    else:
        assert len(spec["classes"]) == 43 and spec["priors"]["min_sizes"][0] == 12 and spec["architecture"]["size"] == 512
    assert s["run"]["dataset"] == "data"


@pytest.mark.parametrize("config,fixture,params_x,macs_x,width", [
    ("experiments/coco_ssd300_default.yaml", coco_fixture, 2.8, 1.4, 0.25),
    pytest.param("experiments/gtsdb_ssd512_default.yaml", gtsdb_fixture, 26.0, 6.0, 0.5, marks=pytest.mark.slow)])
def test_default_configs_prune_to_their_budgets(tmp_path, config, fixture, params_x, macs_x, width):
    """The COCO and GTSDB configs of the default method (BatchNorm SSD, Taylor score, params + MACs budgets, one cut)
    with their callbacks as written and only the schedule shrunk (epochs, not the budgets): one fit on the tiny data
    set ends at the config's parameter and MACs budgets, with the data set's priors in the export."""
    path = shrunk_default_config(config, tmp_path, params_x, macs_x)
    root = fixture(tmp_path / "data")
    args = ["--config", str(path), "--data.root", str(root), "--data.batch_size", "2", "--data.num_workers", "0",
            "--data.val_fraction", "0.34", "--model.pretrained_backbone", "false", "--model.width_mult", str(width),
            "--run_name", "d"]
    if "gtsdb" in config:
        args += ["--data.train_ids", "[0, 4]", "--data.test_ids", "[4, 6]"]
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "runs" / "d" / "summary.json").read_text())
    assert s["compression"]["params_x"] >= params_x and s["compression"]["macs_x"] >= macs_x
    assert s["compression"]["params_x"] < params_x * 1.3  # fill_budget spends the budget, it does not undershoot it
    # summary.json says what each budget allowed and which one binds
    budgets = s["budgets"]
    for measure, x in (("params", params_x), ("macs", macs_x)):
        b = budgets[measure]
        assert b["from"] == f"dense / {x}" and b["budget"] == round(s["dense"][measure] / x)
        assert b["final"] == s["final"][measure] and b["spent"] == pytest.approx(b["final"] / b["budget"], abs=1e-4)
        assert b["spent"] <= 1
        assert b["final_x"] == s["compression"][f"{measure}_x"]
    assert budgets["binding"] == max(("params", "macs"), key=lambda m: budgets[m]["spent"])
    spec = json.loads(Path(s["export"]["json"]).read_text())
    assert spec["priors"]["min_sizes"][0] == (21 if "coco" in config else 12)

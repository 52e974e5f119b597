"""The VOC loader on data written in the real on-disk layout, and its errors for bad input."""


import numpy as np
import pytest
import torch

from datamodules.transforms import ssd_eval_transform, ssd_train_transform
from datamodules.voc import DataError, VOCDataModule, VOCDataset, collate
from lightning_modules.box_ops import MultiBoxLoss
from lightning_modules.ssd import build_ssd
from tests.voc_fixture import tiny_voc, write_voc

CLASSES = ("cat", "dog")


def test_reads_any_child_order_and_names_images_by_id(tmp_path):
    write_voc(tmp_path, 2007, {"trainval": ["a", "b"]}, {
        "a": (100, 80, [("cat", (10, 12, 50, 60), False), ("dog", (30, 20, 90, 70), True)]),
        "b": (120, 90, [("dog", (1, 1, 120, 90), False)]),
    })
    ds = VOCDataset(tmp_path, [(2007, "trainval")], CLASSES, ssd_eval_transform(300))
    assert [a.image_id for a in ds.items] == ["a", "b"]
    a = ds.items[0]
    assert a.image_path.name == "a.jpg" and (a.width, a.height) == (100, 80)
    order = np.argsort(a.labels)  # the fixture shuffles object order too
    np.testing.assert_array_equal(a.boxes[order], [[10, 12, 50, 60], [30, 20, 90, 70]])
    assert a.labels[order].tolist() == [0, 1] and a.difficult[order].tolist() == [False, True]
    img, t = ds[0]
    assert img.shape == (3, 300, 300) and img.dtype == torch.uint8
    # eval keeps difficult objects, flagged; normalised boxes are the 0-based continuous ones
    assert sorted(t["voc_difficult"].tolist()) == [False, True]
    cat = int(torch.nonzero(t["labels"] == 0)[0])
    torch.testing.assert_close(t["boxes"][cat], torch.tensor([9 / 100, 11 / 80, 50 / 100, 60 / 80]))


def test_a_detection_on_the_ground_truth_box_lands_on_it_in_both_metric_conventions(tmp_path):
    """The round trip data set -> normalised boxes -> metric inputs: a detection exactly on a ground truth's
    (normalised, 0-based continuous) box becomes that ground truth's 1-based inclusive box for the VOC metric and its
    0-based continuous box for the COCO metric, to float rounding; so both score it as a perfect hit."""
    from lightning_modules.detector import SSDDetector
    from lightning_modules.metrics import VOCMeanAveragePrecision

    write_voc(tmp_path, 2007, {"test": ["a"]}, {"a": (100, 80, [("cat", (10, 12, 50, 60), False),
                                                               ("dog", (30, 20, 35, 26), False)])})
    _, t = VOCDataset(tmp_path, [(2007, "test")], CLASSES, ssd_eval_transform(300))[0]
    dets = [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}]
    voc_preds, voc_targets, coco_preds, coco_targets = SSDDetector.metric_inputs(dets, [t])
    torch.testing.assert_close(voc_preds[0]["boxes"], voc_targets[0]["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(coco_preds[0]["boxes"], coco_targets[0]["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(coco_targets[0]["boxes"], voc_targets[0]["boxes"] - torch.tensor([1.0, 1, 0, 0]))
    metric = VOCMeanAveragePrecision(num_classes=2)
    metric.update(voc_preds, voc_targets)
    assert metric.compute()["map"].item() == 1.0


def test_the_coco_metric_gets_the_100_best_detections_of_an_image():
    """COCO evaluation counts at most 100 detections per image (maxDets): those with the highest scores, whatever
    order the decoder returned them in; the VOC metric gets them all."""
    from lightning_modules.detector import SSDDetector

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(150, 2, generator=g) * 0.5
    dets = [{"boxes": torch.cat([xy, xy + 0.2], 1), "scores": torch.rand(150, generator=g),
             "labels": torch.zeros(150, dtype=torch.long)}]
    target = {"voc_boxes": torch.tensor([[1.0, 1, 10, 10]]), "voc_labels": torch.tensor([0]),
              "voc_difficult": torch.tensor([False]), "orig_size": torch.tensor([80, 100])}
    voc_preds, _, coco_preds, _ = SSDDetector.metric_inputs(dets, [target])
    assert len(voc_preds[0]["scores"]) == 150
    assert sorted(coco_preds[0]["scores"].tolist()) == sorted(dets[0]["scores"].topk(100).values.tolist())


def test_difficult_flag_is_read_as_written_by_annotation_tools(tmp_path):
    """<difficult> as VOC writes it (0 / 1), as some tools do (true / false, either case), empty or absent."""
    from datamodules.voc import parse_voc_xml

    flags = ["0", "1", "false", "False", "FALSE", "true", "", None]
    objs = "".join(f"<object><name>cat</name>{'' if f is None else f'<difficult>{f}</difficult>'}"
                   "<bndbox><xmin>10</xmin><ymin>10</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object>"
                   for f in flags)
    path = tmp_path / "a.xml"
    path.write_text(f"<annotation><size><width>50</width><height>40</height></size>{objs}</annotation>")
    ann = parse_voc_xml(path, tmp_path / "a.jpg", "a", {"cat": 0})
    assert ann.difficult.tolist() == [False, True, False, False, False, True, False, False]


def test_difficult_dropped_for_training_by_default(tmp_path):
    write_voc(tmp_path, 2007, {"trainval": ["a"]}, {"a": (100, 80, [("cat", (10, 12, 50, 60), False), ("dog", (30, 20, 90, 70), True)])})
    ds = VOCDataset(tmp_path, [(2007, "trainval")], CLASSES, ssd_train_transform(300), keep_difficult=False)
    assert ds.items[0].labels.tolist() == [0]


def test_missing_root_names_path_and_layout(tmp_path):
    with pytest.raises(DataError) as err:
        VOCDataset(tmp_path / "nope", [(2007, "trainval")], CLASSES, ssd_eval_transform(300))
    msg = str(err.value)
    assert "nope/VOCdevkit/VOC2007/ImageSets/Main/trainval.txt" in msg
    assert "Expected layout" in msg and "--data.download true" in msg


def test_root_may_be_the_vocdevkit_or_the_year_folder_itself(tmp_path):
    """``--data.root`` as a file browser gives it: the folder holding VOCdevkit/, VOCdevkit/ itself or VOC2007/
    itself read the same samples; a year folder whose name is not the year asked for is refused, naming both."""
    import shutil

    tiny_voc(tmp_path / "data")
    want = VOCDataset(tmp_path / "data", [(2007, "trainval")], CLASSES, ssd_eval_transform(300)).items
    for root in (tmp_path / "data" / "VOCdevkit", tmp_path / "data" / "VOCdevkit" / "VOC2007"):
        got = VOCDataset(root, [(2007, "trainval")], CLASSES, ssd_eval_transform(300)).items
        assert [(a.image_id, a.image_path, a.boxes.tolist(), a.labels.tolist()) for a in got] == \
            [(a.image_id, a.image_path, a.boxes.tolist(), a.labels.tolist()) for a in want]
        dm = VOCDataModule(str(root), train_sets=[(2007, "trainval")], test_set=(2007, "test"), classes="auto")
        assert sorted(dm.classes) == sorted(CLASSES)
    with pytest.raises(DataError, match=r"VOC2007 holds Annotations/ itself.*not VOC2012.*\(2012, 'trainval'\)"):
        VOCDataset(tmp_path / "data" / "VOCdevkit" / "VOC2007", [(2012, "trainval")], CLASSES, ssd_eval_transform(300))
    flat = tmp_path / "export"  # a VOC-format export without the devkit's folders
    shutil.copytree(tmp_path / "data" / "VOCdevkit" / "VOC2007", flat)
    with pytest.raises(DataError, match=r"export holds Annotations/ itself.*VOCdevkit/VOC<year>/ \(a symlink works\)"):
        VOCDataset(flat, [(2007, "trainval")], CLASSES, ssd_eval_transform(300))


def test_missing_split_file(tmp_path):
    """The message names the missing file and what is there instead: the split files of that year (not VOC's
    per-class ones), or the years of the root (the VOC configs train on 2007 + 2012)."""
    tiny_voc(tmp_path)
    main = tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    (main / "cat_trainval.txt").write_text("2007_0000  1\n")  # VOC's per-class files: not split files
    with pytest.raises(DataError, match=r"split file not found: .*VOC2007/ImageSets/Main/val.txt does not exist\. "
                                        r"The split files there are: test, trainval\. "):
        VOCDataset(tmp_path, [(2007, "val")], CLASSES, ssd_eval_transform(300))
    with pytest.raises(DataError, match=r"VOCdevkit folder not found: .*VOC2012/ImageSets/Main/trainval.txt does not "
                                        r"exist\. \S+ holds VOC2007, not VOC2012: .* --data.train_sets "
                                        r'"\[\[2007, trainval\]\]" --data.test_set "\[2007, test\]"\.'):
        VOCDataModule(str(tmp_path), train_sets=[(2007, "trainval"), (2012, "trainval")], test_set=(2007, "test"),
                      classes=list(CLASSES))


def test_malformed_xml_names_file_or_is_skipped(tmp_path):
    base = tiny_voc(tmp_path) / "VOCdevkit" / "VOC2007"
    bad = base / "Annotations" / "2007_0001.xml"
    bad.write_text("<annotation><size><width>10</width>")
    with pytest.raises(DataError, match="2007_0001.xml: malformed XML"):
        VOCDataset(tmp_path, [(2007, "trainval")], CLASSES, ssd_eval_transform(300))
    with pytest.warns(UserWarning, match="1 bad samples skipped"):
        ds = VOCDataset(tmp_path, [(2007, "trainval")], CLASSES, ssd_eval_transform(300), skip_bad_samples=True)
    assert len(ds) == 3 and len(ds.skipped) == 1


def test_unreadable_image_names_file_or_is_skipped(tmp_path):
    base = tiny_voc(tmp_path) / "VOCdevkit" / "VOC2007"
    (base / "JPEGImages" / "2007_0002.jpg").write_bytes(b"not a jpeg")
    # found when the data set is read, before any training
    with pytest.raises(DataError, match="2007_0002.jpg: unreadable or corrupt image"):
        VOCDataset(tmp_path, [(2007, "trainval")], CLASSES, ssd_eval_transform(300))
    with pytest.warns(UserWarning, match="1 bad samples skipped"):
        ds = VOCDataset(tmp_path, [(2007, "trainval")], CLASSES, ssd_eval_transform(300), skip_bad_samples=True)
    assert [a.image_id for a in ds.items] == ["2007_0000", "2007_0001", "2007_0003"]
    # an image that breaks after it was read (e.g. on a network file system): the loader names it, or skips it
    (base / "JPEGImages" / "2007_0001.jpg").write_bytes(b"not a jpeg either")
    with pytest.raises(DataError, match="2007_0001.jpg: unreadable or corrupt image"):
        VOCDataset(tmp_path, [(2007, "trainval")], CLASSES, ssd_eval_transform(300), items=ds.items)[1]
    with pytest.warns(UserWarning, match="skipping bad sample"):
        images, targets = collate([ds[0], ds[1], ds[2]])
    assert images.shape[0] == 2 and len(targets) == 2


def test_unknown_class_lists_names(tmp_path):
    write_voc(tmp_path, 2007, {"trainval": ["a"]}, {"a": (100, 80, [("horse", (10, 12, 50, 60), False)])})
    with pytest.raises(DataError, match=r"unknown class 'horse'.*'cat', 'dog'.*--data.classes \"\[cat, dog, horse\]\", "
                                        r"or train on the listed classes alone with --data.other_classes drop"):
        VOCDataset(tmp_path, [(2007, "trainval")], CLASSES, ssd_eval_transform(300))


def test_other_classes_drop_trains_on_the_listed_classes_alone(tmp_path):
    """--data.other_classes drop: objects of unlisted classes are left out and counted in one warning; an image left
    with none stays (background); the listed classes keep their labels; a wrong value stops when the module is
    built."""
    write_voc(tmp_path, 2007, {"trainval": ["a", "b"], "test": ["c"]},
              {"a": (100, 80, [("horse", (10, 12, 50, 60), False), ("dog", (5, 5, 40, 40), False),
                               ("horse", (1, 1, 20, 20), False)]),
               "b": (100, 80, [("person", (10, 12, 50, 60), False)]),
               "c": (100, 80, [("cat", (10, 12, 50, 60), False)])})
    dm = VOCDataModule(root=str(tmp_path), train_sets=[(2007, "trainval")], test_set=(2007, "test"),
                       classes=["cat", "dog"], other_classes="drop", batch_size=1, num_workers=0)
    with pytest.warns(UserWarning, match=r"3 objects of classes outside data.classes left out \(data.other_classes "
                                         r"drop\): horse 2, person 1"):
        dm.setup("fit")
    items = {a.image_id: a for a in dm.train_ds.items}
    assert sorted(items) == ["a", "b"] and items["a"].labels.tolist() == [1] and len(items["b"].labels) == 0
    assert items["a"].boxes.tolist() == [[5.0, 5.0, 40.0, 40.0]]
    with pytest.raises(DataError, match=r"data.other_classes must be one of \('error', 'drop'\), got 'ignore'"):
        VOCDataModule(root=str(tmp_path), train_sets=[(2007, "trainval")], test_set=(2007, "test"),
                      classes=["cat", "dog"], other_classes="ignore")
    with pytest.raises(DataError, match="unknown class 'horse'"):  # the default stops
        VOCDataModule(root=str(tmp_path), train_sets=[(2007, "trainval")], test_set=(2007, "test"),
                      classes=["cat", "dog"], batch_size=1, num_workers=0).setup("fit")


def test_numeric_class_names_written_unquoted_in_yaml_match_the_xml(tmp_path):
    from datamodules.voc import data_classes

    write_voc(tmp_path, 2007, {"trainval": ["a"], "test": ["a"]}, {"a": (100, 80, [("2", (10, 12, 50, 60), False)])})
    dm = VOCDataModule(root=str(tmp_path), train_sets=[(2007, "trainval")], test_set=(2007, "test"), classes=[1, 2],
                       batch_size=1, num_workers=0, synthetic=None)
    assert dm.classes == ("1", "2")
    dm.setup("fit")
    assert dm.train_ds.items[0].labels.tolist() == [1]

    class Data:  # what train.py links to the model's classes
        class_path = "datamodules.voc.VOCDataModule"
        init_args = {"root": str(tmp_path), "train_sets": [(2007, "trainval")], "classes": [1, 2]}

    assert data_classes(Data) == ["1", "2"]


def test_degenerate_boxes_clipped_or_dropped_never_nan(tmp_path):
    write_voc(tmp_path, 2007, {"trainval": ["a"]}, {"a": (100, 80, [
        ("cat", (50, 10, 40, 60), False),     # x2 <= x1: dropped
        ("dog", (-20, 5, 140, 200), False),   # outside the image: clipped
        ("cat", (120, 90, 150, 99), False),   # entirely outside: dropped
        ("dog", (10, 10, 30, 30), False),
    ])})
    with pytest.warns(UserWarning, match="odd annotations repaired: 1 boxes past the image border clipped.*; 1 zero-area or inverted boxes dropped; 1 boxes entirely outside"):
        ds = VOCDataset(tmp_path, [(2007, "trainval")], CLASSES, ssd_train_transform(300))
    assert sorted(ds.items[0].boxes.tolist()) == [[1, 5, 100, 80], [10, 10, 30, 30]]
    model = build_ssd(300, 3, width_mult=0.0625)
    for _ in range(5):
        images, targets = collate([ds[0], ds[0]])
        loc, conf = model(images.float())
        assert torch.isfinite(MultiBoxLoss()(loc, conf, model.priors, targets)["loss"])


def test_loader_workers_deliver_after_the_main_process_used_opencv(tmp_path):
    """Loader workers run OpenCV on one thread each, and still start when the main process has used OpenCV's thread
    pool before they fork (the synthetic data generator does): a worker that set the thread count itself after the
    fork hung for good, and a GPU run waited 7 minutes for its first batch."""
    import subprocess
    import sys

    root = tiny_voc(tmp_path / "voc", n=8)
    code = f"""
import cv2, numpy as np
from datamodules.voc import VOCDataModule
img = np.zeros((400, 400, 3), np.uint8)
for _ in range(10):
    cv2.warpAffine(img, np.eye(2, 3), (300, 300))  # the main process uses OpenCV's thread pool
dm = VOCDataModule(root={str(root)!r}, train_sets=[(2007, "trainval")], test_set=(2007, "test"),
                   classes=["cat", "dog"], batch_size=2, num_workers=2, synthetic=None)
dm.setup("fit")
images, targets = next(iter(dm.train_dataloader()))
print("batch", tuple(images.shape), "opencv threads", cv2.getNumThreads())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "batch (2, 3, 300, 300) opencv threads 1" in out.stdout


def test_packed_targets_read_as_the_per_image_dicts_and_travel_whole(tmp_path, monkeypatch):
    """``collate`` packs a batch's targets into one tensor per field (``DetectionTargets``): each image's dict reads
    back exactly, an image without objects included; Lightning's ``batch_to_device``, the DataLoader's pinning and a
    loader worker's hand-over move it as one object, not as 8 tensors per image."""
    from lightning_fabric.utilities.apply_func import move_data_to_device
    from torch.utils.data import DataLoader
    from torch.utils.data._utils.pin_memory import pin_memory

    from datamodules.targets import DetectionTargets

    write_voc(tmp_path, 2007, {"trainval": ["a", "b", "c"]}, {
        "a": (100, 80, [("cat", (10, 12, 50, 60), False), ("dog", (30, 20, 90, 70), True)]),
        "b": (120, 90, []),
        "c": (60, 90, [("dog", (1, 1, 60, 90), False)]),
    })
    ds = VOCDataset(tmp_path, [(2007, "trainval")], CLASSES, ssd_eval_transform(300))
    samples = [ds[i] for i in range(3)]
    images, targets = collate(samples)
    assert isinstance(targets, DetectionTargets) and len(targets) == 3
    assert targets.counts("boxes") == [2, 0, 1] and targets.field("boxes").shape == (3, 4)
    for i, (_, want) in enumerate(samples):
        for got in (targets[i], targets[i - 3], list(targets)[i]):
            assert got.keys() == want.keys()
            for k in want:
                assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (i, k)
    assert targets[1]["boxes"].shape == (0, 4) and targets[2]["index"].ndim == 0
    for part, want in ((targets[1:], samples[1:]), (targets[::2], samples[::2]), (targets[:-1], samples[:2])):
        assert isinstance(part, DetectionTargets) and len(part) == len(want)
        assert all(torch.equal(part[i][k], t[k]) for i, (_, t) in enumerate(want) for k in t)
    assert len(targets[3:]) == 0
    with pytest.raises(IndexError):
        targets[3]
    with pytest.raises(ValueError, match="same fields"):
        DetectionTargets.from_list([samples[0][1], {"boxes": torch.zeros(0, 4)}])
    assert collate([None, None])[1] == [] and not DetectionTargets.from_list([])

    moved = move_data_to_device((images, targets), torch.device("cpu"))[1]  # Lightning's batch_to_device
    assert isinstance(moved, DetectionTargets) and torch.equal(moved.field("labels"), targets.field("labels"))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())  # (no CUDA here)
    pinned = pin_memory((images, targets))[1]
    assert isinstance(pinned, DetectionTargets) and torch.equal(pinned.field("voc_boxes"), targets.field("voc_boxes"))
    monkeypatch.undo()

    loader = DataLoader(ds, batch_size=3, num_workers=1, collate_fn=collate)  # from a worker process
    (_, sent), = list(loader)
    assert isinstance(sent, DetectionTargets) and all(
        torch.equal(sent[i][k], samples[i][1][k]) for i in range(3) for k in samples[i][1])


def test_datamodule_generates_synthetic_data_once(tmp_path):
    from datamodules.voc import SyntheticSpec

    dm = VOCDataModule(root=str(tmp_path / "syn"), train_sets=[(2007, "trainval")], test_set=(2007, "test"),
                       classes=["circle", "square", "triangle"], batch_size=4, num_workers=0,
                       synthetic=SyntheticSpec(num_train=8, num_test=4, seed=1))
    dm.prepare_data()
    first = sorted(p.name for p in (tmp_path / "syn/VOCdevkit/VOC2007/JPEGImages").iterdir())
    dm.prepare_data()  # second call: nothing regenerated
    assert sorted(p.name for p in (tmp_path / "syn/VOCdevkit/VOC2007/JPEGImages").iterdir()) == first
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 300, 300) and len(targets) == 4
    dm.setup("test")
    assert len(dm.test_ds) == 4

"""VOC XML kept in other folder shapes (LabelImg, Kaggle-style annotations/ + images/, Roboflow's train/valid/test)
laid out as the devkit by ``python -m datamodules.voc_layout``, then read by the same VOCDataModule."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.voc import DataError, VOCDataModule, read_split
from datamodules.voc_layout import main as voc_layout
from tests.conftest import run_train
from tests.voc_fixture import xml_text


def _sample(folder_xml: Path, folder_img: Path, stem: str, ext: str, box=(5, 6, 30, 40), name="cat", seed=0,
            w=64, h=48) -> None:
    folder_xml.mkdir(parents=True, exist_ok=True)
    folder_img.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(folder_img / f"{stem}{ext}")
    (folder_xml / f"{stem}.xml").write_text(xml_text(stem, w, h, [(name, box, False)], seed))


def _ids(base: Path, split: str) -> list[str]:
    return (base / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


def test_kaggle_annotations_and_images_folders_become_a_seeded_split(tmp_path, capsys):
    src = tmp_path / "kaggle"
    for i in range(10):
        _sample(src / "annotations", src / "images", f"maksssksksss{i}", ".png", box=(5 + i, 6, 30, 40),
                name="dog" if i % 3 else "cat", seed=i)
    assert voc_layout([str(src), str(tmp_path / "out"), "--test_fraction", "0.3", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    base = tmp_path / "out" / "VOCdevkit" / "VOC2007"
    trainval, test = _ids(base, "trainval"), _ids(base, "test")
    assert len(test) == 3 and sorted(trainval + test) == sorted(f"maksssksksss{i}" for i in range(10))
    assert trainval == sorted(trainval) and test == sorted(test)
    # the draw is the seed's: another seed draws another test split, the same seed the same one
    assert voc_layout([str(src), str(tmp_path / "again"), "--test_fraction", "0.3", "--seed", "1"]) == 0
    assert _ids(tmp_path / "again" / "VOCdevkit" / "VOC2007", "test") == test
    assert voc_layout([str(src), str(tmp_path / "other"), "--test_fraction", "0.3", "--seed", "2"]) == 0
    assert _ids(tmp_path / "other" / "VOCdevkit" / "VOC2007", "test") != test
    # links to the sources, not copies
    link = base / "JPEGImages" / "maksssksksss4.png"
    assert link.is_symlink() and os.path.samefile(link, src / "images" / "maksssksksss4.png")
    assert "classes (objects): dog 6, cat 4" in out
    assert '--data.train_sets "[[2007, trainval]]" --data.test_set "[2007, test]" --data.val_fraction 0.1' in out
    # the data module reads it, boxes and labels as in the XML (1-based inclusive -> 0-based continuous)
    dm = VOCDataModule(root=str(tmp_path / "out"), train_sets=[(2007, "trainval")], test_set=(2007, "test"),
                       classes="auto", batch_size=2, num_workers=0)
    assert dm.classes == ("dog", "cat")
    dm.setup("fit")
    item = next(a for a in dm.train_ds.items if a.image_id == "maksssksksss4")
    assert item.boxes.tolist() == [[9.0, 6.0, 30.0, 40.0]] and item.labels.tolist() == [0]
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape[0] == 2


def test_labelimg_folder_ids_from_file_names_unlabelled_images_and_other_xml_left_out(tmp_path, capsys):
    src = tmp_path / "labelimg"
    _sample(src, src, "IMG 001", ".JPG", seed=1)  # a space in the name; an upper-case extension
    _sample(src, src, "IMG_002", ".jpeg", seed=2)
    _sample(src, src, "both", ".png", seed=3)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "both.jpg")  # one id in two formats: .jpg preferred
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "unlabelled.jpg")
    (src / "settings.xml").write_text("<config><x>1</x></config>")
    (src / "notes.txt").write_text("not data")
    assert voc_layout([str(src), str(tmp_path / "out"), "--test_fraction", "0", "--copy"]) == 0
    out = capsys.readouterr().out
    base = tmp_path / "out" / "VOCdevkit" / "VOC2007"
    assert _ids(base, "trainval") == ["IMG_001", "IMG_002", "both"]
    assert not (base / "ImageSets" / "Main" / "test.txt").exists()
    assert sorted(p.name for p in (base / "JPEGImages").iterdir()) == ["IMG_001.JPG", "IMG_002.jpeg", "both.jpg"]
    assert not (base / "JPEGImages" / "IMG_001.JPG").is_symlink()  # --copy
    assert "left out: image without xml 1, xml not voc 1" in out
    assert "no test split" in out
    ids = [line.split()[0] for line in (base / "ImageSets" / "Main" / "trainval.txt").read_text().splitlines()]
    assert read_split(tmp_path / "out", 2007, "trainval")[2] == ids


def test_an_annotation_named_apart_from_its_image_is_paired_by_its_filename_field(tmp_path, capsys):
    """Where no image has the XML's stem, the image its <filename> names (a Windows path kept by the tool); of one
    stem in two formats, the one <filename> names; an image that has an XML of its own is not taken by another."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ("IMG 7.png", "x.jpg", "x.png", "own.jpg"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(src / name)
    objects = [("cat", (5, 6, 30, 40), False)]
    (src / "frame_0001.xml").write_text(xml_text("frame_0001", 64, 48, objects, filename="C:\\shots\\IMG 7.png"))
    (src / "x.xml").write_text(xml_text("x", 64, 48, objects, filename="x.png"))
    (src / "own.xml").write_text(xml_text("own", 64, 48, objects))
    assert voc_layout([str(src), str(tmp_path / "out"), "--test_fraction", "0"]) == 0
    out = capsys.readouterr().out
    base = tmp_path / "out" / "VOCdevkit" / "VOC2007"
    assert _ids(base, "trainval") == ["frame_0001", "own", "x"]
    assert os.path.samefile(base / "JPEGImages" / "frame_0001.png", src / "IMG 7.png")
    assert sorted(p.name for p in (base / "JPEGImages").iterdir()) == ["frame_0001.png", "own.jpg", "x.png"]
    assert "image without xml" not in out  # IMG 7.png was paired
    (src / "thief.xml").write_text(xml_text("thief", 64, 48, objects, filename="own.jpg"))
    assert voc_layout([str(src), str(tmp_path / "out2"), "--test_fraction", "0"]) == 2
    assert "thief.xml: no image named thief.<" in capsys.readouterr().err


def test_roboflow_split_folders_kept_and_ids_prefixed_where_stems_repeat(tmp_path, capsys):
    src = tmp_path / "roboflow"
    for split, n in (("train", 3), ("valid", 2), ("test", 2)):
        for i in range(n):
            _sample(src / split, src / split, f"{i}", ".jpg", seed=i)  # the same stems in every folder
    (src / "README.roboflow.txt").write_text("exported")
    _sample(src, src, "stray", ".jpg")  # outside every split folder: not read
    assert voc_layout([str(src), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    base = tmp_path / "out" / "VOCdevkit" / "VOC2007"
    assert _ids(base, "train") == ["train_0", "train_1", "train_2"]
    assert _ids(base, "val") == ["valid_0", "valid_1"] and _ids(base, "test") == ["test_0", "test_1"]
    assert _ids(base, "trainval") == ["train_0", "train_1", "train_2", "valid_0", "valid_1"]
    assert "left out: outside split folders 2" in out
    assert ('--data.train_sets "[[2007, train]]" --data.val_set "[2007, val]" --data.test_set "[2007, test]"'
            in out)
    # their split folders are the splits: a test fraction is refused
    assert voc_layout([str(src), str(tmp_path / "out2"), "--test_fraction", "0.2"]) == 2
    assert "split folders (test/, train/, valid/)" in capsys.readouterr().err


def test_bad_sources_stop_naming_the_files_or_are_left_out_with_skip_bad(tmp_path, capsys):
    src = tmp_path / "src"
    _sample(src / "annotations", src / "images", "ok", ".jpg")
    _sample(src / "annotations", src / "images", "noimage", ".jpg")
    (src / "images" / "noimage.jpg").unlink()
    assert voc_layout([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{src / 'annotations' / 'noimage.xml'}: no image named noimage.<jpg,jpeg,png" in err
    assert not (tmp_path / "out").exists()
    assert voc_layout([str(src), str(tmp_path / "out"), "--skip_bad", "--test_fraction", "0"]) == 0
    captured = capsys.readouterr()
    assert "left out: " in captured.err and "noimage" in captured.err and "left out: bad 1" in captured.out
    assert _ids(tmp_path / "out" / "VOCdevkit" / "VOC2007", "trainval") == ["ok"]
    # the output folder is never written over
    assert voc_layout([str(src), str(tmp_path / "out"), "--skip_bad"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    # one stem's image in two folders is ambiguous; a malformed XML names the file
    (src / "annotations" / "noimage.xml").unlink()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "annotations" / "ok.png")
    assert voc_layout([str(src), str(tmp_path / "o3")]) == 2
    assert "id 'ok': images in 2 folders" in capsys.readouterr().err
    (src / "annotations" / "ok.png").unlink()
    (src / "annotations" / "ok.xml").write_text("<annotation><object>")
    assert voc_layout([str(src), str(tmp_path / "o4")]) == 2
    assert f"{src / 'annotations' / 'ok.xml'}: malformed XML" in capsys.readouterr().err
    # a folder already in the devkit layout, a missing folder, nothing to pair
    (tmp_path / "voc" / "VOCdevkit").mkdir(parents=True)
    assert voc_layout([str(tmp_path / "voc"), str(tmp_path / "o5")]) == 2
    assert "already in the VOC devkit layout" in capsys.readouterr().err
    assert voc_layout([str(tmp_path / "missing"), str(tmp_path / "o6")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert voc_layout([str(tmp_path / "empty"), str(tmp_path / "o7")]) == 2
    assert "no VOC annotation" in capsys.readouterr().err


def test_data_root_with_xml_but_no_split_files_points_at_the_tool(tmp_path):
    src = tmp_path / "kaggle"
    _sample(src / "annotations", src / "images", "a", ".png")
    with pytest.raises(DataError, match=r"holds XML annotations but no split files .*annotations.a\.xml.*"
                                        r"python -m datamodules\.voc_layout"):
        read_split(src, 2007, "trainval")
    # a VOC<year> folder with Annotations/ and JPEGImages/ but no ImageSets/ (some exporters write none)
    voc = tmp_path / "VOC2007"
    _sample(voc / "Annotations", voc / "JPEGImages", "b", ".jpg")
    with pytest.raises(DataError, match=r"python -m datamodules\.voc_layout .*VOC2007 <out>"):
        read_split(voc, 2007, "trainval")
    # train.py says so in one line, also when --data.classes auto reads the annotations while the arguments are parsed
    proc = run_train(["--config", "experiments/demo.yaml", "--data.synthetic", "null", "--data.root", str(src),
                      "--data.classes", "auto", "--trainer.logger", "false"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: VOC VOCdevkit folder not found")
    assert "datamodules.voc_layout" in proc.stderr and "compute_fn" not in proc.stderr

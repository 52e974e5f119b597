"""The German Traffic Sign Detection Benchmark (GTSDB, Houben et al. 2013) in its original FullIJCNN2013 layout
(paper A's SSD512 row, 26x)::

    <root>/FullIJCNN2013/00000.ppm ... 00899.ppm     1360 x 800 RGB
    <root>/FullIJCNN2013/gt.txt                      one line per sign: file;left;top;right;bottom;classId

43 classes (the GTSRB classes). The common split is images 0-599 for training and 600-899 for test (half-open
ranges ``train_ids`` / ``test_ids``). Images without signs are kept (they teach the background). Boxes are
inclusive 0-based pixel columns / rows and become the pipeline's VOC convention (1-based inclusive, +1).
``super_categories`` maps the 43 classes to the 4 groups many papers use: prohibitory, danger, mandatory, other.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from datamodules.voc import (Annotation, DataError, DetectionDataModule, check_loader_args, clip_box, image_header,
                             warn_repairs)

GTSRB_CLASSES = (
    "speed limit 20", "speed limit 30", "speed limit 50", "speed limit 60", "speed limit 70", "speed limit 80",
    "end of speed limit 80", "speed limit 100", "speed limit 120", "no passing", "no passing for trucks",
    "right of way at next intersection", "priority road", "yield", "stop", "no vehicles", "no trucks", "no entry",
    "general caution", "dangerous curve left", "dangerous curve right", "double curve", "bumpy road",
    "slippery road", "road narrows on the right", "road work", "traffic signals", "pedestrians",
    "children crossing", "bicycles crossing", "beware of ice and snow", "wild animals crossing",
    "end of all limits", "turn right ahead", "turn left ahead", "ahead only", "go straight or right",
    "go straight or left", "keep right", "keep left", "roundabout mandatory", "end of no passing",
    "end of no passing for trucks",
)
SUPER_CATEGORIES = ("prohibitory", "danger", "mandatory", "other")
# GTSDB's own grouping (Houben et al. 2013): class id -> super-category
SUPER_OF = {**{c: 0 for c in (0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 15, 16)},
            **{c: 1 for c in (11, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31)},
            **{c: 2 for c in (33, 34, 35, 36, 37, 38, 39, 40)},
            **{c: 3 for c in (6, 12, 13, 14, 17, 32, 41, 42)}}
LAYOUT_HELP = ("Expected layout: <root>/FullIJCNN2013/{00000.ppm ... 00899.ppm, gt.txt} (gt.txt lines: "
               "file;left;top;right;bottom;classId), as unpacked from FullIJCNN2013.zip.")


def read_gt(folder: Path) -> dict[str, list[tuple[list[float], int]]]:
    """gt.txt: file name -> [(box as 0-based inclusive [l, t, r, b], class id)]; a malformed line stops naming it."""
    gt = folder / "gt.txt"
    if not gt.is_file():
        raise DataError(f"{gt} not found. {LAYOUT_HELP}")
    out: dict[str, list] = {}
    for n, line in enumerate(gt.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(";")
        try:
            if len(parts) != 6:
                raise ValueError(f"{len(parts)} fields")
            box, cid = [float(v) for v in parts[1:5]], int(parts[5])
        except ValueError as err:
            raise DataError(f"{gt} line {n}: {line!r} is not file;left;top;right;bottom;classId ({err})") from err
        if not 0 <= cid < len(GTSRB_CLASSES):
            raise DataError(f"{gt} line {n}: unknown class id {cid} (GTSDB has 0..{len(GTSRB_CLASSES) - 1})")
        out.setdefault(parts[0].strip(), []).append((box, cid))
    return out


def load_gtsdb(root: Path, ids: tuple[int, int], super_categories: bool, classes: tuple[str, ...]) -> list[Annotation]:
    folder = root / "FullIJCNN2013"
    if not folder.is_dir():
        raise DataError(f"{folder} not found. {LAYOUT_HELP}")
    gt = read_gt(folder)
    present = {p.name for p in folder.iterdir()}
    missing = sorted(name for name in gt if name not in present)
    if missing:
        raise DataError(f"{folder / 'gt.txt'} names image(s) that are not there: {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}")
    names = GTSRB_CLASSES if not super_categories else SUPER_CATEGORIES
    label_of = {i: classes.index(names[SUPER_OF[i] if super_categories else i]) for i in range(len(GTSRB_CLASSES))
                if names[SUPER_OF[i] if super_categories else i] in classes}
    items, fixes = [], Counter()
    for i in range(*ids):
        name = f"{i:05d}.ppm"
        if name not in present:
            if name in gt:
                raise DataError(f"{folder / name} (listed in gt.txt) is missing")
            continue  # ids past the data set's end (or a trimmed copy): nothing to read
        path = folder / name
        w, h, orientation = image_header(path)
        boxes, labels = [], []
        for (l, t, r, b), cid in gt.get(name, []):
            if cid not in label_of:
                continue
            c = clip_box([l + 1, t + 1, r + 1, b + 1], w, h, fixes)
            if c is None:
                continue
            boxes.append(c)
            labels.append(label_of[cid])
        items.append(Annotation(name[:-4], path, w, h, np.asarray(boxes, np.float32).reshape(-1, 4),
                                np.asarray(labels, np.int64), np.zeros(len(labels), bool), orientation))
    warn_repairs(str(folder / "gt.txt"), fixes)
    if not items:
        raise DataError(f"no images {ids[0]:05d}.ppm .. {ids[1] - 1:05d}.ppm in {folder}. {LAYOUT_HELP}")
    return items


class GTSDBDataModule(DetectionDataModule):
    """GTSDB (``LAYOUT_HELP``).

    Args:
        root: folder holding ``FullIJCNN2013/``.
        train_ids, test_ids: half-open ranges of image numbers (default: the common 0-599 / 600-899 split).
        super_categories: 4 classes (prohibitory, danger, mandatory, other) instead of 43.
        classes: ``None``: all 43 (or the 4 groups); or a subset of those names.
        The rest as ``VOCDataModule`` (image_size defaults to 512: the signs are small).
    """

    def __init__(
        self,
        root: str = "data/gtsdb",
        train_ids: tuple[int, int] = (0, 600),
        test_ids: tuple[int, int] = (600, 900),
        super_categories: bool = False,
        classes: list[str] | None = None,
        val_fraction: float = 0.0,
        val_seed: int = 0,
        image_size: int = 512,
        batch_size: int = 32,
        num_workers: int = 4,
        skip_bad_samples: bool = False,
        zoom_out: float = 4.0,
        augment: str = "ssd",
    ):
        super().__init__()
        self.save_hyperparameters()
        check_loader_args(batch_size, num_workers)
        self.root = Path(root)
        for name, r in (("train_ids", train_ids), ("test_ids", test_ids)):
            if len(r) != 2 or not 0 <= r[0] < r[1]:
                raise DataError(f"data.{name} must be a half-open range [start, end) with 0 <= start < end, got {r}")
        self.classes = tuple(self.model_classes({"classes": classes, "super_categories": super_categories}))
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.val_is_test = val_fraction == 0
        folder = self.root / "FullIJCNN2013"
        if not (folder / "gt.txt").is_file():  # stops here, before a run starts logging
            raise DataError(f"{folder / 'gt.txt' if folder.is_dir() else folder} not found. {LAYOUT_HELP}")

    @classmethod
    def model_classes(cls, init_args: dict) -> list[str]:
        names = SUPER_CATEGORIES if init_args.get("super_categories") else GTSRB_CLASSES
        if not init_args.get("classes"):
            return list(names)
        unknown = [c for c in init_args["classes"] if c not in names]
        if unknown:
            raise DataError(f"data.classes {unknown} are not GTSDB classes; they are: {', '.join(names)}")
        return list(init_args["classes"])

    def load_items(self, which: str) -> list[Annotation]:
        hp = self.hparams
        ids = tuple(hp.train_ids) if which == "train" else tuple(hp.test_ids)
        return load_gtsdb(self.root, ids, hp.super_categories, self.classes)

"""COCO-format detection data (paper B's COCO row; any data set in this layout trains like a VOC-format one).

Standard layout::

    <root>/annotations/instances_<split>.json      e.g. instances_train2017.json, instances_val2017.json
    <root>/<split>/<file_name>                      e.g. train2017/000000000009.jpg

The JSON is read with faster-coco-eval's COCO API. Category ids are not contiguous in COCO (1..90 for 80
classes): they become labels 0..K-1 in id order, with the names from the JSON; ``classes`` may pick a subset (in
the order given). ``iscrowd`` objects are kept as *difficult*: never trained on, and a detection that matches one is
neither a true nor a false positive, as COCO evaluation treats crowd regions. Images without annotations are kept
for evaluation (and dropped from training unless ``train_empty_images``). Boxes are COCO ``[x, y, w, h]`` in
continuous pixels and become the VOC convention the rest of the pipeline uses (1-based inclusive:
``[x + 1, y + 1, x + w, y + h]``); odd boxes are repaired and counted as for VOC.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections import Counter
from pathlib import Path

import numpy as np

from datamodules.voc import Annotation, DataError, DetectionDataModule, check_loader_args, clip_box, warn_repairs

LAYOUT_HELP = ("Expected layout: <root>/annotations/instances_<split>.json and the images in <root>/<split>/ "
               "(e.g. train2017/, val2017/); --data.train_split / --data.val_split name the splits.")


def _image_folders(root: Path, split: str, file_name: str) -> list[Path]:
    """Where an image of ``split`` may lie: ``<root>/<split>/``, or for COCO 2014 file names
    (``COCO_val2014_000000000042.jpg``, also used by minival / valminusminival) the folder they name."""
    folders = [root / split]
    m = re.match(r"COCO_([a-z]+\d{4})_\d+", Path(file_name).name)
    if m:
        folders.append(root / m.group(1))
    folders.append(root / "images" / split)
    return folders


def read_coco(root: Path, split: str) -> tuple["object", Path]:
    """faster-coco-eval's COCO object for ``split``; a missing or malformed file stops naming it."""
    from faster_coco_eval import COCO

    path = root / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        raise DataError(f"COCO annotations {path} not found. {LAYOUT_HELP}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the API prints progress lines
            coco = COCO(str(path))
    except Exception as err:  # JSON syntax, missing keys: the library raises several kinds
        raise DataError(f"{path}: not a readable COCO annotation file ({type(err).__name__}: {err})") from err
    for key in ("images", "annotations", "categories"):
        if key not in coco.dataset:
            raise DataError(f"{path}: no '{key}' list: not a COCO instances file")
    return coco, path


_CATEGORIES: dict[tuple[str, float, int], list[tuple[int, str]]] = {}
_HANDOFF: dict[tuple[str, float, int], tuple["object", Path]] = {}  # at most one parsed file, for the next load_coco


def _file_key(root: Path, split: str) -> tuple[str, float, int]:
    path = root / "annotations" / f"instances_{split}.json"
    return (str(path), path.stat().st_mtime if path.is_file() else 0.0, path.stat().st_size if path.is_file() else 0)


def coco_categories(root: Path, split: str) -> list[tuple[int, str]]:
    """(category id, name) in id order (kept per file and modification time: the command line's class link and the
    data module read them once). The parsed file is handed to the next ``load_coco`` of the same file, so that the
    command line's class link and the data module's setup parse a large annotation file (COCO train2017: 450 MB)
    once, not twice."""
    key = _file_key(root, split)
    if key not in _CATEGORIES:
        coco, path = read_coco(root, split)
        _CATEGORIES[key] = sorted((int(c["id"]), str(c["name"])) for c in coco.dataset["categories"])
        _HANDOFF.clear()
        _HANDOFF[key] = (coco, path)
    return _CATEGORIES[key]


def load_coco(root: Path, split: str, classes: tuple[str, ...], keep_empty: bool = True) -> list[Annotation]:
    """Every image of ``split`` as an ``Annotation`` (VOC box convention, labels indexing ``classes``)."""
    handed = _HANDOFF.pop(_file_key(root, split), None)
    coco, path = handed if handed is not None else read_coco(root, split)
    cats = {int(c["id"]): str(c["name"]) for c in coco.dataset["categories"]}  # from the JSON just read
    unknown = [c for c in classes if c not in cats.values()]
    if unknown:
        raise DataError(f"--data.classes names {unknown}, which {path} does not have; its categories: "
                        f"{', '.join(cats.values())}")
    label_of = {cid: classes.index(name) for cid, name in cats.items() if name in classes}
    listing: dict[Path, set[str]] = {}
    items, fixes = [], Counter()
    anns_of: dict[int, list[dict]] = {}
    for ann in coco.dataset["annotations"]:
        anns_of.setdefault(int(ann["image_id"]), []).append(ann)
    image_ids = {int(im["id"]) for im in coco.dataset["images"]}
    for ann_list in anns_of.values():
        for ann in ann_list:
            if int(ann["image_id"]) not in image_ids:
                raise DataError(f"{path}: annotation {ann.get('id')} points at image id {ann['image_id']}, which is not "
                                "in its 'images' list")
            if int(ann["category_id"]) not in cats:
                raise DataError(f"{path}: annotation {ann.get('id')} has category_id {ann['category_id']}, which is not "
                                f"in its 'categories' (ids {sorted(cats)})")
    for im in sorted(coco.dataset["images"], key=lambda im: int(im["id"])):
        file_name = str(im["file_name"])
        image_path = None
        for folder in _image_folders(root, split, file_name):
            if folder not in listing:
                listing[folder] = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
            if Path(file_name).name in listing[folder]:
                image_path = folder / Path(file_name).name
                break
        if image_path is None:
            raise DataError(f"{path}: image {im['id']} ({file_name}) not found in "
                            f"{' or '.join(str(f) for f in _image_folders(root, split, file_name))}. {LAYOUT_HELP}")
        w, h = int(im["width"]), int(im["height"])
        boxes, labels, crowd = [], [], []
        for ann in anns_of.get(int(im["id"]), []):
            cid = int(ann["category_id"])
            if cid not in label_of:
                continue  # a category outside --data.classes
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            if not all(np.isfinite([x, y, bw, bh])):
                fixes["nonfinite"] += 1
                continue
            if bw <= 0 or bh <= 0:
                fixes["empty"] += 1
                continue
            c = clip_box([x + 1.0, y + 1.0, x + bw, y + bh], w, h, fixes)
            if c is None:
                continue
            boxes.append(c)
            labels.append(label_of[cid])
            crowd.append(bool(ann.get("iscrowd", 0)))
        if not boxes and not keep_empty:
            continue
        items.append(Annotation(str(im["id"]), image_path, w, h, np.asarray(boxes, np.float32).reshape(-1, 4),
                                np.asarray(labels, np.int64), np.asarray(crowd, bool)))
    warn_repairs(str(path), fixes)
    if not items:
        raise DataError(f"{path}: no usable images")
    return items


class COCODataModule(DetectionDataModule):
    """COCO-format data (``LAYOUT_HELP``): train on ``train_split``, test on ``val_split`` (COCO's val2017, the
    split the papers report), validate on a part carved out of training (``val_fraction``) or on the test split.

    Args:
        root: folder holding ``annotations/`` and the image folders.
        train_split: one split or a list trained on together, e.g. ``[train2014, valminusminival2014]``
            (SSD's trainval35k, with ``val_split: minival2014``).
        val_split: the evaluation split (test).
        classes: ``None``: every category of the training JSON, in category-id order; or a subset of its names.
        train_empty_images: also train on images without (kept) objects.
        The rest as ``VOCDataModule``.
    """

    def __init__(
        self,
        root: str = "data/coco",
        train_split: str | list[str] = "train2017",
        val_split: str = "val2017",
        classes: list[str] | None = None,
        val_fraction: float = 0.0,
        val_seed: int = 0,
        image_size: int = 300,
        batch_size: int = 32,
        num_workers: int = 4,
        skip_bad_samples: bool = False,
        zoom_out: float = 4.0,
        augment: str = "ssd",
        train_empty_images: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_loader_args(batch_size, num_workers)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"--data.root {self.root} does not exist. {LAYOUT_HELP}")
        self.train_splits = [train_split] if isinstance(train_split, str) else list(train_split)
        self.classes = tuple(self.model_classes({"root": root, "train_split": self.train_splits, "classes": classes}))
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.val_is_test = val_fraction == 0

    @classmethod
    def model_classes(cls, init_args: dict) -> list[str]:
        split = init_args.get("train_split", "train2017")
        split = split if isinstance(split, str) else list(split)[0]
        root = Path(init_args.get("root", "data/coco"))
        names = [name for _, name in coco_categories(root, split)]
        if not init_args.get("classes"):
            return names
        chosen = list(init_args["classes"])
        if len(set(chosen)) != len(chosen):
            raise DataError(f"data.classes has duplicates: {chosen}")
        unknown = [c for c in chosen if c not in names]
        if unknown:
            raise DataError(f"--data.classes names {unknown}, which {root}/annotations/instances_{split}.json does "
                            f"not have; its categories: {', '.join(names)}")
        return chosen

    def load_items(self, which: str) -> list[Annotation]:
        if which == "train":
            return [a for s in self.train_splits
                    for a in load_coco(self.root, s, self.classes, keep_empty=self.hparams.train_empty_images)]
        return load_coco(self.root, self.hparams.val_split, self.classes, keep_empty=True)

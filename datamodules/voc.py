"""PASCAL VOC-format detection data: the parser, the Dataset and the Lightning DataModule.

Works for any data set in the VOC on-disk layout::

    <root>/VOCdevkit/VOC<year>/Annotations/<id>.xml
    <root>/VOCdevkit/VOC<year>/ImageSets/Main/<split>.txt
    <root>/VOCdevkit/VOC<year>/JPEGImages/<id>.jpg

Box conventions: VOC XML boxes are 1-based inclusive pixels. Evaluation keeps them as they are
(``voc_boxes``, what the devkit metric expects); training uses continuous 0-based boxes
``[x1 - 1, y1 - 1, x2, y2]`` normalised to [0, 1] after the transform.
"""

from __future__ import annotations

import math
import os
import random
import re
import sys
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from rich.progress import track
from torch.utils.data import DataLoader, Dataset

from datamodules.samplers import EvalSampler, TrainSampler
from datamodules.targets import DetectionTargets
from datamodules.transforms import (init_loader_worker, opencv_one_thread, ssd_eval_transform,
                                   ssd_train_transform)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
LAYOUT_HELP = (
    "Expected layout: <root>/VOCdevkit/VOC<year>/{Annotations/<id>.xml, ImageSets/Main/<split>.txt, "
    "JPEGImages/<id>.jpg}. For PASCAL VOC run with --data.download true (torchvision's VOC downloader), "
    "or point --data.root at the folder that holds VOCdevkit/ (the VOCdevkit folder or a VOC<year> folder itself "
    "works too)."
)


class DataError(ValueError):
    """A data set problem the user must fix (missing files, malformed annotations, unknown classes)."""


# Image files are looked up by the id of the split file, with these extensions (in this order of preference).
# in order of preference when one id has several; matched in any case (".JPG", ".Jpeg", ".TIF")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
EXTENSIONS_TEXT = ",".join(e[1:] for e in IMAGE_EXTENSIONS)

# What an object of a class outside data.classes does: stop naming the file, or be left out (counted).
OTHER_CLASSES = ("error", "drop")

# What parse_voc_xml repairs, counted per kind and reported in one summary warning per data set.
FIX_KINDS = {
    "clipped": "boxes past the image border clipped to it (0-based or 1 px past the edge included)",
    "empty": "zero-area or inverted boxes dropped",
    "outside": "boxes entirely outside the image dropped",
    "nonfinite": "boxes with a non-numeric (NaN/inf) coordinate dropped",
    "size_missing": "annotations without a usable <size>: the image's own size used",
    "size_mismatch": "annotations whose <size> disagrees with the image: the image's size used",
}


def check_loader_args(batch_size, num_workers) -> None:
    """A data module's batch size and worker count, checked when it is built (before a run starts logging)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"data.batch_size must be a whole number >= 1 (the global batch), got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise DataError(f"data.num_workers must be a whole number >= 0, got {num_workers!r}")


def warn_repairs(where: str, fixes: Counter) -> None:
    """One warning per data set that counts each kind of repair (``FIX_KINDS``)."""
    if fixes:
        counts = "; ".join(f"{fixes[k]} {text}" for k, text in FIX_KINDS.items() if fixes[k])
        warnings.warn(f"{where}: odd annotations repaired: {counts}", stacklevel=3)


def clip_box(box: list[float], w: int, h: int, fixes: Counter) -> list[float] | None:
    """A 1-based inclusive box clipped to a ``w`` x ``h`` image (counted in ``fixes``), or None when nothing is
    left of it: entirely outside, or empty by the devkit's measure (``x2 - x1 + 1 <= 0``: ``x1 == x2`` is a box one
    pixel wide, kept, as COCO's ``w = 1`` and GTSDB's ``left == right`` are)."""
    x1, y1, x2, y2 = box
    if x2 < 1 or y2 < 1 or x1 > w or y1 > h:
        fixes["outside"] += 1
        return None
    c = [min(max(x1, 1.0), w), min(max(y1, 1.0), h), min(max(x2, 1.0), w), min(max(y2, 1.0), h)]
    if c[2] - c[0] + 1 <= 0 or c[3] - c[1] + 1 <= 0:
        fixes["empty"] += 1
        return None
    if c != [x1, y1, x2, y2]:
        fixes["clipped"] += 1
    return c


@dataclass
class Annotation:
    image_id: str
    image_path: Path
    width: int  # of the image as displayed (EXIF orientation applied)
    height: int
    boxes: np.ndarray  # (N, 4) float32, VOC 1-based inclusive pixels
    labels: np.ndarray  # (N,) int64, 0-based class index
    difficult: np.ndarray  # (N,) bool
    orientation: int = 1  # EXIF orientation tag of the image file (1 = as stored)


def _text(node: ET.Element, tag: str, path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise DataError(f"{path}: malformed annotation, <{node.tag}> has no <{tag}>")
    return child.text.strip()


def image_header(path: Path) -> tuple[int, int, int]:
    """(width, height, EXIF orientation) of an image as displayed, read from its header without decoding it.

    Annotation tools draw boxes on the displayed image, i.e. after the EXIF orientation is applied."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = int(im.getexif().get(0x0112, 1) or 1)
    except (OSError, SyntaxError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise DataError(f"{path}: unreadable or corrupt image ({err})") from err
    if orientation not in range(1, 9):
        orientation = 1
    return (h, w, orientation) if orientation in (5, 6, 7, 8) else (w, h, orientation)


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a decoded (H, W, C) image as stored into the displayed image (EXIF tag 0x0112, as PIL's
    ``ImageOps.exif_transpose``)."""
    if orientation == 2:
        return img[:, ::-1]
    if orientation == 3:
        return img[::-1, ::-1]
    if orientation == 4:
        return img[::-1]
    if orientation == 5:
        return img.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(img, k=-1)
    if orientation == 7:
        return np.rot90(img, k=-1)[::-1]
    if orientation == 8:
        return np.rot90(img, k=1)
    return img


def _read_size(root: ET.Element) -> tuple[int, int] | None:
    size = root.find("size")
    try:
        w, h = (int(float(size.find(t).text)) for t in ("width", "height"))  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError):
        return None
    return (w, h) if w > 0 and h > 0 else None


def parse_voc_xml(path: Path, image_path: Path, image_id: str, class_to_idx: dict[str, int],
                  fixes: Counter | None = None, image_size: tuple[int, int, int] | None = None,
                  dropped: Counter | None = None) -> Annotation:
    """Parse one VOC XML file (children in any order) into an ``Annotation``.

    ``image_size`` is ``image_header(image_path)``: the image's own (displayed) size, which wins over ``<size>``
    when that is missing or disagrees. Coordinates may be floats; boxes are clipped to the image (VOC's 1-based
    inclusive pixels, so a 0-based ``xmin`` of 0 becomes 1) or dropped when empty, outside or not finite.
    Each repair is counted by kind in ``fixes`` (see ``FIX_KINDS``). An object of a class outside ``class_to_idx``
    stops with a ``DataError``, or, where ``dropped`` is given, is left out and counted there by class name."""
    fixes = Counter() if fixes is None else fixes
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DataError(f"{path}: malformed XML ({err})") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read annotation ({err})") from err
    declared = _read_size(root)
    orientation = 1
    if image_size is not None:
        width, height, orientation = image_size
        if declared is None:
            fixes["size_missing"] += 1
        elif declared != (width, height):
            fixes["size_mismatch"] += 1
    elif declared is not None:
        width, height = declared
    else:
        raise DataError(f"{path}: malformed annotation, no usable <size> and no image size given")
    boxes, labels, difficult = [], [], []
    for obj in root.iter("object"):
        name = _text(obj, "name", path)
        if name not in class_to_idx and dropped is not None:
            dropped[name] += 1
            continue
        if name not in class_to_idx:
            listed = ", ".join([*class_to_idx, name])
            raise DataError(
                f"{path}: unknown class {name!r}. Configured classes ({len(class_to_idx)}): "
                f"{', '.join(map(repr, class_to_idx))} (with --data.classes auto: the names of the training "
                f"annotations, so {name!r} has no training object there). Give every class of the data set, e.g. "
                f"--data.classes \"[{listed}]\", or train on the listed classes alone with --data.other_classes drop")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise DataError(f"{path}: malformed annotation, <object> {name!r} has no <bndbox>")
        try:
            x1, y1, x2, y2 = (float(_text(bnd, t, path)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as err:
            raise DataError(f"{path}: malformed <bndbox> ({err})") from err
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            fixes["nonfinite"] += 1
            continue
        clipped = clip_box([x1, y1, x2, y2], width, height, fixes)
        if clipped is None:
            continue
        diff_node = obj.find("difficult")
        is_difficult = diff_node is not None and (diff_node.text or "0").strip().lower() not in ("0", "", "false")
        boxes.append(clipped)
        labels.append(class_to_idx[name])
        difficult.append(is_difficult)
    return Annotation(
        image_id=image_id,
        image_path=image_path,
        width=width,
        height=height,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        difficult=np.asarray(difficult, dtype=bool),
        orientation=orientation,
    )


def voc_year_folder(root: str | Path, year: int | str) -> Path:
    """The VOC<year> folder of ``--data.root``: ``<root>/VOCdevkit/VOC<year>`` (the devkit's layout), or, where that
    does not exist, ``<root>/VOC<year>`` (root is the VOCdevkit folder) or ``root`` itself when it is the
    ``VOC<year>`` folder: the paths a user copies from a file browser. The year must match the folder's name."""
    root = Path(root)
    standard = root / "VOCdevkit" / f"VOC{year}"
    if standard.is_dir():
        return standard
    for base in (root / f"VOC{year}", root):
        if base.name == f"VOC{year}" and (base / "Annotations").is_dir():
            return base
    return standard


def read_split(root: Path, year: int | str, split: str) -> tuple[Path, Path, list[str]]:
    """The VOC<year> folder (``voc_year_folder``), the split file and the ids it lists."""
    base = voc_year_folder(root, year)
    ids_file = base / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        what = "data root" if not Path(root).exists() else ("VOCdevkit folder" if not base.exists() else "split file")
        hint = ""
        if not base.exists() and (Path(root) / "Annotations").is_dir():
            hint = (f" {root} holds Annotations/ itself, so it is one year's folder, but its name is not VOC{year} "
                    f"(the year asked for: data.train_sets / test_set / val_set name ({year}, {split!r})). Name the "
                    "sets with that folder's year, or place the folder as <root>/VOCdevkit/VOC<year>/ (a symlink "
                    "works).")
        elif not (base / "ImageSets" / "Main").is_dir() and Path(root).is_dir():
            from datamodules.voc_layout import find_xml

            source = base if base.is_dir() else Path(root)
            xml = find_xml(source)
            if xml is not None:
                hint = (f" {source} holds XML annotations but no split files (e.g. {xml}): write the layout, with "
                        f"links to those files and split files, by `python -m datamodules.voc_layout {source} <out>`, "
                        "then use <out> as --data.root.")
        if not hint and not base.exists():  # e.g. VOC2007 alone with the default 2007 + 2012 training sets
            years = sorted({d.name[3:] for top in (Path(root) / "VOCdevkit", Path(root)) if top.is_dir()
                            for d in top.iterdir() if d.is_dir() and re.fullmatch(r"VOC\d{4}", d.name)})
            if years:
                hint = (f" {root} holds {', '.join(f'VOC{y}' for y in years)}, not VOC{year}: name only sets of the "
                        f"years there (data.train_sets, data.test_set and data.val_set are (year, split) pairs), e.g. "
                        f"--data.train_sets \"[[{years[0]}, trainval]]\" --data.test_set \"[{years[0]}, test]\".")
        elif not hint and (base / "ImageSets" / "Main").is_dir():
            listed = sorted(f.stem for f in (base / "ImageSets" / "Main").glob("*.txt")
                            if not re.search(r"_(train|val|trainval|test)$", f.stem))  # not VOC's per-class files
            hint = (f" The split files there are: {', '.join(listed)}." if listed else
                    f" {base / 'ImageSets' / 'Main'} holds no split file.")
        raise DataError(f"VOC {what} not found: {ids_file} does not exist.{hint} {LAYOUT_HELP}")
    # utf-8-sig: a split file saved by Windows Notepad starts with a byte-order mark, which is not part of the first id
    ids = [line.split()[0] for line in ids_file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not ids:
        raise DataError(f"split file {ids_file} lists no image ids")
    return base, ids_file, [_id_of(base, i) for i in ids]


def warn_split_overlap(splits: dict[tuple, tuple[Path, Path, list[str]]], train_sets: list[tuple],
                       others: dict[str, tuple]) -> None:
    """Warn when images of the test (or a named validation) split are also training images: the same id in the same
    year's folder. Its figure would then be measured partly on what the network trained on."""
    training = set()
    for train_set in train_sets:
        base, _, ids = splits[train_set]
        training.update((base, i) for i in ids)
    for what, key in others.items():
        base, ids_file, ids = splits[key]
        shared = [i for i in dict.fromkeys(ids) if (base, i) in training]
        if shared and (what == "test" or key != others["test"]):
            warnings.warn(f"{len(shared)} of the {len(set(ids))} images of the {what} split ({ids_file}) are also "
                          f"training images (e.g. {', '.join(shared[:3])}): its figures are measured partly on what "
                          "the network trained on", stacklevel=2)


def _id_of(base: Path, listed: str) -> str:
    """The id a split file line means: some tools list the image's file name (``0001.jpg``) where the devkit lists
    its id (``0001``); the id is taken when only ``<id>.xml`` exists."""
    stem, ext = os.path.splitext(listed)
    if ext.lower() in IMAGE_EXTENSIONS and not (base / "Annotations" / f"{listed}.xml").exists() \
            and (base / "Annotations" / f"{stem}.xml").exists():
        return stem
    return listed


def image_index(folder: Path) -> dict[str, Path]:
    """id -> image file in ``folder`` (one listing, not one lookup per id), by ``IMAGE_EXTENSIONS`` preference in
    any case; of two names that differ only in case, the first in sorted order (the listing's order is arbitrary)."""
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    found: dict[str, tuple[tuple[int, str], Path]] = {}
    if folder.is_dir():
        for entry in os.scandir(folder):
            stem, ext = os.path.splitext(entry.name)
            key = (rank.get(ext.lower(), -1), entry.name)
            if key[0] >= 0 and (stem not in found or key < found[stem][0]):
                found[stem] = key, Path(entry.path)
    return {stem: path for stem, (_, path) in found.items()}


def load_annotations(root: str | Path, sets: list[tuple[int | str, str]], classes: tuple[str, ...],
                     skip_bad_samples: bool = False, other_classes: str = "error") -> tuple[list[Annotation], list[str]]:
    """Parse every annotation of ``sets`` up front, so bad files are reported before training starts.

    Returns the annotations and the messages of samples skipped (``skip_bad_samples``). Repairs of odd boxes and
    sizes are reported in one warning that counts each kind; an id whose XML or image is missing names both paths.
    ``other_classes``: an object of a class outside ``classes`` stops (``"error"``) or is left out (``"drop"``; one
    warning counts them by class; an image left without objects stays, as background).
    """
    check_other_classes(other_classes)
    dropped: Counter | None = Counter() if other_classes == "drop" else None
    class_to_idx = {c: i for i, c in enumerate(classes)}
    items: list[Annotation] = []
    skipped: list[str] = []
    fixes: Counter = Counter()
    for year, split in sets:
        base, ids_file, ids = read_split(Path(root), year, split)
        images = image_index(base / "JPEGImages")
        for image_id in track(ids, description=f"reading VOC{year} {split} annotations", disable=len(ids) < 2000):
            xml = base / "Annotations" / f"{image_id}.xml"
            img = images.get(image_id)
            try:
                if img is None or not xml.is_file():
                    img_text = str(img) if img else f"{base / 'JPEGImages' / image_id}.{{{EXTENSIONS_TEXT}}} (missing)"
                    raise DataError(
                        f"id {image_id!r} listed in {ids_file}: annotation {xml}{'' if xml.is_file() else ' (missing)'}, "
                        f"image {img_text}")
                items.append(parse_voc_xml(xml, img, image_id, class_to_idx, fixes, image_header(img), dropped))
            except DataError as err:
                if not skip_bad_samples or "unknown class" in str(err):
                    raise
                skipped.append(str(err))
    warn_repairs(f"{root} {sets}", fixes)
    if dropped:
        counts = ", ".join(f"{name} {n:,}" for name, n in dropped.most_common())
        warnings.warn(f"{root} {sets}: {sum(dropped.values()):,} objects of classes outside data.classes left out "
                      f"(data.other_classes drop): {counts}", stacklevel=2)
    if skipped:
        warnings.warn(f"{len(skipped)} bad samples skipped (--data.skip_bad_samples true); first: {skipped[0]}",
                      stacklevel=2)
    if not items:
        raise DataError(f"no usable samples in {root} for sets {sets}")
    return items, skipped


def check_other_classes(other_classes: str) -> None:
    if other_classes not in OTHER_CLASSES:
        raise DataError(f"data.other_classes must be one of {OTHER_CLASSES}, got {other_classes!r}")


def count_class_names(root: str | Path, sets: list[tuple[int | str, str]]) -> tuple[Counter, dict[str, Counter]]:
    """Objects per class name in the annotations of ``sets`` (names stripped of surrounding whitespace, as the
    parser reads them), and the raw spellings behind each case- and whitespace-insensitive name."""
    counts: Counter = Counter()
    spellings: dict[str, Counter] = {}
    for year, split in sets:
        base, _, ids = read_split(Path(root), year, split)
        for image_id in ids:
            xml = base / "Annotations" / f"{image_id}.xml"
            try:
                tree = ET.parse(xml)
            except (ET.ParseError, OSError):
                continue  # reported with its path when the data set is read
            for node in tree.getroot().iter("object"):
                raw = node.findtext("name")
                if raw is None or not raw.strip():
                    continue
                counts[raw.strip()] += 1
                spellings.setdefault(" ".join(raw.split()).casefold(), Counter())[raw] += 1
    return counts, spellings


def resolve_classes(classes: list[str | int] | tuple[str, ...] | str, root: str | Path,
                    sets: list[tuple[int | str, str]]) -> list[str]:
    """``classes`` as given, or for ``"auto"`` every class name of the training annotations, most frequent first
    (ties by name). The list and its counts are printed; names that differ only in case or whitespace are reported
    (``'Dog'`` and ``'dog'`` stay two classes, ``'dog '`` and ``'dog'`` are one: surrounding whitespace is ignored)."""
    if not isinstance(classes, str):  # numeric names (``[1, 2]`` in YAML) are the strings of the XML <name>
        return [str(c) for c in classes]
    if classes != "auto":
        raise DataError(f"data.classes must be a list of class names or 'auto', got {classes!r}")
    counts, spellings = count_class_names(root, [tuple(s) for s in sets])
    if not counts:
        raise DataError(f"--data.classes auto found no <object><name> in the annotations of {root} {list(sets)}; "
                        "give the class list with --data.classes \"[name, ...]\"")
    names = sorted(counts, key=lambda n: (-counts[n], n))
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0":
        listing = ", ".join(f"{n!r} {counts[n]}" for n in names)
        print(f"classes (auto, from the training annotations, objects per class): {listing}", file=sys.stderr)
    variants = [sp for sp in spellings.values() if len(sp) > 1]
    if variants:
        text = "; ".join(" / ".join(f"{s!r} ({c})" for s, c in sp.most_common()) for sp in variants)
        warnings.warn(f"class names that differ only in case or whitespace: {text}. Surrounding whitespace is "
                      "ignored; names differing in case or inner spaces are kept as separate classes. Fix the "
                      "annotations if they mean one class.", stacklevel=2)
    return names


class VOCDataset(Dataset):
    """VOC-format detection data set over one or more (year, split) pairs (or over parsed ``items``).

    The id in ImageSets names both the annotation and the image (the XML ``<filename>`` is not used); the image may
    be any of ``IMAGE_EXTENSIONS``. Grayscale, RGBA, CMYK and 16-bit images are converted to 8-bit RGB and the EXIF
    orientation is applied. Each item is ``(image uint8 CHW tensor, target dict)``; targets carry normalised
    ``boxes`` (after the transform), 0-based ``labels``, ``difficult``, and for evaluation ``voc_boxes`` in original
    pixels.
    """

    def __init__(self, root: str | Path | None, sets: list[tuple[int | str, str]], classes: tuple[str, ...],
                 transform: A.Compose, keep_difficult: bool = True, skip_bad_samples: bool = False,
                 items: list[Annotation] | None = None):
        self.transform = transform
        self.skip_bad_samples = skip_bad_samples
        self.skipped: list[str] = []
        if items is None:
            items, self.skipped = load_annotations(root, sets, classes, skip_bad_samples)
        if not keep_difficult:
            items = [replace(a, boxes=a.boxes[~a.difficult], labels=a.labels[~a.difficult],
                             difficult=a.difficult[~a.difficult]) for a in items]
        self.items: list[Annotation] = items

    def __len__(self) -> int:
        return len(self.items)

    def load_image(self, ann: Annotation) -> np.ndarray | None:
        """8-bit RGB, as displayed: cv2 converts gray / RGBA / CMYK / 16-bit to 8-bit BGR, the orientation is the
        one ``image_header`` read (cv2 is told to ignore it, so pixels and boxes follow one reading of EXIF)."""
        img = cv2.imread(str(ann.image_path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if img is not None:
            img = apply_orientation(img, ann.orientation)
        if img is None or img.shape[:2] != (ann.height, ann.width):
            what = "unreadable or corrupt image" if img is None else (
                f"decodes to {img.shape[1]}x{img.shape[0]}, its header said {ann.width}x{ann.height}")
            msg = f"{ann.image_path}: {what}"
            if not self.skip_bad_samples:
                raise DataError(msg + " (use --data.skip_bad_samples true to skip such samples)")
            warnings.warn(f"skipping bad sample: {msg}", stacklevel=2)
            return None
        # BGR -> RGB: cv2 copies 40x faster than numpy's reversed-stride copy (0.01 against 0.47 ms at 500 x 375)
        return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2RGB)

    def __getitem__(self, key):
        """``key`` is an index, or ``(index, seed)`` from ``TrainSampler``: the augmentation then draws its random
        numbers from ``seed`` alone, so a sample's augmentation is reproducible (resume, any worker count)."""
        if isinstance(key, tuple):
            index, seed = key
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        else:
            index = key
        ann = self.items[index]
        img = self.load_image(ann)
        if img is None:
            return None
        h, w = img.shape[:2]
        # continuous 0-based boxes for the geometric transforms
        boxes = ann.boxes.copy()
        boxes[:, :2] -= 1.0
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        out = self.transform(image=img, bboxes=boxes, labels=ann.labels, difficult=ann.difficult)
        image = torch.from_numpy(np.ascontiguousarray(out["image"])).permute(2, 0, 1)
        oh, ow = out["image"].shape[:2]
        tb = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4) / np.array([ow, oh, ow, oh], dtype=np.float32)
        target = {
            "boxes": torch.from_numpy(tb),
            "labels": torch.as_tensor(np.asarray(out["labels"], dtype=np.int64)),
            "difficult": torch.as_tensor(np.asarray(out["difficult"], dtype=bool)),
            "voc_boxes": torch.from_numpy(ann.boxes),
            "voc_labels": torch.from_numpy(ann.labels),
            "voc_difficult": torch.from_numpy(ann.difficult),
            "orig_size": torch.tensor([ann.height, ann.width]),
            "index": torch.tensor(index),
        }
        return image, target


def collate(batch: list) -> tuple[torch.Tensor, DetectionTargets | list]:
    """Stack images (uint8) and pack the targets (``DetectionTargets``: one tensor per field, read as a list of
    per-image dicts); samples skipped as bad (None) are dropped, and a batch of none is ``(empty images, [])``."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.zeros((0, 3, 1, 1), dtype=torch.uint8), []
    images, targets = zip(*batch)
    return torch.stack(images), DetectionTargets.from_list(list(targets))


@dataclass
class SyntheticSpec:
    """Generate a synthetic VOC-format data set into ``root`` on first use (see datamodules/synthetic.py)."""

    num_train: int = 2000
    num_test: int = 300
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 5
    min_scale: float = 0.1  # object size as a fraction of the image's short side
    max_scale: float = 0.75
    max_clutter: int = 12  # distractor lines / arcs / blobs per image
    class_textures: bool = False  # each class has its own texture as well as its own shape


class DetectionDataModule(pl.LightningDataModule):
    """What every detection DataModule shares: the SSD transforms, the validation split carved from training data,
    the seeded samplers and the loaders. A subclass reads its format into ``Annotation`` lists (``load_items``),
    names its classes (``model_classes``, which train.py links to the model) and sets ``self.classes`` and
    ``self.val_is_test`` in its constructor. Its hparams carry ``image_size``, ``batch_size``, ``num_workers``,
    ``val_fraction``, ``val_seed``, ``skip_bad_samples``, ``zoom_out``, ``augment``."""

    classes: tuple[str, ...]
    val_is_test: bool

    @classmethod
    def model_classes(cls, init_args: dict) -> list[str]:
        """The class list the model is built for, from the DataModule's arguments (before it is instantiated)."""
        return list(init_args["classes"])

    def load_items(self, which: str) -> list[Annotation]:
        """The parsed annotations of the ``"train"``, ``"val"`` or ``"test"`` split."""
        raise NotImplementedError

    def _dataset(self, items: list[Annotation], train: bool) -> VOCDataset:
        hp = self.hparams
        transform = ssd_train_transform(hp.image_size, hp.zoom_out, hp.augment) if train else ssd_eval_transform(hp.image_size)
        return VOCDataset(None, [], self.classes, transform,
                          keep_difficult=hp.get("keep_difficult_train", False) if train else True,
                          skip_bad_samples=hp.skip_bad_samples, items=items)

    def split_validation(self, items: list[Annotation]) -> tuple[list[Annotation], list[Annotation]]:
        """(train, val): ``val_fraction`` of the training images, drawn by a permutation seeded by ``val_seed``
        alone (so every training seed and every resume sees the same split)."""
        n_val = max(1, round(self.hparams.val_fraction * len(items)))
        if n_val >= len(items):
            raise DataError(f"data.val_fraction {self.hparams.val_fraction} of {len(items)} training images leaves "
                            "none to train on")
        val_idx = set(np.random.default_rng(self.hparams.val_seed).permutation(len(items))[:n_val].tolist())
        return ([a for i, a in enumerate(items) if i not in val_idx], [a for i, a in enumerate(items) if i in val_idx])

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and not hasattr(self, "train_ds"):
            items = self.load_items("train")
            if self.hparams.val_fraction > 0:
                items, val_items = self.split_validation(items)
            else:
                val_items = self.load_items("val")
            self.train_ds = self._dataset(items, train=True)
            self.val_ds = self._dataset(val_items, train=False)
        if stage in ("test", "validate", None) and not hasattr(self, "test_ds"):
            self.test_ds = self._dataset(self.load_items("test"), train=False)
        if stage == "validate" and not hasattr(self, "val_ds"):  # (test needs no validation split)
            if self.val_is_test:
                self.val_ds = self.test_ds
            else:
                self.setup("fit")

    def per_device_batch_size(self) -> int:
        """``batch_size`` is the global batch: split evenly over all devices of all nodes."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.hparams.batch_size % world:
            raise DataError(
                f"data.batch_size {self.hparams.batch_size} is the global batch size and must divide evenly over "
                f"{world} processes (devices x nodes); use a multiple of {world}")
        return self.hparams.batch_size // world

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        """Training: ``TrainSampler`` (order and augmentation from the global seed and the epoch; global batches
        shared out over the ranks). Evaluation: ``EvalSampler`` (each image exactly once over all ranks)."""
        nw = self.hparams.num_workers
        batch = self.per_device_batch_size()
        if nw > 0:
            opencv_one_thread()  # before the workers fork (``opencv_one_thread``)
        if train:
            sampler = TrainSampler(ds, batch_size=batch, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
        else:
            sampler = EvalSampler(ds)
        return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=nw, collate_fn=collate,
                          pin_memory=torch.cuda.is_available(), persistent_workers=nw > 0,
                          worker_init_fn=init_loader_worker if nw > 0 else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_ds, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_ds, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_ds, train=False)


def data_classes(data) -> list[str]:
    """train.py's link from the data module's arguments to the model's classes: the DataModule class named by
    ``data.class_path`` resolves them (``model_classes``: e.g. VOC's ``"auto"``, COCO's category names)."""
    import importlib

    module, _, name = str(data.class_path).rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    args = data.init_args
    args = args.as_dict() if hasattr(args, "as_dict") else dict(args or {})
    if not hasattr(cls, "model_classes"):
        return list(args["classes"])
    return cls.model_classes(args)


class VOCDataModule(DetectionDataModule):
    """VOC-format data: PASCAL VOC itself, any data set in its layout, or the embedded synthetic set.

    Args:
        root: folder holding ``VOCdevkit/``.
        train_sets: (year, split) pairs to train on, e.g. ``[[2007, trainval], [2012, trainval]]``.
        test_set: (year, split) to test on, e.g. ``[2007, test]``.
        classes: class names (background excluded); the model's ``num_classes`` follows this list. ``"auto"``:
            every ``<name>`` of the training annotations, most frequent first (ties by name), printed with its counts.
        val_fraction: carve this fraction of the training ids (a fixed permutation drawn from ``val_seed``, the
            same for every training seed) out as the validation split. Validation picks what the run chooses (the
            ``max_map_drop`` threshold search, checkpoint monitors); the test split never does.
        val_set: (year, split) for validation instead. With neither, validation runs on the test split, for
            monitoring only: anything that would choose on it refuses to run (``val_is_test``).
        image_size: network input side (300 or 512).
        batch_size: the *global* batch size, split evenly over all devices and nodes (an error if it does not
            divide). The learning rate in each experiment is tuned for the batch size stated beside it; when you
            change the global batch, scale the learning rate linearly with it (Goyal et al. 2017) and keep the
            warm-up.
        download: fetch PASCAL VOC with torchvision's downloader when missing (years 2007 and 2012).
        keep_difficult_train: train on objects flagged difficult too (off in the SSD recipe).
        skip_bad_samples: warn and skip malformed annotations / unreadable images instead of stopping.
        other_classes: an object of a class not in ``classes``: ``"error"`` stops naming its file (a typo in a
            class name shows at once); ``"drop"`` leaves such objects out (one warning counts them), to train on
            some classes of a data set, e.g. VOC's ``person`` alone; their images stay, as background for the rest.
        synthetic: when set and ``root`` holds no data set yet, generate the synthetic one there.
        zoom_out: largest zoom-out ratio of the augmentation (1 disables it).
        augment: training augmentation policy, "ssd" (the paper's) or "light" (flip, resize, photometric distortion:
            no zoom-out or crop).
    """

    def __init__(
        self,
        root: str = "data/VOC",
        train_sets: list[tuple[int, str]] = ((2007, "trainval"), (2012, "trainval")),
        test_set: tuple[int, str] = (2007, "test"),
        classes: list[str | int] | str = VOC_CLASSES,
        val_fraction: float = 0.0,
        val_seed: int = 0,
        val_set: tuple[int, str] | None = None,
        image_size: int = 300,
        batch_size: int = 32,
        num_workers: int = 4,
        download: bool = False,
        keep_difficult_train: bool = False,
        skip_bad_samples: bool = False,
        other_classes: str = "error",
        synthetic: SyntheticSpec | None = None,
        zoom_out: float = 4.0,
        augment: str = "ssd",
    ):
        super().__init__()
        self.save_hyperparameters()
        check_loader_args(batch_size, num_workers)
        check_other_classes(other_classes)
        self.root = Path(root)
        self.train_sets = [tuple(s) for s in train_sets]
        self.test_set = tuple(test_set)
        if classes == "auto" and synthetic is not None and not (self.root / "VOCdevkit").exists():
            raise DataError("--data.classes auto reads the class names from the training annotations, but the "
                            f"synthetic data set at {self.root} is generated from the class list: give the list")
        # train.py resolves "auto" once when it parses the command line; here for use from Python
        self.classes = tuple(resolve_classes(classes, self.root, self.train_sets))
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise DataError(f"classes must be a non-empty list of unique names, got {list(self.classes)}")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if val_fraction > 0 and val_set is not None:
            raise DataError("give either data.val_fraction or data.val_set, not both")
        self.val_set = tuple(val_set) if val_set is not None else self.test_set
        self.val_is_test = val_fraction == 0 and self.val_set == self.test_set
        if synthetic is None and not download:  # a missing folder or split file stops here, before a run starts logging
            ids = {(year, split): read_split(self.root, year, split)
                   for year, split in dict.fromkeys([*self.train_sets, self.test_set, self.val_set])}
            warn_split_overlap(ids, self.train_sets, {"test": self.test_set, "validation": self.val_set})

    def prepare_data(self) -> None:
        if self.hparams.synthetic is not None and not (self.root / "VOCdevkit").exists():
            from datamodules.synthetic import generate_synthetic_voc

            spec = self.hparams.synthetic
            if isinstance(spec, dict):
                spec = SyntheticSpec(**spec)
            generate_synthetic_voc(self.root, spec, classes=self.classes)
        if self.hparams.download:
            from torchvision.datasets import VOCDetection

            for year, split in {*self.train_sets, self.test_set, self.val_set}:
                if not (voc_year_folder(self.root, year) / "ImageSets" / "Main" / f"{split}.txt").is_file():
                    VOCDetection(str(self.root), year=str(year), image_set=split, download=True)

    @classmethod
    def model_classes(cls, init_args: dict) -> list[str]:
        return resolve_classes(init_args.get("classes", VOC_CLASSES), init_args.get("root", "data/VOC"),
                               init_args.get("train_sets", ((2007, "trainval"), (2012, "trainval"))))

    def load_items(self, which: str) -> list[Annotation]:
        sets = {"train": self.train_sets, "val": [self.val_set], "test": [self.test_set]}[which]
        return load_annotations(self.root, sets, self.classes, self.hparams.skip_bad_samples,
                                self.hparams.other_classes)[0]

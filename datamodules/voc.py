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

import os
import random
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from rich.progress import track
from torch.utils.data import DataLoader, Dataset

from datamodules.samplers import EvalSampler, TrainSampler
from datamodules.transforms import ssd_eval_transform, ssd_train_transform

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
LAYOUT_HELP = (
    "Expected layout: <root>/VOCdevkit/VOC<year>/{Annotations/<id>.xml, ImageSets/Main/<split>.txt, "
    "JPEGImages/<id>.jpg}. For PASCAL VOC run with --data.download true (torchvision's VOC downloader), "
    "or point --data.root at the folder that holds VOCdevkit/."
)


class DataError(ValueError):
    """A data set problem the user must fix (missing files, malformed annotations, unknown classes)."""


@dataclass
class Annotation:
    image_id: str
    image_path: Path
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32, VOC 1-based inclusive pixels
    labels: np.ndarray  # (N,) int64, 0-based class index
    difficult: np.ndarray  # (N,) bool


def _text(node: ET.Element, tag: str, path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise DataError(f"{path}: malformed annotation, <{node.tag}> has no <{tag}>")
    return child.text.strip()


def parse_voc_xml(path: Path, image_path: Path, image_id: str, class_to_idx: dict[str, int]) -> tuple[Annotation, int]:
    """Parse one VOC XML file (children in any order). Returns the annotation and the number of
    degenerate boxes that were clipped or dropped."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DataError(f"{path}: malformed XML ({err})") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read annotation ({err})") from err
    size = root.find("size")
    if size is None:
        raise DataError(f"{path}: malformed annotation, no <size>")
    try:
        width, height = int(float(_text(size, "width", path))), int(float(_text(size, "height", path)))
    except ValueError as err:
        raise DataError(f"{path}: malformed <size> ({err})") from err
    boxes, labels, difficult = [], [], []
    fixed = 0
    for obj in root.iter("object"):
        name = _text(obj, "name", path)
        if name not in class_to_idx:
            raise DataError(
                f"{path}: unknown class {name!r}. Configured classes ({len(class_to_idx)}): "
                f"{', '.join(class_to_idx)}. Set --data.classes to the data set's class names."
            )
        bnd = obj.find("bndbox")
        if bnd is None:
            raise DataError(f"{path}: malformed annotation, <object> {name!r} has no <bndbox>")
        try:
            x1, y1, x2, y2 = (float(_text(bnd, t, path)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as err:
            raise DataError(f"{path}: malformed <bndbox> ({err})") from err
        cx1, cy1 = min(max(x1, 1.0), width), min(max(y1, 1.0), height)
        cx2, cy2 = min(max(x2, 1.0), width), min(max(y2, 1.0), height)
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            fixed += 1
        if cx2 <= cx1 or cy2 <= cy1:
            if (cx1, cy1, cx2, cy2) == (x1, y1, x2, y2):
                fixed += 1
            continue  # degenerate: dropped
        diff_node = obj.find("difficult")
        is_difficult = diff_node is not None and (diff_node.text or "0").strip() not in ("0", "")
        boxes.append((cx1, cy1, cx2, cy2))
        labels.append(class_to_idx[name])
        difficult.append(is_difficult)
    ann = Annotation(
        image_id=image_id,
        image_path=image_path,
        width=width,
        height=height,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        difficult=np.asarray(difficult, dtype=bool),
    )
    return ann, fixed


def read_split(root: Path, year: int | str, split: str) -> tuple[Path, list[str]]:
    base = Path(root) / "VOCdevkit" / f"VOC{year}"
    ids_file = base / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        what = "data root" if not Path(root).exists() else ("VOCdevkit folder" if not base.exists() else "split file")
        raise DataError(f"VOC {what} not found: {ids_file} does not exist. {LAYOUT_HELP}")
    ids = [line.split()[0] for line in ids_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"split file {ids_file} lists no image ids")
    return base, ids


class VOCDataset(Dataset):
    """VOC-format detection data set over one or more (year, split) pairs.

    The id in ImageSets names both the annotation and the image (the XML ``<filename>`` is not used).
    All annotations are parsed up front, so malformed files are reported before training starts.
    Each item is ``(image uint8 CHW tensor, target dict)``; targets carry normalised ``boxes`` (after the
    transform), 0-based ``labels``, ``difficult``, and for evaluation ``voc_boxes`` in original pixels.
    """

    def __init__(self, root: str | Path, sets: list[tuple[int | str, str]], classes: tuple[str, ...],
                 transform: A.Compose, keep_difficult: bool = True, skip_bad_samples: bool = False):
        self.transform = transform
        self.skip_bad_samples = skip_bad_samples
        class_to_idx = {c: i for i, c in enumerate(classes)}
        self.items: list[Annotation] = []
        self.skipped: list[str] = []
        fixed = 0
        for year, split in sets:
            base, ids = read_split(Path(root), year, split)
            for image_id in track(ids, description=f"reading VOC{year} {split} annotations", disable=len(ids) < 2000):
                xml = base / "Annotations" / f"{image_id}.xml"
                img = base / "JPEGImages" / f"{image_id}.jpg"
                try:
                    if not img.is_file():
                        raise DataError(f"{img}: image listed in {split}.txt is missing")
                    ann, n_fixed = parse_voc_xml(xml, img, image_id, class_to_idx)
                except DataError as err:
                    if not skip_bad_samples or "unknown class" in str(err):
                        raise
                    self.skipped.append(str(err))
                    warnings.warn(f"skipping bad sample: {err}", stacklevel=2)
                    continue
                fixed += n_fixed
                if not keep_difficult:
                    keep = ~ann.difficult
                    ann.boxes, ann.labels, ann.difficult = ann.boxes[keep], ann.labels[keep], ann.difficult[keep]
                self.items.append(ann)
        if fixed:
            warnings.warn(f"{fixed} degenerate or out-of-image boxes were clipped or dropped", stacklevel=2)
        if self.skipped:
            warnings.warn(f"{len(self.skipped)} bad samples skipped (--data.skip_bad_samples true)", stacklevel=2)
        if not self.items:
            raise DataError(f"no usable samples in {root} for sets {sets}")

    def __len__(self) -> int:
        return len(self.items)

    def load_image(self, ann: Annotation) -> np.ndarray | None:
        img = cv2.imread(str(ann.image_path), cv2.IMREAD_COLOR)
        if img is None:
            msg = f"{ann.image_path}: unreadable or corrupt image"
            if not self.skip_bad_samples:
                raise DataError(msg + " (use --data.skip_bad_samples true to skip such samples)")
            warnings.warn(f"skipping bad sample: {msg}", stacklevel=2)
            return None
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

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


def collate(batch: list) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Stack images (uint8) and keep targets as a list; samples skipped as bad (None) are dropped."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.zeros((0, 3, 1, 1), dtype=torch.uint8), []
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


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


class VOCDataModule(pl.LightningDataModule):
    """VOC-format data: PASCAL VOC itself, any data set in its layout, or the embedded synthetic set.

    Args:
        root: folder holding ``VOCdevkit/``.
        train_sets: (year, split) pairs to train on, e.g. ``[[2007, trainval], [2012, trainval]]``.
        test_set: (year, split) to test on, e.g. ``[2007, test]``.
        classes: class names (background excluded); the model's ``num_classes`` follows this list.
        val_set: (year, split) for validation during training; defaults to ``test_set``.
        image_size: network input side (300 or 512).
        batch_size: the *global* batch size, split evenly over all devices and nodes (an error if it does not
            divide). The learning rate in each experiment is tuned for the batch size stated beside it; when you
            change the global batch, scale the learning rate linearly with it (Goyal et al. 2017) and keep the
            warm-up.
        download: fetch PASCAL VOC with torchvision's downloader when missing (years 2007 and 2012).
        keep_difficult_train: train on objects flagged difficult too (off in the SSD recipe).
        skip_bad_samples: warn and skip malformed annotations / unreadable images instead of stopping.
        synthetic: when set and ``root`` holds no data set yet, generate the synthetic one there.
        zoom_out: largest zoom-out ratio of the augmentation (1 disables it).
        augment: training augmentation policy, "ssd" (the paper's) or "light" (photometric + flip only).
    """

    def __init__(
        self,
        root: str = "data/VOC",
        train_sets: list[tuple[int, str]] = ((2007, "trainval"), (2012, "trainval")),
        test_set: tuple[int, str] = (2007, "test"),
        classes: list[str] = VOC_CLASSES,
        val_set: tuple[int, str] | None = None,
        image_size: int = 300,
        batch_size: int = 32,
        num_workers: int = 4,
        download: bool = False,
        keep_difficult_train: bool = False,
        skip_bad_samples: bool = False,
        synthetic: SyntheticSpec | None = None,
        zoom_out: float = 4.0,
        augment: str = "ssd",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        self.classes = tuple(classes)
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise DataError(f"classes must be a non-empty list of unique names, got {list(classes)}")
        self.train_sets = [tuple(s) for s in train_sets]
        self.test_set = tuple(test_set)
        self.val_set = tuple(val_set) if val_set is not None else self.test_set

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
                if not (self.root / "VOCdevkit" / f"VOC{year}" / "ImageSets" / "Main" / f"{split}.txt").is_file():
                    VOCDetection(str(self.root), year=str(year), image_set=split, download=True)

    def _dataset(self, sets, train: bool) -> VOCDataset:
        transform = ssd_train_transform(self.hparams.image_size, self.hparams.zoom_out, self.hparams.augment) if train else ssd_eval_transform(self.hparams.image_size)
        return VOCDataset(self.root, sets, self.classes, transform,
                          keep_difficult=self.hparams.keep_difficult_train if train else True,
                          skip_bad_samples=self.hparams.skip_bad_samples)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and not hasattr(self, "train_ds"):
            self.train_ds = self._dataset(self.train_sets, train=True)
            self.val_ds = self._dataset([self.val_set], train=False)
        if stage in ("test", "validate", None) and not hasattr(self, "test_ds"):
            self.test_ds = self._dataset([self.test_set], train=False)
            if not hasattr(self, "val_ds"):
                self.val_ds = self.test_ds if self.val_set == self.test_set else self._dataset([self.val_set], train=False)

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
        if train:
            sampler = TrainSampler(ds, batch_size=batch, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
        else:
            sampler = EvalSampler(ds)
        return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=nw, collate_fn=collate,
                          pin_memory=torch.cuda.is_available(), persistent_workers=nw > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_ds, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_ds, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_ds, train=False)

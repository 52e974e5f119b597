"""Image classification data for the VGG16 rows of paper A: CIFAR-10 and GTSRB, in torchvision's on-disk layouts.

* CIFAR-10 (``torchvision.datasets.CIFAR10``): ``<root>/cifar-10-batches-py/{data_batch_1 ... data_batch_5,
  test_batch, batches.meta}`` (Python pickles). Read here directly (torchvision's class insists on the official
  files' checksums); ``--data.download true`` fetches them with torchvision's downloader.
* GTSRB (``torchvision.datasets.GTSRB``): ``<root>/gtsrb/GTSRB/Training/<class:05d>/*.ppm`` and
  ``<root>/gtsrb/GTSRB/Final_Test/Images/*.ppm`` with ``<root>/gtsrb/GT-final_test.csv`` (read by torchvision's
  class; ``--data.download true`` fetches them). The validation split holds out whole tracks (``split_groups``).

Batches are ``(uint8 N x 3 x S x S, int64 labels)``; the module normalises on the device. Training augmentation:
CIFAR's pad-4-and-crop + horizontal flip; GTSRB's resize to ``image_size`` only (no flip: signs are not symmetric).
Every random draw comes from the sample's own seed (``TrainSampler``), so a resumed run sees the same images.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.samplers import EvalSampler, TrainSampler
from datamodules.transforms import init_loader_worker, opencv_one_thread
from datamodules.voc import DataError, check_loader_args

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_LAYOUT = ("Expected layout (torchvision.datasets.CIFAR10): <root>/cifar-10-batches-py/{data_batch_1 ... "
                "data_batch_5, test_batch, batches.meta}; --data.download true fetches it")
GTSRB_LAYOUT = ("Expected layout (torchvision.datasets.GTSRB): <root>/gtsrb/GTSRB/Training/<class>/*.ppm, "
                "<root>/gtsrb/GTSRB/Final_Test/Images/*.ppm and <root>/gtsrb/GT-final_test.csv; "
                "--data.download true fetches it")


class ImageArrayDataset(Dataset):
    """Images (uint8 HWC arrays, or paths read on access) and labels; keys are indices or ``(index, seed)``."""

    def __init__(self, images, labels: np.ndarray, size: int, augment: str):
        self.images, self.labels, self.size, self.augment = images, np.asarray(labels, np.int64), size, augment

    def __len__(self) -> int:
        return len(self.labels)

    def _image(self, i: int) -> np.ndarray:
        img = self.images[i]
        if isinstance(img, (str, Path)):
            arr = cv2.imread(str(img), cv2.IMREAD_COLOR)
            if arr is None:
                raise DataError(f"{img}: unreadable or corrupt image")
            img = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
        if img.shape[:2] != (self.size, self.size):
            img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return img

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        img = self._image(index)
        if seed is not None and self.augment == "crop_flip":  # pad 4, random crop, random horizontal flip
            rng = np.random.default_rng(seed)
            padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
            y, x = rng.integers(0, 9, size=2)
            img = padded[y:y + self.size, x:x + self.size]
            if rng.random() < 0.5:
                img = img[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), int(self.labels[index])


def _collate(batch):
    images, labels = zip(*batch)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


class ClassificationDataModule(pl.LightningDataModule):
    """Shared: the validation split carved from training data, ``train_limit``, samplers and loaders. A subclass
    reads its format (``read_split``) and names its classes (``model_classes``)."""

    augment = "crop_flip"

    def __init__(self, root: str, download: bool = False, image_size: int = 32, val_fraction: float = 0.1,
                 val_seed: int = 0, train_limit: int | None = None, batch_size: int = 128, num_workers: int = 4):
        super().__init__()
        self.save_hyperparameters()
        check_loader_args(batch_size, num_workers)
        self.root = Path(root)
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.val_is_test = val_fraction == 0
        self.classes = tuple(self.model_classes({"root": root}))
        if not download:  # stops here, before a run starts logging (with download, prepare_data fetches it)
            self.check_layout()

    @classmethod
    def model_classes(cls, init_args: dict) -> list[str]:
        raise NotImplementedError

    def check_layout(self) -> None:
        """Raise a ``DataError`` naming the first missing file or folder of the format's layout (existence only;
        ``read_split`` reads and checks the contents)."""
        raise NotImplementedError

    def read_split(self, train: bool) -> tuple[list, np.ndarray]:
        raise NotImplementedError

    def split_groups(self, images: list) -> list | None:
        """A key per training image; images with one key stay on one side of the validation split (GTSRB's tracks:
        30 frames of one physical sign). ``None``: every image on its own."""
        return None

    def validation_split(self, images: list, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(validation, training) indices: ``n`` images of a permutation seeded by ``val_seed`` alone, or, where the
        images come in groups (``split_groups``), whole groups in the order the permutation meets them until at
        least ``n`` images are held out, so that no group is on both sides."""
        order = np.random.default_rng(self.hparams.val_seed).permutation(len(images))
        groups = self.split_groups(images)
        if groups is None or n == 0:
            return order[:n], order[n:]
        members: dict = {}
        for i in order:
            members.setdefault(groups[i], []).append(i)
        val: list[int] = []
        for group in members.values():
            if len(val) >= n:
                break
            val.extend(group)
        held = set(val)
        train = np.array([i for i in order if i not in held], dtype=np.int64)
        if not len(train):
            raise DataError(f"data.val_fraction {self.hparams.val_fraction} of {len(images)} training images in "
                            f"{len(members)} groups (tracks) leaves no training images")
        return np.array(val, dtype=np.int64), train

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in ("fit", "validate", None) and not hasattr(self, "train_ds"):
            images, labels = self.read_split(train=True)
            n_val = round(hp.val_fraction * len(labels)) if hp.val_fraction > 0 else 0
            if hp.val_fraction > 0 and not 0 < n_val < len(labels):
                raise DataError(f"data.val_fraction {hp.val_fraction} of {len(labels)} training images leaves no "
                                "validation or no training images")
            val_idx, train_idx = self.validation_split(images, n_val)
            n_val = len(val_idx)
            if hp.train_limit:  # the first N of a fixed seeded order: quick runs on a stable subset
                train_idx = train_idx[: hp.train_limit]
            pick = lambda idx: ([images[i] for i in idx], labels[idx])  # noqa: E731
            self.train_ds = ImageArrayDataset(*pick(train_idx), hp.image_size, self.augment)
            if n_val:
                self.val_ds = ImageArrayDataset(*pick(val_idx), hp.image_size, "none")
        if stage in ("test", "fit", "validate", None) and not hasattr(self, "test_ds"):
            self.test_ds = ImageArrayDataset(*self.read_split(train=False), hp.image_size, "none")
        if not hasattr(self, "val_ds") and hasattr(self, "test_ds"):
            self.val_ds = self.test_ds  # monitoring only (val_is_test): nothing may choose on it

    def per_device_batch_size(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.hparams.batch_size % world:
            raise DataError(f"data.batch_size {self.hparams.batch_size} is the global batch size and must divide "
                            f"evenly over {world} processes")
        return self.hparams.batch_size // world

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        nw, batch = self.hparams.num_workers, self.per_device_batch_size()
        if nw > 0:
            opencv_one_thread()  # before the workers fork (``opencv_one_thread``)
        sampler = TrainSampler(ds, batch_size=batch, seed=int(os.environ.get("PL_GLOBAL_SEED", 0))) if train \
            else EvalSampler(ds)
        return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=nw, collate_fn=_collate,
                          pin_memory=torch.cuda.is_available(), persistent_workers=nw > 0,
                          worker_init_fn=init_loader_worker if nw > 0 else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_ds, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_ds, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_ds, False)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path} not found. {CIFAR_LAYOUT}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError) as err:
        raise DataError(f"{path}: not a CIFAR batch file ({type(err).__name__}: {err})") from err


class CIFAR10DataModule(ClassificationDataModule):
    """CIFAR-10 (50,000 training / 10,000 test images of 32x32, 10 classes), torchvision's layout (``CIFAR_LAYOUT``).

    Args:
        root: the folder holding ``cifar-10-batches-py/``.
        download: fetch it with torchvision's downloader when missing.
        val_fraction, val_seed: the validation split carved from the training images (a fixed seeded permutation).
        train_limit: train on the first N images of a fixed seeded order (quick runs).
    """

    def __init__(self, root: str = "data/cifar10", download: bool = False, image_size: int = 32,
                 val_fraction: float = 0.1, val_seed: int = 0, train_limit: int | None = None, batch_size: int = 128,
                 num_workers: int = 4):
        super().__init__(root, download, image_size, val_fraction, val_seed, train_limit, batch_size, num_workers)

    @classmethod
    def model_classes(cls, init_args: dict) -> list[str]:
        meta = Path(init_args.get("root", "data/cifar10")) / "cifar-10-batches-py" / "batches.meta"
        return list(_unpickle(meta)["label_names"]) if meta.is_file() else list(CIFAR10_CLASSES)

    def prepare_data(self) -> None:
        if self.hparams.download:
            from torchvision.datasets import CIFAR10

            CIFAR10(str(self.root), train=True, download=True)

    def check_layout(self) -> None:
        folder = self.root / "cifar-10-batches-py"
        for path in (folder, *(folder / f"data_batch_{i}" for i in range(1, 6)), folder / "test_batch"):
            if not path.exists():
                raise DataError(f"{path} not found. {CIFAR_LAYOUT}")

    def read_split(self, train: bool) -> tuple[list, np.ndarray]:
        folder = self.root / "cifar-10-batches-py"
        if not folder.is_dir():
            raise DataError(f"{folder} not found. {CIFAR_LAYOUT}")
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        images, labels = [], []
        for name in names:
            batch = _unpickle(folder / name)
            data, lab = batch.get("data"), batch.get("labels", batch.get("fine_labels"))
            if data is None or lab is None or len(data) != len(lab):
                raise DataError(f"{folder / name}: no matching 'data' and 'labels' (not a CIFAR-10 batch)")
            images.append(np.asarray(data, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(lab, np.int64))
        labels = np.concatenate(labels)
        if labels.min() < 0 or labels.max() >= len(self.classes):
            raise DataError(f"{folder}: labels outside 0..{len(self.classes) - 1}")
        return list(np.concatenate(images)), labels


class GTSRBDataModule(ClassificationDataModule):
    """GTSRB (39,209 training / 12,630 test images of 15-250 px, 43 classes), torchvision's layout
    (``GTSRB_LAYOUT``), every image resized to ``image_size``; no flips."""

    augment = "none"

    def __init__(self, root: str = "data/gtsrb", download: bool = False, image_size: int = 32,
                 val_fraction: float = 0.1, val_seed: int = 0, train_limit: int | None = None, batch_size: int = 128,
                 num_workers: int = 4):
        super().__init__(root, download, image_size, val_fraction, val_seed, train_limit, batch_size, num_workers)

    @classmethod
    def model_classes(cls, init_args: dict) -> list[str]:
        from datamodules.gtsdb import GTSRB_CLASSES

        return list(GTSRB_CLASSES)

    def prepare_data(self) -> None:
        if self.hparams.download:
            from torchvision.datasets import GTSRB

            for split in ("train", "test"):
                GTSRB(str(self.root), split=split, download=True)

    def check_layout(self) -> None:
        base = self.root / "gtsrb"
        for path in (base, base / "GTSRB" / "Training", base / "GTSRB" / "Final_Test" / "Images",
                     base / "GT-final_test.csv"):
            if not path.exists():
                raise DataError(f"{path} not found. {GTSRB_LAYOUT}")

    def split_groups(self, images: list) -> list:
        """GTSRB's training images are tracks, 30 frames of one physical sign each (``<track>_<frame>.ppm`` in
        the class folder): a frame in validation whose neighbours are trained on measures nothing, so a track is
        held out whole. (Files named otherwise: the part of the name before its last ``_``.)"""
        return [(Path(p).parent.name, Path(p).stem.rsplit("_", 1)[0]) for p in images]

    def read_split(self, train: bool) -> tuple[list, np.ndarray]:
        from torchvision.datasets import GTSRB

        try:
            ds = GTSRB(str(self.root), split="train" if train else "test")
        except (RuntimeError, FileNotFoundError, ValueError, IndexError, KeyError) as err:
            raise DataError(f"GTSRB {'training' if train else 'test'} split not readable under {self.root}: {err}. "
                            f"{GTSRB_LAYOUT}") from err
        if not ds._samples:
            raise DataError(f"GTSRB {'training' if train else 'test'} split under {self.root} has no images. "
                            f"{GTSRB_LAYOUT}")
        paths, labels = zip(*ds._samples)
        if train:  # torchvision numbers the class folders it finds; the folder name is the GTSRB class id
            labels = [int(Path(p).parent.name) for p in paths]
        labels = np.asarray(labels, np.int64)
        if labels.min() < 0 or labels.max() >= len(self.classes):
            raise DataError(f"GTSRB under {self.root}: class ids outside 0..{len(self.classes) - 1}")
        return list(paths), labels

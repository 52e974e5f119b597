"""A real classification set in GTSRB's on-disk layout, cut from the facemask detection set.

No classification data set can be downloaded on the project's CPU machine, so the classification rows are measured
on this stand-in: every face box of ``../shared/data/facemask`` (a real VOC-format set) is cropped with a margin and
written as torchvision's GTSRB layout (``<out>/gtsrb/GTSRB/Training/<class:05d>/*.ppm``,
``<out>/gtsrb/GTSRB/Final_Test/Images/*.ppm`` + ``<out>/gtsrb/GT-final_test.csv``), so that
``experiments/gtsrb_vgg16.yaml`` and ``GTSRBDataModule`` run on it unchanged. Classes 0, 1, 2 are with_mask,
without_mask, mask_weared_incorrect (the model keeps GTSRB's 43 outputs; the other 40 are never a label). Training
crops come from the detection set's ``trainval`` split and test crops from its ``test`` split, so no photo is in
both.

    python -m benchmarks.facemask_crops --root ../shared/data/facemask --out runs/data/facemask_crops
    python train.py --config experiments/gtsrb_vgg16.yaml --data.root runs/data/facemask_crops ...

The crops are written under ``runs/`` (ignored by git): the data set stays outside the project.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from pathlib import Path

import cv2

from datamodules.voc import DataError, load_annotations

FACEMASK_CLASSES = ("with_mask", "without_mask", "mask_weared_incorrect")


def crop_box(img, box, margin: float):
    """The VOC box (1-based inclusive) grown by ``margin`` of its size on every side, clipped to the image."""
    h, w = img.shape[:2]
    x1, y1, x2, y2 = box[0] - 1, box[1] - 1, box[2], box[3]
    mx, my = margin * (x2 - x1), margin * (y2 - y1)
    x1, y1 = max(0, int(round(x1 - mx))), max(0, int(round(y1 - my)))
    x2, y2 = min(w, int(round(x2 + mx))), min(h, int(round(y2 + my)))
    return img[y1:y2, x1:x2]


def write_crops(root: str | Path, out: str | Path, margin: float = 0.15, min_side: int = 8,
                train_set=(2007, "trainval"), test_set=(2007, "test")) -> dict[str, Counter]:
    """Write the crops; return the number of crops per class for the training and the test split."""
    base = Path(out) / "gtsrb"
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True, exist_ok=True)
    counts = {"train": Counter(), "test": Counter()}
    rows = []
    for which, split in (("train", train_set), ("test", test_set)):
        items, _ = load_annotations(root, [split], FACEMASK_CLASSES)
        for ann in items:
            img = cv2.imread(str(ann.image_path), cv2.IMREAD_COLOR)
            if img is None:
                raise DataError(f"{ann.image_path}: not a readable image")
            for k, (box, label) in enumerate(zip(ann.boxes, ann.labels)):
                crop = crop_box(img, box, margin)
                if min(crop.shape[:2]) < min_side:
                    continue
                name = f"{ann.image_id}_{k:03d}.ppm"
                if which == "train":
                    folder = base / "GTSRB" / "Training" / f"{int(label):05d}"
                    folder.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(folder / name), crop)
                else:
                    cv2.imwrite(str(test_dir / name), crop)
                    h, w = crop.shape[:2]
                    rows.append([name, w, h, 0, 0, w - 1, h - 1, int(label)])
                counts[which][FACEMASK_CLASSES[int(label)]] += 1
    with open(base / "GT-final_test.csv", "w", newline="") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        writer.writerows(rows)
    return counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="../shared/data/facemask", help="the VOC-format facemask set")
    p.add_argument("--out", default="runs/data/facemask_crops")
    p.add_argument("--margin", type=float, default=0.15, help="context around each box, as a fraction of its size")
    p.add_argument("--min_side", type=int, default=8, help="crops smaller than this (pixels) are left out")
    args = p.parse_args(argv)
    counts = write_crops(args.root, args.out, args.margin, args.min_side)
    for which, c in counts.items():
        print(f"{which}: {sum(c.values())} crops ({', '.join(f'{k} {v}' for k, v in sorted(c.items()))})")


if __name__ == "__main__":
    main()

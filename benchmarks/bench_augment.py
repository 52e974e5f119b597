"""SSD training augmentation throughput per worker (one process, one thread) on VOC-sized JPEGs
(500 x 375): JPEG decode + our albumentations policy vs torchvision's v2 SSD policy from
torchvision/references/detection (RandomPhotometricDistort, RandomZoomOut, RandomIoUCrop, flip, resize).

python -m benchmarks.bench_augment [--images 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.io import decode_jpeg, read_file
from torchvision.transforms import v2

from benchmarks.common import median_time, row
from datamodules.transforms import ssd_train_transform


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp())
    paths, boxes = [], []
    for i in range(args.images):
        img = cv2.GaussianBlur(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8), (0, 0), 2)
        p = tmp / f"{i}.jpg"
        cv2.imwrite(str(p), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(p)
        xy = rng.uniform(0, 300, (3, 2))
        boxes.append(np.concatenate([xy, xy + rng.uniform(20, 190, (3, 2))], 1).astype(np.float32))
    ours_t = ssd_train_transform(300)

    def ours():
        for p, b in zip(paths, boxes):
            img = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
            ours_t(image=img, bboxes=b, labels=[0, 1, 2], difficult=[False] * 3)

    tv_t = v2.Compose([v2.RandomPhotometricDistort(p=1), v2.RandomZoomOut(fill={tv_tensors.Image: (123, 117, 104), "others": 0}),
                       v2.RandomIoUCrop(), v2.RandomHorizontalFlip(p=0.5), v2.Resize((300, 300)), v2.SanitizeBoundingBoxes()])

    def tv():
        for p, b in zip(paths, boxes):
            img = tv_tensors.Image(decode_jpeg(read_file(str(p))))
            bb = tv_tensors.BoundingBoxes(torch.from_numpy(b), format="XYXY", canvas_size=(375, 500))
            tv_t(img, {"boxes": bb, "labels": torch.zeros(3, dtype=torch.long)})

    t_ours = median_time(ours, args.repeats)
    t_tv = median_time(tv, args.repeats)
    print(row("pipeline (decode + augment, 1 worker)", "images/s"))
    print(row("ours (albumentations + MinIoURandomCrop/ZoomOut)", f"{args.images / t_ours:.0f}"))
    print(row("torchvision v2 SSD reference policy", f"{args.images / t_tv:.0f}"))
    print(f"ratio ours/torchvision: {t_tv / t_ours:.2f}x")


if __name__ == "__main__":
    main()

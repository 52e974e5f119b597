"""SSD training augmentation throughput per worker (one process, one thread): JPEG decode + a training policy, what
one DataLoader worker does per image.

Rows: ours (SSD policy: zoom-out + min-IoU crop + resize as one warp, flip, photometric distortion), the same policy
with the photometric distortion first, on the full image (ours before the thirty-third session), the same policy as
three separate steps (zoom-out canvas, crop, resize: ours before the fused warp), our ``light`` policy (the CPU demo's)
with the distortion last and first, and torchvision's v2 SSD policy from torchvision/references/detection
(RandomPhotometricDistort, RandomZoomOut, RandomIoUCrop, flip, resize).

    python -m benchmarks.bench_augment [--images 200] [--repeats 3]            # VOC-sized (500 x 375) JPEGs it writes
    python -m benchmarks.bench_augment --size 1360x800                         # GTSDB-sized (COCO: 640x480)
    python -m benchmarks.bench_augment --voc-root ../shared/data/facemask      # a real VOC-format set's trainval

With ``--voc-root`` our rows run ``VOCDataset.__getitem__`` itself (decode, EXIF orientation, boxes, transform,
tensors), so the figure is a worker's real cost per sample.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.io import decode_jpeg, read_file
from torchvision.transforms import v2

from benchmarks.common import median_time, median_times, row
from datamodules.transforms import MinIoURandomCrop, ZoomOut, _bbox_params, ssd_train_transform


NUMPY_RGB = "ours (SSD policy), RGB by numpy's reversed copy (before)"


def three_step_policy(size: int = 300) -> A.Compose:
    """The SSD policy as it was before ``ZoomOutCropResize``: the zoomed-out canvas and the crop are built."""
    return A.Compose([A.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05, p=0.5),
                      A.ChannelShuffle(p=0.05), ZoomOut(p=0.5), MinIoURandomCrop(), A.HorizontalFlip(p=0.5),
                      A.Resize(size, size, interpolation=cv2.INTER_LINEAR)], bbox_params=_bbox_params())


def photometric_first(policy: A.Compose) -> A.Compose:
    """``policy`` with its photometric distortion (ColorJitter, ChannelShuffle) moved to the front, on the full-size
    image: our policies before the thirty-third session."""
    photometric = [t for t in policy.transforms if isinstance(t, (A.ColorJitter, A.ChannelShuffle))]
    rest = [t for t in policy.transforms if not isinstance(t, (A.ColorJitter, A.ChannelShuffle))]
    return A.Compose([*photometric, *rest], bbox_params=_bbox_params())


def synthetic_items(n: int, width: int = 500, height: int = 375) -> tuple[list[Path], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp())
    paths, boxes = [], []
    for i in range(n):
        img = cv2.GaussianBlur(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), (0, 0), 2)
        p = tmp / f"{i}.jpg"
        cv2.imwrite(str(p), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(p)
        xy = rng.uniform(0, 0.6, (3, 2)) * (width, height)
        boxes.append(np.concatenate([xy, xy + rng.uniform(0.04, 0.38, (3, 2)) * (width, height)], 1).astype(np.float32))
    return paths, boxes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the generated JPEGs (without --voc-root)")
    ap.add_argument("--voc-root", help="a VOC-format set (VOCdevkit/VOC2007 inside): time its trainval images")
    ap.add_argument("--classes", help="comma-separated class names of --voc-root (default: its classes.txt)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    policies = {"ours (SSD policy, zoom-out + crop + resize in one warp)": ssd_train_transform(300),
                "ours before: the same policy in three steps (canvas, crop, resize)": three_step_policy(300),
                "ours, light policy (the CPU demo's: no zoom-out or crop)": ssd_train_transform(300, policy="light"),
                "ours (SSD policy), photometric distortion first, on the full image (before)":
                    photometric_first(ssd_train_transform(300)),
                "ours, light policy, photometric distortion first (before)":
                    photometric_first(ssd_train_transform(300, policy="light"))}

    if args.voc_root:
        from datamodules.voc import VOCDataset, apply_orientation

        root = Path(args.voc_root)
        classes = tuple(args.classes.split(",") if args.classes else (root / "classes.txt").read_text().split())
        ds = VOCDataset(root, [(2007, "trainval")], classes, policies[next(iter(policies))])
        ds.items = ds.items[: args.images]
        paths = [a.image_path for a in ds.items]
        boxes = [a.boxes.astype(np.float32) - np.array([1, 1, 0, 0], np.float32) for a in ds.items]
        where = f"{len(ds)} trainval images of {root} (VOCDataset.__getitem__)"

        def run(policy):
            def go():
                ds.transform = policy
                return [ds[(i, i)] for i in range(len(ds))]
            return go
    else:
        width, height = (int(v) for v in args.size.lower().split("x"))
        paths, boxes = synthetic_items(args.images, width, height)
        where = f"{len(paths)} generated {width} x {height} JPEGs (decode + transform)"

        def run(policy):
            def go():
                for i, (p, b) in enumerate(zip(paths, boxes)):
                    policy.set_random_state(np.random.default_rng(i), random.Random(i))
                    img = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
                    policy(image=img, bboxes=b, labels=[0] * len(b), difficult=[False] * len(b))
            return go

    tv_t = v2.Compose([v2.RandomPhotometricDistort(p=1), v2.RandomZoomOut(fill={tv_tensors.Image: (123, 117, 104), "others": 0}),
                       v2.RandomIoUCrop(), v2.RandomHorizontalFlip(p=0.5), v2.Resize((300, 300)), v2.SanitizeBoundingBoxes()])

    def tv():
        for p, b in zip(paths, boxes):
            img = tv_tensors.Image(decode_jpeg(read_file(str(p))))
            bb = tv_tensors.BoundingBoxes(torch.from_numpy(b), format="XYXY", canvas_size=tuple(img.shape[-2:]))
            tv_t(img, {"boxes": bb, "labels": torch.zeros(len(b), dtype=torch.long)})

    n = len(paths)
    # our rows in turn (each repeat times every policy once), so that the shared machine's slow spells fall alike
    times = median_times({label: run(policy) for label, policy in policies.items()}, args.repeats)
    times["torchvision v2 SSD reference policy"] = median_time(tv, args.repeats)
    if args.voc_root:  # the loader's BGR -> RGB as it was before the seventeenth session: numpy's reversed-stride copy
        def load_image_before(ann):
            img = cv2.imread(str(ann.image_path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
            return np.ascontiguousarray(apply_orientation(img, ann.orientation)[..., ::-1])

        ds.load_image = load_image_before
        times[NUMPY_RGB] = median_time(
            run(policies["ours (SSD policy, zoom-out + crop + resize in one warp)"]), args.repeats)
    print(f"{where}; 1 process, 1 thread; medians of {args.repeats}, our policies timed in turn\n")
    print(row("pipeline (decode + augment, 1 worker)", "ms / image", "images/s"))
    print(row("---", "---", "---"))
    for label, t in times.items():
        print(row(label, f"{t / n * 1e3:.2f}", f"{n / t:.0f}"))
    ours, before, light, ours_first, light_first, tvt = list(times.values())[:6]
    print(f"\nours vs the three steps: {before / ours:.2f}x; ours vs torchvision: {tvt / ours:.2f}x")
    print(f"distortion last vs first: SSD policy {ours_first / ours:.2f}x, light policy {light_first / light:.2f}x")
    if args.voc_root:
        print(f"ours vs the numpy RGB copy (before): {times[NUMPY_RGB] / ours:.2f}x")


if __name__ == "__main__":
    main()

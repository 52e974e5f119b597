"""VOC mAP on VOC07-test scale (4,952 images x 100 detections, 20 classes): ours vs torchmetrics
``MeanAveragePrecision(backend="faster_coco_eval")`` on the same inputs, in one run.

python -m benchmarks.bench_metric [--images 4952] [--dets 100] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch
from torchmetrics.detection import MeanAveragePrecision

from benchmarks.common import median_time, row
from lightning_modules.metrics import VOCMeanAveragePrecision


def make_data(n_img: int, n_det: int, n_cls: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(n_img):
        ng = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.rand(ng, 2, generator=g) * 400
        wh = torch.rand(ng, 2, generator=g) * 150 + 10
        gt = torch.cat([xy, xy + wh], 1).round()
        gl = torch.randint(0, n_cls, (ng,), generator=g)
        src = torch.randint(0, ng, (n_det,), generator=g)
        db = gt[src] + torch.randn(n_det, 4, generator=g) * 12
        db[:, 2:] = torch.maximum(db[:, 2:], db[:, :2] + 1)
        dl = torch.where(torch.rand(n_det, generator=g) < 0.7, gl[src], torch.randint(0, n_cls, (n_det,), generator=g))
        preds.append({"boxes": db, "scores": torch.rand(n_det, generator=g), "labels": dl})
        targets.append({"boxes": gt, "labels": gl, "difficult": torch.rand(ng, generator=g) < 0.1})
    return preds, targets


def run(metric_factory, preds, targets, batch: int = 32):
    def go():
        m = metric_factory()
        for i in range(0, len(preds), batch):
            m.update(preds[i:i + batch], targets[i:i + batch])
        return m.compute()
    return go


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4952)
    ap.add_argument("--dets", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    preds, targets = make_data(args.images, args.dets)
    coco_t = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    ours = median_time(run(lambda: VOCMeanAveragePrecision(20), preds, targets), args.repeats)
    ref = median_time(run(lambda: MeanAveragePrecision(backend="faster_coco_eval", max_detection_thresholds=[1, 10, 100]),
                          preds, coco_t), args.repeats, warmup=0)
    print(row("metric", "images x dets", "median s"))
    print(row("ours: VOCMeanAveragePrecision (update + compute)", f"{args.images} x {args.dets}", f"{ours:.2f}"))
    print(row("torchmetrics MeanAveragePrecision (faster_coco_eval)", f"{args.images} x {args.dets}", f"{ref:.2f}"))
    print(f"speed-up: {ref / ours:.1f}x")


if __name__ == "__main__":
    main()

"""One SSD300 training step (forward, loss, backward, SGD step) at the same batch: our SSD300 + MultiBoxLoss
vs torchvision's ``ssd300_vgg16`` in training mode (which computes its own loss), in one run.

python -m benchmarks.bench_train_step [--batch 4] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch
import torchvision

from benchmarks.common import median_time, row
from lightning_modules.box_ops import MultiBoxLoss
from lightning_modules.ssd import build_ssd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.rand(args.batch, 3, 300, 300, device=dev)
    boxes = [torch.tensor([[0.1, 0.2, 0.5, 0.7], [0.4, 0.1, 0.9, 0.5]], device=dev) for _ in range(args.batch)]
    labels = [torch.tensor([3, 7], device=dev) for _ in range(args.batch)]

    ours = build_ssd(300, 21).to(dev).train()
    loss_fn = MultiBoxLoss()
    opt_o = torch.optim.SGD(ours.parameters(), lr=1e-4, momentum=0.9)
    tgt_o = [{"boxes": b, "labels": lbl - 1} for b, lbl in zip(boxes, labels)]

    def step_ours():
        loc, conf = ours(images)
        loss = loss_fn(loc, conf, ours.priors, tgt_o)["loss"]
        opt_o.zero_grad(set_to_none=True)
        loss.backward()
        opt_o.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    tv = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21).to(dev).train()
    opt_t = torch.optim.SGD(tv.parameters(), lr=1e-4, momentum=0.9)
    tgt_t = [{"boxes": b * 300, "labels": lbl} for b, lbl in zip(boxes, labels)]
    tv_images = list(images)

    def step_tv():
        losses = tv(tv_images, tgt_t)
        loss = sum(losses.values())
        opt_t.zero_grad(set_to_none=True)
        loss.backward()
        opt_t.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t_o = median_time(step_ours, args.repeats)
    t_t = median_time(step_tv, args.repeats)
    print(row("SSD300 train step", "batch", "device", "median s"))
    print(row("ours", args.batch, args.device, f"{t_o:.3f}"))
    print(row("torchvision ssd300_vgg16", args.batch, args.device, f"{t_t:.3f}"))
    print(f"ratio torchvision/ours: {t_t / t_o:.2f}x (> 1: ours is faster)")


if __name__ == "__main__":
    main()

"""The training data pipeline alone: how many images per second ``VOCDataModule.train_dataloader`` delivers, with
and without the copy of each batch to the device (Lightning's ``batch_to_device``), for several worker counts.

It answers the question ``summary.json``'s ``training`` raises when it says "limited by data loading": can the
loader feed the GPU at all, and does it scale with workers? If the loader alone is far faster than the fit, the
"wait" the run measured is not the workers' decoding and augmenting.

    python -m benchmarks.bench_loader                                    # the demo's synthetic set, batch 32
    python -m benchmarks.bench_loader --workers 2 --batch 8 --epochs 2   # a CPU-sized run
    python -m benchmarks.bench_loader --root ../shared/data/facemask --classes with_mask without_mask mask_weared_incorrect

Per epoch, the first batch is left out of the rate (it includes starting the workers' epoch), as
``callbacks/throughput.py`` does; medians over the epochs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from lightning_fabric.utilities.apply_func import move_data_to_device

from benchmarks.common import row
from datamodules.voc import SyntheticSpec, VOCDataModule


def epoch_rate(loader, device: torch.device | None) -> float:
    """Images per second over one epoch, the first batch left out; with ``device``, each batch is also copied
    there (non-blocking from pinned memory, as Lightning does) and the copy waited for."""
    n, start = 0, None
    for images, targets in loader:
        if device is not None:
            images, targets = move_data_to_device((images, targets), device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        if start is None:
            start = time.perf_counter()
            continue
        n += images.shape[0]
    return n / (time.perf_counter() - start) if n else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="data/synthetic", help="a VOC-format set; data/synthetic: the demo's")
    ap.add_argument("--classes", nargs="+", default=["circle", "square", "triangle", "star", "cross"])
    ap.add_argument("--workers", type=int, nargs="+", default=[4, 8, 15])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--augment", default="ssd", choices=("ssd", "light"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    synthetic = SyntheticSpec(num_train=800, num_test=200, seed=0) if args.root == "data/synthetic" else None
    print(f"{args.root}, batch {args.batch}, augment {args.augment}; {torch.get_num_threads()} CPU threads; "
          f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}; medians of {args.epochs} epochs\n")
    print(row("workers", "loader img/s", f"loader + copy to {dev.type} img/s"))
    print(row(*["---"] * 3))
    for nw in args.workers:
        dm = VOCDataModule(root=args.root, train_sets=[(2007, "trainval")], test_set=(2007, "test"),
                           classes=args.classes, batch_size=args.batch, num_workers=nw, synthetic=synthetic,
                           augment=args.augment)
        dm.prepare_data()
        dm.setup("fit")
        loader = dm.train_dataloader()  # persistent workers: started once, as in a fit
        rates = {}
        for key, device in (("alone", None), ("copy", dev)):
            rates[key] = statistics.median(epoch_rate(loader, device) for _ in range(args.epochs))
        print(row(nw, f"{rates['alone']:.0f}", f"{rates['copy']:.0f}"))
        del loader


if __name__ == "__main__":
    main()

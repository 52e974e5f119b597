"""The training data pipeline alone: how many images per second ``VOCDataModule.train_dataloader`` delivers, with
and without the copy of each batch to the device (Lightning's ``batch_to_device``), for several worker counts.

It answers the question ``summary.json``'s ``training`` raises when it says "limited by data loading": can the
loader feed the GPU at all, and does it scale with workers? If the loader alone is far faster than the fit, the
"wait" the run measured is not the workers' decoding and augmenting.

    python -m benchmarks.bench_loader                                    # the demo's synthetic set, batch 32
    python -m benchmarks.bench_loader --workers 2 --batch 8 --epochs 2   # a CPU-sized run
    python -m benchmarks.bench_loader --root ../shared/data/facemask --classes with_mask without_mask mask_weared_incorrect

Each worker count runs two loaders, epochs interleaved: the project's (targets packed by ``collate``:
``datamodules.targets.DetectionTargets``, one tensor per field) and the same with the targets as a list of per-image
dicts, as they were before (8 small tensors per image, each sent from the worker and copied to the device on its
own). Per epoch, the first batch is left out of the rate (it includes starting the workers' epoch), as
``callbacks/throughput.py`` does; medians over the epochs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader

from benchmarks.common import row
from datamodules.voc import SyntheticSpec, VOCDataModule


def collate_as_list(batch: list):
    """``collate`` as it was: the targets a list of per-image dicts (each sample's own tensors)."""
    images, targets = zip(*[b for b in batch if b is not None])
    return torch.stack(images), list(targets)


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
    print(row("workers", "packed img/s", "list of dicts img/s", "packed / list",
              f"packed + copy to {dev.type} img/s", f"list + copy to {dev.type} img/s"))
    print(row(*["---"] * 6))
    for nw in args.workers:
        dm = VOCDataModule(root=args.root, train_sets=[(2007, "trainval")], test_set=(2007, "test"),
                           classes=args.classes, batch_size=args.batch, num_workers=nw, synthetic=synthetic,
                           augment=args.augment)
        dm.prepare_data()
        dm.setup("fit")
        packed = dm.train_dataloader()  # persistent workers: started once, as in a fit
        as_list = DataLoader(packed.dataset, batch_size=packed.batch_size, sampler=packed.sampler, num_workers=nw,
                             collate_fn=collate_as_list, pin_memory=packed.pin_memory,
                             persistent_workers=packed.persistent_workers, worker_init_fn=packed.worker_init_fn)
        rates = {}
        for copy, device in (("alone", None), ("copy", dev)):
            for _ in range(args.epochs):  # interleaved, so that both see the same machine load
                for name, loader in (("packed", packed), ("list", as_list)):
                    rates.setdefault((name, copy), []).append(epoch_rate(loader, device))
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(row(nw, f"{med['packed', 'alone']:.0f}", f"{med['list', 'alone']:.0f}",
                  f"{med['packed', 'alone'] / med['list', 'alone']:.2f}x",
                  f"{med['packed', 'copy']:.0f}", f"{med['list', 'copy']:.0f}"))
        del packed, as_list

if __name__ == "__main__":
    main()

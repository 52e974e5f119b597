"""Surgery time on a full SSD300: removing filters down to paper A's SSD300 pruned-6det widths (Table 1) with
Torch-Pruning's dependency graph + our optimiser-state transfer, vs one dense SGD training step at batch 1 on the
same machine (to put the one-off cost in proportion), and dense vs pruned CPU latency / MACs.

python -m benchmarks.bench_surgery [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import median_time, row
from callbacks.report import model_stats
from callbacks.surgery import prune_filters
from lightning_modules.ssd import build_ssd

P6DET = {"conv1_2": 56, "conv2_1": 107, "conv2_2": 121, "conv3_1": 193, "conv3_2": 158, "conv3_3": 195,
         "conv4_1": 263, "conv4_2": 181, "conv4_3": 331, "conv5_1": 98, "conv5_2": 108, "conv5_3": 78,
         "conv6": 146, "conv7": 106, "conv8_1": 34, "conv8_2": 198, "conv9_1": 12, "conv9_2": 36,
         "conv10_1": 22, "conv10_2": 41, "conv11_1": 22, "conv11_2": 66}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    times = []
    for r in range(args.repeats):
        torch.manual_seed(r)
        model = build_ssd(300, 21)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        for p in model.parameters():
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        sel = {n: torch.randperm(c.out_channels)[: c.out_channels - P6DET[n]].tolist()
               for n, c in model.layers.items() if n in P6DET}
        t0 = time.perf_counter()
        prune_filters(model, sel, opt)
        times.append(time.perf_counter() - t0)
        assert model.channels == {**model.channels, **P6DET}
    dense = build_ssd(300, 21)
    x = torch.randn(1, 3, 300, 300)
    opt = torch.optim.SGD(dense.parameters(), lr=1e-4, momentum=0.9)

    def step():
        loc, conf = dense(x)
        (loc.abs().mean() + conf.abs().mean()).backward()
        opt.step()
        opt.zero_grad()

    t_step = median_time(step, 3)
    d, p = model_stats(build_ssd(300, 21), 300), model_stats(model, 300)
    print(row("SSD300 -> pruned-6det widths", "median s"))
    print(row("surgery (dependency graph + prune + optimizer state)", f"{statistics.median(times):.2f}"))
    print(row("one dense training step, batch 1 (for scale)", f"{t_step:.2f}"))
    print()
    print(row("model", "params", "MMACs", "size MB", "CPU latency ms (batch 1)"))
    print(row("SSD300 dense", d["params"], d["macs"] // 10**6, d["size_mb"], d["latency_ms"]))
    print(row("SSD300 pruned-6det widths", p["params"], p["macs"] // 10**6, p["size_mb"], p["latency_ms"]))
    print(f"size_x {d['size_mb'] / p['size_mb']:.2f}, macs_x {d['macs'] / p['macs']:.2f}, "
          f"speedup_x {d['latency_ms'] / p['latency_ms']:.2f}")


if __name__ == "__main__":
    main()

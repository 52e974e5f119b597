"""Where a pruned model's CPU time goes: batch-1 latency on a fixed thread count, per layer, for exported models.

For each export folder (e.g. the dense, ours and Torch-Pruning runs of one ``bench_methods`` seed)::

    python -m benchmarks.bench_cpu_layers dense=runs/bench/fm-all/dense-s0/export \\
        ours=runs/bench/fm-all/ours-s0/export tp=runs/bench/fm-all/tp_params-s0/export

prints, with every model timed in the same process, interleaved round by round (medians):

1. whole-network latency in three forms: the training form (NCHW, BatchNorm as its own op), the inference form the
   project times and deploys (``deploy_copy``: BatchNorm folded, channels-last) and ONNX Runtime on ``model.onnx``;
2. per layer, in the inference form: the time from one convolution's start to the next one's (the conv, its ReLU and
   any pooling after it; the last layer also carries the detection heads), and the layer's MACs;
3. the layers a pruned model could not make cheaper (same input and output width as in the first model, the dense
   reference): their share of the dense time bounds the speed-up any pruning of the other layers can give
   (Amdahl), which is why speed-up / MACs reduction stays well below 1 for small networks whose first layers are
   already at ``min_width``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import row


def _layer_macs(net: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    macs: dict[str, int] = {}
    hooks = []
    for name, conv in net.layers.items():
        def hook(m, inp, out, name=name):
            k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
            macs[name] = int(out.numel() * k)
        hooks.append(conv.register_forward_hook(hook))
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return macs


def _mark(device: torch.device):
    """A point in time: a recorded CUDA event on a GPU (the device's clock), ``perf_counter`` elsewhere."""
    if device.type == "cuda":
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev
    return time.perf_counter()


def _elapsed_ms(a, b) -> float:
    return a.elapsed_time(b) if isinstance(a, torch.cuda.Event) else (b - a) * 1e3


def layer_times_ms(nets: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int,
                   warmup: int = 1) -> dict[str, dict[str, float]]:
    """Per network, per layer: median ms from the layer's conv start to the next conv's start (the last layer: to
    the end of the forward pass, heads included); the networks interleaved round by round. On a GPU the marks are
    CUDA events (device time, read after each forward)."""
    dev = x.device
    samples: dict[str, dict[str, list[float]]] = {k: {n: [] for n in net.layers} for k, net in nets.items()}
    for net in nets.values():
        marks: list[tuple[str, object]] = []
        net._bench_marks = marks
        for name, conv in net.layers.items():
            conv.register_forward_pre_hook(lambda m, i, name=name, marks=marks: marks.append((name, _mark(dev))))
    with torch.no_grad():
        for r in range(warmup + rounds):
            for key, net in nets.items():
                net._bench_marks.clear()
                net(x)
                marks = net._bench_marks + [("<end>", _mark(dev))]
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                if r >= warmup:
                    for (name, t0), (_, t1) in zip(marks, marks[1:]):
                        samples[key][name].append(_elapsed_ms(t0, t1))
    return {k: {n: statistics.median(v) for n, v in per.items()} for k, per in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="NAME=EXPORT_FOLDER; the first is the reference (the dense model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    from benchmarks.bench_methods import load_exported_net
    from callbacks.report import interleaved_ms, model_stats, paired_onnx_latency_ms
    from lightning_modules.common import deploy_copy

    torch.set_num_threads(args.threads)
    folders = dict(m.split("=", 1) for m in args.models)
    nets = {k: load_exported_net(Path(f)).eval() for k, f in folders.items()}
    ref = next(iter(nets))
    size = next(iter(nets.values())).example_input().shape[-1]
    x = torch.rand(1, 3, size, size) * 255

    # 1. the whole network: training form (NCHW, BatchNorm as its own op) and inference form, all interleaved
    deployed = {k: deploy_copy(n) for k, n in nets.items()}
    xl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        both = interleaved_ms({**{(k, "train"): (lambda n=n: n(x)) for k, n in nets.items()},
                               **{(k, "infer"): (lambda n=n: n(xl)) for k, n in deployed.items()}}, args.rounds)
    eager = {k: both[(k, "train")] for k in nets}
    fast = {k: both[(k, "infer")] for k in nets}
    onnx = {k: Path(f) / "model.onnx" for k, f in folders.items()}
    ort = (paired_onnx_latency_ms({k: str(p) for k, p in onnx.items()}, rounds=args.rounds, budget_s=60,
                                  threads=args.threads) if all(p.is_file() for p in onnx.values()) else None)
    print(f"batch 1, {args.threads} CPU thread(s), {torch.__version__}; medians of interleaved rounds\n")
    print(row("model", "params", "MMACs", "training form ms (speed-up)", "inference form ms (speed-up)",
              "ONNX Runtime ms (speed-up)", "MACs reduction", "speed-up / MACs reduction (inference form)"))
    print(row(*["---"] * 8))
    macs = {k: _layer_macs(n, x) for k, n in nets.items()}
    tot = {k: model_stats(n, latency=False)["macs"] for k, n in nets.items()}  # heads included
    for k, n in nets.items():
        params = sum(p.numel() for p in n.parameters())
        cells = [f"{d[k]:.2f} ({d[ref] / d[k]:.2f}x)" if d else "-" for d in (eager, fast, ort)]
        red = tot[ref] / tot[k]
        print(row(k, f"{params:,}", f"{tot[k] / 1e6:.0f}", *cells, f"{red:.2f}", f"{fast[ref] / fast[k] / red:.2f}"))

    # 2. per layer, inference form
    per = layer_times_ms(deployed, xl, args.rounds)
    names = list(next(iter(nets.values())).layers)
    print("\nPer layer (inference form): ms from the conv's start to the next conv's (ReLU, pooling; the last layer "
          "also the heads), MMACs, width in -> out\n")
    print(row("layer", *[f"{k} ms" for k in nets], *[f"{k} MMACs" for k in nets], *[f"{k} widths" for k in nets]))
    print(row(*["---"] * (1 + 3 * len(nets))))
    for name in names:
        print(row(name, *[f"{per[k].get(name, 0):.3f}" for k in nets], *[f"{macs[k].get(name, 0) / 1e6:.1f}" for k in nets],
                  *[f"{nets[k].layers[name].in_channels}->{nets[k].layers[name].out_channels}" if name in nets[k].layers
                    else "-" for k in nets]))

    # 3. the part no pruning of the other layers can shrink
    print()
    dense_sum = sum(per[ref].values())
    for k, n in nets.items():
        if k == ref:
            continue
        same = [nm for nm in names if nm in n.layers and
                (n.layers[nm].in_channels, n.layers[nm].out_channels) ==
                (nets[ref].layers[nm].in_channels, nets[ref].layers[nm].out_channels)]
        fixed = sum(per[ref][nm] for nm in same)
        if not same:
            print(f"{k}: no layer at its dense widths; measured {fast[ref] / fast[k]:.2f}x at "
                  f"{tot[ref] / tot[k]:.2f}x fewer MACs")
            continue
        print(f"{k}: layers at their dense widths ({', '.join(same) or 'none'}) take {fixed:.2f} of the dense "
              f"model's {dense_sum:.2f} ms ({100 * fixed / dense_sum:.0f} %): the speed-up cannot exceed "
              f"{dense_sum / fixed:.2f}x however much the rest is cut; measured {fast[ref] / fast[k]:.2f}x at "
              f"{tot[ref] / tot[k]:.2f}x fewer MACs")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "training_form_ms": eager,
                                               "inference_form_ms": fast, "onnxruntime_ms": ort, "layer_ms": per,
                                               "layer_macs": macs}, indent=1))


if __name__ == "__main__":
    main()

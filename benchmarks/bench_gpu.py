"""SSD300 speed on one device: ours vs torchvision ``ssd300_vgg16``, fp32 / bf16 autocast / channels-last, dense vs
pruned to paper A's pruned-6det widths, with and without post-processing, at batch 1 and a throughput batch; and
our decode + NMS, its batched NMS methods (``sorted``, ``dense``, and ``dense`` with its matrices compiled) vs the old
per-image loop, and how many images each gives exactly the detections of greedy NMS run on each (image, class) alone
(``decode_per_group``).

    python -m benchmarks.bench_gpu                      # on the GPU if there is one: batch 1 and 32
    python -m benchmarks.bench_gpu --device cpu --batch 2 --repeats 3   # the CPU-sized version
    python -m benchmarks.bench_gpu --only widths [--compile]             # kept widths rounded to 1/8/16/32/64
    python -m benchmarks.bench_gpu --only widths --cudnn-benchmark       # the same with cuDNN's autotuner on
    python -m benchmarks.bench_gpu --only layers [--round-to 8]          # per layer: dense vs pruned-6det, batch 32
    python -m benchmarks.bench_gpu --only networks --compile             # + the compiled network and decoder
    python -m benchmarks.bench_gpu --only trained --checkpoint RUN/export --images DIR [--compile]
                                           # a trained detector end to end on real images (vs the same untrained)

The ``widths`` table answers "which ``round_to`` should the selection use for this device": the pruned-6det widths
rounded *up* to multiples of 8, 16, 32 and 64, each timed against the dense network in the fastest mode (bf16 +
channels-last on a GPU, fp32 + channels-last on a CPU: on a CPU NCHW max pooling is slow, see benchmarks/README.md),
at batch 1 and the throughput batch; ``speed-up / MACs reduction`` near 1
means the device turns the saved MACs into time. ``--compile`` adds the same networks under ``torch.compile``
(``reduce-overhead``, i.e. CUDA graphs, on a GPU: batch-1 launch overhead removed); in the networks table it adds
a compiled row (network compiled, and ``decode(compile=True)``: the NMS matrices built by one fused kernel).

The ``layers`` table answers "where does the pruned network lose the speed its MACs promise": per convolution (with
its ReLU and any pooling after it, from its start to the next convolution's; the last one also carries the heads), at
the throughput batch in the inference form (bf16 + channels-last on a GPU), the dense and the pruned-6det network's
time, their ratio against the MACs ratio, and what each layer achieves in TFLOP/s and in GB/s of its minimal memory
traffic (input, output and weights once), i.e. whether it is compute- or memory-bound on this device.

The ``trained`` table answers "how fast is a trained detector end to end": the networks table decodes an untrained
network's logits, where every class of every default box clears the 0.01 score threshold (decoding's worst case); a
trained detector's are background almost everywhere. It loads a checkpoint or export folder (``--checkpoint``), runs
its inference form (BatchNorm folded, channels-last; bf16 autocast on a GPU) on the first ``--batch`` images of
``--images`` (resized; repeated if the folder has fewer), with its own decoding settings, and times the network alone
and with decode + NMS, against the same architecture with freshly initialised weights and against the full-width
SSD (untrained); it also says how many (box, class) candidates clear the score threshold and how many detections
come out per image. A derived row adds the trained model's decoding time to the full-width network's: what a trained
full-width SSD would run at end to end, from the figures of this run.

Timings: CUDA events on a GPU (after warm-up, synchronised), ``perf_counter`` on a CPU; medians of ``--repeats``.
Throughput in images/s. Every row runs in this one process, so the ratios are what to read on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch

from benchmarks.bench_surgery import P6DET
from benchmarks.common import row
from callbacks.report import timed_call_ms
from lightning_modules.box_ops import BOX_CODER, decode, priors_xyxy
from lightning_modules.ssd import build_ssd


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed_call_ms(fn, device) for _ in range(repeats)) / 1e3


@torch.no_grad()
def decode_per_image(loc, conf, priors, conf_threshold=0.01, nms_threshold=0.45, top_k=200, pre_nms_top_k=400):
    """The decoder before batching (a loop over images), for the comparison."""
    from torchvision.ops import batched_nms

    anchors = priors_xyxy(priors)
    probs = conf.float().softmax(dim=-1)[..., 1:]
    out = []
    for loc_i, probs_i in zip(loc, probs):
        boxes = BOX_CODER.decode_single(loc_i.float(), anchors).clamp(0.0, 1.0)
        k = min(pre_nms_top_k, probs_i.shape[0])
        scores, idx = probs_i.topk(k, dim=0)
        labels = torch.arange(probs_i.shape[1], device=probs_i.device).expand(k, probs_i.shape[1])
        keep = scores > conf_threshold
        scores, idx, labels = scores[keep], idx[keep], labels[keep]
        cand = boxes[idx]
        kept = batched_nms(cand, scores, labels, nms_threshold)[:top_k]
        out.append({"boxes": cand[kept], "scores": scores[kept], "labels": labels[kept]})
    return out


@torch.no_grad()
def decode_per_group(loc, conf, priors, conf_threshold=0.01, nms_threshold=0.45, top_k=200, pre_nms_top_k=400):
    """Exact greedy NMS, the slow way: torchvision's ``nms`` on each (image, class) alone, so no coordinate offsets
    (``batched_nms`` shifts each class's boxes apart, which rounds their coordinates); the reference the decoders
    are checked against."""
    from torchvision.ops import nms

    anchors = priors_xyxy(priors)
    probs = conf.float().softmax(dim=-1)[..., 1:]
    out = []
    for loc_i, probs_i in zip(loc, probs):
        boxes = BOX_CODER.decode_single(loc_i.float(), anchors).clamp(0.0, 1.0)
        scores, idx = probs_i.topk(min(pre_nms_top_k, probs_i.shape[0]), dim=0)
        kept_b, kept_s, kept_l = [], [], []
        for c in range(probs_i.shape[1]):
            ok = scores[:, c] > conf_threshold
            s, b = scores[ok, c], boxes[idx[ok, c]]
            keep = nms(b, s, nms_threshold)
            kept_b.append(b[keep])
            kept_s.append(s[keep])
            kept_l.append(torch.full_like(keep, c))
        s, b, lab = torch.cat(kept_s), torch.cat(kept_b), torch.cat(kept_l)
        top = s.argsort(descending=True)[:top_k]
        out.append({"boxes": b[top], "scores": s[top], "labels": lab[top]})
    return out


def same_detections(a: list[dict], b: list[dict]) -> bool:
    """The same detections per image, in any order among equal scores (each image's list sorted by score, label,
    then box)."""
    def canonical(d):
        return sorted(zip((-d["scores"]).tolist(), d["labels"].tolist(), d["boxes"].tolist()))

    return len(a) == len(b) and all(canonical(x) == canonical(y) for x, y in zip(a, b))


def peaked_logits(n: int, p: int, c: int, device, objects: int = 5) -> torch.Tensor:
    """Logits shaped like a trained detector's: background everywhere but a few runs of confident boxes."""
    g = torch.Generator().manual_seed(0)
    conf = torch.full((n, p, c), -4.0)
    conf[..., 0] = 4.0
    for i in range(n):
        for _ in range(objects):
            s, cls = int(torch.randint(0, p - 60, (), generator=g)), int(torch.randint(1, c, (), generator=g))
            conf[i, s:s + 60, cls] = 3.0 + 5 * torch.rand(60, generator=g)
    return conf.to(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32, help="the throughput batch (batch 1 is always timed)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--classes", type=int, default=21, help="with background (VOC: 21)")
    ap.add_argument("--only", choices=("decode", "networks", "widths", "layers", "trained"),
                    help="run one of the tables (trained: only when named)")
    ap.add_argument("--checkpoint", help="trained: a checkpoint (.ckpt) or export folder of a trained detector")
    ap.add_argument("--images", help="trained: a folder of images to run it on (e.g. a data set's JPEGImages)")
    ap.add_argument("--round-to", type=int, default=8, help="layers: the pruned-6det widths rounded up to this")
    ap.add_argument("--compile", action="store_true",
                    help="networks and widths tables: also time the compiled networks (and decoder)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="torch.backends.cudnn.benchmark on for the whole run (cuDNN times its algorithms for each new "
                         "shape and keeps the fastest; Trainer(benchmark=True)): does autotuning help narrow widths?")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; batch 1 and {args.batch}; medians of {args.repeats}"
          f"{'; cudnn.benchmark on' if args.cudnn_benchmark else ''}\n")

    if args.only == "widths":
        return widths_table(args, dev)
    if args.only == "layers":
        return layers_table(args, dev)
    if args.only == "trained":
        return trained_table(args, dev)

    # --- decode + NMS alone: the two batched methods vs the per-image loop
    m = build_ssd(300, args.classes).to(dev).eval()
    p = m.priors.shape[0]
    auto = "dense" if dev.type != "cpu" else "sorted"  # what decode(nms_method="auto") runs here
    if args.only != "networks":
        print(row("decode + NMS", "logits", "batch", "per-image loop ms", "sorted ms", "dense ms", "dense compiled ms",
                  f"auto ({auto}) vs loop", "dense compiled vs loop",
                  "images as exact NMS: loop / sorted / dense / dense compiled"))
        print(row(*["---"] * 10))
    methods = {"sorted": {"nms_method": "sorted"}, "dense": {"nms_method": "dense"},
               "dense compiled": {"nms_method": "dense", "compile": True}}
    for kind in ("peaked", "random") if args.only != "networks" else ():
        for b in (1, args.batch):
            loc = torch.randn(b, p, 4, device=dev) * 0.5
            conf = peaked_logits(b, p, args.classes, dev) if kind == "peaked" else torch.randn(b, p, args.classes,
                                                                                               device=dev) * 2
            t_old = timed(lambda: decode_per_image(loc, conf, m.priors), dev, args.repeats)
            t = {meth: timed(lambda kw=kw: decode(loc, conf, m.priors, **kw), dev, args.repeats)
                 for meth, kw in methods.items()}  # the compiled one compiles in its warm-up (once: dynamic shapes)
            exact = decode_per_group(loc, conf, m.priors)
            agree = [sum(same_detections([x], [y]) for x, y in zip(exact, got)) for got in (
                decode_per_image(loc, conf, m.priors), *(decode(loc, conf, m.priors, **kw) for kw in methods.values()))]
            print(row("ours", kind, b, f"{t_old * 1e3:.1f}", *(f"{t[meth] * 1e3:.1f}" for meth in methods),
                      f"{t_old / t[auto]:.2f}x", f"{t_old / t['dense compiled']:.2f}x",
                      " / ".join(f"{same}/{b}" for same in agree)))  # of b images
    print()
    if args.only == "decode":
        return

    # --- the networks
    import torchvision

    tv = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=args.classes)
    tv = tv.to(dev).eval()
    pruned = build_ssd(300, args.classes, channels=P6DET).to(dev).eval()
    models = {"ours dense": m, "ours pruned-6det": pruned}
    print(row("model", "precision / layout", "batch", "network img/s", "with decode+NMS img/s",
              "post-processing share"))
    print(row(*["---"] * 6))
    modes = [("fp32", False, False, False), ("bf16", True, False, False), ("bf16 + channels-last", True, True, False)]
    if args.compile:  # the fastest form, compiled: CUDA graphs for the network on a GPU, the NMS matrices fused
        modes.append(("bf16 + channels-last, compiled" if dev.type == "cuda" else "fp32 + channels-last, compiled",
                      dev.type == "cuda", True, True))
    for b in (1, args.batch):
        x = torch.rand(b, 3, 300, 300, device=dev) * 255
        for label, model in models.items():
            for mode, bf16, cl, compiled in modes:
                mm = model.to(memory_format=torch.channels_last) if cl else model.to(memory_format=torch.contiguous_format)
                xi = x.contiguous(memory_format=torch.channels_last) if cl else x
                ctx = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

                run = torch.compile(mm, mode="reduce-overhead" if dev.type == "cuda" else None) if compiled else mm

                def net():
                    with torch.no_grad(), ctx():
                        return run((xi - 120.0) / 60.0)

                def full():
                    loc, conf = net()
                    return decode(loc, conf, mm.priors, compile=compiled)

                warm = 3 if compiled else 2
                t_net, t_full = timed(net, dev, args.repeats, warm), timed(full, dev, args.repeats, warm)
                print(row(label, mode, b, f"{b / t_net:.1f}", f"{b / t_full:.1f}", f"{1 - t_net / t_full:.0%}"))
        xs = list(x / 255.0)

        def tv_full():
            with torch.no_grad():
                return tv(xs)

        def tv_net():
            with torch.no_grad():
                images, _ = tv.transform(xs)
                return tv.head(list(tv.backbone(images.tensors).values()))

        t_net, t_full = timed(tv_net, dev, args.repeats), timed(tv_full, dev, args.repeats)
        print(row("torchvision ssd300_vgg16", "fp32", b, f"{b / t_net:.1f}", f"{b / t_full:.1f}",
                  f"{1 - t_net / t_full:.0%}"))


def rounded_widths(widths: dict[str, int], dense: dict[str, int], multiple: int) -> dict[str, int]:
    """Each kept width rounded up to a multiple of ``multiple`` (at most the dense width)."""
    return {n: min(dense[n], -(-w // multiple) * multiple) for n, w in widths.items()}


def widths_table(args, dev: torch.device) -> None:
    import torch_pruning as tp

    from lightning_modules.ssd import resolve_channels

    dense_w = resolve_channels(300, None, 1.0)
    fast = dev.type == "cuda"  # bf16 on a GPU (tensor cores), fp32 on a CPU; channels-last on both (the inference form)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if fast else contextlib.nullcontext
    nets = {"dense": build_ssd(300, args.classes)}
    for k in (1, 8, 16, 32, 64):
        nets[f"pruned-6det, round_to {k}"] = build_ssd(300, args.classes, channels=rounded_widths(P6DET, dense_w, k))
    print(row("network", "compiled", "MMACs", "MACs reduction", "batch", "img/s", "speed-up", "speed-up / MACs reduction"))
    print(row(*["---"] * 8))
    macs = {}
    for label, net in nets.items():
        net.eval()
        macs[label], _ = tp.utils.count_ops_and_params(net, torch.zeros(1, 3, 300, 300))
    for compiled in (False, True) if args.compile else (False,):
        for b in (1, args.batch):
            x = torch.rand(b, 3, 300, 300, device=dev).contiguous(memory_format=torch.channels_last)
            rate = {}
            for label, net in nets.items():
                net = net.to(dev).to(memory_format=torch.channels_last)
                if compiled:  # afresh for each network: the networks share SSD.forward, whose guards on parameter
                    torch._dynamo.reset()  # shapes would otherwise pile up to dynamo's recompile limit (8), after
                    # which it silently runs the rest eager
                run = torch.compile(net, mode="reduce-overhead" if fast else None) if compiled else net

                def fwd():
                    with torch.no_grad(), ctx():
                        return run(x)

                rate[label] = b / timed(fwd, dev, args.repeats, warmup=3 if compiled else 2)
                red = macs["dense"] / macs[label]
                speed = rate[label] / rate["dense"]
                print(row(label, "yes" if compiled else "no", f"{macs[label] / 1e6:.0f}", f"{red:.2f}x", b,
                          f"{rate[label]:.1f}", f"{speed:.2f}x", f"{speed / red:.2f}"))



def trained_table(args, dev: torch.device) -> None:
    import copy
    from pathlib import Path

    import cv2
    import numpy as np

    from lightning_modules.common import deploy_copy
    from lightning_modules.export import IMAGE_SUFFIXES, _read_image, load_detector

    if not args.checkpoint or not args.images:
        raise SystemExit("--only trained needs --checkpoint (a .ckpt or export folder) and --images (a folder)")
    det = load_detector(args.checkpoint).to(dev)
    hp, size = det.hparams, det.hparams.size
    folder = Path(args.images)
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise SystemExit(f"--images {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) there")
    files = (files * args.batch)[:args.batch]
    pixels = np.stack([cv2.resize(_read_image(f), (size, size), interpolation=cv2.INTER_LINEAR) for f in files])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(dev)  # uint8, as the loaders deliver
    untrained = copy.deepcopy(det.model)
    torch.manual_seed(0)
    for module in untrained.modules():
        if module is not untrained and hasattr(module, "reset_parameters"):
            module.reset_parameters()  # BatchNorm too: running statistics 0 / 1, so it folds to nothing
    nets = {"trained": deploy_copy(det.model).to(dev), "same widths, untrained": deploy_copy(untrained).to(dev),
            f"full SSD{size} width, untrained": deploy_copy(build_ssd(  # the trained model's configuration, dense
                size, len(det.classes) + 1, num_branches=det.model.num_branches, batch_norm=hp.get("batch_norm", False),
                prior_sizes=hp.get("prior_sizes"))).to(dev)}
    decode_s = {}  # (compiled, batch) -> the trained model's decode + NMS seconds
    fast = dev.type == "cuda"
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if fast else contextlib.nullcontext
    print(f"{args.checkpoint}: {sum(p.numel() for p in det.model.parameters()):,} parameters, {len(det.classes)} "
          f"classes; images from {folder} ({len(set(files))} distinct); "
          f"{'bf16 + ' if fast else 'fp32, '}channels-last, BatchNorm folded\n")
    print(row("network", "compiled", "batch", "network img/s", "with decode+NMS img/s", "post-processing share",
              "candidates / image", "detections / image"))
    print(row(*["---"] * 8))
    for compiled in (False, True) if args.compile else (False,):
        for b in (1, args.batch):
            x = images[:b]
            for label, net in nets.items():
                run = torch.compile(net, mode="reduce-overhead" if fast else None) if compiled else net

                def forward():
                    with torch.no_grad(), ctx():
                        return run(det.preprocess(x).contiguous(memory_format=torch.channels_last))

                def full():
                    loc, conf = forward()
                    return decode(loc, conf, net.priors, hp.conf_threshold, hp.nms_threshold, hp.top_k,
                                  compile=compiled)

                warm = 3 if compiled else 2
                t_net, t_full = timed(forward, dev, args.repeats, warm), timed(full, dev, args.repeats, warm)
                _, conf = forward()
                candidates = (conf.float().softmax(-1)[..., 1:] > hp.conf_threshold).sum().item() / b
                dets = sum(len(d["scores"]) for d in full()) / b
                print(row(label, "yes" if compiled else "no", b, f"{b / t_net:.1f}", f"{b / t_full:.1f}",
                          f"{1 - t_net / t_full:.0%}", f"{candidates:.0f}", f"{dets:.1f}"))
                if label == "trained":
                    decode_s[compiled, b] = t_full - t_net
                elif label.startswith("full"):  # derived: that network's time plus the trained model's decoding
                    t_end = t_net + decode_s[compiled, b]
                    print(row(f"full SSD{size} width + the trained model's decode+NMS time (derived)",
                              "yes" if compiled else "no", b, f"{b / t_net:.1f}", f"{b / t_end:.1f}",
                              f"{decode_s[compiled, b] / t_end:.0%}", "-", "-"))


def layers_table(args, dev: torch.device) -> None:
    from benchmarks.bench_cpu_layers import _layer_macs, layer_times_ms
    from lightning_modules.ssd import resolve_channels

    dense_w = resolve_channels(300, None, 1.0)
    fast = dev.type == "cuda"
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if fast else contextlib.nullcontext
    elem = 2 if fast else 4  # bytes per value: bf16 on a GPU, fp32 on a CPU
    pruned = f"pruned-6det, round_to {args.round_to}"
    nets = {"dense": build_ssd(300, args.classes),
            pruned: build_ssd(300, args.classes, channels=rounded_widths(P6DET, dense_w, args.round_to))}
    x = torch.rand(args.batch, 3, 300, 300, device=dev).contiguous(memory_format=torch.channels_last)
    macs, traffic = {}, {}
    for key, net in nets.items():
        net.to(dev).eval().to(memory_format=torch.channels_last)
        macs[key] = _layer_macs(net, x)
        shapes = {}
        hooks = [conv.register_forward_hook(lambda m, i, o, name=name, shapes=shapes: shapes.__setitem__(
            name, (i[0].numel(), o.numel(), m.weight.numel()))) for name, conv in net.layers.items()]
        with torch.no_grad():
            net(x)
        for h in hooks:
            h.remove()
        traffic[key] = {n: elem * sum(v) for n, v in shapes.items()}
    with ctx():
        per = layer_times_ms(nets, x, args.repeats, warmup=2)
    print(f"per layer at batch {args.batch}, {'bf16 + ' if fast else 'fp32, '}channels-last, eager; ms from the "
          f"conv's start to the next conv's (ReLU, pooling; the last also the heads)\n")
    print(row("layer", "widths dense -> pruned (out)", "dense ms", "pruned ms", "time reduction", "MACs reduction",
              "dense TFLOP/s", "dense GB/s", "pruned TFLOP/s", "pruned GB/s"))
    print(row(*["---"] * 10))
    d, q = nets["dense"], nets[pruned]
    for name in d.layers:
        td, tq = per["dense"][name], per[pruned][name]
        md, mq = macs["dense"][name], macs[pruned][name]
        print(row(name, f"{d.layers[name].out_channels} -> {q.layers[name].out_channels}", f"{td:.3f}", f"{tq:.3f}",
                  f"{td / tq:.2f}x", f"{md / mq:.2f}x", f"{2 * md / td / 1e9:.2f}",
                  f"{traffic['dense'][name] / td / 1e6:.0f}", f"{2 * mq / tq / 1e9:.2f}",
                  f"{traffic[pruned][name] / tq / 1e6:.0f}"))
    sd, sq = sum(per["dense"].values()), sum(per[pruned].values())
    print(f"\nall layers: dense {sd:.2f} ms, pruned {sq:.2f} ms: {sd / sq:.2f}x at "
          f"{sum(macs['dense'].values()) / sum(macs[pruned].values()):.2f}x fewer conv MACs")


if __name__ == "__main__":
    main()

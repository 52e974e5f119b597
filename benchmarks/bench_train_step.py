"""One SSD300 training step (forward, loss, backward, SGD step) at the same batch: our SSD300 + MultiBoxLoss
vs torchvision's ``ssd300_vgg16`` in training mode (which computes its own loss), in one run; and the loss's box
matching alone, batched vs the per-image loop it replaced.

python -m benchmarks.bench_train_step [--batch 4] [--repeats 5] [--device cpu] [--bf16] [--channels-last] [--compile]
                                     [--cudnn-benchmark]   # + our step with cuDNN's autotuner (Trainer benchmark)
python -m benchmarks.bench_train_step --only match [--repeats 20]      # matching and the loss, batch 8 and 32
                                      # (the loss "now" is sync-free on a GPU: MultiBoxLoss(sync_free=None); both forms)
python -m benchmarks.bench_train_step --sync-debug   # a GPU: list the host syncs of our step (cuda sync debug mode)
python -m benchmarks.bench_train_step --only layout --width 0.125 --batch 8   # our step in NCHW vs channels-last
python -m benchmarks.bench_train_step --only loss [--batch 32] [--bf16]   # the sync-free loss eager vs compiled
"""

from __future__ import annotations

import argparse
import contextlib
import functools

import torch
import torchvision
from torchvision.models.detection._utils import SSDMatcher
from torchvision.ops import box_iou

from benchmarks.common import median_time, row
from lightning_modules.box_ops import BOX_CODER, MultiBoxLoss, priors_xyxy
from lightning_modules.ssd import build_ssd, default_boxes


def match_per_image(priors, targets, threshold=0.5):
    """The matching before batching (torchvision's ``SSDMatcher`` per image): the reference."""
    anchors, matcher, cls_t, reg_t = priors_xyxy(priors), SSDMatcher(threshold), [], []
    for t in targets:
        if t["boxes"].numel() == 0:
            cls_t.append(torch.zeros(len(anchors), dtype=torch.long, device=anchors.device))
            reg_t.append(torch.zeros_like(anchors))
            continue
        idx = matcher(box_iou(t["boxes"], anchors))
        fg = idx >= 0
        cls = torch.zeros(len(anchors), dtype=torch.long, device=anchors.device)
        cls[fg] = t["labels"][idx[fg]] + 1
        cls_t.append(cls)
        reg_t.append(BOX_CODER.encode_single(t["boxes"][idx.clamp(min=0)], anchors))
    return torch.stack(cls_t), torch.stack(reg_t)


def synced(fn, dev: torch.device):
    """``fn`` followed by a CUDA synchronisation on a GPU, so that a wall-clock timing covers the device's work."""
    def run():
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out
    return run


def autocast(dev: torch.device, bf16: bool):
    """bf16 autocast on ``dev`` (as ``--trainer.precision bf16-mixed`` trains), or nothing."""
    return torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def ssd_train_step(net, images, targets, opt, loss_fn, dev: torch.device, bf16: bool = False, sync: bool = True):
    """One training step of our SSD (forward, MultiBox loss, backward, optimiser step), synchronised on a GPU unless
    ``sync`` is false."""
    def step():
        with autocast(dev, bf16):
            loc, conf = net(images)
            loss = loss_fn(loc, conf, net.priors, targets)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return synced(step, dev) if sync else step


def sync_report(net, images, targets, opt, loss_fn, dev: torch.device, bf16: bool) -> None:
    """Our step (forward, loss, backward, optimiser step; no synchronisation of its own) once under CUDA's sync debug
    mode: every operation that made the host wait for the GPU, by the line of our code (or torch's) that called it."""
    import collections
    import traceback
    import warnings

    if dev.type != "cuda":
        print("--sync-debug: needs a GPU (CUDA's sync debug mode); skipped")
        return
    where = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            stack = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
            ours = [f for f in stack if "/torch/" not in f.filename and "site-packages" not in f.filename]
            f = (ours or stack)[-1]
            where[f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"] += 1

    step = ssd_train_step(net, images, targets, opt, loss_fn, dev, bf16, sync=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():  # restores showwarning on exit
            warnings.simplefilter("always")
            warnings.showwarning = record
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    print(f"host syncs in one step of ours (CUDA sync debug mode): {sum(where.values())}")
    for place, n in where.most_common():
        print(f"  {n} x {place}")


def loss_before(loc, conf, priors, targets, neg_pos_ratio=3):
    """The whole MultiBox loss as it was: per-image matching, hard negatives ranked by two full sorts."""
    import torch.nn.functional as F

    cls_t, reg_t = match_per_image(priors, targets)
    pos = cls_t > 0
    loc_loss = F.smooth_l1_loss(loc[pos].float(), reg_t[pos], reduction="sum")
    ce = F.cross_entropy(conf.float().flatten(0, 1), cls_t.flatten(), reduction="none").view_as(cls_t)
    rank = ce.masked_fill(pos, -1.0).argsort(dim=1, descending=True).argsort(dim=1)
    neg = rank < neg_pos_ratio * pos.sum(dim=1, keepdim=True)
    n = pos.sum().float().clamp(min=1)
    return loc_loss / n + ce[pos | neg].sum() / n


def random_targets(batch: int, most: int, g: torch.Generator, dev: torch.device) -> list[dict]:
    """``batch`` images of 1 to ``most`` random boxes each (xyxy in [0, 1]) of 20 classes."""
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, most + 1, (), generator=g))
        lt = torch.rand(n, 2, generator=g) * 0.8
        wh = (torch.rand(n, 2, generator=g) * 0.5).clamp(min=0.02) * (1 - lt)
        targets.append({"boxes": torch.cat([lt, lt + wh], 1).to(dev),
                        "labels": torch.randint(0, 20, (n,), generator=g).to(dev)})
    return targets


def match_table(args, dev: torch.device) -> None:
    """Matching (and the whole loss) per batch: the batched ``MultiBoxLoss.match`` vs ``match_per_image``, on targets
    like VOC's (1-6 objects per image) and like facemask's crowds (1-40)."""
    g = torch.Generator().manual_seed(0)
    priors = default_boxes(300).to(dev)
    loss_fn, reads, free = MultiBoxLoss(), MultiBoxLoss(sync_free=False), MultiBoxLoss(sync_free=True)
    print(row("targets", "batch", "per-image matching ms", "batched matching ms", "speed-up", "whole loss before ms",
              "whole loss now ms", "speed-up", "with reads ms", "sync-free ms"))
    print(row(*["---"] * 10))
    for kind, most in (("VOC-like (1-6 objects)", 6), ("crowded (1-40 objects)", 40)):
        for b in (8, 32):
            targets = random_targets(b, most, g, dev)
            loc = torch.randn(b, len(priors), 4, device=dev)
            conf = torch.randn(b, len(priors), 21, device=dev)
            t_old = median_time(synced(lambda: match_per_image(priors, targets), dev), args.repeats)
            t_new = median_time(synced(lambda: loss_fn.match(priors, targets), dev), args.repeats)
            t_lold = median_time(synced(lambda: loss_before(loc, conf, priors, targets), dev), args.repeats)
            t_loss = median_time(synced(lambda: loss_fn(loc, conf, priors, targets), dev), args.repeats)
            t_read = median_time(synced(lambda: reads(loc, conf, priors, targets), dev), args.repeats)
            t_free = median_time(synced(lambda: free(loc, conf, priors, targets), dev), args.repeats)
            # the same loss, or no comparison; checked on the CPU, where the per-image matcher is deterministic (on
            # a GPU, which of several ground truths claiming one default box wins is up to the scatter's order)
            cpu_t = [{k: v.cpu() for k, v in t.items()} for t in targets]
            torch.testing.assert_close(loss_fn(loc.cpu(), conf.cpu(), priors.cpu(), cpu_t)["loss"],
                                       loss_before(loc.cpu(), conf.cpu(), priors.cpu(), cpu_t))
            print(row(kind, b, f"{t_old * 1e3:.2f}", f"{t_new * 1e3:.2f}", f"{t_old / t_new:.2f}x",
                      f"{t_lold * 1e3:.2f}", f"{t_loss * 1e3:.2f}", f"{t_lold / t_loss:.2f}x", f"{t_read * 1e3:.2f}",
                      f"{t_free * 1e3:.2f}"))


def layout_table(args, dev: torch.device) -> None:
    """Our SSD300 training step (BatchNorm, AdamW, as the demo) in NCHW and in channels-last (``SSDDetector(
    channels_last=True)``), the two timed alternately in one process (``interleaved_ms``, two warm-up rounds)."""
    from callbacks.report import interleaved_ms

    images = torch.rand(args.batch, 3, 300, 300, device=dev)
    targets = [{"boxes": torch.tensor([[0.1, 0.2, 0.5, 0.7]], device=dev), "labels": torch.tensor([1], device=dev)}
               for _ in range(args.batch)]
    loss_fn = MultiBoxLoss()
    steps = {}
    for layout, fmt in (("NCHW", torch.contiguous_format), ("channels-last", torch.channels_last)):
        net = build_ssd(300, 21, width_mult=args.width, batch_norm=True).to(dev).train().to(memory_format=fmt)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        steps[layout] = ssd_train_step(net, images.contiguous(memory_format=fmt), targets, opt, loss_fn, dev)
    med = interleaved_ms(steps, rounds=args.repeats)
    print(row("our SSD300 train step", "width_mult", "batch", "device", "median ms", "speed-up"))
    print(row(*["---"] * 6))
    for layout, t in med.items():
        print(row(layout, args.width, args.batch, args.device, f"{t:.0f}", f"{med['NCHW'] / t:.2f}x"))


def loss_table(args, dev: torch.device) -> None:
    """The sync-free MultiBox loss (the form a GPU trains with), forward and backward, eager against compiled
    (``MultiBoxLoss(compile=True)``, what ``--model.compile`` uses on a GPU), on VOC-like targets (1-6 objects per
    image) of a new random batch each round: wall time with the device's work (synchronised), the host's time to
    issue it (the call and the backward return; then a synchronisation outside the timing), and on a GPU the kernels
    each launches (``torch.profiler``). The two are timed alternately, after the compilation and two warm-up rounds;
    the losses are checked equal first."""
    import statistics
    import time

    from datamodules.targets import DetectionTargets

    g = torch.Generator().manual_seed(0)
    priors = default_boxes(300).to(dev)
    fns = {"eager": MultiBoxLoss(sync_free=True), "compiled": MultiBoxLoss(sync_free=True, compile=True)}

    def batch():
        targets = random_targets(args.batch, 6, g, torch.device("cpu"))
        dtype = torch.bfloat16 if args.bf16 else torch.float32  # what the network hands the loss under autocast
        loc = torch.randn(args.batch, len(priors), 4, generator=g).to(dev, dtype).requires_grad_()
        conf = torch.randn(args.batch, len(priors), 21, generator=g).to(dev, dtype).requires_grad_()
        return loc, conf, DetectionTargets.from_list(targets).to(dev)

    def run(fn, inputs):
        loc, conf, targets = inputs
        loc.grad = conf.grad = None
        out = fn(loc, conf, priors, targets)
        out["loss"].backward()
        return out

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    inputs = batch()
    want, got = run(fns["eager"], inputs), run(fns["compiled"], inputs)  # the first compiled call compiles
    for key in ("loss", "loc", "conf", "num_pos"):
        torch.testing.assert_close(got[key].float(), want[key].float(), rtol=1e-4, atol=1e-5)
    wall, host = {k: [] for k in fns}, {k: [] for k in fns}
    for r in range(args.repeats + 2):
        inputs = batch()
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            run(fn, inputs)
            t1 = time.perf_counter()
            sync()
            t2 = time.perf_counter()
            if r >= 2:
                host[name].append((t1 - t0) * 1e3)
                wall[name].append((t2 - t0) * 1e3)
    kernels = {}
    if dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        for name, fn in fns.items():
            inputs = batch()
            sync()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run(fn, inputs)
                sync()
            kernels[name] = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    print(row("sync-free MultiBox loss, forward + backward", "batch", "device", "inputs", "median ms (with the device)",
              "host ms", "device operations"))
    print(row(*["---"] * 7))
    for name in fns:
        print(row(name, args.batch, args.device, "bf16" if args.bf16 else "fp32",
                  f"{statistics.median(wall[name]):.2f}", f"{statistics.median(host[name]):.2f}", kernels.get(name, "-")))
    e, c = statistics.median(wall["eager"]), statistics.median(wall["compiled"])
    print(f"ratio eager/compiled: {e / c:.2f}x (> 1: compiled is faster)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", choices=("match", "layout", "loss"),
                    help="match: the loss's matching alone; layout: our step in NCHW vs channels-last; loss: the "
                         "sync-free loss eager vs compiled")
    ap.add_argument("--width", type=float, default=1.0, help="layout: width_mult (the demo: 0.125, BatchNorm)")
    ap.add_argument("--bf16", action="store_true", help="both steps under bf16 autocast (the GPU configs' precision)")
    ap.add_argument("--channels-last", action="store_true", help="both networks and our input in channels-last")
    ap.add_argument("--compile", action="store_true",
                    help="also our step with the network and (on a GPU) the loss compiled (torch.compile, as "
                         "--model.compile true trains)")
    ap.add_argument("--sync-debug", action="store_true",
                    help="a GPU: run our step once under torch.cuda.set_sync_debug_mode('warn') and list its syncs")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="also our step with torch.backends.cudnn.benchmark on (Trainer(benchmark=True)), timed last")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    if args.only == "match":
        return match_table(args, dev)
    if args.only == "layout":
        return layout_table(args, dev)
    if args.only == "loss":
        return loss_table(args, dev)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    images = torch.rand(args.batch, 3, 300, 300, device=dev).contiguous(memory_format=fmt)
    boxes = [torch.tensor([[0.1, 0.2, 0.5, 0.7], [0.4, 0.1, 0.9, 0.5]], device=dev) for _ in range(args.batch)]
    labels = [torch.tensor([3, 7], device=dev) for _ in range(args.batch)]

    ours = build_ssd(300, 21).to(dev).train().to(memory_format=fmt)
    loss_fn = MultiBoxLoss()
    opt_o = torch.optim.SGD(ours.parameters(), lr=1e-4, momentum=0.9)
    tgt_o = [{"boxes": b, "labels": lbl - 1} for b, lbl in zip(boxes, labels)]
    step_ours = ssd_train_step(ours, images, tgt_o, opt_o, loss_fn, dev, bf16=args.bf16)

    tv = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21).to(dev).train()
    tv = tv.to(memory_format=fmt)  # its transform re-batches the images; channels-last weights carry the layout
    opt_t = torch.optim.SGD(tv.parameters(), lr=1e-4, momentum=0.9)
    tgt_t = [{"boxes": b * 300, "labels": lbl} for b, lbl in zip(boxes, labels)]
    tv_images = list(images)

    @functools.partial(synced, dev=dev)
    def step_tv():
        with autocast(dev, args.bf16):
            losses = tv(tv_images, tgt_t)
            loss = sum(losses.values())
        opt_t.zero_grad(set_to_none=True)
        loss.backward()
        opt_t.step()

    t_o = median_time(step_ours, args.repeats)
    t_t = median_time(step_tv, args.repeats)
    if args.compile:  # a second copy of our network, compiled, and the loss; the first calls compile (three warm-ups)
        torch.manual_seed(0)
        compiled = build_ssd(300, 21).to(dev).train().to(memory_format=fmt)
        opt_c = torch.optim.SGD(compiled.parameters(), lr=1e-4, momentum=0.9)
        loss_c = MultiBoxLoss(compile=True)  # on a GPU the sync-free loss as one graph, as --model.compile trains
        step_c = ssd_train_step(torch.compile(compiled), images, tgt_o, opt_c, loss_c, dev, bf16=args.bf16)
        t_c = median_time(step_c, args.repeats, warmup=3)
    if args.cudnn_benchmark:  # last: the flag stays on for the process; the warm-up steps run the autotuner
        torch.backends.cudnn.benchmark = True
        t_b = median_time(step_ours, args.repeats, warmup=3)
    form = f"{'bf16 autocast' if args.bf16 else 'fp32'}, {'channels-last' if args.channels_last else 'NCHW'}"
    print(row("SSD300 train step", "batch", "device", "form", "median s", "images/s"))
    print(row("ours", args.batch, args.device, form, f"{t_o:.3f}", f"{args.batch / t_o:.0f}"))
    if args.compile:
        print(row("ours, network and loss compiled", args.batch, args.device, form, f"{t_c:.3f}",
                  f"{args.batch / t_c:.0f}"))
    if args.cudnn_benchmark:
        print(row("ours, cudnn.benchmark", args.batch, args.device, form, f"{t_b:.3f}", f"{args.batch / t_b:.0f}"))
    print(row("torchvision ssd300_vgg16", args.batch, args.device, form, f"{t_t:.3f}", f"{args.batch / t_t:.0f}"))
    print(f"ratio torchvision/ours: {t_t / t_o:.2f}x (> 1: ours is faster)")
    if args.compile:
        print(f"ratio ours/ours compiled: {t_o / t_c:.2f}x")
    if args.cudnn_benchmark:
        print(f"ratio ours/ours with cudnn.benchmark: {t_o / t_b:.2f}x")
    if args.sync_debug:  # last, so that a failure here costs none of the timings above
        try:
            sync_report(ours, images, tgt_o, opt_o, loss_fn, dev, args.bf16)
        except Exception as err:  # noqa: BLE001 - a probe: report and go on
            print(f"--sync-debug failed: {type(err).__name__}: {err}")


if __name__ == "__main__":
    main()

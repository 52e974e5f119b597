"""VOC mAP: hand-worked cases and a loop-by-loop transcription of the devkit's voc_eval as the reference."""

import math

import numpy as np
import pytest
import torch

from lightning_modules.metrics import VOCMeanAveragePrecision, voc_ap


def devkit_ap(dets, gts, cls, use_07):
    """Transcription of py-faster-rcnn voc_eval for one class. dets: list of (img, score, box)."""
    recs = {}
    npos = 0
    for img, g in enumerate(gts):
        m = g["labels"] == cls
        bb, diff = g["boxes"][m], g["difficult"][m]
        npos += int((~diff).sum())
        recs[img] = {"bbox": bb, "difficult": diff, "det": [False] * len(bb)}
    d = [x for x in dets if x[3] == cls]
    d.sort(key=lambda x: -x[1])
    tp, fp = np.zeros(len(d)), np.zeros(len(d))
    for i, (img, _, bb, _) in enumerate(d):
        r = recs[img]
        ovmax, jmax = -np.inf, -1
        if len(r["bbox"]):
            g = r["bbox"]
            ixmin, iymin = np.maximum(g[:, 0], bb[0]), np.maximum(g[:, 1], bb[1])
            ixmax, iymax = np.minimum(g[:, 2], bb[2]), np.minimum(g[:, 3], bb[3])
            iw, ih = np.maximum(ixmax - ixmin + 1.0, 0.0), np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0) + (g[:, 2] - g[:, 0] + 1.0) * (g[:, 3] - g[:, 1] + 1.0) - inters
            ov = inters / uni
            ovmax, jmax = ov.max(), ov.argmax()
        if ovmax > 0.5:
            if not r["difficult"][jmax]:
                if not r["det"][jmax]:
                    tp[i] = 1.0
                    r["det"][jmax] = True
                else:
                    fp[i] = 1.0
        else:
            fp[i] = 1.0
    if npos == 0:
        return float("nan")
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap += p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _t(boxes, labels, difficult=None, scores=None):
    d = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels, dtype=torch.long)}
    if difficult is not None:
        d["difficult"] = torch.tensor(difficult, dtype=torch.bool)
    if scores is not None:
        d["scores"] = torch.tensor(scores, dtype=torch.float32)
    return d


def test_perfect_detection_is_one():
    m = VOCMeanAveragePrecision(num_classes=2)
    m.update([_t([[10, 10, 50, 50]], [0], scores=[0.9])], [_t([[10, 10, 50, 50]], [0])])
    out = m.compute()
    assert out["map"].item() == pytest.approx(1.0)
    assert torch.isnan(out["ap_per_class"][1])  # class 1 has no ground truth: excluded from the mean


def test_duplicate_detection_is_false_positive():
    # Two detections on one gt: the second (lower score) is an FP -> precision 1 at recall 1 still first.
    m = VOCMeanAveragePrecision(num_classes=1, use_07_metric=False)
    m.update([_t([[10, 10, 50, 50], [11, 11, 50, 50]], [0, 0], scores=[0.9, 0.8])],
             [_t([[10, 10, 50, 50], [100, 100, 140, 140]], [0, 0])])
    # rec = [0.5, 0.5], prec = [1, 0.5] -> all-point AP = 0.5
    assert m.compute()["map"].item() == pytest.approx(0.5)


def test_difficult_is_neither_tp_nor_fp():
    m = VOCMeanAveragePrecision(num_classes=1, use_07_metric=False)
    # Highest score hits the difficult gt: ignored. Next hits the normal gt: TP. -> AP 1.
    m.update([_t([[0, 0, 20, 20], [50, 50, 90, 90]], [0, 0], scores=[0.99, 0.5])],
             [_t([[0, 0, 20, 20], [50, 50, 90, 90]], [0, 0], difficult=[True, False])])
    assert m.compute()["map"].item() == pytest.approx(1.0)


def test_no_detections_gives_zero():
    m = VOCMeanAveragePrecision(num_classes=1)
    m.update([_t([], [], scores=[])], [_t([[0, 0, 20, 20]], [0])])
    assert m.compute()["map"].item() == 0.0


def test_inclusive_pixel_convention():
    # 10x10 px boxes [0,9] and [5,14]: devkit IoU = 50/150 = 1/3 (< 0.5) -> FP; without +1 it would be 45/155.
    # Shift by 4 instead: overlap 6x10=60 of 140 = 0.43 -> FP; shift by 3: 70/130 = 0.538 -> TP.
    for shift, expected in ((4, 0.0), (3, 1.0)):
        m = VOCMeanAveragePrecision(num_classes=1)
        m.update([_t([[shift, 0, 9 + shift, 9]], [0], scores=[1.0])], [_t([[0, 0, 9, 9]], [0])])
        assert m.compute()["map"].item() == pytest.approx(expected)


def test_11_point_vs_all_point():
    # rec [0.5, 0.5, 1.0], prec [1, 0.5, 0.667]: 11-pt = (6*1 + 5*0.667)/11 ; all-point = 0.5*1 + 0.5*0.667
    rec = torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64)
    prec = torch.tensor([1.0, 0.5, 2 / 3], dtype=torch.float64)
    assert voc_ap(rec, prec, True).item() == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert voc_ap(rec, prec, False).item() == pytest.approx(0.5 + 0.5 * 2 / 3)


def _random_case(rng, n_img, n_cls):
    preds, gts, dets_np, gts_np = [], [], [], []
    for img in range(n_img):
        ng = rng.integers(0, 5)
        xy = rng.uniform(0, 200, (ng, 2))
        wh = rng.uniform(5, 100, (ng, 2))
        gb = np.round(np.concatenate([xy, xy + wh], 1))
        gl = rng.integers(0, n_cls, ng)
        gd = rng.random(ng) < 0.2
        nd = rng.integers(0, 8)
        src = gb[rng.integers(0, max(ng, 1), nd)] if ng else rng.uniform(0, 200, (nd, 4))
        db = src + rng.normal(0, 8, (nd, 4))
        db[:, 2:] = np.maximum(db[:, 2:], db[:, :2] + 1)
        dl = np.where(rng.random(nd) < 0.8, gl[rng.integers(0, max(ng, 1), nd)] if ng else 0, rng.integers(0, n_cls, nd))
        ds = rng.random(nd)
        preds.append(_t(db, dl, scores=ds))
        gts.append(_t(gb, gl, difficult=gd))
        dets_np += [(img, s, b, l) for s, b, l in zip(ds.astype(np.float32), db.astype(np.float32).astype(np.float64), dl)]
        gts_np.append({"boxes": gb, "labels": gl, "difficult": gd})
    return preds, gts, dets_np, gts_np


@pytest.mark.parametrize("use_07", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_devkit_reference(seed, use_07):
    rng = np.random.default_rng(seed)
    preds, gts, dets_np, gts_np = _random_case(rng, n_img=40, n_cls=4)
    m = VOCMeanAveragePrecision(num_classes=4, use_07_metric=use_07)
    # Feed in two chunks, as validation batches would.
    m.update(preds[:17], gts[:17])
    m.update(preds[17:], gts[17:])
    ours = m.compute()["ap_per_class"].numpy()
    ref = np.array([devkit_ap(dets_np, gts_np, c, use_07) for c in range(4)])
    np.testing.assert_allclose(ours, ref, atol=1e-6, equal_nan=True)


def test_iou_exactly_at_threshold_is_not_a_hit():
    # 10x10 gt vs its top half (10x5): devkit IoU = 50 / 100 = 0.5, and the rule is IoU > 0.5 -> FP
    m = VOCMeanAveragePrecision(num_classes=1)
    m.update([_t([[0, 0, 9, 4]], [0], scores=[1.0])], [_t([[0, 0, 9, 9]], [0])])
    assert m.compute()["map"].item() == 0.0
    m = VOCMeanAveragePrecision(num_classes=1)
    m.update([_t([[0, 0, 9, 5]], [0], scores=[1.0])], [_t([[0, 0, 9, 9]], [0])])  # 60 / 100
    assert m.compute()["map"].item() == pytest.approx(1.0)


def test_compression_ratios_are_dense_over_final_and_speed_ups_above_one_when_faster():
    from callbacks.report import compression

    dense = {"params": 4000, "size_mb": 16.0, "macs": 9000, "latency_ms": 10.0, "device_latency_ms": 2.0,
             "device_throughput": 1000.0}
    final = {"params": 1000, "size_mb": 4.0, "macs": 3000, "latency_ms": 4.0, "device_latency_ms": 1.0,
             "device_throughput": 1500.0}
    assert compression(dense, final) == {"params_x": 4.0, "size_x": 4.0, "macs_x": 3.0, "speedup_x": 2.5,
                                         "device_speedup_x": 2.0, "device_throughput_x": 1.5}
    assert math.isnan(compression(dense, dict(final, latency_ms=None))["speedup_x"])


def test_cpu_latency_is_timed_on_a_fixed_thread_count_and_restores_it():
    import torch

    from callbacks.report import LATENCY_THREADS, paired_latency_ms
    from lightning_modules.ssd import build_ssd

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lat = paired_latency_ms({"probe": Probe(), "ssd": build_ssd(300, 3, width_mult=0.0625)}, 300, rounds=5)
        assert set(seen) == {LATENCY_THREADS} and torch.get_num_threads() == 2
        assert set(lat) == {"probe", "ssd"} and lat["ssd"] > lat["probe"] > 0
    finally:
        torch.set_num_threads(before)


def test_onnx_runtime_latency_times_exported_models_together(tmp_path):
    from callbacks.report import paired_onnx_latency_ms
    from lightning_modules.export import export_onnx
    from lightning_modules.ssd import build_ssd

    big = export_onnx(build_ssd(300, 3, width_mult=0.125, batch_norm=True).eval(), tmp_path / "big.onnx")
    # every layer at 8 channels: 4.5x fewer MACs, so the order of the two holds even on a busy machine
    from lightning_modules.ssd import resolve_channels

    narrow = {n: 8 for n in resolve_channels(300, None, 0.125)}
    small = export_onnx(build_ssd(300, 3, narrow, width_mult=0.125, batch_norm=True).eval(), tmp_path / "small.onnx")
    lat = paired_onnx_latency_ms({"big": big, "small": small}, rounds=5, budget_s=5)
    assert set(lat) == {"big", "small"} and lat["big"] > lat["small"] > 0


def test_device_timing_times_the_inference_form_under_the_runs_precision_and_leaves_models_alone():
    import torch

    from callbacks.report import autocast_dtype, paired_device_timing
    from lightning_modules.classifier import build_vgg16

    assert autocast_dtype("bf16-mixed") is torch.bfloat16 and autocast_dtype("16-mixed") is torch.float16
    assert autocast_dtype("32-true") is None and autocast_dtype(32) is None
    seen = []

    def probe(module, args, output):  # what the timed networks run: the dtype of each convolution's output
        if isinstance(module, torch.nn.Conv2d):
            seen.append(output.dtype)

    big = build_vgg16(5, None, 0.125, 32).train()
    small = build_vgg16(5, {"conv5_1": 8, "conv5_2": 8, "conv5_3": 8}, 0.125, 32).train()
    hook = torch.nn.modules.module.register_module_forward_hook(probe)
    try:
        out = paired_device_timing({"big": big, "small": small}, None, torch.device("cpu"), batch=2, rounds=3,
                                   dtype=torch.bfloat16)
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # every timed convolution ran under autocast
    assert set(out) == {"big", "small"}
    for timing in out.values():
        assert timing["device_latency_ms"] > 0 and timing["device_throughput"] > 0
        assert timing["device"] == "cpu" and timing["device_batch"] == 2
        assert timing["device_form"] == "bfloat16 autocast, BatchNorm folded, channels-last"
    assert big.training and small.training  # the originals keep their training form
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in big.modules()) == len(big.norms)


def test_inference_form_folds_batchnorm_exactly_and_leaves_the_network_alone():
    import torch

    from lightning_modules.classifier import build_vgg16
    from lightning_modules.common import deploy_copy
    from lightning_modules.ssd import build_ssd

    torch.manual_seed(0)
    for net, size in ((build_ssd(300, 4, {"conv7": 24}, width_mult=0.125, batch_norm=True), 300),
                      (build_vgg16(5, None, 0.125, 32), 32)):
        with torch.no_grad():  # trained-like statistics and affine parameters, so the folding is exercised
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
                    m.weight.uniform_(0.2, 2)
                    m.bias.uniform_(-0.5, 0.5)
        net.eval()
        x = torch.rand(2, 3, size, size)
        fast = deploy_copy(net)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == len(net.norms)  # original kept
        with torch.no_grad():
            ref, got = net(x), fast(x.contiguous(memory_format=torch.channels_last))
        for r, g in zip(ref if isinstance(ref, tuple) else (ref,), got if isinstance(got, tuple) else (got,)):
            assert torch.allclose(r, g, rtol=1e-4, atol=1e-4 * r.abs().max().item())


def test_cpu_layer_benchmark_times_every_layer_and_bounds_the_speed_up(tmp_path, monkeypatch, capsys):
    import json
    import sys

    from benchmarks import bench_cpu_layers
    from lightning_modules.export import export_onnx
    from lightning_modules.ssd import build_ssd, save_exported

    dense = build_ssd(300, 3, width_mult=0.0625, batch_norm=True).eval()
    pruned = build_ssd(300, 3, {"conv4_3": 8, "conv5_3": 8, "conv6": 16, "conv7": 16}, width_mult=0.0625,
                       batch_norm=True).eval()
    narrow = build_ssd(300, 3, width_mult=0.03, batch_norm=True).eval()  # every width changed
    for name, net in (("dense", dense), ("pruned", pruned), ("narrow", narrow)):
        save_exported(net, tmp_path / name, ["a", "b"])
        export_onnx(net, tmp_path / name / "model.onnx")
    monkeypatch.setattr(sys, "argv", ["bench_cpu_layers", f"dense={tmp_path / 'dense'}", f"pruned={tmp_path / 'pruned'}",
                                      f"narrow={tmp_path / 'narrow'}",
                                      "--rounds", "3", "--json", str(tmp_path / "out.json")])
    bench_cpu_layers.main()
    out = json.loads((tmp_path / "out.json").read_text())
    assert set(out["layer_ms"]["pruned"]) == set(dense.layers) and all(v > 0 for v in out["layer_ms"]["dense"].values())
    assert out["inference_form_ms"]["dense"] > 0 and out["onnxruntime_ms"]["pruned"] > 0
    assert out["layer_macs"]["pruned"]["conv7"] < out["layer_macs"]["dense"]["conv7"]
    printed = capsys.readouterr().out
    assert "pruned: layers at their dense widths (conv1_1, conv1_2" in printed
    assert "narrow: no layer at its dense widths" in printed


def test_device_timing_reports_milliseconds_at_batch_one_and_images_per_second_at_the_throughput_batch(monkeypatch):
    """Each timed call here takes 5 ms: batch-1 latency 5 ms, and a batch of 4 in 5 ms is 800 images/s."""
    import torch

    import callbacks.report as report
    from lightning_modules.classifier import build_vgg16

    monkeypatch.setattr(report, "timed_call_ms", lambda call, device: (call(), 5.0)[1])
    out = report.paired_device_timing({"net": build_vgg16(5, None, 0.125, 32)}, None, torch.device("cpu"), batch=4,
                                      rounds=3)
    assert out["net"]["device_latency_ms"] == 5.0 and out["net"]["device_throughput"] == 800.0

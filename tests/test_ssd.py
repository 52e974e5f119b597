"""Model builder, default boxes, loss and decoding."""

import math

import pytest
import torch

from datamodules.targets import DetectionTargets
from lightning_modules.box_ops import MultiBoxLoss, decode
from lightning_modules.ssd import VGG_CONV_NAMES, build_ssd, default_boxes, resolve_channels

# Paper A, Table 1: SSD300 pruned-6det widths.
P6DET = {"conv1_2": 56, "conv2_1": 107, "conv2_2": 121, "conv3_1": 193, "conv3_2": 158, "conv3_3": 195,
         "conv4_1": 263, "conv4_2": 181, "conv4_3": 331, "conv5_1": 98, "conv5_2": 108, "conv5_3": 78,
         "conv6": 146, "conv7": 106, "conv8_1": 34, "conv8_2": 198, "conv9_1": 12, "conv9_2": 36,
         "conv10_1": 22, "conv10_2": 41, "conv11_1": 22, "conv11_2": 66}


def nparams(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_the_papers():
    assert nparams(build_ssd(300, 21)) == 26_285_486
    assert nparams(build_ssd(512, 21)) == 27_188_676
    assert nparams(build_ssd(300, 21, channels=P6DET)) == 3_926_774  # METHOD.md: 3.927M


def test_same_count_as_torchvision_ssd300():
    import torchvision

    tv = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21)
    assert nparams(tv) == nparams(build_ssd(300, 21))


def test_ssd300_computes_torchvisions_ssd300_vgg16_function():
    """Given torchvision's ``ssd300_vgg16`` weights, our SSD300 gives the same head outputs on the same input (in
    float64): the same trunk (pool3 in ceil mode, pool5 3x3/1, conv6 dilated 6), the L2Norm on conv4_3 with its
    per-channel scale, the extras and the heads read from the same six feature maps in the same order."""
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21).double()
    with torch.no_grad():
        tv.backbone.scale_weight.uniform_(5, 30)  # not all 20, so a scale read from the wrong channel shows
    ours = build_ssd(300, 21).double()
    tv_convs = [m for m in tv.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.weight.shape for c in tv_convs] == [c.weight.shape for c in ours.layers.values()]
    with torch.no_grad():
        for dst, src in zip(ours.layers.values(), tv_convs):
            dst.weight.copy_(src.weight), dst.bias.copy_(src.bias)
        ours.l2norm.weight.copy_(tv.backbone.scale_weight)
    ours.head.load_state_dict(tv.head.state_dict())
    x = torch.randn(1, 3, 300, 300, dtype=torch.float64)
    with torch.no_grad():
        want = tv.head(list(tv.backbone(x).values()))
        loc, conf = ours.eval()(x)
    torch.testing.assert_close(loc, want["bbox_regression"])
    torch.testing.assert_close(conf, want["cls_logits"])


def test_every_default_box_starts_as_background_with_probability_099():
    """The conf head's background bias (``_init_weights``): on an all-zero input every feature is 0 after the ReLUs, so
    the logits are the biases and softmax gives background 0.99, the rest shared by the object classes."""
    for classes in (3, 21):
        m = build_ssd(300, classes, width_mult=0.0625).eval()
        with torch.no_grad():
            _, conf = m(torch.zeros(1, 3, 300, 300))
        p = conf.softmax(-1)
        torch.testing.assert_close(p[..., 0], torch.full_like(p[..., 0], 0.99))
        torch.testing.assert_close(p[..., 1:], torch.full_like(p[..., 1:], 0.01 / (classes - 1)))


@pytest.mark.parametrize("size,count,maps", [(300, 8732, [38, 19, 10, 5, 3, 1]), (512, 24564, [64, 32, 16, 8, 4, 2, 1])])
def test_default_box_counts_and_feature_maps(size, count, maps):
    assert default_boxes(size).shape == (count, 4)
    model = build_ssd(size, 3, width_mult=0.0625)
    feats = []
    for name in model.sources:
        model.layers[name].register_forward_hook(lambda m, i, o: feats.append(o.shape[-1]))
    loc, conf = model(torch.zeros(1, 3, size, size))
    assert feats == maps
    assert loc.shape == (1, count, 4) and conf.shape == (1, count, 3)


def test_default_box_golden_values():
    b = default_boxes(300)
    # first location of conv4_3: centre (0.5 * 8 / 300), sizes 30/300, sqrt(30*60)/300, 0.1*sqrt(2) x 0.1/sqrt(2)
    c = 4 / 300
    torch.testing.assert_close(b[0], torch.tensor([c, c, 0.1, 0.1]))
    torch.testing.assert_close(b[1], torch.tensor([c, c, math.sqrt(0.02), math.sqrt(0.02)]))
    torch.testing.assert_close(b[2], torch.tensor([c, c, 0.1 * math.sqrt(2), 0.1 / math.sqrt(2)]))
    # last box of SSD300: the 1x1 map, centre 0.5, aspect 1/2 of the 264 px box
    torch.testing.assert_close(b[-1], torch.tensor([0.5, 0.5, 0.88 / math.sqrt(2), min(1.0, 0.88 * math.sqrt(2))]))
    # SSD512 conv12_2 (1x1, step 512) centre is 0.5
    assert default_boxes(512)[-1, :2].tolist() == [0.5, 0.5]


def test_default_boxes_take_each_branchs_own_max_size():
    """``prior_sizes`` per branch whose max sizes are not the next branch's min sizes (as in a Caffe prototxt): each
    branch's extra square box is sqrt(min_k * max_k), its other boxes min_k with the aspect ratios."""
    from lightning_modules.ssd import PRIORS

    mins, maxs = (30, 60, 111, 162, 213, 264), (50, 100, 150, 200, 250, 290)
    b = default_boxes(300, prior_sizes={"min_sizes": list(mins), "max_sizes": list(maxs)})
    spec, start = PRIORS[300], 0
    for f, ratios, lo, hi in zip(spec.feature_maps, spec.aspect_ratios, mins, maxs):
        first = b[start:start + 2 + 2 * len(ratios)]  # the boxes of the branch's first location
        torch.testing.assert_close(first[0, 2:], torch.tensor([lo / 300, lo / 300]))
        torch.testing.assert_close(first[1, 2:], torch.tensor([math.sqrt(lo * hi) / 300] * 2))
        wide = min(1.0, lo / 300 * math.sqrt(2))  # widths and heights are clipped to the image, as torchvision does
        torch.testing.assert_close(first[2, 2:], torch.tensor([wide, lo / 300 / math.sqrt(2)]))
        start += f * f * (2 + 2 * len(ratios))
    assert start == len(b) == 8732


def test_num_branches_keeps_first_k():
    m = build_ssd(300, 21, num_branches=3)
    assert "conv9_1" not in m.layers and m.sources == ("conv4_3", "conv7", "conv8_2")
    assert m.priors.shape[0] == 38 * 38 * 4 + 19 * 19 * 6 + 10 * 10 * 6
    loc, _ = m(torch.zeros(1, 3, 300, 300))
    assert loc.shape[1] == m.priors.shape[0]


def test_channels_and_errors():
    ch = resolve_channels(300, {"conv6": 100}, width_mult=0.5)
    assert ch["conv6"] == 100 and ch["conv7"] == 512
    with pytest.raises(ValueError, match="unknown layer 'conv99'"):
        build_ssd(300, 21, channels={"conv99": 3})
    with pytest.raises(ValueError, match="size must be 300 or 512"):
        build_ssd(400)
    with pytest.raises(ValueError, match="num_branches"):
        build_ssd(300, num_branches=7)


def test_pretrained_backbone_offline_fails_clearly(monkeypatch):
    import torchvision.models

    def boom(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models, "vgg16", boom)
    with pytest.raises(RuntimeError, match="IMAGENET1K_FEATURES.*offline"):
        build_ssd(300, 21, pretrained_backbone=True)


def test_pretrained_backbone_with_batch_norm_loads_imagenet_vgg16_bn(monkeypatch):
    """batch_norm + pretrained_backbone: conv1_1..conv5_3 and their BatchNorms (scale, shift, running statistics)
    come from torchvision's vgg16_bn (VGG16_BN_Weights.IMAGENET1K_V1; here a randomly initialised one stands in for
    the download); the layers after conv5_3 keep their own initialisation; offline it fails naming the weights."""
    import torchvision.models

    torch.manual_seed(0)
    ref = torchvision.models.vgg16_bn(weights=None)
    with torch.no_grad():
        for m in ref.features:
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.1, 0.1)
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    asked = {}

    def fake(weights=None):
        asked["weights"] = weights
        return ref

    monkeypatch.setattr(torchvision.models, "vgg16_bn", fake)
    m = build_ssd(300, 21, pretrained_backbone=True, batch_norm=True)
    assert asked["weights"] == torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1
    convs = [x for x in ref.features if isinstance(x, torch.nn.Conv2d)]
    bns = [x for x in ref.features if isinstance(x, torch.nn.BatchNorm2d)]
    for name, c, b in zip(VGG_CONV_NAMES, convs, bns):
        assert torch.equal(m.layers[name].weight, c.weight) and torch.equal(m.layers[name].bias, c.bias)
        for key in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(m.norms[name], key), getattr(b, key)), (name, key)
    assert torch.equal(m.norms["conv6"].weight, torch.ones_like(m.norms["conv6"].weight))  # not from ImageNet

    def boom(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models, "vgg16_bn", boom)
    with pytest.raises(RuntimeError, match="VGG16_BN_Weights.IMAGENET1K_V1.*offline"):
        build_ssd(300, 21, pretrained_backbone=True, batch_norm=True)
    with pytest.raises(ValueError, match="full VGG16 width at conv1_1"):
        monkeypatch.setattr(torchvision.models, "vgg16_bn", fake)
        build_ssd(300, 21, pretrained_backbone=True, batch_norm=True, width_mult=0.5)


def test_loss_is_finite_with_and_without_objects():
    torch.manual_seed(0)
    m = build_ssd(300, 4, width_mult=0.0625)
    loc, conf = m(torch.randn(2, 3, 300, 300))
    targets = [
        {"boxes": torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.5, 0.5, 0.52, 0.53]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.long)},
    ]
    out = MultiBoxLoss()(loc, conf, m.priors, targets)
    assert torch.isfinite(out["loss"]) and out["num_pos"] >= 2  # every gt gets at least its best prior
    out["loss"].backward()


@pytest.mark.parametrize("size", [300, 512])
def test_batched_matching_gives_the_per_image_targets(size):
    """One pass over the batch assigns exactly the targets of torchvision's per-image SSDMatcher: random boxes of all
    sizes (tiny ones whose best default box has IoU < 0.5, huge ones), images without objects, duplicated boxes that
    claim the same best default box (the later one wins in both), and a crowded image (115 boxes, facemask's most)."""
    from benchmarks.bench_train_step import match_per_image  # the matcher as it was (a loop over images)

    g = torch.Generator().manual_seed(0)
    priors = default_boxes(size)
    targets = []
    for i, n in enumerate([3, 0, 1, 115, 7, 0, 2, 40]):
        lt = torch.rand(n, 2, generator=g) * 0.9
        wh = torch.rand(n, 2, generator=g) ** 3 * (1 - lt)  # many small boxes
        boxes = torch.cat([lt, (lt + wh.clamp(min=1e-3)).clamp(max=1.0)], 1)
        if i == 4:
            boxes[1] = boxes[0]  # the same box twice: both claim one best default box
        targets.append({"boxes": boxes, "labels": torch.randint(0, 20, (n,), generator=g)})
    cls_b, reg_b = MultiBoxLoss().match(priors, targets)
    cls_r, reg_r = match_per_image(priors, targets)
    assert torch.equal(cls_b, cls_r)
    cls_p, reg_p = MultiBoxLoss().match(priors, DetectionTargets.from_list(targets))  # as the loaders deliver them
    assert torch.equal(cls_p, cls_b) and torch.equal(reg_p, reg_b)
    torch.testing.assert_close(reg_b, reg_r, rtol=1e-5, atol=1e-5)
    assert (cls_b[4] > 0).sum() >= 6 and (cls_b[1] == 0).all()
    cls_e, reg_e = MultiBoxLoss().match(priors, [targets[1], targets[5]])  # a batch without any object
    assert not cls_e.any() and not reg_e.any() and cls_e.shape == (2, len(priors))


def test_hard_negatives_three_to_one():
    """The confidence loss sums the positives and, per image, the 3 x positives background boxes with the highest
    cross-entropy (an image without objects adds no negatives); both normalised by the positives."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    loss = MultiBoxLoss()
    priors = default_boxes(300)
    targets = [{"boxes": torch.tensor([[0.2, 0.2, 0.6, 0.6], [0.1, 0.5, 0.3, 0.9]]), "labels": torch.tensor([1, 0])},
               {"boxes": torch.tensor([[0.5, 0.1, 0.9, 0.4]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.long)}]
    conf = torch.randn(3, len(priors), 4) * 3
    loc = torch.zeros(3, len(priors), 4)
    out = loss(loc, conf, priors, targets)
    cls_t, _ = loss.match(priors, targets)
    ce = F.cross_entropy(conf.flatten(0, 1), cls_t.flatten(), reduction="none").view_as(cls_t)
    expected, n_pos = 0.0, 0
    for i in range(3):
        pos = cls_t[i] > 0
        k = int(pos.sum())
        neg_sorted = ce[i][~pos].sort(descending=True).values
        assert (k == 0) == (i == 2)
        expected += ce[i][pos].sum() + neg_sorted[: 3 * k].sum()
        n_pos += k
    assert out["num_pos"] == n_pos
    torch.testing.assert_close(out["conf"], expected / n_pos)
    # uniform logits: every box costs log(C), so the loss counts exactly 1 positive + 3 negatives per positive
    out = loss(loc, torch.zeros_like(conf), priors, targets)
    torch.testing.assert_close(out["conf"], torch.tensor(4 * math.log(4)))


@pytest.mark.parametrize("sync_free", [False, True])
def test_hard_negatives_are_never_positives(sync_free):
    """Positives that the network gets badly wrong have the highest cross-entropy of all boxes; they must still
    not take a hard negative's place: the loss counts every positive once and 3 x positives *background* boxes."""
    import torch.nn.functional as F

    loss = MultiBoxLoss(sync_free=sync_free)
    priors = default_boxes(300)
    targets = [{"boxes": torch.tensor([[0.2, 0.2, 0.6, 0.6]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[0.5, 0.1, 0.9, 0.4], [0.1, 0.5, 0.3, 0.9]]), "labels": torch.tensor([0, 2])}]
    cls_t, _ = loss.match(priors, targets)
    conf = torch.zeros(2, len(priors), 4)
    conf[..., 0] = torch.where(cls_t > 0, 10.0, 0.0)  # every positive confidently called background
    out = loss(torch.zeros(2, len(priors), 4), conf, priors, targets)
    ce = F.cross_entropy(conf.flatten(0, 1), cls_t.flatten(), reduction="none").view_as(cls_t)
    n_pos = int((cls_t > 0).sum())
    assert n_pos >= 3 and out["num_pos"] == n_pos
    # each positive's CE (~10) + 3 negatives per positive at log(4) each (zero logits)
    torch.testing.assert_close(out["conf"], (ce[cls_t > 0].sum() + 3 * n_pos * math.log(4)) / n_pos)


def test_a_default_box_at_exactly_the_matching_threshold_is_matched():
    """SSDMatcher's rule is IoU >= 0.5 (torchvision's Matcher drops only IoUs below the threshold): a default box
    whose IoU with a ground truth is exactly 0.5 takes that ground truth, as in the per-image matcher."""
    from benchmarks.bench_train_step import match_per_image

    # (cx, cy, w, h): [0, 0, 1, 1] (IoU 1: the gt's best), [0, 0, 0.5, 1] (IoU exactly 0.5), [0.75, 0, 1, 1] (0.25)
    priors = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.25, 0.5, 0.5, 1.0], [0.875, 0.5, 0.25, 1.0]])
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]]), "labels": torch.tensor([3])}]
    cls_t, _ = MultiBoxLoss().match(priors, targets)
    assert cls_t.tolist() == [[4, 4, 0]]
    assert torch.equal(cls_t, match_per_image(priors, targets)[0])


@pytest.mark.parametrize("weighted", [False, True])
def test_sync_free_loss_is_the_loss_without_a_read_back(weighted):
    """The loss as it runs on a GPU (``sync_free``: every box's terms masked with ``where``, hard negatives ranked by
    one sort) equals the CPU's (boolean-mask indexing, a top-k of the batch's largest count) in value and gradient:
    with and without class weights, with an image without objects, and with uniform logits (every negative ties).
    And it asks the host for nothing: no operation that would wait for a GPU (``benchmarks.bench_syncs``' list)."""
    from benchmarks.bench_syncs import SyncProbe

    torch.manual_seed(0)
    priors = default_boxes(300)
    targets = DetectionTargets.from_list([
        {"boxes": torch.tensor([[0.2, 0.2, 0.6, 0.6], [0.1, 0.5, 0.3, 0.9]]), "labels": torch.tensor([1, 0])},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.long)},
        {"boxes": torch.rand(9, 2).mul(0.5).repeat(1, 2).add(torch.tensor([0, 0, 0.3, 0.4])),
         "labels": torch.randint(0, 3, (9,))}])
    weights = torch.tensor([1.0, 0.5, 2.0, 3.0]) if weighted else None
    for conf0 in (torch.randn(3, len(priors), 4) * 3, torch.zeros(3, len(priors), 4)):
        results = {}
        for sync_free in (False, True):
            loc = (torch.randn(3, len(priors), 4, generator=torch.Generator().manual_seed(1))).requires_grad_()
            conf = conf0.clone().requires_grad_()
            probe = SyncProbe()
            probe.active = sync_free
            with probe:
                out = MultiBoxLoss(sync_free=sync_free)(loc, conf, priors, targets, class_weights=weights)
            assert not probe.where, dict(probe.where)
            out["loss"].backward()
            results[sync_free] = (out, loc.grad, conf.grad)
        (a, ga_loc, ga_conf), (b, gb_loc, gb_conf) = results[False], results[True]
        for key in ("loss", "loc", "conf", "num_pos"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gb_loc, ga_loc, rtol=1e-6, atol=1e-8)
        if conf0.any():  # with ties (uniform logits) the two may pick different, equally hard negatives
            torch.testing.assert_close(gb_conf, ga_conf, rtol=1e-6, atol=1e-8)
        assert a["num_pos"] > 9


def test_detector_learning_rate_schedule_and_weight_decay_groups():
    """The recipe's schedule per iteration: a linear warm-up from warmup_factor, x lr_gamma at each milestone (or a
    cosine to 0 that stays at 0 past its end); weight decay on the convolution kernels only, never on biases,
    BatchNorm or the L2Norm scale."""
    from lightning_modules.detector import SSDDetector

    det = SSDDetector(["a"], width_mult=0.0625, batch_norm=True, warmup_iters=10, warmup_factor=0.1,
                      lr_milestones=[20, 30], lr_gamma=0.1)
    got = [det.lr_factor(it) for it in (0, 5, 10, 19, 20, 29, 30, 1000)]
    assert got == pytest.approx([0.1, 0.55, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    cos = SSDDetector(["a"], width_mult=0.0625, warmup_iters=0, cosine_iters=100)
    assert [cos.lr_factor(it) for it in (0, 50, 100, 150)] == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-12)
    # "run": the cosine spans the run's stepping batches, whatever the data set's size (read once per optimiser)
    run = SSDDetector(["a"], width_mult=0.0625, warmup_iters=0, cosine_iters="run")
    from types import SimpleNamespace

    run.trainer = SimpleNamespace(estimated_stepping_batches=40)
    sched = run.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert [run.lr_factor(it) for it in (0, 20, 40, 50)] == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-12)
    assert sched.get_last_lr()[0] == pytest.approx(run.hparams.lr)
    with pytest.raises(ValueError, match="cosine_iters must be a number of iterations >= 0 or 'run', got 'runs'"):
        SSDDetector(["a"], width_mult=0.0625, cosine_iters="runs")
    decay, no_decay = det.configure_optimizers()["optimizer"].param_groups
    assert decay["weight_decay"] == det.hparams.weight_decay > 0 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 4 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(det.model.parameters()))
    assert any(p is det.model.l2norm.weight for p in no_decay["params"])


def test_decode_respects_top_k_and_threshold():
    m = build_ssd(300, 6, width_mult=0.0625)
    loc, conf = m(torch.randn(2, 3, 300, 300))
    dets = decode(loc, conf, m.priors, conf_threshold=0.01, top_k=50)
    assert len(dets) == 2
    for d in dets:
        assert len(d["boxes"]) <= 50 and (d["scores"] > 0.01).all()
        assert d["labels"].min() >= 0 and d["labels"].max() < 5
        assert (d["boxes"] >= 0).all() and (d["boxes"] <= 1).all()


@pytest.mark.parametrize("nms_method", ["sorted", "dense"])
def test_decode_keeps_only_scores_above_the_confidence_threshold(nms_method):
    """The Caffe SSD rule is score > threshold: with the threshold set to an image's best score of a class, that
    detection (the first NMS would keep) is dropped by both NMS methods."""
    torch.manual_seed(0)
    priors = default_boxes(300)
    loc, conf = torch.randn(2, len(priors), 4), torch.randn(2, len(priors), 4)
    best = float(conf.softmax(dim=-1)[0, :, 1].max())
    dets = decode(loc, conf, priors, conf_threshold=best, nms_method=nms_method)
    assert all((d["scores"] > best).all() for d in dets)
    assert not ((dets[0]["labels"] == 0) & (dets[0]["scores"] == best)).any()
    assert len(decode(loc, conf, priors, conf_threshold=best - 1e-6, nms_method=nms_method)[0]["scores"]) > 0


def _canonical(d):
    order = sorted(range(len(d["scores"])), key=lambda i: (-float(d["scores"][i]), int(d["labels"][i]),
                                                          d["boxes"][i].tolist()))
    return d["boxes"][order], d["scores"][order], d["labels"][order]


@pytest.mark.parametrize("nms_method", ["sorted", "dense", "dense-compiled"])
@pytest.mark.parametrize("kind", ["random", "peaked"])
def test_batched_decode_gives_the_per_image_detections(kind, nms_method):
    """One pass over the batch (one batched_nms over every image and class) = the per-image loop, detection for
    detection: on random logits (thousands of candidates, the top_k cut active) and on logits shaped like a trained
    detector's (a few confident boxes per object, background elsewhere, an image with nothing). ``dense-compiled``:
    the dense method with its suppression matrices built by ``torch.compile`` (compiled once for every shape)."""
    from benchmarks.bench_gpu import decode_per_image  # the decoder as it was (a loop over images): the reference

    torch.manual_seed(0)
    m = build_ssd(300, 6, width_mult=0.0625)
    n, p, c = 5, m.priors.shape[0], 6
    loc = torch.randn(n, p, 4) * 0.5
    if kind == "random":
        conf = torch.randn(n, p, c) * 2
    else:
        conf = torch.full((n, p, c), -4.0)
        conf[..., 0] = 4.0
        for i in range(n - 1):  # the last image has no object
            for _ in range(3):
                centre, cls = int(torch.randint(0, p - 40, ())), int(torch.randint(1, c, ()))
                conf[i, centre:centre + 40, cls] = 4.0 + torch.rand(40) * 4
    method, compiled = nms_method.removesuffix("-compiled"), nms_method.endswith("-compiled")
    for top_k in (200, 7):
        got = decode(loc, conf, m.priors, top_k=top_k, nms_method=method, compile=compiled)
        want = decode_per_image(loc, conf, m.priors, top_k=top_k)
        assert len(got) == len(want) == n
        for g, w in zip(got, want):
            assert len(g["scores"]) == len(w["scores"]) <= top_k
            for a, b in zip(_canonical(g), _canonical(w)):
                assert torch.equal(a, b)
    if kind == "peaked":
        assert len(decode(loc, conf, m.priors, nms_method=method, compile=compiled)[-1]["scores"]) == 0


@pytest.mark.parametrize("compiled", [False, True])
def test_dense_grouped_nms_is_greedy_nms_in_every_group(compiled):
    """``grouped_nms_dense`` = torchvision's ``nms`` on each group alone: random boxes (a few to a few hundred per
    group, padding past each group's candidates), and a chain where each box overlaps only its neighbours, so that
    what survives depends on every earlier decision (greedy keeps every other box; the fixed point needs one round
    per link). ``compiled``: the suppression matrices by ``torch.compile``, which must keep eager's rounding (no
    fused multiply-adds; IEEE division), so also the same matrices bit for bit, including pairs whose IoU is the
    threshold itself."""
    from torchvision.ops import box_iou, nms

    from lightning_modules.box_ops import _compiled_suppression, _suppression, grouped_nms_dense

    g = torch.Generator().manual_seed(0)
    groups, k = 12, 300
    xy = torch.rand(groups, k, 2, generator=g) * 0.8
    wh = torch.rand(groups, k, 2, generator=g) * 0.2 + 0.01
    boxes = torch.cat([xy, xy + wh], -1)
    scores = torch.rand(groups, k, generator=g).sort(dim=1, descending=True).values
    counts = torch.randint(0, k + 1, (groups,), generator=g)
    counts[0], counts[1] = 0, k
    valid = torch.arange(k) < counts[:, None]
    keep = grouped_nms_dense(boxes, valid, 0.45, compiled=compiled)
    for i in range(groups):
        want = torch.zeros(k, dtype=torch.bool)
        want[nms(boxes[i, :counts[i]], scores[i, :counts[i]], 0.45)] = True
        assert torch.equal(keep[i], want), i
    chain = torch.tensor([[0.02 * j, 0.0, 0.02 * j + 0.1, 0.1] for j in range(40)])  # IoU 0.67 with the next
    keep = grouped_nms_dense(chain[None], torch.ones(1, 40, dtype=torch.bool), 0.45, compiled=compiled)[0]
    assert keep.tolist() == [j % 2 == 0 for j in range(40)]
    # boxes on a grid of 1/8: every IoU is computed exactly, hundreds are exactly 0.5 (not suppressed at 0.5: ">")
    grid = torch.randint(0, 8, (20, 50, 4), generator=g).float() / 8
    grid = torch.cat([grid[..., :2].minimum(grid[..., 2:]), grid[..., :2].maximum(grid[..., 2:]) + 1 / 8], -1)
    ok, later = torch.ones(20, 50, dtype=torch.bool), torch.ones(50, 50, dtype=torch.bool).triu_(1)
    ties = (torch.stack([box_iou(b, b) for b in grid]) == 0.5) & later
    assert ties.sum() > 100
    assert not _suppression(grid, ok, later, 0.5)[ties].any() and _suppression(grid, ok, later, 0.45)[ties].all()
    if compiled:  # the compiled matrices equal eager's bit for bit, on the ties and on random boxes
        for b, v, thr in ((grid, ok, 0.5), (grid, ok, 0.45), (boxes, valid, 0.45)):
            lt = torch.ones(b.shape[1], b.shape[1], dtype=torch.bool).triu_(1)
            compiled_sup = _compiled_suppression()(b, v, lt, thr, torch.float32)
            assert torch.equal(compiled_sup, _suppression(b, v, lt, thr).float())
    with pytest.raises(ValueError, match="nms_method must be"):
        decode(torch.zeros(1, 4, 4), torch.zeros(1, 4, 3), torch.rand(4, 4), nms_method="fast")


def test_bench_gpu_width_rounding_goes_up_to_the_multiple_and_stops_at_dense():
    from benchmarks.bench_gpu import rounded_widths

    dense = {"a": 64, "b": 100, "c": 512}
    assert rounded_widths({"a": 56, "b": 97, "c": 1}, dense, 32) == {"a": 64, "b": 100, "c": 32}
    assert rounded_widths({"a": 56, "b": 97, "c": 1}, dense, 1) == {"a": 56, "b": 97, "c": 1}
    assert rounded_widths({"a": 57, "b": 16, "c": 500}, dense, 8) == {"a": 64, "b": 16, "c": 504}


def test_compiled_decode_falls_back_to_eager_where_torch_compile_cannot_run(monkeypatch):
    """Under a ``TorchDispatchMode`` (op counters, FLOP counters) torch.compile refuses to run: decode(compile=True)
    then warns once, says why, and builds the matrices eagerly: the same detections."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import lightning_modules.box_ops as box_ops

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(box_ops, "_COMPILE_FAILED", {})
    torch.manual_seed(0)
    m = build_ssd(300, 6, width_mult=0.0625)
    loc, conf = torch.randn(2, m.priors.shape[0], 4) * 0.5, torch.randn(2, m.priors.shape[0], 6) * 2
    want = decode(loc, conf, m.priors, nms_method="dense")
    with Passthrough(), pytest.warns(RuntimeWarning, match="torch.compile could not build the NMS matrices"):
        got = decode(loc, conf, m.priors, nms_method="dense", compile=True)
    assert "the NMS matrices" in box_ops._COMPILE_FAILED
    for g, w in zip(got, want):
        for a, b in zip(_canonical(g), _canonical(w)):
            assert torch.equal(a, b)


def _random_targets(n: int, gen: torch.Generator, most: int = 5) -> DetectionTargets:
    """``n`` images of 0 to ``most`` random boxes each (xyxy in [0, 1]), as the loaders pack them."""
    ts = []
    for _ in range(n):
        k = int(torch.randint(0, most + 1, (), generator=gen))
        lt = torch.rand(k, 2, generator=gen) * 0.6
        ts.append({"boxes": torch.cat([lt, lt + torch.rand(k, 2, generator=gen) * 0.35 + 0.05], 1),
                   "labels": torch.randint(0, 3, (k,), generator=gen)})
    return DetectionTargets.from_list(ts)


def test_compiled_loss_is_the_eager_loss_with_one_graph_for_every_batch(recwarn):
    """``MultiBoxLoss(compile=True)`` (what ``--model.compile`` trains with on a GPU): the sync-free loss's matching
    and terms as one compiled graph. The same loss and gradients as eager on batches of different sizes and numbers
    of ground truths (images without objects included), with and without class weights, from one graph for each
    (dynamic shapes: no recompilation per batch); a batch without any object takes the eager path (all background).
    """
    from torch._dynamo.utils import counters

    import lightning_modules.box_ops as box_ops

    torch._dynamo.reset()
    priors = default_boxes(300)
    gen = torch.Generator().manual_seed(0)
    eager, compiled = MultiBoxLoss(sync_free=True), MultiBoxLoss(sync_free=True, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    empty = DetectionTargets.from_list(
        [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.long)}] * 2)
    for weights in (None, torch.tensor([1.0, 0.5, 2.0, 3.0])):
        for n, targets in ((6, _random_targets(6, gen)), (6, _random_targets(6, gen)), (3, _random_targets(3, gen)),
                           (2, empty)):
            loc0 = torch.randn(n, len(priors), 4, generator=gen)
            conf0 = torch.randn(n, len(priors), 4, generator=gen) * 3
            out = {}
            for name, fn in (("eager", eager), ("compiled", compiled)):
                loc, conf = loc0.clone().requires_grad_(), conf0.clone().requires_grad_()
                res = fn(loc, conf, priors, targets, class_weights=weights)
                res["loss"].backward()
                out[name] = (res, loc.grad, conf.grad)
            (a, ga_loc, ga_conf), (b, gb_loc, gb_conf) = out["eager"], out["compiled"]
            for key in ("loss", "loc", "conf", "num_pos"):
                torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(gb_loc, ga_loc, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(gb_conf, ga_conf, rtol=1e-5, atol=1e-8)
    assert counters["stats"]["unique_graphs"] - graphs == 2  # one per form (with / without weights), every batch
    assert "the MultiBox loss" not in box_ops._COMPILE_FAILED
    assert not [w for w in recwarn if "torch.compile could not" in str(w.message)]


def test_compiled_loss_falls_back_to_eager_where_torch_compile_cannot_run(monkeypatch):
    """Where torch.compile cannot run (here under a ``TorchDispatchMode``), ``MultiBoxLoss(compile=True)`` warns once,
    says why, and computes the same loss eagerly."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import lightning_modules.box_ops as box_ops

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(box_ops, "_COMPILE_FAILED", {})
    priors = default_boxes(300)
    gen = torch.Generator().manual_seed(1)
    targets = _random_targets(4, gen)
    loc, conf = torch.randn(4, len(priors), 4, generator=gen), torch.randn(4, len(priors), 4, generator=gen)
    want = MultiBoxLoss(sync_free=True)(loc, conf, priors, targets)
    with Passthrough(), pytest.warns(RuntimeWarning, match="torch.compile could not build the MultiBox loss"):
        got = MultiBoxLoss(sync_free=True, compile=True)(loc, conf, priors, targets)
    assert "the MultiBox loss" in box_ops._COMPILE_FAILED
    for key in ("loss", "loc", "conf", "num_pos"):
        torch.testing.assert_close(got[key], want[key])

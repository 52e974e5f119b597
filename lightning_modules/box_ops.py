"""SSD's training loss and its decoding + NMS, on torchvision's box ops.

Boxes are normalised xyxy in [0, 1] throughout; the default boxes are (cx, cy, w, h).
torchvision provides the box coder (variances 0.1 / 0.2 == weights 10, 10, 5, 5) and ``batched_nms``; its
``SSDMatcher`` rule (IoU 0.5, and every ground truth also gets its best default box) is applied here to the whole
batch at once. Written here: the matching and the hard-negative-mined loss batched over images (torchvision's SSD
loops per image and sorts twice) and a decoder that caps candidates per class before NMS, as the Caffe original
does.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder, encode_boxes
from torchvision.ops import batched_nms, box_convert, nms

BOX_CODER = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))


def priors_xyxy(priors_cxcywh: Tensor) -> Tensor:
    return box_convert(priors_cxcywh, "cxcywh", "xyxy")


def packed_field(targets, key: str) -> tuple[Tensor, list[int]]:
    """Every image's ``key`` rows in one tensor, and each image's row count: taken as they are from a packed batch
    (``datamodules.targets.DetectionTargets``, what the loaders deliver), or concatenated from a list of per-image
    dicts."""
    if hasattr(targets, "field"):
        return targets.field(key), targets.counts(key)
    parts = [t[key] for t in targets]
    counts = [len(x) for x in parts]
    return (torch.cat(parts) if parts else torch.empty(0)), counts


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> Tensor:
    """Host numbers as a tensor on ``device`` without waiting for the device: ``torch.tensor(..., device=cuda)``
    copies and then synchronises the stream; from pinned memory the copy is queued like a kernel."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


_CODER_WEIGHTS: dict = {}


def encode(reference_boxes: Tensor, proposals: Tensor) -> Tensor:
    """``BOX_CODER.encode_single`` without its per-call ``torch.as_tensor(weights, device=...)`` (a blocking copy to
    a GPU in every training step): the weights are made once per device and dtype."""
    key = (reference_boxes.device, reference_boxes.dtype)
    if key not in _CODER_WEIGHTS:
        _CODER_WEIGHTS[key] = to_device(list(BOX_CODER.weights), reference_boxes.device, reference_boxes.dtype)
    return encode_boxes(reference_boxes, proposals, _CODER_WEIGHTS[key])


def box_iou_anchors(boxes: Tensor, anchors_t: Tensor) -> Tensor:
    """IoU of (T, 4) boxes with anchors given as (4, P) coordinate rows (x1, y1, x2, y2), both xyxy: (T, P). The
    same arithmetic in the same order as ``torchvision.ops.box_iou``, so the same values bit for bit, but in place
    on contiguous rows: 9.5x faster on a CPU for 774 boxes x 8,732 default boxes (4.0 against 38 ms, where the fresh
    (T, P, 2) temporaries of ``box_iou`` dominate)."""
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_a = (anchors_t[2] - anchors_t[0]) * (anchors_t[3] - anchors_t[1])
    w = torch.minimum(boxes[:, 2:3], anchors_t[2]).sub_(torch.maximum(boxes[:, 0:1], anchors_t[0])).clamp_(min=0)
    h = torch.minimum(boxes[:, 3:4], anchors_t[3]).sub_(torch.maximum(boxes[:, 1:2], anchors_t[1])).clamp_(min=0)
    inter = w.mul_(h)
    return inter.div_((area_b[:, None] + area_a).sub_(inter))


def reads_are_free(device: torch.device) -> bool:
    """Whether reading a value of ``device`` back to the host costs nothing but the copy: on a CPU. On any other
    device it waits for every kernel queued before it."""
    return device.type == "cpu"


class MultiBoxLoss:
    """Smooth-L1 localisation + softmax cross-entropy with 3:1 hard negatives, normalised by positives
    (Liu et al. 2016, eq. 1-3)."""

    def __init__(self, iou_threshold: float = 0.5, neg_pos_ratio: int = 3, sync_free: bool | None = None,
                 compile: bool = False):
        """``sync_free``: compute the loss without reading anything back to the host (no boolean-mask indexing, no
        data-dependent sizes), as it runs on a GPU, where each such read makes the host wait for the device in the
        middle of the step and would break a CUDA graph or a full-graph ``torch.compile``. None: on any device but
        the CPU, where reading is free and a ``topk`` of the batch's largest count of hard negatives is ~6x faster
        than ranking every box by a sort. Both give the same loss (tested).

        ``compile``: where the loss is sync-free, run the matching and the loss's terms (and so their backward)
        through ``torch.compile`` as one graph (dynamic shapes: the number of ground truths of a batch varies, one
        compilation serves them all): ~130 operations per step, each a kernel launch on a GPU, become a few fused
        kernels. The same loss as eager up to float rounding (tested). Where the loss reads back (a CPU with
        ``sync_free`` None or False) it stays eager: the top-k's size would break the graph."""
        self.iou_threshold = iou_threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.sync_free = sync_free
        self.compile = compile

    def _targets(self, targets, dev: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, int] | None:
        """The batch's ground truths as device tensors: boxes (T, 4), labels (T,), objects per image (N,), and N;
        None when the batch has no object at all."""
        boxes, counts = packed_field(targets, "boxes")
        if sum(counts) == 0:
            return None
        labels = packed_field(targets, "labels")[0].to(dev, torch.long)
        return boxes.to(dev, dtype), labels, to_device(counts, dev), len(counts)

    def match(self, priors: Tensor, targets: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
        """Per default box: class target (0 = background) and regression target, each (N, P, ...).

        One pass over the whole batch (no loop over images, so few kernel launches on a GPU): the IoU of every ground
        truth of the batch with every default box, (T, P), and torchvision's ``SSDMatcher`` rule as tensor ops within
        each image: a default box takes its image's best ground truth (the first of equals) if the IoU is >= the
        threshold, and each ground truth also takes its own best default box (where several claim one box, the later
        ground truth wins, as the per-image ``SSDMatcher`` does on a CPU; here deterministically on every device).
        The same targets as the per-image matcher (tested), at a cost that grows with the number of ground truths,
        not with the most crowded image times the batch."""
        anchors = priors_xyxy(priors)
        return self._match(anchors, self._targets(targets, anchors.device, anchors.dtype), len(targets))

    def _match(self, anchors: Tensor, gts: tuple | None, n: int) -> tuple[Tensor, Tensor]:
        if gts is None:  # no object in the batch: all background
            return (torch.zeros(n, len(anchors), dtype=torch.long, device=anchors.device),
                    torch.zeros(n, len(anchors), 4, dtype=anchors.dtype, device=anchors.device))
        return _match_batch(anchors, *gts, self.iou_threshold)

    def __call__(self, loc: Tensor, conf: Tensor, priors: Tensor, targets: list[dict[str, Tensor]],
                 normalize=None, class_weights: Tensor | None = None) -> dict[str, Tensor]:
        """``normalize`` maps this batch's positive count to the divisor (under DDP: the mean count over the ranks,
        so that the averaged gradient equals one process's on the whole global batch). ``class_weights`` (one per
        class target, index 0 = background) weighs each default box's localisation and confidence terms by its
        target class (the class-balanced loss of ``SSDDetector.class_balanced_loss``); None: every box counts 1."""
        sync_free = not reads_are_free(loc.device) if self.sync_free is None else self.sync_free
        w = None if class_weights is None else class_weights.to(loc.device, torch.float32)
        anchors = priors_xyxy(priors)
        gts = self._targets(targets, anchors.device, anchors.dtype)
        sums = None
        if gts is not None and sync_free and self.compile:
            sums = run_compiled("the MultiBox loss", _compiled_loss_sums, loc, conf, anchors, *gts, w,
                                self.iou_threshold, self.neg_pos_ratio)
        if sums is not None:
            loc_sum, conf_sum, num_pos = sums
        else:
            with torch.no_grad():
                cls_t, reg_t = self._match(anchors, gts, loc.shape[0])
            loc_sum, conf_sum, num_pos = _loss_sums(loc, conf, cls_t, reg_t, w, self.neg_pos_ratio, sync_free)
        n = (num_pos if normalize is None else normalize(num_pos)).clamp(min=1)
        loc_loss, conf_loss = loc_sum / n, conf_sum / n
        return {"loss": loc_loss + conf_loss, "loc": loc_loss, "conf": conf_loss, "num_pos": num_pos}


def _match_batch(anchors: Tensor, boxes: Tensor, labels: Tensor, cnt: Tensor, n: int,
                 iou_threshold: float) -> tuple[Tensor, Tensor]:
    """``MultiBoxLoss.match`` on device tensors: ``anchors`` (P, 4) xyxy, the batch's ``boxes`` (T, 4) and
    ``labels`` (T,), T > 0, ``cnt`` (N,) objects per image. Sync-free, and every size but N comes from a tensor's
    shape (so that a compiled graph serves every T)."""
    total, p, dev = boxes.shape[0], anchors.shape[0], anchors.device
    img = torch.repeat_interleave(torch.arange(n, device=dev), cnt, output_size=total)  # each gt's image
    gid = torch.arange(total, device=dev)
    iou = box_iou_anchors(boxes, anchors.t().contiguous())  # (T, P)
    per_img = img[:, None].expand(total, p)
    # each default box's best ground truth of its image: the best IoU, then the first gt that reaches it
    best = torch.full((n, p), -1.0, device=dev).scatter_reduce_(0, per_img, iou, "amax")
    rank = (iou != best.index_select(0, img)).to(iou.dtype).mul_(total).add_(gid.to(iou.dtype)[:, None])
    first = torch.full((n, p), 2.0 * total, device=dev).scatter_reduce_(0, per_img, rank, "amin").long()
    idx = torch.where(best >= iou_threshold, first, -1)
    # each ground truth's best default box is matched to it (the later of several claims wins)
    forced = torch.full((n * p,), -1, dtype=torch.long, device=dev).scatter_reduce_(
        0, img * p + iou.argmax(dim=1), gid, "amax").view(n, p)
    idx = torch.where(forced >= 0, forced, idx)
    fg = idx >= 0
    # background boxes regress to their image's first gt (as before; unused by the loss); none: zeros
    gi = torch.where(fg, idx, (cnt.cumsum(0) - cnt)[:, None]).clamp(max=total - 1)
    cls_t = torch.where(fg, labels[gi] + 1, 0)
    reg_t = encode(boxes[gi].reshape(-1, 4), anchors.repeat(n, 1)).view(n, p, 4)
    return cls_t, torch.where((cnt > 0)[:, None, None], reg_t, 0.0)


def _loss_sums(loc: Tensor, conf: Tensor, cls_t: Tensor, reg_t: Tensor, w: Tensor | None, neg_pos_ratio: int,
               sync_free: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The localisation and confidence sums (not yet divided by the positives) and the number of positives (float),
    from each default box's targets; ``w``: one weight per class target, or None."""
    pos = cls_t > 0
    num_pos = pos.sum()
    w_box = None if w is None else w[cls_t]  # (N, P)
    if sync_free:  # every box, the others' terms made exactly 0 (their gradient too: where, not a product)
        sl1 = F.smooth_l1_loss(torch.where(pos[..., None], loc.float(), reg_t), reg_t, reduction="none").sum(-1)
        loc_sum = (sl1 if w_box is None else sl1 * w_box).sum()
    elif w_box is None:
        loc_sum = F.smooth_l1_loss(loc[pos].float(), reg_t[pos], reduction="sum")
    else:  # each box's weight by its target
        loc_sum = (F.smooth_l1_loss(loc[pos].float(), reg_t[pos], reduction="none").sum(-1) * w_box[pos]).sum()
    ce = F.cross_entropy(conf.float().flatten(0, 1), cls_t.flatten(), reduction="none").view_as(cls_t)
    # Hard negatives: the (3 x positives) background boxes with the highest loss, per image: one top-k of the
    # batch's largest count instead of ranking every box by two full sorts (26x faster on a CPU at batch 32;
    # the same boxes up to ties of equal loss, so the same loss value). Sync-free: every box's rank by one sort
    # (the top-k's size would be read back from the device).
    with torch.no_grad():
        neg_ce = ce.masked_fill(pos, -1.0)
        k = neg_pos_ratio * pos.sum(dim=1, keepdim=True)
        if sync_free:
            order = neg_ce.argsort(dim=1, descending=True)
            ranks = torch.arange(neg_ce.shape[1], device=k.device).expand_as(order)
            neg = torch.empty_like(order).scatter_(1, order, ranks) < k
        else:
            kmax = min(int(k.max()), neg_ce.shape[1])
            _, hardest = neg_ce.topk(kmax, dim=1)
            neg = torch.zeros_like(pos).scatter_(1, hardest, torch.arange(kmax, device=k.device) < k)
    ce = ce if w_box is None else ce * w_box
    conf_sum = torch.where(pos | neg, ce, 0.0).sum() if sync_free else ce[pos | neg].sum()
    return loc_sum, conf_sum, num_pos.float()


def _match_and_loss_sums(loc: Tensor, conf: Tensor, anchors: Tensor, boxes: Tensor, labels: Tensor, cnt: Tensor,
                         n: int, w: Tensor | None, iou_threshold: float, neg_pos_ratio: int):
    """The sync-free loss's sums from the ground truths: what ``torch.compile`` gets as one graph."""
    with torch.no_grad():
        cls_t, reg_t = _match_batch(anchors, boxes, labels, cnt, n, iou_threshold)
    return _loss_sums(loc, conf, cls_t, reg_t, w, neg_pos_ratio, sync_free=True)


_COMPILED_LOSS = None


def _compiled_loss_sums():
    """``_match_and_loss_sums`` through ``torch.compile``, forward and backward: dynamic shapes (one compilation,
    ~12 s on a 2-core CPU, serves every batch size and number of ground truths), eager's rounding kept
    (``_eager_rounding``: the IoUs meet the matching threshold where eager's do)."""
    global _COMPILED_LOSS
    if _COMPILED_LOSS is None:
        _COMPILED_LOSS = torch.compile(_match_and_loss_sums, dynamic=True, fullgraph=True, options=_eager_rounding())
    return _COMPILED_LOSS


def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each group (boxes of different groups never suppress each other); indices kept, by decreasing
    score. torchvision's ``batched_nms`` on a GPU (one kernel, coordinate offsets), and on a CPU for small inputs.
    For many boxes on a CPU torchvision loops over the groups and finds each one's boxes with a full scan
    (O(groups x boxes), slow when the groups are every image x class of a batch); here the boxes are sorted by group
    once and each group's slice goes to ``nms``."""
    if boxes.device.type != "cpu" or boxes.numel() <= 4000:
        return batched_nms(boxes, scores, groups, iou_threshold)
    order = torch.sort(groups, stable=True).indices
    counts = torch.unique_consecutive(groups[order], return_counts=True)[1].tolist()
    keep = torch.cat([idx[nms(boxes[idx], scores[idx], iou_threshold)] for idx in order.split(counts)])
    return keep[scores[keep].argsort(descending=True)]


def _suppression(boxes: Tensor, valid: Tensor, later: Tensor, iou_threshold: float,
                 dtype: torch.dtype | None = None) -> Tensor:
    """(G, K, K) boolean matrix (or 0/1 of ``dtype``): ``sup[g, i, j]`` where box i of group g is a candidate, comes
    before box j (``later``) and overlaps it by IoU > the threshold, so that it suppresses j if it is kept. The IoU
    in the order of operations of torchvision's CPU ``nms`` kernel; in place on its temporaries (2x faster eager on
    a CPU than fresh tensors); compiled, one fused kernel (``_compiled_suppression``)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    w = torch.minimum(x2[:, :, None], x2[:, None, :]).sub_(torch.maximum(x1[:, :, None], x1[:, None, :]))
    h = torch.minimum(y2[:, :, None], y2[:, None, :]).sub_(torch.maximum(y1[:, :, None], y1[:, None, :]))
    inter = w.clamp_(min=0).mul_(h.clamp_(min=0))
    iou = inter.div_((area[:, :, None] + area[:, None, :]).sub_(inter))
    sup = (iou > iou_threshold) & later & valid[:, :, None]
    return sup if dtype is None else sup.to(dtype)


def _eager_rounding() -> dict:
    """Inductor options that keep eager's float rounding: no fused multiply-adds (``emulate_precision_casts``) and
    IEEE division on a GPU (Triton's ``/`` is approximate otherwise; ``eager_numerics.division_rounding``, named
    ``emulate_divison_rounding`` before torch 2.11): an IoU computed compiled then meets a threshold exactly where
    eager's does."""
    from torch._inductor import config

    options = {}
    if hasattr(config, "emulate_precision_casts"):
        options["emulate_precision_casts"] = True
    if hasattr(getattr(config, "eager_numerics", None), "division_rounding"):
        options["eager_numerics.division_rounding"] = True
    elif hasattr(config, "emulate_divison_rounding"):
        options["emulate_divison_rounding"] = True
    return options


_COMPILED_SUPPRESSION = None


def _compiled_suppression():
    """``_suppression`` through ``torch.compile`` (dynamic shapes: compiled once, ~5-20 s, for every group count
    and length), with Inductor told to keep eager's rounding (``_eager_rounding``). So the same matrix bit for bit
    as eager (tested on a CPU;
    ``bench_gpu --only decode`` checks the detections on a GPU), with one pass over memory instead of ~16: 4.4x
    faster on a CPU for 104 groups of 400 boxes (166 against 38 ms)."""
    global _COMPILED_SUPPRESSION
    if _COMPILED_SUPPRESSION is None:
        _COMPILED_SUPPRESSION = torch.compile(_suppression, dynamic=True, fullgraph=True, options=_eager_rounding())
    return _COMPILED_SUPPRESSION


_COMPILE_FAILED: dict[str, str] = {}  # what torch.compile could not build here, and why (then eager, once warned)


def run_compiled(what: str, compiled, *args):
    """``compiled()(*args)``, or None where ``torch.compile`` cannot run (no C++ compiler or Triton, a Python it does
    not support, a ``TorchDispatchMode`` active): the caller then computes the same thing eagerly, after one warning
    per ``what`` that says why."""
    if what in _COMPILE_FAILED:
        return None
    try:
        return compiled()(*args)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 (any failure to compile: fall back, say so)
        _COMPILE_FAILED[what] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        warnings.warn(f"torch.compile could not build {what} ({_COMPILE_FAILED[what]}); computing it eagerly instead "
                      "(the same result, slower)", RuntimeWarning, stacklevel=3)
    return None


_NMS_CHUNK = 1 << 24  # IoU entries computed at once by eager ``grouped_nms_dense`` (64 MB of float32 temporaries)


def grouped_nms_dense(boxes: Tensor, valid: Tensor, iou_threshold: float, compiled: bool = False) -> Tensor:
    """Greedy NMS in many small groups at once, with no loop over groups and no host sync per group: ``boxes`` (G, K,
    4) xyxy, each group's boxes by decreasing score, ``valid`` (G, K) the candidates; returns ``keep`` (G, K).

    Exactly torchvision's ``nms`` in each group (a box is dropped if its IoU with a kept, better-scoring box of its
    group is > the threshold; IoU computed in the same order of operations as its CPU kernel), computed as the fixed
    point of "keep = valid and not suppressed by a kept box" over the (G, K, K) suppression matrix (Cluster-NMS, Zheng
    et al. 2021): each round is one batched matrix product, and the greedy result is the only fixed point, reached in
    as many rounds as the longest chain of suppressions (a handful in practice; at most K). On a GPU this replaces
    torchvision's ``batched_nms`` fallback for many boxes, which loops over the groups (benchmarks/README.md, "GPU").
    Building the matrix is most of the work; ``compiled``: in one fused kernel (``_compiled_suppression``), else
    eager in chunks of ``_NMS_CHUNK`` entries."""
    g, k = valid.shape
    if g == 0 or k == 0:
        return valid.clone()
    dev = boxes.device
    dt = torch.float16 if dev.type == "cuda" else torch.float32  # 0/1 entries; sums <= K are exact either way
    later = torch.ones(k, k, dtype=torch.bool, device=dev).triu_(1)
    sup = (run_compiled("the NMS matrices", _compiled_suppression, boxes, valid, later, float(iou_threshold), dt)
           if compiled else None)
    if sup is None:
        sup = torch.empty(g, k, k, dtype=dt, device=dev)  # sup[g, i, j]: box i suppresses box j if i is kept
        step = max(1, _NMS_CHUNK // (k * k))
        for s in range(0, g, step):
            sup[s:s + step] = _suppression(boxes[s:s + step], valid[s:s + step], later, iou_threshold)
    keep = valid.clone()
    for _ in range(k):
        new = valid & ~(torch.bmm(keep.to(dt).unsqueeze(1), sup).squeeze(1) > 0)
        if torch.equal(new, keep):
            break
        keep = new
    return keep


def _decode_dense(boxes: Tensor, scores: Tensor, idx: Tensor, conf_threshold: float, nms_threshold: float,
                  top_k: int, compiled: bool = False) -> list[dict[str, Tensor]]:
    """``decode``'s NMS and top-k with ``grouped_nms_dense``: the (image, class) groups stay a padded tensor."""
    n, _, c = scores.shape
    valid = scores > conf_threshold  # (N, k, C); each column by decreasing score (topk)
    kk = int(valid.sum(dim=1).max()) if valid.numel() else 0  # the longest group: columns past it are all invalid
    if kk == 0:
        e = boxes.new_zeros(0, 4)
        return [{"boxes": e, "scores": e[:, 0], "labels": idx.new_zeros(0)} for _ in range(n)]
    scores, idx, valid = (t[:, :kk].transpose(1, 2) for t in (scores, idx, valid))  # (N, C, kk): one row per group
    cand = boxes.gather(1, idx.reshape(n, c * kk, 1).expand(-1, -1, 4))  # (N, C * kk, 4)
    keep = grouped_nms_dense(cand.reshape(n * c, kk, 4), valid.reshape(n * c, kk), nms_threshold,
                             compiled).reshape(n, c * kk)
    top_s, top_i = scores.reshape(n, c * kk).masked_fill(~keep, float("-inf")).topk(min(top_k, c * kk), dim=1)
    counts = keep.gather(1, top_i).sum(dim=1).tolist()  # kept ones come first (by decreasing score)
    top_b = cand.gather(1, top_i[..., None].expand(-1, -1, 4))
    labels = top_i // kk
    return [{"boxes": top_b[i, :m], "scores": top_s[i, :m], "labels": labels[i, :m]} for i, m in enumerate(counts)]


@torch.no_grad()
def decode(
    loc: Tensor,
    conf: Tensor,
    priors: Tensor,
    conf_threshold: float = 0.01,
    nms_threshold: float = 0.45,
    top_k: int = 200,
    pre_nms_top_k: int = 400,
    nms_method: str = "auto",
    compile: bool = False,
) -> list[dict[str, Tensor]]:
    """Detections per image: ``boxes`` (normalised xyxy), ``scores`` and 0-based ``labels``.

    Test-time settings of the original SSD: confidence 0.01, NMS 0.45, top 200 per image; at most
    ``pre_nms_top_k`` candidates per class enter NMS.

    One pass over the whole batch, on the device of ``loc``: the boxes of every image are decoded at once and the
    ``pre_nms_top_k`` best per (image, class) are taken with one ``topk``. Then NMS within every (image, class)
    group at once, by one of two methods that give the same detections (tested):

    * ``"dense"`` (``"auto"`` on a GPU): the groups stay a padded (image x class, candidates) tensor and
      ``grouped_nms_dense`` runs greedy NMS on all of them with batched matrix products; the ``top_k`` per image
      are one ``topk``. A few host syncs in all, none per group.
    * ``"sorted"`` (``"auto"`` on a CPU): the candidates are flattened and ``grouped_nms`` runs over every image
      and class together (group id = image * classes + class); the ``top_k`` per image are cut with a segmented
      rank. On a CPU, with many candidates, one ``nms`` call per non-empty group: less arithmetic than the dense
      matrices, which a CPU feels.

    ``compile``: the dense method builds its suppression matrices with one ``torch.compile``'d kernel (compiled
    once, for every shape; the same matrices bit for bit); ``sorted`` ignores it.

    The last Python loop is the split into one dict per image (views, no copies).
    """
    if nms_method not in ("auto", "dense", "sorted"):
        raise ValueError(f"decode: nms_method must be 'auto', 'dense' or 'sorted', not {nms_method!r}")
    n, p, _ = loc.shape
    anchors = priors_xyxy(priors)
    probs = conf.float().softmax(dim=-1)[..., 1:]  # drop background
    num_classes = probs.shape[-1]
    boxes = BOX_CODER.decode_single(loc.float().reshape(-1, 4), anchors.repeat(n, 1)).clamp(0.0, 1.0).view(n, p, 4)
    k = min(pre_nms_top_k, p)
    scores, idx = probs.topk(k, dim=1)  # (N, k, C): best boxes per image and class, by decreasing score
    if nms_method == "dense" or (nms_method == "auto" and loc.device.type != "cpu"):
        return _decode_dense(boxes, scores, idx, conf_threshold, nms_threshold, top_k, compile)
    keep = scores > conf_threshold
    image, _, labels = keep.nonzero(as_tuple=True)
    scores, idx = scores[keep], idx[keep]
    cand = boxes[image, idx]
    kept = grouped_nms(cand, scores, image * num_classes + labels, nms_threshold)  # by decreasing score
    img_k = image[kept]
    order = torch.sort(img_k, stable=True).indices  # group by image, keeping the score order inside each
    kept, img_k = kept[order], img_k[order]
    counts = torch.bincount(img_k, minlength=n)
    rank = torch.arange(len(kept), device=kept.device) - (counts.cumsum(0) - counts)[img_k]
    kept = kept[rank < top_k]
    per_image = torch.bincount(image[kept], minlength=n).tolist()
    return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in
            zip(cand[kept].split(per_image), scores[kept].split(per_image), labels[kept].split(per_image))]

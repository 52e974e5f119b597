"""VOC mean average precision, exactly as the VOC devkit (``VOCevaldet.m`` / py-faster-rcnn ``voc_eval.py``)
computes it, but vectorised over all images and detections at once.

The devkit's rules, each honoured here:
* boxes are inclusive pixel boxes: width = x2 - x1 + 1 (so feed VOC-convention coordinates);
* a detection is matched to the ground truth of its class and image with the largest IoU; it is a true
  positive if that IoU is > 0.5 and this ground truth was not already taken by a higher-scoring detection,
  else a false positive (it does *not* fall back to the second-best ground truth);
* a detection whose best ground truth is ``difficult`` is neither TP nor FP, and difficult ground truth
  does not count towards recall;
* AP is the 11-point interpolated AP for VOC2007 (``use_07_metric=True``), else the area under the
  monotone precision envelope (VOC2010+).

torchmetrics has no VOC metric; its ``MeanAveragePrecision`` is COCO-style (101-point, no +1, no difficult).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat


def _cat(x: Tensor | list[Tensor], cols: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if len(x) == 0:
        return torch.zeros((0, cols) if cols else (0,), dtype=dtype)
    return dim_zero_cat(x)


def voc_ap(rec: Tensor, prec: Tensor, use_07_metric: bool) -> Tensor:
    """AP from a recall/precision curve (both 1-D, in score order)."""
    if rec.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    if use_07_metric:
        t = torch.linspace(0, 1, 11, dtype=rec.dtype, device=rec.device)
        # max precision at recall >= t, 0 where no such point
        mask = rec.unsqueeze(0) >= t.unsqueeze(1)
        p = torch.where(mask, prec.unsqueeze(0), torch.zeros((), dtype=prec.dtype, device=prec.device))
        return p.max(dim=1).values.mean()
    mrec = torch.cat([rec.new_zeros(1), rec, rec.new_ones(1)])
    mpre = torch.cat([prec.new_zeros(1), prec, prec.new_zeros(1)])
    mpre = mpre.flip(0).cummax(0).values.flip(0)
    idx = torch.nonzero(mrec[1:] != mrec[:-1]).squeeze(1)
    return ((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]).sum()


def _iou_inclusive(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise IoU of broadcastable (..., 4) boxes in the devkit's +1 convention."""
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0]) + 1).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1]) + 1).clamp(min=0)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    return inter / (area_a + area_b - inter)


def voc_evaluate(
    det_boxes: Tensor, det_scores: Tensor, det_labels: Tensor, det_img: Tensor,
    gt_boxes: Tensor, gt_labels: Tensor, gt_difficult: Tensor, gt_img: Tensor,
    num_classes: int, iou_threshold: float = 0.5, use_07_metric: bool = True,
) -> Tensor:
    """AP per class (float64, NaN for a class with no non-difficult ground truth) from flat arrays.

    ``*_img`` give each box's image index. Vectorised: every detection is compared with the padded set of
    ground truths of its image in one (D, G_max) IoU matrix.
    """
    device = det_boxes.device
    ap = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    npos = torch.bincount(gt_labels[~gt_difficult], minlength=num_classes)[:num_classes].cpu()
    if det_boxes.numel() == 0:
        ap[npos > 0] = 0.0
        return ap
    det_boxes, gt_boxes = det_boxes.float(), gt_boxes.float()
    # Pad ground truth per image: pad_idx[i, s] = global index of the s-th gt of image i (-1 = none).
    n_img = int(max(det_img.max().item(), gt_img.max().item() if gt_img.numel() else -1)) + 1
    counts = torch.bincount(gt_img, minlength=n_img)
    g_max = int(counts.max().item()) if gt_img.numel() else 0
    if g_max == 0:
        ap[npos > 0] = 0.0
        return ap
    order = torch.argsort(gt_img, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(gt_img), device=device) - starts[gt_img[order]]
    pad_idx = torch.full((n_img, g_max), -1, dtype=torch.long, device=device)
    pad_idx[gt_img[order], slot] = order
    cand = pad_idx[det_img]  # (D, G_max)
    cand_c = cand.clamp(min=0)
    same = (cand >= 0) & (gt_labels[cand_c] == det_labels.unsqueeze(1))
    iou = _iou_inclusive(det_boxes.unsqueeze(1), gt_boxes[cand_c])
    iou = torch.where(same, iou, torch.full_like(iou, -1.0))
    # float32 decides "IoU > threshold" exactly except within rounding of the threshold: redo those in float64
    above = iou > iou_threshold
    near = same & ((iou - iou_threshold).abs() < 1e-4)
    if near.any():
        r, c = near.nonzero(as_tuple=True)
        above[r, c] = _iou_inclusive(det_boxes[r].double(), gt_boxes[cand_c[r, c]].double()) > iou_threshold
    ovmax, jmax = iou.max(dim=1)
    best = cand_c.gather(1, jmax.unsqueeze(1)).squeeze(1)
    hit = above.gather(1, jmax.unsqueeze(1)).squeeze(1)
    ignore = hit & gt_difficult[best]
    # One sort: by class, then by descending score (ties keep input order).
    srt = torch.argsort(det_scores, descending=True, stable=True)
    srt = srt[torch.argsort(det_labels[srt], stable=True)]
    rank = torch.empty_like(srt)
    rank[srt] = torch.arange(len(srt), device=device)
    # A hit is a TP iff it is the highest-ranked hit on its ground truth (ranks within a class follow scores).
    cand_hit = hit & ~ignore
    first = torch.full((len(gt_img),), len(srt), dtype=torch.long, device=device)
    first.scatter_reduce_(0, best[cand_hit], rank[cand_hit], reduce="amin")
    tp = cand_hit & (first[best] == rank)
    keep = ~ignore[srt]
    lab, tp_s = det_labels[srt][keep], tp[srt][keep].double()
    bounds = torch.searchsorted(lab, torch.arange(num_classes + 1, device=device))
    for c in range(num_classes):
        if npos[c] == 0:
            continue
        a, b = int(bounds[c]), int(bounds[c + 1])
        tp_c = tp_s[a:b].cumsum(0)
        fp_c = (1.0 - tp_s[a:b]).cumsum(0)
        rec = tp_c / float(npos[c])
        prec = tp_c / torch.clamp(tp_c + fp_c, min=torch.finfo(torch.float64).eps)
        ap[c] = voc_ap(rec.cpu(), prec.cpu(), use_07_metric)
    return ap


class VOCMeanAveragePrecision(Metric):
    """torchmetrics ``Metric`` for VOC mAP (see module docstring). DDP-safe: every state is a flat tensor
    concatenated across processes, and per-image box counts rebuild the image index after the gather.

    ``update(preds, targets)``: torchvision-style lists of dicts; ``boxes`` xyxy in pixels (VOC inclusive
    convention), ``scores``, ``labels`` (0-based, no background); targets may carry a boolean ``difficult``.
    ``compute()`` returns ``map`` (mean over classes that have ground truth) and ``ap_per_class``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, iou_threshold: float = 0.5, use_07_metric: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.iou_threshold = iou_threshold
        self.use_07_metric = use_07_metric
        for name in ("det_boxes", "det_scores", "det_labels", "det_count",
                     "gt_boxes", "gt_labels", "gt_difficult", "gt_count"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets")
        if not preds:
            return
        # one tensor per state and call (not per image): fewer, larger tensors to keep and to gather under DDP
        self.det_boxes.append(torch.cat([p["boxes"].reshape(-1, 4).float() for p in preds]))
        self.det_scores.append(torch.cat([p["scores"].reshape(-1).float() for p in preds]))
        self.det_labels.append(torch.cat([p["labels"].reshape(-1).long() for p in preds]))
        self.det_count.append(torch.tensor([len(p["scores"]) for p in preds], device=self.device))
        self.gt_boxes.append(torch.cat([t["boxes"].reshape(-1, 4).float() for t in targets]))
        self.gt_labels.append(torch.cat([t["labels"].reshape(-1).long() for t in targets]))
        self.gt_difficult.append(torch.cat([
            t["difficult"].reshape(-1).bool() if t.get("difficult") is not None
            else torch.zeros(len(t["labels"]), dtype=torch.bool, device=self.device) for t in targets]))
        self.gt_count.append(torch.tensor([len(t["labels"]) for t in targets], device=self.device))

    def compute(self) -> dict[str, Tensor]:
        det_count = _cat(self.det_count, dtype=torch.long).long()
        gt_count = _cat(self.gt_count, dtype=torch.long).long()
        img = torch.arange(len(det_count), device=det_count.device)
        ap = voc_evaluate(
            _cat(self.det_boxes, 4), _cat(self.det_scores), _cat(self.det_labels, dtype=torch.long).long(),
            img.repeat_interleave(det_count),
            _cat(self.gt_boxes, 4), _cat(self.gt_labels, dtype=torch.long).long(),
            _cat(self.gt_difficult, dtype=torch.bool).bool(), img.repeat_interleave(gt_count),
            self.num_classes, self.iou_threshold, self.use_07_metric,
        )
        valid = ~torch.isnan(ap)
        m = ap[valid].mean() if valid.any() else torch.zeros((), dtype=torch.float64)
        return {"map": m.float(), "ap_per_class": ap.float(), "num_images": torch.tensor(len(det_count))}

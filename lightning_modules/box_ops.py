"""SSD's training loss and its decoding + NMS, on torchvision's box ops.

Boxes are normalised xyxy in [0, 1] throughout; the default boxes are (cx, cy, w, h).
torchvision provides the box coder (variances 0.1 / 0.2 == weights 10, 10, 5, 5), the IoU-0.5 matcher
that also gives every ground truth its best default box (``SSDMatcher``) and ``batched_nms``.
Written here: the hard-negative-mined loss batched over images (torchvision's SSD loops per image and
sorts twice) and a decoder that caps candidates per class before NMS, as the Caffe original does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder, SSDMatcher
from torchvision.ops import batched_nms, box_convert, box_iou, nms

BOX_CODER = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))


def priors_xyxy(priors_cxcywh: Tensor) -> Tensor:
    return box_convert(priors_cxcywh, "cxcywh", "xyxy")


class MultiBoxLoss:
    """Smooth-L1 localisation + softmax cross-entropy with 3:1 hard negatives, normalised by positives
    (Liu et al. 2016, eq. 1-3)."""

    def __init__(self, iou_threshold: float = 0.5, neg_pos_ratio: int = 3):
        self.matcher = SSDMatcher(iou_threshold)
        self.neg_pos_ratio = neg_pos_ratio

    def match(self, priors: Tensor, targets: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
        """Per default box: class target (0 = background) and regression target, each (N, P, ...)."""
        anchors = priors_xyxy(priors)
        cls_t, reg_t = [], []
        for t in targets:
            boxes, labels = t["boxes"], t["labels"]
            if boxes.numel() == 0:
                cls_t.append(torch.zeros(len(anchors), dtype=torch.long, device=anchors.device))
                reg_t.append(torch.zeros_like(anchors))
                continue
            idx = self.matcher(box_iou(boxes, anchors))
            fg = idx >= 0
            cls = torch.zeros(len(anchors), dtype=torch.long, device=anchors.device)
            cls[fg] = labels[idx[fg]] + 1
            reg = BOX_CODER.encode_single(boxes[idx.clamp(min=0)], anchors)
            cls_t.append(cls)
            reg_t.append(reg)
        return torch.stack(cls_t), torch.stack(reg_t)

    def __call__(self, loc: Tensor, conf: Tensor, priors: Tensor, targets: list[dict[str, Tensor]],
                 normalize=None, class_weights: Tensor | None = None) -> dict[str, Tensor]:
        """``normalize`` maps this batch's positive count to the divisor (under DDP: the mean count over the ranks,
        so that the averaged gradient equals one process's on the whole global batch). ``class_weights`` (one per
        class target, index 0 = background) weighs each default box's localisation and confidence terms by its
        target class (the class-balanced loss of ``SSDDetector.class_balanced_loss``); None: every box counts 1."""
        with torch.no_grad():
            cls_t, reg_t = self.match(priors, targets)
        pos = cls_t > 0
        num_pos = pos.sum()
        if class_weights is None:
            loc_loss = F.smooth_l1_loss(loc[pos].float(), reg_t[pos], reduction="sum")
        else:
            w_box = class_weights.to(loc.device, torch.float32)[cls_t]  # (N, P): each box's weight by its target
            loc_loss = (F.smooth_l1_loss(loc[pos].float(), reg_t[pos], reduction="none").sum(-1) * w_box[pos]).sum()
        ce = F.cross_entropy(conf.float().flatten(0, 1), cls_t.flatten(), reduction="none").view_as(cls_t)
        # Hard negatives: the (3 x positives) background boxes with the highest loss, per image.
        with torch.no_grad():
            neg_ce = ce.masked_fill(pos, -1.0)
            rank = neg_ce.argsort(dim=1, descending=True).argsort(dim=1)
            neg = rank < self.neg_pos_ratio * pos.sum(dim=1, keepdim=True)
        n = (num_pos.float() if normalize is None else normalize(num_pos.float())).clamp(min=1)
        loc_loss = loc_loss / n
        conf_loss = (ce if class_weights is None else ce * w_box)[pos | neg].sum() / n
        return {"loss": loc_loss + conf_loss, "loc": loc_loss, "conf": conf_loss, "num_pos": num_pos.float()}


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


@torch.no_grad()
def decode(
    loc: Tensor,
    conf: Tensor,
    priors: Tensor,
    conf_threshold: float = 0.01,
    nms_threshold: float = 0.45,
    top_k: int = 200,
    pre_nms_top_k: int = 400,
) -> list[dict[str, Tensor]]:
    """Detections per image: ``boxes`` (normalised xyxy), ``scores`` and 0-based ``labels``.

    Test-time settings of the original SSD: confidence 0.01, NMS 0.45, top 200 per image; at most
    ``pre_nms_top_k`` candidates per class enter NMS.

    One pass over the whole batch, on the device of ``loc``: the boxes of every image are decoded at once, the
    ``pre_nms_top_k`` best per (image, class) are taken with one ``topk``, and one ``batched_nms`` runs over every
    image and class together (group id = image * classes + class, so boxes of different images or classes never
    suppress each other; ``grouped_nms``); the ``top_k`` per image are then cut with a segmented rank, not a loop.
    Python loops left: the final split into one dict per image (views, no copies) and, on a CPU with many
    candidates, one ``nms`` call per non-empty group.
    """
    n, p, _ = loc.shape
    anchors = priors_xyxy(priors)
    probs = conf.float().softmax(dim=-1)[..., 1:]  # drop background
    num_classes = probs.shape[-1]
    boxes = BOX_CODER.decode_single(loc.float().reshape(-1, 4), anchors.repeat(n, 1)).clamp(0.0, 1.0).view(n, p, 4)
    k = min(pre_nms_top_k, p)
    scores, idx = probs.topk(k, dim=1)  # (N, k, C): best boxes per image and class
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

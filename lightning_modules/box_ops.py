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
from torchvision.ops import batched_nms, box_convert, box_iou

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
                 normalize=None) -> dict[str, Tensor]:
        """``normalize`` maps this batch's positive count to the divisor (under DDP: the mean count over the ranks,
        so that the averaged gradient equals one process's on the whole global batch)."""
        with torch.no_grad():
            cls_t, reg_t = self.match(priors, targets)
        pos = cls_t > 0
        num_pos = pos.sum()
        loc_loss = F.smooth_l1_loss(loc[pos].float(), reg_t[pos], reduction="sum")
        ce = F.cross_entropy(conf.float().flatten(0, 1), cls_t.flatten(), reduction="none").view_as(cls_t)
        # Hard negatives: the (3 x positives) background boxes with the highest loss, per image.
        with torch.no_grad():
            neg_ce = ce.masked_fill(pos, -1.0)
            rank = neg_ce.argsort(dim=1, descending=True).argsort(dim=1)
            neg = rank < self.neg_pos_ratio * pos.sum(dim=1, keepdim=True)
        n = (num_pos.float() if normalize is None else normalize(num_pos.float())).clamp(min=1)
        loc_loss = loc_loss / n
        conf_loss = ce[pos | neg].sum() / n
        return {"loss": loc_loss + conf_loss, "loc": loc_loss, "conf": conf_loss, "num_pos": num_pos.float()}


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
    """
    anchors = priors_xyxy(priors)
    probs = conf.float().softmax(dim=-1)[..., 1:]  # drop background
    num_classes = probs.shape[-1]
    out = []
    for loc_i, probs_i in zip(loc, probs):
        boxes = BOX_CODER.decode_single(loc_i.float(), anchors).clamp(0.0, 1.0)
        k = min(pre_nms_top_k, probs_i.shape[0])
        scores, idx = probs_i.topk(k, dim=0)  # (k, C): best boxes per class
        labels = torch.arange(num_classes, device=probs_i.device).expand(k, num_classes)
        keep = scores > conf_threshold
        scores, idx, labels = scores[keep], idx[keep], labels[keep]
        cand = boxes[idx]
        kept = batched_nms(cand, scores, labels, nms_threshold)[:top_k]
        out.append({"boxes": cand[kept], "scores": scores[kept], "labels": labels[kept]})
    return out

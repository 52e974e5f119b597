"""SSD data augmentation (Liu et al. 2016, sec. 2.2 and the Caffe ``ssd_pascal.py`` policy) in albumentations.

albumentations has neither SSD's zoom-out ("expand") nor its min-IoU random crop, so both are written here
as albumentations ``DualTransform``s; everything else is albumentations' own. The crop fixes the condition
that the widely copied PyTorch port gets wrong (``if overlap.min() < min_iou and max_iou < overlap.max()``
never fires, so any crop is accepted): here a crop is rejected as soon as one box overlaps it less than
the sampled minimum IoU.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.core.transforms_interface import DualTransform

# Sample options of the original: no crop, min IoU 0.1 / 0.3 / 0.5 / 0.7 / 0.9, or any crop.
MIN_IOU_OPTIONS: tuple[float | None, ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9, 0.0)


def _iou_with_crop(boxes: np.ndarray, crop: np.ndarray) -> np.ndarray:
    """IoU of (N, 4) boxes with one crop rectangle, all in the same (pixel) units."""
    lt = np.maximum(boxes[:, :2], crop[:2])
    rb = np.minimum(boxes[:, 2:4], crop[2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_c = (crop[2] - crop[0]) * (crop[3] - crop[1])
    return inter / (area_b + area_c - inter)


class MinIoURandomCrop(DualTransform):
    """SSD's random crop: pick a minimum IoU from ``MIN_IOU_OPTIONS``, then up to ``max_trials`` crops
    with sides in [``min_scale``, 1] of the image and aspect ratio in [1/2, 2]; accept the first whose IoU
    with *every* box is >= the minimum and that contains at least one box centre. Boxes whose centre falls
    outside the crop are dropped; the rest are clipped to it. ``None`` (or no accepted crop) keeps the image.
    """

    def __init__(self, min_ious: tuple[float | None, ...] = MIN_IOU_OPTIONS, min_scale: float = 0.3,
                 max_trials: int = 50, p: float = 1.0):
        super().__init__(p=p)
        self.min_ious = tuple(min_ious)
        self.min_scale = min_scale
        self.max_trials = max_trials

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        full = (0, 0, w, h)
        bboxes = np.asarray(data.get("bboxes", np.zeros((0, 4))))
        boxes = bboxes[:, :4] * np.array([w, h, w, h], dtype=np.float64) if len(bboxes) else np.zeros((0, 4))
        min_iou = self.min_ious[self.py_random.randrange(len(self.min_ious))]
        if min_iou is None or len(boxes) == 0:
            return {"crop_coords": full}
        centres = (boxes[:, :2] + boxes[:, 2:4]) / 2
        for _ in range(self.max_trials):
            cw = self.py_random.uniform(self.min_scale * w, w)
            ch = self.py_random.uniform(self.min_scale * h, h)
            if not 0.5 <= ch / cw <= 2.0:
                continue
            x0 = self.py_random.uniform(0, w - cw)
            y0 = self.py_random.uniform(0, h - ch)
            crop = np.array([int(x0), int(y0), int(x0 + cw), int(y0 + ch)], dtype=np.float64)
            if crop[2] <= crop[0] or crop[3] <= crop[1]:
                continue
            if _iou_with_crop(boxes, crop).min() < min_iou:
                continue
            inside = (centres[:, 0] > crop[0]) & (centres[:, 0] < crop[2]) & (centres[:, 1] > crop[1]) & (centres[:, 1] < crop[3])
            if not inside.any():
                continue
            return {"crop_coords": tuple(int(v) for v in crop)}
        return {"crop_coords": full}

    def apply(self, img: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        x0, y0, x1, y1 = crop_coords
        return np.ascontiguousarray(img[y0:y1, x0:x1])

    def apply_to_bboxes(self, bboxes: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        if len(bboxes) == 0:
            return bboxes
        h, w = params["shape"][:2]
        x0, y0, x1, y1 = crop_coords
        out = bboxes.astype(np.float64).copy()
        out[:, [0, 2]] *= w
        out[:, [1, 3]] *= h
        cx, cy = (out[:, 0] + out[:, 2]) / 2, (out[:, 1] + out[:, 3]) / 2
        keep = (cx > x0) & (cx < x1) & (cy > y0) & (cy < y1)
        out = out[keep]
        out[:, [0, 2]] = (np.clip(out[:, [0, 2]], x0, x1) - x0) / (x1 - x0)
        out[:, [1, 3]] = (np.clip(out[:, [1, 3]], y0, y1) - y0) / (y1 - y0)
        return out.astype(bboxes.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_ious", "min_scale", "max_trials")


class ZoomOut(DualTransform):
    """SSD's "expand": place the image at a random spot of a canvas up to ``max_ratio`` times larger,
    filled with the dataset mean, so that objects become small."""

    def __init__(self, max_ratio: float = 4.0, fill: tuple[int, int, int] = (124, 116, 104), p: float = 0.5):
        super().__init__(p=p)
        self.max_ratio = max_ratio
        self.fill = fill

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        r = self.py_random.uniform(1.0, self.max_ratio)
        ow, oh = int(w * r), int(h * r)
        left = int(self.py_random.uniform(0, ow - w))
        top = int(self.py_random.uniform(0, oh - h))
        return {"canvas": (oh, ow), "offset": (top, left)}

    def apply(self, img: np.ndarray, canvas: tuple[int, int], offset: tuple[int, int], **params: Any) -> np.ndarray:
        out = np.empty((*canvas, img.shape[2]), dtype=img.dtype)
        out[...] = np.asarray(self.fill, dtype=img.dtype)
        top, left = offset
        out[top:top + img.shape[0], left:left + img.shape[1]] = img
        return out

    def apply_to_bboxes(self, bboxes: np.ndarray, canvas: tuple[int, int], offset: tuple[int, int], **params: Any) -> np.ndarray:
        if len(bboxes) == 0:
            return bboxes
        h, w = params["shape"][:2]
        oh, ow = canvas
        top, left = offset
        out = bboxes.copy()
        out[:, [0, 2]] = (bboxes[:, [0, 2]] * w + left) / ow
        out[:, [1, 3]] = (bboxes[:, [1, 3]] * h + top) / oh
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_ratio", "fill")


def _bbox_params() -> A.BboxParams:
    return A.BboxParams(format="pascal_voc", label_fields=["labels", "difficult"], clip=True, min_area=1.0)


def ssd_train_transform(size: int, zoom_out: float = 4.0, policy: str = "ssd") -> A.Compose:
    """Training augmentation. ``policy="ssd"``: SSD's photometric distortion, zoom-out, min-IoU crop, flip,
    resize. ``policy="light"``: photometric distortion, flip and resize only, for very short schedules
    (the CPU demo) where the geometric policy slows convergence more than it helps generalisation.

    Images stay uint8 RGB; normalisation happens on the device, on whole batches.
    """
    if policy not in ("ssd", "light"):
        raise ValueError(f"augmentation policy must be 'ssd' or 'light', got {policy!r}")
    geometric = [ZoomOut(max_ratio=zoom_out, p=0.5 if zoom_out > 1 else 0.0), MinIoURandomCrop()] if policy == "ssd" else []
    return A.Compose(
        [
            A.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05, p=0.5),
            A.ChannelShuffle(p=0.05),
            *geometric,
            A.HorizontalFlip(p=0.5),
            A.Resize(size, size, interpolation=cv2.INTER_LINEAR),
        ],
        bbox_params=_bbox_params(),
    )


def ssd_eval_transform(size: int) -> A.Compose:
    """Evaluation: resize only."""
    return A.Compose([A.Resize(size, size, interpolation=cv2.INTER_LINEAR)], bbox_params=_bbox_params())

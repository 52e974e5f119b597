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


def opencv_one_thread() -> None:
    """OpenCV on one thread, for data-loader workers. By default each process's OpenCV starts a thread per core for
    every decode, warp and resize, so N workers run N x cores threads and slow each other down (albumentations'
    advice; benchmarks/bench_augment.py times one worker this way); the workers are the parallelism.

    The loaders call it in the main process *before* the workers fork (a forked worker inherits the setting), and
    ``init_loader_worker`` calls it again in each worker, where it only acts if the setting was not inherited
    (spawned workers). Changing it inside a forked worker whose parent had already used OpenCV's thread pool hangs
    the worker for good (reproduced: tests/test_voc.py)."""
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


def init_loader_worker(worker_id: int) -> None:
    """A DataLoader's ``worker_init_fn``: ``opencv_one_thread``. Random state is untouched: augmentation draws from
    per-sample seeds (``TrainSampler``)."""
    opencv_one_thread()


# Sample options of the original: no crop, min IoU 0.1 / 0.3 / 0.5 / 0.7 / 0.9, or any crop.
MIN_IOU_OPTIONS: tuple[float | None, ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9, 0.0)


def _iou_with_crops(boxes: np.ndarray, crops: np.ndarray) -> np.ndarray:
    """IoU of (N, 4) boxes with (T, 4) crop rectangles, all in the same (pixel) units: (T, N)."""
    lt = np.maximum(boxes[None, :, :2], crops[:, None, :2])
    rb = np.minimum(boxes[None, :, 2:4], crops[:, None, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_c = (crops[:, 2] - crops[:, 0]) * (crops[:, 3] - crops[:, 1])
    return inter / (area_b[None, :] + area_c[:, None] - inter)


def _draw_crop(rng, w: int, h: int, min_scale: float) -> tuple[int, int, int, int] | None:
    """One trial of SSD's crop: side lengths, then (if the aspect ratio is within [1/2, 2]) the corner."""
    cw = rng.uniform(min_scale * w, w)
    ch = rng.uniform(min_scale * h, h)
    if not 0.5 <= ch / cw <= 2.0:
        return None
    x0 = rng.uniform(0, w - cw)
    y0 = rng.uniform(0, h - ch)
    return int(x0), int(y0), int(x0 + cw), int(y0 + ch)


def _sample_crop(rng, w: int, h: int, boxes: np.ndarray, min_ious: tuple[float | None, ...], min_scale: float,
                 max_trials: int) -> tuple[int, int, int, int]:
    """SSD's crop of a ``w`` x ``h`` image with ``boxes`` (N, 4) in pixels: ``MinIoURandomCrop``'s rule, drawing
    from ``rng`` (a ``random.Random``). The whole image when the option drawn is "no crop" or no trial is accepted.

    All ``max_trials`` trials are drawn first and checked together (one IoU matrix, not a dozen small numpy calls
    per trial: 3.3x faster on facemask); when one is accepted, ``rng`` is rewound and the trials up to it drawn again,
    so the crop and the random numbers consumed are exactly those of checking one trial at a time (tested)."""
    full = (0, 0, w, h)
    min_iou = min_ious[rng.randrange(len(min_ious))]
    if min_iou is None or len(boxes) == 0:
        return full
    state = rng.getstate()
    trials = [_draw_crop(rng, w, h, min_scale) for _ in range(max_trials)]
    which = [i for i, c in enumerate(trials) if c is not None and c[2] > c[0] and c[3] > c[1]]
    if not which:
        return full
    crops = np.array([trials[i] for i in which], dtype=np.float64)  # (T, 4)
    iou = _iou_with_crops(boxes, crops)
    centres = (boxes[:, :2] + boxes[:, 2:4]) / 2
    inside = ((centres[None, :, 0] > crops[:, None, 0]) & (centres[None, :, 0] < crops[:, None, 2])
              & (centres[None, :, 1] > crops[:, None, 1]) & (centres[None, :, 1] < crops[:, None, 3]))
    ok = ~(iou.min(axis=1) < min_iou) & inside.any(axis=1)
    if not ok.any():
        return full
    first = which[int(ok.argmax())]
    rng.setstate(state)  # rewind: consume only the draws of the trials up to the accepted one
    for _ in range(first + 1):
        _draw_crop(rng, w, h, min_scale)
    return trials[first]


def _crop_boxes(bboxes: np.ndarray, px: np.ndarray, crop: tuple[int, int, int, int]) -> np.ndarray:
    """``bboxes`` (albumentations rows: 4 normalised coordinates + extra columns) whose pixel coordinates ``px``
    have their centre inside ``crop``, clipped to it and normalised to it; the extra columns travel along."""
    x0, y0, x1, y1 = crop
    out = bboxes.astype(np.float64).copy()
    out[:, :4] = px
    cx, cy = (px[:, 0] + px[:, 2]) / 2, (px[:, 1] + px[:, 3]) / 2
    out = out[(cx > x0) & (cx < x1) & (cy > y0) & (cy < y1)]
    out[:, [0, 2]] = (np.clip(out[:, [0, 2]], x0, x1) - x0) / (x1 - x0)
    out[:, [1, 3]] = (np.clip(out[:, [1, 3]], y0, y1) - y0) / (y1 - y0)
    return out.astype(bboxes.dtype)


def _sample_zoom(rng, h: int, w: int, max_ratio: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """SSD's expand: a canvas (height, width) up to ``max_ratio`` times the image and the image's (top, left) on it."""
    r = rng.uniform(1.0, max_ratio)
    ow, oh = int(w * r), int(h * r)
    left = int(rng.uniform(0, ow - w))
    top = int(rng.uniform(0, oh - h))
    return (oh, ow), (top, left)


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
        bboxes = np.asarray(data.get("bboxes", np.zeros((0, 4))))
        boxes = bboxes[:, :4] * np.array([w, h, w, h], dtype=np.float64) if len(bboxes) else np.zeros((0, 4))
        return {"crop_coords": _sample_crop(self.py_random, w, h, boxes, self.min_ious, self.min_scale, self.max_trials)}

    def apply(self, img: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        x0, y0, x1, y1 = crop_coords
        return np.ascontiguousarray(img[y0:y1, x0:x1])

    def apply_to_bboxes(self, bboxes: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        if len(bboxes) == 0:
            return bboxes
        h, w = params["shape"][:2]
        return _crop_boxes(bboxes, bboxes[:, :4].astype(np.float64) * np.array([w, h, w, h]), crop_coords)

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
        canvas, offset = _sample_zoom(self.py_random, h, w, self.max_ratio)
        return {"canvas": canvas, "offset": offset}

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


class ZoomOutCropResize(DualTransform):
    """``ZoomOut`` (probability ``zoom_p``), then ``MinIoURandomCrop``, then a resize to ``size`` x ``size``, as one
    bilinear warp from the source image: the same random draws in the same order, the same boxes, and the same
    pixels up to rounding (and the outermost half pixel of a crop, which the warp reads from its neighbours where the
    three steps repeat the crop's edge), but never the zoomed-out canvas (up to ``max_ratio`` squared times the image:
    16x for VOC's 4) nor the crop are built. The three steps took 3.4 ms of a 4.0 ms training transform of a 500 x 375
    image; with the warp a worker's decode + augment is 2.0-2.7x faster (benchmarks/README.md, "SSD augmentation
    throughput per worker")."""

    def __init__(self, size: int, max_ratio: float = 4.0, fill: tuple[int, int, int] = (124, 116, 104),
                 zoom_p: float = 0.5, min_ious: tuple[float | None, ...] = MIN_IOU_OPTIONS, min_scale: float = 0.3,
                 max_trials: int = 50, p: float = 1.0):
        super().__init__(p=p)
        self.size, self.max_ratio, self.fill, self.zoom_p = size, max_ratio, tuple(fill), zoom_p
        self.min_ious, self.min_scale, self.max_trials = tuple(min_ious), min_scale, max_trials

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        # the draws of ZoomOut(p=zoom_p).should_apply, ZoomOut's parameters, then MinIoURandomCrop's
        zoom = self.zoom_p >= 1.0 or (self.zoom_p > 0.0 and self.py_random.random() < self.zoom_p)
        (ch, cw), (top, left) = _sample_zoom(self.py_random, h, w, self.max_ratio) if zoom else ((h, w), (0, 0))
        bboxes = np.asarray(data.get("bboxes", np.zeros((0, 4))))
        px = (bboxes[:, :4] * np.array([w, h, w, h], dtype=np.float64) + np.array([left, top, left, top])
              if len(bboxes) else np.zeros((0, 4)))
        crop = _sample_crop(self.py_random, cw, ch, px, self.min_ious, self.min_scale, self.max_trials)
        return {"offset": (top, left), "crop_coords": crop}

    def apply(self, img: np.ndarray, offset: tuple[int, int], crop_coords: tuple[int, int, int, int],
              **params: Any) -> np.ndarray:
        top, left = offset
        x0, y0, x1, y1 = crop_coords
        sx, sy = self.size / (x1 - x0), self.size / (y1 - y0)
        # source pixel x -> canvas x + left -> crop x + left - x0 -> output, with cv2.resize's pixel-centre convention
        m = np.array([[sx, 0.0, (left - x0 + 0.5) * sx - 0.5], [0.0, sy, (top - y0 + 0.5) * sy - 0.5]])
        fill = self.fill if img.ndim == 3 and img.shape[2] == 3 else self.fill[0]
        return cv2.warpAffine(img, m, (self.size, self.size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=fill)

    def apply_to_bboxes(self, bboxes: np.ndarray, offset: tuple[int, int], crop_coords: tuple[int, int, int, int],
                        **params: Any) -> np.ndarray:
        if len(bboxes) == 0:
            return bboxes
        h, w = params["shape"][:2]
        top, left = offset
        px = bboxes[:, :4].astype(np.float64) * np.array([w, h, w, h]) + np.array([left, top, left, top])
        return _crop_boxes(bboxes, px, crop_coords)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "max_ratio", "fill", "zoom_p", "min_ious", "min_scale", "max_trials")


def _bbox_params() -> A.BboxParams:
    return A.BboxParams(format="pascal_voc", label_fields=["labels", "difficult"], clip=True, min_area=1.0)


def ssd_train_transform(size: int, zoom_out: float = 4.0, policy: str = "ssd") -> A.Compose:
    """Training augmentation. ``policy="ssd"``: SSD's zoom-out, min-IoU crop and resize (one warp:
    ``ZoomOutCropResize``), flip, photometric distortion. ``policy="light"``: flip, resize and photometric distortion
    only, for very short schedules (the CPU demo) where the geometric policy slows convergence more than it helps
    generalisation.

    The photometric distortion comes last, on the network's input size: its cost grows with the pixels (at p=0.5 about
    10 ms per 1360 x 800 GTSDB image on one CPU core against 0.7 ms at 300 x 300). SSD's papers distort first; the
    difference is that the zoom-out's fill is distorted too, and contrast is taken about the crop's mean.

    Images stay uint8 RGB; normalisation happens on the device, on whole batches.
    """
    if policy not in ("ssd", "light"):
        raise ValueError(f"augmentation policy must be 'ssd' or 'light', got {policy!r}")
    photometric = [A.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05, p=0.5),
                   A.ChannelShuffle(p=0.05)]
    if policy == "ssd":  # zoom-out, crop and resize in one warp (ZoomOutCropResize); the flip on the small result
        geometric = [ZoomOutCropResize(size, max_ratio=zoom_out, zoom_p=0.5 if zoom_out > 1 else 0.0),
                     A.HorizontalFlip(p=0.5)]
    else:
        geometric = [A.HorizontalFlip(p=0.5), A.Resize(size, size, interpolation=cv2.INTER_LINEAR)]
    return A.Compose([*geometric, *photometric], bbox_params=_bbox_params())


def ssd_eval_transform(size: int) -> A.Compose:
    """Evaluation: resize only."""
    return A.Compose([A.Resize(size, size, interpolation=cv2.INTER_LINEAR)], bbox_params=_bbox_params())

"""Saving, loading and shipping trained (pruned) detectors.

* ``read_checkpoint``: a Lightning checkpoint loaded with ``weights_only=True``, with clear errors for missing,
  truncated or foreign files.
* ``AtomicCheckpointIO``: Lightning's checkpoint IO, but every write goes to a temporary file that is fsynced and
  renamed over the target, so a crash never leaves a half-written ``last.ckpt``.
* ``load_detector``: an ``SSDDetector`` from a checkpoint or an export folder, at the architecture it was saved with.
* ``export_detector``: ``model.safetensors`` + ``model.json`` (see ``lightning_modules.ssd.save_exported``) and
  ``model.onnx`` (normalisation inside, raw head outputs, dynamic batch).
* ``predict_folder``: detections for a folder of images, as PNGs with the boxes drawn and one JSON file.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from lightning_modules.checkpoints import AtomicCheckpointIO, CheckpointError, model_state_dict, read_checkpoint  # noqa: F401
from lightning_modules.ssd import (
    IMAGENET_MEAN, IMAGENET_STD, SSD, WeightsMismatchError, check_state_dict, load_exported, read_export_spec,
    save_exported,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------------------------- detectors
def _detector_from_spec(hparams: dict, arch: dict):
    import inspect

    from lightning_modules.detector import SSDDetector

    accepted = set(inspect.signature(SSDDetector.__init__).parameters) - {"self"}
    hp = {k: v for k, v in hparams.items() if k in accepted}  # drops LightningCLI's _class_path & co.
    hp.update(channels=arch["channels"], num_branches=arch["num_branches"], width_mult=1.0,
              pretrained_backbone=False, init_checkpoint=None)
    return SSDDetector(**hp)


def load_detector(path, **overrides):
    """An ``SSDDetector`` (eval mode, CPU) from a Lightning checkpoint or an export folder (model.json +
    model.safetensors), rebuilt at the architecture it was saved with. ``overrides`` replace hyper-parameters
    (e.g. ``conf_threshold``)."""
    p = Path(path)
    if p.is_dir() or p.suffix in (".json", ".safetensors"):
        model = load_exported(p)
        spec = model.export_spec
        arch = spec["architecture"]
        hp = {"classes": spec["classes"], "size": arch["size"], "batch_norm": arch.get("batch_norm", False),
              **{k: v for k, v in spec["decode"].items() if k in ("conf_threshold", "nms_threshold", "top_k")}}
        det = _detector_from_spec({**hp, **overrides}, arch)
        det.model.load_state_dict(model.state_dict())
    else:
        ckpt = read_checkpoint(p)
        hp = ckpt.get("hyper_parameters")
        if not hp or "classes" not in hp:
            raise CheckpointError(f"{p} has no SSDDetector hyper-parameters (was it saved by this project?)")
        arch = ckpt.get("architecture") or {"channels": hp.get("channels"), "num_branches": hp.get("num_branches")}
        det = _detector_from_spec({**hp, **overrides}, arch)
        state = model_state_dict(ckpt)
        check_state_dict(det.model.state_dict(), state, str(p))
        det.model.load_state_dict(state)
    return det.eval()


# ----------------------------------------------------------------------------------------------- export
class NormalizedSSD(nn.Module):
    """The detector as shipped in ONNX: float RGB images in 0..255 (NCHW) -> raw (loc, conf)."""

    def __init__(self, model: SSD):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model((images - self.mean) / self.std)


def export_onnx(model: SSD, path, opset: int = 17) -> str:
    """``model.onnx``: input ``images`` float32 [N, 3, size, size] in 0..255 RGB; outputs ``loc`` and ``conf``.

    Uses the TorchScript-based exporter (the dynamo exporter needs onnxscript, one more dependency for the same
    graph); constant folding merges BatchNorm into the convolutions. Written atomically.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = NormalizedSSD(model).eval().cpu()
    x = torch.zeros(1, 3, model.size, model.size)
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["loc", "conf"],
                          dynamic_axes={"images": {0: "batch"}, "loc": {0: "batch"}, "conf": {0: "batch"}})
    onnx.checker.check_model(str(tmp))
    os.replace(tmp, path)
    return str(path)


def onnx_param_count(path) -> int:
    """Float weights stored in an ONNX file (includes the 6 normalisation constants of ``NormalizedSSD``)."""
    import onnx

    graph = onnx.load(str(path)).graph
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT))


def export_detector(detector, out_dir, onnx: bool = True) -> dict[str, str]:
    """Export a detector: model.safetensors + model.json (+ model.onnx). Returns the paths written."""
    hp = detector.hparams
    was_training = detector.model.training
    model = detector.model.eval()
    decode = {"conf_threshold": hp.conf_threshold, "nms_threshold": hp.nms_threshold, "top_k": hp.top_k}
    extra, onnx_path = {}, None
    if onnx:  # first, so that model.json is written once, with the ONNX facts in it
        onnx_path = export_onnx(model, Path(out_dir) / "model.onnx")
        extra["onnx"] = {"file": "model.onnx", "outputs": ["loc", "conf"], "params": onnx_param_count(onnx_path),
                         "input": "images: float32 [N, 3, size, size], RGB 0..255 (normalisation inside)"}
    paths = save_exported(model, out_dir, list(detector.classes), decode, extra)
    if onnx_path:
        paths["onnx"] = onnx_path
    model.train(was_training)
    return paths


# ----------------------------------------------------------------------------------------------- predict
def _read_image(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: unreadable or corrupt image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def image_files(src: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """What ``--predict --images`` names: a folder (its image files, sorted) or one image file."""
    if src.is_file():
        if src.suffix.lower() not in suffixes:
            raise FileNotFoundError(f"{src} is not an image ({', '.join(suffixes)})")
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is neither an image nor a folder of images")
    files = sorted(f for f in src.iterdir() if f.is_file() and f.suffix.lower() in suffixes)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(suffixes)}) in {src}")
    return files


def read_images(files: list[Path], skipped: dict[str, str]) -> tuple[list[Path], list[np.ndarray]]:
    """The readable ones of ``files`` and their RGB pixels; an unreadable or corrupt file is recorded in ``skipped``
    (name -> reason) instead of ending a prediction over a whole folder."""
    read, images = [], []
    for f in files:
        try:
            images.append(_read_image(f))
            read.append(f)
        except ValueError:
            skipped[f.name] = "unreadable or corrupt image"
    return read, images


def report_skipped(src: Path, skipped: dict[str, str], total: int) -> None:
    """One warning naming the images a prediction skipped; an error when it could read none."""
    if len(skipped) == total:
        raise FileNotFoundError(f"none of the {total} images in {src} could be read (unreadable or corrupt)")
    if skipped:
        names = ", ".join(list(skipped)[:5]) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(f"{len(skipped)} of {total} images in {src} unreadable or corrupt, skipped (listed under "
                      f"'skipped' in the output): {names}")


@torch.no_grad()
def predict_images(detector, images: list[np.ndarray], batch_size: int = 8) -> list[dict[str, Tensor]]:
    """Detections (boxes in pixels of each original image, xyxy) for RGB uint8 arrays of any size."""
    size = detector.hparams.size
    device = next(detector.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        x = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_LINEAR) for im in chunk])
        dets = detector.predict_batch(torch.from_numpy(x).permute(0, 3, 1, 2).to(device))
        for im, d in zip(chunk, dets):
            h, w = im.shape[:2]
            out.append({**d, "boxes": d["boxes"].cpu() * torch.tensor([w, h, w, h], dtype=torch.float32),
                        "scores": d["scores"].cpu(), "labels": d["labels"].cpu()})
    return out


def predict_folder(detector, images_dir, out_dir, score_threshold: float = 0.3, batch_size: int = 8) -> Path:
    """Detect objects in every image of ``images_dir`` (or in that one image file); write ``<stem>.png`` with the
    boxes drawn (detections scoring >= ``score_threshold``) and ``detections.json`` (all of them above that score)
    into ``out_dir``. Unreadable files are skipped and listed (``read_images``)."""
    from torchvision.utils import draw_bounding_boxes

    src, dst = Path(images_dir), Path(out_dir)
    files = image_files(src)
    if dst.resolve() == files[0].parent.resolve():  # the drawn <stem>.png would overwrite a user's own PNG
        raise FileNotFoundError(f"--out {dst} is the images folder: give another folder for the drawn detections")
    stems = Counter(f.stem for f in files)  # a.jpg and a.png: drawn as a.jpg.png and a.png.png, not both as a.png
    dst.mkdir(parents=True, exist_ok=True)
    detector.eval()
    classes = list(detector.classes)
    results, skipped = {}, {}
    for i in range(0, len(files), batch_size):
        chunk, images = read_images(files[i:i + batch_size], skipped)
        for f, im, d in zip(chunk, images, predict_images(detector, images, batch_size)):
            keep = d["scores"] >= score_threshold
            boxes, scores, labels = d["boxes"][keep], d["scores"][keep], d["labels"][keep]
            results[f.name] = [
                {"box": [round(float(v), 2) for v in b], "score": round(float(s), 4), "label": int(c), "class": classes[int(c)]}
                for b, s, c in zip(boxes, scores, labels)
            ]
            text = [f"{classes[int(c)]} {float(s):.2f}" for s, c in zip(scores, labels)]
            drawn = draw_bounding_boxes(torch.from_numpy(im).permute(2, 0, 1), boxes, labels=text, colors="red", width=2)
            name = f.stem if stems[f.stem] == 1 else f.name
            cv2.imwrite(str(dst / f"{name}.png"), cv2.cvtColor(drawn.permute(1, 2, 0).numpy(), cv2.COLOR_RGB2BGR))
    report_skipped(src, skipped, len(files))
    out = dst / "detections.json"
    out.write_text(json.dumps({"classes": classes, "score_threshold": score_threshold, "box_format": "xyxy pixels",
                               "images": results, **({"skipped": skipped} if skipped else {})}, indent=2) + "\n")
    return out


__all__ = [
    "AtomicCheckpointIO", "CheckpointError", "WeightsMismatchError", "export_detector", "export_onnx", "load_detector",
    "image_files", "onnx_param_count", "predict_folder", "predict_images", "read_checkpoint", "read_export_spec",
]

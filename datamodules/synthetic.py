"""A synthetic detection data set written in the real PASCAL VOC on-disk format (JPEG + XML + ImageSets).

It is the embedded default: the demo generates it on first use and then reads it through the very same
``VOCDataModule`` as PASCAL VOC. Deterministic for a given seed. Each image has a "realistic" background
(smooth illumination gradients, low-frequency colour noise, a horizon, sensor noise), clutter that is not
an object (lines, arcs, blobs), and 1..N objects of ``SHAPES`` at scales from ~10% to ~75% of the short
side, each with a random colour, rotation, aspect and texture (solid, stripes, checker, noise, gradient); with
``class_textures`` the texture is the class's own (a class is then a shape *and* a texture: easier to learn).
Later objects occlude earlier ones; boxes cover the visible extent and objects less than 45% visible are
flagged ``difficult`` (ignored by the VOC metric, as in VOC itself); truncation at the border happens too.
"""

from __future__ import annotations

import math
from pathlib import Path
from xml.sax.saxutils import escape

import cv2
import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "ring", "diamond")


def _polygon(kind: str, rng: np.random.Generator) -> np.ndarray | None:
    """Unit-size outline (points in [-1, 1]) of a shape, or None for round shapes drawn as ellipses."""
    if kind == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif kind == "diamond":
        pts = [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    elif kind == "triangle":
        pts = [(0, -1), (1, 0.85), (-1, 0.85)]
    elif kind == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 7)[:-1]]
    elif kind == "star":
        pts = [((1.0 if i % 2 == 0 else 0.42) * math.cos(a - math.pi / 2), (1.0 if i % 2 == 0 else 0.42) * math.sin(a - math.pi / 2))
               for i, a in enumerate(np.linspace(0, 2 * math.pi, 11)[:-1])]
    elif kind == "cross":
        t = 0.33
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
    else:
        return None
    return np.asarray(pts, dtype=np.float64)


def _shape_mask(kind: str, h: int, w: int, cx: float, cy: float, sx: float, sy: float, angle: float,
                rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    if kind in ("circle", "ring"):
        cv2.ellipse(mask, (int(cx), int(cy)), (max(1, int(sx)), max(1, int(sy))), math.degrees(angle), 0, 360, 255, -1)
        if kind == "ring":
            cv2.ellipse(mask, (int(cx), int(cy)), (max(1, int(sx * 0.55)), max(1, int(sy * 0.55))), math.degrees(angle), 0, 360, 0, -1)
        return mask
    pts = _polygon(kind, rng)
    c, s = math.cos(angle), math.sin(angle)
    xy = pts * np.array([sx, sy])
    xy = xy @ np.array([[c, s], [-s, c]]) + np.array([cx, cy])
    cv2.fillPoly(mask, [np.round(xy).astype(np.int32)], 255)
    return mask


TEXTURES = ("solid", "stripes", "checker", "noise", "gradient")


def _texture(h: int, w: int, rng: np.random.Generator, kind: int | None = None) -> np.ndarray:
    base = rng.integers(0, 256, 3).astype(np.float32)
    kind = int(rng.integers(0, len(TEXTURES))) if kind is None else kind
    if kind == 0:  # solid
        return np.broadcast_to(base, (h, w, 3)).copy()
    other = rng.integers(0, 256, 3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 1:  # stripes
        period = rng.uniform(4, 14)
        a = rng.uniform(0, math.pi)
        t = ((xx * math.cos(a) + yy * math.sin(a)) / period) % 2 < 1
    elif kind == 2:  # checker
        p = rng.uniform(4, 12)
        t = ((xx // p + yy // p) % 2) == 0
    elif kind == 3:  # noise
        n = cv2.resize(rng.random((max(2, h // 6), max(2, w // 6))).astype(np.float32), (w, h))
        return base * n[..., None] + other * (1 - n[..., None])
    else:  # gradient
        g = xx / max(w - 1, 1)
        return base * g[..., None] + other * (1 - g[..., None])
    return np.where(t[..., None], base, other)


def _background(h: int, w: int, rng: np.random.Generator, max_clutter: int = 12) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
    a = rng.uniform(0, 2 * math.pi)
    g = (xx * math.cos(a) + yy * math.sin(a)) / (h + w) + 0.5
    img = (c0 * g[..., None] + c1 * (1 - g[..., None])).astype(np.float32)
    if rng.random() < 0.5:  # horizon: ground of another colour
        hz = int(rng.uniform(0.3, 0.8) * h)
        img[hz:] = img[hz:] * 0.5 + rng.uniform(30, 200, 3) * 0.5
    low = cv2.resize(rng.normal(0, 25, (6, 8, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img = img + low
    # clutter: lines, arcs, blobs (not objects)
    for _ in range(rng.integers(0, max_clutter + 1)):
        col = tuple(float(v) for v in rng.uniform(0, 255, 3))
        r = rng.random()
        p1 = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
        if r < 0.4:
            p2 = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
            cv2.line(img, p1, p2, col, int(rng.integers(1, 4)))
        elif r < 0.7:
            ax = (int(rng.uniform(5, 60)), int(rng.uniform(5, 60)))
            cv2.ellipse(img, p1, ax, float(rng.uniform(0, 360)), 0, float(rng.uniform(60, 200)), col, int(rng.integers(1, 3)))
        else:
            rad = int(rng.uniform(4, 25))
            pad = rad + 18
            x0, y0 = max(0, p1[0] - pad), max(0, p1[1] - pad)
            x1, y1 = min(w, p1[0] + pad), min(h, p1[1] + pad)
            blob = np.zeros((y1 - y0, x1 - x0), np.uint8)
            cv2.circle(blob, (p1[0] - x0, p1[1] - y0), rad, 255, -1)
            blob = cv2.GaussianBlur(blob, (0, 0), 6).astype(np.float32)[..., None] / 255
            img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - blob) + np.asarray(col, np.float32) * blob
    return img


def render_image(rng: np.random.Generator, classes: tuple[str, ...], min_objects: int, max_objects: int,
                 min_scale: float = 0.1, max_scale: float = 0.75, max_clutter: int = 12,
                 class_textures: bool = False):
    """One image (uint8 RGB), its objects as (class name, (x1, y1, x2, y2) 1-based, visible fraction, truncated),
    and its (width, height)."""
    w, h = int(rng.integers(320, 481)), int(rng.integers(240, 361))
    img = _background(h, w, rng, max_clutter)
    short = min(h, w)
    masks, names, areas = [], [], []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        cls = int(rng.integers(0, len(classes)))
        kind = classes[cls]
        size = short * math.exp(rng.uniform(math.log(min_scale), math.log(max_scale))) / 2
        aspect = math.exp(rng.uniform(-0.25, 0.25))
        sx, sy = size * aspect, size / aspect
        cx, cy = rng.uniform(0.05 * w, 0.95 * w), rng.uniform(0.05 * h, 0.95 * h)
        angle = rng.uniform(-0.5, 0.5) if kind in ("square", "diamond", "cross") else rng.uniform(0, 2 * math.pi)
        mask = _shape_mask(kind, h, w, cx, cy, sx, sy, angle, rng)
        if mask.sum() < 255 * 30:
            continue
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        tex = _texture(y1 - y0, x1 - x0, rng, SHAPES.index(kind) % len(TEXTURES) if class_textures else None)
        m = (mask[y0:y1, x0:x1].astype(np.float32) / 255)[..., None]
        shade = rng.uniform(0.7, 1.1)
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - m) + tex * shade * m
        for prev in masks:  # occlusion
            prev[mask > 0] = 0
        masks.append(mask)
        names.append(kind)
        areas.append(cv2.countNonZero(mask))
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(2, 8)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.2))
    objects = []
    for name, mask, area in zip(names, masks, areas):
        ys, xs = np.nonzero(mask)
        if len(xs) < 20:
            continue  # fully hidden
        visible = cv2.countNonZero(mask) / area
        x1, y1, x2, y2 = xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1
        truncated = x1 == 1 or y1 == 1 or x2 == w or y2 == h
        objects.append((name, (int(x1), int(y1), int(x2), int(y2)), visible, truncated))
    return img, objects, (w, h)


def _xml(image_id: str, size: tuple[int, int], objects) -> str:
    w, h = size
    parts = [f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>",
             "<source><database>synthetic shapes</database></source>",
             f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size><segmented>0</segmented>"]
    for name, (x1, y1, x2, y2), vis, trunc in objects:
        parts.append(
            f"<object><name>{escape(name)}</name><pose>Unspecified</pose><truncated>{int(trunc)}</truncated>"
            f"<difficult>{int(vis < 0.45)}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    parts.append("</annotation>\n")
    return "\n".join(parts)


def generate_synthetic_voc(root: str | Path, spec, classes: tuple[str, ...] = SHAPES) -> Path:
    """Write ``spec.num_train`` trainval and ``spec.num_test`` test images into ``root/VOCdevkit/VOC2007``.

    Written to a temporary folder and renamed at the end, so an interrupted run leaves nothing half-made.
    """
    unknown = [c for c in classes if c not in SHAPES]
    if unknown:
        raise ValueError(f"the synthetic generator draws {', '.join(SHAPES)}; cannot draw {unknown}")
    root = Path(root)
    final = root / "VOCdevkit"
    tmp = root / "VOCdevkit.partial"
    base = tmp / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    splits = {"trainval": spec.num_train, "test": spec.num_test}
    total = sum(splits.values())
    n = 0
    with Progress(TextColumn("generating synthetic VOC data"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("gen", total=total)
        for split, count in splits.items():
            ids = []
            for _ in range(count):
                image_id = f"{n:06d}"
                img, objects, size = render_image(rng, tuple(classes), spec.min_objects, spec.max_objects,
                                                   spec.min_scale, spec.max_scale, spec.max_clutter, spec.class_textures)
                cv2.imwrite(str(base / "JPEGImages" / f"{image_id}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 92])
                (base / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, size, objects))
                ids.append(image_id)
                n += 1
                bar.advance(task)
            (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    tmp.rename(final)
    return final

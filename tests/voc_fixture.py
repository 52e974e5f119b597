"""Writes small data sets in the real VOC on-disk layout for the tests (JPEG + XML + ImageSets)."""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np


def write_image(path: Path, w: int, h: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)


def xml_text(image_id: str, w: int, h: int, objects, shuffle_seed: int = 0, filename: str | None = None) -> str:
    """VOC XML with the children of every node in a shuffled order. objects: (name, (x1, y1, x2, y2), difficult)."""
    rnd = random.Random(shuffle_seed)

    def node(tag, children):
        children = list(children)
        rnd.shuffle(children)
        return f"<{tag}>" + "".join(children) + f"</{tag}>"

    objs = [
        node("object", [f"<name>{n}</name>", "<pose>Left</pose>", "<truncated>0</truncated>",
                        f"<difficult>{int(d)}</difficult>",
                        node("bndbox", [f"<xmin>{b[0]}</xmin>", f"<ymin>{b[1]}</ymin>", f"<xmax>{b[2]}</xmax>", f"<ymax>{b[3]}</ymax>"])])
        for n, b, d in objects
    ]
    return node("annotation", [f"<filename>{filename or image_id + '.jpg'}</filename>", "<folder>VOC2007</folder>",
                               node("size", [f"<width>{w}</width>", f"<height>{h}</height>", "<depth>3</depth>"]), *objs])


def write_voc(root: Path, year: int, splits: dict[str, list[str]], samples: dict[str, tuple[int, int, list]]) -> Path:
    """samples: id -> (w, h, objects). Returns <root>/VOCdevkit/VOC<year>."""
    base = Path(root) / "VOCdevkit" / f"VOC{year}"
    (base / "Annotations").mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for i, (image_id, (w, h, objects)) in enumerate(samples.items()):
        write_image(base / "JPEGImages" / f"{image_id}.jpg", w, h, seed=i)
        # the XML <filename> deliberately disagrees with the id: the id must name the image
        (base / "Annotations" / f"{image_id}.xml").write_text(xml_text(image_id, w, h, objects, i, filename="WRONG.jpg"))
    for split, ids in splits.items():
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return base


def tiny_voc(root: Path, classes=("cat", "dog"), n: int = 6, year: int = 2007) -> Path:
    """n images with 1-3 objects each; trainval = first n-2, test = last 2 (+ a difficult object)."""
    rng = np.random.default_rng(0)
    samples = {}
    for i in range(n):
        w, h = int(rng.integers(120, 200)), int(rng.integers(100, 160))
        objs = []
        for j in range(1 + i % 3):
            x1, y1 = int(rng.integers(1, w // 2)), int(rng.integers(1, h // 2))
            x2, y2 = int(rng.integers(x1 + 10, w)), int(rng.integers(y1 + 10, h))
            objs.append((classes[(i + j) % len(classes)], (x1, y1, x2, y2), j == 1))
        samples[f"{year}_{i:04d}"] = (w, h, objs)
    ids = list(samples)
    write_voc(root, year, {"trainval": ids[:-2], "test": ids[-2:]}, samples)
    return Path(root)

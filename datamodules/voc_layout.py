"""Lay out VOC XML annotations kept in another folder shape as the VOC devkit does, for ``VOCDataModule``.

Annotation tools and data-set sites write VOC XML without the devkit's folders and split files:

- LabelImg: each ``<id>.xml`` beside its image in one folder (or XML and images in two folders);
- Kaggle-style sets: ``annotations/<id>.xml`` and ``images/<id>.png``;
- Roboflow's "Pascal VOC" export: ``train/``, ``valid/``, ``test/``, each holding images and XML side by side.

``python -m datamodules.voc_layout SRC OUT`` finds every XML under SRC whose root is ``<annotation>``, pairs it with the
image of the same file stem in the same split folder (or, where there is none, the image its ``<filename>`` names; of
one stem in several formats, the one ``<filename>`` names), and writes ``OUT/VOCdevkit/VOC2007/{Annotations, JPEGImages,
ImageSets/Main}`` with links to the sources (``--copy`` copies). Splits: top-level folders named like a split
(``train``, ``valid`` / ``val``, ``test``, ``trainval``) are kept as such (``trainval`` = train + val when not given);
otherwise a seeded ``--test_fraction`` of the images goes to ``test`` and the rest to ``trainval``. The ids are the file
stems, whitespace replaced by ``_`` (a split file holds one id per line, read up to the first blank); where two split
folders hold the same stem, every id is prefixed with its folder's name. Images without an XML are left out (an
annotation tool writes none for an image nobody labelled) and counted; an XML without its image, two XMLs or images
of one stem, or an XML that does not parse stop the tool naming the files (``--skip_bad`` leaves them out instead).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

from datamodules.voc import IMAGE_EXTENSIONS, DataError

# top-level folder names read as splits, and the split file each one becomes
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test", "trainval": "trainval"}
ALL = ""  # the group of a source without split folders


def find_xml(root: Path, depth: int = 2) -> Path | None:
    """The first ``*.xml`` file at most ``depth`` folders below ``root`` (sorted order), or None: a cheap look for VOC
    XML kept outside the devkit layout, for error messages."""
    if depth < 0 or not root.is_dir():
        return None
    entries = sorted(root.iterdir())
    for entry in entries:
        if entry.is_file() and entry.suffix.lower() == ".xml":
            return entry
    for entry in entries:
        if entry.is_dir() and not entry.name.startswith("."):
            found = find_xml(entry, depth - 1)
            if found:
                return found
    return None


def _group(rel: Path, split_groups: bool) -> str | None:
    """The split folder a file under the source belongs to (None: outside every split folder)."""
    if not split_groups:
        return ALL
    return rel.parts[0].lower() if len(rel.parts) > 1 and rel.parts[0].lower() in SPLIT_FOLDERS else None


def scan(src: Path) -> tuple[dict[str, dict[str, list[Path]]], dict[str, dict[str, list[Path]]], bool, int]:
    """XML and image files under ``src`` by split folder and file stem: (xmls, images, split_groups, ignored), where
    ``ignored`` counts files outside every split folder of a source that has split folders."""
    split_groups = any(p.is_dir() and p.name.lower() in SPLIT_FOLDERS for p in src.iterdir())
    xmls: dict[str, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    images: dict[str, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    image_ext = set(IMAGE_EXTENSIONS)
    ignored = 0
    for folder, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            stem, ext = os.path.splitext(name)
            ext = ext.lower()
            if ext != ".xml" and ext not in image_ext:
                continue
            group = _group(path.relative_to(src), split_groups)
            if group is None:
                ignored += 1
                continue
            (xmls if ext == ".xml" else images)[group][stem].append(path)
    return xmls, images, split_groups, ignored


def _voc_root(path: Path) -> ET.Element | None:
    """The root of VOC XML (``<annotation>``), None for other XML; DataError when it does not parse."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DataError(f"{path}: malformed XML ({err})") from err
    return root if root.tag == "annotation" else None


def _filename_base(root: ET.Element) -> str:
    """The XML's ``<filename>`` without folders (Windows or POSIX separators); "" when it has none."""
    return (root.findtext("filename") or "").strip().replace("\\", "/").rsplit("/", 1)[-1]


def _filename_stem(root: ET.Element, images: dict[str, list[Path]], xmls: dict[str, list[Path]]) -> str | None:
    """Where no image has the XML's stem: the stem of the image its ``<filename>`` names, if that image is there and
    no XML of its own claims it (tools that rename annotation files keep the image's name in ``<filename>``)."""
    stem = os.path.splitext(_filename_base(root))[0]
    return stem if stem and stem in images and stem not in xmls else None


def _pick_image(stem: str, candidates: list[Path], root: ET.Element | None = None) -> Path:
    """The image of one stem: the file its annotation's ``<filename>`` names where that is one of them; otherwise,
    where one folder holds it in several formats, the first of ``IMAGE_EXTENSIONS`` (as the reader picks); in two
    folders it is ambiguous."""
    folders = {p.parent for p in candidates}
    if len(folders) > 1:
        raise DataError(f"id {stem!r}: images in {len(folders)} folders ({', '.join(map(str, candidates))}); "
                        "keep one or put each set in its own split folder (train/, val/, test/)")
    named = [p for p in candidates if root is not None and p.name == _filename_base(root)]
    if named:
        return named[0]
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    return min(candidates, key=lambda p: (rank[p.suffix.lower()], p.name))


def pair(src: Path, skip_bad: bool = False) -> tuple[dict[str, list[tuple[str, Path, Path]]], dict[str, int], Counter]:
    """(split folder -> [(stem, xml, image)] in stem order, counts of what was left out, objects per class name of the
    paired annotations): each XML is parsed once."""
    xmls, images, split_groups, ignored = scan(src)
    left_out = Counter(outside_split_folders=ignored)
    classes: Counter = Counter()
    bad: list[str] = []
    pairs: dict[str, list[tuple[str, Path, Path]]] = {}
    for group in sorted(set(xmls) | set(images)):
        found, used = [], set()  # (stem, xml, image); the stems of the images paired
        for stem in sorted(xmls.get(group, {})):
            paths = xmls[group][stem]
            try:
                roots = {p: r for p in paths if (r := _voc_root(p)) is not None}
                voc = list(roots)
                if not voc:
                    left_out["xml_not_voc"] += len(paths)
                    continue
                if len(voc) > 1:
                    raise DataError(f"id {stem!r}: {len(voc)} annotations ({', '.join(map(str, voc))}); keep one")
                image_stem = stem if stem in images.get(group, {}) else _filename_stem(
                    roots[voc[0]], images.get(group, {}), xmls.get(group, {}))
                if image_stem is None:
                    where = f" in split folder {group}/" if group else ""
                    raise DataError(f"{voc[0]}: no image named {stem}.<{','.join(e[1:] for e in IMAGE_EXTENSIONS)}>"
                                    f"{where}, nor the one its <filename> names (images are paired with annotations "
                                    "by file name)")
                found.append((stem, voc[0], _pick_image(image_stem, images[group][image_stem], roots[voc[0]])))
                used.add(image_stem)
                classes.update(name.strip() for obj in roots[voc[0]].iter("object")
                               if (name := obj.findtext("name")) is not None)
            except DataError as err:
                if not skip_bad:
                    raise
                bad.append(str(err))
        left_out["image_without_xml"] += len(set(images.get(group, {})) - used - set(xmls.get(group, {})))
        if found:
            pairs[group] = found
    left_out["bad"] = len(bad)
    for message in bad:
        print(f"left out: {message}", file=sys.stderr)
    if not pairs:
        raise DataError(f"no VOC annotation (an .xml file whose root is <annotation>) paired with an image under {src}")
    return pairs, {k: v for k, v in left_out.items() if v}, classes


def assign_ids(pairs: dict[str, list[tuple[str, Path, Path]]]) -> dict[str, list[tuple[str, Path, Path]]]:
    """Split folder -> [(id, xml, image)]: ids are the stems with whitespace replaced by ``_``; where two split folders
    hold the same stem, every id is prefixed with its folder's name (``train_0001``)."""
    def clean(stem: str) -> str:
        return re.sub(r"\s+", "_", stem.strip())

    seen = Counter(clean(stem) for items in pairs.values() for stem, _, _ in items)
    prefix = any(n > 1 for n in seen.values())
    out: dict[str, list[tuple[str, Path, Path]]] = {}
    for group, items in pairs.items():
        ids = [(f"{group}_" if prefix else "") + clean(stem) for stem, _, _ in items]
        dup = [i for i, n in Counter(ids).items() if n > 1]
        if dup:
            names = [str(x) for (stem, x, _), i in zip(items, ids) if i in dup]
            raise DataError(f"file names that differ only in whitespace give one id {dup[0]!r}: {', '.join(names)}; "
                            "rename one")
        out[group] = [(i, x, img) for i, (_, x, img) in zip(ids, items)]
    return out


def split_lists(groups: dict[str, list[tuple[str, Path, Path]]], test_fraction: float,
                seed: int) -> dict[str, list[str]]:
    """Split name -> sorted ids."""
    if ALL in groups:
        ids = sorted(i for i, _, _ in groups[ALL])
        order = list(ids)
        random.Random(seed).shuffle(order)
        n_test = round(len(ids) * test_fraction)
        if test_fraction > 0 and n_test == 0:
            n_test = 1
        if n_test >= len(ids):
            raise DataError(f"--test_fraction {test_fraction} leaves no training image of {len(ids)}")
        test = set(order[:n_test])
        splits = {"trainval": [i for i in ids if i not in test]}
        if test:
            splits["test"] = [i for i in ids if i in test]
        return splits
    splits: dict[str, list[str]] = defaultdict(list)
    for group, items in groups.items():
        splits[SPLIT_FOLDERS[group]] += [i for i, _, _ in items]
    if "trainval" not in splits:
        splits["trainval"] = splits.get("train", []) + splits.get("val", [])
    return {name: sorted(ids) for name, ids in splits.items() if ids}


def write_layout(groups: dict[str, list[tuple[str, Path, Path]]], splits: dict[str, list[str]], out: Path,
                 year: int = 2007, copy: bool = False) -> Path:
    """Write ``out/VOCdevkit/VOC<year>`` (links to the sources, or copies) and its split files; returns that folder.
    ``main`` has checked that it does not exist yet."""
    base = out / "VOCdevkit" / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for items in groups.values():
        for image_id, xml, image in items:
            for source, target in ((xml, base / "Annotations" / f"{image_id}.xml"),
                                   (image, base / "JPEGImages" / f"{image_id}{image.suffix}")):
                if copy:
                    shutil.copy2(source, target)
                else:
                    target.symlink_to(source.resolve())
    for name, ids in splits.items():
        (base / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    return base


def train_options(splits: dict[str, list[str]], year: int) -> str:
    """The data options of train.py for the splits written: a test split, and validation from a split of its own or
    carved from the training images."""
    def pick(name: str) -> str:
        return f'"[{year}, {name}]"'

    if "test" in splits and "val" in splits and "train" in splits:
        return f'--data.train_sets "[[{year}, train]]" --data.val_set {pick("val")} --data.test_set {pick("test")}'
    if "test" in splits:
        return f'--data.train_sets "[[{year}, trainval]]" --data.test_set {pick("test")} --data.val_fraction 0.1'
    if "val" in splits and "train" in splits:
        return f'--data.train_sets "[[{year}, train]]" --data.test_set {pick("val")} --data.val_fraction 0.1'
    return (f'--data.train_sets "[[{year}, trainval]]" --data.val_fraction 0.1 (no test split: give --test_fraction, '
            "or name one with --data.test_set)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.voc_layout", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="folder holding the XML annotations and images (any folder shape)")
    parser.add_argument("out", type=Path, help="output folder: becomes --data.root (OUT/VOCdevkit/VOC<year>/...)")
    parser.add_argument("--test_fraction", type=float, default=None,
                        help="share of the images for the test split when SRC has no split folders (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test split's draw (default 0)")
    parser.add_argument("--year", type=int, default=2007, help="the VOC<year> folder to write (default 2007)")
    parser.add_argument("--copy", action="store_true", help="copy the files instead of linking to them")
    parser.add_argument("--skip_bad", action="store_true",
                        help="leave out (and list) unpaired, duplicated or malformed annotations instead of stopping")
    args = parser.parse_args(argv)
    try:
        if not args.src.is_dir():
            raise DataError(f"source folder {args.src} does not exist")
        if (args.src / "VOCdevkit").is_dir() or (args.src / "ImageSets" / "Main").is_dir():
            raise DataError(f"{args.src} is already in the VOC devkit layout: give it to train.py as --data.root")
        base = args.out / "VOCdevkit" / f"VOC{args.year}"
        if base.exists() and any(base.iterdir()):
            raise DataError(f"{base} exists and is not empty; choose another output folder")
        pairs, left_out, counts = pair(args.src, args.skip_bad)
        groups = assign_ids(pairs)
        if ALL not in groups and args.test_fraction is not None:
            raise DataError(f"{args.src} has split folders ({', '.join(sorted(g + '/' for g in groups))}): they are "
                            "the splits; --test_fraction applies to a source without them")
        test_fraction = 0.2 if args.test_fraction is None else args.test_fraction
        if not 0.0 <= test_fraction < 1.0:
            raise DataError(f"--test_fraction must be in [0, 1), got {test_fraction}")
        splits = split_lists(groups, test_fraction, args.seed)
        base = write_layout(groups, splits, args.out, args.year, args.copy)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {base}: " + ", ".join(f"{name} {len(ids)} images" for name, ids in splits.items()))
    print("classes (objects): " + ", ".join(f"{name} {n}" for name, n in counts.most_common()))
    if left_out:
        print("left out: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(left_out.items())))
    command = (f"python train.py --config experiments/demo.yaml --data.synthetic null --data.root {args.out} "
               "--data.classes auto " + train_options(splits, args.year))
    print(f"train on it: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`sdm data pack`: labelled datasets in their published folder layouts -> shards + card.

Each layout lists (key, split, image, label, instance) files. Every sample is checked (a name that is printable
UTF-8 and the only file of its stem, files inside the source tree, readable image and maps under the pixel limit
that keeps decompression bombs from decoding, matching sizes, known class ids); bad ones go to a rejects file with
their reason and the good ones are packed. The hostile-dataset corpus (tests/data/hostile_datasets.json) holds the
cases. Shard names are deterministic, so a rerun replaces shards instead of duplicating them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdm import storage
from sdm.data.card import DatasetCard, withdraw_card, write_card
from sdm.data.classes import dataset_classes
from sdm.data.rejects import REJECTS_FILE, Reject, write_rejects
from sdm.data.shards import DEFAULT_SHARD_BYTES, ShardWriter, make_row
from sdm.imageio import decode_ids, decode_image, encode_png
from sdm.errors import EXIT_OK, EXIT_REJECTS, DatasetError

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


@dataclass
class Item:
    key: str
    split: str
    image: Path | None
    label: Path | None
    instance: Path | None = None
    problem: str | None = None  # found while listing (e.g. two files of one stem): the item is rejected with it


def _stems(folder: Path, suffix: str = "", exts: tuple[str, ...] = IMAGE_EXTS) -> dict[str, list[Path]]:
    """stem (without `suffix`) -> its files (more than one: a duplicate), for the image files directly in a folder."""
    if not folder.is_dir():
        return {}
    out: dict[str, list[Path]] = {}
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() in exts and f.stem.endswith(suffix):
            out.setdefault(f.stem[: len(f.stem) - len(suffix)] if suffix else f.stem, []).append(f)
    return out


def _one(files: dict[str, list[Path]] | None, stem: str, what: str) -> tuple[Path | None, str | None]:
    """The file of `stem`, or the problem that makes its item a reject."""
    found = (files or {}).get(stem, [])
    if len(found) > 1:
        return None, f"duplicate {what}s of one stem: {', '.join(repr(f.name) for f in found)} (which one is meant?)"
    return (found[0] if found else None), None


def _pair(split: str, images: dict[str, list[Path]], labels: dict[str, list[Path]], instances: dict[str, list[Path]] | None,
          prefix: str = "") -> Iterator[Item]:
    """Items matched by stem; an image without a label (or the reverse), or a stem with two images (or labels or
    instance maps), is an item that will be rejected."""
    for stem in sorted(set(images) | set(labels)):
        (image, p1), (label, p2), (instance, p3) = (_one(images, stem, "image"), _one(labels, stem, "label"),
                                                   _one(instances, stem, "instance map"))
        yield Item(f"{prefix}{stem}", split, image, label, instance, p1 or p2 or p3)


def ade20k_items(src: Path) -> Iterator[Item]:
    for folder, split in (("training", "train"), ("validation", "val")):
        yield from _pair(split, _stems(src / "images" / folder), _stems(src / "annotations" / folder, exts=(".png",)), None)


def cityscapes_items(src: Path) -> Iterator[Item]:
    for split_dir in sorted((src / "leftImg8bit").glob("*")):
        split = split_dir.name
        for city in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            gt = src / "gtFine" / split / city.name
            yield from _pair(
                split,
                _stems(city, "_leftImg8bit"),
                _stems(gt, "_gtFine_labelIds", (".png",)),
                _stems(gt, "_gtFine_instanceIds", (".png",)),
            )


def celebamask_hq_items(src: Path) -> Iterator[Item]:
    """<split>/images + <split>/labels (merged masks), or images + labels at the top for one split."""
    splits = [(src / s, s if s != "test" else "val") for s in ("train", "val", "test") if (src / s / "images").is_dir()]
    for root, split in splits or [(src, "train")]:
        yield from _pair(split, _stems(root / "images"), _stems(root / "labels", exts=(".png",)), None)


def coco_stuff_items(src: Path) -> Iterator[Item]:
    """SPADE's layout: {train,val}_img, {train,val}_label (stuffthingmaps), {train,val}_inst."""
    for split in ("train", "val"):
        yield from _pair(
            split, _stems(src / f"{split}_img"), _stems(src / f"{split}_label", exts=(".png",)),
            _stems(src / f"{split}_inst", exts=(".png",)),
        )


def folder_items(src: Path) -> Iterator[Item]:
    """images/ + labels/ (+ instances/), matched by stem, one split "train"."""
    instances = _stems(src / "instances", exts=(".png",)) if (src / "instances").is_dir() else None
    yield from _pair("train", _stems(src / "images"), _stems(src / "labels", exts=(".png",)), instances)


LAYOUTS: dict[str, Callable[[Path], Iterator[Item]]] = {
    "ade20k": ade20k_items,
    "cityscapes": cityscapes_items,
    "celebamask_hq": celebamask_hq_items,
    "coco_stuff": coco_stuff_items,
    "folder": folder_items,
}


def _classes(layout: str, src: Path) -> tuple[list[str], list[list[int]], set[int]]:
    """Names, palette and the raw label ids a sample may contain."""
    if layout == "folder":
        path = src / "classes.txt"
        if not path.exists():
            raise DatasetError(f"layout 'folder' needs a class-names file {path} (one name per line, line k = id k)")
        from sdm.labels import default_palette

        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return names, [list(c) for c in default_palette(len(names))], set(range(len(names)))
    names, palette = dataset_classes(layout)
    allowed = set(range(len(names)))
    if layout == "coco_stuff":  # 255 = unlabeled, the model's class 182
        names, palette, allowed = names + ["unlabeled"], palette + [[0, 0, 0]], allowed | {255}
    return names, palette, allowed


def _check_name(key: str) -> None:
    """A key must be printable UTF-8: it names the sample in shards (Arrow strings), rejects and exported files."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise DatasetError(f"odd file name {key.encode('utf-8', 'surrogateescape')!r}: not valid UTF-8") from None
    if not key.isprintable():
        raise DatasetError(f"odd file name {key!r}: it holds control characters")


def _check_inside(path: Path, root: Path) -> None:
    """A file must lie inside the source tree once links are followed: a link out of it (to /etc, to another
    dataset, to a mount that is not meant to be read) is not part of the dataset."""
    target = path.resolve()
    if not target.is_relative_to(root):
        raise DatasetError(f"{path.name} is a link to {target}, outside the source tree {root}")


def check_item(item: Item, allowed: set[int], root: Path) -> dict:
    """Read and validate one sample of the source tree at `root` (resolved); returns its shard row, or raises
    DatasetError with the reason."""
    _check_name(item.key)
    if item.problem:
        raise DatasetError(item.problem)
    if item.image is None:
        raise DatasetError(f"label {item.label.name} has no image")
    if item.label is None:
        raise DatasetError(f"image {item.image.name} has no label")
    for path in (item.image, item.label, item.instance):
        if path is not None:
            _check_inside(path, root)
    try:
        image_bytes, label_bytes = item.image.read_bytes(), item.label.read_bytes()
        inst_bytes = item.instance.read_bytes() if item.instance else None
    except OSError as e:
        raise DatasetError(f"unreadable file: {e}") from None
    image = decode_image(image_bytes, f"image {item.image.name}")
    label = decode_ids(label_bytes, f"label {item.label.name}")
    if label.shape != image.shape[:2]:
        raise DatasetError(f"size mismatch: image {image.shape[1]}x{image.shape[0]}, label {label.shape[1]}x{label.shape[0]}")
    bad = sorted(set(np.unique(label).tolist()) - allowed)
    if bad:
        raise DatasetError(f"class ids out of range: {bad[:20]}")
    inst = None
    if inst_bytes is not None:
        instance = decode_ids(inst_bytes, f"instance map {item.instance.name}")
        if instance.shape != label.shape:
            raise DatasetError("size mismatch between label and instance map")
        inst = encode_png(instance)
    return make_row(item.key, item.split, image_bytes, encode_png(label), inst, image.shape[0], image.shape[1])


def pack(layout: str, src: str, dst: str, shard_bytes: int = DEFAULT_SHARD_BYTES, log: Callable[[str], None] = print) -> tuple[DatasetCard, list[Reject]]:
    """Pack a source tree; returns the card and the rejects (also written to DST/rejects.jsonl)."""
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    root = Path(src)
    if not root.is_dir():
        raise DatasetError(f"source folder {src} does not exist")
    names, palette, allowed = _classes(layout, root)
    withdraw_card(dst)
    writers: dict[str, ShardWriter] = {}
    rejects, has_instance, done, splits = [], False, 0, set()
    for item in LAYOUTS[layout](root):
        splits.add(item.split)
        try:
            row = check_item(item, allowed, root.resolve())
        except DatasetError as e:
            rejects.append(Reject(item.key, item.split, str(e)))
            continue
        has_instance |= row["instance"] is not None
        writers.setdefault(item.split, ShardWriter(dst, item.split, shard_bytes)).add(row)
        done += 1
        if done % 500 == 0:
            log(f"packed {done} samples ({len(rejects)} rejected)")
    if not writers:
        raise DatasetError(f"no valid samples found in {src} for layout {layout!r} ({len(rejects)} rejected)")
    for split in sorted(splits - set(writers)):
        log(f"note: split {split!r} has no valid sample ({sum(r.split == split for r in rejects)} rejected); it is left out of the card")
    shards = [s for w in writers.values() for s in w.close()]
    write_rejects(dst, rejects)
    card = DatasetCard(
        name=layout if layout != "folder" else os.path.basename(os.path.abspath(src)),
        num_classes=len(names), class_names=names, palette=palette, has_instance=has_instance,
        split_sizes={split: sum(s.rows for s in shards if s.split == split) for split in writers},
        shards=shards, extra={"source": os.path.abspath(src), "layout": layout},
    )
    write_card(dst, card)
    return card, rejects


def report(card: DatasetCard, rejects: list[Reject], dst: str, skip_bad: bool) -> int:
    """Print the summary; the exit status is EXIT_REJECTS when samples were rejected, unless told to skip them."""
    splits = ", ".join(f"{v} {k}" for k, v in card.split_sizes.items())
    print(f"packed {card.name}: {splits} in {len(card.shards)} shards -> {dst}")
    if rejects:
        print(f"{len(rejects)} samples rejected (see {storage.join(dst, REJECTS_FILE)}), e.g. {rejects[0].key}: {rejects[0].reason}", file=sys.stderr)
        return EXIT_OK if skip_bad else EXIT_REJECTS
    return EXIT_OK

"""`sdm data pack`: labelled datasets in their published folder layouts -> shards + card.

Each layout lists (key, split, image, label, instance) files. Every sample is checked (readable image and
maps, matching sizes, known class ids); bad ones go to a rejects file with their reason and the good ones
are packed. Shard names are deterministic, so a rerun replaces shards instead of duplicating them.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdm import storage
from sdm.data.card import DatasetCard, withdraw_card, write_card
from sdm.data.classes import dataset_classes
from sdm.data.shards import DEFAULT_SHARD_BYTES, ShardWriter, make_row
from sdm.imageio import decode_ids, decode_image, encode_png
from sdm.errors import EXIT_OK, EXIT_REJECTS, DatasetError

REJECTS_FILE = "rejects.jsonl"
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


@dataclass
class Item:
    key: str
    split: str
    image: Path | None
    label: Path | None
    instance: Path | None = None


def _stems(folder: Path, suffix: str = "", exts: tuple[str, ...] = IMAGE_EXTS) -> dict[str, Path]:
    """stem (without `suffix`) -> file, for the image files directly in a folder."""
    if not folder.is_dir():
        return {}
    out = {}
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() in exts and f.stem.endswith(suffix):
            out[f.stem[: len(f.stem) - len(suffix)] if suffix else f.stem] = f
    return out


def _pair(split: str, images: dict[str, Path], labels: dict[str, Path], instances: dict[str, Path] | None, prefix: str = "") -> Iterator[Item]:
    """Items matched by stem; an image without a label (or the reverse) is an item that will be rejected."""
    for stem in sorted(set(images) | set(labels)):
        yield Item(f"{prefix}{stem}", split, images.get(stem), labels.get(stem), (instances or {}).get(stem))


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


def check_item(item: Item, allowed: set[int]) -> dict:
    """Read and validate one sample; returns its shard row, or raises DatasetError with the reason."""
    if item.image is None:
        raise DatasetError(f"label {item.label.name} has no image")
    if item.label is None:
        raise DatasetError(f"image {item.image.name} has no label")
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


def pack(layout: str, src: str, dst: str, shard_bytes: int = DEFAULT_SHARD_BYTES, log: Callable[[str], None] = print) -> tuple[DatasetCard, list[dict]]:
    """Pack a source tree; returns the card and the rejects (also written to DST/rejects.jsonl)."""
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    root = Path(src)
    if not root.is_dir():
        raise DatasetError(f"source folder {src} does not exist")
    names, palette, allowed = _classes(layout, root)
    withdraw_card(dst)
    writers: dict[str, ShardWriter] = {}
    rejects, has_instance, done = [], False, 0
    for item in LAYOUTS[layout](root):
        try:
            row = check_item(item, allowed)
        except DatasetError as e:
            rejects.append({"key": item.key, "split": item.split, "reason": str(e)})
            continue
        has_instance |= row["instance"] is not None
        writers.setdefault(item.split, ShardWriter(dst, item.split, shard_bytes)).add(row)
        done += 1
        if done % 500 == 0:
            log(f"packed {done} samples ({len(rejects)} rejected)")
    if not writers:
        raise DatasetError(f"no valid samples found in {src} for layout {layout!r} ({len(rejects)} rejected)")
    shards = [s for w in writers.values() for s in w.close()]
    storage.write_bytes(storage.join(dst, REJECTS_FILE), "".join(json.dumps(r) + "\n" for r in rejects).encode())
    card = DatasetCard(
        name=layout if layout != "folder" else os.path.basename(os.path.abspath(src)),
        num_classes=len(names), class_names=names, palette=palette, has_instance=has_instance,
        split_sizes={split: sum(s.rows for s in shards if s.split == split) for split in writers},
        shards=shards, extra={"source": os.path.abspath(src), "layout": layout},
    )
    write_card(dst, card)
    return card, rejects


def report(card: DatasetCard, rejects: list[dict], dst: str, skip_bad: bool) -> int:
    """Print the summary; the exit status is EXIT_REJECTS when samples were rejected, unless told to skip them."""
    splits = ", ".join(f"{v} {k}" for k, v in card.split_sizes.items())
    print(f"packed {card.name}: {splits} in {len(card.shards)} shards -> {dst}")
    if rejects:
        print(f"{len(rejects)} samples rejected (see {storage.join(dst, REJECTS_FILE)}), e.g. {rejects[0]['key']}: {rejects[0]['reason']}", file=sys.stderr)
        return EXIT_OK if skip_bad else EXIT_REJECTS
    return EXIT_OK

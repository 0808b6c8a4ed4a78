"""Image sets to evaluate: a dataset in the shard format (real or generated) or a folder of images.

A folder holds images directly or under images/ (the generation job's folder format), with label maps of
the same names under labels/ when there are any. Every image (and label map) is resized to one evaluation
size by the library's preprocessing, so real sets of mixed sizes compare with generated ones.
A generated sample's label map is the one it came from (column source_key; in folders, the stem without
its trailing _<k>).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from sdm import storage
from sdm.data.card import CARD_FILE, DatasetCard, read_card
from sdm.data.preprocess import resize_sample
from sdm.data.shards import decode_row, iter_rows
from sdm.imageio import decode_ids, decode_image
from sdm.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class ImageSet:
    uri: str
    split: str | None
    card: DatasetCard | None  # None: a folder
    checksum: str  # of the card, or of the folder's file names and sizes: a cache key for its statistics
    image_dir: str = ""
    files: tuple[str, ...] = ()
    label_files: frozenset[str] = frozenset()

    @property
    def has_labels(self) -> bool:
        return self.card is not None or bool(self.label_files)

    def cache_key(self, size: tuple[int, int], limit: int | None) -> str:
        return f"{self.checksum[:16]}-{self.split or 'all'}-{size[0]}x{size[1]}-{limit or 'all'}"


@dataclass
class Batch:
    keys: list[str]
    source_keys: list[str]
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray | None  # int64 [N, H, W] label ids, or None for a set without label maps


def open_set(uri: str, split: str | None = None) -> ImageSet:
    """Describe the set at uri, checking it exists and (for a dataset) has the split."""
    card_uri = storage.join(uri, CARD_FILE)
    if storage.exists(card_uri):
        card = read_card(uri)
        if split is not None and split not in {s.split for s in card.shards}:
            raise DatasetError(f"dataset {uri} has no split {split!r} (it has {sorted({s.split for s in card.shards})})")
        return ImageSet(uri, split, card, hashlib.sha256(storage.read_bytes(card_uri)).hexdigest())
    image_dir = storage.join(uri, "images") if storage.list_files(storage.join(uri, "images")) else uri
    files = tuple(f for f in storage.list_files(image_dir) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise DatasetError(f"{uri} holds neither a dataset ({CARD_FILE}) nor images (.png, .jpg)")
    labels = frozenset(storage.list_files(storage.join(uri, "labels"), ".png"))
    fs, path = storage.resolve(image_dir)
    infos = fs.get_file_info(pafs.FileSelector(path))
    listing = sorted((posixpath.basename(i.path), i.size) for i in infos if i.type == pafs.FileType.File)
    checksum = hashlib.sha256(json.dumps([listing, sorted(labels)]).encode()).hexdigest()
    return ImageSet(uri, None, None, checksum, image_dir, files, labels)


def source_key_of(row: dict[str, Any]) -> str:
    return row.get("source_key") or row["key"]


def _folder_source_key(stem: str) -> str:
    return re.sub(r"_\d+$", "", stem)


def _iter_items(s: ImageSet) -> Iterator[tuple[str, str, np.ndarray, np.ndarray | None]]:
    """(key, source key, image, label map or None), in a stable order."""
    if s.card is not None:
        for row in iter_rows(s.uri, split=s.split, card=s.card):
            d = decode_row(row)
            yield d["key"], source_key_of(row), d["image"], d["label"]
        return
    for name in s.files:
        stem = posixpath.splitext(name)[0]
        image = decode_image(storage.read_bytes(storage.join(s.image_dir, name)), f"image {name} in {s.uri}")
        label_name = f"{stem}.png"
        label = None
        if label_name in s.label_files:
            label = decode_ids(storage.read_bytes(storage.join(s.uri, "labels", label_name)), f"label map {label_name} in {s.uri}")
        yield stem, _folder_source_key(stem), image, label


def resize_item(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """To the evaluation size (height, width): images bicubic, label maps nearest."""
    out = resize_sample({"image": image, "label": label if label is not None else np.zeros(image.shape[:2], np.int64)}, size)
    return out["image"], out["label"] if label is not None else None


def iter_batches(s: ImageSet, size: tuple[int, int], batch_size: int = 64, limit: int | None = None) -> Iterator[Batch]:
    buf: list[tuple[str, str, np.ndarray, np.ndarray | None]] = []
    n = 0
    for key, source, image, label in _iter_items(s):
        if limit is not None and n >= limit:
            break
        n += 1
        buf.append((key, source, *resize_item(image, label, size)))
        if len(buf) == batch_size:
            yield _batch(buf)
            buf = []
    if buf:
        yield _batch(buf)


def _batch(items: list[tuple[str, str, np.ndarray, np.ndarray | None]]) -> Batch:
    labels = [it[3] for it in items]
    return Batch([it[0] for it in items], [it[1] for it in items], np.stack([it[2] for it in items]),
                 np.stack(labels) if all(lab is not None for lab in labels) else None)


def first_size(s: ImageSet) -> tuple[int, int]:
    """(height, width) of the set's first image: the evaluation size when none is given."""
    for _, _, image, _ in _iter_items(s):
        return image.shape[:2]
    raise DatasetError(f"{s.uri} holds no images{f' in split {s.split!r}' if s.split else ''}")


def collect_groups(s: ImageSet, size: tuple[int, int], max_maps: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Samples grouped by the label map they came from, for the first max_maps label maps:
    (source key -> uint8 [K, H, W, 3], source key -> its label map)."""
    groups: dict[str, list[np.ndarray]] = {}
    labels: dict[str, np.ndarray] = {}
    for _, source, image, label in _iter_items(s):
        if source not in groups and len(groups) >= max_maps:
            continue
        img, lab = resize_item(image, label, size)
        groups.setdefault(source, []).append(img)
        if lab is not None:
            labels.setdefault(source, lab)
    return {k: np.stack(v) for k, v in groups.items()}, labels


def images_by_key(s: ImageSet, size: tuple[int, int], keys: set[str]) -> dict[str, np.ndarray]:
    """The images of the given keys (real images for a contact sheet)."""
    out = {}
    for key, _, image, label in _iter_items(s):
        if key in keys:
            out[key] = resize_item(image, label, size)[0]
            if len(out) == len(keys):
                break
    return out

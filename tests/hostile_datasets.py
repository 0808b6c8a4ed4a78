"""The regression corpus of hostile datasets (tests/data/hostile_datasets.json): every kind of source file that a
packer must refuse or take, with how it fails and the outcome it must get. Each case is one sample of the train
split, built by its recipe (below) where each packer layout keeps its files; the val split's folders are made and
left empty. Replayed for every layout of sdm/data/packers.py by tests/test_hostile_datasets.py.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CORPUS = Path(__file__).parent / "data" / "hostile_datasets.json"
H, W = 8, 12  # every sample's size

# layout -> (image, label, instance map or None) paths of a sample, and the folder name of each split
LAYOUT_PATHS: dict[str, tuple[str, str, str | None, dict[str, str]]] = {
    "ade20k": ("images/{d}/{stem}{ext}", "annotations/{d}/{stem}.png", None, {"train": "training", "val": "validation"}),
    "cityscapes": ("leftImg8bit/{d}/city/{stem}_leftImg8bit{ext}", "gtFine/{d}/city/{stem}_gtFine_labelIds.png",
                   "gtFine/{d}/city/{stem}_gtFine_instanceIds.png", {"train": "train", "val": "val"}),
    "celebamask_hq": ("{d}/images/{stem}{ext}", "{d}/labels/{stem}.png", None, {"train": "train", "val": "val"}),
    "coco_stuff": ("{d}_img/{stem}{ext}", "{d}_label/{stem}.png", "{d}_inst/{stem}.png", {"train": "train", "val": "val"}),
    "folder": ("images/{stem}{ext}", "labels/{stem}.png", "instances/{stem}.png", {"train": "train"}),
}
FOLDER_CLASSES = ["void", "sky", "road", "tree", "car", "person"]


@dataclass(frozen=True)
class HostileDataset:
    name: str
    fails: str  # how the file is hostile, and what it did before the packers checked for it
    recipe: str
    outcome: str  # "packed" or "rejected"
    reason: str | None  # a rejected case's reason must contain this
    stem: str | None = None  # the file stem when the case is about names (else the case's name)
    needs_instances: bool = False  # only for layouts with instance maps


def load_corpus() -> list[HostileDataset]:
    return [HostileDataset(**e) for e in json.loads(CORPUS.read_text())]


@dataclass
class Sample:
    """Where one sample's files go in a layout's tree, and the class ids it may use."""

    root: Path
    image: Path
    label: Path
    instance: Path | None
    bad_id: int  # the smallest id the layout does not have

    def write_image(self, data: bytes | None = None, path: Path | None = None) -> None:
        _put(path or self.image, data if data is not None else png(image_array()))

    def write_label(self, data: bytes | None = None) -> None:
        _put(self.label, data if data is not None else png(label_array()))


def _put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def png(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def image_array(h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)


def label_array(h: int = H, w: int = W, value: int = 1, dtype: type = np.uint8) -> np.ndarray:
    arr = np.zeros((h, w), dtype=dtype)
    arr[:, w // 2 :] = value
    return arr


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=None)
def bomb_png(side: int = 8192) -> bytes:
    """A valid 8-bit greyscale PNG of side x side zeros: 64 MiB of pixels (512 MiB as int64 ids) in about 65 KiB.
    Under PIL's own limit (89M pixels warn, 179M refuse), so only the packers' header check stops its decode."""
    z = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    data = b"".join(z.compress(row * 256) for _ in range(side // 256)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def ztxt_bomb_png() -> bytes:
    """A small valid PNG with a zTXt text chunk that inflates to 8 MiB (over PIL's text-chunk limit)."""
    good = png(image_array())
    text = _chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"\0" * 2**23, 9))
    return good[:33] + text + good[33:]  # after the 8-byte signature and the 25-byte IHDR chunk


def _symlink(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


RECIPES: dict[str, Callable[[Sample], None]] = {
    "good": lambda s: (s.write_image(), s.write_label()),
    "jpeg_image": lambda s: (s.write_image(jpeg(image_array()), s.image.with_suffix(".jpg")), s.write_label()),
    "bomb_image": lambda s: (s.write_image(bomb_png()), s.write_label()),
    "bomb_label": lambda s: (s.write_image(), s.write_label(bomb_png())),
    "ztxt_bomb_image": lambda s: (s.write_image(ztxt_bomb_png()), s.write_label()),
    "truncated_png_image": lambda s: (s.write_image(png(image_array())[:60]), s.write_label()),
    "truncated_jpeg_image": lambda s: (s.write_image(jpeg(image_array(64, 64))[:400], s.image.with_suffix(".jpg")),
                                       s.write_label()),
    "truncated_label": lambda s: (s.write_image(), s.write_label(png(label_array())[:50])),
    "empty_label": lambda s: (s.write_image(), s.write_label(b"")),
    "text_as_image": lambda s: (s.write_image(b"<html>404 Not Found</html>"), s.write_label()),
    "size_mismatch": lambda s: (s.write_image(), s.write_label(png(label_array(H, W - 2)))),
    "instance_size_mismatch": lambda s: (s.write_image(), s.write_label(), _put(s.instance, png(label_array(H - 2, W)))),
    "ids_beyond_classes": lambda s: (s.write_image(), s.write_label(png(label_array(value=s.bad_id)))),
    "label_16bit_in_range": lambda s: (s.write_image(), s.write_label(png(label_array(value=1, dtype=np.uint16)))),
    "label_16bit_scaled": lambda s: (s.write_image(), s.write_label(png(label_array(value=256, dtype=np.uint16)))),
    "rgb_label": lambda s: (s.write_image(), s.write_label(png(image_array()))),
    "symlink_out_of_tree": lambda s: (_put(s.root.parent / "outside.png", png(image_array())),
                                      _symlink(s.image, s.root.parent / "outside.png"), s.write_label()),
    "symlink_inside_tree": lambda s: (_put(s.root / "kept" / "inside.png", png(image_array())),
                                      _symlink(s.image, s.root / "kept" / "inside.png"), s.write_label()),
    "duplicate_stem": lambda s: (s.write_image(), s.write_image(jpeg(image_array()), s.image.with_suffix(".jpg")),
                                 s.write_label()),
    "orphan_label": lambda s: s.write_label(),
    "orphan_image": lambda s: s.write_image(),
}


def build_tree(layout: str, root: Path, cases: list[HostileDataset]) -> list[HostileDataset]:
    """Write every case that applies to `layout` as a train sample under `root` (and the val split's folders,
    empty); returns those cases."""
    image_fmt, label_fmt, inst_fmt, dirs = LAYOUT_PATHS[layout]
    from sdm.data.packers import _classes

    if layout == "folder":
        root.mkdir(parents=True, exist_ok=True)
        (root / "classes.txt").write_text("\n".join(FOLDER_CLASSES) + "\n")
    _, _, allowed = _classes(layout, root)
    bad_id = min(set(range(1000)) - allowed)
    used = [c for c in cases if inst_fmt or not c.needs_instances]
    for case in used:
        stem = case.stem or case.name
        fmt = {"d": dirs["train"], "stem": stem, "ext": ".png"}
        # a stem that is not UTF-8 is written in the corpus with surrogates (\udcXX), as os.fsdecode reads it back
        sample = Sample(root, root / image_fmt.format(**fmt), root / label_fmt.format(**fmt),
                        root / inst_fmt.format(**fmt) if inst_fmt else None, bad_id)
        RECIPES[case.recipe](sample)
    if "val" in dirs:  # an empty split
        for fmt in (image_fmt, label_fmt):
            (root / os.path.dirname(fmt.format(d=dirs["val"], stem="x", ext=""))).mkdir(parents=True, exist_ok=True)
    return used


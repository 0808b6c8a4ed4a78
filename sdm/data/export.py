"""`sdm data export`: a dataset in the shard format (packed or generated) -> a layout that trainers read directly.

Layouts under DST:

    ade20k      images/<training|validation|split>/<key>.jpg|png, annotations/<...>/<key>.png (mmsegmentation's ADE20K)
    cityscapes  leftImg8bit/<split>/<city>/<key>_leftImg8bit.png, gtFine/<split>/<city>/<key>_gtFine_labelIds.png
                and _gtFine_labelTrainIds.png (the 19 training classes, 255 = ignore; what mmsegmentation reads), plus
                <key>_gtFine_instanceIds.png when there is an instance map; <city> from a Cityscapes key, else "synthetic"
    hf-parquet  data/<split>-00000-of-00001.parquet...: Hugging Face `datasets` Image columns and features metadata
    export.json written last: the layout, the label-id convention, rows per split, the source URI and its card

Label ids. Every stored label column holds the source dataset's raw ids, the ids its card's class table is indexed
by: packers keep the ids of the source files, and generation resizes the source's label map without remapping
(its folder format writes those same bytes). The table identifies the convention: ADE20K (0 = other, 1..150),
Cityscapes labelIds (0..33, 34 = license plate as SPADE/SDM take it), COCO-Stuff (0..181, 255 = unlabeled, its last
entry), else the class index 0..N-1 with no unlabelled id (the toy set, CelebAMask-HQ, `folder` packs).
ade20k writes 0 for the unlabelled entry and the other entries 1..N in table order (ADE20K and Cityscapes unchanged,
the others shifted by one: mmsegmentation's reduce_zero_label gives back 0-based ids); cityscapes writes labelIds and
refuses a dataset of another class table; hf-parquet keeps the raw ids.

Each file is published atomically and export.json last, after removing an earlier one: an export without it is
unfinished. Names are deterministic, so rerunning the same export rewrites the same bytes.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdm import storage
from sdm.data.card import CARD_FILE, DatasetCard, read_card
from sdm.data.classes import dataset_classes
from sdm.data.shards import read_shard_table
from sdm.errors import DatasetError, InvalidInputError
from sdm.imageio import decode_ids, decode_image, encode_png

EXPORT_FILE = "export.json"
LAYOUTS = ("ade20k", "cityscapes", "hf-parquet")
ADE20K_SPLIT_DIRS = {"train": "training", "val": "validation"}  # other splits keep their name
# trainId of each labelId 0..34 (cityscapesScripts' label table; its -1 and 255 both written as 255, ignored)
CITYSCAPES_TRAIN_IDS = np.array(
    [255] * 7 + [0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 255, 255, 16, 17, 18, 255],
    dtype=np.int64,
)
CITYSCAPES_KEY = re.compile(r"^([a-z]+)_\d{6}_\d{6}(_|$)")  # <city>_<seq>_<frame>, generated keys add _<k>
SYNTHETIC_CITY = "synthetic"
HF_DIR = "data"
IMAGE_COLUMNS = ("image", "label", "instance")
WRITE_THREADS = 16  # files in flight at once: S3 latency, not bandwidth, bounds one-file-at-a-time writes

Progress = Callable[[str, int, int], None]  # (split, rows done, rows in the split)


@dataclass(frozen=True)
class IdConvention:
    """How a dataset's stored label ids relate to its card's class table."""

    name: str
    raw_ids: tuple[int, ...]  # the stored id of each entry of the class table
    unlabelled: int | None  # the entry that means "no class", if any

    def ade20k_ids(self) -> dict[int, int]:
        """stored id -> ADE20K id: 0 for the unlabelled entry, the others 1..N in table order."""
        out, n = {}, 0
        for index, raw in enumerate(self.raw_ids):
            if index == self.unlabelled:
                out[raw] = 0
            else:
                n += 1
                out[raw] = n
        return out


def id_convention(card: DatasetCard) -> IdConvention:
    names = card.class_names
    if names == dataset_classes("ade20k")[0]:
        return IdConvention("ade20k", tuple(range(151)), 0)
    if names == dataset_classes("cityscapes")[0]:
        return IdConvention("cityscapes-labelIds", tuple(range(35)), 0)
    if names == dataset_classes("coco_stuff")[0] + ["unlabeled"]:  # as packed: raw 255 is the model's class 182
        return IdConvention("coco_stuff", (*range(182), 255), 182)
    return IdConvention("class-index", tuple(range(card.num_classes)), None)


@dataclass
class ExportPlan:
    src: str
    dst: str
    layout: str
    card: DatasetCard
    splits: list[str]
    convention: IdConvention

    def record(self, counts: dict[str, int]) -> dict[str, Any]:
        """export.json: what was exported, how, and from where (the source card travels along)."""
        return {
            "layout": self.layout, "source": storage.absolute(self.src), "splits": counts,
            "label_ids": {"source": self.convention.name, "written": _written_convention(self.layout, self.convention)},
            "source_card": asdict(self.card),
        }


def _written_convention(layout: str, convention: IdConvention) -> str:
    if layout == "ade20k":
        return "ade20k (0 = unlabelled, classes 1..N)"
    if layout == "cityscapes":
        return "cityscapes labelIds (and labelTrainIds)"
    return f"{convention.name} (as stored)"


def plan_export(src: str, dst: str, layout: str, splits: list[str] | None = None) -> ExportPlan:
    """Everything that can refuse an export, checked before anything is written."""
    if layout not in LAYOUTS:
        raise InvalidInputError(f"unknown export layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    storage.resolve(dst)  # a malformed URI is refused before any work
    card = read_card(src)
    present = sorted({s.split for s in card.shards})
    for split in splits or []:
        if split not in present:
            raise DatasetError(f"dataset {src} has no split {split!r} (it has {', '.join(present) or 'none'})")
    convention = id_convention(card)
    if layout == "cityscapes" and convention.name != "cityscapes-labelIds":
        raise DatasetError(
            f"layout 'cityscapes' writes Cityscapes labelIds, but {src} ({card.name!r}, {card.num_classes} classes) does "
            f"not use the Cityscapes class table; export it as ade20k or hf-parquet"
        )
    if storage.exists(storage.join(dst, CARD_FILE)):
        raise InvalidInputError(f"{dst} holds a dataset in the shard format ({CARD_FILE}); export into another folder")
    plan = ExportPlan(src, dst, layout, card, [s for s in present if not splits or s in splits], convention)
    _check_earlier(plan)
    return plan


def _check_earlier(plan: ExportPlan) -> None:
    """Refuse to mix two exports in one DST; the same export again is a rerun."""
    marker = storage.join(plan.dst, EXPORT_FILE)
    if not storage.exists(marker):
        return
    before = json.loads(storage.read_bytes(marker))
    now = {"layout": plan.layout, "source": storage.absolute(plan.src), "splits": plan.splits}
    was = {"layout": before.get("layout"), "source": before.get("source"), "splits": sorted(before.get("splits", {}))}
    if was != now:
        diff = ", ".join(f"{k}: {was[k]!r} there, {now[k]!r} now" for k in now if was[k] != now[k])
        raise InvalidInputError(f"{plan.dst} holds another export ({diff}); use a new DST")


def export(src: str, dst: str, layout: str, splits: list[str] | None = None, progress: Progress | None = None) -> dict[str, int]:
    """Export a dataset; returns the rows written per split."""
    return run_export(plan_export(src, dst, layout, splits), progress)


def run_export(plan: ExportPlan, progress: Progress | None = None) -> dict[str, int]:
    """Write a planned export, export.json last; returns the rows written per split."""
    src, dst, layout = plan.src, plan.dst, plan.layout
    storage.delete(storage.join(dst, EXPORT_FILE))  # unfinished until the new one is written
    counts, parquet_files = {}, set()
    with ThreadPoolExecutor(WRITE_THREADS) as pool:
        for split in plan.splits:
            shards = [s for s in plan.card.shards if s.split == split]
            total, done = sum(s.rows for s in shards), 0
            for i, shard in enumerate(shards):
                table = read_shard_table(src, shard)
                files = _hf_files(plan, table, split, i, len(shards)) if layout == "hf-parquet" else _folder_files(plan, table)
                written = list(pool.map(lambda f: _write(dst, *f), files))
                parquet_files.update(posixpath.basename(p) for p in written if p.startswith(f"{HF_DIR}/"))
                done += table.num_rows
                if progress:
                    progress(split, done, total)
            counts[split] = done
    if layout == "hf-parquet":  # a glob over data/ must not pick up files of an earlier run of this export
        for name in set(storage.list_files(storage.join(dst, HF_DIR), ".parquet")) - parquet_files:
            storage.delete(storage.join(dst, HF_DIR, name))
    storage.write_bytes(storage.join(dst, EXPORT_FILE), json.dumps(plan.record(counts), indent=2).encode())
    return counts


def _write(dst: str, path: str, data: bytes) -> str:
    storage.write_bytes(storage.join(dst, *path.split("/")), data)
    return path


# Folder layouts: one image file and one label file (and instance file) per row.


def _safe_key(key: str) -> str:
    if not key or "/" in key or "\\" in key or key.startswith("."):
        raise DatasetError(f"sample key {key!r} cannot be a file name")
    return key


def _image_ext(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    return None


def _as_png(data: bytes, what: str) -> bytes:
    return data if _image_ext(data) == ".png" else encode_png(decode_image(data, what))


def _mapped_label(data: bytes, key: str, lut: np.ndarray) -> bytes:
    """A label PNG with each stored id replaced by lut[id]; an id the table lacks (lut -1, or past its end) is refused."""
    raw = decode_ids(data, f"label of sample {key!r}")
    known = raw < lut.size
    ids = np.where(known, lut[np.minimum(raw, lut.size - 1)], -1)
    if (ids < 0).any():
        bad = ", ".join(str(int(b)) for b in np.unique(raw[ids < 0])[:20])
        raise DatasetError(f"label of sample {key!r} has ids outside its dataset's class table: {bad}")
    return encode_png(ids)


def _lut(convention: IdConvention) -> np.ndarray | None:
    """stored id -> ADE20K id as an array (-1: not in the table); None when they are the same."""
    mapping = convention.ade20k_ids()
    if all(k == v for k, v in mapping.items()):
        return None
    lut = np.full(max(mapping) + 1, -1, dtype=np.int64)
    for raw, ade in mapping.items():
        lut[raw] = ade
    return lut


def _folder_files(plan: ExportPlan, table: pa.Table) -> Iterator[tuple[str, bytes]]:
    """(path under DST, bytes) of every file of a shard's rows."""
    lut = _lut(plan.convention) if plan.layout == "ade20k" else None
    for row in table.select(["key", "split", *IMAGE_COLUMNS]).to_pylist():
        key = _safe_key(row["key"])
        if plan.layout == "ade20k":
            folder = ADE20K_SPLIT_DIRS.get(row["split"], row["split"])
            image, ext = row["image"], _image_ext(row["image"])
            if ext is None:
                image, ext = _as_png(image, f"image of sample {key!r}"), ".png"
            yield f"images/{folder}/{key}{ext}", image
            yield f"annotations/{folder}/{key}.png", row["label"] if lut is None else _mapped_label(row["label"], key, lut)
        else:
            match = CITYSCAPES_KEY.match(key)
            base = f"{row['split']}/{match.group(1) if match else SYNTHETIC_CITY}/{key}"
            yield f"leftImg8bit/{base}_leftImg8bit.png", _as_png(row["image"], f"image of sample {key!r}")
            yield f"gtFine/{base}_gtFine_labelIds.png", row["label"]
            yield f"gtFine/{base}_gtFine_labelTrainIds.png", _mapped_label(row["label"], key, CITYSCAPES_TRAIN_IDS)
            if row["instance"] is not None:
                yield f"gtFine/{base}_gtFine_instanceIds.png", row["instance"]


# hf-parquet: one Parquet file per source shard, the image columns as `datasets` Image structs.

HF_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
HF_VALUE_DTYPES = {pa.string(): "string", pa.int32(): "int32", pa.int64(): "int64", pa.float32(): "float32",
                   pa.float64(): "float64", pa.bool_(): "bool", pa.binary(): "binary"}


def _hf_image_column(column: pa.ChunkedArray, keys: list[str], suffix: str) -> pa.Array:
    values = column.to_pylist()
    return pa.array(
        [None if v is None else {"bytes": v, "path": f"{k}{suffix}{_image_ext(v) or ''}"} for k, v in zip(keys, values)],
        type=HF_IMAGE_TYPE,
    )


def hf_features(schema: pa.Schema) -> dict[str, Any]:
    """The `datasets` features of an exported table: Image for the image columns, Value for the others."""
    features = {}
    for f in schema:
        if f.name in IMAGE_COLUMNS:
            features[f.name] = {"_type": "Image"}
        elif f.type in HF_VALUE_DTYPES:
            features[f.name] = {"dtype": HF_VALUE_DTYPES[f.type], "_type": "Value"}
        else:
            raise DatasetError(f"column {f.name!r} has type {f.type}, which this export has no `datasets` feature for")
    return features


def _hf_files(plan: ExportPlan, table: pa.Table, split: str, index: int, count: int) -> list[tuple[str, bytes]]:
    keys = table.column("key").to_pylist()
    columns, fields = [], []
    for f in table.schema:
        if f.name == "instance" and not plan.card.has_instance:
            continue
        if f.name in IMAGE_COLUMNS:
            suffix = "" if f.name == "image" else f"_{f.name}"
            columns.append(_hf_image_column(table.column(f.name), keys, suffix))
            fields.append(pa.field(f.name, HF_IMAGE_TYPE))
        else:
            columns.append(table.column(f.name))
            fields.append(pa.field(f.name, f.type))
    schema = pa.schema(fields)
    metadata = {"huggingface": json.dumps({"info": {"features": hf_features(schema)}})}
    out = pa.Table.from_arrays(columns, schema=schema.with_metadata(metadata))
    sink = pa.BufferOutputStream()
    pq.write_table(out, sink)
    return [(f"{HF_DIR}/{split}-{index:05d}-of-{count:05d}.parquet", sink.getvalue().to_pybytes())]


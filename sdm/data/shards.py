"""Parquet shards of samples: one row per sample, images and label maps as encoded bytes.

Columns: key, image (JPEG/PNG bytes as in the source), label (PNG of class ids), instance (PNG of ids or
null), height, width, split; a generated dataset adds its generation metadata columns. The writer publishes
each shard atomically; the reader streams one shard at a time and checks each against the card's checksum.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sdm import storage
from sdm.data.card import CARD_FILE, DatasetCard, ShardInfo, read_card
from sdm.errors import DatasetError, ShardIntegrityError, StorageError
from sdm.imageio import decode_ids, decode_image

SHARD_DIR = "shards"
DEFAULT_SHARD_BYTES = 256 * 2**20

BASE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.binary()),
        ("label", pa.binary()),
        ("instance", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("split", pa.string()),
    ]
)


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """A shard row -> key, split, image uint8 HxWx3, label int64 HxW, instance int64 HxW or None."""
    key = row["key"]
    image = decode_image(row["image"], f"image of sample {key!r}")
    label = decode_ids(row["label"], f"label of sample {key!r}")
    inst = row.get("instance")
    instance = decode_ids(inst, f"instance map of sample {key!r}") if inst is not None else None
    for name, arr in (("label", label), ("instance map", instance)):
        if arr is not None and arr.shape != image.shape[:2]:
            raise DatasetError(f"sample {key!r}: {name} is {arr.shape[1]}x{arr.shape[0]} but the image is {image.shape[1]}x{image.shape[0]}")
    return {"key": key, "split": row.get("split"), "image": image, "label": label, "instance": instance}


def make_row(key: str, split: str, image: bytes, label: bytes, instance: bytes | None, height: int, width: int, **extra: Any) -> dict[str, Any]:
    return {"key": key, "image": image, "label": label, "instance": instance, "height": height, "width": width, "split": split, **extra}


class ShardWriter:
    """Buffers rows of one split and publishes them as shards of about `target_bytes` each.

    Shard names are deterministic (`shards/<prefix><split>-00000.parquet`), so rewriting a dataset replaces
    its shards instead of adding duplicates.
    """

    def __init__(self, root_uri: str, split: str, target_bytes: int = DEFAULT_SHARD_BYTES, prefix: str = "", schema: pa.Schema = BASE_SCHEMA):
        self.root, self.split, self.target, self.prefix, self.schema = root_uri, split, target_bytes, prefix, schema
        self.rows: list[dict[str, Any]] = []
        self.pending_bytes = 0
        self.shards: list[ShardInfo] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.pending_bytes += len(row["image"]) + len(row["label"]) + len(row.get("instance") or b"")
        if self.pending_bytes >= self.target:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"{SHARD_DIR}/{self.prefix}{self.split}-{len(self.shards):05d}.parquet"
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        storage.write_bytes(storage.join(self.root, name), data)
        self.shards.append(ShardInfo(name, self.split, len(self.rows), hashlib.sha256(data).hexdigest(), len(data)))
        self.rows, self.pending_bytes = [], 0

    def close(self) -> list[ShardInfo]:
        self.flush()
        return self.shards


def verify_shard(data: bytes, shard: ShardInfo, root_uri: str) -> None:
    """Raise ShardIntegrityError unless `data` is the shard the card lists: its size, then its sha256."""
    where = f"shard {shard.path} of {root_uri} fails its checksum against the card {storage.join(root_uri, CARD_FILE)}"
    if len(data) != shard.bytes:
        raise ShardIntegrityError(f"{where}: {len(data)} bytes where the card lists {shard.bytes} (replaced, partly synced or damaged)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard.sha256:
        raise ShardIntegrityError(f"{where}: sha256 {digest[:12]}... where the card lists {shard.sha256[:12]}... (replaced or damaged)")


def read_shard_table(root_uri: str, shard: ShardInfo, verify: bool = True, columns: list[str] | None = None) -> pa.Table:
    """One shard as an Arrow table (of `columns`, default all), its bytes read once and checked against the card
    (verify_shard) before they are parsed: every reader, in one process or in Ray Data read tasks, calls this."""
    uri = storage.join(root_uri, shard.path)
    try:
        data = storage.read_bytes(uri)
    except StorageError:
        raise DatasetError(f"shard {shard.path} listed in the card of {root_uri} is missing") from None
    if verify:
        verify_shard(data, shard, root_uri)
    return pq.read_table(pa.BufferReader(data), columns=columns)


def iter_rows(
    root_uri: str,
    split: str | None = None,
    shuffle: bool = False,
    seed: int = 0,
    buffer_size: int = 256,
    card: DatasetCard | None = None,
    verify: bool = True,
) -> Iterator[dict[str, Any]]:
    """Stream raw rows one shard at a time; with `shuffle`, shard order and a bounded buffer are shuffled."""
    card = card or read_card(root_uri)
    shards = [s for s in card.shards if split is None or s.split == split]
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(shards)
    buffer: list[dict[str, Any]] = []
    for shard in shards:
        for batch in read_shard_table(root_uri, shard, verify).to_batches(max_chunksize=64):
            for row in batch.to_pylist():
                if not shuffle:
                    yield row
                    continue
                buffer.append(row)
                if len(buffer) >= buffer_size:
                    yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def iter_samples(root_uri: str, split: str | None = None, shuffle: bool = False, seed: int = 0, buffer_size: int = 256) -> Iterator[dict[str, Any]]:
    """Decoded samples (see decode_row), streamed; usable from a plain PyTorch loop."""
    for row in iter_rows(root_uri, split, shuffle, seed, buffer_size):
        yield decode_row(row)

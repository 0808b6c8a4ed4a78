"""What is in a dataset: card summary, class histogram, and a contact sheet a person can look at."""

from __future__ import annotations

from itertools import islice

import numpy as np
import torch
from PIL import Image

from sdm import storage
from sdm.data.card import DatasetCard, read_card
from sdm.data.shards import iter_samples
from sdm.imageio import png_bytes
from sdm.labels import instance_edges


def class_histogram(uri: str, card: DatasetCard, max_samples: int | None = None) -> np.ndarray:
    """Pixel counts per class id over (up to max_samples of) the dataset."""
    counts = np.zeros(card.num_classes, dtype=np.int64)
    for s in islice(iter_samples(uri), max_samples):
        ids = s["label"].reshape(-1)
        counts += np.bincount(ids[ids < card.num_classes], minlength=card.num_classes)
    return counts


def colourise(label: np.ndarray, palette: list[list[int]]) -> np.ndarray:
    """Class ids -> RGB with the dataset's palette (ids outside it are black)."""
    pal = np.zeros((max(len(palette), int(label.max()) + 1), 3), dtype=np.uint8)
    pal[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return pal[label]


def contact_sheet(uri: str, card: DatasetCard, n: int = 8, cell: int = 128) -> bytes:
    """PNG rows of image | palette-coloured label | instance edges for the first n samples."""
    rows = []
    for s in islice(iter_samples(uri), n):
        h, w = s["label"].shape
        edges = instance_edges(torch.from_numpy(s["instance"])).numpy() if s["instance"] is not None else np.zeros((h, w))
        tiles = [s["image"], colourise(s["label"], card.palette), (edges * 255).astype(np.uint8)[..., None].repeat(3, 2)]
        size = (cell * w // max(h, w), cell * h // max(h, w))
        rows.append(np.concatenate([np.array(Image.fromarray(t).resize(size, Image.NEAREST)) for t in tiles], axis=1))
    return png_bytes(Image.fromarray(np.concatenate(rows, axis=0)))


def summary(uri: str, card: DatasetCard, hist: np.ndarray) -> str:
    total = max(int(hist.sum()), 1)
    lines = [
        f"dataset {card.name} at {uri} (format v{card.format_version})",
        f"  {card.num_classes} classes, instance maps: {'yes' if card.has_instance else 'no'}",
        "  splits: " + ", ".join(f"{k} {v}" for k, v in card.split_sizes.items()),
        f"  {len(card.shards)} shards, {sum(s.bytes for s in card.shards) / 2**20:.1f} MiB",
        "  class histogram (share of pixels):",
    ]
    for cid in np.argsort(-hist):
        if hist[cid]:
            lines.append(f"    {cid:>4} {card.class_names[cid]:<24}{100 * hist[cid] / total:6.2f}%")
    return "\n".join(lines)


def inspect_dataset(uri: str, sheet_uri: str, n: int = 8, max_samples: int | None = 2000) -> str:
    """Write the contact sheet and return the printed summary."""
    card = read_card(uri)
    text = summary(uri, card, class_histogram(uri, card, max_samples))
    storage.write_bytes(sheet_uri, contact_sheet(uri, card, n))
    return text + f"\ncontact sheet: {sheet_uri}"

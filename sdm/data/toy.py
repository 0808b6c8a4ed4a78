"""A procedural labelled dataset that makes conditional generation learnable and measurable on a CPU.

Scenes of sky and grass split at a random horizon, sometimes a lake, and a few objects (trees, houses,
balls) each with its own instance id. Every class is rendered with its own colour and texture drawn
afresh per sample, so one label map admits many images (diversity is real) while a pixel's class stays
recoverable from its colour (a segmenter can score semantic correspondence). Deterministic in its seed.
"""

from __future__ import annotations

import numpy as np

from sdm.data.card import DatasetCard
from sdm.data.procedural import World, write_world
from sdm.data.shards import DEFAULT_SHARD_BYTES

TOY_CLASSES = ["sky", "grass", "water", "tree", "house", "ball"]
TOY_PALETTE = [[135, 206, 235], [60, 160, 60], [30, 60, 200], [10, 80, 20], [180, 40, 40], [250, 200, 30]]
SKY, GRASS, WATER, TREE, HOUSE, BALL = range(6)
# Per class: mean RGB and the spread of its per-sample colour.
_COLOUR = {
    SKY: ((135, 185, 235), (20, 20, 12)),
    GRASS: ((70, 150, 55), (15, 20, 15)),
    WATER: ((35, 70, 175), (12, 15, 25)),
    TREE: ((20, 85, 30), (8, 15, 8)),
    HOUSE: ((170, 55, 45), (25, 15, 12)),
    BALL: ((240, 195, 35), (10, 30, 15)),
}


def _disc(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _layout(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Label map and instance map: stuff regions carry their class id, objects 1000 + their index."""
    s = size / 32
    label = np.full((size, size), SKY, dtype=np.uint8)
    horizon = int(rng.integers(int(9 * s), int(19 * s) + 1))
    label[horizon:] = GRASS
    if rng.random() < 0.6:
        lake = _disc(size, size, rng.uniform(horizon + 5 * s, size), rng.uniform(0, size), rng.uniform(3, 6) * s, rng.uniform(6, 12) * s)
        label[lake & (label == GRASS)] = WATER
    instance = label.astype(np.int32)
    for k in range(int(rng.integers(1, 5))):
        kind = int(rng.choice([TREE, HOUSE, BALL]))
        cy, cx = rng.uniform(horizon - 3 * s, size - 3 * s), rng.uniform(3 * s, size - 3 * s)
        if kind == HOUSE:
            hh, ww = rng.uniform(3, 6) * s, rng.uniform(4, 8) * s
            yy, xx = np.mgrid[0:size, 0:size]
            mask = (np.abs(yy - cy) <= hh) & (np.abs(xx - cx) <= ww)
        elif kind == TREE:
            mask = _disc(size, size, cy, cx, rng.uniform(4, 7) * s, rng.uniform(3, 5) * s)
        else:
            r = rng.uniform(2, 4) * s
            mask = _disc(size, size, cy, cx, r, r)
        label[mask] = kind
        instance[mask] = 1000 + k
    return label, instance


def _paint(rng: np.random.Generator, label: np.ndarray, instance: np.ndarray) -> np.ndarray:
    """An image for a layout: per-sample class colours plus each class's texture."""
    size = label.shape[0]
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3), dtype=np.float32)
    for cls, (mean, spread) in _COLOUR.items():
        colour = np.array(mean, dtype=np.float32) + rng.normal(0, 1, 3) * np.array(spread)
        if cls == SKY:
            shade = 1.0 - 0.25 * yy * rng.uniform(0.5, 1.5)  # brighter towards the zenith
        elif cls == WATER:
            shade = 1.0 + 0.12 * np.sin(yy * size * rng.uniform(1.5, 2.5) + rng.uniform(0, 6.3))  # waves
        elif cls == HOUSE:
            shade = 1.0 - 0.2 * (np.floor(xx * size) % 3 == 0)  # planks
        else:
            shade = 1.0 + rng.normal(0, 0.08, label.shape)  # foliage and grass grain
        for inst in np.unique(instance[label == cls]):  # objects of one class differ a little too
            m = (label == cls) & (instance == inst)
            img[m] = (colour * rng.uniform(0.9, 1.1))[None] * np.asarray(shade if np.ndim(shade) else np.ones(label.shape))[m][:, None]
    img += rng.normal(0, 3.0, img.shape)
    return img.clip(0, 255).astype(np.uint8)


TOY = World(name="toy", class_names=TOY_CLASSES, palette=TOY_PALETTE, default_size=32, layout=_layout, paint=_paint)


def render_toy_sample(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8 HxWx3, label uint8 HxW of class ids 0..5, instance int32 HxW)."""
    return TOY.sample(rng, size)


def render_toy_image(rng: np.random.Generator, label: np.ndarray, instance: np.ndarray) -> np.ndarray:
    """Another image for an existing layout: how one label map admits many images."""
    return _paint(rng, label, instance)


def write_toy_dataset(
    dst_uri: str, n: int, size: int = 32, seed: int = 0, val_fraction: float = 0.125, shard_bytes: int = DEFAULT_SHARD_BYTES
) -> DatasetCard:
    """Write n samples ("train" and "val" splits) in the shard format, the card last."""
    return write_world(TOY, dst_uri, n, size, seed, val_fraction, shard_bytes)

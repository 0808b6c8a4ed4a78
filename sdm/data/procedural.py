"""Procedural worlds: a layout generator and a painter, written as a dataset in the shard format.

A world draws a label map with its instance map from a random generator, then paints an image of it; painting the
same layout again with other random numbers gives another image of one label map. `toy` (sdm/data/toy.py) is the
fast quick-start world, `scenes` (sdm/data/scenes.py) the benchmark world.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sdm.data.card import DatasetCard, withdraw_card, write_card
from sdm.data.shards import DEFAULT_SHARD_BYTES, ShardWriter, make_row
from sdm.errors import InvalidInputError
from sdm.imageio import encode_png

Layout = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]
Painter = Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class World:
    name: str
    class_names: list[str]
    palette: list[list[int]]
    default_size: int
    layout: Layout  # (rng, size) -> label uint8 HxW, instance int32 HxW
    paint: Painter  # (rng, label, instance) -> image uint8 HxWx3
    min_size: int = 8  # the smallest side its layouts fit in

    def sample(self, rng: np.random.Generator, size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image, label, instance) of one new layout."""
        label, instance = self.layout(rng, size or self.default_size)
        return self.paint(rng, label, instance), label, instance


def write_world(world: World, dst_uri: str, n: int, size: int | None = None, seed: int = 0, val_fraction: float = 0.125,
                shard_bytes: int = DEFAULT_SHARD_BYTES) -> DatasetCard:
    """Write n samples of a world ("train", then the last val_fraction as "val") in the shard format, the card last."""
    size = size or world.default_size
    if n < 1 or size < world.min_size:
        raise InvalidInputError(f"a {world.name} dataset needs n >= 1 and size >= {world.min_size}, got n={n}, size={size}")
    withdraw_card(dst_uri)
    rng = np.random.default_rng(seed)
    n_val = int(round(n * val_fraction))
    writers = {"train": ShardWriter(dst_uri, "train", shard_bytes), "val": ShardWriter(dst_uri, "val", shard_bytes)}
    for i in range(n):
        split = "val" if i >= n - n_val else "train"
        image, label, instance = world.sample(rng, size)
        writers[split].add(make_row(f"{world.name}-{i:06d}", split, encode_png(image), encode_png(label), encode_png(instance), size, size))
    shards = [s for w in writers.values() for s in w.close()]
    card = DatasetCard(
        name=world.name,
        num_classes=len(world.class_names),
        class_names=list(world.class_names),
        palette=[list(c) for c in world.palette],
        has_instance=True,
        split_sizes={"train": n - n_val, "val": n_val},
        shards=shards,
        extra={"generator": f"sdm.data.{world.name}", "seed": seed, "size": size},
    )
    write_card(dst_uri, card)
    return card

"""Training data as a Ray Dataset: streaming Parquet shards, decoded and augmented by the library's one preprocessing."""

from __future__ import annotations

import numpy as np
import ray.data

from sdm import storage
from sdm.config import SDMConfig
from sdm.data.card import DatasetCard
from sdm.data.preprocess import preprocess_train
from sdm.data.shards import decode_row
from sdm.errors import SDMError


def check_dataset_fits(card: DatasetCard, cfg: SDMConfig, uri: str) -> None:
    """Refuse a dataset whose classes or instance maps do not fit the model config."""
    m = cfg.model
    if card.num_classes != m.num_classes:
        raise SDMError(
            f"dataset {uri} ({card.name}) has {card.num_classes} classes but the model config "
            f"{cfg.name!r} expects {m.num_classes}"
        )
    if m.instance_edges and not card.has_instance and not cfg.data.edges_from_labels:
        raise SDMError(
            f"model config {cfg.name!r} takes an instance-edge channel but dataset {uri} has no instance maps "
            "(set data.edges_from_labels=true to derive edges from the label map)"
        )
    if not card.split_sizes.get("train"):
        raise SDMError(f"dataset {uri} has no 'train' split")


def _preprocess(batch: dict[str, np.ndarray], cfg: SDMConfig, has_instance: bool) -> dict[str, np.ndarray]:
    """Decode rows and apply the training augmentations (fresh random flips and crops every epoch)."""
    rng = np.random.default_rng()
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out = [preprocess_train(decode_row(r), cfg.model, cfg.data, rng) for r in rows]
    result = {
        "key": np.array([r["key"] for r in rows]),
        "image": np.stack([o["image"] for o in out]).astype(np.float32),
        "label": np.stack([o["label"] for o in out]).astype(np.int64),
    }
    if has_instance:
        result["instance"] = np.stack([o["instance"] for o in out]).astype(np.int64)
    return result


def make_train_dataset(uri: str, card: DatasetCard, cfg: SDMConfig, seed: int) -> ray.data.Dataset:
    """The train split's shards, read streaming in a seeded random block order."""
    fs, _ = storage.resolve(uri)
    paths = [storage.resolve(storage.join(uri, s.path))[1] for s in card.shards if s.split == "train"]
    ds = ray.data.read_parquet(paths, filesystem=fs).randomize_block_order(seed=seed)
    return ds.map_batches(_preprocess, fn_kwargs={"cfg": cfg, "has_instance": card.has_instance}, batch_size=32)

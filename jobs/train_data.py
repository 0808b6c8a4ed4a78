"""Training data as a Ray Dataset: Parquet shards of encoded rows, streamed to the workers by Ray Data and decoded and
augmented inside each training worker by the library's one preprocessing (TrainBatch).

Decoding in the worker, not in Ray Data map tasks, measured faster on a small machine (bench/train_throughput.py):
no task processes start beside the workers at each epoch, and every worker decodes its own share instead of one
data task taking CPU from one worker at a time while the other waits for it at the gradient all-reduce. The reads
are streamed in a seeded random shard order, with no all-to-all stage that would read every shard before the
first batch."""

from __future__ import annotations

from typing import Any

import numpy as np
import ray.data
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from jobs.ray_setup import read_shards
from sdm.config import SDMConfig
from sdm.data.card import DatasetCard, check_classes_match
from sdm.data.preprocess import preprocess_train
from sdm.data.shards import decode_row
from sdm.errors import SDMError


def check_dataset_fits(card: DatasetCard, cfg: SDMConfig, uri: str) -> None:
    """Refuse a dataset whose classes or instance maps do not fit the model config."""
    check_classes_match(card, uri, cfg)
    if cfg.model.instance_edges and not card.has_instance and not cfg.data.edges_from_labels:
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


class TrainBatch(NumpyBatchCollateFn):
    """Encoded rows to a training batch inside the training worker (Ray Data's iterator calls it on its prefetch
    thread): decoded and augmented, numeric columns as tensors, the keys as they are."""

    def __init__(self, cfg: SDMConfig, has_instance: bool):
        self.cfg, self.has_instance = cfg, has_instance

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out = _preprocess(batch, self.cfg, self.has_instance)
        return {k: torch.from_numpy(v) if v.dtype.kind in "biuf" else v for k, v in out.items()}


def make_train_dataset(uri: str, card: DatasetCard, cfg: SDMConfig, seed: int) -> ray.data.Dataset:
    """The train split's shards, read streaming in a seeded random order, each checked against the card as it is
    read: a shard that fails stops training with ShardIntegrityError naming it."""
    shards = [s for s in card.shards if s.split == "train"]
    return read_shards(uri, [shards[i] for i in np.random.default_rng(seed).permutation(len(shards))])

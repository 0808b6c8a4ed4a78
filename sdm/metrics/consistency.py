"""Label consistency of generated pairs: how well a segmenter's prediction on a generated image agrees with the
label map the image was generated from, per sample. The generation job scores every pair with it and filters on it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdm.metrics.miou import ConfusionMatrix
from sdm.metrics.segmenter import Segmenter


@dataclass(frozen=True)
class PairScore:
    consistency: float  # mIoU over the classes present in the label map; NaN when it has no scorable pixel
    pixel_accuracy: float


def score_pairs(segmenter: Segmenter, images: np.ndarray, labels: np.ndarray, num_classes: int,
                ignore_index: int | None = None) -> list[PairScore]:
    """One score per (image uint8 [N, H, W, 3], label map [N, H, W]) pair; ids outside the segmenter's classes
    (and `ignore_index`) are left out, as in the dataset-level mIoU."""
    preds = segmenter.predict(images)
    scores = []
    for pred, label in zip(preds, labels):
        cm = ConfusionMatrix(num_classes, ignore_index).update(pred, label)
        scores.append(PairScore(cm.miou_present(), cm.pixel_accuracy()))
    return scores

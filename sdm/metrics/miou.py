"""Semantic correspondence: a confusion matrix of predicted vs given class ids, per-class IoU and mIoU."""

from __future__ import annotations

import numpy as np

from sdm.errors import InvalidInputError


class ConfusionMatrix:
    """rows: the label map's class, columns: the segmenter's. Pixels labelled `ignore_index`, or with an id
    outside [0, num_classes) (e.g. 255 "unlabelled"), are left out."""

    def __init__(self, num_classes: int, ignore_index: int | None = None):
        if num_classes < 1:
            raise InvalidInputError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> "ConfusionMatrix":
        if pred.shape != target.shape:
            raise InvalidInputError(f"predictions {pred.shape} and label maps {target.shape} differ in shape")
        t, p = target.reshape(-1).astype(np.int64), pred.reshape(-1).astype(np.int64)
        keep = (t >= 0) & (t < self.num_classes)
        if self.ignore_index is not None:
            keep &= t != self.ignore_index
        p = np.clip(p[keep], 0, self.num_classes - 1)  # an out-of-range prediction is wrong, never ignored
        self.matrix += np.bincount(t[keep] * self.num_classes + p, minlength=self.num_classes**2).reshape(self.matrix.shape)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        self.matrix += other.matrix
        return self

    def iou(self) -> np.ndarray:
        """Per class: TP / (TP + FP + FN); NaN for a class that is neither present nor predicted."""
        tp = np.diag(self.matrix).astype(np.float64)
        denom = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            out = tp / denom
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes:
            out[self.ignore_index] = np.nan
        return out

    def miou(self) -> float:
        """Mean IoU over the classes that occur (in the labels or the predictions)."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def miou_present(self) -> float:
        """Mean IoU over the classes present in the label maps: a wrongly predicted absent class lowers the
        IoU of the classes it took pixels from, but is not averaged in as a class of its own."""
        present = self.matrix.sum(1) > 0
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes:
            present[self.ignore_index] = False
        return float(self.iou()[present].mean()) if present.any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")

"""One pass over an image set, as a reduction: each batch yields partial results (feature sums per
extractor, a confusion matrix for the segmenter) that merge by addition. The same scorer runs in-process
here and on Ray Data actors in jobs/evaluate.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, Union

import numpy as np

from sdm.errors import DatasetError
from sdm.metrics.frechet import StatsAccumulator
from sdm.metrics.image_sets import Batch, ImageSet, iter_batches
from sdm.metrics.miou import ConfusionMatrix
from sdm.metrics.segmenter import Segmenter

Partial = dict[str, Union[StatsAccumulator, ConfusionMatrix]]


class Extractor(Protocol):
    dims: int
    feature_id: str
    metric_name: str

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float [N, dims]."""


@dataclass
class ScoreSpec:
    """What to compute over a set, as factories so that every process (or Ray actor) builds its own models.

    extractors: component id -> factory; confusion: component id of the segmenter's confusion matrix, or None.
    """

    extractors: dict[str, Callable[[], Extractor]] = field(default_factory=dict)
    segmenter: Callable[[], Segmenter] | None = None
    confusion: str | None = None
    num_classes: int = 0
    ignore_index: int | None = None

    def without(self, done: set[str]) -> "ScoreSpec":
        """The spec minus components already known (from the statistics cache)."""
        return ScoreSpec({k: f for k, f in self.extractors.items() if k not in done}, self.segmenter,
                         self.confusion if self.confusion not in done else None, self.num_classes, self.ignore_index)

    @property
    def empty(self) -> bool:
        return not self.extractors and self.confusion is None


class SetScorer:
    """Builds the spec's models once, then maps batches to partial results."""

    def __init__(self, spec: ScoreSpec):
        self.spec = spec
        self.extractors = {k: f() for k, f in spec.extractors.items()}
        self.segmenter = spec.segmenter() if spec.confusion is not None and spec.segmenter is not None else None

    def __call__(self, images: np.ndarray, labels: np.ndarray | None, where: str) -> Partial:
        out: Partial = {k: StatsAccumulator(e.dims).add(e(images)) for k, e in self.extractors.items()}
        if self.spec.confusion is not None:
            if labels is None:
                raise DatasetError(f"{where} has no label maps, so mIoU cannot be measured on it")
            cm = ConfusionMatrix(self.spec.num_classes, self.spec.ignore_index)
            out[self.spec.confusion] = cm.update(self.segmenter.predict(images), labels)
        return out


def merge(a: Partial, b: Partial) -> Partial:
    for k, v in b.items():
        a[k] = a[k].merge(v) if k in a else v
    return a


ScoreSetFn = Callable[[ImageSet, ScoreSpec, tuple[int, int], int, "int | None", Callable[[str], None]], Partial]


def score_locally(s: ImageSet, spec: ScoreSpec, size: tuple[int, int], batch_size: int, limit: int | None,
                  log: Callable[[str], None]) -> Partial:
    """The pass in this process, streaming batches."""
    scorer = SetScorer(spec)
    total: Partial = {}
    n = 0
    batches: Iterator[Batch] = iter_batches(s, size, batch_size, limit)
    for b in batches:
        total = merge(total, scorer(b.images, b.labels, s.uri))
        n += len(b.images)
        log(f"  {s.uri}: {n} images")
    return total

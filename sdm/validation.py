"""Validation while training: a fixed set of validation label maps drawn with fixed seeds through the one sampling
path (SDMPipeline), the contact sheet label | real | sample, and the quick fidelity figures against the real images
of those maps: texture ratio and spectrum distance (sdm.metrics.spectrum), and label consistency (the mean per-pair
mIoU of a segmenter's prediction against the label map, sdm.metrics.consistency) when a segmenter is at hand.

The sheet is a function of the weights, the label maps, the seed and the sampling settings, so the sheet of step N
can be drawn again, byte for byte, from checkpoint N.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
from PIL import Image

from sdm.config import SDMConfig
from sdm.data.card import read_card
from sdm.data.preprocess import resize_sample
from sdm.data.shards import iter_samples
from sdm.errors import InvalidInputError
from sdm.metrics.consistency import score_pairs
from sdm.metrics.report import contact_sheet_png
from sdm.metrics.segmenter import Segmenter
from sdm.metrics.spectrum import SpectrumFeatures, spectral_fidelity
from sdm.pipeline import SDMPipeline

MAX_VALIDATION_MAPS = 16  # the cost bound: two network batches of the default micro-batch at most


@dataclass(frozen=True)
class Validation:
    step: int
    sheet: np.ndarray  # uint8 [H, W, 3]: one row per map, label | real | sample
    sheet_png: bytes
    figures: dict[str, float]  # texture_ratio, spectrum_db, high_frequency_ratio[, consistency]
    seconds: float


class Validator:
    """The validation maps of a dataset (its `val` split, else `train`), read once, and how to draw them."""

    def __init__(self, data_uri: str, config: SDMConfig, num_maps: int = 8, seed: int = 0,
                 guidance_scale: float | None = None, segmenter: Segmenter | None = None):
        if not 1 <= num_maps <= MAX_VALIDATION_MAPS:
            raise InvalidInputError(f"validation maps must number 1 to {MAX_VALIDATION_MAPS}, got {num_maps}")
        card = read_card(data_uri)
        split = "val" if card.split_sizes.get("val") else "train"
        samples = [resize_sample(s, config.model.image_size) for s in islice(iter_samples(data_uri, split=split), num_maps)]
        if not samples:
            raise InvalidInputError(f"dataset {data_uri} has no samples to validate on")
        self.config, self.seed, self.guidance_scale, self.segmenter = config, seed, guidance_scale, segmenter
        self.palette, self.num_classes, self.split = card.palette, card.num_classes, split
        self.labels = [s["label"] for s in samples]
        self.instances = [s["instance"] for s in samples] if samples[0].get("instance") is not None else None
        self.real = np.stack([s["image"] for s in samples])
        self._spectrum = SpectrumFeatures()
        self._real_features = self._spectrum(self.real).mean(0)

    def draw(self, net: torch.nn.Module, step: int, device: torch.device | str = "cpu", config: SDMConfig | None = None) -> Validation:
        """Sample every map with `net` (an EMA network, left as it is) and score the samples; `config` replaces the
        model's config for this draw (a distillation round samples on its own grid)."""
        start = time.perf_counter()
        pipe = SDMPipeline(net, config or self.config, device=device, fast_path=False, micro_batch=len(self.labels))
        images = pipe(self.labels, instances=self.instances, guidance_scale=self.guidance_scale, seed=self.seed)
        fidelity = spectral_fidelity(self._real_features, self._spectrum(images).mean(0))
        figures = {"texture_ratio": fidelity.texture_ratio, "spectrum_db": fidelity.spectrum_db,
                   "high_frequency_ratio": fidelity.high_frequency_ratio}
        if self.segmenter is not None:
            scores = score_pairs(self.segmenter, images, np.stack(self.labels), self.num_classes)
            figures["consistency"] = float(np.nanmean([s.consistency for s in scores]))
        rows = [(label, real, image[None]) for label, real, image in zip(self.labels, self.real, images)]
        sheet_png = contact_sheet_png(rows, self.palette)
        sheet = np.array(Image.open(io.BytesIO(sheet_png)).convert("RGB"))
        return Validation(step, sheet, sheet_png, figures, time.perf_counter() - start)

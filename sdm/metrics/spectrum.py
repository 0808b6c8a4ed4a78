"""Fidelity that sees grain and blur: radially averaged power spectra and neighbour-pixel texture.

Inception and segmenter features hardly move when an image gains fine noise or loses its edges; the upper part
of its power spectrum does. Per image the extractor yields the log10 power in `bins` radial frequency bands up
to Nyquist and the texture (mean absolute difference between neighbouring pixels, uint8 levels); the set means
of those features, real against generated, give:

- spectrum distance: the RMS gap between the two mean log spectra, in dB (0 for identical spectra);
- high-frequency power ratio: generated over real power in the upper half of the bands (> 1 grain, < 1 blur);
- texture of each set, and their ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdm.errors import InvalidInputError


class SpectrumFeatures:
    """uint8 [N, H, W, 3] -> [N, bins + 1]: log10 radial power per band, then texture."""

    def __init__(self, bins: int = 16):
        if bins < 2:
            raise InvalidInputError(f"spectrum bins must be >= 2, got {bins}")
        self.bins = bins
        self.dims = bins + 1
        self.feature_id = f"spectrum-{bins}"
        self.metric_name = "spectrum distance (dB)"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise InvalidInputError(f"images must be [N, H, W, 3], got {images.shape}")
        x = images.astype(np.float64)
        grey = x.mean(-1)
        grey = grey - grey.mean(axis=(1, 2), keepdims=True)  # the DC term says nothing of texture
        h, w = grey.shape[1:]
        power = np.abs(np.fft.fft2(grey)) ** 2 / (h * w)
        fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
        radius = np.sqrt(fy**2 + fx**2) / 0.5  # 1 = Nyquist along an axis; corners beyond it are left out
        band = np.minimum((radius * self.bins).astype(np.int64), self.bins - 1)  # Nyquist itself: the top band
        keep = (radius > 0) & (radius <= 1)
        counts = np.bincount(band[keep], minlength=self.bins)
        sums = np.stack([np.bincount(band[keep], weights=p[keep], minlength=self.bins) for p in power])
        radial = np.log10(sums / np.maximum(counts, 1) + 1e-6)
        texture = 0.5 * (np.abs(np.diff(x, axis=1)).mean(axis=(1, 2, 3)) + np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3)))
        return np.concatenate([radial, texture[:, None]], axis=1)


@dataclass
class SpectralFidelity:
    spectrum_db: float  # RMS gap of the mean log spectra, dB
    high_frequency_ratio: float  # generated / real power in the upper half of the bands
    texture_generated: float
    texture_real: float

    @property
    def texture_ratio(self) -> float:
        return self.texture_generated / self.texture_real if self.texture_real > 0 else float("inf")

    def as_dict(self) -> dict[str, float]:
        return {"spectrum_db": self.spectrum_db, "high_frequency_ratio": self.high_frequency_ratio,
                "texture_generated": self.texture_generated, "texture_real": self.texture_real,
                "texture_ratio": self.texture_ratio}


def spectral_fidelity(real_mean: np.ndarray, generated_mean: np.ndarray) -> SpectralFidelity:
    """Compare the mean SpectrumFeatures of a real and a generated set."""
    if real_mean.shape != generated_mean.shape or real_mean.ndim != 1 or real_mean.shape[0] < 3:
        raise InvalidInputError(f"spectrum features of different or bad shapes: {real_mean.shape}, {generated_mean.shape}")
    gap = generated_mean[:-1] - real_mean[:-1]  # log10 power per band
    upper = gap[len(gap) // 2 :]
    return SpectralFidelity(
        spectrum_db=float(10 * np.sqrt(np.mean(gap**2))),
        high_frequency_ratio=float(10 ** np.mean(upper)),
        texture_generated=float(generated_mean[-1]),
        texture_real=float(real_mean[-1]),
    )

"""The fidelity and diversity measures must see what a person sees: grain and blur make the spectrum figures
worse, and grain does not count as diversity."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdm.data.toy import render_toy_image, render_toy_sample
from sdm.errors import InvalidInputError
from sdm.metrics.diversity import LowPassL1Distance, mean_pairwise_distance
from sdm.metrics.spectrum import SpectrumFeatures, spectral_fidelity


def _toy_groups(maps: int = 12, k: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """k images painted on each of `maps` layouts: the samples of one label map."""
    rng = np.random.default_rng(seed)
    groups = {}
    for i in range(maps):
        _, label, instance = render_toy_sample(rng, 64)
        groups[f"m{i}"] = np.stack([render_toy_image(rng, label, instance) for _ in range(k)])
    return groups


def _noisy(images: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, images.shape)
    return (images.astype(np.float64) + noise).round().clip(0, 255).astype(np.uint8)


def _blurred(images: np.ndarray, radius: float) -> np.ndarray:
    return np.stack([np.array(Image.fromarray(x).filter(ImageFilter.GaussianBlur(radius))) for x in images])


def _fidelity(real: np.ndarray, generated: np.ndarray):
    f = SpectrumFeatures()
    return spectral_fidelity(f(real).mean(0), f(generated).mean(0))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.concatenate(list(_toy_groups().values()))


def test_spectrum_features_of_closed_forms():
    f = SpectrumFeatures(bins=8)
    flat = np.full((2, 16, 16, 3), 90, np.uint8)
    out = f(flat)
    assert out.shape == (2, 9)
    np.testing.assert_allclose(out[:, :-1], -6.0)  # no power but the DC term, which is left out: log10(1e-6)
    assert (out[:, -1] == 0).all()  # no texture
    stripes = np.zeros((1, 16, 16, 3), np.uint8)
    stripes[:, :, ::2] = 200  # a vertical line pattern at Nyquist: all power in the top band, texture 100
    out = f(stripes)[0]
    assert np.argmax(out[:-1]) == 7 and out[:7].max() < -5
    assert out[-1] == pytest.approx(0.5 * 200 + 0.5 * 0)


def test_same_set_scores_zero(images):
    fid = _fidelity(images, images)
    assert fid.spectrum_db == 0 and fid.high_frequency_ratio == 1 and fid.texture_ratio == 1


@pytest.mark.parametrize("sigma,min_db,min_hf,min_texture", [(8.0, 0.3, 1.1, 1.4), (16.0, 1.2, 1.4, 2.0)])
def test_grain_raises_spectrum_distance_high_frequencies_and_texture(images, sigma, min_db, min_hf, min_texture):
    # The toy images have sharp region edges, so their own high-frequency power is large: grain of sigma 8
    # (in uint8 levels, per channel) raises it by a sixth, and the texture by half.
    fid = _fidelity(images, _noisy(images, sigma))
    assert fid.spectrum_db > min_db
    assert fid.high_frequency_ratio > min_hf
    assert fid.texture_ratio > min_texture
    assert _fidelity(images, _noisy(images, 2 * sigma)).spectrum_db > fid.spectrum_db  # more grain scores worse


def test_blur_is_caught_too(images):
    fid = _fidelity(images, _blurred(images, 1.0))
    assert fid.spectrum_db > 3.0
    assert fid.high_frequency_ratio < 0.3
    assert fid.texture_ratio < 0.7


def test_spectral_fidelity_refuses_mismatched_features():
    with pytest.raises(InvalidInputError, match="different or bad shapes"):
        spectral_fidelity(np.zeros(17), np.zeros(9))


def test_grain_does_not_count_as_diversity():
    groups = _toy_groups()
    clean = mean_pairwise_distance(groups, LowPassL1Distance()).mean
    for sigma in (8.0, 16.0):
        noisy = {k: _noisy(v, sigma, seed=i) for i, (k, v) in enumerate(groups.items())}
        assert mean_pairwise_distance(noisy, LowPassL1Distance()).mean <= clean * 1.015
        # A plain pixel L1 (cell 1) counts the grain as diversity.
        assert mean_pairwise_distance(noisy, LowPassL1Distance(cell=1)).mean > 1.05 * mean_pairwise_distance(groups, LowPassL1Distance(cell=1)).mean
    # Samples that really differ still score higher than copies with grain on them.
    copies = {k: _noisy(np.repeat(v[:1], 3, axis=0), 12.0, seed=i) for i, (k, v) in enumerate(groups.items())}
    assert mean_pairwise_distance(copies, LowPassL1Distance()).mean < 0.25 * clean

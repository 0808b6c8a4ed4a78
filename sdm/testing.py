"""Randomly initialised models for tests, benchmarks and demos. Their images are noise-like, never real results."""

from __future__ import annotations

import torch

from sdm.checkpoint import save_model
from sdm.config import SDMConfig, get_preset
from sdm.unet import SDMUNet


def perturbed(net: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add seeded Gaussian noise to every parameter, so zero-initialised layers pass signal and outputs vary
    with the label map."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net


def save_random_model(uri: str, preset: str = "tiny", seed: int = 0) -> SDMConfig:
    """Export a randomly initialised, perturbed model of a preset to `uri`; returns its config."""
    config = get_preset(preset)
    torch.manual_seed(seed)
    save_model(uri, perturbed(SDMUNet(config.model), seed=seed), config, metadata={"origin": "random-init"})
    return config

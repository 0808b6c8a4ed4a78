import pytest
import torch

from sdm.config import ModelConfig, get_preset
from sdm.unet import SDMUNet


def perturbed(net: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Randomly perturb every parameter so zero-initialised layers pass signal (a randomly initialised model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net


@pytest.fixture
def tiny_cfg():
    return get_preset("tiny")


@pytest.fixture
def random_tiny_net(tiny_cfg) -> SDMUNet:
    torch.manual_seed(0)
    return perturbed(SDMUNet(tiny_cfg.model)).eval()


def reduced(model: ModelConfig) -> ModelConfig:
    """A preset's structure at reduced width."""
    import dataclasses

    return dataclasses.replace(model, model_channels=32, num_head_channels=32, spade_hidden=16, norm_groups=8)

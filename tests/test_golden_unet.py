"""The network against numbers computed once with the original SDM code: the celebamask_hq structure (SPADE
decoder, attention at three levels, instance-edge channel, learned sigma) at width 32 on 64x64 inputs, with
seeded weights mapped into the original's layout by sdm.convert. The original code is not in this repository;
its outputs are, in tests/data/golden_unet.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sdm.config import SDMConfig, get_preset
from sdm.labels import label_input
from sdm.testing import seeded_weights
from sdm.unet import SDMUNet

GOLDEN = Path(__file__).parent / "data" / "golden_unet.json"


def golden_config() -> SDMConfig:
    return get_preset("celebamask_hq").with_overrides(
        ["model.model_channels=32", "model.num_head_channels=32", "model.image_size=[64, 64]"])


def golden_inputs(cfg: SDMConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2, 3, 64, 64, generator=g)
    coarse = torch.randint(0, cfg.model.num_classes, (2, 8, 8), generator=g)
    ids = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2)
    return x, torch.tensor([10.0, 600.0]), label_input(ids, cfg.model, ids)


def summarise(out: torch.Tensor) -> dict:
    """Per-row, per-channel mean and std, and 64 values spread over the tensor."""
    flat = out.flatten()
    idx = torch.linspace(0, flat.numel() - 1, 64).long()
    return {"shape": list(out.shape), "mean": out.mean(dim=(2, 3)).tolist(), "std": out.std(dim=(2, 3)).tolist(),
            "indices": idx.tolist(), "values": flat[idx].tolist()}


def test_outputs_match_the_original_code():
    golden = json.loads(GOLDEN.read_text())
    cfg = golden_config()
    net = seeded_weights(SDMUNet(cfg.model), seed=0).eval()
    with torch.no_grad():
        out = net(*golden_inputs(cfg))
    ours = summarise(out)
    assert ours["shape"] == golden["shape"]
    scale = float(np.abs(golden["values"]).mean())
    for key in ("mean", "std", "values"):
        np.testing.assert_allclose(ours[key], golden[key], rtol=0, atol=1e-4 * max(scale, 1.0), err_msg=key)

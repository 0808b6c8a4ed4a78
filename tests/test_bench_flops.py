"""The benches' FLOP accounting (bench/flops.py) on the tiny network: what one guided step and one train step run."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

from flops import count_flops, guided_step_flops  # noqa: E402
from sdm.config import get_preset  # noqa: E402
from sdm.diffusion import GaussianDiffusion  # noqa: E402
from sdm.testing import blocky_batches  # noqa: E402
from sdm.training import train_step  # noqa: E402
from sdm.unet import SDMUNet  # noqa: E402

CPU = torch.device("cpu")


def test_guided_step_counts_both_branches_as_one_forward_of_twice_the_images():
    cfg = get_preset("tiny").model
    net = SDMUNet(cfg).eval()
    guided = guided_step_flops(net, cfg, 2, 1.5, CPU)
    assert guided > 0
    assert guided == 2 * guided_step_flops(net, cfg, 2, 1.0, CPU)  # scale 1: the conditional branch alone
    assert guided == guided_step_flops(net, cfg, 4, 1.0, CPU)
    assert guided == guided_step_flops(net, cfg, 2, 1.5, CPU, batched=False)
    assert guided == guided_step_flops(net, cfg, 2, 1.5, CPU, torch.bfloat16)


def test_cpu_fused_attention_is_counted():
    q = torch.randn(2, 4, 16, 8)
    _, flops = count_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q)
    assert flops == 2 * (2 * 2 * 4 * 16 * 16 * 8)  # q @ k^T and scores @ v, 2 FLOPs per multiply-add


def test_train_step_counts_the_backward_too():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    net = SDMUNet(cfg.model).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion, cfg.model.learn_sigma)
    batch = blocky_batches(cfg.model, 2, 1)[0]
    _, train = count_flops(train_step, net, opt, diffusion, [batch], cfg)
    forward = guided_step_flops(net, cfg.model, 2, 1.0, CPU)
    assert 2 * forward < train <= 3 * forward  # backward: about twice the forward (no input gradient at the first layer)

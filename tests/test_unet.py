"""The network: shapes, initialisation, gradient flow, where the label enters."""

import dataclasses

import pytest
import torch

from sdm.config import get_preset
from sdm.labels import instance_edges, label_input
from sdm.training import train_local
from sdm.unet import SPADE, SDMUNet, timestep_embedding
from tests.conftest import perturbed, reduced


@pytest.mark.parametrize("preset", ["ade20k", "cityscapes", "celebamask_hq", "coco_stuff", "tiny"])
def test_every_preset_structure_gives_eps_and_variance(preset):
    cfg = reduced(get_preset(preset).model)
    if preset != "tiny":  # a quarter of the preset's resolution keeps the same structure affordable on CPU
        cfg = dataclasses.replace(cfg, image_size=tuple(s // 4 for s in cfg.image_size), attention_resolutions=(8, 4, 2))
    net = SDMUNet(cfg)
    h, w = cfg.image_size
    out = net(torch.randn(2, 3, h, w), torch.tensor([0.0, 999.0]), torch.rand(2, cfg.label_channels, h, w))
    assert out.shape == (2, 6, h, w)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output conv
    n_attn = sum(1 for m in net.modules() if type(m).__name__ == "Attention")
    expected = 1 + 2 * len(cfg.attention_resolutions) * cfg.num_res_blocks + len(cfg.attention_resolutions)
    assert n_attn == expected  # encoder, decoder (one more block per level) and middle


def test_label_channels_count_instance_edges():
    assert get_preset("ade20k").model.label_channels == 151
    assert get_preset("cityscapes").model.label_channels == 36
    assert get_preset("coco_stuff").model.label_channels == 184
    assert get_preset("celebamask_hq").model.label_channels == 20


def test_non_square_input():
    cfg = dataclasses.replace(reduced(get_preset("cityscapes").model), image_size=(32, 64), attention_resolutions=(8,))
    net = perturbed(SDMUNet(cfg))
    out = net(torch.randn(1, 3, 32, 64), torch.tensor([10.0]), torch.rand(1, cfg.label_channels, 32, 64))
    assert out.shape == (1, 6, 32, 64) and out.abs().sum() > 0


def test_gradient_reaches_every_parameter(tiny_cfg):
    net = perturbed(SDMUNet(tiny_cfg.model))
    x = torch.randn(2, 3, 32, 32)
    out = net(x, torch.tensor([3.0, 700.0]), torch.rand(2, 7, 32, 32))
    out.square().mean().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert dead == []


def test_label_enters_only_through_spade_in_middle_and_decoder(tiny_cfg):
    net = SDMUNet(tiny_cfg.model)
    assert not any(isinstance(m, SPADE) for m in net.input_blocks.modules())
    assert any(isinstance(m, SPADE) for m in net.middle_block.modules())
    assert all(any(isinstance(m, SPADE) for m in stage.modules()) for stage in net.output_blocks)
    assert net.input_blocks[0][0].in_channels == 3  # the noisy image alone enters the encoder


def _toy_batches(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        label = torch.randint(0, cfg.model.num_classes, (4, 32, 32), generator=g)
        x0 = (label.float() / cfg.model.num_classes * 2 - 1)[:, None].repeat(1, 3, 1, 1)
        yield x0, label_input(label, cfg.model, label)


@pytest.mark.parametrize("conditioning", ["spade", "concat"])
def test_output_depends_on_label_after_a_few_steps(tiny_cfg, conditioning):
    cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, conditioning=conditioning))
    net, _, history = train_local(cfg, _toy_batches(cfg), steps=5)
    assert all(torch.isfinite(torch.tensor(h.loss)) for h in history)
    x = torch.randn(1, 3, 32, 32)
    t = torch.tensor([500.0])
    a = torch.zeros(1, 32, 32, dtype=torch.long)
    b = a.clone()
    b[:, 8:24, 8:24] = 3
    with torch.no_grad():
        ya, yb = (label_input(lab, cfg.model, lab) for lab in (a, b))
        diff = (net(x, t, ya) - net(x, t, yb)).abs().max()
    assert diff > 1e-4


def test_concat_variant_has_no_spade_and_widens_the_input(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg.model, conditioning="concat")
    net = SDMUNet(cfg)
    assert not any(isinstance(m, SPADE) for m in net.modules())
    assert net.input_blocks[0][0].in_channels == 3 + cfg.label_channels


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 5.0]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    torch.testing.assert_close(emb[1, 0], torch.cos(torch.tensor(5.0)))


def test_instance_edges_mark_both_sides_of_a_boundary():
    inst = torch.zeros(1, 4, 4, dtype=torch.long)
    inst[:, :, 2:] = 1
    e = instance_edges(inst)[0]
    assert e[:, 1].tolist() == [1, 1, 1, 1] and e[:, 2].tolist() == [1, 1, 1, 1]
    assert e[:, 0].sum() == 0 and e[:, 3].sum() == 0


def test_spade_modulates_the_normalised_features_around_identity():
    """x * (1 + gamma) + beta: zero gamma and beta leave the normalised features as they are."""
    spade = SPADE(16, 7, 8, 4, divisor=1)
    x, label = torch.randn(2, 16, 8, 8), torch.rand(2, 7, 8, 8)
    with torch.no_grad():
        for conv in (spade.mlp_gamma, spade.mlp_beta):
            conv.weight.zero_()
            conv.bias.zero_()
        normed = spade.norm(x)
        torch.testing.assert_close(spade(x, label), normed)
        spade.mlp_gamma.bias.fill_(1.0)
        spade.mlp_beta.bias.fill_(0.5)
        torch.testing.assert_close(spade(x, label), 2 * normed + 0.5)

"""Label dropout for classifier-free guidance, and the channels_last training path against the contiguous one."""

import numpy as np
import torch

from sdm.testing import blocky_batches
from sdm.training import drop_labels, memory_format_of, train_local, weights_layout
from tests.conftest import train_losses


def test_label_dropout_drops_the_given_share_to_the_null_label():
    label = torch.rand(4000, 3, 2, 2) + 0.1  # no row is all zeros before dropout
    out, kept = drop_labels(label, 0.2, torch.Generator().manual_seed(0))
    assert abs(kept.float().mean().item() - 0.8) < 0.02
    assert torch.equal(out[kept], label[kept])
    assert (out[~kept] == 0).all()
    same, all_kept = drop_labels(label, 0.0)
    assert torch.equal(same, label) and all_kept.all()


def test_channels_last_trains_to_the_same_losses_as_contiguous(tiny_cfg, one_thread):
    """The layout changes which convolution kernels run (rounding), not the arithmetic: over 8 steps the per-step
    losses agree to 1e-5 relative (measured: under 2e-7) and the weights to 1e-4 (measured: 2e-6), and the weights
    stay channels_last through the optimizer's updates."""
    batches = blocky_batches(tiny_cfg.model, 4, 2)
    contiguous, net_a = train_losses(tiny_cfg, batches, False, 8)
    channels_last, net_b = train_losses(tiny_cfg, batches, True, 8)
    assert contiguous[-1] < 0.8 * contiguous[0]  # it trains: the comparison is between learning runs
    assert np.allclose(channels_last, contiguous, rtol=1e-5, atol=0)
    for (name, a), b in zip(net_a.named_parameters(), net_b.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-4), name
    assert weights_layout(net_a) == "contiguous" and weights_layout(net_b) == "channels_last"


def test_memory_format_of_tells_a_channels_last_image_batch_from_the_others():
    x0 = torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    assert memory_format_of(x0) == torch.channels_last
    assert memory_format_of(x0.contiguous()) == torch.contiguous_format
    assert memory_format_of(torch.rand(2, 3)) == torch.contiguous_format


def test_train_local_in_bf16_and_channels_last_follows_the_fp32_run(tiny_cfg, one_thread):
    """The benches' single-process loop takes the job's fast settings: weights held channels_last, bf16 autocast, and
    losses that follow the fp32 run's (bf16 rounding: within 5% per step over 6 steps)."""
    batches = blocky_batches(tiny_cfg.model, 4, 2)
    _, _, fp32 = train_local(tiny_cfg, iter(batches * 3), 6, seed=0)
    net, ema, bf16 = train_local(tiny_cfg, iter(batches * 3), 6, seed=0, autocast_dtype=torch.bfloat16, channels_last=True)
    assert weights_layout(net) == "channels_last" and weights_layout(ema.module) == "channels_last"
    assert np.allclose([r.loss for r in bf16], [r.loss for r in fp32], rtol=0.05, atol=0)
    assert [r.loss for r in bf16] != [r.loss for r in fp32]  # bf16 did run

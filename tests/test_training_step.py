"""Label dropout for classifier-free guidance: the share dropped, and what a dropped label becomes."""

import torch

from sdm.training import drop_labels


def test_label_dropout_drops_the_given_share_to_the_null_label():
    label = torch.rand(4000, 3, 2, 2) + 0.1  # no row is all zeros before dropout
    out, kept = drop_labels(label, 0.2, torch.Generator().manual_seed(0))
    assert abs(kept.float().mean().item() - 0.8) < 0.02
    assert torch.equal(out[kept], label[kept])
    assert (out[~kept] == 0).all()
    same, all_kept = drop_labels(label, 0.0)
    assert torch.equal(same, label) and all_kept.all()

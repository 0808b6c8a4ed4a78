"""A training checkpoint restores everything exactly, on local paths and on S3, and a partial one fails with
CheckpointError."""

from __future__ import annotations

import os

import pytest
import torch

from sdm.config import get_preset
from sdm.errors import CheckpointError
from sdm import storage
from sdm.checkpoint import OPTIMIZER_FILE, STATE_FILE, Progress, is_train_state, load_train_state, save_train_state
from sdm.training import make_ema
from sdm.unet import SDMUNet


def _state(seed: int):
    cfg = get_preset("tiny")
    torch.manual_seed(seed)
    net = SDMUNet(cfg.model)
    ema = make_ema(net, 0.9)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    return cfg, net, ema, opt


def _one_step(net, opt) -> None:
    opt.zero_grad()
    sum(p.sum() for p in net.parameters()).backward()
    opt.step()


def test_round_trip_restores_weights_optimizer_and_rng(store):
    cfg, net, ema, opt = _state(0)
    _one_step(net, opt)
    uri = storage.join(store, "run", "checkpoint_00000007")
    save_train_state(uri, net, ema, opt, None, Progress(step=7, epoch=1, batches_in_epoch=3), cfg)
    assert is_train_state(uri) and storage.list_dirs(storage.join(store, "run")) == ["checkpoint_00000007"]
    expected_draw = torch.rand(3)

    _, net2, ema2, opt2 = _state(1)
    progress = load_train_state(uri, net2, ema2, opt2, None)
    assert progress == Progress(step=7, epoch=1, batches_in_epoch=3)
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where the saved run stood
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    # the restored optimizer takes the same next step
    _one_step(net, opt)
    _one_step(net2, opt2)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)


def test_a_truncated_or_unfinished_checkpoint_raises_checkpoint_error(tmp_path):
    cfg, net, ema, opt = _state(0)
    save_train_state(str(tmp_path), net, ema, opt, None, Progress(step=1), cfg)
    path = os.path.join(tmp_path, OPTIMIZER_FILE)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match=OPTIMIZER_FILE):
        load_train_state(str(tmp_path), *_state(1)[1:], None)
    os.remove(os.path.join(tmp_path, STATE_FILE))
    with pytest.raises(CheckpointError, match="not a complete"):
        load_train_state(str(tmp_path), *_state(1)[1:], None)

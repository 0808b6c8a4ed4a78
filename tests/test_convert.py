"""Official-checkpoint conversion, without the original code: a network of this project is written out in
the original key layout (the inverse mapping), converted back, and must come back bit for bit.

Networks are randomly initialised, at a preset's label channels and a reduced width.
"""

import dataclasses

import pytest
import torch

from sdm import checkpoint, cli_convert, convert
from sdm.config import SDMConfig, get_preset
from sdm.convert import convert_state_dict, from_official, official_layout, read_official, to_official
from sdm.errors import CheckpointError
from sdm.unet import Attention, SDMUNet


def small_config(preset: str) -> SDMConfig:
    """The preset's label channels and block layout at a reduced width and size; 16-wide heads give several heads."""
    cfg = get_preset(preset)
    cfg.model = dataclasses.replace(
        cfg.model,
        image_size=(16, 16),
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(16, 8),
        num_head_channels=16,
        spade_hidden=16,
        norm_groups=8,
    )
    return cfg


def random_net(cfg: SDMConfig, seed: int = 0) -> SDMUNet:
    """Every parameter random (zero-initialised layers too), so any misplaced tensor changes the output."""
    torch.manual_seed(seed)
    net = SDMUNet(cfg.model).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    return net


def inputs(cfg: SDMConfig, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    h, w = cfg.model.image_size
    x = torch.randn(batch, 3, h, w, generator=g)
    t = torch.tensor([3.0, 742.0])[:batch]
    label = (torch.rand(batch, cfg.model.label_channels, h, w, generator=g) > 0.7).float()
    return x, t, label


@pytest.fixture
def celeba() -> tuple[SDMConfig, SDMUNet]:
    cfg = small_config("celebamask_hq")
    return cfg, random_net(cfg)


def test_official_layout_uses_the_original_module_names(celeba):
    cfg, net = celeba
    official = to_official(net)
    assert len(official) == len(net.state_dict())  # one official key per tensor, none shared
    for key in [
        "time_embed.0.weight",
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight",  # encoder resblock: GroupNorm, SiLU, conv
        "input_blocks.1.0.in_layers.2.weight",
        "input_blocks.1.0.emb_layers.1.weight",
        "input_blocks.1.0.out_layers.0.bias",
        "input_blocks.1.0.out_layers.3.weight",  # GroupNorm, SiLU, Dropout, conv
        "input_blocks.1.1.qkv.weight",
        "input_blocks.2.0.in_layers.2.weight",  # resblock down-sampler
        "input_blocks.3.0.skip_connection.weight",
        "middle_block.0.in_norm.mlp_shared.0.weight",  # SPADE outside in_layers
        "middle_block.0.in_layers.1.weight",
        "middle_block.0.out_norm.mlp_gamma.weight",
        "middle_block.0.out_layers.2.weight",  # SiLU, Dropout, conv
        "middle_block.1.proj_out.weight",
        "output_blocks.0.0.skip_connection.weight",
        "output_blocks.1.2.in_norm.mlp_beta.bias",  # resblock up-sampler
        "out.0.weight",
        "out.2.weight",
    ]:
        assert key in official, key
    assert official["middle_block.0.in_norm.mlp_shared.0.weight"].shape[1] == cfg.model.label_channels == 20


def test_round_trip_is_exact_and_outputs_identical(celeba, tmp_path):
    cfg, net = celeba
    state = net.state_dict()
    back = from_official(to_official(net), SDMUNet(cfg.model))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)

    convert_state_dict(to_official(net), cfg, str(tmp_path / "model"), "ema_0.9999_best.pt")
    loaded, loaded_cfg = checkpoint.load_model(str(tmp_path / "model"))
    assert loaded_cfg.to_dict() == cfg.to_dict()
    with torch.no_grad():
        assert torch.equal(loaded(*inputs(cfg)), net(*inputs(cfg)))


def legacy_attention(official_qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """The original's legacy head order, from its description: per head h the rows [q_h | k_h | v_h]."""
    b, width, length = official_qkv.shape
    d = width // (3 * heads)
    q, k, v = official_qkv.reshape(b * heads, 3 * d, length).split(d, dim=1)
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / d**0.5, dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)


def test_qkv_rows_follow_the_legacy_head_order(celeba):
    _, net = celeba
    attn = next(m for m in net.modules() if isinstance(m, Attention) and m.heads > 1)
    official = to_official(net)
    prefix = next(name for name, m in net.named_modules() if m is attn)
    c = attn.qkv.in_channels
    x = torch.randn(2, c, 4, 4)
    with torch.no_grad():
        flat = x.reshape(2, c, 16)
        qkv = torch.nn.functional.conv1d(
            attn.norm(flat), official[f"{prefix}.qkv.weight"], official[f"{prefix}.qkv.bias"]
        )
        expected = flat + attn.proj_out(legacy_attention(qkv, attn.heads))
        torch.testing.assert_close(attn(x).reshape(2, c, 16), expected, rtol=1e-5, atol=1e-5)


def test_fp16_checkpoint_is_cast_to_float32(celeba, tmp_path):
    cfg, net = celeba
    half = {k: v.half() for k, v in to_official(net).items()}
    path = tmp_path / "ema_fp16.pt"
    torch.save(half, path)
    report = convert_state_dict(read_official(str(path)), cfg, str(tmp_path / "model"), str(path))
    assert report.source_dtypes == ["float16"]
    state = checkpoint.load_state_dict(str(tmp_path / "model"))
    assert all(t.dtype == torch.float32 for t in state.values())
    expected = from_official({k: v.float() for k, v in half.items()}, SDMUNet(cfg.model))
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_wrong_preset_lists_shape_mismatches_and_names_the_fitting_preset():
    ade = small_config("ade20k")
    official = to_official(random_net(ade))
    with pytest.raises(CheckpointError) as e:
        from_official(official, SDMUNet(small_config("celebamask_hq").model))
    msg = str(e.value)
    assert "shape mismatches" in msg
    assert "middle_block.0.in_norm.mlp_shared.0.weight (16, 151, 3, 3) (expected (16, 20, 3, 3))" in msg
    assert "label input has 151 channels, this config 20" in msg and "ade20k" in msg


def test_missing_and_extra_keys_are_listed(celeba):
    cfg, net = celeba
    official = to_official(net)
    del official["output_blocks.1.0.emb_layers.1.bias"]
    official["label_emb.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as e:
        from_official(official, SDMUNet(cfg.model))
    msg = str(e.value)
    assert "1 keys missing from the file: output_blocks.1.0.emb_layers.1.bias" in msg
    assert "1 keys in the file that the network has no place for: label_emb.weight" in msg


class Opaque:
    """An arbitrary pickled object, as a malicious or non-weights file would hold."""


def test_files_that_are_not_plain_state_dicts_are_refused(tmp_path):
    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "step": 3}, nested)
    with pytest.raises(CheckpointError, match="offending keys: state_dict, step"):
        read_official(str(nested))
    pickled = tmp_path / "pickled.pt"
    torch.save({"w": torch.zeros(1), "cfg": Opaque()}, pickled)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_official(str(pickled))
    with pytest.raises(CheckpointError, match="no such file"):
        read_official(str(tmp_path / "absent.pt"))


def test_cli_converts_and_reports(celeba, tmp_path, monkeypatch, capsys):
    cfg, net = celeba
    path = tmp_path / "ema_0.9999_best.pt"
    torch.save(to_official(net), path)
    monkeypatch.setattr(convert, "get_preset", lambda name: cfg)  # the real preset is 650M parameters
    out = tmp_path / "converted"
    assert cli_convert.main([str(path), "--preset", "celebamask_hq", "--out", str(out)]) == 0
    assert f"to {out}" in capsys.readouterr().out
    loaded, _ = checkpoint.load_model(str(out))
    with torch.no_grad():
        assert torch.equal(loaded(*inputs(cfg)), net(*inputs(cfg)))


def test_cli_reports_a_mismatch_as_an_error(celeba, tmp_path, capsys):
    _, net = celeba
    path = tmp_path / "small.pt"
    torch.save(to_official(net), path)  # reduced width: nothing fits the full-size preset
    assert cli_convert.main([str(path), "--preset", "ade20k", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error: the checkpoint does not fit this network" in err and "label input has 20 channels" in err
    assert not (tmp_path / "out").exists()


def test_concat_conditioning_has_no_official_layout():
    cfg = small_config("ade20k")
    cfg.model = dataclasses.replace(cfg.model, conditioning="concat")
    with pytest.raises(CheckpointError, match="only SPADE"):
        official_layout(SDMUNet(cfg.model))

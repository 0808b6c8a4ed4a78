"""Released SDM checkpoints (the authors' guided-diffusion-based UNetModel) <-> this project's SDMUNet.

Both networks build the same layers in the same order, so the module indices agree (time_embed,
input_blocks.N.i, middle_block.i, output_blocks.N.i). They differ in three places:
- names inside a resblock: theirs index Sequentials (in_layers, emb_layers, out_layers), and their
  label-conditioned resblocks keep the SPADE norms outside those Sequentials;
- the final layers: their `out` Sequential is our out_norm / out_conv;
- attention qkv rows: theirs (the legacy head order) are [q_h | k_h | v_h] per head h, ours
  [q | k | v] with the heads inside each part.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sdm import checkpoint, storage
from sdm.config import SDMConfig, get_preset, list_presets
from sdm.errors import CheckpointError, StorageError
from sdm.unet import Attention, ResBlock, SDMUNet

# Presets that describe a model of the original code (released checkpoints: ade20k, celebamask_hq, coco_stuff).
OFFICIAL_PRESETS = ("ade20k", "celebamask_hq", "coco_stuff", "cityscapes")

# Our parameter-name prefix inside a resblock -> theirs.
_RESBLOCK = {
    "in_norm.group.": "in_layers.0.",
    "in_conv.": "in_layers.2.",
    "emb_proj.": "emb_layers.1.",
    "out_norm.group.": "out_layers.0.",
    "out_conv.": "out_layers.3.",
    "skip.": "skip_connection.",
}
_SPADE_RESBLOCK = {
    "in_norm.spade.": "in_norm.",
    "in_conv.": "in_layers.1.",
    "emb_proj.": "emb_layers.1.",
    "out_norm.spade.": "out_norm.",
    "out_conv.": "out_layers.2.",
    "skip.": "skip_connection.",
}
_TOP = {"out_norm.": "out.0.", "out_conv.": "out.2."}

# A key whose tensor reveals the label channels (SPADE's first conv: [hidden, label_channels, 3, 3]).
_LABEL_PROBE = "middle_block.0.in_norm.mlp_shared.0.weight"


class Slot(NamedTuple):
    """Where one of our tensors lives in an official state_dict."""

    official: str
    qkv_heads: int | None  # attention qkv: rows are reordered between the two head layouts


@dataclass
class ConversionReport:
    source: str
    out: str
    preset: str
    tensors: int
    parameters: int
    source_dtypes: list[str]


def _rename(name: str, table: Mapping[str, str]) -> str | None:
    for ours, theirs in table.items():
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    return None


def official_layout(net: SDMUNet) -> dict[str, Slot]:
    """For every key of net.state_dict(), the official key holding the same tensor."""
    if net.cfg.conditioning != "spade":
        raise CheckpointError("the original SDM code has only SPADE conditioning; this config uses 'concat'")
    layout: dict[str, Slot] = {}
    for prefix, module in net.named_modules():
        if isinstance(module, ResBlock):
            table = _SPADE_RESBLOCK if hasattr(module.in_norm, "spade") else _RESBLOCK
            for local in module.state_dict():
                layout[f"{prefix}.{local}"] = Slot(f"{prefix}.{_rename(local, table)}", None)
        elif isinstance(module, Attention):
            for local in module.state_dict():
                heads = module.heads if local.startswith("qkv.") else None
                layout[f"{prefix}.{local}"] = Slot(f"{prefix}.{local}", heads)
    for key in net.state_dict():
        if key not in layout:  # time embedding, first conv, plain up/down-samplers, final layers
            layout[key] = Slot(_rename(key, _TOP) or key, None)
    return layout


def qkv_from_official(t: torch.Tensor, heads: int) -> torch.Tensor:
    """qkv rows [head][q|k|v][d] -> [q|k|v][head][d] (weight [3C, C, 1] or bias [3C])."""
    return t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def qkv_to_official(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of qkv_from_official."""
    return t.reshape(3, heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def to_official(net: SDMUNet) -> dict[str, torch.Tensor]:
    """Our weights as a state_dict of the original code's UNetModel."""
    ours = net.state_dict()
    out = {}
    for key, slot in official_layout(net).items():
        t = ours[key].detach()
        out[slot.official] = qkv_to_official(t, slot.qkv_heads) if slot.qkv_heads else t.clone()
    return out


def from_official(official: Mapping[str, torch.Tensor], net: SDMUNet) -> dict[str, torch.Tensor]:
    """An official state_dict as float32 weights for `net`; every key used once, every parameter filled."""
    _check_tensors(official)
    layout = official_layout(net)
    shapes = {key: tuple(t.shape) for key, t in net.state_dict().items()}
    expected = {slot.official: shapes[key] for key, slot in layout.items()}
    missing = sorted(set(expected) - set(official))
    unused = sorted(set(official) - set(expected))
    wrong = sorted(
        (k, tuple(official[k].shape), shape) for k, shape in expected.items() if k in official and tuple(official[k].shape) != shape
    )
    if missing or unused or wrong:
        raise CheckpointError(_mismatch_message(official, net, missing, unused, wrong))
    out = {}
    for key, slot in layout.items():
        t = official[slot.official].to(torch.float32)
        out[key] = qkv_from_official(t, slot.qkv_heads) if slot.qkv_heads else t.contiguous()
    return out


def _check_tensors(official: Mapping[str, object]) -> None:
    if not isinstance(official, Mapping):
        raise CheckpointError(f"expected a state_dict (a mapping of names to tensors), got {type(official).__name__}")
    bad = sorted(str(k) for k, v in official.items() if not isinstance(v, torch.Tensor) or not v.is_floating_point())
    if bad:
        raise CheckpointError(f"not a state_dict of float tensors; offending keys: {_short(bad)}")


def _short(items: list, limit: int = 12) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _mismatch_message(
    official: Mapping[str, torch.Tensor],
    net: SDMUNet,
    missing: list[str],
    unused: list[str],
    wrong: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
) -> str:
    lines = ["the checkpoint does not fit this network:"]
    if missing:
        lines.append(f"  {len(missing)} keys missing from the file: {_short(missing)}")
    if unused:
        lines.append(f"  {len(unused)} keys in the file that the network has no place for: {_short(unused)}")
    if wrong:
        shown = [f"{k} {tuple(got)} (expected {tuple(want)})" for k, got, want in wrong]
        lines.append(f"  {len(wrong)} shape mismatches: {_short(shown)}")
    probe = official.get(_LABEL_PROBE)
    if probe is not None and probe.dim() == 4 and probe.shape[1] != net.cfg.label_channels:
        fits = [p for p in list_presets() if get_preset(p).model.label_channels == probe.shape[1]]
        lines.append(
            f"  the file's label input has {probe.shape[1]} channels, this config {net.cfg.label_channels}: "
            f"a wrong --preset? presets with {probe.shape[1]} label channels: {', '.join(fits) or 'none'}"
        )
    return "\n".join(lines)


def read_official(uri: str) -> dict[str, torch.Tensor]:
    """Read a released .pt state_dict without running pickled code (torch.load weights_only=True)."""
    try:
        data = storage.read_bytes(uri)
    except StorageError as e:
        raise CheckpointError(str(e)) from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{uri} holds objects other than tensors; refusing to unpickle it: {e}") from None
    except Exception as e:  # torch raises several types for files that are not checkpoints
        raise CheckpointError(f"{uri} is not a readable PyTorch checkpoint: {e}") from None
    _check_tensors(state)
    return state


def convert_official(source: str, preset: str, out: str) -> ConversionReport:
    """Convert a released checkpoint to this project's format (safetensors + the preset's config) at `out`."""
    if preset not in OFFICIAL_PRESETS:
        raise CheckpointError(f"preset {preset!r} describes no model of the original code; use one of {', '.join(OFFICIAL_PRESETS)}")
    config = get_preset(preset)
    return convert_state_dict(read_official(source), config, out, source)


def convert_state_dict(official: Mapping[str, torch.Tensor], config: SDMConfig, out: str, source: str) -> ConversionReport:
    """Map an official state_dict into a network built from `config` and save both at `out`."""
    with torch.device("meta"):  # shapes only: the weights come from the file
        net = SDMUNet(config.model)
    state = from_official(official, net)
    net.load_state_dict(state, assign=True)
    meta = {"converted_from": os.path.basename(source), "format": "sdm-official"}
    checkpoint.save_model(out, net, config, metadata=meta)
    return ConversionReport(
        source=source,
        out=out,
        preset=config.name,
        tensors=len(state),
        parameters=sum(t.numel() for t in state.values()),
        source_dtypes=sorted({str(t.dtype).removeprefix("torch.") for t in official.values()}),
    )

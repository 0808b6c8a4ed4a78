"""Model checkpoints: weights in safetensors plus the JSON config, on any URI the storage helper takes.

Layout of an exported model directory: `config.json` and `model.safetensors`, and optionally
`classes.json` (class names and palette colours, indexed by label id). A training run directory
holds its exported model under `model/`. Loading never unpickles code.
"""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from sdm import storage
from sdm.config import SDMConfig
from sdm.errors import CheckpointError, ConfigError, StorageError
from sdm.unet import SDMUNet

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CLASSES_FILE = "classes.json"
RUN_MODEL_DIR = "model"


def save_model(uri: str, net: torch.nn.Module, config: SDMConfig, metadata: dict[str, str] | None = None) -> None:
    """Write weights, then the config last: a directory with a config is complete."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()}
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), save_safetensors(tensors, metadata=metadata))
    storage.write_bytes(storage.join(uri, CONFIG_FILE), config.to_json().encode())


def find_model_dir(uri: str) -> str:
    """An exported model directory, or a run directory holding one under `model/`."""
    for candidate in (uri, storage.join(uri, RUN_MODEL_DIR)):
        if storage.exists(storage.join(candidate, CONFIG_FILE)):
            return candidate
    raise CheckpointError(
        f"no model at {uri}: expected {CONFIG_FILE} + {WEIGHTS_FILE} there or under {RUN_MODEL_DIR}/ "
        "(convert an official checkpoint with `sdm convert-official`)"
    )


def save_classes(uri: str, names: list[str], palette: list[tuple[int, int, int]]) -> None:
    """Write the class names and their RGB palette colours (one per label id) next to a model."""
    if len(names) != len(palette):
        raise CheckpointError(f"{len(names)} class names but {len(palette)} palette colours")
    if any(len(c) != 3 or not all(0 <= int(v) <= 255 for v in c) for c in palette):
        raise CheckpointError("palette colours must be [r, g, b] with values in 0..255")
    body = {"names": [str(n) for n in names], "palette": [[int(v) for v in c] for c in palette]}
    storage.write_bytes(storage.join(uri, CLASSES_FILE), json.dumps(body, indent=1).encode())


def load_classes(uri: str) -> tuple[list[str], list[tuple[int, int, int]]] | None:
    """(names, palette) stored with a model, or None when it has none."""
    path = storage.join(find_model_dir(uri), CLASSES_FILE)
    if not storage.exists(path):
        return None
    try:
        body = json.loads(storage.read_bytes(path))
        names, palette = [str(n) for n in body["names"]], [tuple(int(v) for v in c) for c in body["palette"]]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid classes file: {e}") from None
    if len(names) != len(palette):
        raise CheckpointError(f"{path}: {len(names)} class names but {len(palette)} palette colours")
    return names, palette


def load_config(uri: str) -> SDMConfig:
    model_dir = find_model_dir(uri)
    try:
        return SDMConfig.from_json(storage.read_bytes(storage.join(model_dir, CONFIG_FILE)).decode())
    except ConfigError as e:
        raise CheckpointError(f"{model_dir}/{CONFIG_FILE}: {e}") from None


def model_id(uri: str) -> str:
    """A short identity of a model: its config name and a hash of its config and tensors (names, dtypes, shapes,
    values). Not of the file's bytes: safetensors writes its metadata in an order that changes from one process
    to the next, so re-exporting the same weights must not make a new model."""
    config = load_config(uri)
    state = load_state_dict(uri)
    h = hashlib.sha256(config.to_json().encode())
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{config.name}-{h.hexdigest()[:16]}"


def load_state_dict(uri: str) -> dict[str, torch.Tensor]:
    model_dir = find_model_dir(uri)
    try:
        return load_safetensors(storage.read_bytes(storage.join(model_dir, WEIGHTS_FILE)))
    except StorageError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{model_dir}/{WEIGHTS_FILE} is not a readable safetensors file: {e}") from None


def load_model(uri: str) -> tuple[SDMUNet, SDMConfig]:
    """Rebuild the network from its config and fill it; every parameter must be present and fit."""
    config = load_config(uri)
    net = SDMUNet(config.model)
    state = load_state_dict(uri)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"weights at {uri} do not fit their config: missing {missing[:10]}, unexpected {unexpected[:10]}, "
            f"shape mismatches {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong[:10]]}"
        )
    net.load_state_dict(state)
    return net.eval(), config

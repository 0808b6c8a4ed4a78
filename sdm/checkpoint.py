"""Checkpoints on any URI the storage helper takes: exported models and training state, one module.

An exported model directory: `config.json` and `model.safetensors`, and optionally `classes.json` (class names
and palette colours, indexed by label id). A training run directory holds its exported model under `model/`.

A training-state directory (what Ray Train persists per checkpoint): `model.safetensors` and `ema.safetensors`,
`optimizer.pt` and `scaler.pt` (tensor-only state dicts), `rng.pt` (torch RNG states), `config.json`, a progressive
distillation's current teacher `teacher.safetensors`, and
`state.json` (step, data position, and the size and checksum of every other file) written last. A checkpoint is
complete when state.json is there and so is every file it names, at its size (sdm.storage's marker rule): Ray
Train uploads the directory file by file in no set order, so a failed upload can leave state.json without the
rest, and that must not look like a checkpoint. Files are checked against their checksums when loaded.

Loading never unpickles code: safetensors, and torch.load with weights_only=True.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
from dataclasses import asdict, dataclass

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
EMA_FILE, OPTIMIZER_FILE, SCALER_FILE, RNG_FILE, STATE_FILE = "ema.safetensors", "optimizer.pt", "scaler.pt", "rng.pt", "state.json"
TEACHER_FILE = "teacher.safetensors"


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
    h = hashlib.sha256(config.identity_json().encode())
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{config.name}-{h.hexdigest()[:16]}"


SAFETENSORS_MAX_HEADER = 100_000_000  # the format's own bound on its JSON header


def exported_step(uri: str) -> int | None:
    """The training step an exported model records in its weights file's metadata (from the safetensors header
    alone: 8 bytes of length, then JSON); None where there is no such file or no step."""
    weights = storage.join(uri, WEIGHTS_FILE)
    if not storage.exists(weights):
        return None
    head = storage.read_bytes(weights, 8)
    size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    if not 0 < size <= SAFETENSORS_MAX_HEADER:
        return None
    try:
        step = json.loads(storage.read_bytes(weights, 8 + size)[8:]).get("__metadata__", {}).get("step")
    except (ValueError, AttributeError):
        return None
    return int(step) if isinstance(step, str) and step.isdigit() else None


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


@dataclass
class Progress:
    """Where training stands: optimizer steps done, and the position in the data stream."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    stage: str = "pretrain"
    teacher_round: int = 0  # progressive distillation: the round whose teacher the checkpoint holds


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_train_state(uri: str, net: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler | None, progress: Progress, config: SDMConfig,
                     teacher: torch.nn.Module | None = None) -> None:
    """Everything needed to continue a run exactly (a distillation's current teacher too, where it changes during
    the run); state.json, naming every other file, last."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    files = {
        WEIGHTS_FILE: save_safetensors(_weights(net)),
        EMA_FILE: save_safetensors(_weights(ema)),
        OPTIMIZER_FILE: _torch_bytes(opt.state_dict()),
        **({SCALER_FILE: _torch_bytes(scaler.state_dict())} if scaler is not None else {}),
        RNG_FILE: _torch_bytes(rng),
        CONFIG_FILE: config.to_json().encode(),
        **({TEACHER_FILE: save_safetensors(_weights(teacher))} if teacher is not None else {}),
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(uri, name), data)
    state = {**asdict(progress), "files": storage.manifest(files)}
    storage.write_bytes(storage.join(uri, STATE_FILE), json.dumps(state).encode())


def _state(uri: str) -> dict | None:
    """state.json of a checkpoint directory, or None when it has none. (One written before state.json named the
    other files has no "files" entry: it is trusted as before.)"""
    path = storage.join(uri, STATE_FILE)
    if not storage.exists(path):
        return None
    try:
        body = json.loads(storage.read_bytes(path))
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise CheckpointError(f"{path} is not a checkpoint state file")
    return body


def _problems(uri: str, state: dict | None) -> list[str]:
    if state is None:
        return [f"{STATE_FILE} is missing"]
    return storage.incomplete(uri, state.get("files", {}))


def is_train_state(uri: str) -> bool:
    """Whether `uri` holds a complete training checkpoint: state.json and every file it names."""
    try:
        return not _problems(uri, _state(uri))
    except CheckpointError:
        return False


def _complete_state(uri: str) -> dict:
    state = _state(uri)
    problems = _problems(uri, state)
    if problems:
        raise CheckpointError(f"{uri} is not a complete training checkpoint: {'; '.join(problems)}")
    return state


def _progress(state: dict) -> Progress:
    return Progress(**{k: v for k, v in state.items() if k != "files"})


def load_progress(uri: str) -> Progress:
    return _progress(_complete_state(uri))


def _read(uri: str, name: str, files: dict | None) -> bytes:
    """One file of a checkpoint directory, checked against state.json's record of it when there is one."""
    path = storage.join(uri, name)
    return storage.verified(path, storage.read_bytes(path), (files or {}).get(name))


def load_weights(uri: str, name: str = WEIGHTS_FILE, files: dict | None = None) -> dict[str, torch.Tensor]:
    """One safetensors file of a checkpoint directory (model or EMA weights)."""
    try:
        return load_safetensors(_read(uri, name, files))
    except Exception as e:  # a storage error, or one of safetensors' own error types
        raise CheckpointError(f"cannot read {name} in {uri}: {e}") from None


def _load_tensors(uri: str, name: str, files: dict | None = None) -> dict:
    try:
        return torch.load(io.BytesIO(_read(uri, name, files)), weights_only=True)
    except (StorageError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # missing or truncated
        raise CheckpointError(f"cannot read {name} in {uri}: {e}") from None


def load_train_state(uri: str, net: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler | None, teacher: torch.nn.Module | None = None) -> Progress:
    """Restore weights, EMA, optimizer, scaler and RNG in place (and a distillation's teacher, where the checkpoint
    holds one); returns the progress to continue from."""
    state = _complete_state(uri)
    files = state.get("files")
    if teacher is not None and TEACHER_FILE in (files or {}):
        teacher.load_state_dict(load_weights(uri, TEACHER_FILE, files))
    net.load_state_dict(load_weights(uri, WEIGHTS_FILE, files))
    ema.load_state_dict(load_weights(uri, EMA_FILE, files))
    opt.load_state_dict(_load_tensors(uri, OPTIMIZER_FILE, files))
    if scaler is not None and (SCALER_FILE in files if files is not None else storage.exists(storage.join(uri, SCALER_FILE))):
        scaler.load_state_dict(_load_tensors(uri, SCALER_FILE, files))
    rng = _load_tensors(uri, RNG_FILE, files)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return _progress(state)

"""Training state in a checkpoint directory: everything needed to continue a run exactly.

model.safetensors and ema.safetensors (weights), optimizer.pt and scaler.pt (tensor-only state dicts,
read back with weights_only=True so no code is unpickled), rng.pt (torch RNG states), state.json
(step, data position) and config.json. The directory is local; Ray Train persists it to the store.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sdm.config import SDMConfig
from sdm.errors import CheckpointError

MODEL, EMA, OPTIMIZER, SCALER, RNG, STATE, CONFIG = (
    "model.safetensors",
    "ema.safetensors",
    "optimizer.pt",
    "scaler.pt",
    "rng.pt",
    "state.json",
    "config.json",
)


@dataclass
class Progress:
    """Where training stands: optimizer steps done, and the position in the data stream."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    stage: str = "pretrain"


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_train_state(
    directory: str,
    net: nn.Module,
    ema: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    progress: Progress,
    config: SDMConfig,
) -> None:
    os.makedirs(directory, exist_ok=True)
    save_file(_weights(net), os.path.join(directory, MODEL))
    save_file(_weights(ema), os.path.join(directory, EMA))
    torch.save(opt.state_dict(), os.path.join(directory, OPTIMIZER))
    if scaler is not None:
        torch.save(scaler.state_dict(), os.path.join(directory, SCALER))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(directory, RNG))
    with open(os.path.join(directory, CONFIG), "w") as f:
        f.write(config.to_json())
    with open(os.path.join(directory, STATE), "w") as f:  # written last: its presence marks a whole checkpoint
        json.dump(asdict(progress), f)


def load_progress(directory: str) -> Progress:
    path = os.path.join(directory, STATE)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory} is not a complete training checkpoint: {STATE} is missing")
    with open(path) as f:
        return Progress(**json.load(f))


def load_weights(directory: str, name: str = MODEL) -> dict[str, torch.Tensor]:
    try:
        return load_file(os.path.join(directory, name))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {name} in {directory}: {e}") from None


def _load_tensors(directory: str, name: str) -> dict:
    try:
        return torch.load(os.path.join(directory, name), weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # missing or truncated
        raise CheckpointError(f"cannot read {name} in {directory}: {e}") from None


def load_train_state(
    directory: str,
    net: nn.Module,
    ema: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> Progress:
    """Restore weights, EMA, optimizer, scaler and RNG in place; returns the progress to continue from."""
    progress = load_progress(directory)
    net.load_state_dict(load_weights(directory, MODEL))
    ema.load_state_dict(load_weights(directory, EMA))
    opt.load_state_dict(_load_tensors(directory, OPTIMIZER))
    if scaler is not None and os.path.exists(os.path.join(directory, SCALER)):
        scaler.load_state_dict(_load_tensors(directory, SCALER))
    rng = _load_tensors(directory, RNG)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return progress

"""Where the pretrained metric backbones come from: an explicit file, or the standard torch hub cache.

Nothing is downloaded. The metric keeps its published name (FID, LPIPS) only when the weights file is the
published one, recognised by the sha256 prefix in its file name; other weights give a metric named by
what they are.
"""

from __future__ import annotations

import hashlib
import os

import torch

from sdm.errors import MissingWeightsError

FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's FID_WEIGHTS_URL
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet ImageNet weights, used by lpips


def hub_checkpoint_dir() -> str:
    """torch.hub's checkpoint cache ($TORCH_HOME/hub/checkpoints, by default ~/.cache/torch/hub/checkpoints)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def find_weights(file_name: str, explicit: str | None, what: str, flag: str) -> str:
    """The path of a weights file: `explicit` when given, else the hub cache; MissingWeightsError otherwise."""
    if explicit is not None:
        if not os.path.isfile(explicit):
            raise MissingWeightsError(f"{flag} {explicit}: no such file (expected the {what} weights, {file_name})")
        return explicit
    cached = os.path.join(hub_checkpoint_dir(), file_name)
    if os.path.isfile(cached):
        return cached
    raise MissingWeightsError(
        f"the {what} weights are not here and cannot be downloaded: put {file_name} at {cached} "
        f"(the torch hub checkpoints directory; set TORCH_HOME to move it) or pass {flag} PATH"
    )


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_published(sha256: str, file_name: str) -> bool:
    """torch hub files carry the first 8 hex digits of their sha256 after the last '-'."""
    return sha256.startswith(file_name.rsplit("-", 1)[1].split(".")[0])


def load_state(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a .pth file, without running pickled code."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state

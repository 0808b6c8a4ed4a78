"""pytorch-fid's InceptionV3 (pool3, 2048 dims) as a feature extractor for FID."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING
from unittest import mock

import numpy as np
import torch

from sdm.metrics.pretrained import FID_INCEPTION_FILE, file_sha256, find_weights, is_published, load_state

if TYPE_CHECKING:
    from pytorch_fid.inception import InceptionV3


# pytorch-fid and torchvision are imported where a network is built: importing them costs about 2 s (torchvision
# pulls in torch._dynamo), paid otherwise by every process that imports this module without measuring anything,
# such as each Ray worker of the generation job.
def _build(state: dict[str, torch.Tensor]) -> InceptionV3:
    """pytorch-fid's network, with our state dict in place of its download."""
    from pytorch_fid import inception as fid_inception

    with mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *a, **k: state):
        return fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()


def random_fid_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised state dict of pytorch-fid's FID Inception, keyed like its weights file."""
    from pytorch_fid import inception as fid_inception
    from torchvision.models.inception import Inception3

    torch.manual_seed(seed)
    with mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(Inception3, "load_state_dict", lambda *a, **k: None):
        return fid_inception.fid_inception_v3().state_dict()


class InceptionFeatures:
    """uint8 [N, H, W, 3] images -> [N, 2048] pool3 features (pytorch-fid resizes to 299 bilinearly)."""

    dims = 2048

    def __init__(self, load: Callable[[], dict[str, torch.Tensor]], weights_id: str, metric_name: str, device: str = "cpu"):
        # The network is built on first use: a driver that only names the metric never loads 95 MB of weights.
        self._load, self._net = load, None
        self.device = device
        self.feature_id = f"inception-v3-pool3-{weights_id}"
        self.metric_name = metric_name

    @property
    def net(self) -> InceptionV3:
        if self._net is None:
            self._net = _build(self._load()).to(self.device)
        return self._net

    @classmethod
    def from_file(cls, path: str, device: str = "cpu") -> "InceptionFeatures":
        sha = file_sha256(path)
        name = "FID" if is_published(sha, FID_INCEPTION_FILE) else f"Frechet distance in Inception features (weights {sha[:8]}, not pytorch-fid's)"
        return cls(functools.partial(load_state, path), sha[:16], name, device)

    @classmethod
    def random(cls, seed: int = 0, device: str = "cpu") -> "InceptionFeatures":
        """Randomly initialised: for testing the plumbing only, and named so."""
        return cls(functools.partial(random_fid_inception_state, seed), f"random{seed}", "random-inception Frechet distance", device)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 255
        return self.net(x)[0].flatten(1).double().cpu().numpy()


def load_inception(explicit: str | None = None, device: str = "cpu") -> InceptionFeatures:
    """The FID extractor from --inception-weights or the torch hub cache (MissingWeightsError if neither)."""
    return InceptionFeatures.from_file(find_weights(FID_INCEPTION_FILE, explicit, "FID Inception", "--inception-weights"), device)

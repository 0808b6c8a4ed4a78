"""Diversity as in the paper: for each label map, the mean distance between pairs of its K samples,
averaged over label maps. Distances: LPIPS (lpips package, AlexNet), or the mean absolute difference of
block-averaged pixels, which needs no weights and which grain does not inflate."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import combinations
from typing import Protocol

import numpy as np
import torch

from sdm.errors import InvalidInputError
from sdm.metrics.pretrained import ALEXNET_FILE, file_sha256, find_weights, is_published, load_state


class PairDistance(Protocol):
    metric_name: str

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] twice -> [N] distances between row i of a and row i of b."""


class LpipsDistance:
    """lpips.LPIPS with the AlexNet trunk; its linear layers ship inside the lpips package."""

    def __init__(self, alexnet_state: dict[str, torch.Tensor] | None, metric_name: str, device: str = "cpu"):
        import lpips  # here, not at the top: it imports torchvision (about 2 s), which most importers never use

        # pnet_rand builds the trunk without torchvision's download; real weights are loaded below.
        self.net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).to(device).eval()
        if alexnet_state is not None:
            for slice_ in (self.net.net.slice1, self.net.net.slice2, self.net.net.slice3, self.net.net.slice4, self.net.net.slice5):
                for idx, layer in slice_.named_children():
                    if isinstance(layer, torch.nn.Conv2d):
                        layer.weight.data.copy_(alexnet_state[f"features.{idx}.weight"])
                        layer.bias.data.copy_(alexnet_state[f"features.{idx}.bias"])
        self.metric_name = metric_name
        self.device = device

    @classmethod
    def from_file(cls, path: str, device: str = "cpu") -> "LpipsDistance":
        sha = file_sha256(path)
        name = "LPIPS" if is_published(sha, ALEXNET_FILE) else f"AlexNet-feature distance (weights {sha[:8]}, not torchvision's)"
        return cls(load_state(path), name, device)

    @classmethod
    def random(cls, seed: int = 0, device: str = "cpu") -> "LpipsDistance":
        """Randomly initialised AlexNet trunk: for testing the plumbing only, and named so."""
        torch.manual_seed(seed)
        return cls(None, "random-alexnet distance", device)

    @torch.no_grad()
    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ta, tb = (torch.from_numpy(np.ascontiguousarray(x)).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1 for x in (a, b))
        return self.net(ta, tb).flatten().double().cpu().numpy()


class LowPassL1Distance:
    """Mean absolute difference in [0, 1] of the images averaged over `cell` x `cell` blocks. Grain is independent
    from pixel to pixel and averages out in a block, while the layouts and colours that make samples differ do
    not, so noise does not count as diversity (as it does in a plain pixel L1, cell 1). Needs no weights."""

    def __init__(self, cell: int = 4):
        if cell < 1:
            raise InvalidInputError(f"low-pass cell must be >= 1, got {cell}")
        self.cell = cell
        self.metric_name = f"low-pass pixel L1 ({cell}x{cell} blocks)"

    def _pool(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).double() / 255
        return torch.nn.functional.avg_pool2d(t, self.cell, ceil_mode=True)

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (self._pool(a) - self._pool(b)).abs().mean(dim=(1, 2, 3)).numpy()


def load_lpips(explicit: str | None = None, device: str = "cpu") -> LpipsDistance:
    """LPIPS from --alexnet-weights or the torch hub cache (MissingWeightsError if neither)."""
    return LpipsDistance.from_file(find_weights(ALEXNET_FILE, explicit, "AlexNet (for LPIPS)", "--alexnet-weights"), device)


@dataclass
class DiversityResult:
    metric_name: str
    mean: float  # over label maps of the mean over pairs
    label_maps: int
    pairs: int
    per_map: dict[str, float] = field(default_factory=dict)


def mean_pairwise_distance(groups: Mapping[str, np.ndarray], distance: PairDistance, batch_size: int = 64) -> DiversityResult:
    """groups: label-map key -> uint8 [K, H, W, 3] samples; maps with fewer than 2 samples are skipped."""
    pairs = [(key, i, j) for key, imgs in groups.items() for i, j in combinations(range(len(imgs)), 2)]
    if not pairs:
        raise InvalidInputError("diversity needs at least one label map with 2 or more samples")
    dists = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        a = np.stack([groups[k][i] for k, i, _ in chunk])
        b = np.stack([groups[k][j] for k, _, j in chunk])
        dists.append(distance(a, b))
    d = np.concatenate(dists)
    per_map: dict[str, list[float]] = {}
    for (key, _, _), v in zip(pairs, d):
        per_map.setdefault(key, []).append(float(v))
    means = {k: float(np.mean(v)) for k, v in per_map.items()}
    return DiversityResult(distance.metric_name, float(np.mean(list(means.values()))), len(means), len(pairs), means)

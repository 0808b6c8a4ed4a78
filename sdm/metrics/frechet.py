"""Feature statistics (mean, covariance) accumulated in streaming batches, and the Frechet distance
between the Gaussians they describe: d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from sdm.errors import InvalidInputError


@dataclass
class FeatureStats:
    mu: np.ndarray  # [D]
    sigma: np.ndarray  # [D, D], unbiased (n - 1) covariance as in pytorch-fid
    n: int

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, n=np.array(self.n))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "FeatureStats":
        z = np.load(io.BytesIO(data))
        return cls(z["mu"], z["sigma"], int(z["n"]))


class StatsAccumulator:
    """Sums of features and of their outer products in float64, so batches (or Ray workers) can be merged."""

    def __init__(self, dims: int):
        self.n = 0
        self.total = np.zeros(dims)
        self.outer = np.zeros((dims, dims))

    def add(self, features: np.ndarray) -> "StatsAccumulator":
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.total.shape[0]:
            raise InvalidInputError(f"features must be [N, {self.total.shape[0]}], got {f.shape}")
        self.n += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f
        return self

    def merge(self, other: "StatsAccumulator") -> "StatsAccumulator":
        self.n += other.n
        self.total += other.total
        self.outer += other.outer
        return self

    def stats(self) -> FeatureStats:
        if self.n < 2:
            raise InvalidInputError(f"feature statistics need at least 2 images, got {self.n}")
        mu = self.total / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return FeatureStats(mu, (sigma + sigma.T) / 2, self.n)


def feature_stats(features: np.ndarray) -> FeatureStats:
    return StatsAccumulator(np.shape(features)[1]).add(features).stats()


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Tr (S1 S2)^(1/2) is taken as Tr (S1^(1/2) S2 S1^(1/2))^(1/2): the same eigenvalues, but a symmetric PSD
    matrix, so no complex round-off and no eps fix-up for singular covariances (few images, many dims)."""
    if a.mu.shape != b.mu.shape:
        raise InvalidInputError(f"feature statistics of different dimensions: {a.mu.shape[0]} and {b.mu.shape[0]}")
    root = _psd_sqrt(a.sigma)
    middle = root @ b.sigma @ root
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)

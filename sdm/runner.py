"""The one road from prepared label inputs to images, shared by the pipeline, `sdm sample`, the generation job and
the Serve replica: sampling parameters resolved against the model's defaults and validated once, and the runner
that owns per-sample seeds, fixed micro-batches, the edit mask and progress.

Sample k of a call with seed s is seeded derive_seed(s, k), so it does not depend on the call's other rows, and
the network always sees micro-batches of the same size and layout (the last one padded), as kernels may round
differently for other batch sizes or memory layouts. Rows with guidance exactly 1 run without the null branch,
in micro-batches of their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from sdm.config import SamplingConfig
from sdm.diffusion import GaussianDiffusion
from sdm.errors import InvalidInputError
from sdm.samplers import SAMPLERS, Known, NoiseSource, make_denoiser, sample

MAX_GUIDANCE = 100.0  # far beyond any useful scale; larger values only overflow into noise
DEFAULT_MICRO_BATCH = 8
MAX_CACHE_INTERVAL = 10  # deep features older than this many steps describe another noise level

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample, every field filled and valid. Build it with `resolve`."""

    guidance_scale: float
    num_inference_steps: int
    sampler: str
    eta: float
    cache_interval: int = 1  # k > 1: the deep features are recomputed every k-th step only (sdm.unet.FeatureCache)

    @classmethod
    def resolve(cls, defaults: SamplingConfig, num_timesteps: int, guidance_scale: float | None = None,
                num_inference_steps: int | None = None, sampler: str | None = None, eta: float | None = None,
                cache_interval: int | None = None) -> "SamplingParams":
        """Unset fields from the model's defaults; InvalidInputError names the first bad field."""
        params = cls(
            guidance_scale=defaults.guidance_scale if guidance_scale is None else guidance_scale,
            num_inference_steps=defaults.num_inference_steps if num_inference_steps is None else num_inference_steps,
            sampler=defaults.sampler if sampler is None else sampler,
            eta=defaults.eta if eta is None else eta,
            cache_interval=1 if cache_interval is None else cache_interval,
        )
        check_guidance(params.guidance_scale)
        n = params.num_inference_steps
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= num_timesteps:
            raise InvalidInputError(f"sampling steps must be an integer in [1, {num_timesteps}], got {n!r}")
        if params.sampler not in SAMPLERS:
            raise InvalidInputError(f"unknown sampler {params.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not _is_number(params.eta) or not 0 <= params.eta <= 1:
            raise InvalidInputError(f"eta must be a number in [0, 1], got {params.eta!r}")
        k = params.cache_interval
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_CACHE_INTERVAL:
            raise InvalidInputError(f"cache_interval must be an integer in [1, {MAX_CACHE_INTERVAL}] (1: no feature cache), got {k!r}")
        return params

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_guidance(g: Any) -> None:
    if not _is_number(g) or not 0 <= g <= MAX_GUIDANCE:
        raise InvalidInputError(f"guidance_scale must be a number in [0, {MAX_GUIDANCE:g}], got {g!r}")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class SampleRunner:
    """A network and its diffusion process, run in fixed micro-batches on one device and precision."""

    def __init__(self, net: nn.Module, diffusion: GaussianDiffusion, device: torch.device,
                 autocast_dtype: torch.dtype | None, micro_batch: int = DEFAULT_MICRO_BATCH, label_cache: bool = False):
        """`label_cache`: compute the SPADE modulations of a micro-batch's label maps once per run (sdm.samplers)."""
        if micro_batch < 1:
            raise InvalidInputError(f"micro_batch must be >= 1, got {micro_batch}")
        self.net, self.diffusion, self.device, self.dtype = net, diffusion, device, autocast_dtype
        self.micro_batch, self.label_cache = micro_batch, label_cache

    @torch.no_grad()
    def __call__(self, labels: torch.Tensor, seeds: Sequence[int], params: SamplingParams,
                 guidance: Sequence[float] | None = None, known: Known | None = None,
                 progress: Progress | None = None) -> np.ndarray:
        """uint8 [N, H, W, 3] for prepared label inputs [N, C, H, W] and one seed per row. `guidance` gives each
        row its own scale (default: params.guidance_scale); `known` ([N, ...]) keeps a region of each row."""
        n = labels.shape[0]
        scales = [params.guidance_scale] * n if guidance is None else [float(g) for g in guidance]
        if len(seeds) != n or len(scales) != n:
            raise InvalidInputError(f"{n} label maps but {len(seeds)} seeds and {len(scales)} guidance scales")
        for g in scales:
            check_guidance(g)
        out = np.zeros((n, *labels.shape[-2:], 3), np.uint8)
        groups = [[i for i in range(n) if (scales[i] == 1.0) == unguided] for unguided in (True, False)]
        chunks = [g[s : s + self.micro_batch] for g in groups for s in range(0, len(g), self.micro_batch)]
        total = len(chunks) * params.num_inference_steps
        for c, rows in enumerate(chunks):
            def report(k: int, _: int, done: int = c * params.num_inference_steps) -> None:
                if progress is not None:
                    progress(done + k, total)

            x = self._run_chunk(labels, rows, seeds, scales, params, known, report)
            out[rows] = to_uint8(x[: len(rows)])
        return out

    @torch.no_grad()
    def warm_up(self, label_channels: int, size: tuple[int, int]) -> None:
        """One denoiser evaluation per micro-batch shape (unguided, guided) on the null label, as sampling makes it."""
        label = torch.zeros(self.micro_batch, label_channels, *size, device=self.device)
        x = torch.zeros(self.micro_batch, 3, *size, device=self.device)
        t = torch.zeros(self.micro_batch, dtype=torch.long, device=self.device)
        for scale in (1.0, 2.0):
            pred = make_denoiser(self.net, self.diffusion, label, scale, self.dtype, label_cache=self.label_cache)(x, t)
            if not torch.isfinite(pred.eps).all():
                raise RuntimeError("the model's output is not finite")

    def _run_chunk(self, labels: torch.Tensor, rows: list[int], seeds: Sequence[int], scales: list[float],
                   params: SamplingParams, known: Known | None, progress: Progress) -> torch.Tensor:
        """One network batch of exactly micro_batch rows (the last row repeated as padding), contiguous."""
        idx = rows + [rows[-1]] * (self.micro_batch - len(rows))
        label = labels[idx].contiguous().to(self.device)
        row_scales = [scales[i] for i in idx]
        scale: float | torch.Tensor = 1.0 if row_scales[0] == 1.0 else torch.tensor(row_scales, device=self.device)
        noise = NoiseSource([int(seeds[i]) for i in idx], (3, *label.shape[-2:]), self.device)
        chunk_known = None
        if known is not None:
            chunk_known = Known(known.x0[idx].contiguous().to(self.device), known.mask[idx].contiguous().to(self.device))
        return sample(
            lambda d: make_denoiser(self.net, d, label, scale, self.dtype, cache_interval=params.cache_interval,
                                    label_cache=self.label_cache),
            self.diffusion, params.sampler,
            params.num_inference_steps, noise, eta=params.eta, known=chunk_known, progress=progress,
        )

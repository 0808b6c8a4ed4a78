"""The one road from prepared label inputs to images, shared by the pipeline, `sdm sample`, the generation job and
the Serve replica: the runner that takes validated sampling parameters (sdm.config.SamplingParams) and owns
per-sample seeds, fixed micro-batches, the edit mask and progress.

Sample k of a call with seed s is seeded derive_seed(s, k), so it does not depend on the call's other rows, and
the network always sees micro-batches of the same size and layout (the last one padded), as kernels may round
differently for other batch sizes or memory layouts. Rows with guidance exactly 1 run without the null branch,
in micro-batches of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from sdm.config import SamplingParams, check_guidance
from sdm.diffusion import GaussianDiffusion
from sdm.errors import InvalidInputError
from sdm.samplers import Known, NoiseSource, make_denoiser, sample

DEFAULT_MICRO_BATCH = 8

Progress = Callable[[int, int], None]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class SampleRunner:
    """A network and its diffusion process, run in fixed micro-batches on one device and precision."""

    def __init__(self, net: nn.Module, diffusion: GaussianDiffusion, device: torch.device,
                 autocast_dtype: torch.dtype | None, micro_batch: int = DEFAULT_MICRO_BATCH, label_cache: bool = False,
                 timesteps: Sequence[int] = ()):
        """`label_cache`: compute the SPADE modulations of a micro-batch's label maps once per run (sdm.samplers);
        `timesteps`: a step student's own (sdm.config.StudentConfig), instead of evenly spread steps."""
        if micro_batch < 1:
            raise InvalidInputError(f"micro_batch must be >= 1, got {micro_batch}")
        self.net, self.diffusion, self.device, self.dtype = net, diffusion, device, autocast_dtype
        self.micro_batch, self.label_cache = micro_batch, label_cache
        self.timesteps = list(timesteps) or None

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
        if guidance is not None:  # params.guidance_scale was checked when params was made
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
            params.num_inference_steps, noise, eta=params.eta, known=chunk_known, progress=progress, timesteps=self.timesteps,
        )

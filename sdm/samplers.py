"""Samplers: a noise schedule plus a model function, with classifier-free guidance applied in one place.

DDPM ancestral sampling with the learned variance (the paper's Algorithm 2, on all steps or a respaced
subset), DDIM (eta), and DPM-Solver++(2M). Every sample draws its noise from its own seeded generator,
so a sample is a function of its seed, never of the batch it was in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sdm.diffusion import GaussianDiffusion, ModelPrediction, spaced_steps

SAMPLERS = ("ddpm", "ddim", "dpm++")

Denoiser = Callable[[torch.Tensor, torch.Tensor], ModelPrediction]


def guided_output(
    net: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    label: torch.Tensor,
    scale: float | torch.Tensor,
    batched: bool = True,
) -> torch.Tensor:
    """Network output with guidance eps = eps(null) + s * (eps(label) - eps(null)) on the eps channels.

    `scale` is one number, or a [B] tensor with one per row. The variance channels come from the
    conditional branch. A scalar s = 1 runs the conditional model alone; otherwise both branches go
    through the network in one batched forward pass (or two, for comparison).
    """
    if not isinstance(scale, torch.Tensor) and scale == 1.0:
        return net(x, t, label)
    null = torch.zeros_like(label)
    if batched:
        out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([label, null]))
        cond, uncond = out.chunk(2)
    else:
        cond, uncond = net(x, t, label), net(x, t, null)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(cond.device, cond.dtype).view(-1, 1, 1, 1)
    eps = uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3])
    return torch.cat([eps, cond[:, 3:]], dim=1)


class NoiseSource:
    """Per-sample seeded Gaussian noise: row i is drawn from generator i alone."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...], device: torch.device):
        self.generators = [torch.Generator().manual_seed(int(s) & 0xFFFF_FFFF_FFFF_FFFF) for s in seeds]
        self.shape = shape
        self.device = device

    def __call__(self) -> torch.Tensor:
        # Drawn on the CPU so a seed gives the same noise on every device.
        rows = [torch.randn(self.shape, generator=g) for g in self.generators]
        return torch.stack(rows).to(self.device)


@dataclass
class Known:
    """Pixels to keep during sampling (semantic editing): mask = 1 where x0 is kept."""

    x0: torch.Tensor
    mask: torch.Tensor


def _impose(x: torch.Tensor, known: Known | None, d: GaussianDiffusion, j: int | None, noise: NoiseSource) -> torch.Tensor:
    """Replace the known region by the forward-noised image at step j (j = None: the clean image)."""
    if known is None:
        return x
    if j is None:
        target = known.x0
    else:
        t = torch.full((x.shape[0],), j, device=x.device, dtype=torch.long)
        target = d.q_sample(known.x0, t, noise())
    return known.mask * target + (1 - known.mask) * x


def make_denoiser(
    net: nn.Module,
    d: GaussianDiffusion,
    label: torch.Tensor,
    scale: float | torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
    batched: bool = True,
) -> Denoiser:
    """A function (x_t, step index of d) -> prediction, calling the network with guidance."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> ModelPrediction:
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = guided_output(net, x.to(label.dtype), d.model_timesteps(t), label, scale, batched)
        return d.split_output(out.float())

    return denoise


def sample(
    denoise_for: Callable[[GaussianDiffusion], Denoiser],
    diffusion: GaussianDiffusion,
    method: str,
    steps: int,
    noise: NoiseSource,
    eta: float = 0.0,
    known: Known | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run a sampler from pure noise to x_0 in [-1, 1]; `denoise_for` binds the model to the respaced process."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(SAMPLERS)}")
    d = diffusion.respaced(spaced_steps(diffusion.num_timesteps, steps))
    denoise = denoise_for(d)
    x = _impose(noise(), known, d, d.num_timesteps - 1, noise)
    loop = {"ddpm": _ddpm, "ddim": _ddim, "dpm++": _dpm_solver_2m}[method]
    return loop(denoise, d, x, noise, eta, known, progress or (lambda i, n: None)).clamp(-1, 1)


def _ddpm(denoise, d, x, noise, eta, known, progress):
    n = d.num_timesteps
    for k, i in enumerate(reversed(range(n))):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        mean, logvar, _ = d.p_mean_variance(denoise(x, t), x, t)
        x = mean + (torch.exp(0.5 * logvar) * noise() if i > 0 else 0)
        x = _impose(x, known, d, i - 1 if i > 0 else None, noise)
        progress(k + 1, n)
    return x


def _ddim(denoise, d, x, noise, eta, known, progress):
    n = d.num_timesteps
    for k, i in enumerate(reversed(range(n))):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        pred = denoise(x, t)
        x0 = d.predict_x0(x, t, pred.eps).clamp(-1, 1)
        eps = d.eps_from_x0(x, t, x0)
        a, a_prev = d.alphas_cumprod[i], d.alphas_cumprod_prev[i]
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps
        if i > 0 and sigma > 0:
            x = x + sigma * noise()
        x = _impose(x, known, d, i - 1 if i > 0 else None, noise)
        progress(k + 1, n)
    return x


def _dpm_solver_2m(denoise, d, x, noise, eta, known, progress):
    """DPM-Solver++(2M) in data prediction, over the respaced steps; the last step lands on x_0."""
    n = d.num_timesteps
    alpha = np.sqrt(d.alphas_cumprod)
    sigma = np.sqrt(1 - d.alphas_cumprod)
    lam = np.log(alpha) - np.log(sigma)
    x0_prev, h_prev = None, None
    for k, i in enumerate(reversed(range(n))):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        x0 = d.predict_x0(x, t, denoise(x, t).eps).clamp(-1, 1)
        if i == 0:
            x = x0
        else:
            j = i - 1
            h = lam[j] - lam[i]
            if x0_prev is None:
                D = x0
            else:
                r = h_prev / h
                D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma[j] / sigma[i]) * x - alpha[j] * np.expm1(-h) * D
            x0_prev, h_prev = x0, h
        x = _impose(x, known, d, i - 1 if i > 0 else None, noise)
        progress(k + 1, n)
    return x

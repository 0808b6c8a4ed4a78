"""Samplers: a noise schedule plus a model function, with classifier-free guidance applied in one place.

A sampler is a small step object (one update from step i to i - 1 of a respaced process, given the model's
clipped x_0 and its prediction) under one loop, `sample`, that evaluates the model, clips x_0, keeps the known
region of an edit and reports progress. Samplers: DDPM ancestral sampling with the learned variance (the
paper's Algorithm 2, on all steps or a respaced subset), DDIM (eta), DPM-Solver++(2M) and its stochastic
variant DPM-Solver++(2M) SDE. Every sample draws its noise from its own seeded generator, so a sample is a
function of its seed, never of the batch it was in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sdm.config import SamplerName
from sdm.diffusion import GaussianDiffusion, ModelPrediction, spaced_steps
from sdm.labels import null_label
from sdm.unet import FeatureCache, Modulations, takes_guidance


Denoiser = Callable[[torch.Tensor, torch.Tensor], ModelPrediction]


def guided_output(
    net: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    label: torch.Tensor,
    scale: float | torch.Tensor,
    batched: bool = True,
    cache: FeatureCache | None = None,
    mods: Modulations | None = None,
) -> torch.Tensor:
    """Network output with guidance eps = eps(null) + s * (eps(label) - eps(null)) on the eps channels.

    `scale` is one number, or a [B] tensor with one per row. The variance channels come from the
    conditional branch. A scalar s = 1 runs the conditional model alone; otherwise both branches go
    through the network in one batched forward pass (or two, for comparison; not with a feature cache or
    precomputed modulations, which belong to the network batch: those of `guidance_input(net, label, scale)`).
    A guidance student (sdm.unet.takes_guidance) returns the guided output itself: one pass of the label rows.
    """
    extra = {k: v for k, v in (("cache", cache), ("mods", mods)) if v is not None}
    if takes_guidance(net):
        scales = scale.to(x.device, torch.float32) if isinstance(scale, torch.Tensor) else torch.full((x.shape[0],), float(scale), device=x.device)
        return net(x, t, label, guidance=scales, **extra)
    if not isinstance(scale, torch.Tensor) and scale == 1.0:
        return net(x, t, label, **extra)
    if batched:
        out = net(torch.cat([x, x]), torch.cat([t, t]), guidance_input(net, label, scale), **extra)
        cond, uncond = out.chunk(2)
    elif extra:
        raise ValueError("a feature cache or precomputed modulations need batched guidance: the branches would share them")
    else:
        null = null_label(label)
        cond, uncond = net(x, t, label), net(x, t, null)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(cond.device, cond.dtype).view(-1, 1, 1, 1)
    eps = uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3])
    return torch.cat([eps, cond[:, 3:]], dim=1)


def guidance_input(net: nn.Module, label: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """The label input of the network batch guided_output runs: the labels, then their null labels when guided by
    two branches."""
    if takes_guidance(net) or not isinstance(scale, torch.Tensor) and scale == 1.0:
        return label
    return torch.cat([label, null_label(label)])


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
    cache_interval: int = 1,
    label_cache: bool = False,
) -> Denoiser:
    """A function (x_t, step index of d) -> prediction, calling the network with guidance. Make one per sampling
    run: with `label_cache` the SPADE modulations of the label map are computed on the first call and reused by
    every step (the same numbers, fewer FLOPs; needs batched guidance); with `cache_interval` k > 1, every k-th
    call (the first included) runs the whole network and the others reuse its deep features (FeatureCache)."""
    cache = FeatureCache() if cache_interval > 1 else None
    mods: Modulations | None = None
    calls = 0

    def denoise(x: torch.Tensor, t: torch.Tensor) -> ModelPrediction:
        nonlocal calls, mods
        if cache is not None:
            cache.full = calls % cache_interval == 0
        calls += 1
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            if label_cache and mods is None:
                mods = net.modulations(guidance_input(net, label, scale))
            out = guided_output(net, x.to(label.dtype), d.model_timesteps(t), label, scale, batched, cache, mods)
        return d.split_output(out.float())

    return denoise


class Sampler:
    """One update x_i -> x_{i-1} of a respaced process. `fresh` is called once per sampling run, so a
    multistep sampler keeps its history on the returned object, never across runs."""

    name = ""

    def fresh(self) -> "Sampler":
        return self

    def step(self, d: GaussianDiffusion, i: int, x: torch.Tensor, x0: torch.Tensor, pred: ModelPrediction,
             noise: NoiseSource) -> torch.Tensor:
        raise NotImplementedError


class DDPM(Sampler):
    """Ancestral sampling: the posterior mean at the predicted x_0, plus noise of the model's variance."""

    name = "ddpm"

    def step(self, d, i, x, x0, pred, noise):
        t = _steps(i, x)
        mean, _, _ = d.q_posterior(x0, x, t)
        if i == 0:
            return mean
        return mean + torch.exp(0.5 * d.model_log_variance(pred, t, x)) * noise()


class DDIM(Sampler):
    """DDIM (Song et al. 2021): eta = 0 is the deterministic ODE path, eta = 1 the DDPM posterior variance."""

    name = "ddim"

    def __init__(self, eta: float = 0.0):
        self.eta = eta

    def step(self, d, i, x, x0, pred, noise):
        eps = d.eps_from_x0(x, _steps(i, x), x0)
        a, a_prev = d.alphas_cumprod[i], d.alphas_cumprod_prev[i]
        sigma = self.eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps
        return x + sigma * noise() if i > 0 and sigma > 0 else x


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) in data prediction (Lu et al. 2022), second order from the previous step's x_0; with
    `sde`, the stochastic 2M SDE variant, which adds fresh noise each step and so forgets part of the model's
    earlier errors. The last step lands on the predicted x_0."""

    def __init__(self, sde: bool = False):
        self.sde = sde
        self.name = "dpm++sde" if sde else "dpm++"
        self.x0_prev: torch.Tensor | None = None
        self.h_prev: float | None = None

    def fresh(self) -> "DPMSolverPP2M":
        return DPMSolverPP2M(self.sde)

    def step(self, d, i, x, x0, pred, noise):
        if i == 0:
            return x0
        alpha, sigma = np.sqrt(d.alphas_cumprod), np.sqrt(1 - d.alphas_cumprod)
        lam = np.log(alpha) - np.log(sigma)
        j = i - 1
        h = lam[j] - lam[i]
        D = x0
        if self.x0_prev is not None:  # midpoint form: D = x0 + (x0 - x0_prev) / (2 r), r = h_prev / h
            D = x0 + (x0 - self.x0_prev) / (2 * (self.h_prev / h))
        if self.sde:
            x = (sigma[j] / sigma[i]) * np.exp(-h) * x - alpha[j] * np.expm1(-2 * h) * D
            x = x + sigma[j] * np.sqrt(-np.expm1(-2 * h)) * noise()
        else:
            x = (sigma[j] / sigma[i]) * x - alpha[j] * np.expm1(-h) * D
        self.x0_prev, self.h_prev = x0, h
        return x


_SAMPLERS: dict[SamplerName, Callable[[float], Sampler]] = {  # keyed by the config layer's names
    "ddpm": lambda eta: DDPM(),
    "ddim": lambda eta: DDIM(eta),
    "dpm++": lambda eta: DPMSolverPP2M(),
    "dpm++sde": lambda eta: DPMSolverPP2M(sde=True),
}
SAMPLERS: tuple[str, ...] = tuple(_SAMPLERS)


def make_sampler(name: str, eta: float = 0.0) -> Sampler:
    """A sampler by name; `eta` is DDIM's (the others ignore it)."""
    if name not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return _SAMPLERS[name](eta)


def _steps(i: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), i, device=like.device, dtype=torch.long)


def sample(
    denoise_for: Callable[[GaussianDiffusion], Denoiser],
    diffusion: GaussianDiffusion,
    method: str | Sampler,
    steps: int,
    noise: NoiseSource,
    eta: float = 0.0,
    known: Known | None = None,
    progress: Callable[[int, int], None] | None = None,
    timesteps: Sequence[int] | None = None,
) -> torch.Tensor:
    """Run a sampler (by name, or a Sampler object) from pure noise to x_0 in [-1, 1]; `denoise_for` binds the model
    to the respaced process: `steps` evenly spread steps, or the given `timesteps` (a step student's).

    Each step: the model's prediction, its x_0 clipped to [-1, 1], the sampler's update, then the known region
    replaced by the forward-noised image at the step moved to.
    """
    sampler = (method if isinstance(method, Sampler) else make_sampler(method, eta)).fresh()
    if timesteps is not None and len(timesteps) != steps:
        raise ValueError(f"{steps} steps but {len(timesteps)} timesteps")
    d = diffusion.respaced(spaced_steps(diffusion.num_timesteps, steps) if timesteps is None else timesteps)
    denoise = denoise_for(d)
    n = d.num_timesteps
    x = _impose(noise(), known, d, n - 1, noise)
    for k, i in enumerate(reversed(range(n))):
        t = _steps(i, x)
        pred = denoise(x, t)
        x0 = d.predict_x0(x, t, pred.eps).clamp(-1, 1)
        x = sampler.step(d, i, x, x0, pred, noise)
        x = _impose(x, known, d, i - 1 if i > 0 else None, noise)
        if progress is not None:
            progress(k + 1, n)
    return x.clamp(-1, 1)

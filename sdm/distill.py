"""Distilled students of an SDM model, and the losses that train them; no Ray, no files.

Guidance distillation (Meng et al., "On Distillation of Guided Diffusion Models", CVPR 2023): the student takes
the guidance scale w as a network input (sdm.unet) and learns, in one pass, the teacher's guided output
eps(null) + w (eps(label) - eps(null)) (variance from the conditional branch), on x_t drawn from the data at every
timestep and w uniform over the scales users ask for.

Progressive distillation (Salimans and Ho, ICLR 2022): in each round the student learns to take, in one
deterministic DDIM step, the teacher's two DDIM steps; the student then teaches the next round at half the steps.
The grids nest: a round's student samples at every other timestep of its teacher's grid, ending on the grid's top
timestep, so its last step jumps from its lowest timestep straight to the clean image. The loss is the distance
between where the student's step and the teacher's two steps land, over the noise variance there (the image's own
error on the last step): what the next step sees. (The paper's x_0-space loss with truncated SNR weighting asks an
eps-predicting student for eps ~150x more precisely at the top step, where x_0 = (x_t - sigma eps) / alpha, than it
matters there: its gradients swamped every other step.)
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from sdm.config import SamplingParams, SDMConfig, StudentConfig
from sdm.diffusion import GaussianDiffusion, spaced_steps, take_rows
from sdm.samplers import guided_output
from sdm.unet import SDMUNet

DEFAULT_GUIDANCE_RANGE = (1.0, 3.0)


def student_config(teacher: SDMConfig, method: str, teacher_id: str, teacher_uri: str, *,
                   guidance_range: tuple[float, float] = DEFAULT_GUIDANCE_RANGE, timesteps: Sequence[int] = (),
                   from_steps: int = 0, eta: float = 0.0, optimizer_steps: int = 0, lr: float = 0.0) -> SDMConfig:
    """The config of a student of `teacher`: its network with the guidance input, its teacher's id and the
    distillation settings, and sampling defaults it can serve (a step student: DDIM on its own timesteps, with the
    eta it was distilled for)."""
    lo, hi = guidance_range
    timesteps = tuple(int(t) for t in timesteps)
    if teacher.model.guidance_input and teacher.student.is_student:  # a student never widens its teacher's range
        lo, hi = max(lo, teacher.student.guidance_range[0]), min(hi, teacher.student.guidance_range[1])
    default = min(max(teacher.sampling.guidance_scale, lo), hi)
    sampling = dataclasses.replace(teacher.sampling, guidance_scale=default)
    if timesteps:
        sampling = SamplingParams(guidance_scale=default, sampler="ddim", num_inference_steps=len(timesteps), eta=eta)
    student = StudentConfig(method=method, teacher=teacher_id, teacher_uri=teacher_uri, guidance_range=(lo, hi),
                            timesteps=timesteps, from_steps=from_steps, eta=eta,
                            optimizer_steps=optimizer_steps, lr=lr)
    return dataclasses.replace(teacher, model=dataclasses.replace(teacher.model, guidance_input=True), sampling=sampling,
                               student=student).validate()


def round_config(config: SDMConfig, grid: Sequence[int]) -> SDMConfig:
    """A step student's config as it samples during a progressive round: on that round's grid."""
    student = dataclasses.replace(config.student, timesteps=tuple(int(t) for t in grid))
    return dataclasses.replace(config, student=student,
                               sampling=dataclasses.replace(config.sampling, num_inference_steps=len(grid))).validate()


def init_student(teacher: nn.Module, config: SDMConfig) -> SDMUNet:
    """A student network holding its teacher's weights; a new guidance embedding starts at zero, so the student
    starts as the teacher's conditional branch at every scale."""
    student = SDMUNet(config.model)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith("guidance_embed.") for k in missing):
        raise ValueError(f"the teacher's network does not fit the student's: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return student


def ddim_step(d: GaussianDiffusion, i: torch.Tensor, x: torch.Tensor, x0: torch.Tensor, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """The DDIM update from step index i of `d` to i - 1 (the clean image from i = 0), per row, as sdm.samplers.DDIM
    takes it: with `eta` > 0 its mean, plus sigma * noise where noise is given."""
    a, a_prev = take_rows(d.alphas_cumprod, i, x), take_rows(d.alphas_cumprod_prev, i, x)
    eps = d.eps_from_x0(x, i, x0)
    sigma = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
    out = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    return out if noise is None else out + sigma * noise


def halving_grids(num_timesteps: int, from_steps: int, target_steps: int) -> list[np.ndarray]:
    """The timestep grids of progressive distillation: the teacher's `from_steps` evenly spread steps, then every
    other one of the grid before, down to `target_steps` (from_steps must be target_steps times a power of 2)."""
    rounds = int(np.log2(from_steps / target_steps)) if from_steps > target_steps >= 1 else 0
    if rounds < 1 or target_steps << rounds != from_steps:
        raise ValueError(f"from_steps ({from_steps}) must be target_steps ({target_steps}) times 2, 4, 8, ...")
    grids = [spaced_steps(num_timesteps, from_steps)]
    while len(grids[-1]) > target_steps:
        grids.append(grids[-1][1::2])
    return grids


def _uniform(lo: float, hi: float, n: int, generator: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


class GuidanceDistillation:
    """The loss of a guidance student against its teacher's guided output (sdm.training.train_step's `loss`)."""

    def __init__(self, teacher: nn.Module, diffusion: GaussianDiffusion, guidance_range: tuple[float, float]):
        self.teacher, self.diffusion, self.guidance_range = teacher.eval(), diffusion, guidance_range

    @torch.no_grad()
    def target(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The teacher's guided network output [B, 3 or 6, H, W] at network timesteps t and per-row scales w."""
        return guided_output(self.teacher, x, t, label, w).float()

    def __call__(self, net: nn.Module, x0: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None,
                 autocast_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        b, d = x0.shape[0], self.diffusion
        t = torch.randint(0, d.num_timesteps, (b,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        w = _uniform(*self.guidance_range, b, generator).to(x0.device)
        xt = d.q_sample(x0, t, noise)
        with torch.autocast(x0.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            target = self.target(xt, d.model_timesteps(t), label, w)
            out = net(xt, d.model_timesteps(t), label, guidance=w)
        mse = _mean_flat((out.float() - target) ** 2)
        return {"loss": mse, "mse": mse, "t": t}


class ProgressiveDistillation:
    """The loss of a step student against its teacher's two DDIM steps, round by round; the teacher of round r > 0
    is the student of round r - 1 (the caller hands it over with `set_teacher`).

    With `eta` > 0 the teacher's steps are stochastic DDIM steps (eta 1: ancestral, with the posterior variance) and
    the student learns the mean of where they land, for sampling with the same eta: the posterior of the one big step
    is the composition of the two small ones, so its mean and fresh noise stand in for them. With eta 0 it is
    Salimans and Ho's deterministic distillation."""

    def __init__(self, teacher: nn.Module, diffusion: GaussianDiffusion, grids: list[np.ndarray],
                 guidance_range: tuple[float, float], eta: float = 0.0):
        self.diffusion, self.grids, self.guidance_range, self.eta = diffusion, grids, guidance_range, eta
        self.teacher, self.round = teacher.eval(), 0

    @property
    def rounds(self) -> int:
        return len(self.grids) - 1

    def set_teacher(self, teacher: nn.Module, round_: int) -> None:
        """Round `round_` distils `teacher` (a frozen copy is kept)."""
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.round = round_

    def processes(self) -> tuple[GaussianDiffusion, GaussianDiffusion]:
        """This round's teacher and student processes (the student's step i is the teacher's step 2i + 1)."""
        return self.diffusion.respaced(self.grids[self.round]), self.diffusion.respaced(self.grids[self.round + 1])

    @torch.no_grad()
    def target(self, x: torch.Tensor, i: torch.Tensor, label: torch.Tensor, w: torch.Tensor,
               autocast_dtype: torch.dtype | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Where the teacher's two DDIM steps (x_0 clipped, as sampling does; stochastic ones with noise from
        `generator` when eta > 0) from x at student step i land: the student's one step must land there."""
        dt, _ = self.processes()
        for j in (2 * i + 1, 2 * i):
            with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                out = guided_output(self.teacher, x, dt.model_timesteps(j), label, w)
            x0 = dt.predict_x0(x, j, dt.split_output(out.float()).eps).clamp(-1, 1)
            noise = torch.randn(x.shape, generator=generator).to(x.device) if self.eta > 0 else None
            x = ddim_step(dt, j, x, x0, self.eta, noise)
        return x

    def __call__(self, net: nn.Module, x0: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None,
                 autocast_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        _, ds = self.processes()
        b = x0.shape[0]
        i = torch.randint(0, ds.num_timesteps, (b,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        w = _uniform(*self.guidance_range, b, generator).to(x0.device)
        xt = ds.q_sample(x0, i, noise)
        target = self.target(xt, i, label, w, autocast_dtype, generator)
        with torch.autocast(x0.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = net(xt, ds.model_timesteps(i), label, guidance=w)
        landed = ddim_step(ds, i, xt, ds.predict_x0(xt, i, ds.split_output(out.float()).eps), self.eta)
        mse = _mean_flat((landed - target) ** 2)
        noise_var = take_rows(1 - ds.alphas_cumprod_prev, i, xt).view(-1)
        t = torch.from_numpy(ds.timesteps).to(i.device)[i]
        return {"loss": mse / torch.where(i > 0, noise_var, torch.ones_like(noise_var)), "mse": mse, "t": t}

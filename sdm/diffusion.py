"""The Gaussian diffusion process and its losses (improved-DDPM learned-range variance).

Knows nothing of networks, files or Ray: a model enters only as the tensor it produced.
Schedule arithmetic is done in float64 numpy, as small errors in alphas_cumprod matter near t = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sdm.config import DiffusionConfig


def beta_schedule(name: str, steps: int) -> np.ndarray:
    """Betas of the linear (DDPM, rescaled to `steps`) or cosine (improved DDPM) schedule."""
    if name == "linear":
        scale = 1000.0 / steps
        return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    if name == "cosine":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)],
            dtype=np.float64,
        )
    raise ValueError(f"unknown beta schedule {name!r}")


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Tanh approximation of the standard normal CDF (as in improved DDPM)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of images in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales)); nats."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def take_rows(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """arr[t] as a [B, 1, 1, 1] tensor broadcastable against `like`."""
    out = torch.from_numpy(arr).to(device=t.device)[t].to(like.dtype)
    return out.reshape(-1, *([1] * (like.dim() - 1)))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


@dataclass
class ModelPrediction:
    """What p(x_{t-1} | x_t) needs from one network evaluation."""

    eps: torch.Tensor
    v: torch.Tensor | None  # variance interpolation in [-1, 1]; None for fixed variance


class GaussianDiffusion:
    """q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0), and p(x_{t-1} | x_t) from a model prediction.

    `timesteps` maps this process's step indices to the network's timestep inputs: identity for the
    full process, the kept original steps for a respaced one.
    """

    def __init__(self, betas: np.ndarray, learn_sigma: bool = True, timesteps: np.ndarray | None = None):
        self.betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(self.betas)
        self.learn_sigma = learn_sigma
        self.timesteps = np.arange(self.num_timesteps) if timesteps is None else np.asarray(timesteps)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; clip the log to the t = 1 value. A one-step process (the
        # health check's) has no t = 1: its -inf is never used, since the last step adds no noise.
        with np.errstate(divide="ignore"):
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
                if self.num_timesteps > 1
                else self.posterior_variance
            )
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, learn_sigma: bool) -> "GaussianDiffusion":
        return cls(beta_schedule(cfg.schedule, cfg.num_timesteps), learn_sigma=learn_sigma)

    def respaced(self, keep: list[int] | np.ndarray) -> "GaussianDiffusion":
        """A process over a subset of steps with the same alphas_cumprod at the kept steps."""
        keep = np.asarray(sorted(set(int(k) for k in keep)))
        if len(keep) == 0 or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"respaced steps must lie in [0, {self.num_timesteps}), got {keep.tolist()}")
        ac = self.alphas_cumprod[keep]
        betas = 1.0 - ac / np.append(1.0, ac[:-1])
        return GaussianDiffusion(betas, learn_sigma=self.learn_sigma, timesteps=self.timesteps[keep])

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The network's timestep input for step indices t."""
        return torch.from_numpy(self.timesteps).to(t.device)[t].float()

    # forward process

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return take_rows(self.sqrt_alphas_cumprod, t, x0) * x0 + take_rows(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = take_rows(self.sqrt_alphas_cumprod, t, x0) * x0
        var = take_rows(1.0 - self.alphas_cumprod, t, x0).expand_as(x0)
        return mean, var

    def q_posterior(
        self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = take_rows(self.posterior_mean_coef1, t, xt) * x0 + take_rows(self.posterior_mean_coef2, t, xt) * xt
        var = take_rows(self.posterior_variance, t, xt).expand_as(xt)
        logvar = take_rows(self.posterior_log_variance_clipped, t, xt).expand_as(xt)
        return mean, var, logvar

    # reverse process

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return take_rows(self.sqrt_recip_alphas_cumprod, t, xt) * xt - take_rows(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps

    def eps_from_x0(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (take_rows(self.sqrt_recip_alphas_cumprod, t, xt) * xt - x0) / take_rows(self.sqrt_recipm1_alphas_cumprod, t, xt)

    def model_log_variance(self, pred: ModelPrediction, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Learned range: exp(v' log beta_t + (1 - v') log beta~_t), v' = (v + 1) / 2; else beta~_t."""
        min_log = take_rows(self.posterior_log_variance_clipped, t, like)
        if pred.v is None:
            return min_log.expand_as(like)
        max_log = take_rows(np.log(self.betas), t, like)
        frac = (pred.v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance(
        self, pred: ModelPrediction, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, log-variance and predicted x_0 of p(x_{t-1} | x_t)."""
        x0 = self.predict_x0(xt, t, pred.eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(x0, xt, t)
        return mean, self.model_log_variance(pred, t, xt), x0

    # losses

    def vb_terms_bpd(self, pred: ModelPrediction, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample L_t in bits/dim: KL to the true posterior, the decoder NLL at t = 0."""
        true_mean, _, true_logvar = self.q_posterior(x0, xt, t)
        mean, logvar, _ = self.p_mean_variance(pred, xt, t, clip_denoised=False)
        kl = _mean_flat(normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def split_output(self, out: torch.Tensor) -> ModelPrediction:
        """Network output [B, 3 or 6, H, W] -> eps and v."""
        if self.learn_sigma:
            eps, v = out.float().chunk(2, dim=1)
            return ModelPrediction(eps=eps, v=v)
        return ModelPrediction(eps=out.float(), v=None)

    def training_losses(
        self, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, lambda_vlb: float
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses: L_simple (MSE on eps) + lambda * L_vlb.

        L_vlb is the full bound estimated from one step, num_timesteps * L_t. Its mean is detached so
        the bound trains only the variance (improved DDPM), and with lambda = 0.001, T = 1000 this equals
        the original code's mse + vb.
        """
        pred = self.split_output(out)
        mse = _mean_flat((noise - pred.eps) ** 2)
        terms = {"mse": mse, "loss": mse}
        if pred.v is not None:
            frozen = ModelPrediction(eps=pred.eps.detach(), v=pred.v)
            vb = self.vb_terms_bpd(frozen, x0, xt, t)
            terms["vb"] = vb
            terms["loss"] = mse + lambda_vlb * self.num_timesteps * vb
        return terms


def spaced_steps(num_timesteps: int, n: int) -> np.ndarray:
    """n step indices evenly spread over [0, num_timesteps), always keeping the first and last."""
    if not 1 <= n <= num_timesteps:
        raise ValueError(f"steps must lie in [1, {num_timesteps}], got {n}")
    if n == 1:
        return np.array([num_timesteps - 1])
    return np.unique(np.round(np.linspace(0, num_timesteps - 1, n)).astype(np.int64))

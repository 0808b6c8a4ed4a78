"""The object a user calls: label maps in, uint8 images out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from sdm import checkpoint
from sdm.config import SamplingParams, SDMConfig, renamed
from sdm.device import autocast_dtype, default_device
from sdm.diffusion import GaussianDiffusion
from sdm.errors import InvalidInputError
from sdm.inference import compile_net, prepare_net
from sdm.labels import LabelEncoder, LabelLike
from sdm.samplers import Known
from sdm.runner import DEFAULT_MICRO_BATCH, Progress, SampleRunner
from sdm.seeds import sample_seeds
from sdm.unet import SDMUNet

class SDMPipeline:
    """An SDM network with its diffusion process, sampling defaults and the runner that samples it.

    `fast_path` and `compile` choose the inference fast path (sdm.inference): channels_last, bf16-held weights and
    the label maps' SPADE modulations computed once per sampling run (the runner's label cache) by default;
    torch.compile on request, after which `warm_up` compiles before the first call. `fast` is the deprecated name
    of `fast_path`."""

    def __init__(self, net: SDMUNet, config: SDMConfig, device: torch.device | str | None = None, precision: str = "auto",
                 micro_batch: int = DEFAULT_MICRO_BATCH, fast_path: bool | None = None, compile: bool = False, *,
                 fast: bool | None = None):
        fast_path = renamed(fast_path, fast, "fast", "fast_path")
        fast_path = True if fast_path is None else fast_path
        self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = autocast_dtype(self.device, precision)
        self.net = prepare_net(net, self.device, self.dtype, fast_path)
        self.diffusion = GaussianDiffusion.from_config(config.diffusion, learn_sigma=config.model.learn_sigma)
        self.label_encoder = LabelEncoder(config)
        runner_net = compile_net(self.net, self.device) if compile else self.net
        self.runner = SampleRunner(runner_net, self.diffusion, self.device, self.dtype, micro_batch, label_cache=fast_path,
                                   timesteps=config.student.timesteps)

    @classmethod
    def from_pretrained(cls, uri: str, device: torch.device | str | None = None, precision: str = "auto",
                        micro_batch: int = DEFAULT_MICRO_BATCH, fast_path: bool | None = None, compile: bool = False, *,
                        fast: bool | None = None) -> "SDMPipeline":
        """Load an exported model directory, a training run, or a converted official checkpoint."""
        fast_path = renamed(fast_path, fast, "fast", "fast_path")
        net, config = checkpoint.load_model(uri)
        return cls(net, config, device=device, precision=precision, micro_batch=micro_batch, fast_path=fast_path,
                   compile=compile)

    def warm_up(self) -> None:
        """Run the network once in every batch shape the runner uses (compiling them when compiled), so no call
        pays for it; raises RuntimeError when the model's output is not finite."""
        self.runner.warm_up(self.config.model.label_channels, self.config.model.image_size)

    def params(self, **overrides: Any) -> SamplingParams:
        """Sampling parameters (SamplingParams' names) with the model's defaults filled in, validated."""
        return self.config.resolve_sampling(**overrides)

    def prepare_labels(
        self, labels: LabelLike | Sequence[LabelLike], instances: LabelLike | Sequence[LabelLike] | None = None
    ) -> torch.Tensor:
        """Raw label (and instance) maps -> validated [B, label_channels, H, W] network input (sdm.labels)."""
        return self.label_encoder(labels, instances)

    def sample_prepared(self, label_inputs: torch.Tensor, seeds: Sequence[int], params: SamplingParams,
                        guidance: Sequence[float] | None = None, known: Known | None = None,
                        progress: Progress | None = None) -> np.ndarray:
        """uint8 [N, H, W, 3] for prepared label inputs [N, C, H, W] (prepare_labels) and one seed per row: the runner
        every door shares. `guidance` gives each row its own scale; `known` ([N, ...]) keeps a region of each row."""
        return self.runner(label_inputs, seeds, params, guidance=guidance, known=known, progress=progress)

    def __call__(
        self,
        labels: LabelLike | Sequence[LabelLike],
        instances: LabelLike | Sequence[LabelLike] | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        sampler: str | None = None,
        seed: int | Sequence[int] = 0,
        num_samples: int = 1,
        eta: float | None = None,
        progress: Progress | None = None,
        cache_interval: int | None = None,
        *,
        num_steps: int | None = None,
    ) -> np.ndarray:
        """Sample `num_samples` images per label map; returns uint8 [B * num_samples, H, W, 3].

        Output row r = b * num_samples + k is sample k of label map b, seeded by derive_seed(seed, r) (or by
        seed[r] when a list of seeds is given), so it does not depend on the batch it ran in. `cache_interval`
        k > 1 recomputes the deep U-Net features every k-th step only: faster, at a measured cost in quality
        (docs/evaluation.md). Unset sampling parameters take the model's defaults (config.sampling); `num_steps`
        is the deprecated name of `num_inference_steps`.
        """
        params = self.params(guidance_scale=guidance_scale, sampler=sampler, eta=eta, cache_interval=cache_interval,
                             num_inference_steps=renamed(num_inference_steps, num_steps, "num_steps", "num_inference_steps"))
        _check_count(num_samples)
        label = self.prepare_labels(labels, instances).repeat_interleave(num_samples, dim=0)
        return self.sample_prepared(label, _row_seeds(seed, label.shape[0]), params, progress=progress)

    def edit(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        labels: LabelLike,
        instances: LabelLike | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        sampler: str | None = None,
        seed: int | Sequence[int] = 0,
        num_samples: int = 1,
        eta: float | None = None,
        cache_interval: int | None = None,
        *,
        num_steps: int | None = None,
    ) -> np.ndarray:
        """Semantic image editing (the paper's section 4.4); returns uint8 [num_samples, H, W, 3].

        The region where `mask` is nonzero is generated from the (edited) label map; everywhere else the
        image is kept at every denoising step by replacing it with the forward-noised image (Known).
        Rows are seeded and parameters resolved as in __call__.
        """
        params = self.params(guidance_scale=guidance_scale, sampler=sampler, eta=eta, cache_interval=cache_interval,
                             num_inference_steps=renamed(num_inference_steps, num_steps, "num_steps", "num_inference_steps"))
        _check_count(num_samples)
        label = self.prepare_labels(labels, instances)
        known = known_from_image(image, mask, tuple(label.shape[-2:]))
        known = Known(known.x0.expand(num_samples, -1, -1, -1), known.mask.expand(num_samples, -1, -1, -1))
        return self.sample_prepared(label.expand(num_samples, -1, -1, -1), _row_seeds(seed, num_samples), params, known=known)


def _check_count(num_samples: Any) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise InvalidInputError(f"num_samples must be an integer >= 1, got {num_samples!r}")


def known_from_image(image: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> Known:
    """uint8 [H, W, 3] image and [H, W] mask (nonzero = regenerate) -> Known with x0 in [-1, 1], mask 1 = keep."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInputError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if image.shape[:2] != tuple(size) or mask.shape != tuple(size):
        raise InvalidInputError(
            f"image {image.shape[:2]} and mask {mask.shape} must both match the label map size {tuple(size)}"
        )
    x0 = torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1)[None]
    keep = torch.from_numpy(np.asarray(mask) == 0).float()[None, None]
    return Known(x0, keep)


def _row_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """Per-row seeds: derive_seed(seed, row), or the given list of n seeds."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise InvalidInputError(f"got {len(seed)} seeds for {n} output images")
        return [int(x) for x in seed]
    return sample_seeds(seed, n)

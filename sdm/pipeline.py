"""The object a user calls: label maps in, uint8 images out."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from sdm import checkpoint
from sdm.config import SDMConfig
from sdm.device import autocast_dtype, default_device
from sdm.diffusion import GaussianDiffusion
from sdm.errors import InvalidInputError
from sdm.labels import label_input, raw_to_classes
from sdm.samplers import SAMPLERS, Known, NoiseSource, make_denoiser, sample
from sdm.unet import SDMUNet

LabelLike = Union[np.ndarray, torch.Tensor, Image.Image]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (base seed, key, sample index): stable across runs and machines."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _as_id_array(x: LabelLike, what: str) -> np.ndarray:
    """A label or instance map as an integer array; PIL images must be single-channel id maps."""
    if isinstance(x, Image.Image):
        if x.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise InvalidInputError(
                f"{what} must be a single-channel PNG of ids (mode L, P, I or I;16), got mode {x.mode}"
            )
        x = np.array(x)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise InvalidInputError(f"{what} must be a numpy array, tensor or PIL image, got {type(x).__name__}")
    if x.dtype.kind not in "iu":
        if x.dtype.kind == "f" and np.all(np.mod(x, 1) == 0):
            x = x.astype(np.int64)
        else:
            raise InvalidInputError(f"{what} must hold integer ids, got dtype {x.dtype}")
    return x.astype(np.int64)


def _stack(maps: LabelLike | Sequence[LabelLike], what: str) -> np.ndarray:
    if isinstance(maps, (list, tuple)):
        arrays = [_as_id_array(m, what) for m in maps]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise InvalidInputError(f"{what}s in one call must share a size, got {sorted(shapes)}")
        return np.stack(arrays)
    arr = _as_id_array(maps, what)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InvalidInputError(f"{what} must be [H, W] or [B, H, W], got shape {arr.shape}")
    return arr


class SDMPipeline:
    """An SDM network with its diffusion process and sampling defaults."""

    def __init__(self, net: SDMUNet, config: SDMConfig, device: torch.device | str | None = None, precision: str = "auto"):
        self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        self.net = net.to(self.device).eval()
        self.dtype = autocast_dtype(self.device, precision)
        self.diffusion = GaussianDiffusion.from_config(config.diffusion, learn_sigma=config.model.learn_sigma)

    @classmethod
    def from_pretrained(cls, uri: str, device: torch.device | str | None = None, precision: str = "auto") -> "SDMPipeline":
        """Load an exported model directory, a training run, or a converted official checkpoint."""
        net, config = checkpoint.load_model(uri)
        return cls(net, config, device=device, precision=precision)

    def prepare_labels(
        self, labels: LabelLike | Sequence[LabelLike], instances: LabelLike | Sequence[LabelLike] | None = None
    ) -> torch.Tensor:
        """Raw label (and instance) maps -> validated [B, label_channels, H, W] network input."""
        m, data = self.config.model, self.config.data
        raw = _stack(labels, "label map")
        classes = raw_to_classes(raw, data, m.num_classes)
        h, w = raw.shape[-2:]
        f = m.downsample_factor
        if h % f or w % f:
            raise InvalidInputError(f"label map size {h}x{w} is not divisible by the network's down-sampling factor {f}")
        inst = None
        if instances is not None:
            inst_arr = _stack(instances, "instance map")
            if inst_arr.shape != raw.shape:
                raise InvalidInputError(f"instance maps {inst_arr.shape} do not match label maps {raw.shape}")
            inst = torch.from_numpy(inst_arr)
        return label_input(torch.from_numpy(classes), m, inst, data.edges_from_labels)

    def _check_params(self, guidance_scale: float, num_steps: int, sampler: str, num_samples: int, eta: float) -> None:
        if not isinstance(guidance_scale, (int, float)) or math.isnan(guidance_scale) or guidance_scale < 0:
            raise InvalidInputError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
        if not isinstance(num_steps, int) or not 1 <= num_steps <= self.diffusion.num_timesteps:
            raise InvalidInputError(f"num_steps must be an integer in [1, {self.diffusion.num_timesteps}], got {num_steps!r}")
        if sampler not in SAMPLERS:
            raise InvalidInputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise InvalidInputError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if math.isnan(eta) or eta < 0:
            raise InvalidInputError(f"eta must be >= 0, got {eta!r}")

    def _defaults(
        self, guidance_scale: float | None, num_steps: int | None, sampler: str | None, eta: float | None, num_samples: int
    ) -> tuple[float, int, str, float]:
        """Fill unset sampling settings from the config's defaults and validate them all."""
        s = self.config.sampling
        guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
        num_steps = s.steps if num_steps is None else num_steps
        sampler = s.sampler if sampler is None else sampler
        eta = s.eta if eta is None else eta
        self._check_params(guidance_scale, num_steps, sampler, num_samples, eta)
        return guidance_scale, num_steps, sampler, eta

    @torch.no_grad()
    def sample_tensor(
        self,
        label: torch.Tensor,
        seeds: Sequence[int],
        guidance_scale: float | Sequence[float],
        num_steps: int,
        sampler: str,
        eta: float = 0.0,
        known: Known | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """One batched sampling run over prepared label inputs; returns [B, 3, H, W] in [-1, 1].

        `guidance_scale` is one scale for all rows or one per row.
        """
        label = label.to(self.device)
        noise = NoiseSource(list(seeds), (3, *label.shape[-2:]), self.device)
        scales = [float(guidance_scale)] if isinstance(guidance_scale, (int, float)) else [float(g) for g in guidance_scale]
        scale = scales[0] if len(set(scales)) == 1 else torch.tensor(scales, device=self.device)
        if known is not None:
            known = Known(known.x0.to(self.device), known.mask.to(self.device))
        return sample(
            lambda d: make_denoiser(self.net, d, label, scale, self.dtype),
            self.diffusion,
            sampler,
            num_steps,
            noise,
            eta=eta,
            known=known,
            progress=progress,
        )

    def __call__(
        self,
        labels: LabelLike | Sequence[LabelLike],
        instances: LabelLike | Sequence[LabelLike] | None = None,
        guidance_scale: float | None = None,
        num_steps: int | None = None,
        sampler: str | None = None,
        seed: int | Sequence[int] = 0,
        num_samples: int = 1,
        eta: float | None = None,
        batch_size: int = 16,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Sample `num_samples` images per label map; returns uint8 [B * num_samples, H, W, 3].

        Output row b * num_samples + k is sample k of label map b, seeded by derive_seed(seed, row)
        (or by seed[row] when a list of seeds is given), so it does not depend on the batch it ran in.
        """
        guidance_scale, num_steps, sampler, eta = self._defaults(guidance_scale, num_steps, sampler, eta, num_samples)
        label = self.prepare_labels(labels, instances).repeat_interleave(num_samples, dim=0)
        seeds = _row_seeds(seed, label.shape[0])
        n = label.shape[0]
        chunks = []
        for start in range(0, n, batch_size):
            x = self.sample_tensor(
                label[start : start + batch_size], seeds[start : start + batch_size], guidance_scale, num_steps, sampler, eta,
                progress=progress,
            )
            chunks.append(to_uint8(x))
        return np.concatenate(chunks)

    def edit(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        labels: LabelLike,
        instances: LabelLike | None = None,
        guidance_scale: float | None = None,
        num_steps: int | None = None,
        sampler: str | None = None,
        seed: int | Sequence[int] = 0,
        num_samples: int = 1,
        eta: float | None = None,
    ) -> np.ndarray:
        """Semantic image editing (the paper's section 4.4); returns uint8 [num_samples, H, W, 3].

        The region where `mask` is nonzero is generated from the (edited) label map; everywhere else the
        image is kept at every denoising step by replacing it with the forward-noised image (Known).
        Rows are seeded as in __call__.
        """
        guidance_scale, num_steps, sampler, eta = self._defaults(guidance_scale, num_steps, sampler, eta, num_samples)
        label = self.prepare_labels(labels, instances)
        known = known_from_image(image, mask, tuple(label.shape[-2:]))
        seeds = _row_seeds(seed, num_samples)
        known = Known(known.x0.expand(num_samples, -1, -1, -1), known.mask.expand(num_samples, -1, -1, -1))
        x = self.sample_tensor(
            label.expand(num_samples, -1, -1, -1), seeds, guidance_scale, num_steps, sampler, eta, known=known
        )
        return to_uint8(x)


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
    return [derive_seed(seed, i) for i in range(n)]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

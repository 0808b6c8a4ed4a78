"""Segmenters for mIoU: the built-in small conv net (trained on a dataset in the shard format, for datasets
with no off-the-shelf segmenter, such as the toy one), a TorchScript file, or an importable callable.

Every segmenter maps uint8 [N, H, W, 3] images to the dataset's label ids [N, H, W]. A TorchScript module or
callable receives float32 [N, 3, H, W] in [0, 1] and returns logits [N, C, h, w] or ids [N, h, w]
(resized to H x W when they differ).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from sdm import storage
from sdm.data.card import CARD_FILE, read_card
from sdm.data.preprocess import resize_sample
from sdm.data.shards import iter_samples
from sdm.errors import CheckpointError, InvalidInputError
from sdm.metrics.miou import ConfusionMatrix
from sdm.tracking import RunLogger

SEGMENTER_CONFIG = "segmenter.json"
SEGMENTER_WEIGHTS = "segmenter.safetensors"
SEGMENTER_LOG_EVERY = 10  # steps between logged scalars


@dataclass
class SegmenterConfig:
    num_classes: int
    image_size: tuple[int, int]  # (height, width) it runs at
    width: int = 32
    class_names: list[str] = field(default_factory=list)
    trained_on: dict = field(default_factory=dict)  # dataset, card checksum, split, steps, seed, ...


class TinySegNet(nn.Module):
    """Full-resolution stem, a half-resolution dilated context trunk, a skip back up. The pooled trunk
    features double as a feature space for Frechet distances where Inception weights are absent."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int, **kw: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=kw.get("dilation", 1), **kw), nn.GroupNorm(8, cout), nn.ReLU())

        self.stem = nn.Sequential(block(3, width), block(width, width))
        self.trunk = nn.Sequential(block(width, 2 * width, stride=2), block(2 * width, 2 * width, dilation=2), block(2 * width, 2 * width, dilation=4))
        self.fuse = block(3 * width, width)
        self.head = nn.Conv2d(width, num_classes, 1)
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.stem((x - self.mean) / 0.25)
        t = self.trunk(s)
        up = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.fuse(torch.cat([s, up], 1))), t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x in [0, 1], [N, 3, H, W] -> logits [N, C, H, W]."""
        return self._forward(x)[0]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 2 * width] trunk features, averaged over space."""
        return self._forward(x)[1].mean((2, 3))


def _to_input(images: np.ndarray, size: tuple[int, int] | None = None) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x


def _ids_from_output(out: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    if out.dim() == 4:
        if tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out.float(), size=size, mode="bilinear", align_corners=False)
        return out.argmax(1).cpu().numpy()
    if out.dim() == 3:
        if tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out[:, None].float(), size=size, mode="nearest")[:, 0]
        return out.long().cpu().numpy()
    raise InvalidInputError(f"a segmenter must return logits [N, C, H, W] or ids [N, H, W], got shape {tuple(out.shape)}")


class Segmenter:
    """A segmentation function with a name; `features` is set where it has a feature space (the built-in one).
    `cache_id` identifies its weights where they can be hashed; results of an imported callable are never cached."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str, input_size: tuple[int, int] | None = None,
                 features: "SegmenterFeatures | None" = None, cache_id: str | None = None):
        self.fn, self.name, self.input_size, self.features, self.cache_id = fn, name, input_size, features, cache_id

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        out = [_ids_from_output(self.fn(_to_input(images[i : i + batch_size], self.input_size)), images.shape[1:3])
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out)


class SegmenterFeatures:
    """The built-in segmenter's pooled trunk features, as an extractor for Frechet distances."""

    def __init__(self, net: TinySegNet, config: SegmenterConfig, weights_id: str):
        self.net, self.config = net, config
        self.dims = net.head.in_channels * 2
        self.feature_id = f"sdm-segnet-{weights_id}"
        self.metric_name = "Frechet distance in the built-in segmenter's features"

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.net.embed(_to_input(images, self.config.image_size)).double().numpy()


def save_segmenter(uri: str, net: TinySegNet, config: SegmenterConfig) -> None:
    """Weights, then the config last: a directory with a config is complete."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    storage.write_bytes(storage.join(uri, SEGMENTER_WEIGHTS), save_safetensors(tensors))
    body = {**asdict(config), "image_size": list(config.image_size)}
    storage.write_bytes(storage.join(uri, SEGMENTER_CONFIG), json.dumps(body, indent=1).encode())


def load_builtin(uri: str) -> Segmenter:
    try:
        d = json.loads(storage.read_bytes(storage.join(uri, SEGMENTER_CONFIG)))
        config = SegmenterConfig(**{**d, "image_size": tuple(d["image_size"])})
        weights = storage.read_bytes(storage.join(uri, SEGMENTER_WEIGHTS))
        net = TinySegNet(config.num_classes, config.width)
        net.load_state_dict(load_safetensors(weights))
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{uri} is not a readable built-in segmenter: {e}") from None
    net.eval()
    weights_id = hashlib.sha256(weights).hexdigest()[:16]
    return Segmenter(net, f"built-in segmenter {weights_id}", config.image_size, SegmenterFeatures(net, config, weights_id),
                     cache_id=f"builtin-{weights_id}")


def is_builtin(uri: str) -> bool:
    return storage.exists(storage.join(uri, SEGMENTER_CONFIG))


def load_segmenter(spec: str) -> Segmenter:
    """A built-in segmenter directory (local or s3://), a TorchScript file, or `package.module:callable`."""
    if is_builtin(spec):
        return load_builtin(spec)
    if not storage.is_s3(spec) and storage.exists(spec):
        data = storage.read_bytes(spec)
        try:
            module = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
        except RuntimeError as e:
            raise InvalidInputError(f"segmenter {spec} is not a TorchScript file: {e}") from None
        return Segmenter(module, f"TorchScript {spec}", cache_id=f"torchscript-{hashlib.sha256(data).hexdigest()[:16]}")
    mod_name, _, attr = spec.partition(":")
    if not attr:
        raise InvalidInputError(
            f"segmenter {spec!r} is neither a built-in segmenter directory ({SEGMENTER_CONFIG}), a TorchScript file, "
            "nor module:callable"
        )
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise InvalidInputError(f"segmenter {spec!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise InvalidInputError(f"segmenter {spec!r} is not callable")
    return Segmenter(fn, spec)


def segment_scores(segmenter: Segmenter, images: np.ndarray, labels: np.ndarray, num_classes: int,
                   ignore_index: int | None = None) -> ConfusionMatrix:
    """Confusion of the segmenter's predictions on images against the label maps they should show."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    for i in range(0, len(images), 64):
        cm.update(segmenter.predict(images[i : i + 64]), labels[i : i + 64])
    return cm


def _load_split(uri: str, split: str, size: tuple[int, int], limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    samples = [resize_sample(s, size) for s in islice(iter_samples(uri, split=split), limit)]
    if not samples:
        raise InvalidInputError(f"dataset {uri} has no samples in split {split!r} to train a segmenter on")
    return np.stack([s["image"] for s in samples]), np.stack([s["label"] for s in samples])


def train_segmenter(data_uri: str, out_uri: str, steps: int = 400, batch_size: int = 32, width: int = 32, lr: float = 3e-3,
                    seed: int = 0, split: str = "train", max_samples: int | None = 4096,
                    log: Callable[[str], None] = print) -> Segmenter:
    """Train the built-in segmenter on a split of a shard dataset (flip augmentation, cross-entropy over the
    dataset's class ids; other ids ignored), save it to out_uri, and return it loaded. Its loss and learning rate
    are logged as a training run's are (sdm.tracking): TensorBoard under out_uri/tensorboard, MLflow when set."""
    card = read_card(data_uri)
    h, w = card_size(data_uri)
    images, labels = _load_split(data_uri, split, (h, w), max_samples)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = TinySegNet(card.num_classes, width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    x_all, y_all = _to_input(images), torch.from_numpy(labels).long()
    y_all[(y_all < 0) | (y_all >= card.num_classes)] = -100
    start = time.perf_counter()
    tracker = RunLogger(out_uri, params={"kind": "segmenter", "data": data_uri, "steps": steps, "batch_size": batch_size,
                                         "lr": lr, "width": width, "seed": seed, "split": split})
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.integers(0, len(x_all), batch_size))
        x, y = x_all[idx], y_all[idx]
        flip = torch.from_numpy(rng.random(batch_size) < 0.5)
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        loss = F.cross_entropy(net(x), y, ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % SEGMENTER_LOG_EVERY == 0 or step == steps:
            tracker.scalars(step, {"segmenter/loss": loss.item(), "segmenter/lr": sched.get_last_lr()[0]})
        sched.step()
        if step % 100 == 0 or step == steps:
            log(f"segmenter step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    card_sha = hashlib.sha256(storage.read_bytes(storage.join(data_uri, CARD_FILE))).hexdigest()
    config = SegmenterConfig(card.num_classes, (h, w), width, list(card.class_names), {
        "dataset": data_uri, "card_sha256": card_sha, "split": split, "samples": len(images), "steps": steps,
        "batch_size": batch_size, "lr": lr, "seed": seed})
    tracker.close()
    save_segmenter(out_uri, net.eval(), config)
    return load_builtin(out_uri)


def card_size(data_uri: str) -> tuple[int, int]:
    """(height, width) of a dataset's first sample: the built-in segmenter runs at the dataset's size."""
    first = next(iter_samples(data_uri), None)
    if first is None:
        raise InvalidInputError(f"dataset {data_uri} is empty")
    return first["label"].shape

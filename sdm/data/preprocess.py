"""Preprocessing written once: resize, the paper's training augmentations, mapping to [-1, 1].

Images are resized bicubic, label and instance maps nearest. Labels stay raw dataset ids here; the
model's class ids come from sdm.labels (remap, one-hot, instance edges) on the batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from sdm.config import DataConfig, ModelConfig
from sdm.errors import InvalidInputError

MAX_ASPECT_CHANGE = 0.05  # a map this close to the model's aspect ratio is resized; a farther one is refused


def _resize_ids(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an id map to size = (height, width), exact for any id range."""
    h, w = arr.shape
    if (h, w) == tuple(size):
        return arr
    rows = (np.arange(size[0]) * h // size[0]).clip(0, h - 1)
    cols = (np.arange(size[1]) * w // size[1]).clip(0, w - 1)
    return arr[rows[:, None], cols[None, :]]


def _resize_image(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of an HxWx3 image to size = (height, width)."""
    if arr.shape[:2] == tuple(size):
        return arr
    return np.array(Image.fromarray(arr).resize((size[1], size[0]), resample=Image.BICUBIC))


def fit_to_model(arr: np.ndarray, size: tuple[int, int], what: str, max_aspect_change: float = MAX_ASPECT_CHANGE) -> np.ndarray:
    """The one resize policy of inputs given to a model of size (height, width): id maps (2-D) nearest, images
    (H x W x 3) bicubic, refused with InvalidInputError when the aspect ratio would change more than allowed."""
    h, w = arr.shape[:2]
    th, tw = size
    change = abs((w / h) / (tw / th) - 1)
    if change > max_aspect_change:
        raise InvalidInputError(
            f"{what} is {w}x{h} but the model takes {tw}x{th}: resizing would change the aspect ratio by "
            f"{change:.0%} (limit {max_aspect_change:.0%}); crop it first"
        )
    return _resize_image(arr, size) if arr.ndim == 3 else _resize_ids(arr, size)


def resize_sample(sample: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """Resize image (when present), label and instance map to size = (height, width), the order of every size in
    this project (ModelConfig.image_size, evaluation sizes); only PIL's own calls take (width, height)."""
    out = dict(sample)
    if sample.get("image") is not None:
        out["image"] = _resize_image(sample["image"], size)
    out["label"] = _resize_ids(sample["label"], size)
    if sample.get("instance") is not None:
        out["instance"] = _resize_ids(sample["instance"], size)
    return out


def _crop(sample: dict[str, Any], top: int, left: int, h: int, w: int) -> dict[str, Any]:
    out = dict(sample)
    for k in ("image", "label", "instance"):
        if sample.get(k) is not None:
            out[k] = sample[k][top : top + h, left : left + w]
    return out


def _flip(sample: dict[str, Any]) -> dict[str, Any]:
    out = dict(sample)
    for k in ("image", "label", "instance"):
        if sample.get(k) is not None:
            out[k] = np.ascontiguousarray(sample[k][:, ::-1])
    return out


def to_model_image(image: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW in [-1, 1]."""
    return (image.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


def _finish(sample: dict[str, Any]) -> dict[str, Any]:
    out = dict(sample)
    if sample.get("image") is not None:
        out["image"] = to_model_image(sample["image"])
    return out


def preprocess_train(sample: dict[str, Any], model: ModelConfig, data: DataConfig, rng: np.random.Generator) -> dict[str, Any]:
    """Training view: resize (short side, then a random crop, when data.random_crop), random flip."""
    th, tw = model.image_size
    if data.random_crop:
        h, w = sample["label"].shape
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        sample = resize_sample(sample, (nh, nw))
        sample = _crop(sample, int(rng.integers(0, nh - th + 1)), int(rng.integers(0, nw - tw + 1)), th, tw)
    else:
        sample = resize_sample(sample, (th, tw))
    if data.random_flip and rng.random() < 0.5:
        sample = _flip(sample)
    return _finish(sample)


def preprocess_eval(sample: dict[str, Any], model: ModelConfig) -> dict[str, Any]:
    """Evaluation/generation view: resized to the model's size, no augmentation; a label-only sample
    (image None, as in generation from label maps) is fine."""
    th, tw = model.image_size
    return _finish(resize_sample(sample, (th, tw)))

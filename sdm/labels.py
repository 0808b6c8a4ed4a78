"""Label maps to network input: palette colours, class-id remapping, validation, one-hot, instance edges,
the null label.

Written once: `LabelEncoder` is the one road from raw label ids to the network's label input, and the pipeline,
training, the generation job and Serve all take it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from PIL import Image

from sdm.config import DataConfig, ModelConfig, SDMConfig
from sdm.data.preprocess import fit_to_model
from sdm.errors import InvalidInputError
from sdm.imageio import ID_MODES

LabelLike = Union[np.ndarray, torch.Tensor, Image.Image]


def remap_raw_labels(raw: np.ndarray, data: DataConfig, num_classes: int) -> np.ndarray:
    """Map a dataset's raw label ids to model class ids (see DataConfig)."""
    out = raw.astype(np.int64)
    unlabeled = data.unlabeled_id is not None and data.unlabeled_class is not None
    mask = out == data.unlabeled_id if unlabeled else None
    if data.label_offset:
        out = out - data.label_offset
        out = np.where(out < 0, out + num_classes, out)
    if mask is not None:
        out[mask] = data.unlabeled_class
    return out


def raw_to_classes(raw: np.ndarray, data: DataConfig, num_classes: int, what: str = "label map") -> np.ndarray:
    """Remap raw label ids to model classes; raise InvalidInputError listing the raw ids the model does not know."""
    classes = remap_raw_labels(raw, data, num_classes)
    bad = np.unique(raw[(classes < 0) | (classes >= num_classes)])
    if bad.size:
        shown = ", ".join(str(int(b)) for b in bad[:20]) + (" ..." if bad.size > 20 else "")
        raise InvalidInputError(f"{what} has class ids this model does not know ({num_classes} classes): {shown}")
    return classes


def default_classes(n: int) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Names and palette of n classes that nothing names: class_0, class_1, ... in the default palette's colours."""
    return [f"class_{i}" for i in range(n)], default_palette(n)


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct colours (the PASCAL VOC bit-interleaved colour map; id 0 is black)."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


def colors_to_ids(rgb: np.ndarray, palette: list[tuple[int, int, int]]) -> np.ndarray:
    """[H, W, 3] uint8 colours -> [H, W] label ids by exact palette match; InvalidInputError lists unknown colours."""
    keys = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2].astype(np.int64)
    lookup: dict[int, int] = {}
    for i, (r, g, b) in enumerate(palette):
        lookup.setdefault((r << 16) | (g << 8) | b, i)
    uniq, inverse = np.unique(keys, return_inverse=True)
    ids = np.array([lookup.get(int(k), -1) for k in uniq], dtype=np.int64)
    if (ids < 0).any():
        bad = [f"#{int(k):06x}" for k in uniq[ids < 0]]
        shown = ", ".join(bad[:10]) + (f" ... ({len(bad)} in all)" if len(bad) > 10 else "")
        raise InvalidInputError(f"label map has colours that are not in the model's palette: {shown}")
    return ids[inverse].reshape(keys.shape)


def instance_edges(instance: torch.Tensor) -> torch.Tensor:
    """1.0 where a pixel's instance id differs from one of its 4 neighbours, for [..., H, W] ids."""
    edge = torch.zeros(instance.shape, dtype=torch.bool, device=instance.device)
    dx = instance[..., :, 1:] != instance[..., :, :-1]
    dy = instance[..., 1:, :] != instance[..., :-1, :]
    edge[..., :, 1:] |= dx
    edge[..., :, :-1] |= dx
    edge[..., 1:, :] |= dy
    edge[..., :-1, :] |= dy
    return edge.float()


def label_input(
    label: torch.Tensor,
    model: ModelConfig,
    instance: torch.Tensor | None = None,
    edges_from_labels: bool = False,
) -> torch.Tensor:
    """[B, H, W] class ids (+ optional [B, H, W] instance ids) -> [B, label_channels, H, W] float input.

    The ids are the model's, already checked (LabelEncoder.check). One-hot of num_classes, then the instance-edge
    channel when the model has one. Without an instance map, the edge channel is computed from the label map when
    `edges_from_labels` (as the released CelebAMask-HQ model was trained), else left at zero.
    """
    onehot = torch.nn.functional.one_hot(label.long(), model.num_classes).permute(0, 3, 1, 2).float()
    if not model.instance_edges:
        return onehot
    if instance is None and edges_from_labels:
        instance = label
    if instance is None:
        edges = torch.zeros_like(onehot[:, :1])
    else:
        edges = instance_edges(instance)[:, None]
    return torch.cat([onehot, edges], dim=1)


def null_label(like: torch.Tensor) -> torch.Tensor:
    """The null label of classifier-free guidance: all zeros, the shape of a label input."""
    return torch.zeros_like(like)


def as_id_array(x: LabelLike, what: str) -> np.ndarray:
    """A label or instance map as an int64 array; PIL images must be single-channel id maps."""
    if isinstance(x, Image.Image):
        if x.mode not in ID_MODES:
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
    """One map [H, W], a batch [B, H, W], or a list of same-sized maps -> int64 [B, H, W]."""
    if isinstance(maps, (list, tuple)):
        arrays = [as_id_array(m, what) for m in maps]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise InvalidInputError(f"{what}s in one call must share a size, got {sorted(shapes)}")
        return np.stack(arrays)
    arr = as_id_array(maps, what)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InvalidInputError(f"{what} must be [H, W] or [B, H, W], got shape {arr.shape}")
    return arr


@dataclass(frozen=True)
class LabelMaps:
    """Label maps checked against one model (made by LabelEncoder.check): the raw ids, the model's class ids and
    the instance ids (or None), int64 [B, H, W] each, at a size the network takes."""

    raw: np.ndarray
    classes: np.ndarray
    instances: np.ndarray | None


class LabelEncoder:
    """Raw label ids (+ instance ids) -> the network's label input for one model, each fact checked once: integer
    ids, one map or a batch, instance maps of the label maps' shape, class ids the model knows (raw ids remapped by
    DataConfig), a size the network's down-sampling divides; then one-hot and instance edges."""

    def __init__(self, config: SDMConfig):
        self.model, self.data = config.model, config.data

    def check(self, labels: LabelLike | Sequence[LabelLike], instances: LabelLike | Sequence[LabelLike] | None = None,
              name: str | None = None, max_aspect_change: float | None = None) -> LabelMaps:
        """Validate maps, raising InvalidInputError that names the bad thing (and the item `name`, when given).
        With `max_aspect_change`, maps of another size are checked as they are, then brought to the model's size
        by the one resize policy (sdm.data.preprocess.fit_to_model)."""
        what, inst_what = ("label map", "instance map") if name is None else (f"label map {name!r}", f"instance map {name!r}")
        raw = _stack(labels, what)
        inst = None if instances is None else _stack(instances, inst_what)
        if inst is not None and inst.shape != raw.shape:
            where = "" if name is None else f"{what}: "
            raise InvalidInputError(f"{where}instance maps {inst.shape} do not match label maps {raw.shape}")
        classes = raw_to_classes(raw, self.data, self.model.num_classes, what)
        if max_aspect_change is not None:
            size = self.model.image_size
            raw = np.stack([fit_to_model(r, size, what, max_aspect_change) for r in raw])
            classes = remap_raw_labels(raw, self.data, self.model.num_classes)  # nearest: only ids checked above
            if inst is not None:
                inst = np.stack([fit_to_model(i, size, inst_what, max_aspect_change) for i in inst])
        h, w = raw.shape[-2:]
        f = self.model.downsample_factor
        if h % f or w % f:
            raise InvalidInputError(f"{what} size {h}x{w} is not divisible by the network's down-sampling factor {f}")
        return LabelMaps(raw, classes, inst)

    def encode(self, maps: LabelMaps, device: torch.device | str | None = None) -> torch.Tensor:
        """Checked maps -> [B, label_channels, H, W] float input on `device` (one-hot made there)."""
        label = torch.from_numpy(maps.classes).to(device)
        inst = None if maps.instances is None else torch.from_numpy(maps.instances).to(device)
        return label_input(label, self.model, inst, self.data.edges_from_labels)

    def __call__(self, labels: LabelLike | Sequence[LabelLike], instances: LabelLike | Sequence[LabelLike] | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """Raw maps at a size the network takes -> its label input: `encode(check(labels, instances))`."""
        return self.encode(self.check(labels, instances), device)

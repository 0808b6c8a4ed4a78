"""Label maps to network input: palette colours, class-id remapping, validation, one-hot, instance edges,
the null label.

Written once; training, generation, serving and evaluation all call these.
"""

from __future__ import annotations

import numpy as np
import torch

from sdm.config import DataConfig, ModelConfig, SDMConfig
from sdm.errors import InvalidInputError


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


def raw_to_classes(raw: np.ndarray, data: DataConfig, num_classes: int) -> np.ndarray:
    """Remap raw label ids to model classes; raise InvalidInputError listing the raw ids the model does not know."""
    classes = remap_raw_labels(raw, data, num_classes)
    bad = np.unique(raw[(classes < 0) | (classes >= num_classes)])
    if bad.size:
        shown = ", ".join(str(int(b)) for b in bad[:20]) + (" ..." if bad.size > 20 else "")
        raise InvalidInputError(f"label map has class ids this model does not know ({num_classes} classes): {shown}")
    return classes


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


def check_class_ids(label: np.ndarray | torch.Tensor, num_classes: int, what: str = "label map") -> None:
    """Raise InvalidInputError listing every class id outside [0, num_classes)."""
    ids = torch.as_tensor(label).unique()
    bad = ids[(ids < 0) | (ids >= num_classes)].tolist()
    if bad:
        shown = ", ".join(str(int(b)) for b in bad[:20]) + (" ..." if len(bad) > 20 else "")
        raise InvalidInputError(f"{what} has class ids outside [0, {num_classes}): {shown}")


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

    One-hot of num_classes, then the instance-edge channel when the model has one. Without an instance
    map, the edge channel is computed from the label map when `edges_from_labels` (as the released
    CelebAMask-HQ model was trained), else left at zero.
    """
    if label.dim() != 3:
        raise InvalidInputError(f"label batch must be [B, H, W], got shape {tuple(label.shape)}")
    check_class_ids(label, model.num_classes)
    onehot = torch.nn.functional.one_hot(label.long(), model.num_classes).permute(0, 3, 1, 2).float()
    if not model.instance_edges:
        return onehot
    if instance is None and edges_from_labels:
        instance = label
    if instance is None:
        edges = torch.zeros_like(onehot[:, :1])
    else:
        if instance.shape != label.shape:
            raise InvalidInputError(
                f"instance map shape {tuple(instance.shape)} does not match label map shape {tuple(label.shape)}"
            )
        edges = instance_edges(instance)[:, None]
    return torch.cat([onehot, edges], dim=1)


def null_label(like: torch.Tensor) -> torch.Tensor:
    """The null label of classifier-free guidance: all zeros, the shape of a label input."""
    return torch.zeros_like(like)


def encode_raw_labels(raw: torch.Tensor, instance: torch.Tensor | None, config: SDMConfig) -> torch.Tensor:
    """Raw dataset label ids [B, H, W] (+ instance ids) -> the network's label input, for a whole batch."""
    classes = raw_to_classes(raw.cpu().numpy(), config.data, config.model.num_classes)
    label = torch.from_numpy(classes).to(raw.device)
    return label_input(label, config.model, instance, config.data.edges_from_labels)

"""New label-map layouts made from existing ones, so that a small labelled set can grow before bulk generation.

A new layout is the own map flipped (p=0.5) and cropped (60-100% of each side, resized back nearest), then, with a
partner map, the partner's pixels pasted in unchanged at their own positions: a CutMix-like rectangle or whole
objects (one or two classes other than the partner's largest, which is mostly background). Ids are never invented:
every label id comes from one of the two maps, and pasted instance ids are offset past the own ones so that
objects keep their boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sdm.data.preprocess import resize_sample
from sdm.seeds import derive_seed

_MAX_INSTANCE_ID = 65535  # instance maps are stored as 16-bit PNGs


def layout_key(key: str, j: int) -> str:
    """Key of new layout j (1-based) made from label map `key`."""
    return f"{key}-layout{j}"


def partner_key(keys: Sequence[str], key: str, j: int, seed: int) -> str | None:
    """The map whose regions new layout j of `key` mixes in, chosen by seed among the other keys; None when there
    is none. Sorted and deduplicated so that the choice does not depend on how the keys were listed."""
    others = sorted(set(keys) - {key})
    if not others:
        return None
    return others[derive_seed(seed, key, j, "partner") % len(others)]


def _paste_mask(p_label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Where the partner's pixels go: a rectangle of 25-50% of the area, or one or two of its classes other than
    the largest. A partner of a single class has no objects to take, so it gives a rectangle."""
    h, w = p_label.shape
    ids, counts = np.unique(p_label, return_counts=True)
    objects = np.delete(ids, np.argmax(counts))
    if objects.size and rng.random() < 0.5:
        chosen = rng.choice(objects, size=min(objects.size, int(rng.integers(1, 3))), replace=False)
        return np.isin(p_label, chosen)
    side = np.sqrt(rng.uniform(0.25, 0.5))  # same aspect as the map, like CutMix
    rh, rw = max(1, round(h * side)), max(1, round(w * side))
    top, left = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
    mask = np.zeros((h, w), dtype=bool)
    mask[top : top + rh, left : left + rw] = True
    return mask


def new_layout(label: np.ndarray, instance: np.ndarray | None, partner: tuple[np.ndarray, np.ndarray | None] | None,
               seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A new label map (and instance map, None when `instance` is None) from `label`, deterministic in seed: a
    horizontal flip (p=0.5), a crop of 60-100% of each side resized back nearest, and the partner's regions
    pasted when a partner (label, instance or None) of the same size is given."""
    h, w = label.shape
    if partner is not None and partner[0].shape != label.shape:
        raise ValueError(f"partner label map is {partner[0].shape[1]}x{partner[0].shape[0]} but the label map is "
                         f"{w}x{h}: resize the partner first")
    rng = np.random.default_rng(seed)
    if rng.random() < 0.5:
        label = label[:, ::-1]
        instance = None if instance is None else instance[:, ::-1]
    scale = rng.uniform(0.6, 1.0)
    ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = {"label": label[top : top + ch, left : left + cw],
            "instance": None if instance is None else instance[top : top + ch, left : left + cw]}
    out = resize_sample(crop, (h, w))
    label = np.array(out["label"], dtype=np.int64)  # a copy: never a view of the caller's array
    instance = None if instance is None else np.array(out["instance"], dtype=np.int64)
    if partner is None:
        return label, instance
    p_label, p_instance = partner
    mask = _paste_mask(p_label, rng)
    label[mask] = p_label[mask]
    if instance is not None:
        # a partner without instance ids pastes one object per class
        pasted = (p_label if p_instance is None else p_instance)[mask].astype(np.int64)
        instance[mask] = pasted - pasted.min() + instance[~mask].max(initial=-1) + 1
        if instance.max() > _MAX_INSTANCE_ID:
            instance = np.unique(instance, return_inverse=True)[1].reshape(h, w).astype(np.int64)
    return label, instance

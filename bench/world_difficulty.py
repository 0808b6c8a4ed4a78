"""How hard a world is, measured on its real images alone, before any model is compared on it.

    python bench/world_difficulty.py                     # scenes (2048 samples) beside toy (512): about 8 minutes
    python bench/world_difficulty.py --quick             # a smoke run; its numbers mean nothing

Three figures per world, each with the criterion the benchmark world must meet (DESIGN.md, "Worlds to measure in"):
  - colour lookup: every pixel gets the class whose mean training colour is nearest (fitted on every training
    pixel): at most 0.5 mIoU on validation, or colour alone decides the world and no model comparison means much;
  - the built-in segmenter trained on all real training images: at least 0.8 mIoU (the world is learnable, so the
    mIoU of generated images measures something);
  - the same segmenter trained on the first 8 training images only, over 3 seeds: at most 0.65 (room for synthetic
    data to help), with the seed range.
The all-real segmenter is kept under --out: bench/world_benchmark.py scores generated images with it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from sdm import storage
from sdm.data.card import CARD_FILE, read_card
from sdm.data.procedural import World, write_world
from sdm.data.scenes import SCENES
from sdm.data.shards import iter_samples
from sdm.data.toy import TOY
from sdm.metrics.miou import ConfusionMatrix
from sdm.metrics.segmenter import is_builtin, load_builtin, segment_scores, train_segmenter

CRITERIA = {"colour lookup": ("<=", 0.5), "segmenter, all real": (">=", 0.8), "segmenter, 8 real": ("<=", 0.65)}


def colour_lookup(train_images: np.ndarray, train_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per class, the mean RGB of its training pixels ([C, 3]; a class never seen gets no colour: +inf)."""
    pixels, ids = train_images.reshape(-1, 3).astype(np.float64), train_labels.reshape(-1)
    sums = np.zeros((num_classes, 3))
    np.add.at(sums, ids, pixels)
    counts = np.bincount(ids, minlength=num_classes)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.inf)


def colour_lookup_predict(means: np.ndarray, images: np.ndarray) -> np.ndarray:
    """The class of the nearest mean colour, per pixel: [N, H, W, 3] -> [N, H, W]."""
    x = images.astype(np.float64)[..., None, :]
    return ((x - means) ** 2).sum(-1).argmin(-1)


def colour_lookup_scores(train_images: np.ndarray, train_labels: np.ndarray, val_images: np.ndarray,
                         val_labels: np.ndarray, num_classes: int) -> ConfusionMatrix:
    means = colour_lookup(train_images, train_labels, num_classes)
    return ConfusionMatrix(num_classes).update(colour_lookup_predict(means, val_images), val_labels)


@dataclass
class Difficulty:
    world: str
    images: dict[str, int]
    colour_miou: float
    colour_pixel_accuracy: float
    segmenter_miou: float | None = None
    segmenter_per_class: list[float] = field(default_factory=list)
    few_mious: list[float] = field(default_factory=list)

    def rows(self) -> dict[str, float | None]:
        few = float(np.mean(self.few_mious)) if self.few_mious else None
        return {"colour lookup": self.colour_miou, "segmenter, all real": self.segmenter_miou, "segmenter, 8 real": few}

    def passes(self) -> dict[str, bool | None]:
        out = {}
        for name, value in self.rows().items():
            op, bound = CRITERIA[name]
            out[name] = None if value is None else (value <= bound if op == "<=" else value >= bound)
        return out


def split_arrays(data: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    samples = list(iter_samples(data, split=split))
    return np.stack([s["image"] for s in samples]), np.stack([s["label"] for s in samples])


def measure(data: str, out: str, segmenter_steps: int, few_steps: int, few_seeds: list[int], few_n: int = 8,
            with_segmenters: bool = True, log=print) -> Difficulty:
    """The three figures of one world's dataset; the all-real segmenter is kept at OUT/segmenter."""
    card = read_card(data)
    tr_x, tr_y = split_arrays(data, "train")
    va_x, va_y = split_arrays(data, "val")
    cm = colour_lookup_scores(tr_x, tr_y, va_x, va_y, card.num_classes)
    d = Difficulty(card.name, {"train": len(tr_x), "val": len(va_x)}, cm.miou(), cm.pixel_accuracy())
    log(f"{card.name}: colour lookup mIoU {d.colour_miou:.4f} (pixel accuracy {d.colour_pixel_accuracy:.4f})")
    if not with_segmenters:
        return d
    seg_uri = storage.join(out, "segmenter")
    start = time.perf_counter()
    seg = load_builtin(seg_uri) if is_builtin(seg_uri) else train_segmenter(data, seg_uri, steps=segmenter_steps, max_samples=None, log=log)
    cm = segment_scores(seg, va_x, va_y, card.num_classes)
    d.segmenter_miou, d.segmenter_per_class = cm.miou(), [float(v) for v in cm.iou()]
    log(f"{card.name}: segmenter on all {len(tr_x)} real images: mIoU {d.segmenter_miou:.4f} ({time.perf_counter() - start:.0f}s)")
    for seed in few_seeds:
        uri = storage.join(out, f"segmenter-first{few_n}-steps{few_steps}-seed{seed}")
        seg = load_builtin(uri) if is_builtin(uri) else train_segmenter(data, uri, steps=few_steps, seed=seed, max_samples=few_n, log=lambda m: None)
        d.few_mious.append(segment_scores(seg, va_x, va_y, card.num_classes).miou())
        log(f"{card.name}: segmenter on the first {few_n} real images, seed {seed}: mIoU {d.few_mious[-1]:.4f}")
    return d


def ensure_world(world: World, uri: str, n: int, seed: int = 0) -> str:
    if not storage.exists(storage.join(uri, CARD_FILE)):
        write_world(world, uri, n=n, seed=seed)
    return uri


def table(results: list[Difficulty]) -> str:
    head = "| world | train / val images | " + " | ".join(f"{k} (target {op} {b})" for k, (op, b) in CRITERIA.items()) + " |"
    lines = [head, "| --- | --- |" + " ---: |" * len(CRITERIA)]
    for d in results:
        cells = []
        for (name, value), ok in zip(d.rows().items(), d.passes().values()):
            if value is None:
                cells.append("-")
                continue
            spread = f" ({min(d.few_mious):.4f}-{max(d.few_mious):.4f})" if name == "segmenter, 8 real" and len(d.few_mious) > 1 else ""
            cells.append(f"{value:.4f}{spread} {'met' if ok else 'MISSED'}")
        lines.append(f"| {d.world} | {d.images['train']} / {d.images['val']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/world_benchmark")
    p.add_argument("--data", help="the scenes dataset (default: OUT/data, written with --samples and seed 0)")
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--segmenter-steps", type=int, default=1500, help="steps of the all-real segmenter (batch 32)")
    p.add_argument("--few-steps", type=int, default=300, help="steps of each 8-image segmenter")
    p.add_argument("--few-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.out = args.out if args.out != "runs/world_benchmark" else "runs/world_benchmark_quick"
        args.samples, args.segmenter_steps, args.few_steps, args.few_seeds = 128, 30, 20, [0, 1]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    scenes = args.data or ensure_world(SCENES, storage.join(args.out, "data"), args.samples)
    toy = ensure_world(TOY, storage.join(args.out, "toy-data"), max(64, args.samples // 4))
    results = [measure(scenes, args.out, args.segmenter_steps, args.few_steps, args.few_seeds),
               measure(toy, storage.join(args.out, "toy"), 0, 0, [], with_segmenters=False)]
    text = table(results)
    per_class = ", ".join(f"{n} {v:.2f}" for n, v in zip(read_card(scenes).class_names, results[0].segmenter_per_class))
    print(f"\n{text}\n\nscenes, all-real segmenter, IoU per class: {per_class}")
    if args.quick:
        print("(--quick: tiny budgets, the numbers mean nothing)")
    storage.write_bytes(storage.join(args.out, "difficulty.json"),
                        json.dumps([{**vars(d), "passes": d.passes()} for d in results], indent=1).encode())
    print(f"wrote {storage.join(args.out, 'difficulty.json')} in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training steps per precision: fp32, bf16 autocast, fp16 autocast with a grad scaler.

Each precision trains a fresh copy of the same network (same seed) on the same fixed batches for the same
steps, side by side in one run on one device. Printed: images/s after a warm-up, the loss at the start and
at the end (the batches are few, so a working step drives it down), and the steps skipped as non-finite.
Next to images/s: the achieved model GFLOP/s (FLOPs per image x images/s) and its share of the matmul peak
measured in the same run on the same device in that row's compute dtype (fp32, bf16, fp16). The FLOPs are
counted (bench/flops.py: FlopCounterMode) on each precision's first warm-up step, a real train_step: the
forward under that autocast and the scaled loss's backward.

    python bench/train_precision.py --preset tiny --steps 40
    python bench/train_precision.py --device cuda --preset ade20k --width 128 --size 128 --batch 16 --steps 60
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from flops import Peaks, count_flops, device_name, speed_columns, synchronize
from sample_speed import scaled_model
from sdm.config import SDMConfig, get_preset
from sdm.device import training_precision
from sdm.diffusion import GaussianDiffusion
from sdm.testing import blocky_batches
from sdm.training import train_step
from sdm.unet import SDMUNet, count_parameters

PRECISIONS = {"fp32": "fp32", "bf16": "bf16", "fp16+scaler": "fp16"}  # row name -> the training precision policy's name


def run(cfg: SDMConfig, batches, steps: int, warmup: int, precision: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    net = SDMUNet(cfg.model).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr)
    dtype, scaler = training_precision(device, precision)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion, cfg.model.learn_sigma)
    gen = torch.Generator().manual_seed(0)
    losses, skipped, start = [], 0, 0.0
    batch = batches[0][0].shape[0]
    for step in range(steps):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        step_args = (net, opt, diffusion, [batches[step % len(batches)]], cfg, 0.0, gen, dtype, scaler)
        if step == 0:  # a warm-up step, counted
            r, flops = count_flops(train_step, *step_args)
        else:
            r = train_step(*step_args)
        losses.append(r.loss)
        skipped += not r.finite
    synchronize(device)
    n = max(steps // 10, 1)
    return {
        "img/s": (steps - warmup) * batch / (time.perf_counter() - start),
        "flops/image": flops / batch,
        "start": sum(losses[:n]) / n,
        "end": sum(losses[-n:]) / n,
        "skipped": skipped,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--width", type=int, default=None, help="model_channels (default: the preset's)")
    p.add_argument("--size", type=int, default=None, help="short image side (default: the preset's)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    device = torch.device(args.device)

    preset = get_preset(args.preset)
    model = scaled_model(preset, args.width or preset.model.model_channels, args.size or min(preset.model.image_size))
    cfg = dataclasses.replace(preset, model=model)
    batches = [(x0.to(device), label.to(device)) for x0, label in blocky_batches(model, args.batch, args.batches)]
    params = count_parameters(SDMUNet(cfg.model)) / 1e6
    print(
        f"{args.preset} structure at width {model.model_channels}, {model.image_size[0]}x{model.image_size[1]}, "
        f"{params:.1f}M params, batch {args.batch}, {args.steps} steps ({args.warmup} warm-up) on {device_name(device)}"
    )
    peaks = Peaks(device)
    for precision in PRECISIONS.values():
        peaks(training_precision(device, precision)[0])
    print(peaks.summary() + "\n")
    print(f"{'precision':<13}{'images/s':>10}{'GFLOP/s':>10}{'% peak':>8}{'loss start':>12}{'loss end':>10}{'skipped':>9}")
    results = {}
    for name, precision in PRECISIONS.items():
        r = results[name] = run(cfg, batches, args.steps, args.warmup, precision, device)
        achieved, share = speed_columns(r["flops/image"], r["img/s"], peaks(training_precision(device, precision)[0]))
        print(f"{name:<13}{r['img/s']:>10.2f}{achieved:>10.1f}{share:>7.1f}%{r['start']:>12.4f}{r['end']:>10.4f}{r['skipped']:>9d}")
    print(f"model: {results['fp32']['flops/image'] / 1e9:.3f} GFLOP per image per train step (forward + backward)")
    print()
    for name in ("bf16", "fp16+scaler"):
        print(f"{name} / fp32 images/s: {results[name]['img/s'] / results['fp32']['img/s']:.2f}x")


if __name__ == "__main__":
    main()

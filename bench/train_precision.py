"""Training steps per precision and memory format: fp32, bf16 autocast, fp16 autocast with a grad scaler, each with
the weights and batches contiguous (NCHW) and in channels_last (NHWC); optionally one torch.compile row.

Each row trains a fresh copy of the same network (same seed) on the same fixed batches for the same steps, with the
same timestep and noise draws, side by side in one run on one device; the rows are run `--repeats` times in
alternating order and the best images/s of each is kept (a shared machine slows some runs). Printed: images/s after
a warm-up, the loss at the start and at the end (the batches are few, so a working step drives it down; equal
draws make the rows' losses comparable step for step), and the steps skipped as non-finite; then each row's speed
against fp32 contiguous and its final loss against fp32 contiguous's.

Next to images/s: the achieved model GFLOP/s (FLOPs per image x images/s) and its share of the matmul peak
measured in the same run on the same device, with the same threads, in that row's compute dtype (fp32, bf16,
fp16). The FLOPs are counted (bench/flops.py: FlopCounterMode) on each row's first warm-up step, a real
train_step: the forward under that autocast and the scaled loss's backward.

The compile row (`--compile fp32` or `bf16`) wraps the channels_last network in torch.compile (inductor); its
compile time, the warm-up steps' time beyond that of as many measured steps, is printed on its own line and is
not in its images/s; its FLOPs per image are those counted on the eager row of the same precision.

    python bench/train_precision.py --threads 1 --batch 16 --steps 40 --compile fp32
    python bench/train_precision.py --threads 1 --batch 16 --steps 200 --repeats 1      # the loss after more steps
    python bench/train_precision.py --device cuda --preset ade20k --width 128 --size 128 --batch 16 --steps 60
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

from flops import Peaks, count_flops, device_name, machine_line, speed_columns, synchronize
from sample_speed import scaled_model
from sdm.config import SDMConfig, get_preset
from sdm.device import training_precision
from sdm.diffusion import GaussianDiffusion
from sdm.testing import blocky_batches
from sdm.training import make_optimizer, to_memory_format, train_step
from sdm.unet import SDMUNet, count_parameters


PRECISIONS = {"fp32": "fp32", "bf16": "bf16", "fp16+scaler": "fp16"}  # name -> the training precision policy's name
FORMATS = {"contiguous": False, "channels_last": True}


@dataclasses.dataclass(frozen=True)
class Row:
    precision: str  # a PRECISIONS name
    layout: str  # a FORMATS name
    compiled: bool = False

    @property
    def name(self) -> str:
        return f"{self.precision} {self.layout}" + (" compiled" if self.compiled else "")


def run(cfg: SDMConfig, batches, steps: int, warmup: int, row: Row, device: torch.device) -> dict:
    torch.manual_seed(0)
    channels_last = FORMATS[row.layout]
    with device:  # initialised where it trains: the full network builds slowly on a CPU
        net = SDMUNet(cfg.model).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = make_optimizer(net, cfg.train.lr, cfg.train.weight_decay)
    model = torch.compile(net) if row.compiled else net
    dtype, scaler = training_precision(device, PRECISIONS[row.precision])
    diffusion = GaussianDiffusion.from_config(cfg.diffusion, cfg.model.learn_sigma)
    gen = torch.Generator().manual_seed(0)
    batches = [to_memory_format(x0, label, channels_last) for x0, label in batches]
    losses, skipped, flops = [], 0, None
    batch = batches[0][0].shape[0]
    synchronize(device)
    first = time.perf_counter()
    for step in range(steps):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        step_args = (model, opt, diffusion, [batches[step % len(batches)]], cfg, 0.0, gen, dtype, scaler)
        if step == 0 and not row.compiled:  # a warm-up step, counted
            r, flops = count_flops(train_step, *step_args)
        else:
            r = train_step(*step_args)
        losses.append(r.loss)
        skipped += not r.finite
    synchronize(device)
    measured = time.perf_counter() - start
    n = max(steps // 10, 1)
    return {
        "img/s": (steps - warmup) * batch / measured,
        "flops/image": flops / batch if flops else None,
        "compile s": (start - first) - measured * warmup / (steps - warmup),
        "start": sum(losses[:n]) / n,
        "end": sum(losses[-n:]) / n,
        "skipped": skipped,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--width", type=int, default=None, help="model_channels (default: the preset's)")
    p.add_argument("--size", type=int, default=None, help="short image side (default: the preset's)")
    p.add_argument("--batch", type=int, default=None, help="default: the preset's per-worker training batch")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    p.add_argument("--precisions", default="fp32,bf16,fp16+scaler", help=f"comma-separated, of {', '.join(PRECISIONS)}")
    p.add_argument("--compile", choices=["fp32", "bf16"], help="add a torch.compile row: channels_last in this precision")
    p.add_argument("--repeats", type=int, default=2, help="alternated runs of every row; the best images/s is kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's); the train job runs "
                   "one per worker CPU")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    precisions = [name.strip() for name in args.precisions.split(",")]
    if unknown := set(precisions) - set(PRECISIONS):
        p.error(f"unknown precision(s) {', '.join(sorted(unknown))}; known: {', '.join(PRECISIONS)}")
    if args.compile and args.compile not in [PRECISIONS[n] for n in precisions]:
        p.error(f"--compile {args.compile} needs its eager rows: add it to --precisions")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    preset = get_preset(args.preset)
    model = scaled_model(preset, args.width or preset.model.model_channels, args.size or min(preset.model.image_size))
    cfg = dataclasses.replace(preset, model=model)
    batch = args.batch or preset.train.batch_size
    batches = [(x0.to(device), label.to(device)) for x0, label in blocky_batches(model, batch, args.batches)]
    rows = [Row(precision, layout) for precision in precisions for layout in FORMATS]
    if args.compile:
        rows.append(Row(next(n for n, policy in PRECISIONS.items() if policy == args.compile), "channels_last", compiled=True))

    results: dict[Row, dict] = {}
    for rep in range(args.repeats):
        for row in rows if rep % 2 == 0 else reversed(rows):
            r = run(cfg, batches, args.steps, args.warmup, row, device)
            if row not in results or r["img/s"] > results[row]["img/s"]:
                results[row] = {**r, "flops/image": r["flops/image"] or results.get(row, {}).get("flops/image")}
            print(f"  run {rep + 1}: {row.name}: {r['img/s']:.2f} images/s (load {os.getloadavg()[0]:.1f})", flush=True)

    params = count_parameters(SDMUNet(cfg.model)) / 1e6
    print()
    print(machine_line() if device.type == "cpu" else f"device: {device_name(device)}; torch {torch.__version__}")
    print(
        f"{args.preset} structure at width {model.model_channels}, {model.image_size[0]}x{model.image_size[1]}, "
        f"{params:.1f}M params, batch {batch}, {args.steps} steps ({args.warmup} warm-up), {torch.get_num_threads()} "
        f"torch threads on {device_name(device)}, best of {args.repeats} alternated runs"
    )
    peaks = Peaks(device)
    for precision in precisions:
        peaks(training_precision(device, PRECISIONS[precision])[0])
    print(peaks.summary() + "\n")
    base = results[rows[0]]
    print(f"x base and vs base: against {rows[0].name}")
    print(f"{'row':<28}{'images/s':>10}{'GFLOP/s':>10}{'% peak':>8}{'x base':>8}{'loss start':>12}{'loss end':>10}"
          f"{'vs base':>9}{'skipped':>9}")
    for row in rows:
        r = results[row]
        flops = r["flops/image"] or results[Row(row.precision, row.layout)]["flops/image"]
        achieved, share = speed_columns(flops, r["img/s"], peaks(training_precision(device, PRECISIONS[row.precision])[0]))
        print(f"{row.name:<28}{r['img/s']:>10.2f}{achieved:>10.1f}{share:>7.1f}%{r['img/s'] / base['img/s']:>7.2f}x"
              f"{r['start']:>12.4f}{r['end']:>10.4f}{100 * (r['end'] / base['end'] - 1):>+8.1f}%{r['skipped']:>9d}")
    print(f"model: {base['flops/image'] / 1e9:.3f} GFLOP per image per train step (forward + backward)")
    print()
    for precision in precisions:
        contiguous, cl = results[Row(precision, "contiguous")], results[Row(precision, "channels_last")]
        print(f"{precision}: channels_last / contiguous images/s {cl['img/s'] / contiguous['img/s']:.2f}x")
    for precision in precisions[1:]:
        print(f"{precision} / {precisions[0]} images/s: contiguous "
              f"{results[Row(precision, 'contiguous')]['img/s'] / base['img/s']:.2f}x, channels_last "
              f"{results[Row(precision, 'channels_last')]['img/s'] / results[Row(precisions[0], 'channels_last')]['img/s']:.2f}x")
    for row in rows:
        if row.compiled:
            eager = results[Row(row.precision, row.layout)]
            print(f"{row.name}: compile time {results[row]['compile s']:.1f}s (not in its images/s); "
                  f"{results[row]['img/s'] / eager['img/s']:.2f}x the eager {row.precision} {row.layout} row")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

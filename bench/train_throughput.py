"""Training images/s: the Ray Train path (1 worker) against a bare single-process PyTorch loop.

Same model, batch, data and steps, measured side by side in one run; the ratio is the result. The default
dataset holds more images than the run trains on, as a real one does: with fewer (`--samples 512`), the measured
steps include an epoch boundary, where the Ray Data pipeline starts again.

Next to each images/s: the achieved model GFLOP/s, FLOPs per image x images/s, and its share of the fp32 matmul
peak measured in the same run with the same threads (both paths train in fp32 on the CPU, the training precision
policy's "auto" there). The FLOPs per image are counted (bench/flops.py: FlopCounterMode) on the bare loop's
first warm-up step, a real train_step: the forward and the loss's backward of the same model and batch that
the Ray Train worker runs.

    python bench/train_throughput.py --steps 60 --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from jobs import train
from flops import Peaks, count_flops, speed_columns
from sdm.config import get_preset
from sdm.data.preprocess import preprocess_train
from sdm.data.shards import iter_samples
from sdm.data.toy import write_toy_dataset
from sdm.diffusion import GaussianDiffusion
from sdm.labels import encode_raw_labels
from sdm.training import make_ema, train_step
from sdm.unet import SDMUNet


def bare_loop(data: str, steps: int, batch: int, measure_from: int) -> tuple[float, float]:
    """(images/s of a plain loop over the same shards, preprocessing and train step, after a warm-up; model
    FLOPs per image of its first step)."""
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    net = SDMUNet(cfg.model).train()
    ema = make_ema(net, cfg.train.ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion, cfg.model.learn_sigma)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)

    def batches():
        while True:
            buf = []
            for s in iter_samples(data, split="train", shuffle=True, buffer_size=256):
                buf.append(preprocess_train(s, cfg.model, cfg.data, rng))
                if len(buf) == batch:
                    yield buf
                    buf = []

    it = batches()
    start = None
    for step in range(steps):
        if step == measure_from:
            start = time.perf_counter()
        b = next(it)
        x0 = torch.from_numpy(np.stack([o["image"] for o in b]))
        label = encode_raw_labels(torch.from_numpy(np.stack([o["label"] for o in b])), torch.from_numpy(np.stack([o["instance"] for o in b])), cfg)
        if step == 0:  # a warm-up step, counted
            flops_per_image = count_flops(train_step, net, opt, diffusion, [(x0, label)], cfg, 0.0, gen)[1] / batch
        else:
            train_step(net, opt, diffusion, [(x0, label)], cfg, 0.0, gen)
        ema.update_parameters(net)
    return (steps - measure_from) * batch / (time.perf_counter() - start), flops_per_image


def ray_train(data: str, run: str, steps: int, batch: int, measure_from: int) -> float:
    """images/s reported by the Ray Train job over its last logging window (the steps after the warm-up)."""
    args = train.parse_args(
        ["--preset", "tiny", "--data", data, "--run", run, "--steps", str(steps), "--batch-size", str(batch),
         "--num-workers", "1", "--cpus-per-worker", str(os.cpu_count() or 1), "--log-every", str(measure_from),
         "--checkpoint-every", str(steps)]
    )
    cfg, card = train.prepare(args)
    return train.fit(args, cfg, card).metrics["images_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples", type=int, default=2048, help="toy dataset size")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    warm = args.steps // 2
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        write_toy_dataset(data, n=args.samples, seed=0)
        bare, flops_per_image = bare_loop(data, args.steps, args.batch_size, warm)
        ray_ips = ray_train(data, os.path.join(tmp, "run"), args.steps, args.batch_size, warm)
    peak = Peaks("cpu")
    peak("fp32")
    print(f"tiny preset, 32x32, batch {args.batch_size}, {args.steps - warm} measured steps after {warm} warm-up steps")
    print(f"model: {flops_per_image / 1e9:.3f} GFLOP per image per train step (forward + backward), fp32")
    print(peak.summary())
    print(f"{'path':<28}{'images/s':>10}{'GFLOP/s':>10}{'% peak':>8}")
    for name, ips in (("bare PyTorch loop", bare), ("Ray Train, 1 worker", ray_ips)):
        achieved, share = speed_columns(flops_per_image, ips, peak("fp32"))
        print(f"{name:<28}{ips:>10.1f}{achieved:>10.1f}{share:>7.1f}%")
    print(f"Ray Train / bare: {ray_ips / bare:.3f}  (overhead {100 * (1 - ray_ips / bare):.1f}%; target under 10%)")


if __name__ == "__main__":
    main()

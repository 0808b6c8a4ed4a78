"""Images/s through the Ray Data generation job against a bare in-process loop calling the same pipeline with
the same model, sampler, steps and batch size, measured side by side in one run; prints the ratio (target >= 0.9).

    python bench/generate_throughput.py                      # a randomly initialised tiny model, toy label maps
    python bench/generate_throughput.py --model RUN_URI --items 256 --steps 25

The job's time is its whole run (planning, actor start and model load, read, sample, encode, write, card),
without starting Ray itself. The bare loop only samples label maps already decoded in memory. Ray starts
its workers at nice 15 by default; on a machine shared with other work that alone would make the actor
lose to the loop, so this cluster runs them at the loop's priority.

Next to each images/s: the achieved model GFLOP/s (FLOPs per image x images/s) and its share of the matmul peak
measured in the same run, with the loop's threads, in the precision the pipeline samples in (bf16 autocast: the
bf16 peak). FLOPs per image are counted (bench/flops.py: FlopCounterMode) on one real call of the pipeline's
sampling runner on one full batch: every step's network evaluation, guided rows as one forward of 2x the images
(conditional and null branches). Padding rows of a last, partial batch are work but not model FLOPs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time

import ray
import ray.data
import torch

from flops import Peaks, sampling_flops_per_image, speed_columns
from jobs.generate import main as generate
from sdm.data.shards import decode_row, iter_rows
from sdm.data.toy import write_toy_dataset
from sdm.generate import sample_seed
from sdm.pipeline import SDMPipeline
from sdm.testing import save_random_model


def bare_loop(pipe: SDMPipeline, samples: list[dict], args: argparse.Namespace) -> float:
    """Seconds to sample every label map in batches of args.batch_size."""
    start = time.perf_counter()
    for i in range(0, len(samples), args.batch_size):
        part = samples[i : i + args.batch_size]
        x = pipe.prepare_labels([s["label"] for s in part], [s["instance"] for s in part])
        seeds = [sample_seed(args.seed, s["key"], 0) for s in part]
        pipe.runner(x, seeds, pipe.params(args.guidance, args.steps, args.sampler))
    return time.perf_counter() - start


def ray_job(model: str, labels: str, out: str, args: argparse.Namespace) -> float:
    """Seconds for the whole generation job (progress output swallowed)."""
    argv = ["--model", model, "--labels", labels, "--out", out, "--sampler", args.sampler, "--steps", str(args.steps),
            "--guidance", str(args.guidance), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
            "--micro-batch", str(args.batch_size), "--shard-rows", str(4 * args.batch_size), "--segmenter", "none",
            "--concurrency", "1", "--cpus-per-worker", str(args.cpus)]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        status = generate(argv)
    if status != 0:
        raise SystemExit(f"the generation job failed with status {status}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model URI (default: a randomly initialised tiny model)")
    p.add_argument("--items", type=int, default=96, help="label maps (one image each)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="alternating bare/job measurements")
    p.add_argument("--cpus", type=int, default=1, help="threads of the loop and CPUs (threads) of the sampling actor")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-generate-")
    model = args.model or os.path.join(tmp, "model")
    if not args.model:
        save_random_model(model, "tiny", seed=0)
    pipe = SDMPipeline.from_pretrained(model, micro_batch=args.batch_size)
    size = pipe.config.model.image_size[0]
    labels = os.path.join(tmp, "labels")
    write_toy_dataset(labels, n=args.items, size=size, seed=0, val_fraction=0.0)
    samples = [decode_row(r) for r in iter_rows(labels)]
    torch.set_num_threads(args.cpus)
    # One CPU beside the sampling actor for reading, preparing and writing.
    ray.init(address="local", num_cpus=args.cpus + 1, include_dashboard=False, log_to_driver=False,
             _system_config={"worker_niceness": 0})
    ray.data.DataContext.get_current().enable_progress_bars = False
    params = pipe.params(args.guidance, args.steps, args.sampler)
    first = samples[: args.batch_size]
    flops_per_image = sampling_flops_per_image(
        pipe.runner, pipe.prepare_labels([s["label"] for s in first], [s["instance"] for s in first]), params
    )
    peaks = Peaks(pipe.device)
    peak = peaks(pipe.dtype)

    def rate(images_per_s: float) -> str:
        achieved, share = speed_columns(flops_per_image, images_per_s, peak)
        return f"{images_per_s:.2f} images/s ({achieved:.1f} GFLOP/s, {share:.1f}% of peak)"

    print(f"{args.items} images of {size}x{size}, {args.sampler} {args.steps} steps, guidance {args.guidance}, "
          f"batch {args.batch_size}, {args.cpus} threads, {pipe.dtype or torch.float32} on {pipe.device}")
    print(f"model: {flops_per_image / 1e9:.2f} GFLOP per image ({args.steps} network evaluations); {peaks.summary()}")

    bare_loop(pipe, samples[: args.batch_size], args)  # warm-up
    bare_s, job_s = [], []
    for r in range(args.rounds):
        bare_s.append(bare_loop(pipe, samples, args))
        job_s.append(ray_job(model, labels, os.path.join(tmp, f"out{r}"), args))
        print(f"round {r + 1}: bare loop {rate(args.items / bare_s[-1])}, ray data job {rate(args.items / job_s[-1])}")
    bare_rate, job_rate = args.items * args.rounds / sum(bare_s), args.items * args.rounds / sum(job_s)
    print(f"bare loop: {rate(bare_rate)}")
    print(f"ray data job: {rate(job_rate)}")
    print(f"ratio job/bare: {job_rate / bare_rate:.2f} (target >= 0.9)")
    ray.shutdown()


if __name__ == "__main__":
    main()

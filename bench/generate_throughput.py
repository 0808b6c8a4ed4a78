"""Images/s through the Ray Data generation job against a bare in-process loop calling the same pipeline with
the same model, sampler, steps and batch size, measured side by side in one run; prints the ratios (target >= 0.95).

    python bench/generate_throughput.py                      # a randomly initialised tiny model, toy label maps
    python bench/generate_throughput.py --model RUN_URI --items 256 --steps 25

The job's time is its whole run (planning, actor start and model load, read, sample, encode, write, card),
without starting Ray itself. The bare loop only samples label maps already decoded in memory, in a process that
has imported torch and loaded the model. The job runs twice per round, on --items label maps and on --longer times
as many: the difference of the two runs is the job's steady rate (what each further image costs), and the rest of
the short run is its fixed start-up cost (new worker processes importing torch, the model load). Ray starts its
workers at nice 15 by default; on a machine shared with other work that alone would make the actor lose to the
loop, so this cluster runs them at the loop's priority.

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
from sdm.generated_dataset import sample_seed
from sdm.pipeline import SDMPipeline
from sdm.testing import save_random_model


def bare_loop(pipe: SDMPipeline, samples: list[dict], args: argparse.Namespace) -> float:
    """Seconds to sample every label map in batches of args.batch_size."""
    start = time.perf_counter()
    for i in range(0, len(samples), args.batch_size):
        part = samples[i : i + args.batch_size]
        x = pipe.prepare_labels([s["label"] for s in part], [s["instance"] for s in part])
        seeds = [sample_seed(args.seed, s["key"], 0) for s in part]
        pipe.sample_prepared(x, seeds, pipe.params(guidance_scale=args.guidance, num_inference_steps=args.steps,
                                                   sampler=args.sampler))
    return time.perf_counter() - start


def ray_job(model: str, labels: str, out: str, args: argparse.Namespace) -> float:
    """Seconds for the whole generation job (progress output swallowed)."""
    argv = ["--model", model, "--labels", labels, "--out", out, "--sampler", args.sampler, "--num-inference-steps", str(args.steps),
            "--guidance-scale", str(args.guidance), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
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
    p.add_argument("--items", type=int, default=96, help="label maps (one image each) of the short job and the bare loop")
    p.add_argument("--longer", type=int, default=3, help="the long job draws this many times --items")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="alternating bare/job measurements")
    p.add_argument("--cpus", type=int, default=1, help="threads of the loop and CPUs (threads) of the sampling actor")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.longer < 2:
        p.error("--longer must be >= 2")

    tmp = tempfile.mkdtemp(prefix="bench-generate-")
    model = args.model or os.path.join(tmp, "model")
    if not args.model:
        save_random_model(model, "tiny", seed=0)
    pipe = SDMPipeline.from_pretrained(model, micro_batch=args.batch_size)
    size = pipe.config.model.image_size[0]
    sizes = {"short": args.items, "long": args.items * args.longer}
    labels = {name: os.path.join(tmp, f"labels_{name}") for name in sizes}
    for name, n in sizes.items():
        write_toy_dataset(labels[name], n=n, size=size, seed=0, val_fraction=0.0)
    samples = [decode_row(r) for r in iter_rows(labels["short"])]
    torch.set_num_threads(args.cpus)
    # One CPU beside the sampling actor for reading, preparing and writing.
    ray.init(address="local", num_cpus=args.cpus + 1, include_dashboard=False, log_to_driver=False,
             _system_config={"worker_niceness": 0})
    ray.data.DataContext.get_current().enable_progress_bars = False
    params = pipe.params(guidance_scale=args.guidance, num_inference_steps=args.steps, sampler=args.sampler)
    first = samples[: args.batch_size]
    flops_per_image = sampling_flops_per_image(
        pipe.runner, pipe.prepare_labels([s["label"] for s in first], [s["instance"] for s in first]), params
    )
    peaks = Peaks(pipe.device)
    peak = peaks(pipe.dtype)

    def rate(images_per_s: float) -> str:
        achieved, share = speed_columns(flops_per_image, images_per_s, peak)
        return f"{images_per_s:.2f} images/s ({achieved:.1f} GFLOP/s, {share:.1f}% of peak)"

    print(f"{args.items} and {sizes['long']} images of {size}x{size}, {args.sampler} {args.steps} steps, guidance "
          f"{args.guidance}, batch {args.batch_size}, {args.cpus} threads, {pipe.dtype or torch.float32} on {pipe.device}")
    print(f"model: {flops_per_image / 1e9:.2f} GFLOP per image ({args.steps} network evaluations); {peaks.summary()}")

    bare_loop(pipe, samples[: args.batch_size], args)  # warm-up
    bare_s, short_s, long_s = [], [], []
    for r in range(args.rounds):
        bare_s.append(bare_loop(pipe, samples, args))
        short_s.append(ray_job(model, labels["short"], os.path.join(tmp, f"short{r}"), args))
        long_s.append(ray_job(model, labels["long"], os.path.join(tmp, f"long{r}"), args))
        print(f"round {r + 1}: bare loop {rate(args.items / bare_s[-1])}; job of {args.items}: {short_s[-1]:.1f}s, "
              f"of {sizes['long']}: {long_s[-1]:.1f}s", flush=True)
    bare_rate = args.items * args.rounds / sum(bare_s)
    short_rate, long_rate = args.items * args.rounds / sum(short_s), sizes["long"] * args.rounds / sum(long_s)
    steady = (sizes["long"] - args.items) * args.rounds / (sum(long_s) - sum(short_s))
    startup = (sum(short_s) - args.items * args.rounds / steady) / args.rounds
    print(f"bare loop: {rate(bare_rate)}")
    print(f"ray data job, {args.items} images: {rate(short_rate)}; {sizes['long']} images: {rate(long_rate)}")
    print(f"ray data job, steady rate (the long job less the short): {rate(steady)}; fixed start-up {startup:.1f}s")
    print(f"ratio job/bare: whole job {short_rate / bare_rate:.2f} ({args.items} images), {long_rate / bare_rate:.2f} "
          f"({sizes['long']} images); steady {steady / bare_rate:.2f} (target >= 0.95)")
    ray.shutdown()


if __name__ == "__main__":
    main()

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
import shlex
import statistics
import tempfile
import time

import numpy as np
import ray
import torch

from jobs import train
from flops import Peaks, count_flops, machine_line, matmul_peak, precision_name, speed_columns
from sdm.config import get_preset
from sdm.data.preprocess import preprocess_train
from sdm.data.shards import iter_samples
from sdm.data.toy import write_toy_dataset
from sdm.device import training_precision
from sdm.diffusion import GaussianDiffusion
from sdm.labels import LabelEncoder
from sdm.testing import blocky_batches
from sdm.training import make_ema, make_optimizer, to_memory_format, train_step
from sdm.unet import SDMUNet


def bare_loop(data: str, steps: int, batch: int, measure_from: int) -> tuple[float, float]:
    """(images/s of a plain loop over the same shards, preprocessing and train step, after a warm-up; model
    FLOPs per image of its first step)."""
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    net = SDMUNet(cfg.model).train().to(memory_format=torch.channels_last)  # as the job holds it by default
    ema = make_ema(net, cfg.train.ema_decay)
    opt = make_optimizer(net, cfg.train.lr, cfg.train.weight_decay)
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
        label = LabelEncoder(cfg)(np.stack([o["label"] for o in b]), np.stack([o["instance"] for o in b]))
        x0, label = to_memory_format(x0, label, True)
        if step == 0:  # a warm-up step, counted
            flops_per_image = count_flops(train_step, net, opt, diffusion, [(x0, label)], cfg, 0.0, gen)[1] / batch
        else:
            train_step(net, opt, diffusion, [(x0, label)], cfg, 0.0, gen)
        ema.update_parameters(net)
    return (steps - measure_from) * batch / (time.perf_counter() - start), flops_per_image


def ray_train(data: str, run: str, steps: int, batch: int, measure_from: int, workers: int = 1,
              cpus_per_worker: float | None = None, job_args: tuple[str, ...] = ()) -> dict:
    """The metrics the Ray Train job reported over its last logging window (the steps after the warm-up), among
    them images_per_s and data_wait_fraction; `batch` is the global batch, split over the workers. Each call starts
    its own local Ray cluster, as the CLI does."""
    cpus = cpus_per_worker or os.cpu_count() or 1
    args = train.parse_args(
        ["--preset", "tiny", "--data", data, "--run", run, "--steps", str(steps), "--batch-size", str(batch // workers),
         "--num-workers", str(workers), "--cpus-per-worker", str(cpus), "--log-every", str(measure_from),
         "--checkpoint-every", str(steps), "--fresh", *job_args]
    )
    cfg, card = train.prepare(args)
    try:
        return train.fit(args, cfg, card).metrics
    finally:
        ray.shutdown()


SCALING_ROWS = {  # row name -> (workers, CPUs and torch threads per worker)
    "1 worker x 1 CPU": (1, 1),
    "2 workers x 1 CPU": (2, 1),
    "1 worker x 2 CPUs (ref.)": (1, 2),
}


def _processes() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used so far), from /proc (empty where there is none)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return out


def other_cpu(before: dict[int, tuple[int, float]], seconds: float) -> float:
    """CPU cores that processes outside this bench's process tree (its Ray cluster included) used on average since
    `before` was taken: another job on a shared machine. Processes that ended meanwhile are not counted."""
    after = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in after.items():
        children.setdefault(ppid, []).append(pid)
    mine, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        mine.add(pid)
        todo.extend(children.get(pid, []))
    used = sum(cpu - before.get(pid, (0, 0.0))[1] for pid, (_, cpu) in after.items() if pid not in mine)
    return used / seconds


def scaling(data: str, tmp: str, args: argparse.Namespace) -> None:
    """The Ray Train job on 1 and 2 workers at the same global batch, rows alternated over the repeats; before each
    run a one-thread matmul probe (this VM's speed drifts by tens of percent within the hour: the probes show it)."""
    cfg = get_preset("tiny")
    warm = args.steps // 2
    precision = train.parse_args(["--preset", "tiny", "--data", data, "--run", tmp, "--steps", "1", *args.job_args]).precision
    dtype = training_precision(torch.device("cpu"), precision)[0]
    flops_per_image = train_flops_per_image(cfg, args.batch_size, dtype)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in SCALING_ROWS}  # (images/s, probe GFLOP/s)
    others = []
    torch.set_num_threads(1)
    for rep in range(args.repeats):
        names = list(SCALING_ROWS) if rep % 2 == 0 else [*reversed(list(SCALING_ROWS)[:2]), list(SCALING_ROWS)[2]]
        for name in names:
            workers, cpus = SCALING_ROWS[name]
            probe = matmul_peak(dtype or torch.float32, torch.device("cpu"))
            before, start = _processes(), time.perf_counter()
            metrics = ray_train(data, os.path.join(tmp, "run"), args.steps, args.batch_size, warm, workers, cpus, tuple(args.job_args))
            seconds = time.perf_counter() - start
            ips = metrics["images_per_s"]
            runs[name].append((ips, probe))
            others.append(other_cpu(before, seconds))
            waiting = f"{100 * metrics['data_wait_fraction']:.0f}%" if "data_wait_fraction" in metrics else "(not reported)"
            print(f"  run {rep + 1}: {name}: {ips:.1f} images/s, {waiting} waiting for data; {seconds:.0f}s for the "
                  f"whole job; matmul probe {probe:.0f} GFLOP/s; other processes used "
                  f"{others[-1]:.2f} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)

    def share(name: str, run: tuple[float, float]) -> float:  # % of the row's peak: its CPUs x the run's probe
        workers, cpus = SCALING_ROWS[name]
        return speed_columns(flops_per_image, run[0], run[1] * workers * cpus)[1]

    print()
    print(machine_line())
    print(f"tiny preset, 32x32, global batch {args.batch_size}, {args.steps - warm} measured steps after {warm} warm-up "
          f"steps, {args.repeats} alternated runs per row; job args: {' '.join(args.job_args) or '(defaults)'}")
    print(f"model: {flops_per_image / 1e9:.3f} GFLOP per image per train step (forward + backward), {precision_name(dtype)}")
    print(f"peak of a row: its CPUs x the {precision_name(dtype)} matmul peak of one thread, probed just before each run")
    print(f"{'Ray Train job':<28}{'images/s':>10}{'GFLOP/s':>10}{'% peak':>8}   runs: images/s (% peak)")
    best = {name: max(v) for name, v in runs.items()}
    for name in SCALING_ROWS:
        achieved = speed_columns(flops_per_image, best[name][0], 1.0)[0]
        each = "  ".join(f"{r[0]:.1f} ({share(name, r):.0f}%)" for r in runs[name])
        print(f"{name:<28}{best[name][0]:>10.1f}{achieved:>10.1f}{share(name, best[name]):>7.1f}%   {each}")
    one, two, ref = SCALING_ROWS
    speedup = best[two][0] / best[one][0]
    adjacent = [b[0] / a[0] for a, b in zip(runs[one], runs[two])]
    normalised = statistics.median(share(two, r) for r in runs[two]) / statistics.median(share(one, r) for r in runs[one])
    print(f"2 workers / 1 worker (1 CPU each): {speedup:.2f}x speed-up (best runs), scaling efficiency {speedup / 2:.2f} "
          f"per worker (target >= 1.8x)")
    print(f"  per repeat (adjacent runs): {', '.join(f'{x:.2f}x' for x in adjacent)}; from the median % of peak "
          f"(drift in the probe removed): {2 * normalised:.2f}x, efficiency {normalised:.2f}")
    print(f"2 workers x 1 CPU / 1 worker x 2 CPUs: {best[two][0] / best[ref][0]:.2f}x")
    print(f"other processes' CPU use during the runs: max {max(others):.2f} CPUs"
          + ("  (another job shared the machine: the runs were disturbed)" if max(others) > 0.3 else ""))


def train_flops_per_image(cfg, batch: int, dtype: torch.dtype | None) -> float:
    """Model FLOPs per image of one real train_step of the tiny network (forward under that autocast and the loss's
    backward), as the job runs it: channels_last."""
    torch.manual_seed(0)
    net = SDMUNet(cfg.model).train().to(memory_format=torch.channels_last)
    opt = make_optimizer(net, cfg.train.lr, cfg.train.weight_decay)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion, cfg.model.learn_sigma)
    x0, label = to_memory_format(*blocky_batches(cfg.model, batch, 1)[0], True)
    step = (net, opt, diffusion, [(x0, label)], cfg, 0.0, torch.Generator().manual_seed(0), dtype)
    return count_flops(train_step, *step)[1] / batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples", type=int, default=2048, help="toy dataset size")
    p.add_argument("--scaling", action="store_true", help="1 worker against 2 workers at the same global batch")
    p.add_argument("--repeats", type=int, default=3, help="--scaling: alternated runs of each row")
    p.add_argument("--job-args", type=shlex.split, default=[], help="--scaling: extra train-job arguments for every "
                   "row, e.g. --job-args='--precision bf16'")
    args = p.parse_args()
    if args.scaling:
        with tempfile.TemporaryDirectory() as tmp:
            data = os.path.join(tmp, "data")
            write_toy_dataset(data, n=args.samples, seed=0)
            scaling(data, tmp, args)
        return
    torch.set_num_threads(os.cpu_count() or 1)
    warm = args.steps // 2
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        write_toy_dataset(data, n=args.samples, seed=0)
        bare, flops_per_image = bare_loop(data, args.steps, args.batch_size, warm)
        ray_ips = ray_train(data, os.path.join(tmp, "run"), args.steps, args.batch_size, warm)["images_per_s"]
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

"""The measuring parts of `make gpu-check` (bench/gpu_check.py runs each in its own process, under its own time
limit): one guided step of the full network per inference path, the compiled step, images per second at the
default sampler with the largest micro-batch that fits, and training per precision and memory format with the
largest batch that fits.

Each part writes what it measured as JSON lines through a Recorder, one line as soon as it is measured, so a part
stopped at its time limit keeps the rows it finished. Speeds carry the achieved TFLOP/s (bench/flops.py: FLOPs
counted with FlopCounterMode on the real call) and its share of the matmul peak measured in the same process.
The sizes are the issue's: the ADE20K preset's full network at 256x256, guided steps at batch 8; tests run the
same code on the CPU at the tiny preset's sizes.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from flops import Peaks, count_flops, device_name, sampling_flops_per_image, synchronize
from sdm.config import SDMConfig, get_preset
from sdm.device import autocast_dtype, training_precision
from sdm.diffusion import GaussianDiffusion
from sdm.inference import compile_net, prepare_net
from sdm.samplers import make_denoiser
from sdm.runner import SampleRunner
from sdm.seeds import sample_seeds
from sdm.testing import blocky_batches
from sdm.training import make_optimizer, to_memory_format, train_step
from sdm.unet import SDMUNet, count_parameters
from train_precision import FORMATS, PRECISIONS, Row, run as train_run


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How large each part measures. The defaults fit the whole check in 8 minutes on one H200."""

    preset: str = "ade20k"  # the full network, at the preset's width and 256x256
    batch: int = 8  # images per guided step; the sampling part's first micro-batch
    repeats: int = 5  # timed guided steps per row, after a warm-up step
    max_micro_batch: int = 64  # the sampling part's micro-batch search stops here (8 -> 16 -> 32 -> 64)
    train_batches: tuple[int, ...] = (2, 4, 8, 16)  # the training batch search's candidates
    train_precisions: tuple[str, ...] = tuple(PRECISIONS)  # fp32, bf16, fp16+scaler
    train_steps: int = 6  # per training row, of which train_warmup are not timed
    train_warmup: int = 2


class Recorder:
    """Appends a part's results to a JSON-lines file: rows (a table), info (facts about the run), targets."""

    def __init__(self, path: str):
        self.path = path

    def _write(self, kind: str, value: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({kind: value}) + "\n")

    def row(self, **values: Any) -> None:
        self._write("row", values)

    def info(self, **values: Any) -> None:
        self._write("info", values)

    def target(self, name: str, value: str, goal: str, met: bool) -> None:
        self._write("target", {"name": name, "value": value, "goal": goal, "met": bool(met)})


def largest_fitting(candidates: Sequence[int], fits: Callable[[int], bool]) -> int | None:
    """The largest of increasing candidates for which fits() holds, trying them in order and stopping at the first
    that does not fit (None when the first does not)."""
    best = None
    for n in candidates:
        if not fits(n):
            break
        best = n
    return best


def fits_in_memory(attempt: Callable[[], Any]) -> bool:
    """True when attempt() runs, False when it runs out of device memory; the memory is freed either way."""
    try:
        attempt()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _network(sizes: Sizes, device: torch.device) -> tuple[SDMConfig, SDMUNet, GaussianDiffusion]:
    """The preset's network, initialised on the device itself (a 660M-parameter network is slow to build on a CPU)."""
    cfg = get_preset(sizes.preset)
    torch.manual_seed(0)
    with device:
        net = SDMUNet(cfg.model).eval()
    return cfg, net, GaussianDiffusion.from_config(cfg.diffusion, cfg.model.learn_sigma)


def _labels(cfg: SDMConfig, n: int, device: torch.device) -> torch.Tensor:
    return blocky_batches(cfg.model, n, 1)[0][1].to(device)


def _run_info(rec: Recorder, cfg: SDMConfig, device: torch.device, peaks: Peaks) -> None:
    h, w = cfg.model.image_size
    with torch.device("meta"):  # counted without allocating
        params = count_parameters(SDMUNet(cfg.model))
    rec.info(device=device_name(device), torch=torch.__version__, preset=cfg.name, image=f"{h}x{w}",
             params_M=round(params / 1e6, 1),
             **{f"{p} matmul peak TFLOP/s": float(f"{peaks(p) / 1e3:.3g}") for p in ("bf16", "fp32")})  # 3 figures: a CPU's is ~0.2


def _time_step(denoise: Callable, x: torch.Tensor, t: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Seconds per call of a denoiser (one guided step), averaged over `repeats` after the calls made before."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        denoise(x, t)
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def _step_row(rec: Recorder, name: str, denoise: Callable, x: torch.Tensor, t: torch.Tensor, device: torch.device,
              sizes: Sizes, bf16_peak: float, flops: int | None = None, warmup: int = 1) -> tuple[dict[str, Any], int]:
    """Time one guided step of a denoiser after `warmup` calls (the label cache's modulations, a compilation), and
    record ms/step, TFLOP/s, the share of the bf16 peak and the peak memory; returns the row and the step's FLOPs,
    counted on the warmed-up call unless given (a compiled denoiser: those of its eager twin)."""
    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(warmup):
        denoise(x, t)
    synchronize(device)
    warm_s = time.perf_counter() - start
    if flops is None:
        flops = count_flops(denoise, x, t)[1]
    sec = _time_step(denoise, x, t, device, sizes.repeats)
    row = {"row": name, "ms/step": sec * 1e3, "TFLOP/step": flops / 1e12, "TFLOP/s": flops / sec / 1e12,
           "% bf16 peak": 100 * flops / sec / 1e9 / bf16_peak, "peak GiB": peak_memory_gib(device),
           "warm-up s": warm_s}
    rec.row(**row)
    return row, flops


def _step_inputs(cfg: SDMConfig, sizes: Sizes, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, w = cfg.model.image_size
    x = torch.randn(sizes.batch, 3, h, w, generator=g).to(device)
    t = torch.randint(0, 50, (sizes.batch,), generator=g).to(device)
    return x, t, _labels(cfg, sizes.batch, device)


def guided_step(rec: Recorder, device: torch.device, sizes: Sizes) -> None:
    """One guided step (both branches, 2 x batch network rows) in fp32, bf16 eager, on the bf16 fast path, and on
    the fast path with the label cache (the default every door samples with)."""
    cfg, net, diffusion = _network(sizes, device)
    x, t, label = _step_inputs(cfg, sizes, device)
    scale = cfg.sampling.guidance_scale
    peaks = Peaks(device)
    _run_info(rec, cfg, device, peaks)
    bf16 = torch.bfloat16
    fast = prepare_net(net, device, bf16, fast_path=True)
    rows = {}
    for name, model, dtype, cache in (("fp32 eager", net, None, False), ("bf16 eager", net, bf16, False),
                                      ("bf16 fast path", fast, bf16, False),
                                      ("bf16 fast path + label cache", fast, bf16, True)):
        denoise = make_denoiser(model, diffusion, label, scale, dtype, label_cache=cache)
        rows[name] = _step_row(rec, name, denoise, x, t, device, sizes, peaks("bf16"))[0]
    base = rows["fp32 eager"]["ms/step"]
    rec.info(**{f"{name}: x fp32": round(base / r["ms/step"], 2) for name, r in rows.items()})
    for name in ("bf16 fast path", "bf16 fast path + label cache"):
        share = rows[name]["% bf16 peak"]
        rec.target(f"guided step, batch {sizes.batch}, {name}: share of the bf16 matmul peak", f"{share:.1f}%",
                   ">= 50%", share >= 50)


def compiled_step(rec: Recorder, device: torch.device, sizes: Sizes) -> None:
    """The fast path with the label cache compiled (torch.compile with CUDA graphs on CUDA), against the same path
    eager in the same process; its warm-up (the compilation) timed on its own."""
    cfg, net, diffusion = _network(sizes, device)
    x, t, label = _step_inputs(cfg, sizes, device)
    scale = cfg.sampling.guidance_scale
    peaks = Peaks(device)
    _run_info(rec, cfg, device, peaks)
    fast = prepare_net(net, device, torch.bfloat16, fast_path=True)
    eager, flops = _step_row(rec, "bf16 fast path + label cache", make_denoiser(
        fast, diffusion, label, scale, torch.bfloat16, label_cache=True), x, t, device, sizes, peaks("bf16"))
    compiled = make_denoiser(compile_net(fast, device), diffusion, label, scale, torch.bfloat16, label_cache=True)
    # CUDA graph trees record on the second and later calls: three warm-up calls leave only replays to time
    row, _ = _step_row(rec, "compiled (CUDA graphs) + label cache", compiled, x, t, device, sizes, peaks("bf16"),
                       flops=flops, warmup=3)
    rec.info(**{"compiled: x eager": round(eager["ms/step"] / row["ms/step"], 2)})
    share = row["% bf16 peak"]
    rec.target(f"guided step, batch {sizes.batch}, compiled fast path + label cache: share of the bf16 matmul peak",
               f"{share:.1f}%", ">= 50%", share >= 50)


def sampling(rec: Recorder, device: torch.device, sizes: Sizes) -> None:
    """Images per second at the model's default sampler (the preset's steps, sampler, eta and guidance) through the
    runner every door uses, on the fast path with the label cache: at micro-batch `batch`, then at the largest
    micro-batch that fits (doubling up to max_micro_batch)."""
    cfg, net, diffusion = _network(sizes, device)
    dtype = autocast_dtype(device, "auto")
    fast = prepare_net(net, device, dtype, fast_path=True)
    params = cfg.resolve_sampling()
    one_step = dataclasses.replace(params, num_inference_steps=1)
    peaks = Peaks(device)
    _run_info(rec, cfg, device, peaks)
    rec.info(sampler=f"{params.sampler} eta {params.eta}, {params.num_inference_steps} steps, guidance "
                     f"{params.guidance_scale}", precision="bf16" if dtype == torch.bfloat16 else "fp32")
    peak = peaks("bf16" if dtype == torch.bfloat16 else "fp32")

    def runner(micro_batch: int) -> tuple[SampleRunner, torch.Tensor]:
        return SampleRunner(fast, diffusion, device, dtype, micro_batch, label_cache=True), _labels(cfg, micro_batch, device)

    small, labels = runner(sizes.batch)
    flops_per_image = sampling_flops_per_image(small, labels, params)

    def measure(micro_batch: int) -> dict[str, Any]:
        r, labels = runner(micro_batch)
        reset_peak_memory(device)
        r(labels, sample_seeds(0, micro_batch), one_step)  # warm-up: kernels chosen for this shape
        synchronize(device)
        start = time.perf_counter()
        r(labels, sample_seeds(1, micro_batch), params)
        synchronize(device)
        images_s = micro_batch / (time.perf_counter() - start)
        row = {"row": f"micro-batch {micro_batch}", "micro-batch": micro_batch, "images/s": images_s,
               "images/day": images_s * 86400, "TFLOP/image": flops_per_image / 1e12,
               "TFLOP/s": flops_per_image * images_s / 1e12, "% peak": 100 * flops_per_image * images_s / 1e9 / peak,
               "peak GiB": peak_memory_gib(device)}
        rec.row(**row)
        return row

    rows = [measure(sizes.batch)]

    def fits(micro_batch: int) -> bool:
        r, labels = runner(micro_batch)
        return fits_in_memory(lambda: r(labels, sample_seeds(0, micro_batch), one_step))

    doubling = [sizes.batch * 2**k for k in range(1, 16) if sizes.batch * 2**k <= sizes.max_micro_batch]
    largest = largest_fitting(doubling, fits) or sizes.batch
    rec.info(**{"largest micro-batch that fits": largest, "micro-batch search bound": sizes.max_micro_batch})
    if largest != sizes.batch:
        rows.append(measure(largest))
    best = max(rows, key=lambda r: r["images/s"])
    rec.target(f"images/s per GPU at the default sampler with the label cache (micro-batch {best['micro-batch']})",
               f"{best['images/s']:.2f}", ">= 1.5", best["images/s"] >= 1.5)


def training(rec: Recorder, device: torch.device, sizes: Sizes) -> None:
    """Training images/s per precision (fp32, bf16, fp16 with a grad scaler) and memory format at full width, each
    precision at the largest batch of `train_batches` that fits a channels_last train step (fused AdamW)."""
    cfg = get_preset(sizes.preset)
    peaks = Peaks(device)
    _run_info(rec, cfg, device, peaks)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion, cfg.model.learn_sigma)

    def fits(precision: str, batch: int) -> bool:
        def step() -> None:
            with device:
                net = SDMUNet(cfg.model).train().to(memory_format=torch.channels_last)
            dtype, scaler = training_precision(device, PRECISIONS[precision])
            x0, label = to_memory_format(*(b.to(device) for b in blocky_batches(cfg.model, batch, 1)[0]), True)
            train_step(net, make_optimizer(net, cfg.train.lr, cfg.train.weight_decay), diffusion, [(x0, label)], cfg,
                       0.0, torch.Generator().manual_seed(0), dtype, scaler)
        return fits_in_memory(step)

    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for precision in sizes.train_precisions:
        batch = largest_fitting(sizes.train_batches, lambda b: fits(precision, b))
        if batch is None:
            rec.info(**{f"{precision}: largest batch": f"none of {list(sizes.train_batches)} fits"})
            continue
        batches = [(x0.to(device), label.to(device)) for x0, label in blocky_batches(cfg.model, batch, 2)]
        peak = peaks(training_precision(device, PRECISIONS[precision])[0])
        for layout in FORMATS:
            reset_peak_memory(device)
            r = train_run(cfg, batches, sizes.train_steps, sizes.train_warmup, Row(precision, layout), device)
            row = {"row": f"{precision} {layout}", "batch": batch, "images/s": r["img/s"],
                   "TFLOP/s": r["flops/image"] * r["img/s"] / 1e12,
                   "% peak": 100 * r["flops/image"] * r["img/s"] / 1e9 / peak,
                   "loss start": r["start"], "loss end": r["end"], "skipped": r["skipped"],
                   "peak GiB": peak_memory_gib(device)}
            rec.row(**row)
            rows[precision, layout] = row
        rec.info(**{f"{precision}: largest batch": f"{batch} (of {list(sizes.train_batches)})"})
    if ("fp32", "channels_last") in rows and ("bf16", "channels_last") in rows:
        ratio = rows["bf16", "channels_last"]["images/s"] / rows["fp32", "channels_last"]["images/s"]
        rec.target("training images/s, bf16 / fp32 (channels_last, each at its largest batch)", f"{ratio:.2f}x",
                   "> 1", ratio > 1)


PARTS: dict[str, Callable[[Recorder, torch.device, Sizes], None]] = {
    "guided_step": guided_step,
    "sampling": sampling,
    "training": training,
    "compiled_step": compiled_step,
}

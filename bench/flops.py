"""Model FLOPs and the measured matmul peak, for every bench that prints a speed (DESIGN.md: every printed speed
carries its share of the machine's measured peak, model FLOPs / time / matmul peak).

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode while the real code runs on the real network and
inputs: matrix multiplies, convolutions and attention (the ops FlopCounterMode counts; normalisations, activations,
the loss and the sampler's elementwise updates are not counted). Sampling counts every network evaluation of a real
call (guidance: the conditional and null branches, one batched forward of 2x the images per step); training counts
a real train_step (the forward and the loss's backward; the optimizer adds no matmuls). PyTorch's counter has no
formula for the CPU's fused attention kernels, so they are counted here with its own SDPA formulas.

The peak is an n x n matmul timed on the same device, in the same thread setting, in the dtype the measured run
computed in: a bf16 autocast run against the bf16 peak, fp32 against fp32 (TF32 on CUDA where cuDNN's convolutions
use it, as the network's fp32 convolutions then do).
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from sdm.config import ModelConfig
from sdm.samplers import guided_output
from sdm.config import SamplingParams
from sdm.runner import SampleRunner
from sdm.seeds import sample_seeds

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_aten = torch.ops.aten
_CPU_ATTENTION = {
    _aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v)
    ),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(grad_out, q, k, v)
    ),
}


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock times cover the work (CUDA launches asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """The CPU model, its cores and matrix instructions, torch's version and the load average, for a bench's output."""
    probes = {"AMX": "_is_amx_tile_supported", "AVX512-BF16": "_is_avx512_bf16_supported"}
    isa = [name for name, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()]
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores ({', '.join(isa) or 'no bf16 matrix instructions'}); "
            f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")


def precision_name(dtype: torch.dtype | None) -> str:
    """'fp32', 'bf16' or 'fp16' for an autocast dtype (None: no autocast, fp32)."""
    return {None: "fp32", **{d: name for name, d in PRECISION_DTYPES.items()}}[dtype]


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, min_seconds: float = 0.5) -> float:
    """Measured GFLOP/s of an n x n matmul (4n on CUDA), repeated for about min_seconds after a warm-up. On CUDA,
    fp32 matmuls use TF32 when cuDNN's convolutions do, so the peak matches what the network's fp32 convolutions
    run on."""
    n = n if device.type == "cpu" else 4 * n
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        a @ b
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        reps = max(3, math.ceil(min_seconds / (time.perf_counter() - start)))
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        synchronize(device)
        return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


class Peaks:
    """The matmul peaks of one device, each precision measured once, on first use, under the current thread count."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.gflops: dict[str, float] = {}

    def __call__(self, precision: str | torch.dtype | None) -> float:
        """GFLOP/s for 'fp32' / 'bf16' / 'fp16' or an autocast dtype (None: fp32)."""
        name = precision if isinstance(precision, str) else precision_name(precision)
        if name not in self.gflops:
            self.gflops[name] = matmul_peak(PRECISION_DTYPES[name], self.device)
        return self.gflops[name]

    def summary(self) -> str:
        measured = ", ".join(f"{name} {g:.0f} GFLOP/s" for name, g in self.gflops.items())
        return f"matmul peak on {device_name(self.device)} ({torch.get_num_threads()} threads): {measured}"


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """(fn's result, the FLOPs it ran), counted by FlopCounterMode (CPU fused attention included)."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        out = fn(*args, **kwargs)
    return out, counter.get_total_flops()


def guided_step_flops(net: torch.nn.Module, cfg: ModelConfig, batch: int, scale: float, device: torch.device,
                      autocast_dtype: torch.dtype | None = None, batched: bool = True) -> int:
    """FLOPs of one denoising step of `batch` images: guided_output, as the samplers call it, on random inputs
    (scale != 1: both branches, 2 x batch images through the network)."""
    h, w = cfg.image_size
    x, t = torch.randn(batch, 3, h, w, device=device), torch.zeros(batch, device=device)
    label = torch.rand(batch, cfg.label_channels, h, w, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        return count_flops(guided_output, net, x, t, label, scale, batched)[1]


def sampling_flops_per_image(runner: SampleRunner, labels: torch.Tensor, params: SamplingParams) -> float:
    """Model FLOPs per image of one real runner call on exactly one micro-batch of prepared labels (every step, both
    guidance branches where guided). Padding rows, which a call on fewer images runs too, are not model FLOPs."""
    rows = runner.micro_batch
    if labels.shape[0] < rows:
        raise ValueError(f"need a full micro-batch of {rows} label inputs to count per image, got {labels.shape[0]}")
    return count_flops(runner, labels[:rows], sample_seeds(0, rows), params)[1] / rows


def speed_columns(flops_per_image: float, images_per_s: float, peak_gflops: float) -> tuple[float, float]:
    """(achieved model GFLOP/s, its % of the matmul peak) at a throughput."""
    achieved = flops_per_image * images_per_s / 1e9
    return achieved, 100 * achieved / peak_gflops

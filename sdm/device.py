"""Where the model runs, and the one precision policy of inference and training.

`precision` is "auto", "bf16", "fp16" (training only, with a grad scaler) or "fp32" everywhere. "auto" means bf16
autocast where the device computes bf16 fast (CUDA with bf16; CPUs with AMX or AVX512-BF16), else fp32, with two
exceptions for training: a GPU without bf16 trains in fp16 with a grad scaler (fp32 master weights either way),
and a CPU trains in fp32, as bf16 training on CPUs has not been measured to pay here (bench/train_precision.py).
"""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_supported(device: torch.device) -> bool:
    """bfloat16 is fast here: CUDA with bf16, or a CPU with AMX or AVX512-BF16 matrix instructions."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, p, lambda: False)() for p in probes)
    return False


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """Inference: the autocast dtype for a precision request ('auto', 'bf16' or 'fp32'); None is fp32."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and not bf16_supported(device)):
        return None
    return torch.bfloat16


def training_precision(device: torch.device, precision: str) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """Training: the autocast dtype (None is fp32) and the grad scaler fp16 needs, for 'auto', 'bf16', 'fp16', 'fp32'."""
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return None, None
        precision = "bf16" if bf16_supported(device) else "fp16"
    if precision == "bf16":
        return torch.bfloat16, None
    if precision == "fp16":
        return torch.float16, torch.amp.GradScaler(device.type)
    return None, None

"""Guided sampling speed: float32 vs bfloat16, batched vs two-pass guidance, against the matmul peak.

Measured side by side in one run; the ratios are the result (absolute times drift on a shared machine).

    python bench/sample_speed.py --preset ade20k --width 64 --size 64 --batch 4 --steps 5
    python bench/sample_speed.py --device cuda --preset ade20k --width 256 --size 256 --batch 8 --steps 20
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdm.config import ModelConfig, SDMConfig, get_preset
from sdm.diffusion import GaussianDiffusion
from sdm.samplers import NoiseSource, make_denoiser, sample
from sdm.unet import SDMUNet, count_parameters


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock times cover the work (CUDA launches asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 10) -> float:
    """Measured GFLOP/s of an n x n matmul. On CUDA, fp32 matmuls use TF32 when cuDNN's convolutions do, so the
    peak matches what the network's fp32 convolutions run on."""
    n = n if device.type == "cpu" else 4 * n
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def forward_gflops(net: torch.nn.Module, batch: int, cfg, device: torch.device) -> float:
    h, w = cfg.image_size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(
            torch.randn(batch, 3, h, w, device=device),
            torch.zeros(batch, device=device),
            torch.rand(batch, cfg.label_channels, h, w, device=device),
        )
    return counter.get_total_flops() / 1e9


def time_sampling(net, cfg, diffusion, batch: int, steps: int, dtype, batched: bool, repeats: int, device: torch.device) -> float:
    """Seconds per denoising step of guided DDIM sampling (best of `repeats`)."""
    h, w = cfg.image_size
    label = torch.rand(batch, cfg.label_channels, h, w, device=device)
    best = float("inf")
    for r in range(repeats + 1):  # the first run warms up kernels
        noise = NoiseSource(list(range(batch)), (3, h, w), device)
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            sample(lambda d: make_denoiser(net, d, label, 1.5, dtype, batched), diffusion, "ddim", steps, noise)
        synchronize(device)
        if r:
            best = min(best, (time.perf_counter() - start) / steps)
    return best


def scaled_model(preset: SDMConfig, width: int, size: int) -> ModelConfig:
    """A preset's network structure at another width and short image side (aspect ratio and attention kept)."""
    h, w = preset.model.image_size
    scale = size / min(h, w)
    attn = tuple(r for r in (size // 8, size // 16, size // 32) if r >= 1)
    return dataclasses.replace(
        preset.model,
        model_channels=width,
        image_size=(int(h * scale), int(w * scale)),
        attention_resolutions=attn if preset.name != "tiny" else preset.model.attention_resolutions,
        num_head_channels=min(preset.model.num_head_channels, width),
        norm_groups=min(preset.model.norm_groups, width // 4),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="ade20k")
    p.add_argument("--width", type=int, default=64, help="model_channels (the preset's width may not fit here)")
    p.add_argument("--size", type=int, default=64, help="short image side; the preset's aspect ratio is kept")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    preset = get_preset(args.preset)
    cfg = scaled_model(preset, args.width, args.size)
    net = SDMUNet(cfg).eval().to(device)
    diffusion = GaussianDiffusion.from_config(preset.diffusion, cfg.learn_sigma)
    gflop_step = forward_gflops(net, 2 * args.batch, cfg, device)
    peaks = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
    print(
        f"{args.preset} structure at width {cfg.model_channels}, {cfg.image_size[0]}x{cfg.image_size[1]}, "
        f"{count_parameters(net) / 1e6:.1f}M params, batch {args.batch}, guidance 1.5, DDIM {args.steps} steps, "
        f"on {device_name(device)}"
    )
    print(f"network: {gflop_step:.2f} GFLOP per guided step (both branches, {2 * args.batch} images)")
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s\n")
    print(f"{'precision':<10}{'guidance':<10}{'ms/step':>10}{'images/s':>10}{'GFLOP/s':>10}{'% peak':>8}")
    results = {}
    for prec, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        for mode, batched in (("batched", True), ("two-pass", False)):
            sec = time_sampling(net, cfg, diffusion, args.batch, args.steps, dtype, batched, args.repeats, device)
            results[prec, mode] = sec
            achieved = gflop_step / sec
            print(
                f"{prec:<10}{mode:<10}{sec * 1e3:>10.1f}{args.batch / (sec * args.steps):>10.2f}"
                f"{achieved:>10.0f}{100 * achieved / peaks[prec]:>7.0f}%"
            )
    print()
    print(f"bf16 / fp32 speed-up (batched):        {results['fp32', 'batched'] / results['bf16', 'batched']:.2f}x")
    print(f"batched / two-pass speed-up (bf16):    {results['bf16', 'two-pass'] / results['bf16', 'batched']:.2f}x")
    print(f"batched / two-pass speed-up (fp32):    {results['fp32', 'two-pass'] / results['fp32', 'batched']:.2f}x")


if __name__ == "__main__":
    main()

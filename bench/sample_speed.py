"""Guided sampling speed: float32 vs bfloat16, batched vs two-pass guidance, and the inference fast path, against
the matmul peak.

Measured side by side in one run; the ratios are the result (absolute times drift on a shared machine).
GFLOP/s counts the model FLOPs of one guided step (bench/flops.py: FlopCounterMode on the real guidance call,
the conditional and null branches as one forward of 2x the images) times the steps; two-pass guidance runs the
same FLOPs in two forwards. The fast-path rows (sdm.inference: channels_last, bf16-held weights, the label maps'
SPADE modulations once per run) count the FLOPs of their own sampling run, which skips most of the label path.
% peak is against the matmul peak measured in the same run in that row's precision. See bench/vs_original.py for
the same rows against the original SDM code.

    python bench/sample_speed.py --preset ade20k --width 64 --size 64 --batch 4 --steps 5
    python bench/sample_speed.py --device cuda --preset ade20k --width 256 --size 256 --batch 8 --steps 20
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from flops import Peaks, count_flops, device_name, guided_step_flops, speed_columns, synchronize
from sdm.config import ModelConfig, SDMConfig, get_preset
from sdm.diffusion import GaussianDiffusion
from sdm.inference import prepare_net
from sdm.samplers import NoiseSource, make_denoiser, sample
from sdm.unet import SDMUNet, count_parameters


def sampling_run(net, cfg, diffusion, batch: int, steps: int, dtype, batched: bool, device: torch.device, label_cache: bool = False):
    """One guided DDIM sampling run, as a function of nothing."""
    h, w = cfg.image_size
    label = torch.rand(batch, cfg.label_channels, h, w, device=device)

    def run() -> torch.Tensor:
        noise = NoiseSource(list(range(batch)), (3, h, w), device)
        with torch.no_grad():
            return sample(lambda d: make_denoiser(net, d, label, 1.5, dtype, batched, label_cache=label_cache), diffusion,
                          "ddim", steps, noise)
    return run


def time_sampling(run, steps: int, repeats: int, device: torch.device) -> float:
    """Seconds per denoising step of a sampling run (best of `repeats`, after a warm-up run)."""
    best = float("inf")
    for r in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        run()
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
    step_flops = guided_step_flops(net, cfg, args.batch, 1.5, device)
    image_flops = step_flops * args.steps / args.batch
    peaks = Peaks(device)
    for prec in ("fp32", "bf16"):
        peaks(prec)
    print(
        f"{args.preset} structure at width {cfg.model_channels}, {cfg.image_size[0]}x{cfg.image_size[1]}, "
        f"{count_parameters(net) / 1e6:.1f}M params, batch {args.batch}, guidance 1.5, DDIM {args.steps} steps, "
        f"on {device_name(device)}"
    )
    print(
        f"network: {step_flops / 1e9:.2f} GFLOP per guided step (both branches, {2 * args.batch} images), "
        f"{image_flops / 1e9:.2f} GFLOP per image over {args.steps} steps"
    )
    print(peaks.summary() + "\n")
    print(f"{'precision':<10}{'guidance':<10}{'ms/step':>10}{'images/s':>10}{'GFLOP/s':>10}{'% peak':>8}")
    results = {}
    for prec, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        for mode, batched in (("batched", True), ("two-pass", False)):
            run = sampling_run(net, cfg, diffusion, args.batch, args.steps, dtype, batched, device)
            sec = time_sampling(run, args.steps, args.repeats, device)
            results[prec, mode] = sec
            images_s = args.batch / (sec * args.steps)
            achieved, share = speed_columns(image_flops, images_s, peaks(prec))
            print(f"{prec:<10}{mode:<10}{sec * 1e3:>10.1f}{images_s:>10.2f}{achieved:>10.1f}{share:>7.1f}%")
        fast = prepare_net(net, device, dtype, fast_path=True)
        run = sampling_run(fast, cfg, diffusion, args.batch, args.steps, dtype, True, device, label_cache=True)
        fast_image_flops = count_flops(run)[1] / args.batch
        sec = time_sampling(run, args.steps, args.repeats, device)
        results[prec, "fast"] = sec
        images_s = args.batch / (sec * args.steps)
        achieved, share = speed_columns(fast_image_flops, images_s, peaks(prec))
        print(f"{prec:<10}{'fast path':<10}{sec * 1e3:>10.1f}{images_s:>10.2f}{achieved:>10.1f}{share:>7.1f}%")
    print()
    print(f"fast path / eager batched (bf16):      {results['bf16', 'batched'] / results['bf16', 'fast']:.2f}x")
    print(f"fast path / eager batched (fp32):      {results['fp32', 'batched'] / results['fp32', 'fast']:.2f}x")
    print(f"bf16 / fp32 speed-up (batched):        {results['fp32', 'batched'] / results['bf16', 'batched']:.2f}x")
    print(f"batched / two-pass speed-up (bf16):    {results['bf16', 'two-pass'] / results['bf16', 'batched']:.2f}x")
    print(f"batched / two-pass speed-up (fp32):    {results['fp32', 'two-pass'] / results['fp32', 'batched']:.2f}x")


if __name__ == "__main__":
    main()

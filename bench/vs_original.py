"""The original SDM network against this project's, side by side on identical weights: one guided denoising step.

The original is the authors' code (WeilunWang/semantic-diffusion-model, guided_diffusion/unet.py, built by its
script_util.create_model). It is not part of this repository and is never copied into it: give the path of a
checkout with --original; without one (or if the path does not hold the code) the bench says it is skipped and
exits 0. Both networks get the same seeded weights (sdm.testing.seeded_weights, mapped into the original's layout
by sdm.convert.to_official) and a preset's structure scaled to --width and --size (bench/sample_speed.py's
scaled_model), with the original's fixed GroupNorm(32) and 128-wide SPADE hidden layer. Before timing, the
project's eager fp32 guided output is checked against the original's on the same inputs (fails past 1e-3 of the
output's mean magnitude).

Timed: the network part of one guided step of `batch` images, guidance 1.5, conditional and null branches (the
null label is sdm.labels.null_label: zeros). Rows, each best of --repeats after a warm-up, run round-robin so
drift on a shared machine hits all rows alike:
  original            fp32, two forward passes of `batch` (cond, then uncond), as its gaussian_diffusion does
  project fp32        eager contiguous (prepare_net fast_path=False), cond + null batched in one forward
  project bf16        the same under bf16 autocast
  fast fp32           prepare_net(fast_path=True): channels_last
  fast bf16           channels_last + bf16-held conv/linear weights under bf16 autocast
  + label cache       and the SPADE modulations computed once per sampling run of --steps steps (SDMUNet.modulations),
                      that one-off cost spread over the steps: the default path
  compiled            with --compile: the default path through compile_net (the compile time is printed on its own)
GFLOP/s counts the model FLOPs a row executes (bench/flops.py; guided_step_flops for a whole guided step; counted
on the call itself for label-cache rows, which skip most of the label path); % peak is against the matmul peak
measured in the same run in the row's precision. err: each row's guided output
against the original's, max and mean absolute difference over the original's mean |output| (bf16 rounding shows
here). The ratios are the result; absolute times drift on a shared machine.

    python bench/vs_original.py --original ~/src/semantic-diffusion-model
    python bench/vs_original.py --original ~/src/semantic-diffusion-model --preset ade20k --width 64 --size 64 --batch 4 --compile
    python bench/vs_original.py --original ~/src/semantic-diffusion-model --device cuda --width 256 --size 256 --batch 8
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flops import Peaks, count_flops, device_name, guided_step_flops, speed_columns, synchronize
from sample_speed import scaled_model
from sdm.config import ModelConfig, get_preset
from sdm.convert import to_official
from sdm.inference import compile_net, prepare_net
from sdm.labels import label_input, null_label
from sdm.samplers import guidance_input, guided_output
from sdm.testing import seeded_weights
from sdm.unet import SDMUNet, count_parameters

SCALE = 1.5
TARGETS = "targets: >= 3x the original, >= 70% of the bf16 matmul peak"


def load_original(path: str | None) -> tuple[Callable | None, str]:
    """(the original code's create_model, '') or (None, why it cannot be used)."""
    if not path:
        return None, "no --original PATH given (a checkout of WeilunWang/semantic-diffusion-model)"
    root = Path(path).expanduser()
    missing = [f for f in ("guided_diffusion/unet.py", "guided_diffusion/script_util.py") if not (root / f).is_file()]
    if missing:
        return None, f"{root} does not hold the original SDM code (no {', '.join(missing)})"
    sys.path.insert(0, str(root))
    try:
        from guided_diffusion.script_util import create_model
    except Exception as e:  # a checkout whose imports this environment lacks
        return None, f"the original code at {root} does not import here: {type(e).__name__}: {e}"
    return create_model, ""


def original_model(create_model: Callable, m: ModelConfig) -> torch.nn.Module:
    """The original UNetModel of the same structure (its image_size is the short side attention is keyed to)."""
    return create_model(
        image_size=min(m.image_size), num_classes=m.num_classes, num_channels=m.model_channels,
        num_res_blocks=m.num_res_blocks, channel_mult=",".join(str(c) for c in m.channel_mult),
        learn_sigma=m.learn_sigma, class_cond=True, attention_resolutions=",".join(str(r) for r in m.attention_resolutions),
        num_head_channels=m.num_head_channels, use_scale_shift_norm=True, resblock_updown=m.resblock_updown,
        dropout=m.dropout, no_instance=not m.instance_edges,
    )


def original_guided(orig: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor, s: float) -> torch.Tensor:
    """Classifier-free guidance as the original's p_mean_variance computes it: two forward passes, the eps channels
    combined in place, the variance channels from the conditional pass."""
    out = orig(x, t, y=label)
    zero = orig(x, t, y=null_label(label))
    out[:, :3] = zero[:, :3] + s * (out[:, :3] - zero[:, :3])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--original", default=None, help="path of a checkout of WeilunWang/semantic-diffusion-model")
    p.add_argument("--preset", default="ade20k")
    p.add_argument("--width", type=int, default=64, help="model_channels (a multiple of 32: the original's GroupNorm(32))")
    p.add_argument("--size", type=int, default=64, help="short image side; the preset's aspect ratio is kept")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per row (best kept), after one warm-up")
    p.add_argument("--steps", type=int, default=25, help="denoising steps of a sampling run, for the label-cache rows")
    p.add_argument("--compile", action="store_true", help="add the fast bf16 path through torch.compile (minutes on a CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()

    create_model, why = load_original(args.original)
    if create_model is None:
        print(f"vs_original: skipped: {why}")
        return
    device = torch.device(args.device)
    preset = get_preset(args.preset)
    if preset.model.conditioning != "spade":
        sys.exit(f"vs_original: preset {args.preset} uses {preset.model.conditioning!r} conditioning; the original has only SPADE")
    if args.width % 32:
        sys.exit(f"vs_original: --width {args.width} is not a multiple of 32 (the original hard-codes GroupNorm(32))")
    # The original fixes these; scaled_model would narrow the groups at small widths.
    cfg = dataclasses.replace(scaled_model(preset, args.width, args.size), norm_groups=32, spade_hidden=128)
    cfg.validate()

    torch.manual_seed(0)
    net = seeded_weights(SDMUNet(cfg), seed=0).eval()
    orig = original_model(create_model, cfg)
    orig.load_state_dict(to_official(net), strict=True)
    orig = orig.to(device).eval()
    net = prepare_net(net, device, None, fast_path=False)  # the eager contiguous network, fp32

    h, w = cfg.image_size
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(args.batch, 3, h, w, generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=g).float().to(device)
    coarse = torch.randint(0, cfg.num_classes, (args.batch, h // 8, w // 8), generator=g)
    ids = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2)
    label = label_input(ids, cfg, ids if cfg.instance_edges else None).to(device)

    # The two networks agree (fp32, eager) before anything is timed.
    with torch.no_grad():
        theirs = original_guided(orig, x, t, label, SCALE)
        ours = guided_output(net, x, t, label, SCALE, batched=True)
    magnitude = theirs.abs().mean().item()
    diff = (ours - theirs).abs().max().item()

    step_flops = guided_step_flops(net, cfg, args.batch, SCALE, device)
    with torch.no_grad():
        orig_flops = count_flops(original_guided, orig, x, t, label, SCALE)[1]
    peaks = Peaks(device)
    for prec in ("fp32", "bf16"):
        peaks(prec)

    print(
        f"{args.preset} structure at width {cfg.model_channels}, {h}x{w}, {count_parameters(net) / 1e6:.1f}M params "
        f"(GroupNorm 32, SPADE hidden 128, as the original), batch {args.batch}, guidance {SCALE}, on {device_name(device)}"
    )
    print(f"original code: {Path(args.original).expanduser()} (guided_diffusion/unet.py via script_util.create_model)")
    print(
        f"network: {step_flops / 1e9:.2f} GFLOP per guided step (both branches, {2 * args.batch} images); "
        f"counted on the original's two passes: {orig_flops / 1e9:.2f}"
    )
    print(peaks.summary())
    print(f"agreement (fp32 eager, guided output): max |ours - original| {diff:.2e}, output mean |.| {magnitude:.3f}, "
          f"relative {diff / magnitude:.1e}")
    if not diff <= 1e-3 * magnitude:
        sys.exit(f"vs_original: FAILED: the project's network differs from the original's by {diff:.3e} "
                 f"(> 1e-3 x mean magnitude {magnitude:.3e}); the timings would compare different networks")
    print(TARGETS + "\n")

    bf16 = torch.bfloat16
    fast32 = prepare_net(net, device, None, fast_path=True)
    fast16 = prepare_net(net, device, bf16, fast_path=True)

    def project(model: torch.nn.Module, dtype: torch.dtype | None) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                return guided_output(model, x, t, label, SCALE, batched=True)
        return step

    def label_cached(model: torch.nn.Module, dtype: torch.dtype | None) -> Callable[[], torch.Tensor]:
        """A sampling run's network work: the modulations once, then --steps guided steps (same x_t: timing only)."""
        def run() -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                mods = fast16.modulations(guidance_input(fast16, label, SCALE))
                for _ in range(args.steps):
                    out = guided_output(model, x, t, label, SCALE, batched=True, mods=mods)
            return out
        return run

    # (row, precision, call, denoising steps per call, model FLOPs per call)
    rows: list[tuple[str, str, Callable[[], torch.Tensor], int, float]] = [
        ("original, two-pass", "fp32", lambda: original_guided(orig, x, t, label, SCALE), 1, step_flops),
        ("eager fp32", "fp32", project(net, None), 1, step_flops),
        ("eager bf16 autocast", "bf16", project(net, bf16), 1, step_flops),
        ("fast fp32 (ch-last)", "fp32", project(fast32, None), 1, step_flops),
        ("fast bf16", "bf16", project(fast16, bf16), 1, step_flops),
        ("+ label cache (default)", "bf16", label_cached(fast16, bf16), args.steps, 0.0),
    ]
    compile_s = None
    if args.compile:
        compiled = compile_net(fast16, device)
        run = label_cached(compiled, bf16)
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            run()
        synchronize(device)
        compile_s = time.perf_counter() - start
        rows.append(("+ compiled", "bf16", run, args.steps, 0.0))
    with torch.no_grad():
        cached_flops = count_flops(label_cached(fast16, bf16))[1]
    rows = [(n, p, c, k, f or cached_flops) for n, p, c, k, f in rows]

    errors, best = {}, {}
    with torch.no_grad():
        for name, _, call, _, _ in rows:  # warm-up, and each row's distance from the original's output
            err = (call().float() - theirs).abs()
            errors[name] = (err.max().item() / magnitude, err.mean().item() / magnitude)
            best[name] = float("inf")
        for _ in range(args.repeats):
            for name, _, call, steps, _ in rows:
                synchronize(device)
                start = time.perf_counter()
                call()
                synchronize(device)
                best[name] = min(best[name], (time.perf_counter() - start) / steps)

    base = best[rows[0][0]]
    print(f"{'':<24}{'precision':<10}{'ms/step':>10}{'vs orig':>9}{'GFLOP/s':>10}{'% peak':>8}{'max err':>10}{'mean err':>10}")
    for name, prec, _, steps, flops in rows:
        sec = best[name]
        achieved, share = speed_columns(flops / steps, 1 / sec, peaks(prec))
        print(f"{name:<24}{prec:<10}{sec * 1e3:>10.1f}{base / sec:>8.2f}x{achieved:>10.1f}{share:>7.1f}%{errors[name][0]:>10.1e}{errors[name][1]:>10.1e}")
    print(f"\nlabel cache: {cached_flops / args.steps / 1e9:.2f} GFLOP per step over a {args.steps}-step run "
          f"(the modulations once), against {step_flops / 1e9:.2f} computed afresh each step")
    print(f"\nerr: max and mean |row's guided output - the original's| / the original's mean |output|; "
          f"times: best of {args.repeats} after a warm-up")
    if compile_s is not None:
        print(f"compile time (first call of the compiled network, this batch shape): {compile_s:.1f} s")


if __name__ == "__main__":
    main()

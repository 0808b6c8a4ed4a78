"""Every quality comparison on the benchmark world (`scenes`), with seeds, in one command.

    python bench/world_benchmark.py            # about 60-90 minutes on 2 CPU cores
    python bench/world_benchmark.py --quick    # a smoke run of a few minutes; its numbers mean nothing

1. The world's difficulty on real images alone (bench/world_difficulty.py): the colour lookup, the built-in segmenter
   on all real training images (the one every generated image below is scored with) and on 8.
2. Table 4 in miniature: SDM (SPADE) and the concat baseline, each pretrained and fine-tuned with label dropout under
   one budget (bf16, channels_last) from --model-seeds, sampled at guidance 1 and --guidance on the same validation
   maps with the same sampling seeds: mIoU, the Frechet distance in the segmenter's features (not FID), the texture
   ratio to the real images, the low-pass pixel diversity (noise-proof) and the IoU of the thin classes; the mean over
   model seeds with the range beside it. Where two ranges overlap the difference is undecided.
3. The sampler sweep (bench/sampler_quality.py) on the first SDM model, against the 1000-step reference.
4. Downstream (bench/downstream.py): a segmenter on N real images against the same plus generated pairs (source maps,
   new layouts, new layouts filtered by label consistency), over --segmenter-seeds.
Each part reuses what an earlier run left under --out (data, segmenters, models, generated sets); logs and tables
land there too (results.md, results.json, contact_sheet.png: label | real | SDM | concat per model seed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

import world_difficulty
from reproduce_toy import COLUMNS, score, train_model
from sdm import storage
from sdm.config import get_preset
from sdm.data.card import read_card
from sdm.data.scenes import SCENES_CLASSES, THIN_CLASSES
from sdm.data.shards import iter_samples
from sdm.metrics.frechet import feature_stats
from sdm.metrics.report import contact_sheet_png
from sdm.metrics.segmenter import load_builtin
from sdm.metrics.spectrum import SpectrumFeatures

BENCH = Path(__file__).resolve().parent
THIN = [SCENES_CLASSES[c] for c in THIN_CLASSES]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/world_benchmark")
    p.add_argument("--samples", type=int, default=2048, help="scenes dataset size (1/8 is validation)")
    p.add_argument("--model-seeds", type=int, nargs="+", default=[0, 1], help="training seeds of each diffusion model")
    p.add_argument("--pretrain-steps", type=int, default=700)
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--drop-rate", type=float, default=0.2)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--val-maps", type=int, default=24, help="validation label maps per Table 4 row")
    p.add_argument("--k", type=int, default=2, help="samples per label map")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed of every row")
    p.add_argument("--sweep-maps", type=int, default=8, help="label maps of the sampler sweep (its reference runs 1000 steps)")
    p.add_argument("--downstream-n", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--segmenter-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--downstream-steps", type=int, default=200, help="training steps of every downstream segmenter")
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks that everything runs")
    args = p.parse_args(argv)
    if args.quick:
        args.out = args.out if args.out != "runs/world_benchmark" else "runs/world_benchmark_quick"
        args.samples, args.pretrain_steps, args.finetune_steps, args.val_maps = 160, 10, 5, 4
        args.sweep_maps, args.downstream_n, args.segmenter_seeds, args.downstream_steps = 2, [8], [0], 20
    return args


def log(msg: str) -> None:
    print(msg, flush=True)


def spread(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})" if len(values) > 1 else f"{values[0]:.4f}"


def decided(a: list[float], b: list[float]) -> str:
    """Which arm is higher where the seed ranges do not overlap; else undecided."""
    if min(a) > max(b):
        return "SDM higher"
    if min(b) > max(a):
        return "concat higher"
    return "undecided"


def table4(args: argparse.Namespace, data: str, seg_uri: str) -> tuple[list[dict], list]:
    """Every (structure, model seed, guidance) row scored on the same maps and seeds; returns rows and sheet samples."""
    seg = load_builtin(seg_uri)
    val = list(islice(iter_samples(data, split="val"), args.val_maps))
    all_val = list(iter_samples(data, split="val"))
    real_images = np.stack([s["image"] for s in all_val])
    real, real_spectrum = feature_stats(seg.features(real_images)), SpectrumFeatures()(real_images).mean(0)
    default = get_preset("scenes").sampling
    rows, sheet = [], {}
    for seed in args.model_seeds:
        for structure in ("spade", "concat"):
            pipe = train_model(structure, data, storage.join(args.out, "models", f"{structure}-seed{seed}"), args,
                               preset="scenes", seed=seed, bf16=True)
            for g in (1.0, args.guidance):
                r = score(pipe, val, args.k, g, default.sampler, default.num_inference_steps, seg, real, real_spectrum,
                          len(SCENES_CLASSES), args.seed)
                samples = r.pop("samples")
                if g == args.guidance:
                    sheet[(structure, seed)] = samples[:: args.k]
                r.update(structure=structure, model_seed=seed, thin_iou={n: r["per_class_iou"][c] for n, c in zip(THIN, THIN_CLASSES)})
                rows.append(r)
                log(f"table 4: {structure} seed {seed} s={g:g}: mIoU {r['mIoU']:.4f} FD {r['segmenter-feature FD']:.4f} "
                    f"texture/real {r['texture / real']:.2f} L1 {r['low-pass pixel L1']:.4f} ({r['sampling_seconds']:.0f}s)")
    return rows, [val, sheet]


def table4_text(args: argparse.Namespace, rows: list[dict]) -> str:
    cols = list(COLUMNS) + [f"IoU {n}" for n in THIN]
    lines = [f"| row | {' | '.join(cols)} |", "| --- |" + " --- |" * len(cols)]
    verdicts = []
    for g in (1.0, args.guidance):
        arms = {s: [r for r in rows if r["structure"] == s and r["guidance"] == g] for s in ("spade", "concat")}
        for s, rs in arms.items():
            cells = [spread([r[c] for r in rs]) for c in COLUMNS]
            cells += [spread([r["thin_iou"][n] if r["thin_iou"][n] is not None else float("nan") for r in rs]) for n in THIN]
            lines.append(f"| {'SDM (SPADE)' if s == 'spade' else 'concat'}, s={g:g} | " + " | ".join(cells) + " |")
        for c in ("mIoU", "texture / real", "low-pass pixel L1"):
            verdicts.append(f"s={g:g}, {c}: {decided([r[c] for r in arms['spade']], [r[c] for r in arms['concat']])}")
        fd = decided([-r["segmenter-feature FD"] for r in arms["spade"]], [-r["segmenter-feature FD"] for r in arms["concat"]])
        verdicts.append(f"s={g:g}, segmenter-feature FD: {fd.replace('higher', 'lower (closer to the real images)')}")
    return "\n".join(lines) + "\n\nSDM against concat, seed ranges compared: " + "; ".join(verdicts)


def run_bench(script: str, argv: list[str], log_path: Path) -> str:
    """A bench as a subprocess (each starts its own processes, Ray among them), its output kept; returns the output.
    A bench that already finished with the same arguments is not run again: its log is read back."""
    done = log_path.with_suffix(".done")
    if done.exists() and json.loads(done.read_text()) == argv:
        log(f"bench/{script}: reusing {log_path}")
        return log_path.read_text()
    log(f"running bench/{script} {' '.join(argv)} (log: {log_path})")
    start = time.perf_counter()
    with open(log_path, "w") as f:
        status = subprocess.run([sys.executable, str(BENCH / script), *argv], stdout=f, stderr=subprocess.STDOUT).returncode
    text = log_path.read_text()
    if status != 0:
        raise SystemExit(f"bench/{script} failed with status {status}; its output: {log_path}")
    done.write_text(json.dumps(argv))
    log(f"bench/{script} done in {time.perf_counter() - start:.0f}s")
    return text


def difficulty_argv(args: argparse.Namespace, out: Path, data: str) -> list[str]:
    return ["--out", str(out), "--data", data] + (["--quick"] if args.quick else [])


def sweep_argv(args: argparse.Namespace, out: Path, data: str) -> list[str]:
    return ["--model", str(out / "models" / f"spade-seed{args.model_seeds[0]}"), "--data", data, "--out", str(out / "sweep"),
            "--segmenter", str(out / "segmenter"), "--maps", str(args.sweep_maps), "--steps", "10,25,50",
            "--cache-intervals", "", "--precision", "bf16"]


def downstream_argv(args: argparse.Namespace, out: Path, data: str) -> list[str]:
    return ["--model", str(out / "models" / f"spade-seed{args.model_seeds[0]}"), "--data", data, "--out", str(out / "downstream"),
            "--n", *map(str, args.downstream_n), "--seeds", *map(str, args.segmenter_seeds), "--layouts-per-map", "1",
            "--segmenter-steps", str(args.downstream_steps), "--no-generated-only"]


def section(text: str, start: str, end: str | None = None) -> str:
    """The part of a bench's output from the line starting with `start` to the one starting with `end`."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(start))
    j = next((k for k in range(i + 1, len(lines)) if end and lines[k].startswith(end)), len(lines))
    return "\n".join(lines[i:j]).strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = world_difficulty.ensure_world(world_difficulty.SCENES, str(out / "data"), args.samples)
    difficulty = run_bench("world_difficulty.py", difficulty_argv(args, out, data), out / "difficulty.log")

    rows, (val, sheet) = table4(args, data, str(out / "segmenter"))
    t4 = table4_text(args, rows)
    log("\n" + t4)
    card = read_card(data)
    sheet_rows = [(m["label"], m["image"], np.stack([sheet[(s, seed)][i] for seed in args.model_seeds for s in ("spade", "concat")]))
                  for i, m in enumerate(val[:8])]
    storage.write_bytes(str(out / "contact_sheet.png"), contact_sheet_png(sheet_rows, card.palette, min_cell=96))

    sweep = run_bench("sampler_quality.py", sweep_argv(args, out, data), out / "sweep.log")
    downstream = run_bench("downstream.py", downstream_argv(args, out, data), out / "downstream.log")

    report = "\n\n".join([
        f"# The benchmark world, measured{' (--quick: the numbers mean nothing)' if args.quick else ''}",
        "## Difficulty (real images only)\n\n" + section(difficulty, "| world"),
        f"## Table 4 in miniature: {args.val_maps} validation maps x {args.k} samples, mean over model seeds "
        f"{', '.join(map(str, args.model_seeds))} (min-max)\n\n" + t4,
        "## Sampler sweep (SDM, first model seed)\n\n```\n" + section(sweep, "setting", "contact sheet") + "\n```",
        "## Downstream\n\n" + section(downstream, "machine:", "Caveat") + "\n\n" + section(downstream, "Caveat"),
        f"contact sheet (label | real | SDM, concat per model seed at s={args.guidance:g}): {out / 'contact_sheet.png'}; "
        f"wall time {time.perf_counter() - start:.0f}s",
    ])
    (out / "results.md").write_text(report + "\n")
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "table4": rows}, indent=1))
    print("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

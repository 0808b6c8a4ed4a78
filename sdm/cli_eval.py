"""`sdm eval --real REAL --generated GEN --out DIR`: FID, diversity and mIoU of a generated set.

The arguments are shared with `python -m jobs.evaluate`, which runs the same passes on Ray Data.
"""

from __future__ import annotations

import argparse
import sys
import time

from sdm.metrics.evaluate import METRICS, DEFAULT_METRICS, EvalSettings, evaluate, summary
from sdm.metrics.pretrained import ALEXNET_FILE, FID_INCEPTION_FILE, hub_checkpoint_dir
from sdm.metrics.scoring import ScoreSetFn, score_locally

HELP = "evaluate a generated dataset against a real one: FID, LPIPS diversity, mIoU, with a report"


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    try:
        size = (int(h), int(w or h))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW or N, got {text!r}") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return size


def _metrics(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown metrics {bad or text!r}; choose from {', '.join(METRICS)}")
    return names


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--real", required=True, help="the real dataset (shard format) or image folder")
    p.add_argument("--generated", required=True, help="the generated dataset (shard format) or image folder")
    p.add_argument("--out", required=True, help="report directory: results.json, report.md, PNGs")
    p.add_argument("--real-split", default="val", help="split of a real dataset ('all' for every split)")
    p.add_argument("--generated-split", default="all", help="split of a generated dataset")
    p.add_argument("--metrics", type=_metrics, default=DEFAULT_METRICS,
                   help=f"comma-separated, from {', '.join(METRICS)} (default: {','.join(DEFAULT_METRICS)})")
    p.add_argument("--inception-weights", help=f"pytorch-fid's {FID_INCEPTION_FILE} (default: {hub_checkpoint_dir()})")
    p.add_argument("--alexnet-weights", help=f"torchvision's {ALEXNET_FILE}, for LPIPS (default: {hub_checkpoint_dir()})")
    p.add_argument("--segmenter", default="builtin",
                   help="builtin (trained on the real dataset's train split, cached), a built-in segmenter directory, "
                        "a TorchScript file, or module:callable")
    p.add_argument("--segmenter-steps", type=int, default=300, help="training steps of the built-in segmenter")
    p.add_argument("--ignore-index", type=int, help="label id left out of mIoU (e.g. 0 for ADE20K's 'other')")
    p.add_argument("--size", type=_size, help="evaluation size HxW (default: the generated images' size)")
    p.add_argument("--max-real", type=int, help="use at most this many real images")
    p.add_argument("--diversity-maps", type=int, default=100, help="label maps whose samples are compared pairwise")
    p.add_argument("--sheet-maps", type=int, default=6, help="label maps on the contact sheet")
    p.add_argument("--sheet-samples", type=int, default=4, help="samples per label map on the contact sheet")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="torch device of the Inception and AlexNet backbones, e.g. cuda")
    p.add_argument("--cache-dir", help="feature statistics and trained segmenters (default: $SDM_CACHE or ~/.cache/sdm)")


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    return EvalSettings(
        real=args.real, generated=args.generated, out=args.out,
        real_split=None if args.real_split == "all" else args.real_split,
        generated_split=None if args.generated_split == "all" else args.generated_split,
        metrics=tuple(args.metrics), inception_weights=args.inception_weights, alexnet_weights=args.alexnet_weights,
        segmenter=args.segmenter, segmenter_steps=args.segmenter_steps, ignore_index=args.ignore_index, size=args.size,
        max_real=args.max_real, diversity_maps=args.diversity_maps, sheet_maps=args.sheet_maps,
        sheet_samples=args.sheet_samples, batch_size=args.batch_size, cache_dir=args.cache_dir, device=args.device,
    )


def run_eval(args: argparse.Namespace, score_set: ScoreSetFn = score_locally) -> int:
    start = time.perf_counter()
    results = evaluate(settings_from_args(args), score_set, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"evaluated {args.generated} against {args.real} in {time.perf_counter() - start:.1f}s")
    print(summary(results))
    return 0


def add_eval_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `eval` on the `sdm` command's subparsers."""
    p = subparsers.add_parser("eval", help=HELP, description=HELP)
    add_eval_arguments(p)
    p.set_defaults(func=run_eval)
    return p

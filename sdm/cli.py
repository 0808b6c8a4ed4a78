"""The `sdm` command line: presets, sampling from a model, and the command groups of the library."""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

from PIL import Image

from sdm import storage
from sdm.cli_convert import add_convert_command
from sdm.cli_data import add_data_commands
from sdm.cli_eval import add_eval_command
from sdm.config import get_preset, list_presets
from sdm.errors import EXIT_REFUSED, SDMError
from sdm.inference import add_fast_path_args, add_sampling_args, sampling_overrides
from sdm.progress import StageProgress
from sdm.runner import DEFAULT_MICRO_BATCH
from sdm.unet import SDMUNet, count_parameters


def cmd_params(args: argparse.Namespace) -> int:
    for name in args.presets or list_presets():
        cfg = get_preset(name)
        n = count_parameters(SDMUNet(cfg.model))
        h, w = cfg.model.image_size
        print(f"{name:<15}{n:>14,} parameters  {h}x{w}  {cfg.model.label_channels} label channels")
    return 0


def _read_id_png(uri: str) -> Image.Image:
    """A PNG, decoded; the pipeline's label encoder checks it is a map of ids."""
    try:
        image = Image.open(io.BytesIO(storage.read_bytes(uri)))
        image.load()
    except OSError as e:
        raise SDMError(f"{uri} is not a readable PNG: {e}") from None
    return image


def cmd_sample(args: argparse.Namespace) -> int:
    from sdm.pipeline import SDMPipeline

    pipe = SDMPipeline.from_pretrained(args.model, device=args.device, precision=args.precision, micro_batch=args.micro_batch,
                                       fast_path=args.fast_path, compile=args.compile)
    if args.compile:
        pipe.warm_up()  # compile before the clock starts
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    written = 0
    for i, uri in enumerate(args.labels):
        label = _read_id_png(uri)
        inst = _read_id_png(args.instances[i]) if args.instances else None
        progress = StageProgress(Path(uri).name)
        images = pipe(label, instances=inst, seed=args.seed + i, num_samples=args.num_samples, progress=progress,
                      **sampling_overrides(args))
        progress.close()
        for k, img in enumerate(images):
            Image.fromarray(img).save(out_dir / f"{Path(uri).stem}_{k}.png")
            written += 1
    print(f"wrote {written} images to {out_dir} in {time.perf_counter() - start:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdm", description="Semantic image synthesis with diffusion models, on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="print the parameter count of presets")
    p.add_argument("presets", nargs="*", help=f"preset names (default: all of {', '.join(list_presets())})")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("sample", help="generate images from label-map PNGs with a trained model")
    p.add_argument("--model", required=True, help="model URI: exported model, training run or converted checkpoint")
    p.add_argument("--labels", nargs="+", required=True, help="label-map PNGs of class ids")
    p.add_argument("--instances", nargs="*", help="instance-map PNGs, one per label map")
    p.add_argument("--out", required=True, help="output folder")
    add_sampling_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--micro-batch", type=int, default=DEFAULT_MICRO_BATCH,
                   help="rows per network call, as in the generation job: the same value gives the same bytes")
    add_fast_path_args(p)
    p.set_defaults(func=cmd_sample)

    add_data_commands(sub)
    add_convert_command(sub)
    add_eval_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SDMError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())

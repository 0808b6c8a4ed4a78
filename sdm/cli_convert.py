"""`sdm convert-official CKPT --preset NAME --out URI`: a released SDM checkpoint to this project's format.

Also runs alone: `python -m sdm.cli_convert CKPT --preset NAME --out URI`.
"""

from __future__ import annotations

import argparse
import sys
import time

from sdm.convert import OFFICIAL_PRESETS, convert_official
from sdm.errors import EXIT_REFUSED, SDMError

HELP = "convert a released SDM checkpoint (e.g. ema_0.9999_best.pt) to this project's model format"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="the released .pt state_dict: local path, file:// or s3:// URI")
    p.add_argument("--preset", required=True, choices=OFFICIAL_PRESETS, help="the dataset the checkpoint was trained on")
    p.add_argument("--out", required=True, help="model directory URI to write (config.json + model.safetensors)")


def add_convert_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `convert-official` on the `sdm` command's subparsers."""
    p = subparsers.add_parser("convert-official", help=HELP, description=HELP)
    _add_arguments(p)
    p.set_defaults(func=run_convert_command)
    return p


def run_convert_command(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    print(f"reading {args.checkpoint} (preset {args.preset}) ...", file=sys.stderr)
    r = convert_official(args.checkpoint, args.preset, args.out)
    print(
        f"converted {r.tensors} tensors ({r.parameters:,} parameters, {'/'.join(r.source_dtypes)} -> float32) "
        f"to {r.out} in {time.perf_counter() - start:.1f}s; use it with --model {r.out}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdm.cli_convert", description=HELP)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_convert_command(args)
    except SDMError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())

"""`sdm data ...`: make, pack and inspect datasets in the shard format."""

from __future__ import annotations

import argparse
import sys
import time

from sdm import storage
from sdm.data.card import CARD_FILE
from sdm.data.export import EXPORT_FILE, LAYOUTS as EXPORT_LAYOUTS, plan_export, run_export
from sdm.data.inspect import inspect_dataset
from sdm.data.packers import LAYOUTS, pack, report
from sdm.data.procedural import World, write_world
from sdm.data.scenes import SCENES
from sdm.data.toy import TOY
from sdm.errors import EXIT_FAILED, DatasetError, StorageError


def _store_failed(e: StorageError, dst: str) -> int:
    """A write that the store failed through every retry: the work started, so exit 1 (not 2, refused)."""
    print(f"error: {e}", file=sys.stderr)
    print(f"{dst} is unfinished (no {CARD_FILE}); rerun the same command to write it", file=sys.stderr)
    return EXIT_FAILED


# The procedural worlds: `toy` for the quick start and most tests, `scenes` the benchmark world; default sizes.
WORLDS: dict[str, tuple[World, int]] = {"toy": (TOY, 512), "scenes": (SCENES, 2048)}


def cmd_world(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    storage.resolve(args.dst)  # a malformed URI is refused before any work
    world = WORLDS[args.data_command][0]
    try:
        card = write_world(world, args.dst, n=args.n, size=args.size, seed=args.seed, val_fraction=args.val_fraction)
    except StorageError as e:
        return _store_failed(e, args.dst)
    splits = ", ".join(f"{v} {k}" for k, v in card.split_sizes.items())
    print(f"wrote the {world.name} dataset ({splits}; {len(card.shards)} shards) to {args.dst} in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    storage.resolve(args.dst)  # a malformed URI is refused before any work
    try:
        card, rejects = pack(args.layout, args.src, args.dst, shard_bytes=int(args.shard_mb * 2**20))
    except StorageError as e:
        return _store_failed(e, args.dst)
    return report(card, rejects, args.dst, args.skip_bad)


def _export_progress(split: str, done: int, total: int) -> None:
    print(f"\r{split}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


def cmd_export(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    plan = plan_export(args.src, args.dst, args.layout, args.split)  # refuses bad arguments before any write
    try:
        counts = run_export(plan, progress=_export_progress)
    except (StorageError, DatasetError) as e:  # the export started: exit 1, and say how to finish it
        print(f"error: {e}", file=sys.stderr)
        print(f"{args.dst} is unfinished (no {EXPORT_FILE}); rerun the same command to write it", file=sys.stderr)
        return EXIT_FAILED
    splits = ", ".join(f"{n} {s}" for s, n in counts.items())
    print(f"exported {args.src} as {args.layout} ({splits}) to {args.dst} in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    sheet = args.sheet or storage.join(args.uri, "contact_sheet.png")
    print(inspect_dataset(args.uri, sheet, n=args.n))
    return 0


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make, pack and inspect datasets").add_subparsers(dest="data_command", required=True)

    helps = {"toy": "write the procedural toy dataset (6 colour-coded classes, 32x32: fast)",
             "scenes": "write the procedural benchmark world (18 classes colour cannot tell apart, thin structures, 48x48)"}
    for name, (world, n) in WORLDS.items():
        p = data.add_parser(name, help=helps[name])
        p.add_argument("dst", help="output URI (local path, file:// or s3://)")
        p.add_argument("--n", type=int, default=n, help="number of samples")
        p.add_argument("--size", type=int, default=world.default_size, help="image side in pixels")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--val-fraction", type=float, default=0.125)
        p.set_defaults(func=cmd_world)

    p = data.add_parser("pack", help="pack a labelled dataset in its published layout into shards")
    p.add_argument("--layout", required=True, choices=sorted(LAYOUTS))
    p.add_argument("src", help="the dataset's root folder")
    p.add_argument("dst", help="output URI (local path, file:// or s3://)")
    p.add_argument("--shard-mb", type=float, default=256, help="target shard size in MiB")
    p.add_argument("--skip-bad", action="store_true", help="exit 0 even when samples were rejected")
    p.set_defaults(func=cmd_pack)

    p = data.add_parser("export", help="write a dataset in a layout that trainers read (ADE20K, Cityscapes, HF Parquet)")
    p.add_argument("src", help="a dataset in the shard format (packed or generated)")
    p.add_argument("dst", help="output URI (local path, file:// or s3://)")
    p.add_argument("--layout", required=True, choices=EXPORT_LAYOUTS)
    p.add_argument("--split", action="append", help="only this split (repeat for more; default: all)")
    p.set_defaults(func=cmd_export)

    p = data.add_parser("inspect", help="print a dataset's card and class histogram, write a contact sheet")
    p.add_argument("uri")
    p.add_argument("--n", type=int, default=8, help="samples on the contact sheet")
    p.add_argument("--sheet", help="contact sheet PNG URI (default: URI/contact_sheet.png)")
    p.set_defaults(func=cmd_inspect)

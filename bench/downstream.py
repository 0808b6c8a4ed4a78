"""Does synthetic data help a segmenter? The built-in segmenter trained on N real images, on N real + M generated,
and on M generated only, scored by mIoU on the real validation split; several N, since few real images is the
case synthetic data is for.

    python bench/downstream.py                      # N = 8 and 32, two training seeds: 12-14 minutes on 2 CPU cores
    python bench/downstream.py --quick              # N = 8, one seed, 100 segmenter steps: about 3 minutes
    python bench/downstream.py --n 8 32 128 --seeds 0 1 2 --out runs/downstream

Needs the quick start's model (`make quickstart`, or --model). The real data is the quick start's toy dataset
(512 samples, seed 0: the same train/val split), or --data. For each N, the first N training samples become
a dataset of their own, and the bulk generation job (jobs/generate.py, on a local Ray) draws from their label
maps only, three ways, each the same number M = N x (1 + L) x K of pairs:
  - layouts: every source map plus L new layouts made from it (flips, crops, regions of another of the N maps:
    --layouts-per-map), K images each;
  - layouts, filtered: the same, keeping pairs whose label consistency (per-sample mIoU over the classes of the
    map, by the built-in segmenter trained on the N real images only: the "real" row's, first seed; nothing from
    the validation split) reaches the median of the unfiltered run (or --min-consistency), redrawing the others
    with their next seed once (--max-retries): fewer than M may remain;
  - source maps: the N maps only, K x (1 + L) images each (what the new layouts add, at equal M).
The segmenter is then trained (same steps, batch and seed for all) on the real subset, on the real subset plus
each generated set, and on each generated set alone, and scored on every real validation image: mIoU and pixel
accuracy, the mean over --seeds (segmenter initialisation and batch order) with the range beside it. Segmenters
train in worker processes of one torch thread each, one beside the generation job (whose sampling actor takes the
other core), then two; a segmenter is a function of its data, steps and seed, so the table is the same whatever
the machine's load (only the times change).

Caveat printed with the table: the toy SDM model was trained on all 448 real training images, more than N, so the
generated images carry information from beyond the N real ones (it never saw the validation split). A fair
low-data study would train the generator on the N images too.
Everything lands under --out (a temporary directory by default); rerunning with the same --out reuses the
subsets, the generated sets (the job resumes) and the trained segmenters.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice

import numpy as np
import ray
import ray.data
import torch

from flops import cpu_model
from jobs import generate
from jobs.specs import GenerateSpec
from sdm import checkpoint, storage
from sdm.data.card import CARD_FILE, DatasetCard, read_card, withdraw_card, write_card
from sdm.data.shards import BASE_SCHEMA, ShardWriter, iter_rows, iter_samples
from sdm.data.toy import write_toy_dataset
from sdm.errors import EXIT_OK, EXIT_REFUSED, EXIT_REJECTS, SDMError
from sdm.metrics.segmenter import is_builtin, load_builtin, segment_scores, train_segmenter

DEFAULT_MODEL = "runs/quickstart/finetune"


@dataclass
class GenSet:
    """A generated dataset of one N, and how it was made."""

    name: str  # layouts | filtered | source
    uri: str
    layouts: str  # the table's "layouts" column
    filter: str  # the table's "filter" column
    size: int = 0
    consistency: float = float("nan")  # mean over its pairs
    seconds: float = 0.0


def write_dataset(dst: str, like: DatasetCard, rows: list[dict], name: str, extra: dict) -> None:
    """Rows (base columns only) as a one-split ("train") dataset with the classes of `like`, the card last."""
    withdraw_card(dst)
    writer = ShardWriter(dst, "train")
    for r in rows:
        writer.add({**{k: r.get(k) for k in BASE_SCHEMA.names}, "split": "train"})
    shards = writer.close()
    write_card(dst, DatasetCard(name, like.num_classes, like.class_names, like.palette, like.has_instance,
                                {"train": len(rows)}, shards, extra=extra))


def card_checksum(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(storage.join(uri, CARD_FILE))).hexdigest()


def run_job(spec: GenerateSpec, log_path: str) -> float:
    """The bulk generation job in this process (Ray already up), its output to a log file; returns seconds."""
    start = time.perf_counter()
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        status = generate.run(spec)
    if status not in (EXIT_OK, EXIT_REJECTS):
        raise SystemExit(f"the generation job for {spec.out} failed with status {status}; its output: {log_path}")
    return time.perf_counter() - start


def generated_stats(uri: str) -> tuple[int, float]:
    """(pairs, mean label consistency) of a generated dataset."""
    card = read_card(uri)
    c = card.extra.get("consistency") or {}
    if c.get("scored"):
        return sum(card.split_sizes.values()), float(c["mean"])
    vals = [r.get("consistency") for r in iter_rows(uri)]
    vals = [v for v in vals if v is not None and np.isfinite(v)]
    return sum(card.split_sizes.values()), float(np.mean(vals)) if vals else float("nan")


def median_consistency(uri: str) -> float:
    card = read_card(uri)
    c = card.extra.get("consistency") or {}
    if c.get("scored"):
        return float(c["median"])
    return float(np.median([r["consistency"] for r in iter_rows(uri)]))


_VAL: tuple[np.ndarray, np.ndarray, int] | None = None  # a training worker's validation images, labels, classes


def _init_worker(images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    global _VAL
    torch.set_num_threads(1)
    _VAL = (images, labels, num_classes)


def _train_and_score(data: str, uri: str, steps: int, seed: int) -> tuple[float, float, float, bool]:
    """In a worker: the built-in segmenter trained on `data` (or the one already at `uri`), scored on the real
    validation images: (mIoU, pixel accuracy, seconds, whether it was trained now)."""
    start = time.perf_counter()
    trained = not is_builtin(uri)
    seg = train_segmenter(data, uri, steps=steps, seed=seed, log=lambda msg: None) if trained else load_builtin(uri)
    assert _VAL is not None
    cm = segment_scores(seg, *_VAL)
    return cm.miou(), cm.pixel_accuracy(), time.perf_counter() - start, trained


class Trainer:
    """Trains and scores segmenters in worker processes of one torch thread each (two threads of one training
    give only ~1.6x on this kind of machine): `workers` beside the generation job, which keeps the other cores,
    then every core once generation is done (widen). Each segmenter is kept under --out by the card checksum of
    its data, steps and seed."""

    def __init__(self, out: str, val: tuple[np.ndarray, np.ndarray, int], steps: int, workers: int):
        self.out, self.steps, self.val = out, steps, val
        self.ctx = multiprocessing.get_context("spawn")  # never fork a process that holds Ray
        self.pools = [self._pool() for _ in range(workers)]
        self.tasks: dict[tuple[str, int], Future] = {}
        self.next = 0

    def _pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(1, mp_context=self.ctx, initializer=_init_worker, initargs=self.val)

    def uri(self, data: str, seed: int) -> str:
        return os.path.join(self.out, "segmenters", f"{card_checksum(data)[:16]}-steps{self.steps}-seed{seed}")

    def _send(self, data: str, seed: int) -> Future:
        pool = self.pools[self.next % len(self.pools)]
        self.next += 1
        return pool.submit(_train_and_score, data, self.uri(data, seed), self.steps, seed)

    def submit(self, data: str, seed: int) -> None:
        if (data, seed) not in self.tasks:
            self.tasks[(data, seed)] = self._send(data, seed)

    def result(self, data: str, seed: int) -> tuple[float, float, float, bool]:
        self.submit(data, seed)
        return self.tasks[(data, seed)].result()

    def widen(self, workers: int) -> None:
        """Up to `workers` processes; what has not started yet is spread over all of them."""
        self.pools += [self._pool() for _ in range(workers - len(self.pools))]
        for key, fut in list(self.tasks.items()):
            if fut.cancel():
                self.tasks[key] = self._send(*key)

    def close(self) -> None:
        for pool in self.pools:
            pool.shutdown()


def threshold_arg(text: str) -> str | float:
    if text == "median":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or median, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a label consistency is an mIoU, in [0, 1]; got {value}")
    return value


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="the SDM model (default: the quick start's)")
    p.add_argument("--data", help="real dataset with train and val splits (default: the quick start's toy dataset, rewritten)")
    p.add_argument("--out", help="intermediate data (default: a temporary directory, kept)")
    p.add_argument("--n", type=int, nargs="+", default=[8, 32], help="real training images")
    p.add_argument("--layouts-per-map", type=int, default=3, metavar="L", help="new layouts per source map")
    p.add_argument("--samples-per-label", type=int, default=1, metavar="K", help="images per (new or source) label map")
    p.add_argument("--min-consistency", type=threshold_arg, default="median",
                   help="the filter's threshold: a number, or median (that of the unfiltered run of the same N)")
    p.add_argument("--max-retries", type=int, default=1, help="redraws of a pair below the threshold")
    p.add_argument("--segmenter-steps", type=int, default=200, help="training steps of every segmenter (the filter's too)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="segmenter training seeds (mean and range reported)")
    p.add_argument("--sample-steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--gen-seed", type=int, default=0, help="the generation job's seed")
    p.add_argument("--no-generated-only", action="store_true", help="leave out the rows trained on generated pairs alone")
    p.add_argument("--quick", action="store_true", help="N = 8, one seed, 100 segmenter steps")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.seeds, args.segmenter_steps = [8], [0], 100
    wall_start = time.perf_counter()

    threshold = None if args.min_consistency == "median" else args.min_consistency
    if not storage.exists(args.model):
        print(f"error: no model at {args.model}: run `make quickstart` first (or give --model)", file=sys.stderr)
        return EXIT_REFUSED
    try:
        _, cfg = checkpoint.load_model(args.model)
    except SDMError as e:
        print(f"error: {args.model} is not a loadable model ({e}): run `make quickstart` first (or give --model)", file=sys.stderr)
        return EXIT_REFUSED
    model = storage.absolute(args.model)
    out = storage.absolute(args.out or tempfile.mkdtemp(prefix="bench-downstream-"))
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "generate.log")

    h, w = cfg.model.image_size
    if args.data:
        real = args.data
    else:
        real = os.path.join(out, "real")
        if not storage.exists(storage.join(real, CARD_FILE)):
            write_toy_dataset(real, n=512, size=h, seed=0)  # the quick start's data: its train/val split
    card = read_card(real)
    train_total = card.split_sizes.get("train", 0)
    if max(args.n) > train_total:
        print(f"error: N = {max(args.n)} but {real} has {train_total} training samples", file=sys.stderr)
        return EXIT_REFUSED
    val = list(iter_samples(real, split="val"))
    if not val:
        print(f"error: {real} has no val split to score on", file=sys.stderr)
        return EXIT_REFUSED
    val_images, val_labels = np.stack([s["image"] for s in val]), np.stack([s["label"] for s in val])
    cpus = os.cpu_count() or 1
    # Generation: one sampling actor with half the cores (its torch threads follow its CPUs; with all of them it is
    # no faster here, as the job's read/prepare/write tasks and the driver need a core too), segmenters training
    # on the rest meanwhile; then segmenters on every core.
    sampler_cpus = max(1, cpus // 2)
    trainer = Trainer(out, (val_images, val_labels, card.num_classes), args.segmenter_steps, max(1, cpus - sampler_cpus))
    ray.init(address="local", num_cpus=sampler_cpus + 1, include_dashboard=False, log_to_driver=False,
             _system_config={"worker_niceness": 0})  # at the driver's priority: Ray's nice 15 starves under other load
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the job turns progress reporting on at each run

    L, K = args.layouts_per_map, args.samples_per_label
    print(f"real data {real}: {train_total} train, {len(val)} val images of {w}x{h}, {card.num_classes} classes; "
          f"model {args.model}; output under {out}", flush=True)
    subsets = {}
    for n in args.n:
        subsets[n] = os.path.join(out, f"n{n}", "real")
        write_dataset(subsets[n], card, list(islice(iter_rows(real, split="train"), n)), f"{card.name}-first{n}",
                      {"subset_of": real, "first": n, "split": "train"})
    for seed in args.seeds:  # the first seed's first: the filters need them
        for n in args.n:
            trainer.submit(subsets[n], seed)

    rows: list[tuple[int, str, str, GenSet | None]] = []  # N, training data kind, its dataset, generated set
    gen_seconds = 0.0
    for n in args.n:
        subset = subsets[n]
        rows.append((n, "real", subset, None))
        # The filter's segmenter (it scores every pair) is the real-only one of the first seed: the N images only.
        trainer.result(subset, args.seeds[0])
        common = dict(model=model, labels=subset, segmenter=trainer.uri(subset, args.seeds[0]), seed=args.gen_seed,
                      sampling={"num_inference_steps": args.sample_steps}, cpus_per_worker=float(sampler_cpus), batch_size=16)
        sets = [GenSet("layouts", os.path.join(out, f"n{n}", "gen-layouts"), f"{L} per map", "-"),
                GenSet("filtered", os.path.join(out, f"n{n}", "gen-layouts-filtered"), f"{L} per map", ""),
                GenSet("source", os.path.join(out, f"n{n}", "gen-source"), "source maps only", "-")]
        real_rows = list(iter_rows(subset))
        for s in sets:
            spec_kw: dict = dict(samples_per_label=K, layouts_per_map=L)
            if s.name == "filtered":
                t = threshold if threshold is not None else median_consistency(sets[0].uri)
                t = float(f"{t:.4f}")  # as printed
                spec_kw.update(min_consistency=t, max_retries=args.max_retries)
                s.filter = f">= {t:.4f}{' (median)' if threshold is None else ''}, {args.max_retries} redraw"
            elif s.name == "source":
                spec_kw = dict(samples_per_label=K * (1 + L), layouts_per_map=0)
            s.seconds = run_job(GenerateSpec(out=s.uri, **common, **spec_kw), log_path)
            gen_seconds += s.seconds
            s.size, s.consistency = generated_stats(s.uri)
            print(f"N={n}: generated {s.name}: {s.size} pairs in {s.seconds:.0f}s, mean label consistency {s.consistency:.4f}"
                  + (f", filter {s.filter}" if s.name == "filtered" else ""), flush=True)
            both = os.path.join(out, f"n{n}", f"real+{s.name}")
            write_dataset(both, card, real_rows + list(iter_rows(s.uri)), f"{card.name}-first{n}+{s.name}",
                          {"real": subset, "generated": s.uri})
            rows.append((n, "real + generated", both, s))
            if not args.no_generated_only:
                rows.append((n, "generated", s.uri, s))
            for data in [both] if args.no_generated_only else [both, s.uri]:
                for seed in args.seeds:
                    trainer.submit(data, seed)
    ray.shutdown()
    trainer.widen(cpus)

    results = []
    train_seconds, trained = 0.0, 0
    for n, kind, data, s in rows:
        runs = [trainer.result(data, seed) for seed in args.seeds]
        train_seconds += sum(r[2] for r in runs)
        trained += sum(r[3] for r in runs)
        results.append((n, s.size if s else 0, kind, s.filter if s else "-", s.layouts if s else "-",
                        [r[0] for r in runs], [r[1] for r in runs], s.consistency if s else float("nan")))
        print(f"N={n} M={results[-1][1]} {kind} ({s.name if s else 'real'}): mIoU {fmt(results[-1][5])}", flush=True)
    trainer.close()

    wall = time.perf_counter() - wall_start
    seeds = f"mean over seeds {', '.join(map(str, args.seeds))} (min-max)" if len(args.seeds) > 1 else f"seed {args.seeds[0]}"
    print(f"\nmachine: {cpu_model()}, {cpus} cores; torch {torch.__version__}, ray {ray.__version__}; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"segmenter: built-in TinySegNet, {args.segmenter_steps} steps of batch 32, {seeds}; scored on {len(val)} real "
          f"validation images. Generation: {args.model}, seed {args.gen_seed}, L={L} new layouts per map, K={K}; "
          "gen. consistency: mean over the set's pairs, by the filter's segmenter (the real-only one, first seed).")
    print(f"wall {wall:.0f}s: generation jobs {gen_seconds:.0f}s; {trained} segmenters trained and "
          f"{len(results) * len(args.seeds)} scored in {train_seconds:.0f}s of one-thread worker time, beside generation "
          f"on {max(1, cpus - sampler_cpus)} core(s), then on {cpus}\n")
    print("| N | M | training data | filter | layouts | gen. consistency | mIoU | pixel acc. |")
    print("| ---: | ---: | --- | --- | --- | ---: | --- | --- |")
    for n, m, kind, filt, lay, mious, accs, cons in results:
        c = "-" if np.isnan(cons) else f"{cons:.4f}"
        print(f"| {n} | {m} | {kind} | {filt} | {lay} | {c} | {fmt(mious)} | {fmt(accs)} |")
    trained_on = ("the quick start's SDM model was trained on all 448 real training images (never the validation split)"
                  if args.data is None and args.model == DEFAULT_MODEL else "the SDM model was trained on its own data")
    print(f"\nCaveat: {trained_on}; with fewer real images than that, the generated images carry information from "
          "beyond the N real ones. A fair low-data study would train the generator on the N images too. "
          "M = generated pairs (the filtered sets keep fewer). Differences within the seed range are noise.")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

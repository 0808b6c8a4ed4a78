"""What checking every shard against its card costs the jobs' Ray Data reads: the same read with the check and
without it, alternating in one run, as rows/s and their ratio (target >= 0.95 where the rows are also decoded).

    python bench/read_integrity.py                     # toy data at 64x64, 2048 samples in 8 MiB shards
    python bench/read_integrity.py --n 8192 --size 128 --rounds 5

Two pipelines, each timed with (jobs.ray_setup.read_shards, as the jobs read) and without the check (verify=False):
the read alone (shards to Arrow blocks: the worst case, where the sha256 is the only other work), and the training
job's input pipeline (the read, then every row decoded and augmented by jobs.train_data.TrainBatch, as each
training worker does). The check hashes the bytes each read task has already read, so its cost is the sha256 of
the data (hashlib, one core) and nothing is read twice.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray
import ray.data

from flops import machine_line
from jobs.ray_setup import read_shards
from jobs.train_data import TrainBatch
from sdm.config import get_preset
from sdm.data.toy import write_toy_dataset


def read_only(uri: str, shards: list, verify: bool) -> int:
    return sum(len(b["key"]) for b in read_shards(uri, shards, verify=verify).iter_batches(batch_size=256, batch_format="numpy"))


def read_and_decode(uri: str, shards: list, verify: bool, collate: TrainBatch) -> int:
    return sum(len(collate(b)["key"]) for b in read_shards(uri, shards, verify=verify).iter_batches(batch_size=64, batch_format="numpy"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--shard-mb", type=float, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        card = write_toy_dataset(f"{tmp}/toy", n=args.n, size=args.size, seed=0, shard_bytes=int(args.shard_mb * 2**20))
        mib = sum(s.bytes for s in card.shards) / 2**20
        print(f"data: {args.n} toy samples at {args.size}x{args.size}, {len(card.shards)} shards, {mib:.1f} MiB")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        cfg = get_preset("tiny")  # 32x32: every row is decoded and resized to it
        collate = TrainBatch(cfg, card.has_instance)
        pipelines = {"read": lambda v: read_only(f"{tmp}/toy", card.shards, v),
                     "read+decode": lambda v: read_and_decode(f"{tmp}/toy", card.shards, v, collate)}
        for fn in pipelines.values():  # warm-up: worker processes started, imports done
            fn(True)
        times = {(name, v): [] for name in pipelines for v in (True, False)}
        for _ in range(args.rounds):
            for name, fn in pipelines.items():
                for v in (False, True):
                    start = time.perf_counter()
                    rows = fn(v)
                    times[(name, v)].append(time.perf_counter() - start)
                    assert rows == args.n
        ray.shutdown()
    for name in pipelines:
        checked, unchecked = min(times[(name, True)]), min(times[(name, False)])
        print(f"{name:12s} checked {args.n / checked:8.0f} rows/s ({mib / checked:6.1f} MiB/s), unchecked "
              f"{args.n / unchecked:8.0f} rows/s: ratio checked/unchecked {unchecked / checked:.3f} "
              f"(best of {args.rounds} rounds)")


if __name__ == "__main__":
    main()

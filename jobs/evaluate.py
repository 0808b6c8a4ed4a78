"""`sdm eval` with the passes over each image set on Ray Data: parallel feature extraction for large sets.

    python -m jobs.evaluate --real s3://bucket/ade20k --generated s3://bucket/gen/ade20k-x4 --out s3://bucket/eval/x4 \
        --concurrency 4 --num-gpus-per-worker 1 --device cuda --ignore-index 0
    ray job submit --working-dir . -- python -m jobs.evaluate ...

Takes every `sdm eval` argument. Shards (or image files) stream through an actor pool; each actor builds the
extractors and segmenter once and returns per-batch partial sums (features, confusion matrices) that the driver
adds up. Diversity and the contact sheet, which need only --diversity-maps label maps, run on the driver.
"""

from __future__ import annotations

import argparse
import pickle
import posixpath
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import ray.data

from jobs.ray_setup import actor_pool, init_ray, integrity_failure, parse_concurrency, read_shards
from sdm import storage
from sdm.cli_eval import add_eval_arguments, run_eval
from sdm.imageio import decode_ids, decode_image
from sdm.errors import EXIT_FAILED, EXIT_REFUSED, SDMError, ShardIntegrityError
from sdm.metrics.image_sets import ImageSet, resize_item
from sdm.metrics.scoring import Partial, ScoreSpec, SetScorer, merge


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.splitlines()[0])
    add_eval_arguments(p)
    p.add_argument("--concurrency", type=parse_concurrency, default=1, help="scoring actors: N, or MIN-MAX to autoscale")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--num-gpus-per-worker", type=float, default=0.0)
    p.add_argument("--address", help="Ray address, or auto for the running cluster (default: RAY_ADDRESS, else a new local one)")
    args = p.parse_args(argv)
    # The actors read these; a segmenter may also be module:callable, which is no path.
    for name in ("real", "generated", "cache_dir", "segmenter"):
        value = getattr(args, name)
        if value and (name != "segmenter" or storage.exists(value)):
            setattr(args, name, storage.absolute(value))
    return args


class ScoreBatch:
    """A scoring actor: decodes and resizes a batch of rows, and returns its partial results, pickled."""

    def __init__(self, spec: ScoreSpec, size: tuple[int, int], image_set: ImageSet):
        self.scorer, self.size, self.set = SetScorer(spec), size, image_set

    def _item(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        if "path" not in row:  # a shard row
            return decode_image(row["image"], f"image of sample {row['key']!r}"), decode_ids(row["label"], f"label of sample {row['key']!r}")
        name = posixpath.basename(row["path"])
        label_name = f"{posixpath.splitext(name)[0]}.png"
        label = None
        if label_name in self.set.label_files:
            label = decode_ids(storage.read_bytes(storage.join(self.set.uri, "labels", label_name)), f"label map {label_name}")
        return decode_image(row["bytes"], f"image {name}"), label

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        items = [resize_item(*self._item(r), self.size) for r in rows]
        labels = [lab for _, lab in items]
        partial = self.scorer(np.stack([img for img, _ in items]), np.stack(labels) if all(x is not None for x in labels) else None, self.set.uri)
        return {"partial": np.array([pickle.dumps(partial)], dtype=object)}


def _rows(s: ImageSet) -> ray.data.Dataset:
    if s.card is not None:  # each shard checked against the card as it is read
        return read_shards(s.uri, [sh for sh in s.card.shards if s.split is None or sh.split == s.split], ["key", "image", "label"])
    fs, _ = storage.resolve(s.uri)
    paths = [storage.resolve(storage.join(s.image_dir, name))[1] for name in s.files]
    return ray.data.read_binary_files(paths, filesystem=fs, include_paths=True)


def ray_score_set(args: argparse.Namespace) -> Callable[..., Partial]:
    """A ScoreSetFn running on the Ray cluster with the job's actor settings."""

    def score(s: ImageSet, spec: ScoreSpec, size: tuple[int, int], batch_size: int, limit: int | None,
              log: Callable[[str], None]) -> Partial:
        ray.data.DataContext.get_current().execution_options.preserve_order = True  # --max-real takes the same rows as sdm eval
        ds = _rows(s)
        if limit is not None:
            ds = ds.limit(limit)
        parts = ds.map_batches(ScoreBatch, fn_constructor_kwargs={"spec": spec, "size": size, "image_set": s},
                               batch_size=batch_size, batch_format="numpy", compute=actor_pool(args.concurrency),
                               num_cpus=args.cpus_per_worker, num_gpus=args.num_gpus_per_worker)
        total: Partial = {}
        for i, row in enumerate(parts.iter_rows(), 1):
            total = merge(total, pickle.loads(row["partial"]))
            log(f"  {s.uri}: {i} batches scored")
        return total

    return score


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not ray.is_initialized():
        init_ray(args.address)
    try:
        return run_eval(args, ray_score_set(args))
    except ShardIntegrityError as e:  # found while scoring: the work started and stops, naming the shard and card
        print(f"error: {integrity_failure(e)}", file=sys.stderr)
        return EXIT_FAILED
    except SDMError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())

"""Bulk guided sampling on Ray Data: label maps in, a synthetic segmentation dataset out.

    python -m jobs.generate --model MODEL_URI --labels LABELS_URI --out OUT_URI --samples-per-label 4
    ray job submit --working-dir . -- python -m jobs.generate --model s3://... --labels s3://... --out s3://...

LABELS_URI is a dataset in the shard format (with its dataset.json) or a folder of label PNGs (with
--instances naming a folder of same-named instance PNGs). Rerunning the same command on an existing output
skips what is complete. Exit status (sdm.errors): 0 when every item was written; 3 when some input items were
rejected (listed in OUT_URI/rejects.jsonl); 2 when the job was refused before starting; 1 when it started and
failed, e.g. the object store failed a write through every retry (AWS_MAX_ATTEMPTS, see sdm/storage.py): then
an `error:` line names the URI, the output has no card (nothing there looks complete), and rerunning the same
command finishes it, keeping every shard already written.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray
import ray.data

from sdm import checkpoint, storage
from sdm.config import SDMConfig
from sdm.data.card import CARD_FILE, DatasetCard, ShardInfo, read_card
from sdm.imageio import decode_ids, encode_png
from jobs.ray_setup import actor_pool, init_ray, parse_concurrency
from jobs.specs import GenerateSpec, from_namespace
from sdm.errors import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, EXIT_REJECTS, DatasetError, InvalidInputError, SDMError, StorageError
from sdm.generate import (
    GenerationOutput,
    GenerationSettings,
    Reject,
    check_source_card,
    generated_row,
    load_item,
    output_key,
    sample_images,
    sample_seed,
)
from sdm.labels import default_palette
from sdm.pipeline import SDMPipeline
from sdm.samplers import SAMPLERS
from sdm.sampling import DEFAULT_MICRO_BATCH, SamplingParams

def parse_args(argv: list[str] | None = None) -> GenerateSpec:
    p = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="exported model, training run, or converted official checkpoint")
    p.add_argument("--labels", required=True, help="a dataset (shards + dataset.json) or a folder of label PNGs")
    p.add_argument("--instances", help="folder of instance PNGs named like the label PNGs (folder sources)")
    p.add_argument("--split", help="dataset sources: only this split (default: all)")
    p.add_argument("--out", required=True, help="output URI: a dataset in the shard format")
    p.add_argument("--format", choices=["shards", "folder"], default="shards",
                   help="folder: also images/<key>_<k>.png and labels/<key>_<k>.png")
    p.add_argument("--samples-per-label", type=int, default=1, metavar="K")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: the model's")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--eta", type=float, help="DDIM eta (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="rows per call of a sampling actor")
    p.add_argument("--micro-batch", type=int, default=DEFAULT_MICRO_BATCH,
                   help="rows per network call; part of the settings, as it can change rounding")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--shard-rows", type=int, default=256, help="generated rows per output shard")
    p.add_argument("--max-aspect-change", type=float, default=0.05,
                   help="reject label maps whose aspect ratio differs more than this from the model's")
    p.add_argument("--num-gpus-per-worker", type=float, default=0.0)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--concurrency", type=parse_concurrency, default=1, help="sampling actors: N, or MIN-MAX to autoscale")
    p.add_argument("--address", help="Ray address, or auto for the running cluster (default: RAY_ADDRESS, else a new local one)")
    return from_namespace(GenerateSpec, p.parse_args(argv))


@dataclass
class LabelSource:
    uri: str
    card: DatasetCard | None  # None: a folder of PNGs
    split: str | None = None
    files: list[str] = field(default_factory=list)
    instances_uri: str | None = None
    instance_files: set[str] = field(default_factory=set)


@dataclass
class Plan:
    config: SDMConfig
    settings: GenerationSettings
    source: LabelSource
    base_card: DatasetCard
    output: GenerationOutput
    done: set[str]


def _check_numbers(args: GenerateSpec) -> None:
    for name in ("samples_per_label", "batch_size", "micro_batch", "shard_rows"):
        if getattr(args, name) < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_aspect_change", "num_gpus_per_worker", "cpus_per_worker"):
        if not getattr(args, name) >= 0:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")


def _label_source(args: GenerateSpec, cfg: SDMConfig) -> LabelSource:
    if storage.exists(storage.join(args.labels, CARD_FILE)):
        card = read_card(args.labels)
        check_source_card(card, args.labels, cfg, args.model)
        if args.split and args.split not in {s.split for s in card.shards}:
            raise DatasetError(f"dataset {args.labels} has no split {args.split!r}")
        return LabelSource(args.labels, card, args.split)
    files = storage.list_files(args.labels, ".png")
    if not files:
        raise DatasetError(f"{args.labels} holds neither a dataset ({CARD_FILE}) nor label PNGs")
    inst = set(storage.list_files(args.instances, ".png")) if args.instances else set()
    return LabelSource(args.labels, None, files=files, instances_uri=args.instances, instance_files=inst)


def _base_card(source: LabelSource, cfg: SDMConfig, args: GenerateSpec, settings: GenerationSettings) -> DatasetCard:
    """What the output card says besides its shards: the source's classes and how it was generated."""
    extra = {"generation": {**settings.to_dict(), "model": args.model, "source": args.labels,
                            "samples_per_label": args.samples_per_label}}
    if source.card is not None:
        c = source.card
        return DatasetCard(f"{c.name}-generated", c.num_classes, c.class_names, c.palette, c.has_instance, extra=extra)
    n = cfg.model.num_classes
    names, palette = checkpoint.load_classes(args.model) or ([f"class_{i}" for i in range(n)], default_palette(n))
    return DatasetCard("generated", n, names, [list(c) for c in palette], bool(source.instance_files), extra=extra)


def plan_job(args: GenerateSpec) -> Plan:
    """Everything that can refuse the job, checked before any worker starts."""
    _, cfg = checkpoint.load_model(args.model)  # the weights must load and fit their config
    params = SamplingParams.resolve(cfg.sampling, cfg.diffusion.num_timesteps, args.guidance, args.steps, args.sampler, args.eta)
    _check_numbers(args)
    settings = GenerationSettings(
        model_id=checkpoint.model_id(args.model), sampler=params.sampler, steps=params.num_inference_steps,
        guidance=float(params.guidance_scale), seed=args.seed, eta=float(params.eta), micro_batch=args.micro_batch,
        precision=args.precision,
        output_format=args.format,
    )
    source = _label_source(args, cfg)
    output = GenerationOutput(args.out)
    output.claim(settings)
    return Plan(cfg, settings, source, _base_card(source, cfg, args, settings), output, output.completed_keys())


# Ray Data stages. Rows between them: source_key, k, split, label and instance PNG bytes at the model's
# size (b"" for no instance map), and reject: "" or why the item was rejected (then k = -1).


def _folder_row(row: dict[str, Any], instances_uri: str | None, instance_files: set[str]) -> dict[str, Any]:
    name = posixpath.basename(row["path"])
    inst = storage.read_bytes(storage.join(instances_uri, name)) if name in instance_files else None
    return {"key": posixpath.splitext(name)[0], "split": "train", "label": row["bytes"], "instance": inst}


def _prepare(row: dict[str, Any], config: SDMConfig, samples: int, done: set[str], max_aspect_change: float) -> list[dict[str, Any]]:
    """One source row -> a row per sample still to generate, or one reject row."""
    key, split = row["key"], row["split"]
    todo = [k for k in range(samples) if output_key(key, k) not in done]
    if not todo:
        return []
    try:
        item = load_item(key, row["label"], row["instance"], config, max_aspect_change)
    except (InvalidInputError, DatasetError) as e:
        return [{"source_key": key, "k": -1, "split": split, "label": b"", "instance": b"", "reject": str(e)}]
    label = encode_png(item["label"])
    inst = encode_png(item["instance"]) if item["instance"] is not None else b""
    return [{"source_key": key, "k": k, "split": split, "label": label, "instance": inst, "reject": ""} for k in todo]


class SampleBatch:
    """A sampling actor: loads the model once, then fills in images for batches of rows."""

    def __init__(self, model_uri: str, settings: dict[str, Any]):
        self.settings = GenerationSettings(**settings)
        self.pipe = SDMPipeline.from_pretrained(model_uri, precision=self.settings.precision, micro_batch=self.settings.micro_batch)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        h, w = self.pipe.config.model.image_size
        ok = np.flatnonzero(batch["reject"] == "")
        images = np.zeros((len(batch["reject"]), h, w, 3), dtype=np.uint8)
        if ok.size:
            keys, ks = batch["source_key"][ok], batch["k"][ok]
            labels = [decode_ids(batch["label"][i], f"label map {batch['source_key'][i]!r}") for i in ok]
            insts = [decode_ids(b, "instance map") if len(b) else None for b in batch["instance"][ok]]
            seeds = [sample_seed(self.settings.seed, key, int(k)) for key, k in zip(keys, ks)]
            images[ok] = sample_images(self.pipe, labels, insts, seeds, self.settings)
        return {**batch, "image": images}


def _write(batch: dict[str, np.ndarray], out_uri: str, settings: dict[str, Any]) -> dict[str, list[str]]:
    """Encode and publish a batch of generated rows as shards; returns one record per shard and per reject."""
    s = GenerationSettings(**settings)
    rows, records = [], []
    for i, reason in enumerate(batch["reject"]):
        key = str(batch["source_key"][i])
        if reason:
            records.append(("reject", json.dumps(asdict(Reject(key, str(batch["split"][i]), str(reason))))))
            continue
        inst = batch["instance"][i]
        rows.append(generated_row(key, int(batch["k"][i]), str(batch["split"][i]), batch["image"][i],
                                  batch["label"][i], inst if len(inst) else None, s))
    if rows:
        try:
            infos = GenerationOutput(out_uri).write(rows, s.output_format == "folder")
        except StorageError as e:  # the store failed a write through every retry: the driver stops the job
            return {"kind": ["store_error"], "value": [str(e)]}  # (raised, it would reach the driver only as text)
        records += [("shard", json.dumps(asdict(info))) for info in infos]
    return {"kind": [r[0] for r in records], "value": [r[1] for r in records]}


def _source_rows(src: LabelSource) -> ray.data.Dataset:
    fs, _ = storage.resolve(src.uri)
    if src.card is not None:
        shards = [s for s in src.card.shards if src.split is None or s.split == src.split]
        paths = [storage.resolve(storage.join(src.uri, s.path))[1] for s in shards]
        return ray.data.read_parquet(paths, filesystem=fs).select_columns(["key", "split", "label", "instance"])
    paths = [storage.resolve(storage.join(src.uri, name))[1] for name in src.files]
    return ray.data.read_binary_files(paths, filesystem=fs, include_paths=True).map(
        _folder_row, fn_kwargs={"instances_uri": src.instances_uri, "instance_files": src.instance_files}
    )


def build_pipeline(plan: Plan, args: GenerateSpec) -> ray.data.Dataset:
    """read -> decode/validate/preprocess -> sample on an actor pool -> encode + write; streamed end to end."""
    settings = plan.settings.to_dict()
    items = _source_rows(plan.source).flat_map(
        _prepare, fn_kwargs={"config": plan.config, "samples": args.samples_per_label, "done": plan.done,
                             "max_aspect_change": args.max_aspect_change}
    ).repartition(target_num_rows_per_block=args.batch_size)  # one actor call per block: spreads work over the pool
    images = items.map_batches(
        SampleBatch, fn_constructor_kwargs={"model_uri": args.model, "settings": settings},
        batch_size=args.batch_size, batch_format="numpy", compute=actor_pool(args.concurrency),
        num_cpus=args.cpus_per_worker, num_gpus=args.num_gpus_per_worker,
    )
    return images.map_batches(
        _write, fn_kwargs={"out_uri": args.out, "settings": settings},
        batch_size=args.shard_rows, batch_format="numpy",
    )


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: GenerateSpec) -> int:
    """Plan (refusing bad input before any worker starts), generate, finalise; returns the exit status."""
    try:
        plan = plan_job(args)
    except SDMError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    if not ray.is_initialized():
        init_ray(args.address)
    ray.data.DataContext.get_current().enable_progress_bars = True  # the training job may have turned them off
    start = time.perf_counter()
    shards: list[ShardInfo] = []
    rejects: list[Reject] = []
    try:
        for row in build_pipeline(plan, args).iter_rows():
            if row["kind"] == "shard":
                shards.append(ShardInfo(**json.loads(row["value"])))
            elif row["kind"] == "store_error":
                raise StorageError(row["value"])  # leaving the loop stops the dataset
            else:
                rejects.append(Reject(**json.loads(row["value"])))
        card = plan.output.finalize(plan.base_card, rejects)
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"{args.out} is unfinished (no {CARD_FILE}); rerun the same command to finish it", file=sys.stderr)
        return EXIT_FAILED
    wall = time.perf_counter() - start
    written = sum(s.rows for s in shards)
    total = sum(card.split_sizes.values())
    print(
        f"generated {written} images in {wall:.1f}s ({written / wall:.2f} images/s); {len(plan.done)} were already "
        f"there; {len(rejects)} label maps rejected{' (see ' + storage.join(args.out, 'rejects.jsonl') + ')' if rejects else ''}"
    )
    print(f"output: {args.out} ({total} images in {len(card.shards)} shards, card {CARD_FILE})")
    return EXIT_REJECTS if rejects else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

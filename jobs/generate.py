"""Bulk guided sampling on Ray Data: label maps in, a synthetic segmentation dataset out.

    python -m jobs.generate --model MODEL_URI --labels LABELS_URI --out OUT_URI --samples-per-label 4
    ray job submit --working-dir . -- python -m jobs.generate --model s3://... --labels s3://... --out s3://...

LABELS_URI is a dataset in the shard format (with its dataset.json) or a folder of label PNGs (with
--instances naming a folder of same-named instance PNGs). Every pair is scored for label consistency by a
segmenter stage (the built-in segmenter trained on the source dataset by default); --min-consistency keeps the
pairs at or above a threshold, redrawing the others with their next seed up to --max-retries times.
--layouts-per-map N adds N new label maps per source map (flips, crops, regions of another map). Rerunning the
same command on an existing output skips what is complete. Exit status (sdm.errors): 0 when every item was written; 3 when some input items were
rejected (listed in OUT_URI/rejects.jsonl, as are the pairs left out below --min-consistency, which alone
still exit 0); 2 when the job was refused before starting; 1 when it started and
failed, e.g. the object store failed a write through every retry (AWS_MAX_ATTEMPTS, see sdm/storage.py): then
an `error:` line names the URI, the output has no card (nothing there looks complete), and rerunning the same
command finishes it, keeping every shard already written.
"""

from __future__ import annotations

import argparse
import hashlib
import posixpath
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import ray.data
import torch

from sdm import checkpoint, storage
from sdm.config import SDMConfig
from sdm.data.card import CARD_FILE, DatasetCard, ShardInfo, check_classes_match, read_card
from sdm.data.rejects import REJECTS_FILE, Reject
from sdm.imageio import decode_ids, encode_png
from sdm.inference import add_fast_path_args, add_sampling_args
from jobs.ray_setup import actor_pool, init_ray, parse_concurrency, read_shards
from jobs.specs import GenerateSpec, from_namespace
from jobs.stage_rows import Redraw, Rejected, ShardWritten, StageRecord, StoreFailed, from_row, to_rows
from sdm.errors import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, EXIT_REJECTS, DatasetError, InvalidInputError, SDMError, StorageError
from sdm.data.layouts import layout_key, new_layout, partner_key
from sdm.data.shards import iter_rows
from sdm.generated_dataset import (
    Draw,
    GenerationOutput,
    GenerationSettings,
    CONSISTENCY_REJECT,
    consistency_reject,
    generated_row,
    load_item,
    output_key,
    passes,
    sample_images,
    sample_seed,
)
from sdm.metrics.consistency import score_pairs
from sdm.metrics.evaluate import builtin_segmenter, default_cache_dir
from sdm.metrics.image_sets import open_set
from sdm.metrics.segmenter import SEGMENTER_CONFIG, SEGMENTER_WEIGHTS, is_builtin, load_segmenter
from sdm.labels import default_classes
from sdm.pipeline import SDMPipeline
from sdm.runner import DEFAULT_MICRO_BATCH
from sdm.seeds import derive_seed

# The scoring actors reserve no CPU: a fraction would leave the 1-CPU read and write tasks unschedulable next to a
# 1-CPU sampler on a 2-CPU node (a deadlock); they run one thread each, a small net beside the sampler.
SCORER_CPUS = 0

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
    add_sampling_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="rows per call of a sampling actor")
    p.add_argument("--micro-batch", type=int, default=DEFAULT_MICRO_BATCH,
                   help="rows per network call; part of the settings, as it can change rounding")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    add_fast_path_args(p)
    p.add_argument("--shard-rows", type=int, default=256, help="generated rows per output shard")
    p.add_argument("--max-aspect-change", type=float, default=0.05,
                   help="reject label maps whose aspect ratio differs more than this from the model's")
    p.add_argument("--segmenter", default="builtin",
                   help="scores label consistency: builtin (trained on --segmenter-data, cached), a built-in segmenter "
                        "directory, a TorchScript file, module:callable, or none")
    p.add_argument("--segmenter-data", help="dataset whose train split the built-in segmenter trains on (default: --labels)")
    p.add_argument("--segmenter-steps", type=int, default=300, help="training steps of the built-in segmenter")
    p.add_argument("--cache-dir", help="trained segmenters (default: $SDM_CACHE or ~/.cache/sdm, as sdm eval)")
    p.add_argument("--min-consistency", type=float, help="keep pairs whose label consistency (mIoU) is at least this")
    p.add_argument("--max-retries", type=int, default=0, help="redraws of a pair below --min-consistency, each with its next seed")
    p.add_argument("--layouts-per-map", type=int, default=0, metavar="N", help="N new label maps per source map")
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
    segmenter_uri: str | None = None  # what the scoring actors load; None: pairs are not scored
    layouts: list[dict[str, Any]] = field(default_factory=list)  # new label-map rows, as source rows


def _check_numbers(args: GenerateSpec) -> None:
    for name in ("samples_per_label", "batch_size", "micro_batch", "shard_rows"):
        if getattr(args, name) < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_aspect_change", "num_gpus_per_worker", "cpus_per_worker", "max_retries", "layouts_per_map"):
        if not getattr(args, name) >= 0:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.segmenter_steps < 1:
        raise InvalidInputError(f"--segmenter-steps must be >= 1, got {args.segmenter_steps}")
    if args.min_consistency is not None and not 0 <= args.min_consistency <= 1:
        raise InvalidInputError(f"--min-consistency is an mIoU, between 0 and 1; got {args.min_consistency}")
    if args.max_retries and args.min_consistency is None:
        raise InvalidInputError("--max-retries redraws pairs below --min-consistency; give --min-consistency too")


def _label_source(args: GenerateSpec, cfg: SDMConfig) -> LabelSource:
    if storage.exists(storage.join(args.labels, CARD_FILE)):
        card = read_card(args.labels)
        check_classes_match(card, args.labels, cfg, args.model)
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
    source_card = None if source.card is None else hashlib.sha256(storage.read_bytes(storage.join(source.uri, CARD_FILE))).hexdigest()
    extra = {"generation": {**settings.to_dict(), "model": args.model, "source": args.labels, "source_split": source.split,
                            "source_card_sha256": source_card, "samples_per_label": args.samples_per_label,
                            "layouts_per_map": args.layouts_per_map,
                            "seeds": "sample k of label map `key`, draw a: noise seed derive_seed(call seed, k) with call "
                                         "seed derive_seed(seed, key) for a = 0, else derive_seed(seed, key, 'attempt', a)"}}
    if source.card is not None:
        c = source.card
        return DatasetCard(f"{c.name}-generated", c.num_classes, c.class_names, c.palette, c.has_instance, extra=extra)
    n = cfg.model.num_classes
    names, palette = checkpoint.load_classes(args.model) or default_classes(n)
    return DatasetCard("generated", n, names, [list(c) for c in palette], bool(source.instance_files), extra=extra)


def _segmenter_choice(args: GenerateSpec, source: LabelSource, cfg: SDMConfig) -> tuple[str, str | None]:
    """(what the settings record as the segmenter, the dataset the built-in one trains on); ("none", None)
    when pairs are not scored. Refuses a segmenter that does not load, or a threshold with nothing to score."""
    if args.segmenter == "builtin":
        data = args.segmenter_data or (args.labels if source.card is not None else None)
        if data is None:
            if args.min_consistency is not None:
                raise InvalidInputError("the built-in segmenter trains on a dataset and --labels is a folder of PNGs: "
                                        "give --segmenter-data DATASET or --segmenter")
            print(f"note: label consistency is not scored: {args.labels} is a folder of label PNGs; "
                  "give --segmenter-data DATASET (or --segmenter) to score it", file=sys.stderr)
            return "none", None
        train = open_set(data, "train")
        check_classes_match(train.card, data, cfg, args.model, what="segmenter data")
        return f"builtin:{train.checksum[:16]}:steps{args.segmenter_steps}", data
    if args.segmenter == "none":
        if args.min_consistency is not None:
            raise InvalidInputError("--min-consistency needs a segmenter to score pairs; --segmenter is none")
        return "none", None
    seg = load_segmenter(args.segmenter)
    return seg.cache_id or seg.name, None


def _place_segmenter(args: GenerateSpec, data: str) -> str:
    """The built-in segmenter, trained on `data` (or taken from the cache), copied under the output, where every
    scoring actor reads it and where it stays as the record of what scored the pairs (a rerun reuses it)."""
    target = storage.join(args.out, "segmenter")
    if not is_builtin(target):
        trained = builtin_segmenter(data, args.segmenter_steps, args.cache_dir or default_cache_dir(), print)
        for name in (SEGMENTER_WEIGHTS, SEGMENTER_CONFIG):  # the config last: a directory with one is complete
            storage.write_bytes(storage.join(target, name), storage.read_bytes(storage.join(trained, name)))
    return target


def _source_label_rows(src: LabelSource) -> list[dict[str, Any]]:
    """Every source row (key, split, label and instance bytes), read in the driver for new layouts."""
    if src.card is not None:
        return [{k: r.get(k) for k in ("key", "split", "label", "instance")} for r in iter_rows(src.uri, src.split)]
    return [_folder_row({"path": name, "bytes": storage.read_bytes(storage.join(src.uri, name))}, src.instances_uri, src.instance_files)
            for name in src.files]


def _new_layouts(src: LabelSource, cfg: SDMConfig, args: GenerateSpec) -> list[dict[str, Any]]:
    """--layouts-per-map new label maps per usable source map, mixing in regions of another map of its own
    split only (a validation map never leaks into training layouts). Rows like source rows."""
    items: dict[str, dict[str, dict[str, Any]]] = {}
    for row in _source_label_rows(src):
        try:
            item = load_item(row["key"], row["label"], row["instance"], cfg, args.max_aspect_change)
        except (InvalidInputError, DatasetError):
            continue  # its source row is rejected with the reason
        items.setdefault(row["split"], {})[row["key"]] = item
    rows = []
    for split, by_key in sorted(items.items()):
        keys = sorted(by_key)
        for key in keys:
            for j in range(1, args.layouts_per_map + 1):
                other = partner_key(keys, key, j, args.seed)
                partner = (by_key[other]["label"], by_key[other]["instance"]) if other else None
                label, inst = new_layout(by_key[key]["label"], by_key[key]["instance"], partner, derive_seed(args.seed, key, j, "layout"))
                rows.append({"key": layout_key(key, j), "split": split, "label": encode_png(label),
                             "instance": encode_png(inst) if inst is not None else None})
    return rows


def plan_job(args: GenerateSpec) -> Plan:
    """Everything that can refuse the job, checked before any worker starts."""
    _, cfg = checkpoint.load_model(args.model)  # the weights must load and fit their config
    params = cfg.resolve_sampling(**args.sampling)
    _check_numbers(args)
    source = _label_source(args, cfg)
    segmenter, segmenter_data = _segmenter_choice(args, source, cfg)
    settings = GenerationSettings(
        model_id=checkpoint.model_id(args.model), sampling=params, seed=args.seed, micro_batch=args.micro_batch,
        precision=args.precision, fast_path=args.fast_path, compile=args.compile, output_format=args.format,
        segmenter=segmenter, min_consistency=args.min_consistency, max_retries=args.max_retries,
    )
    output = GenerationOutput(args.out)
    output.claim(settings)
    if segmenter == "none":
        segmenter_uri = None
    else:
        segmenter_uri = _place_segmenter(args, segmenter_data) if segmenter_data else args.segmenter
    layouts = _new_layouts(source, cfg, args) if args.layouts_per_map else []
    card = _base_card(source, cfg, args, settings)
    card.extra["generation"]["segmenter_uri"] = segmenter_uri  # the built-in one: <out>/segmenter, with its training record
    return Plan(cfg, settings, source, card, output, output.completed_keys(), segmenter_uri, layouts)


# Ray Data stages. Rows between them: source_key, k, attempt, split, label and instance PNG bytes at the model's
# size (b"" for no instance map), and reject: "" or why the item was rejected (then k = -1); the sampling stage
# adds the image, the scoring stage consistency and pixel_accuracy.


def _folder_row(row: dict[str, Any], instances_uri: str | None, instance_files: set[str]) -> dict[str, Any]:
    name = posixpath.basename(row["path"])
    inst = storage.read_bytes(storage.join(instances_uri, name)) if name in instance_files else None
    return {"key": posixpath.splitext(name)[0], "split": "train", "label": row["bytes"], "instance": inst}


def _prepare(row: dict[str, Any], config: SDMConfig, samples: int, done: set[str], redraws: dict[str, int] | None,
             max_aspect_change: float) -> list[dict[str, Any]]:
    """One source row -> a row per sample still to draw, or one reject row. `redraws` (output key -> attempt),
    when given, is the round of redraws: only those samples, at those attempts."""
    key, split = row["key"], row["split"]
    if redraws is None:
        todo = [(k, 0) for k in range(samples) if output_key(key, k) not in done]
    else:
        todo = [(k, redraws[output_key(key, k)]) for k in range(samples) if output_key(key, k) in redraws]
    if not todo:
        return []
    if row.get("reject"):  # a source shard that failed its card's checksum: its label maps were not read
        return [{"source_key": key, "k": -1, "attempt": 0, "split": split, "label": b"", "instance": b"", "reject": row["reject"]}]
    try:
        item = load_item(key, row["label"], row["instance"], config, max_aspect_change)
    except (InvalidInputError, DatasetError) as e:
        return [{"source_key": key, "k": -1, "attempt": 0, "split": split, "label": b"", "instance": b"", "reject": str(e)}]
    label = encode_png(item["label"])
    inst = encode_png(item["instance"]) if item["instance"] is not None else b""
    return [{"source_key": key, "k": k, "attempt": a, "split": split, "label": label, "instance": inst, "reject": ""}
            for k, a in todo]


class SampleBatch:
    """A sampling actor: loads the model once, then fills in images for batches of rows."""

    def __init__(self, model_uri: str, settings: dict[str, Any]):
        self.settings = GenerationSettings.from_dict(settings)
        s = self.settings
        self.pipe = SDMPipeline.from_pretrained(model_uri, precision=s.precision, micro_batch=s.micro_batch, fast_path=s.fast_path,
                                                compile=s.compile)
        if s.compile:
            self.pipe.warm_up()  # compiled before the first batch arrives

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        h, w = self.pipe.config.model.image_size
        ok = np.flatnonzero(batch["reject"] == "")
        images = np.zeros((len(batch["reject"]), h, w, 3), dtype=np.uint8)
        if ok.size:
            keys, ks, attempts = batch["source_key"][ok], batch["k"][ok], batch["attempt"][ok]
            labels = [decode_ids(batch["label"][i], f"label map {batch['source_key'][i]!r}") for i in ok]
            insts = [decode_ids(b, "instance map") if len(b) else None for b in batch["instance"][ok]]
            seeds = [sample_seed(self.settings.seed, key, int(k), int(a)) for key, k, a in zip(keys, ks, attempts)]
            images[ok] = sample_images(self.pipe, labels, insts, seeds, self.settings)
        return {**batch, "image": images}


class ScoreBatch:
    """A scoring actor: loads the segmenter once, then adds each generated pair's label consistency."""

    def __init__(self, segmenter_uri: str, num_classes: int):
        torch.set_num_threads(1)
        self.segmenter, self.num_classes = load_segmenter(segmenter_uri), num_classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["reject"])
        consistency, accuracy = np.full(n, np.nan), np.full(n, np.nan)
        ok = np.flatnonzero(batch["reject"] == "")
        if ok.size:
            labels = np.stack([decode_ids(batch["label"][i], "label map") for i in ok])
            for i, score in zip(ok, score_pairs(self.segmenter, batch["image"][ok], labels, self.num_classes)):
                consistency[i], accuracy[i] = score.consistency, score.pixel_accuracy
        return {**batch, "consistency": consistency, "pixel_accuracy": accuracy}


def _draw(batch: dict[str, np.ndarray], i: int) -> Draw:
    scored = "consistency" in batch
    return Draw(int(batch["k"][i]), int(batch["attempt"][i]),
                float(batch["consistency"][i]) if scored else None, float(batch["pixel_accuracy"][i]) if scored else None)


def _write(batch: dict[str, np.ndarray], out_uri: str, settings: dict[str, Any]) -> dict[str, list[str]]:
    """Encode and publish the batch's kept rows as shards; returns one stage row (jobs.stage_rows) per shard, per
    reject, and per pair below the consistency threshold that has a redraw left."""
    s = GenerationSettings.from_dict(settings)
    rows: list[dict[str, Any]] = []
    records: list[StageRecord] = []
    for i, reason in enumerate(batch["reject"]):
        key, split = str(batch["source_key"][i]), str(batch["split"][i])
        if reason:
            records.append(Rejected(Reject(key, split, str(reason))))
            continue
        draw = _draw(batch, i)
        if not passes(s, draw.consistency):
            if draw.attempt < s.max_retries:
                records.append(Redraw(output_key(key, draw.k), draw.attempt + 1))
            else:
                records.append(Rejected(consistency_reject(key, split, draw, s)))
            continue
        inst = batch["instance"][i]
        rows.append(generated_row(key, draw, split, batch["image"][i], batch["label"][i], inst if len(inst) else None, s))
    if rows:
        try:
            infos = GenerationOutput(out_uri).write(rows, s.output_format == "folder")
        except StorageError as e:  # the store failed a write through every retry: the driver stops the job
            return to_rows([StoreFailed(str(e))])
        records += [ShardWritten(info) for info in infos]
    return to_rows(records)


def _source_rows(src: LabelSource, layouts: list[dict[str, Any]]) -> ray.data.Dataset:
    if src.card is not None:  # a shard that fails its card's checksum arrives as one row with the reason
        shards = [s for s in src.card.shards if src.split is None or s.split == src.split]
        rows = read_shards(src.uri, shards, ["key", "split", "label", "instance"], reject_column="reject")
    else:
        fs, _ = storage.resolve(src.uri)
        paths = [storage.resolve(storage.join(src.uri, name))[1] for name in src.files]
        rows = ray.data.read_binary_files(paths, filesystem=fs, include_paths=True).map(
            _folder_row, fn_kwargs={"instances_uri": src.instances_uri, "instance_files": src.instance_files}
        )
    if not layouts:
        return rows
    return rows.union(ray.data.from_items([{**r, "reject": ""} for r in layouts] if src.card is not None else layouts))


def build_pipeline(plan: Plan, args: GenerateSpec, redraws: dict[str, int] | None = None) -> ray.data.Dataset:
    """read -> decode/validate/preprocess -> sample on an actor pool -> score on a small actor pool -> encode +
    write; streamed end to end. `redraws`: only those samples, at those attempts (see _prepare)."""
    settings = plan.settings.to_dict()
    items = _source_rows(plan.source, plan.layouts).flat_map(
        _prepare, fn_kwargs={"config": plan.config, "samples": args.samples_per_label, "done": plan.done,
                             "redraws": redraws, "max_aspect_change": args.max_aspect_change}
    ).repartition(target_num_rows_per_block=args.batch_size, strict=True)  # full blocks: one actor call each
    images = items.map_batches(
        SampleBatch, fn_constructor_kwargs={"model_uri": args.model, "settings": settings},
        batch_size=args.batch_size, batch_format="numpy", compute=actor_pool(args.concurrency),
        num_cpus=args.cpus_per_worker, num_gpus=args.num_gpus_per_worker,
    )
    if plan.segmenter_uri is not None:  # up to one scoring actor per sampler
        most = args.concurrency[1] if isinstance(args.concurrency, tuple) else args.concurrency
        images = images.map_batches(
            ScoreBatch, fn_constructor_kwargs={"segmenter_uri": plan.segmenter_uri, "num_classes": plan.config.model.num_classes},
            batch_size=args.batch_size, batch_format="numpy", compute=actor_pool(1 if most == 1 else (1, most)),
            num_cpus=SCORER_CPUS,
        )
    return images.map_batches(
        _write, fn_kwargs={"out_uri": args.out, "settings": settings},
        batch_size=args.shard_rows, batch_format="numpy",
    )


def _run_round(ds: ray.data.Dataset, shards: list[ShardInfo], rejects: list[Reject]) -> dict[str, int]:
    """Stream one pass of the pipeline, collecting shards and rejects; returns the redraws it asks for."""
    redraws: dict[str, int] = {}
    for row in ds.iter_rows():
        record = from_row(row)
        if isinstance(record, ShardWritten):
            shards.append(record.info)
        elif isinstance(record, StoreFailed):
            raise StorageError(record.message)  # leaving the loop stops the dataset
        elif isinstance(record, Redraw):
            redraws[record.key] = record.attempt
        else:
            rejects.append(record.reject)
    return redraws


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
    redrawn = 0
    try:
        redraws: dict[str, int] | None = None
        for _ in range(args.max_retries + 1):  # round 0 draws everything to do; round a, what is still below
            pending = _run_round(build_pipeline(plan, args, redraws), shards, rejects)
            if not pending:
                break
            redrawn += len(pending)
            print(f"{len(pending)} pairs below --min-consistency {args.min_consistency}: redrawing them with their next seed")
            redraws = pending
        card = plan.output.finalize(plan.base_card, rejects, plan.settings)
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"{args.out} is unfinished (no {CARD_FILE}); rerun the same command to finish it", file=sys.stderr)
        return EXIT_FAILED
    wall = time.perf_counter() - start
    written = sum(s.rows for s in shards)
    total = sum(card.split_sizes.values())
    below = [r for r in rejects if r.reason.startswith(CONSISTENCY_REJECT)]
    unusable = len(rejects) - len(below)
    where = f" (see {storage.join(args.out, REJECTS_FILE)})" if rejects else ""
    print(f"generated {written} images in {wall:.1f}s ({written / wall:.2f} images/s); {len(plan.done)} were already "
          f"there; {unusable} label maps rejected{where}")
    c = card.extra["consistency"]
    if c["scored"]:
        print(f"label consistency ({plan.settings.segmenter}): mean {c['mean']:.4f}, median {c['median']:.4f}, "
              f"p10 {c['p10']:.4f} over the {c['scored']} pairs kept; {redrawn} redraws; "
              f"{len(below)} pairs left out below --min-consistency")
    print(f"output: {args.out} ({total} images in {len(card.shards)} shards, card {CARD_FILE})")
    return EXIT_REJECTS if unusable else EXIT_OK  # pairs left out by the threshold are what it was asked for


if __name__ == "__main__":
    sys.exit(main())

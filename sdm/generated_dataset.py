"""Bulk generation without Ray: settings, per-sample seeds, label-map items, batched sampling, and the
output dataset that a generation job fills, resumes and finally describes with a card.

Layout of an output URI:

    generation.json                              the settings (with their format_version); a rerun with other
                                                 settings is refused
    shards/gen-<digest>-<split>-00000.parquet    generated rows: the shard format plus metadata columns
    progress/gen-<digest>-<split>-00000.json     written after its shard (its info and keys): a shard
                                                 without one is unfinished and is removed at the end
    images/, labels/, instances/<key>_<k>.png    with the folder format
    rejects.jsonl                                input items that could not be used, with the reason
    dataset.json                                 the card, written last

Label map `key` is sampled as one call of the library's runner with seed derive_seed(seed, key) (recorded per row
as `seed`, with the sample's index as `sample_index`), in network batches of a fixed size, so a sample's bytes
depend on neither batch composition, worker count nor partitioning, and any other door (the pipeline,
`sdm sample`, HTTP) given that seed and the same settings draws the same sample k. A pair redrawn because its label
consistency fell below the threshold (attempt a > 0) comes from a call with seed derive_seed(seed, key, "attempt", a),
which its row records instead, so the same redraw promise holds for it.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from sdm import storage
from sdm.config import SamplingParams, SDMConfig, upgrade
from sdm.data.card import DatasetCard, ShardInfo, write_card
from sdm.data.rejects import REJECTS_FILE, Reject, write_rejects  # REJECTS_FILE: part of the layout above
from sdm.data.shards import BASE_SCHEMA, SHARD_DIR, ShardWriter, make_row
from sdm.imageio import decode_ids, encode_png
from sdm.errors import DatasetError, InvalidInputError
from sdm.labels import LabelEncoder
from sdm.pipeline import SDMPipeline
from sdm.seeds import derive_seed

SETTINGS_FILE = "generation.json"
PROGRESS_DIR = "progress"
FOLDER_DIRS = {"image": "images", "label": "labels", "instance": "instances"}

GENERATED_SCHEMA = pa.schema(
    list(BASE_SCHEMA)
    + [
        pa.field("source_key", pa.string()),
        pa.field("sample_index", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("model_id", pa.string()),
        pa.field("sampler", pa.string()),
        pa.field("steps", pa.int32()),  # sampling.num_inference_steps (the stored column keeps its name)
        pa.field("guidance", pa.float64()),  # sampling.guidance_scale
        pa.field("attempt", pa.int32()),
        pa.field("consistency", pa.float64()),  # null when the job scored nothing (--segmenter none)
        pa.field("pixel_accuracy", pa.float64()),
    ]
)


@dataclass(frozen=True)
class GenerationSettings:
    """What must stay the same across runs into one output: everything a generated image's bytes depend
    on (besides its label map, key and index), and the output format."""

    model_id: str
    sampling: SamplingParams  # resolved against the model's defaults
    seed: int
    micro_batch: int = 8  # rows per network call, fixed so that numerics never depend on batching
    precision: str = "auto"
    fast_path: bool = True  # channels_last and bf16-held weights: the same values, other kernels, so other rounding
    compile: bool = False
    output_format: str = "shards"  # or "folder": image and label PNG files as well
    seed_rule: int = 2  # label map `key` is a call with seed derive_seed(seed, key); rule 1 seeded each sample
    segmenter: str = "none"  # what scores label consistency: it decides which pairs pass the threshold
    min_consistency: float | None = None
    max_retries: int = 0

    def to_dict(self) -> dict[str, Any]:
        """generation.json: the settings in the current format."""
        return {"format_version": SETTINGS_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenerationSettings":
        """Settings stored in any format version (upgraded first)."""
        d = {k: v for k, v in upgrade_settings(d).items() if k != "format_version"}
        return cls(**{**d, "sampling": SamplingParams(**d["sampling"])})


def _settings_v1_to_v2(d: dict[str, Any]) -> dict[str, Any]:
    """Version 1 (no format_version) held the sampling parameters flat, as `sampler`, `steps`, `guidance`, `eta`,
    `cache_interval`. Outputs from before the label-consistency stage were unscored, those from before the fast
    path eager (and without the feature cache), and those from before `seed_rule` seeded each sample (rule 1)."""
    out = {"segmenter": "none", "min_consistency": None, "max_retries": 0, "fast_path": False, "compile": False,
           "seed_rule": 1, **d}
    names = {"guidance": "guidance_scale", "sampler": "sampler", "steps": "num_inference_steps", "eta": "eta",
             "cache_interval": "cache_interval"}
    out["sampling"] = {"cache_interval": 1, **{new: out.pop(old) for old, new in names.items() if old in out}}
    return out


_SETTINGS_UPGRADES = [_settings_v1_to_v2]
SETTINGS_FORMAT = len(_SETTINGS_UPGRADES) + 1  # of generation.json


def upgrade_settings(d: dict[str, Any]) -> dict[str, Any]:
    """A stored generation.json of any version in the current format."""
    return upgrade(d, _SETTINGS_UPGRADES, SETTINGS_FILE)


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    """`sampling.eta` for {"sampling": {"eta": ...}}: settings compared key by key."""
    return {f"{k}.{sub}" if isinstance(v, dict) else k: w for k, v in d.items()
            for sub, w in (v.items() if isinstance(v, dict) else [(None, v)])}


def output_key(source_key: str, k: int) -> str:
    """The key of sample k of a label map; also the file stem in the folder format."""
    return f"{source_key}_{k}"


def call_seed(seed: int, source_key: str, attempt: int = 0) -> int:
    """The seed of the call that samples label map `source_key` (on its `attempt`-th redraw): what the row records,
    and what another door takes."""
    return derive_seed(seed, source_key) if attempt == 0 else derive_seed(seed, source_key, "attempt", attempt)


def sample_seed(seed: int, source_key: str, k: int, attempt: int = 0) -> int:
    """The noise seed of sample k of label map `source_key`."""
    return derive_seed(call_seed(seed, source_key, attempt), k)  # sample k of that call: sdm.seeds.sample_seeds


def load_item(key: str, label_png: bytes, instance_png: bytes | None, config: SDMConfig, max_aspect_change: float) -> dict[str, Any]:
    """Decode one label map (and instance map), checked by the model's label encoder and resized to the model's size
    by the library's one resize policy. Raises InvalidInputError or DatasetError naming the problem."""
    label = decode_ids(label_png, f"label map {key!r}")
    instance = decode_ids(instance_png, f"instance map {key!r}") if instance_png is not None else None
    maps = LabelEncoder(config).check(label, instance, name=key, max_aspect_change=max_aspect_change)
    return {"key": key, "image": None, "label": maps.raw[0], "instance": None if instance is None else maps.instances[0]}


def sample_images(
    pipe: SDMPipeline, labels: Sequence[np.ndarray], instances: Sequence[np.ndarray | None], seeds: Sequence[int], settings: GenerationSettings
) -> np.ndarray:
    """uint8 [N, H, W, 3] for raw label maps at the model's size, through the library's runner (whose micro-batch
    the pipeline was built with: settings.micro_batch)."""
    inputs = torch.cat([pipe.prepare_labels(lab, inst) for lab, inst in zip(labels, instances)])
    return pipe.sample_prepared(inputs, [int(s) for s in seeds], settings.sampling)


@dataclass(frozen=True)
class Draw:
    """Which draw of sample k of a label map a row holds, and how consistent it came out (None: not scored)."""

    k: int
    attempt: int = 0
    consistency: float | None = None
    pixel_accuracy: float | None = None


def generated_row(
    source_key: str, draw: Draw, split: str, image: np.ndarray, label_png: bytes, instance_png: bytes | None, settings: GenerationSettings
) -> dict[str, Any]:
    """A row of a generated dataset: the image, the label map it came from, and how it was made."""
    h, w = image.shape[:2]
    return make_row(
        output_key(source_key, draw.k), split, encode_png(image), label_png, instance_png, h, w,
        source_key=source_key, sample_index=draw.k, seed=call_seed(settings.seed, source_key, draw.attempt),
        model_id=settings.model_id, sampler=settings.sampling.sampler, steps=settings.sampling.num_inference_steps,
        guidance=float(settings.sampling.guidance_scale),
        attempt=draw.attempt, consistency=draw.consistency, pixel_accuracy=draw.pixel_accuracy,
    )


CONSISTENCY_REJECT = "label consistency"


def consistency_reject(source_key: str, split: str, draw: Draw, settings: GenerationSettings) -> Reject:
    """The reject of a pair whose last draw stayed below the threshold."""
    c = draw.consistency
    score = "not measurable (no pixel of a segmenter class)" if c is None or not np.isfinite(c) else f"{c:.4f}"
    reason = f"{CONSISTENCY_REJECT} {score} below --min-consistency {settings.min_consistency} after {draw.attempt + 1} draws"
    return Reject(output_key(source_key, draw.k), split, reason, c if c is not None and np.isfinite(c) else None)


def passes(settings: GenerationSettings, consistency: float | None) -> bool:
    """Whether a pair is kept: always without a threshold; with one, a NaN score (nothing scorable) fails."""
    return settings.min_consistency is None or (consistency is not None and consistency >= settings.min_consistency)


class GenerationOutput:
    """The output URI of a generation job; see the module docstring for its layout."""

    def __init__(self, uri: str):
        self.uri = uri

    def claim(self, settings: GenerationSettings) -> None:
        """Record the settings, or refuse when an earlier run here used other ones (outputs must not mix)."""
        path = storage.join(self.uri, SETTINGS_FILE)
        if storage.exists(path):
            before = _flat(upgrade_settings(json.loads(storage.read_bytes(path))))
            diff = {k: (before.get(k), v) for k, v in _flat(settings.to_dict()).items() if before.get(k) != v}
            if diff:
                shown = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(diff.items()))
                raise InvalidInputError(f"{self.uri} holds output generated with other settings ({shown}); use a new output URI")
            return
        storage.write_bytes(path, json.dumps(settings.to_dict(), indent=2).encode())

    def _records(self) -> list[dict[str, Any]]:
        progress = storage.join(self.uri, PROGRESS_DIR)
        return [json.loads(storage.read_bytes(storage.join(progress, n))) for n in storage.list_files(progress, ".json")]

    def completed_keys(self) -> set[str]:
        """Output keys of every finished shard."""
        return {k for r in self._records() for k in r["keys"]}

    def write(self, rows: list[dict[str, Any]], folder: bool) -> list[ShardInfo]:
        """Publish rows as one shard per split, named by a digest of their keys; files of the folder format
        first, the progress record of each shard after it."""
        digest = hashlib.sha256("\n".join(sorted(r["key"] for r in rows)).encode()).hexdigest()[:16]
        if folder:
            for r in rows:
                for col, sub in FOLDER_DIRS.items():
                    if r[col] is not None:
                        storage.write_bytes(storage.join(self.uri, sub, f"{r['key']}.png"), r[col])
        infos = []
        for split in sorted({r["split"] for r in rows}):
            part = [r for r in rows if r["split"] == split]
            writer = ShardWriter(self.uri, split, target_bytes=sys.maxsize, prefix=f"gen-{digest}-", schema=GENERATED_SCHEMA)
            for r in part:
                writer.add(r)
            (info,) = writer.close()
            record = {"shard": asdict(info), "keys": [r["key"] for r in part],
                      "consistency": [r["consistency"] for r in part], "attempts": [r["attempt"] for r in part]}
            storage.write_bytes(self._record_uri(info.path), json.dumps(record).encode())
            infos.append(info)
        return infos

    def _record_uri(self, shard_path: str) -> str:
        stem = posixpath.splitext(posixpath.basename(shard_path))[0]
        return storage.join(self.uri, PROGRESS_DIR, f"{stem}.json")

    def finalize(self, base: DatasetCard, rejects: list[Reject], settings: GenerationSettings) -> DatasetCard:
        """Remove unfinished shards, write the rejects file, then the card over every finished shard, with the
        consistency summary of every row in them."""
        records = self._records()
        keys = [k for r in records for k in r["keys"]]
        if len(keys) != len(set(keys)):
            raise DatasetError(f"{self.uri}: some keys are in more than one shard; was it written by two jobs at once?")
        shards = sorted((ShardInfo(**r["shard"]) for r in records), key=lambda s: s.path)
        finished = {posixpath.basename(s.path) for s in shards}
        shard_dir = storage.join(self.uri, SHARD_DIR)
        for name in storage.list_files(shard_dir, ".parquet"):
            if name not in finished:
                storage.delete(storage.join(shard_dir, name))
        write_rejects(self.uri, sorted(rejects, key=lambda r: r.key))
        sizes: dict[str, int] = {}
        for s in shards:
            sizes[s.split] = sizes.get(s.split, 0) + s.rows
        card = DatasetCard(
            name=base.name, num_classes=base.num_classes, class_names=base.class_names, palette=base.palette,
            has_instance=base.has_instance, split_sizes=dict(sorted(sizes.items())), shards=shards,
            extra={**base.extra, "rejects": len(rejects), "consistency": consistency_summary(records, rejects, settings)},
        )
        write_card(self.uri, card)
        return card


def consistency_summary(records: list[dict[str, Any]], rejects: list[Reject], settings: GenerationSettings) -> dict[str, Any]:
    """What the card says of label consistency: the segmenter, the threshold, and the scores of the rows kept."""
    scores = np.array([c for r in records for c in r.get("consistency", []) if c is not None], dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    redrawn = sum(1 for r in records for a in r.get("attempts", []) if a)
    summary: dict[str, Any] = {
        "segmenter": settings.segmenter, "min_consistency": settings.min_consistency, "max_retries": settings.max_retries,
        "scored": int(scores.size), "kept_after_redraw": redrawn,
        "rejected": sum(1 for r in rejects if r.reason.startswith(CONSISTENCY_REJECT)),
    }
    if scores.size:
        q = np.quantile(scores, [0.1, 0.5, 0.9])
        summary.update(mean=float(scores.mean()), p10=float(q[0]), median=float(q[1]), p90=float(q[2]), min=float(scores.min()))
    return summary

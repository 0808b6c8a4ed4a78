"""Evaluate a generated image set against a real one: FID, diversity, mIoU (and the segmenter's mIoU on the
real images), with per-set statistics cached so that a real set is embedded once per extractor.

`sdm eval` runs the passes in-process; `python -m jobs.evaluate` runs them on Ray Data (score_set).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from sdm import storage
from sdm.errors import DatasetError, InvalidInputError, MissingWeightsError
from sdm.metrics.diversity import LowPassL1Distance, PairDistance, load_lpips, mean_pairwise_distance
from sdm.metrics.frechet import StatsAccumulator, frechet_distance
from sdm.metrics.image_sets import ImageSet, collect_groups, first_size, images_by_key, open_set
from sdm.metrics.inception import InceptionFeatures
from sdm.metrics.miou import ConfusionMatrix
from sdm.metrics.pretrained import FID_INCEPTION_FILE, find_weights
from sdm.metrics.report import write_report
from sdm.metrics.scoring import Partial, ScoreSetFn, ScoreSpec, score_locally
from sdm.metrics.spectrum import SpectrumFeatures, spectral_fidelity
from sdm.metrics.segmenter import Segmenter, SegmenterFeatures, is_builtin, load_builtin, load_segmenter, train_segmenter

METRICS = ("fid", "lpips", "miou", "spectrum", "diversity", "segmenter-fd", "pixel-diversity")
# The paper's three, plus the spectrum (grain and blur, which FID barely sees); `diversity` is LPIPS where the
# AlexNet weights are present and the low-pass pixel L1 otherwise.
DEFAULT_METRICS = ("fid", "diversity", "miou", "spectrum")


def default_cache_dir() -> str:
    return os.environ.get("SDM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sdm")


@dataclass
class EvalSettings:
    real: str
    generated: str
    out: str
    real_split: str | None = "val"
    generated_split: str | None = None
    metrics: tuple[str, ...] = DEFAULT_METRICS
    inception_weights: str | None = None
    alexnet_weights: str | None = None
    segmenter: str = "builtin"  # or a built-in segmenter directory, a TorchScript file, module:callable
    segmenter_steps: int = 300
    ignore_index: int | None = None
    size: tuple[int, int] | None = None  # (height, width); default: the generated images' size
    max_real: int | None = None
    diversity_maps: int = 100
    sheet_maps: int = 6
    sheet_samples: int = 4
    batch_size: int = 64
    cache_dir: str | None = None
    device: str = "cpu"  # of the Inception and AlexNet backbones

    def validate(self) -> "EvalSettings":
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown or not self.metrics:
            raise InvalidInputError(f"unknown metrics {unknown or '(none given)'}; choose from {', '.join(METRICS)}")
        for name in ("segmenter_steps", "diversity_maps", "sheet_maps", "sheet_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_real is not None and self.max_real < 2:
            raise InvalidInputError(f"max-real must be >= 2, got {self.max_real}")
        return self


def builtin_segmenter(real_uri: str, steps: int, cache_dir: str, log: Callable[[str], None]) -> str:
    """The built-in segmenter trained on the real dataset's train split, trained once per dataset version."""
    real = open_set(real_uri)
    if real.card is None:
        raise DatasetError(f"the built-in segmenter trains on a dataset in the shard format; {real_uri} is a folder")
    if not real.card.split_sizes.get("train"):
        raise DatasetError(f"the built-in segmenter trains on the 'train' split, which {real_uri} does not have")
    uri = os.path.join(cache_dir, "segmenters", f"{real.checksum[:16]}-steps{steps}")
    if not is_builtin(uri):
        log(f"training the built-in segmenter on {real_uri} (train split, {steps} steps) -> {uri}")
        train_segmenter(real_uri, uri, steps=steps, log=log)
    return uri


def _builtin_features(uri: str) -> SegmenterFeatures:
    return load_builtin(uri).features


class StatsCache:
    """Per-set partial results on local disk: <dir>/stats/<set key>-<component>.npz."""

    def __init__(self, root: str):
        self.root = os.path.join(root, "stats")

    def _path(self, set_key: str, component: str) -> str:
        safe = hashlib.sha256(component.encode()).hexdigest()[:16]
        return os.path.join(self.root, f"{set_key}-{safe}.npz")

    def get(self, set_key: str, component: str) -> StatsAccumulator | ConfusionMatrix | None:
        path = self._path(set_key, component)
        if not os.path.exists(path):
            return None
        z = np.load(path)
        if "matrix" in z:
            cm = ConfusionMatrix(z["matrix"].shape[0], int(z["ignore"]) if z["ignore"] >= 0 else None)
            cm.matrix = z["matrix"]
            return cm
        acc = StatsAccumulator(z["total"].shape[0])
        acc.n, acc.total, acc.outer = int(z["n"]), z["total"], z["outer"]
        return acc

    def put(self, set_key: str, component: str, value: StatsAccumulator | ConfusionMatrix) -> None:
        buf = io.BytesIO()
        if isinstance(value, ConfusionMatrix):
            np.savez(buf, matrix=value.matrix, ignore=np.array(-1 if value.ignore_index is None else value.ignore_index))
        else:
            np.savez(buf, n=np.array(value.n), total=value.total, outer=value.outer)
        storage.write_bytes(self._path(set_key, component), buf.getvalue())


def _pass(s: ImageSet, spec: ScoreSpec, size: tuple[int, int], limit: int | None, settings: EvalSettings, cache: StatsCache,
          score_set: ScoreSetFn, log: Callable[[str], None], cacheable: Callable[[str], bool]) -> tuple[Partial, list[str]]:
    """Cached components, plus one pass over the set for the rest; returns them and the components reused.
    A confusion matrix of a segmenter without a cache_id (an imported callable) is never cached."""
    key = s.cache_key(size, limit)
    wanted = list(spec.extractors) + ([spec.confusion] if spec.confusion else [])
    have = {c: v for c in wanted if cacheable(c) and (v := cache.get(key, c)) is not None}
    todo = spec.without(set(have))
    if not todo.empty:
        log(f"scoring {s.uri}{f' ({s.split})' if s.split else ''}: {', '.join(list(todo.extractors) + ([todo.confusion] if todo.confusion else []))}")
        fresh = score_set(s, todo, size, settings.batch_size, limit, log)
        for c, v in fresh.items():
            if cacheable(c):
                cache.put(key, c, v)
        have.update(fresh)
    return have, [c for c in wanted if c not in todo.extractors and c != todo.confusion]


def evaluate(settings: EvalSettings, score_set: ScoreSetFn = score_locally, log: Callable[[str], None] = print) -> dict:
    """Run every requested metric, write the report files under settings.out, and return the results."""
    settings.validate()
    start = time.perf_counter()
    cache_dir = settings.cache_dir or default_cache_dir()
    cache = StatsCache(cache_dir)
    real, gen = open_set(settings.real, settings.real_split), open_set(settings.generated, settings.generated_split)
    size = settings.size or first_size(gen)
    card = real.card or gen.card
    m = set(settings.metrics)

    # Everything that can refuse (missing weights, segmenter, classes) is checked before any pass.
    if len(m & {"lpips", "diversity", "pixel-diversity"}) > 1:
        raise InvalidInputError("choose one diversity metric: lpips, diversity or pixel-diversity")
    distance: PairDistance | None = LowPassL1Distance() if "pixel-diversity" in m else None
    extractors: dict[str, Callable] = {}
    names: dict[str, str] = {}
    missing = []  # every absent weights file in one error, so one round of downloads fixes them all
    if "lpips" in m:
        try:
            distance = load_lpips(settings.alexnet_weights, settings.device)
        except MissingWeightsError as e:
            missing.append(str(e))
    if "diversity" in m:
        try:
            distance = load_lpips(settings.alexnet_weights, settings.device)
        except MissingWeightsError as e:
            if settings.alexnet_weights is not None:  # a file the user named must be there
                missing.append(str(e))
            else:
                distance = LowPassL1Distance()
                log(f"diversity: no AlexNet weights for LPIPS, so {distance.metric_name} (not LPIPS)")
    if "spectrum" in m:
        spectrum = SpectrumFeatures()
        extractors[spectrum.feature_id] = SpectrumFeatures
    if "fid" in m:
        try:
            path = find_weights(FID_INCEPTION_FILE, settings.inception_weights, "FID Inception", "--inception-weights")
            inception = InceptionFeatures.from_file(path)
            extractors[inception.feature_id] = functools.partial(InceptionFeatures.from_file, path, settings.device)
            names["fid"] = inception.feature_id
        except MissingWeightsError as e:
            missing.append(str(e))
    if missing:
        raise MissingWeightsError("; ".join(missing))
    segmenter: Segmenter | None = None
    seg_uri = None
    if m & {"miou", "segmenter-fd"}:
        seg_uri = builtin_segmenter(settings.real, settings.segmenter_steps, cache_dir, log) if settings.segmenter == "builtin" else settings.segmenter
        segmenter = load_segmenter(seg_uri)
    if "segmenter-fd" in m:
        if segmenter.features is None:
            raise InvalidInputError("segmenter-fd needs the built-in segmenter (--segmenter builtin or its directory)")
        extractors[segmenter.features.feature_id] = functools.partial(_builtin_features, seg_uri)
        names["segmenter-fd"] = segmenter.features.feature_id
    confusion = None
    if "miou" in m:
        if card is None:
            raise DatasetError("mIoU needs the classes of a dataset card; neither set has one")
        confusion = f"confusion-{segmenter.cache_id or segmenter.name}-{card.num_classes}-{settings.ignore_index}"
    seg_factory = functools.partial(load_segmenter, seg_uri) if seg_uri else None
    n_classes = card.num_classes if card else 0

    real_spec = ScoreSpec(extractors, seg_factory, confusion if real.has_labels else None, n_classes, settings.ignore_index)
    gen_spec = ScoreSpec(extractors, seg_factory, confusion, n_classes, settings.ignore_index)

    def cacheable(component: str) -> bool:
        return component != confusion or segmenter.cache_id is not None

    real_parts, reused = _pass(real, real_spec, size, settings.max_real, settings, cache, score_set, log, cacheable)
    if reused:
        log(f"reused cached statistics of {settings.real}: {', '.join(reused)}")
    gen_parts, _ = _pass(gen, gen_spec, size, None, settings, cache, score_set, log, cacheable)

    metrics: dict = {}
    feature_names = {"fid": "FID", "segmenter-fd": "segmenter-feature FD"}
    for metric, component in names.items():
        r, g = real_parts[component].stats(), gen_parts[component].stats()
        metric_name = (inception.metric_name if metric == "fid" else segmenter.features.metric_name)
        metrics[metric] = {"name": metric_name, "value": frechet_distance(r, g), "features": component,
                           "real_images": r.n, "generated_images": g.n, "short": feature_names[metric]}
    if "spectrum" in m:
        r, g = real_parts[spectrum.feature_id], gen_parts[spectrum.feature_id]
        fidelity = spectral_fidelity(r.total / r.n, g.total / g.n)
        metrics["spectrum"] = {"name": spectrum.metric_name, "value": fidelity.spectrum_db, "short": "spectrum dB",
                               "features": spectrum.feature_id, "real_images": r.n, "generated_images": g.n,
                               **fidelity.as_dict()}
    if confusion:
        gen_cm = gen_parts[confusion]
        real_cm = real_parts.get(confusion)
        metrics["miou"] = {
            "name": "mIoU", "segmenter": segmenter.name, "ignore_index": settings.ignore_index,
            "generated": gen_cm.miou(), "real": real_cm.miou() if real_cm is not None else None,
            "generated_pixel_accuracy": gen_cm.pixel_accuracy(),
            "per_class": [{"class": card.class_names[i], "generated": _num(gen_cm.iou()[i]),
                           "real": _num(real_cm.iou()[i]) if real_cm is not None else None} for i in range(card.num_classes)],
        }
    groups, group_labels = collect_groups(gen, size, max(settings.diversity_maps, settings.sheet_maps))
    if distance is not None:
        div_groups = dict(list(groups.items())[: settings.diversity_maps])
        d = mean_pairwise_distance(div_groups, distance, settings.batch_size)
        metrics["diversity"] = {"name": d.metric_name, "value": d.mean, "label_maps": d.label_maps, "pairs": d.pairs}
    sheet_keys = list(groups)[: settings.sheet_maps]
    reals = images_by_key(real, size, set(sheet_keys))
    results = {
        "real": {"uri": settings.real, "split": settings.real_split, "checksum": real.checksum},
        "generated": {"uri": settings.generated, "split": settings.generated_split, "checksum": gen.checksum,
                      "generation": (gen.card.extra.get("generation") if gen.card else None)},
        "settings": {**asdict(settings), "size": list(size), "segmenter_resolved": seg_uri, "cache_dir": cache_dir},
        "metrics": metrics,
        "seconds": time.perf_counter() - start,
    }
    sheet_rows = [(group_labels.get(k), reals.get(k), groups[k][: settings.sheet_samples]) for k in sheet_keys]
    results["files"] = write_report(settings.out, results, sheet_rows, card.palette if card else None)
    return results


def _num(v: float) -> float | None:
    return None if np.isnan(v) else float(v)


def summary(results: dict) -> str:
    """The lines a command prints at the end."""
    lines = []
    for key, metric in results["metrics"].items():
        if key == "miou":
            real = f" (real images: {metric['real']:.4f})" if metric["real"] is not None else ""
            lines.append(f"  mIoU ({metric['segmenter']}): {metric['generated']:.4f}{real}")
        elif key == "spectrum":
            lines.append(f"  {metric['name']}: {metric['value']:.2f}; texture {metric['texture_generated']:.1f} "
                         f"(real images: {metric['texture_real']:.1f}, ratio {metric['texture_ratio']:.2f}); "
                         f"high-frequency power x{metric['high_frequency_ratio']:.2f} of real")
        else:
            lines.append(f"  {metric['name']}: {metric['value']:.4f}")
    files = results["files"]
    lines.append(f"  report: {files['report']}  (numbers: {files['json']})")
    return "\n".join(lines)


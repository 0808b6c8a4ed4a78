"""The model deployment: the served models loaded on demand (Serve's model multiplexing: each replica holds a few,
evicting the least recently used, and Serve routes a request to a replica that holds its model), dynamic batching
that never mixes models, and a health check that runs every model the replica holds."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from ray import serve

from sdm.errors import SDMError
from sdm.pipeline import SDMPipeline, known_from_image
from sdm.config import SamplingParams
from sdm.samplers import Known, guided_output
from sdm.seeds import sample_seeds
from serve.inputs import Job
from serve.metrics import ModelMetrics


class QueueTimeout(SDMError):
    """A request waited for its batch longer than the queue bound."""


class Abandoned(SDMError):
    """Every request of a sampling group was cancelled while it sampled; the sampling stops."""


@dataclass
class Output:
    images: np.ndarray  # uint8 [num_samples, H, W, 3]
    seeds: list[int]  # the seed of each image
    replica: str  # the replica that drew them
    queue_ms: float
    sampling_ms: float
    batch_size: int  # requests that shared the sampling call


class LoadedModel:
    """A model one replica holds. Serve's multiplexing calls `__del__` when its LRU evicts the model."""

    def __init__(self, name: str, pipe: SDMPipeline, metrics: ModelMetrics, held: dict[str, "LoadedModel"]):
        self.name, self.pipe, self.metrics, self.held = name, pipe, metrics, held
        self.released = False
        held[name] = self
        metrics.live.set(metrics.loaded, 1, {"model": name})
        metrics.loads.inc(tags={"model": name})

    def __del__(self) -> None:
        if self.released:  # called by Serve on eviction, and again by the collector
            return
        self.released = True
        self.held.pop(self.name, None)
        self.metrics.live.set(self.metrics.loaded, 0, {"model": self.name})
        self.metrics.evictions.inc(tags={"model": self.name})


@dataclass
class _Pending:
    job: Job
    model: LoadedModel
    label: torch.Tensor  # [num_samples, C, H, W] network input
    known: Known | None  # edit: the image to keep, per row
    seeds: list[int]
    enqueued: float
    cancelled: bool = False  # its caller went away (client disconnect or request timeout)


def _group_key(job: Job) -> tuple[str, str, SamplingParams]:
    """Requests sharing a key run in one call of the runner, each row with its own guidance scale (the runner keeps
    unguided rows apart itself). Serve's batcher already splits batches by model; the key says it again where it
    matters."""
    return job.model, job.kind, dataclasses.replace(job.sampling, guidance_scale=1.0)


class SDMModel:
    async def __init__(
        self,
        models: dict[str, str],
        default_model: str,
        max_loaded: int,
        device: str | None,
        precision: str,
        fast_path: bool,
        compile: bool,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        batch_wait_under_load_s: float,
        max_queue_wait_s: float,
    ):
        """`models`: name -> URI of every model this deployment may serve; at most `max_loaded` are held at once."""
        self.uris, self.device, self.precision = models, device, precision
        self.fast_path = {"fast_path": fast_path, "compile": compile}
        self.metrics = ModelMetrics.create()
        self._reporting = asyncio.get_running_loop().create_task(self.metrics.live.keep_reporting())
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.held: dict[str, LoadedModel] = {}
        self.max_queue_wait_s = max_queue_wait_s
        self.batch_wait_s = (batch_wait_timeout_s, batch_wait_under_load_s)
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

        async def load(name: str) -> LoadedModel:
            return await asyncio.to_thread(self._load, name)

        self.model = serve.multiplexed(max_num_models_per_replica=max_loaded)(load)
        await self.model(default_model)  # a replica starts ready for requests naming no model

    def _load(self, name: str) -> LoadedModel:
        start = time.perf_counter()
        pipe = SDMPipeline.from_pretrained(self.uris[name], device=self.device, precision=self.precision, **self.fast_path)
        pipe.warm_up()  # every batch shape run (and compiled) before the model takes requests
        self.metrics.live.set(self.metrics.load_time, time.perf_counter() - start, {"model": name})
        return LoadedModel(name, pipe, self.metrics, self.held)

    async def check_health(self) -> None:
        for loaded in list(self.held.values()):
            await asyncio.to_thread(_probe, loaded.pipe)

    def ping(self) -> list[str]:
        """The models this replica holds."""
        return list(self.held)

    async def run(self, job: Job) -> Output:
        """Sample one request's images in whatever batch it joins; same job and seed, same images."""
        pending = self._prepare(job, await self.model(job.model))
        try:
            out = await self._batched(pending)
        except asyncio.CancelledError:
            # Serve leaves a request cancelled before its batch starts out of the batch; one cancelled later is
            # skipped before its group samples, and a group whose requests are all gone stops mid-sampling.
            pending.cancelled = True
            self.metrics.cancelled.inc(tags={"model": job.model})
            raise
        if isinstance(out, Exception):
            raise out
        return out

    def _prepare(self, job: Job, model: LoadedModel) -> _Pending:
        n = job.num_samples
        label = model.pipe.prepare_labels(job.label, job.instance)
        known = None
        if job.kind == "edit":
            k = known_from_image(job.image, job.mask, tuple(label.shape[-2:]))
            known = Known(k.x0.expand(n, -1, -1, -1), k.mask.expand(n, -1, -1, -1))
        seeds = sample_seeds(job.seed, n)
        return _Pending(job, model, label.expand(n, -1, -1, -1), known, seeds, time.monotonic())

    @serve.batch
    async def _batched(self, items: list[_Pending]) -> list[Output | Exception]:
        start = time.monotonic()
        results: list[Output | Exception | None] = [None] * len(items)
        groups: dict[tuple[str, str, SamplingParams], list[int]] = {}
        for i, p in enumerate(items):
            wait = start - p.enqueued
            self.metrics.queue_wait.observe(wait, tags={"model": p.job.model})
            if wait > self.max_queue_wait_s:
                results[i] = QueueTimeout(
                    f"request waited {wait:.2f}s for the model, over the bound of {self.max_queue_wait_s}s"
                )
            else:
                groups.setdefault(_group_key(p.job), []).append(i)
        for idxs in groups.values():
            for i in idxs:
                if items[i].cancelled:
                    results[i] = Abandoned("cancelled before its batch sampled")
            idxs = [i for i in idxs if not items[i].cancelled]
            group = [items[i] for i in idxs]
            if not group:
                continue
            t0 = time.perf_counter()
            try:
                images = await asyncio.to_thread(self._sample, group)
            except Abandoned as e:
                for i in idxs:
                    results[i] = e
                continue
            elapsed = time.perf_counter() - t0
            job = group[0].job
            tags = {"model": job.model}
            self.metrics.batch_size.observe(len(group), tags=tags)
            self.metrics.images.inc(len(images), tags=tags | {"kind": job.kind})
            self.metrics.live.set(self.metrics.steps_per_second, len(images) * job.sampling.num_inference_steps / elapsed, tags)
            row = 0
            for i, p in zip(idxs, group):
                n = len(p.seeds)
                queue_ms = (start - p.enqueued) * 1000
                results[i] = Output(images[row : row + n], p.seeds, self.replica, queue_ms, elapsed * 1000, len(group))
                row += n
        # A lone request waits briefly for company; once requests come concurrently (clients resend as their
        # results return, spread by the HTTP path) wait longer, so the next batch fills instead of splitting.
        self._batched.set_batch_wait_timeout_s(self.batch_wait_s[len(items) > 1])
        return results

    def _sample(self, group: list[_Pending]) -> np.ndarray:
        job, pipe = group[0].job, group[0].model.pipe
        known = None
        if group[0].known is not None:
            known = Known(torch.cat([p.known.x0 for p in group]), torch.cat([p.known.mask for p in group]))
        return pipe.sample_prepared(
            torch.cat([p.label for p in group]),
            [s for p in group for s in p.seeds],
            job.sampling,  # validated when the request was parsed (serve.inputs)
            guidance=[p.job.sampling.guidance_scale for p in group for _ in p.seeds],
            known=known,
            progress=lambda done, total: _check_wanted(group),
        )


def _check_wanted(group: list[_Pending]) -> None:
    """Called between denoising steps: stop sampling once no request of the group is waiting for it."""
    if all(p.cancelled for p in group):
        raise Abandoned(f"all {len(group)} requests of the batch were cancelled")


def _probe(pipe: SDMPipeline) -> None:
    """One network evaluation on the null label, in the serving precision; raises when the model cannot run."""
    m, dev, dtype = pipe.config.model, pipe.device, pipe.dtype
    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = guided_output(pipe.net, torch.zeros(1, 3, *m.image_size, device=dev), torch.zeros(1, device=dev),
                            torch.zeros(1, m.label_channels, *m.image_size, device=dev), 1.0)
    if not torch.isfinite(out).all():
        raise RuntimeError("the model's output is not finite")

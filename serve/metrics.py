"""The application's Prometheus metrics, through Ray's metrics (exported by every node's metrics agent).

Ray prefixes each name with `ray_` and adds the Serve tags (application, deployment, replica). Created
inside the replica that records them. Everything a model does is tagged with the served model's name, so that a
dashboard shows each model apart and which replica holds which (`sdm_model_loaded`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]


@dataclass
class ApiMetrics:
    requests: Counter
    latency: Histogram

    @classmethod
    def create(cls) -> "ApiMetrics":
        return cls(
            requests=Counter(
                "sdm_requests", "HTTP requests by route, status code and model", tag_keys=("route", "status", "model")
            ),
            latency=Histogram(
                "sdm_request_latency_s", "HTTP request latency in seconds", LATENCY_S, tag_keys=("route", "model")
            ),
        )


class LiveGauges:
    """Gauge values reported again every second. Ray's metrics agent drops a gauge series whose emitter has not
    refreshed it within two report intervals, so a value set once (a load time, a model held) would vanish from
    Prometheus half a minute later."""

    PERIOD_S = 1.0  # under the shortest expiry: two report intervals of at least one second

    def __init__(self) -> None:
        self.values: dict[tuple[int, tuple[tuple[str, str], ...]], tuple[Gauge, float, dict[str, str]]] = {}

    def set(self, gauge: Gauge, value: float, tags: dict[str, str]) -> None:
        self.values[(id(gauge), tuple(sorted(tags.items())))] = (gauge, value, tags)
        gauge.set(value, tags=tags)

    async def keep_reporting(self) -> None:
        while True:
            await asyncio.sleep(self.PERIOD_S)
            for gauge, value, tags in list(self.values.values()):
                gauge.set(value, tags=tags)


@dataclass
class ModelMetrics:
    batch_size: Histogram
    queue_wait: Histogram
    images: Counter
    steps_per_second: Gauge
    load_time: Gauge
    loaded: Gauge
    loads: Counter
    evictions: Counter
    cancelled: Counter
    live: LiveGauges = field(default_factory=LiveGauges)  # how every gauge above is set

    @classmethod
    def create(cls) -> "ModelMetrics":
        model = ("model",)
        return cls(
            batch_size=Histogram(
                "sdm_batch_size", "requests sharing one batched sampling call", BATCH_SIZES, tag_keys=model
            ),
            queue_wait=Histogram("sdm_queue_wait_s", "seconds a request waited for its batch", LATENCY_S, tag_keys=model),
            images=Counter("sdm_images_generated", "images generated, by kind and model", tag_keys=("kind", "model")),
            steps_per_second=Gauge(
                "sdm_denoising_steps_per_s", "image denoising steps per second in the last batched call", tag_keys=model
            ),
            load_time=Gauge("sdm_model_load_s", "seconds to load the model and run a first probe", tag_keys=model),
            loaded=Gauge("sdm_model_loaded", "1 while this replica holds the model, 0 once evicted", tag_keys=model),
            loads=Counter("sdm_model_loads", "times this replica loaded the model", tag_keys=model),
            evictions=Counter(
                "sdm_model_evictions", "times this replica evicted the model to make room for another", tag_keys=model
            ),
            cancelled=Counter(
                "sdm_requests_cancelled",
                "requests whose caller went away (disconnect or timeout) before their images",
                tag_keys=model,
            ),
        )

"""The application's Prometheus metrics, through Ray's metrics (exported by every node's metrics agent).

Ray prefixes each name with `ray_` and adds the Serve tags (application, deployment, replica). Created
inside the replica that records them.
"""

from __future__ import annotations

from dataclasses import dataclass

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
            requests=Counter("sdm_requests", "HTTP requests by route and status code", tag_keys=("route", "status")),
            latency=Histogram("sdm_request_latency_s", "HTTP request latency in seconds", LATENCY_S, tag_keys=("route",)),
        )


@dataclass
class ModelMetrics:
    batch_size: Histogram
    queue_wait: Histogram
    images: Counter
    steps_per_second: Gauge
    load_time: Gauge
    cancelled: Counter

    @classmethod
    def create(cls) -> "ModelMetrics":
        return cls(
            batch_size=Histogram("sdm_batch_size", "requests sharing one batched sampling call", BATCH_SIZES),
            queue_wait=Histogram("sdm_queue_wait_s", "seconds a request waited for its batch", LATENCY_S),
            images=Counter("sdm_images_generated", "images generated, by kind", tag_keys=("kind",)),
            steps_per_second=Gauge(
                "sdm_denoising_steps_per_s", "image denoising steps per second in the last batched call"
            ),
            load_time=Gauge("sdm_model_load_s", "seconds to load the model and run a first probe"),
            cancelled=Counter(
                "sdm_requests_cancelled", "requests whose caller went away (disconnect or timeout) before their images"
            ),
        )

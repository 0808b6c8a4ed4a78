"""A local Ray cluster with the SDM Serve app on loopback, for the serve tests and the benchmark."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import requests
from PIL import Image

from ray_session import ray_session
from sdm.checkpoint import save_classes
from sdm.testing import save_random_model

CLASS_NAMES = ["sky", "tree", "grass", "road", "building", "water"]
PALETTE = [(70, 130, 180), (0, 100, 0), (124, 252, 0), (128, 64, 128), (120, 120, 120), (0, 0, 255)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_tiny_model(path: str, with_classes: bool = True) -> str:
    """A randomly initialised (perturbed) tiny model, with class names and a palette when asked."""
    save_random_model(path, "tiny", seed=0)
    if with_classes:
        save_classes(path, CLASS_NAMES, PALETTE)
    return path


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def read_png(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))


def label_map(seed: int = 0, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """A blocky uint8 label map of the tiny model's 6 classes."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 6, (size[0] // 8, size[1] // 8), dtype=np.uint8)
    return np.kron(blocks, np.ones((8, 8), dtype=np.uint8))


@dataclass
class Cluster:
    http: str  # base URL of the Serve HTTP proxy
    metrics: str  # Ray's Prometheus metrics endpoint


@contextmanager
def serve_cluster(num_cpus: int = 2) -> Iterator[Cluster]:
    """A local Ray cluster (metrics reported every second) and Serve's HTTP proxy, both on 127.0.0.1."""
    from ray import serve

    metrics_port, http_port = free_port(), free_port()
    with ray_session(
        address="local",  # a new cluster of our own, even where another is running on this machine
        num_cpus=num_cpus,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    ):
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": http_port})
            yield Cluster(f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics")
        finally:
            serve.shutdown()


def deploy(args: dict[str, Any], name: str, route_prefix: str, base: str) -> str:
    """Run build_app(args) as application `name`; returns its base URL once /healthz answers."""
    from ray import serve

    from serve.app import build_app

    serve.run(build_app(args), name=name, route_prefix=route_prefix)
    url = base + (route_prefix if route_prefix != "/" else "")
    deadline = time.time() + 60
    while time.time() < deadline:
        if requests.get(url + "/healthz", timeout=10).status_code == 200:
            return url
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz never answered 200")


"""Several models on one Serve deployment (model multiplexing), on a local Ray cluster over real HTTP: each request
is drawn by the model it names and by no other, replicas keep at most N models (least recently used evicted),
and Serve routes a model's requests to the replica that holds it. Three randomly initialised tiny models."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray
import requests
import torch

from sdm.checkpoint import save_classes
from sdm.client import ApiError, SDMClient
from sdm.pipeline import SDMPipeline
from sdm.testing import save_random_model
from serve.status import report
from serve_helpers import deploy, label_map, png, read_png, serve_cluster

pytestmark = pytest.mark.ray

STEPS = 3
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Three tiny models with different weights; "b" has its own class names and palette."""
    root = tmp_path_factory.mktemp("models")
    paths = {name: str(root / name) for name in "abc"}
    for seed, path in enumerate(paths.values()):
        save_random_model(path, "tiny", seed=seed)
    save_classes(paths["b"], [f"b-class {i}" for i in range(6)], [(40 * i, 255 - 40 * i, 7) for i in range(6)])
    return paths


@pytest.fixture(scope="module")
def cluster():
    with serve_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def expected(models):
    """What the library pipeline draws with each model, for one label map and seed per request index."""
    pipes = {name: SDMPipeline.from_pretrained(path, device="cpu") for name, path in models.items()}

    def draw(name: str, seed: int) -> np.ndarray:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the replica
        try:
            return pipes[name](label_map(seed), num_inference_steps=STEPS, seed=seed)[0]
        finally:
            torch.set_num_threads(threads)

    return draw


def _generate(url: str, model: str | None, seed: int, header: bool = False) -> requests.Response:
    data = {"steps": str(STEPS), "seed": str(seed)} | ({} if model is None or header else {"model": model})
    headers = {"serve_multiplexed_model_id": model} if header and model else {}
    files = {"label": ("label.png", png(label_map(seed)), "image/png")}
    return requests.post(f"{url}/v1/generate", files=files, data=data, headers=headers, timeout=120)


def _gauges(cluster, name: str, app: str) -> dict[tuple[str, str], float]:
    """(replica, model) -> value of one model-tagged metric of application `app`, as Ray exports it now."""
    text = requests.get(cluster.metrics, timeout=10).text
    out = {}
    for labels, value in re.findall(rf"^ray_{name}{{([^}}]*)}} ([0-9.e+-]+)$", text, re.MULTILINE):
        tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if tags.get("application") == app:
            out[(tags["replica"], tags["model"])] = float(value)
    return out


def _wait_for(what: str, check, timeout: float = 45):
    deadline = time.time() + timeout
    while (value := check()) is None or value is False:
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(1)
    return value


def test_each_request_is_drawn_by_the_model_it_names_and_batches_never_mix_models(cluster, models, expected):
    """One replica holding all three models, requests of all three at once: every image is its model's."""
    url = deploy({"models": models, "default_model": "b", "max_models_per_replica": 3, "num_cpus": 0.5,
                  "max_batch_size": 8, "batch_wait_timeout_s": 0.2}, "mixed", "/mixed", cluster.http)
    try:
        listed = requests.get(f"{url}/v1/models", timeout=30).json()
        assert listed["default"] == "b" and listed["max_loaded_per_replica"] == 3
        assert [m["name"] for m in listed["models"]] == ["a", "b", "c"]
        assert listed["models"][1]["class_names"][0] == "b-class 0" and listed["models"][1]["palette"][1] == [40, 215, 7]
        assert requests.get(f"{url}/v1/model", params={"model": "b"}, timeout=30).json() == listed["models"][1]
        assert requests.get(f"{url}/v1/model", timeout=30).json()["name"] == "b"
        missing = requests.get(f"{url}/v1/model", params={"model": "zz"}, timeout=30)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_model"

        for name in "ac":  # load them all before the concurrent round
            assert _generate(url, name, 0).ok
        jobs = [(name, seed) for seed in range(1, 5) for name in "abc"] + [(None, 9), ("c", 10)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda j: _generate(url, j[0], j[1], header=j[1] % 2 == 0), jobs))
        shared = 0
        for (name, seed), r in zip(jobs, answers):
            drawn_by = name or "b"
            assert r.status_code == 200 and r.headers["x-sdm-model"] == drawn_by, r.text
            image = read_png(r.content)
            assert np.abs(image.astype(int) - expected(drawn_by, seed).astype(int)).max() <= 2, (name, seed)
            for other in set("abc") - {drawn_by}:
                assert np.abs(image.astype(int) - expected(other, seed).astype(int)).max() > 2
            shared += int(r.headers["x-sdm-batch-size"]) > 1
        assert shared, "no request shared a batch: the test did not exercise batching"

        refused = _generate(url, "zz", 1)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "unknown_model"
        assert "a, b, c" in refused.json()["error"]["message"]
        images = _gauges(cluster, "sdm_images_generated_total", "mixed")
        assert {model for _, model in images} == {"a", "b", "c"}
    finally:
        from ray import serve

        serve.delete("mixed")


def test_a_replica_evicts_the_least_recently_used_model_and_reloads_it_when_asked_again(cluster, models, expected):
    url = deploy({"models": models, "max_models_per_replica": 2, "num_cpus": 0.5}, "lru", "/lru", cluster.http)
    try:
        client = SDMClient(url)
        held = lambda: requests.get(f"{url}/healthz", timeout=30).json()["models"]
        assert held() == ["a"]  # a replica starts with the default model
        sequence = ["b", "c", "a", "a", "b"]
        holding = []
        for i, name in enumerate(sequence):
            image = client.generate(label_map(i), num_inference_steps=STEPS, seed=i, model=name)[0]
            assert np.abs(image.astype(int) - expected(name, i).astype(int)).max() <= 2
            holding.append(sorted(held()))
        # LRU of 2: a b -> b c (a evicted) -> c a (b evicted) -> c a -> a b (c evicted)
        assert holding == [["a", "b"], ["b", "c"], ["a", "c"], ["a", "c"], ["a", "b"]]
        loads = _wait_for("the load counters", lambda: (
            v if sum((v := _gauges(cluster, "sdm_model_loads_total", "lru")).values()) >= 5 else None))
        evictions = _wait_for("the eviction counters", lambda: (
            v if sum((v := _gauges(cluster, "sdm_model_evictions_total", "lru")).values()) >= 3 else None))
        assert {m: v for (_, m), v in loads.items()} == {"a": 2, "b": 2, "c": 1}
        assert {m: v for (_, m), v in evictions.items()} == {"a": 1, "b": 1, "c": 1}
        loaded = _wait_for("the loaded gauges", lambda: (
            v if (v := {m: g for (_, m), g in _gauges(cluster, "sdm_model_loaded", "lru").items()}).get("c") == 0 else None))
        assert loaded == {"a": 1, "b": 1, "c": 0}
        (replica,) = {r for r, _ in _gauges(cluster, "sdm_model_loaded", "lru")}
        # the operator's view (`python -m serve.status`): images drawn on this replica, evictions or not, once the
        # replica's periodic metrics report has carried the last request's count
        text = _wait_for("the images-drawn counts", lambda: (t if f"    {replica}: a (2), b (2)" in (t := report("lru")) else None))
        assert "application lru: RUNNING" in text and "deployment SDMModel: HEALTHY, 1 RUNNING" in text, text
        cli = subprocess.run([sys.executable, "-m", "serve.status", "--address", ray.get_runtime_context().gcs_address,
                              "--app", "lru"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert cli.returncode == 0 and f"{replica}: a (2), b (2)" in cli.stdout, cli.stdout + cli.stderr
        with pytest.raises(ApiError) as unknown:
            client.generate(label_map(0), num_inference_steps=STEPS, model="nope")
        assert (unknown.value.status, unknown.value.code) == (404, "unknown_model")
        assert [m["name"] for m in client.models()["models"]] == ["a", "b", "c"]
    finally:
        from ray import serve

        serve.delete("lru")


def test_serve_routes_each_models_requests_to_the_replica_that_holds_it(cluster, models):
    """Two replicas that hold one model each: once both models are loaded, a model's requests stay on its replica
    and nothing is evicted any more."""
    args = {"models": {"a": models["a"], "b": models["b"]}, "max_models_per_replica": 1, "num_cpus": 0.25,
            "min_replicas": 2, "max_replicas": 2}
    url = deploy(args, "routed", "/routed", cluster.http)
    try:
        for _ in range(3):  # both replicas start with "a"; the first "b" evicts it on one of them
            assert _generate(url, "b", 1).ok and _generate(url, "a", 1).ok
        time.sleep(2)  # replicas report the models they hold to the controller, which tells the routers
        evicted = sum(_gauges(cluster, "sdm_model_evictions_total", "routed").values())
        replicas = {"a": set(), "b": set()}
        for i in range(12):
            name = "ab"[i % 2]
            r = _generate(url, name, i, header=i % 4 < 2)
            assert r.ok and r.headers["x-sdm-model"] == name
            replicas[name].add(r.headers["x-sdm-replica"])
        assert len(replicas["a"]) == len(replicas["b"]) == 1 and replicas["a"] != replicas["b"], replicas
        time.sleep(3)  # metrics are exported every second
        assert sum(_gauges(cluster, "sdm_model_evictions_total", "routed").values()) == evicted
        print(f"routing: model a on replica {replicas['a'].pop()}, model b on {replicas['b'].pop()}; "
              f"{evicted:g} evictions while warming up, none after")
    finally:
        from ray import serve

        serve.delete("routed")

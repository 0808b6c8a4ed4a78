"""The deployment path on one machine, as a user runs it: a Ray cluster of two nodes started with `ray start`
(separate raylets on this machine; tests/cluster_helpers.py), a loopback S3 endpoint as the object store, toy
data written to s3://, `ray job submit` of training (and of generation, where jobs/generate.py exists),
`serve deploy` of the trained model, HTTP queries, and the app's metrics read back through a real Prometheus
server started with infra/prometheus/prometheus.yml.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
import requests
import yaml

from cluster_helpers import ROOT, Cluster, output, two_node_cluster, wait_for
from serve_helpers import free_port, label_map, png, read_png

pytestmark = [pytest.mark.e2e, pytest.mark.ray]
PROMETHEUS = shutil.which("prometheus")
STEPS = 4


@pytest.fixture(scope="module")
def cluster(s3_server: str) -> Iterator[Cluster]:
    with two_node_cluster(s3_server, head_cpus=1, worker_cpus=2) as c:
        yield c


@pytest.fixture(scope="module")
def trained(cluster: Cluster) -> tuple[str, subprocess.CompletedProcess]:
    """Toy data written to s3:// by the CLI, then a short training job submitted to the cluster."""
    data, run = f"s3://{cluster.bucket}/data", f"s3://{cluster.bucket}/runs/tiny"
    r = cluster.run(sys.executable, "-m", "sdm", "data", "toy", data, "--n", "64")
    assert r.returncode == 0, output(r)
    job = cluster.submit(
        "python", "-m", "jobs.train", "--preset", "tiny", "--data", data, "--run", run, "--steps", str(STEPS),
        "--num-workers", "2", "--log-every", "1", "--checkpoint-every", "2",
    )
    return run, job


def test_a_training_job_submitted_to_the_cluster_trains_from_s3_to_s3(cluster, trained):
    run, job = trained
    assert job.returncode == 0 and "succeeded" in job.stdout, output(job)
    assert "done in" in job.stdout and f"step {STEPS}" in job.stdout, output(job)
    keys = cluster.s3_keys("runs/tiny/")
    assert "runs/tiny/model/config.json" in keys and any(k.endswith(".safetensors") for k in keys), keys
    assert any("checkpoint_" in k for k in keys), f"no Ray Train checkpoint on the object store: {keys}"
    assert "worker" in cluster.nodes_of("RayTrainWorker"), "no training worker ran on the worker node"


def test_a_generation_job_submitted_to_the_cluster_writes_a_dataset_to_s3(cluster, trained):
    if not (ROOT / "jobs/generate.py").exists():
        pytest.skip("jobs/generate.py has not landed on this branch yet")
    run, _ = trained
    out = f"s3://{cluster.bucket}/generated"
    job = cluster.submit(
        "python", "-m", "jobs.generate", "--model", run, "--labels", f"s3://{cluster.bucket}/data", "--split", "val",
        "--out", out, "--samples-per-label", "1", "--guidance-scale", "1.5", "--sampler", "ddim", "--num-inference-steps", "2",
        "--seed", "0", "--batch-size", "8", "--num-gpus-per-worker", "0", "--concurrency", "1",
        "--segmenter-steps", "5", "--min-consistency", "0",  # the built-in segmenter, placed on S3 for the scoring actors
    )
    assert job.returncode == 0 and "succeeded" in job.stdout, output(job)
    keys = cluster.s3_keys("generated/")
    assert "generated/dataset.json" in keys and any(k.endswith(".parquet") for k in keys), keys
    assert {"generated/segmenter/segmenter.json", "generated/segmenter/segmenter.safetensors"} <= set(keys), keys
    assert "label consistency (builtin:" in job.stdout, output(job)


@pytest.fixture(scope="module")
def endpoint(cluster: Cluster, trained, tmp_path_factory) -> str:
    """`serve deploy` of a copy of serve/config.yaml serving the trained run; returns the HTTP base URL."""
    run, job = trained
    assert job.returncode == 0, output(job)
    return cluster.deploy_serve(run, tmp_path_factory.mktemp("serve"))


def test_the_deployed_endpoint_serves_the_trained_model(endpoint):
    info = requests.get(f"{endpoint}/v1/model", timeout=30).json()
    assert info["preset"] == "tiny"
    label = label_map(0) % info["num_classes"]
    r = requests.post(f"{endpoint}/v1/generate", files={"label": png(label)},
                      data={"steps": "2", "seed": "7", "guidance_scale": "1.5"}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text[:500]
    image = read_png(r.content)
    assert image.shape == (*label.shape, 3) and r.headers["X-SDM-Seed"] == "7"
    again = requests.post(f"{endpoint}/v1/generate", files={"label": png(label)},
                          data={"steps": "2", "seed": "7", "guidance_scale": "1.5"}, timeout=120)
    assert again.status_code == 200 and (read_png(again.content) == image).all()


@pytest.fixture(scope="module")
def prometheus(cluster: Cluster, tmp_path_factory) -> Iterator[str]:
    """A real Prometheus with a copy of infra/prometheus/prometheus.yml aimed at this cluster's ports."""
    if PROMETHEUS is None:
        pytest.skip("needs a Prometheus server: Debian's prometheus package (`make system-deps`, as root)")
    config = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["ray"]["file_sd_configs"][0]["files"] = [f"{cluster.temp_dir}/prom_metrics_service_discovery.json"]
    jobs["ray-static"]["static_configs"][0]["targets"] = [f"127.0.0.1:{p}" for p in cluster.metrics_ports]
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(work / "prometheus.log", "w") as log:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("Prometheus is ready", lambda: requests.get(f"{url}/-/ready", timeout=5).ok, 60)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_prometheus_scrapes_both_nodes_and_reads_back_the_apps_request_counter(prometheus, endpoint, cluster):
    static = {f"127.0.0.1:{p}" for p in cluster.metrics_ports}

    def targets_up() -> bool:
        active = requests.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        up: dict[str, set[str]] = {}
        for t in active:
            if t["health"] == "up":
                up.setdefault(t["labels"]["job"], set()).add(t["labels"]["instance"])
        discovered_ports = {int(i.rsplit(":", 1)[1]) for i in up.get("ray", ())}
        return up.get("ray-static") == static and set(cluster.metrics_ports) <= discovered_ports

    # Both nodes, through fixed targets and through the head's service-discovery file.
    wait_for(f"both nodes' metrics ports {cluster.metrics_ports} are up in both scrape jobs", targets_up, 90, every=2)

    assert requests.get(f"{endpoint}/healthz", timeout=30).status_code == 200
    query = 'sum(ray_sdm_requests_total{application="sdm",route="/healthz",status="200"})'

    def counted() -> float | None:
        result = requests.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=10).json()["data"]["result"]
        return float(result[0]["value"][1]) if result and float(result[0]["value"][1]) >= 1 else None

    assert wait_for(f"Prometheus returns {query} >= 1", counted, 90, every=2) >= 1

"""The deployment path on one machine, as a user runs it: a Ray cluster of two nodes started with `ray start`
(separate raylets on this machine), a loopback S3 endpoint as the object store, toy data written to s3://,
`ray job submit` of training (and of generation, where jobs/generate.py exists), `serve deploy` of the
trained model, HTTP queries, and the app's metrics read back through a real Prometheus server started
with infra/prometheus/prometheus.yml.

The nodes run with the object-store settings and the package on PYTHONPATH in their environment, as the
KubeRay pods get them from the Secret and the image, and with a token of their own (Ray's token auth; the
`ray` and `serve` CLIs read it from RAY_AUTH_TOKEN). Ray turns 127.0.0.1 into this host's own address, so
the nodes advertise that; nothing leaves the machine. They are started with `ray start --block` in sessions
of their own and torn down by killing those sessions (never `ray stop`, which would stop every Ray cluster
on the machine).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from serve_helpers import free_port, label_map, png, read_png

pytestmark = [pytest.mark.e2e, pytest.mark.ray]
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROMETHEUS = shutil.which("prometheus")
STEPS = 4


@dataclass
class Cluster:
    env: dict[str, str]  # the AWS settings, PATH and Ray token a user's shell has
    dashboard: str  # the Jobs API / Serve REST address
    bucket: str
    s3_endpoint: str
    metrics_ports: tuple[int, int]  # head, worker
    temp_dir: str

    def run(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)

    def submit(self, *entrypoint: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir .` with the driver on the head node, as KubeRay's RayJob does."""
        return self.run(
            str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", ".",
            "--entrypoint-resources", '{"head": 1}', "--", *entrypoint, timeout=timeout,
        )

    def _state(self, what: str, **params: str) -> list[dict]:
        headers = {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}
        r = requests.get(f"{self.dashboard}/api/v0/{what}", params=params, headers=headers, timeout=30)
        return r.json()["data"]["result"]["result"]

    def nodes_of(self, actor_class: str) -> set[str]:
        """Which nodes ("head", "worker": their custom resource) ran actors of a class, dead ones included."""
        kinds = {n["node_id"]: ({"head", "worker"} & set(n["resources_total"])).pop() for n in self._state("nodes")}
        actors = self._state("actors", detail="1", limit="10000")
        return {kinds[a["node_id"]] for a in actors if a["class_name"] == actor_class and a.get("node_id") in kinds}

    def s3_keys(self, prefix: str) -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _output(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout[-6000:]}\n--- stderr\n{r.stderr[-4000:]}"


def _wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (requests.RequestException, OSError):
            pass
        time.sleep(every)
    raise TimeoutError(f"{what} within {timeout:.0f}s")


def _kill_session(proc: subprocess.Popen, grace: float = 30) -> None:
    """Stop a `ray start --block` (it stops its node's processes), then kill whatever is left of its session."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    ps = subprocess.run(["ps", "-o", "pid=", "-s", str(proc.pid)], capture_output=True, text=True)
    for pid in map(int, ps.stdout.split()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@pytest.fixture(scope="module")
def cluster(s3_server: str) -> Iterator[Cluster]:
    import boto3

    bucket = f"e2e{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    aws = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    token = secrets.token_hex(32)
    env = {**os.environ, **aws, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    node_env = {**env, "PYTHONPATH": str(ROOT), "RAY_metrics_report_interval_ms": "1000"}
    temp_dir = tempfile.mkdtemp(prefix="sdme2e-", dir="/tmp")  # short: Ray's socket paths live under it
    gcs, dashboard, metrics = free_port(), free_port(), (free_port(), free_port())
    common = ["--block", f"--temp-dir={temp_dir}", "--disable-usage-stats"]

    def node_ports(i: int) -> list[str]:
        return [f"--metrics-export-port={metrics[i]}", f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

    log_path = Path(temp_dir) / "ray-start.log"
    logs = open(log_path, "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=1", '--resources={"head": 1}',
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
         *node_ports(0), *common],
        env=node_env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True,
    )
    nodes = [head]
    try:
        dashboard_url = f"http://127.0.0.1:{dashboard}"
        auth = {"Authorization": f"Bearer {token}"}
        _wait_for("the head node's dashboard answers", lambda: requests.get(f"{dashboard_url}/api/version", headers=auth, timeout=5).ok, 120)
        nodes.append(subprocess.Popen(
            [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2", '--resources={"worker": 1}',
             *node_ports(1), *common],
            env=node_env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True,
        ))
        c = Cluster(env, dashboard_url, bucket, s3_server, metrics, temp_dir)

        def two_nodes() -> bool:
            r = requests.get(f"{dashboard_url}/api/v0/nodes", headers=auth, timeout=10).json()
            alive = [n for n in r["data"]["result"]["result"] if n["state"] == "ALIVE"]
            return {k for n in alive for k in n["resources_total"]} >= {"head", "worker"}

        _wait_for("both nodes join", two_nodes, 120, every=3)
        yield c
    finally:
        for proc in reversed(nodes):
            _kill_session(proc)
        logs.close()
        print(log_path.read_text()[-4000:])  # shown by pytest when the test failed
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def trained(cluster: Cluster) -> tuple[str, subprocess.CompletedProcess]:
    """Toy data written to s3:// by the CLI, then a short training job submitted to the cluster."""
    data, run = f"s3://{cluster.bucket}/data", f"s3://{cluster.bucket}/runs/tiny"
    r = cluster.run(sys.executable, "-m", "sdm", "data", "toy", data, "--n", "64")
    assert r.returncode == 0, _output(r)
    job = cluster.submit(
        "python", "-m", "jobs.train", "--preset", "tiny", "--data", data, "--run", run, "--steps", str(STEPS),
        "--num-workers", "2", "--log-every", "1", "--checkpoint-every", "2",
    )
    return run, job


def test_a_training_job_submitted_to_the_cluster_trains_from_s3_to_s3(cluster, trained):
    run, job = trained
    assert job.returncode == 0 and "succeeded" in job.stdout, _output(job)
    assert "done in" in job.stdout and f"step {STEPS}" in job.stdout, _output(job)
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
        "--out", out, "--samples-per-label", "1", "--guidance", "1.5", "--sampler", "ddim", "--steps", "2",
        "--seed", "0", "--batch-size", "8", "--num-gpus-per-worker", "0", "--concurrency", "1",
    )
    assert job.returncode == 0 and "succeeded" in job.stdout, _output(job)
    keys = cluster.s3_keys("generated/")
    assert "generated/dataset.json" in keys and any(k.endswith(".parquet") for k in keys), keys


@pytest.fixture(scope="module")
def endpoint(cluster: Cluster, trained, tmp_path_factory) -> str:
    """`serve deploy` of a copy of serve/config.yaml serving the trained run; returns the HTTP base URL."""
    run, job = trained
    assert job.returncode == 0, _output(job)
    config = yaml.safe_load((ROOT / "serve/config.yaml").read_text())
    port = free_port()
    config["proxy_location"] = "HeadOnly"  # both nodes share one host, so only one proxy can bind the port
    config["http_options"]["port"] = port
    (app,) = config["applications"]
    app["args"]["model_uri"] = run
    path = tmp_path_factory.mktemp("serve") / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    r = cluster.run(str(BIN / "serve"), "deploy", str(path), "--address", cluster.dashboard, timeout=120)
    assert r.returncode == 0, _output(r)
    url = f"http://127.0.0.1:{port}"
    _wait_for("the deployed app's /healthz answers 200", lambda: requests.get(f"{url}/healthz", timeout=10).status_code == 200, 300, every=2)
    return url


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
        _wait_for("Prometheus is ready", lambda: requests.get(f"{url}/-/ready", timeout=5).ok, 60)
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
    _wait_for(f"both nodes' metrics ports {cluster.metrics_ports} are up in both scrape jobs", targets_up, 90, every=2)

    assert requests.get(f"{endpoint}/healthz", timeout=30).status_code == 200
    query = 'sum(ray_sdm_requests_total{application="sdm",route="/healthz",status="200"})'

    def counted() -> float | None:
        result = requests.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=10).json()["data"]["result"]
        return float(result[0]["value"][1]) if result and float(result[0]["value"][1]) >= 1 else None

    assert _wait_for(f"Prometheus returns {query} >= 1", counted, 90, every=2) >= 1

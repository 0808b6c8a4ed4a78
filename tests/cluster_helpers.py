"""A real two-node Ray cluster on this machine, for the end-to-end and chaos tests: `ray start --head` and
`ray start --address` (separate raylets, custom resources "head" and "worker"), a loopback S3 endpoint as the
object store, token auth, and a worker node that can be stopped (its raylet killed) and started again.

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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import requests
import yaml

from serve_helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@dataclass
class Cluster:
    env: dict[str, str]  # the AWS settings, PATH and Ray token a user's shell has
    dashboard: str  # the Jobs API / Serve REST address
    bucket: str
    s3_endpoint: str
    metrics_ports: tuple[int, int]  # head, worker
    temp_dir: str
    gcs_address: str = ""
    worker_cpus: int = 2
    node_env: dict[str, str] = field(default_factory=dict, repr=False)  # what the nodes run with
    sessions: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)  # "head", "worker"
    log: IO[str] | None = field(default=None, repr=False)  # the nodes' `ray start` output

    def run(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)

    def submit_argv(self, *entrypoint: str, submission_id: str | None = None) -> list[str]:
        """`ray job submit --working-dir .` with the driver on the head node, as KubeRay's RayJob does."""
        named = ["--submission-id", submission_id] if submission_id else []
        return [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", ".",
                "--entrypoint-resources", '{"head": 1}', *named, "--", *entrypoint]

    def submit(self, *entrypoint: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.run(*self.submit_argv(*entrypoint), timeout=timeout)

    def state(self, what: str, **params: str) -> list[dict]:
        headers = {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}
        r = requests.get(f"{self.dashboard}/api/v0/{what}", params=params, headers=headers, timeout=30)
        return r.json()["data"]["result"]["result"]

    def nodes_of(self, actor_class: str) -> set[str]:
        """Which nodes ("head", "worker": their custom resource) ran actors of a class, dead ones included."""
        kinds = {n["node_id"]: ({"head", "worker"} & set(n["resources_total"])).pop() for n in self.state("nodes")}
        actors = self.state("actors", detail="1", limit="10000")
        return {kinds[a["node_id"]] for a in actors if a["class_name"] == actor_class and a.get("node_id") in kinds}

    def alive_actors(self, class_contains: str) -> list[dict]:
        """The live actors whose class name contains a string, each with its node kind under "node"."""
        kinds = {n["node_id"]: ({"head", "worker"} & set(n["resources_total"])).pop()
                 for n in self.state("nodes") if n["state"] == "ALIVE"}
        actors = self.state("actors", detail="1", limit="10000", filter_keys="state", filter_predicates="=",
                             filter_values="ALIVE")
        return [{**a, "node": kinds.get(a.get("node_id"))} for a in actors if class_contains in a["class_name"]]

    def alive_kinds(self) -> set[str]:
        """The node kinds ("head", "worker") the GCS holds alive."""
        alive = [n for n in self.state("nodes") if n["state"] == "ALIVE"]
        return {k for n in alive for k in n["resources_total"]} & {"head", "worker"}

    def deploy_serve(self, model_uri: str, workdir: Path) -> str:
        """`serve deploy` of a copy of serve/config.yaml serving `model_uri`, its proxy on the head node only (both
        nodes share one host, so only one proxy can bind the port); returns the base URL once /healthz answers."""
        config = yaml.safe_load((ROOT / "serve/config.yaml").read_text())
        port = free_port()
        config["proxy_location"] = "HeadOnly"
        config["http_options"]["port"] = port
        (app,) = config["applications"]
        app["args"]["model_uri"] = model_uri
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        r = self.run(str(BIN / "serve"), "deploy", str(workdir / "config.yaml"), "--address", self.dashboard, timeout=120)
        assert r.returncode == 0, output(r)
        url = f"http://127.0.0.1:{port}"
        healthy = lambda: requests.get(f"{url}/healthz", timeout=10).status_code == 200
        wait_for("the deployed app's /healthz answers 200", healthy, 300, every=1)
        return url

    def s3_keys(self, prefix: str) -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def _start_node(self, kind: str, argv: list[str]) -> None:
        # A worker node gets a temp dir of its own, a fresh one each start: nodes sharing one would each forward
        # the other's worker logs to the drivers (every line twice), and a restarted node would forward its
        # predecessor's logs again.
        temp_dir = self.temp_dir
        if kind == "worker":
            temp_dir = tempfile.mkdtemp(prefix="w", dir=self.temp_dir)
        metrics = list(self.metrics_ports)
        metrics[kind == "worker"] = free_port()  # a node started again binds fresh ports
        self.metrics_ports = (metrics[0], metrics[1])
        ports = [f"--metrics-export-port={metrics[kind == 'worker']}", f"--dashboard-agent-listen-port={free_port()}",
                 f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
        self.sessions[kind] = subprocess.Popen(
            [str(BIN / "ray"), "start", *argv, *ports, "--block", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=self.node_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def stop(self, drain_s: float = 5) -> None:
        """Give each node `drain_s` to stop by itself, kill what is left of it, print the nodes' `ray start` output
        (pytest shows it when the test failed) and remove the temp dir."""
        for kind in ("worker", "head"):
            if kind in self.sessions:
                kill_session(self.sessions.pop(kind), grace=drain_s)
        self.log.close()
        print(_log_tail(Path(self.temp_dir) / "ray-start.log", 4000))
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def start_worker(self, timeout: float = 120) -> None:
        """Start the worker node (again) and wait until the GCS holds it alive."""
        self._start_node("worker", [f"--address={self.gcs_address}", f"--num-cpus={self.worker_cpus}",
                                    '--resources={"worker": 1}'])
        wait_for("both nodes are alive", lambda: self.alive_kinds() == {"head", "worker"}, timeout, every=1)

    def raylet_pid(self, kind: str = "worker") -> int:
        """The pid of a node's raylet: the raylet process in that node's session."""
        ps = subprocess.run(["ps", "-o", "pid=,comm=", "-s", str(self.sessions[kind].pid)],
                            capture_output=True, text=True)
        procs = (line.split(None, 1) for line in ps.stdout.splitlines())
        pids = [int(pid) for pid, comm in procs if comm.strip() == "raylet"]
        assert len(pids) == 1, f"expected one raylet in the {kind} node's session, found {ps.stdout}"
        return pids[0]

    def stop_worker(self, timeout: float = 60) -> float:
        """Stop the worker node as a crash does: SIGKILL its raylet (its `ray start --block` then takes the rest of
        the node down), wait until the GCS holds it dead, and clear what is left of its session. Returns the
        monotonic time of the kill."""
        pid = self.raylet_pid("worker")
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_for("the GCS marks the worker node dead", lambda: "worker" not in self.alive_kinds(), timeout, every=0.5)
        kill_session(self.sessions.pop("worker"), grace=10)
        return killed


def output(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout[-6000:]}\n--- stderr\n{r.stderr[-4000:]}"


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (requests.RequestException, OSError, KeyError, ValueError):  # not up yet, or mid-restart
            pass
        time.sleep(every)
    raise TimeoutError(f"{what} within {timeout:.0f}s")


def kill_session(proc: subprocess.Popen, grace: float = 30) -> None:
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


class HeadStartFailed(RuntimeError):
    """The head node's `ray start --block` ended, or its dashboard stayed silent, within the wait."""


def _log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"(no {path.name})"


def _start_head(env: dict[str, str], bucket: str, s3_server: str, head_cpus: int, worker_cpus: int,
                ray_config: dict[str, str] | None, timeout: float) -> Cluster:
    """Start the head node on fresh ports in a fresh temp dir and wait until its dashboard answers. A head that
    exits or stays silent is torn down and reported with its `ray start` output and dashboard log."""
    gcs, dashboard = free_port(), free_port()
    # RAY_API_SERVER_ADDRESS: state API calls made inside the cluster without an address (Ray Train's placement
    # group cleaner asks whether its controller is alive) go to this cluster's dashboard, not to whichever Ray
    # cluster on this machine started last.
    node_env = {**env, "PYTHONPATH": str(ROOT), "RAY_metrics_report_interval_ms": "1000",
                "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}", **(ray_config or {})}
    temp_dir = tempfile.mkdtemp(prefix="sdme2e-", dir="/tmp")  # short: Ray's socket paths live under it
    c = Cluster(env, f"http://127.0.0.1:{dashboard}", bucket, s3_server, (0, 0), temp_dir,
                gcs_address=f"127.0.0.1:{gcs}", worker_cpus=worker_cpus, node_env=node_env,
                log=open(Path(temp_dir) / "ray-start.log", "w"))
    c._start_node("head", ["--head", f"--port={gcs}", f"--num-cpus={head_cpus}", '--resources={"head": 1}',
                           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                           f"--ray-client-server-port={free_port()}"])
    auth = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}

    def answers() -> bool:
        if c.sessions["head"].poll() is not None:
            raise HeadStartFailed(f"`ray start --head` exited with {c.sessions['head'].returncode}")
        return requests.get(f"{c.dashboard}/api/version", headers=auth, timeout=5).ok

    try:
        wait_for("the head node's dashboard answers", answers, timeout)
        return c
    except (HeadStartFailed, TimeoutError) as e:
        logs = Path(temp_dir) / "session_latest" / "logs"
        report = (f"{e}\n--- ray start\n{_log_tail(Path(temp_dir) / 'ray-start.log')}\n--- dashboard.log\n"
                  f"{_log_tail(logs / 'dashboard.log')}\n--- dashboard.err\n{_log_tail(logs / 'dashboard.err')}")
        c.stop(drain_s=5)
        raise HeadStartFailed(report) from e


@contextmanager
def two_node_cluster(s3_server: str, head_cpus: int = 1, worker_cpus: int = 2,
                     ray_config: dict[str, str] | None = None, drain_s: float = 5) -> Iterator[Cluster]:
    """A head node (`head_cpus` CPUs, resource "head") and a worker node (`worker_cpus`, resource "worker"),
    a fresh bucket on `s3_server`; `ray_config` adds RAY_* settings to the nodes' environment. At the end each
    node gets `drain_s` to stop by itself before what is left of it is killed. A head whose dashboard does not
    answer within 90 s is started once more on fresh ports (a busy machine can starve one start): the first
    failure's logs are printed, the second's raised."""
    import boto3

    bucket = f"e2e{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    aws = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    env = {**os.environ, **aws, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    try:
        c = _start_head(env, bucket, s3_server, head_cpus, worker_cpus, ray_config, timeout=90)
    except HeadStartFailed as first:
        print(f"first head start failed; starting it again on fresh ports:\n{first}")
        c = _start_head(env, bucket, s3_server, head_cpus, worker_cpus, ray_config, timeout=90)
    try:
        c.start_worker()
        yield c
    finally:
        c.stop(drain_s)

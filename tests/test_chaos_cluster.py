"""Chaos on a two-node cluster of its own (tests/cluster_helpers.py; loopback only): the worker node stopped
(its raylet SIGKILLed) under a generation job and under a training run, and the Serve model replica killed
under HTTP load. Each test prints its figures (`pytest -s` shows them) and asserts on them.

The cluster is the deployment one (head: 1 CPU and the job drivers; worker: 2 CPUs) with three settings
(CHAOS_RAY_CONFIG): the GCS declares a node dead after 3 missed 1 s health checks instead of 5 missed 3 s ones,
so a lost node is noticed in seconds; Ray forwards every worker line undeduplicated, as the training test counts
step lines; and a raylet keeps up to 8 idle workers instead of one per CPU (1 on the head), so that Ray Data's
tasks there do not start a Python process each (a resumed run once waited 30 s for its data without it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from cluster_helpers import BIN, ROOT, Cluster, output, two_node_cluster, wait_for
from serve_helpers import label_map, png, random_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.ray]

CHAOS_RAY_CONFIG = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                    "RAY_health_check_failure_threshold": "3", "RAY_DEDUP_LOGS": "0", "RAY_num_workers_soft_limit": "8"}
TOY_ITEMS, VAL_FRACTION = 128, 0.25  # 32 val label maps to generate from; 96 train images: 12 steps an epoch
GEN_STEPS = 10  # DDIM steps: about 2 s per block of 8 on one sampling actor, so the job runs long enough to be hit
TRAIN_STEPS, CHECKPOINT_EVERY = 10, 3  # within the first epoch: no dataset pass restarts but the resume's


@pytest.fixture(scope="module")
def cluster(s3_server: str) -> Iterator[Cluster]:
    with two_node_cluster(s3_server, head_cpus=1, worker_cpus=2, ray_config=CHAOS_RAY_CONFIG, drain_s=2) as c:
        with pytest.MonkeyPatch.context() as mp:  # this process reads the outputs back from the object store
            for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
                mp.setenv(k, c.env[k])
            yield c


@pytest.fixture(scope="module")
def toy(cluster: Cluster) -> str:
    uri = f"s3://{cluster.bucket}/toy"
    r = cluster.run(sys.executable, "-m", "sdm", "data", "toy", uri, "--n", str(TOY_ITEMS),
                    "--val-fraction", str(VAL_FRACTION), timeout=120)
    assert r.returncode == 0, output(r)
    return uri


@pytest.fixture(scope="module")
def model(cluster: Cluster) -> str:
    """A randomly initialised tiny model (never trained), exported with class names to the object store."""
    uri = f"s3://{cluster.bucket}/models/random-tiny"
    random_tiny_model(uri)
    return uri


class Job:
    """A `ray job submit` running in the background; its output (the driver's, with the workers' lines that Ray
    forwards) collected line by line."""

    def __init__(self, cluster: Cluster, *entrypoint: str):
        self.cluster, self.id = cluster, f"chaos-{uuid.uuid4().hex[:8]}"
        self.proc = subprocess.Popen(cluster.submit_argv(*entrypoint, submission_id=self.id), cwd=ROOT, env=cluster.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.times: list[float] = []  # when each line came
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.times.append(time.monotonic())
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float) -> bool:
        """Whether the job succeeded, once `ray job submit` returns."""
        self.proc.wait(timeout)
        self.reader.join(30)
        return self.proc.returncode == 0 and f"Job '{self.id}' succeeded" in self.text

    def stop(self) -> None:
        """Stop the job on the cluster (a failed test must not leave it running into the next one)."""
        if self.proc.poll() is None:
            self.cluster.run(str(BIN / "ray"), "job", "stop", "--address", self.cluster.dashboard, self.id, timeout=60)
            self.proc.kill()
            self.proc.wait()


# --- generation ---------------------------------------------------------------------------------------------


def _generate_argv(model: str, labels: str, out: str) -> list[str]:
    """One sampling actor that needs 2 CPUs: only the worker node has them, so the node's loss takes it down."""
    return ["python", "-m", "jobs.generate", "--model", model, "--labels", labels, "--split", "val", "--out", out,
            "--sampler", "ddim", "--num-inference-steps", str(GEN_STEPS), "--guidance-scale", "1.5", "--seed", "11", "--micro-batch", "4",
            "--batch-size", "8", "--shard-rows", "8", "--cpus-per-worker", "2", "--concurrency", "1", "--segmenter", "none"]


def test_worker_node_lost_during_generation_every_item_once_and_byte_identical(cluster, model, toy):
    from sdm.data.card import read_card
    from sdm.data.shards import decode_row, iter_rows
    from test_generate_job import _reference

    out = f"s3://{cluster.bucket}/gen"
    progress = lambda: [k for k in cluster.s3_keys("gen/progress/") if k.endswith(".json")]  # noqa: E731
    sources = {f"{r['key']}_0": decode_row(r) for r in iter_rows(toy, split="val")}
    total_shards = len(sources) // 8
    job = Job(cluster, *_generate_argv(model, toy, out))
    try:
        wait_for("the job writes its first shard", progress, 180, every=0.2)
        actors = cluster.alive_actors("SampleBatch")
        before = len(progress())
        killed = cluster.stop_worker()
        cluster.start_worker()
        back = time.monotonic() - killed
        completed = job.wait(timeout=240)
        restarts = [int(a["num_restarts"]) for a in cluster.state("actors", detail="1", limit="10000")
                    if "SampleBatch" in a["class_name"]]
    finally:
        job.stop()
    assert {a["node"] for a in actors} == {"worker"}, f"the sampling actor ran on {actors}"
    assert 0 < before < total_shards, f"{before} of {total_shards} shards were written when the node was killed"
    reruns = 0
    if not completed:  # a rerun of the same command finishes what the lost node left
        reruns = 1
        rerun = cluster.submit(*_generate_argv(model, toy, out), timeout=240)
        assert rerun.returncode == 0 and "succeeded" in rerun.stdout, output(rerun)

    rows = list(iter_rows(out))  # through the card, checksums verified
    got = Counter(r["key"] for r in rows)
    lost, duplicated = sorted(set(sources) - set(got)), sorted(k for k, n in got.items() if n > 1)
    # Every image against the library's own sampling of that label map with the row's seed and index: what any
    # uninterrupted run draws (tests/test_generate_job.py holds the job to that).
    differ = sorted(r["key"] for r in rows if r["key"] in sources
                    and r["image"] != _reference(model, sources[r["key"]]["label"], sources[r["key"]]["instance"], r))
    print(f"\ngeneration: {len(sources)} items in {total_shards} shards; 1 fault (worker raylet SIGKILL) with {before} "
          f"shards written; node back {back:.1f}s after the kill; sampling actor restarts {sum(restarts)}; "
          f"job {'completed through retries' if completed else 'failed, completed on rerun'} ({reruns} reruns); "
          f"items written {sum(got.values())}, lost {len(lost)}, duplicated {len(duplicated)}, "
          f"not byte-identical {len(differ)}")
    assert not lost and not duplicated and set(got) == set(sources), (lost, duplicated, set(got) - set(sources))
    assert not differ, differ
    shards = {Path(k).name for k in cluster.s3_keys("gen/shards/")}
    assert shards == {Path(s.path).name for s in read_card(out).shards}, "an unfinished shard was left beside the card"


# --- training -----------------------------------------------------------------------------------------------


def _checkpoint_steps(run: str) -> list[int]:
    from jobs.train_worker import checkpoint_dirs
    from sdm.checkpoint import load_progress

    return sorted(load_progress(d).step for d in checkpoint_dirs(run))


def test_worker_node_lost_during_training_resumes_from_the_last_checkpoint_no_step_lost_or_repeated(cluster, toy):
    from sdm.checkpoint import load_progress
    from jobs.train_worker import latest_checkpoint_dir

    run = f"s3://{cluster.bucket}/runs/chaos"
    job = Job(cluster, "python", "-m", "jobs.train", "--preset", "tiny", "--data", toy, "--run", run,
              "--steps", str(TRAIN_STEPS), "--num-workers", "2", "--batch-size", "4", "--shuffle-buffer", "16",
              "--log-every", "1", "--checkpoint-every", str(CHECKPOINT_EVERY))
    step_line = re.compile(rf"step (\d+)/{TRAIN_STEPS} loss")
    try:
        wait_for("a checkpoint on the store", lambda: _checkpoint_steps(run), 240, every=0.5)
        workers = cluster.alive_actors("RayTrainWorker")
        at_kill = max((int(s) for s in step_line.findall(job.text)), default=0)
        killed = cluster.stop_worker()
        last_checkpoint = max(_checkpoint_steps(run))  # what the dead node left: the newest whole checkpoint
        cluster.start_worker()
        back = time.monotonic() - killed
        completed = job.wait(timeout=300)
    finally:
        job.stop()
    text = job.text
    assert "worker" in {w["node"] for w in workers}, f"no training worker ran on the worker node: {workers}"
    assert completed, text[-6000:]
    resumes = [(m.start(), int(m.group(1))) for m in re.finditer(r"resumed from \S+ at step (\d+)", text)]
    assert len(resumes) == 1, f"expected one resume, found {resumes}\n{text[-6000:]}"
    at, resumed = resumes[0]
    resumed_after = job.times[text[:at].count("\n")] - killed
    after = [int(s) for s in step_line.findall(text[at:])]
    expected = list(range(resumed + 1, TRAIN_STEPS + 1))
    counts = Counter(after)
    lost = sorted(set(expected) - set(after))
    repeated = sorted(s for s, n in counts.items() if n > 1)
    span = f"{after[0]}..{after[-1]}" if after else "none"
    print(f"\ntraining: {TRAIN_STEPS} steps, checkpoint every {CHECKPOINT_EVERY}; 1 fault (worker raylet SIGKILL) after "
          f"step {at_kill} was logged, the last checkpoint at step {last_checkpoint}; node back {back:.1f}s after the "
          f"kill; resumed at step {resumed} {resumed_after:.1f}s after the kill; steps logged after the resume {span}: "
          f"lost {len(lost)}, repeated {len(repeated)}")
    assert resumed == last_checkpoint and resumed % CHECKPOINT_EVERY == 0 and 0 < resumed < TRAIN_STEPS
    assert after == expected, f"steps after resuming at {resumed}: {after} (lost {lost}, repeated {repeated})"
    assert re.search(rf"done in \d+s: step {TRAIN_STEPS},", text), text[-3000:]
    final = load_progress(latest_checkpoint_dir(run))  # the data position went on from the checkpoint's, too
    assert (final.step, final.epoch, final.batches_in_epoch) == (TRAIN_STEPS, 0, TRAIN_STEPS), final


# --- serving ------------------------------------------------------------------------------------------------


def test_model_replica_killed_under_load_503_only_until_a_replica_answers(cluster, model, tmp_path):
    url = cluster.deploy_serve(model, tmp_path)
    body = png(label_map(3))
    results: list[tuple[float, float, int, str | None, str | None]] = []  # start, end, status, error code, Retry-After
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                r = requests.post(f"{url}/v1/generate", files={"label": body}, data={"steps": "2", "seed": "1"},
                                  timeout=60)
            except requests.RequestException as e:
                results.append((start, time.monotonic(), -1, type(e).__name__, None))
                continue
            try:
                code = r.json().get("error", {}).get("code") if r.status_code != 200 else None
            except ValueError:
                code = "not JSON"
            results.append((start, time.monotonic(), r.status_code, code, r.headers.get("Retry-After")))

    def ok_since(t: float) -> list:
        return [r for r in list(results) if r[0] > t and r[2] == 200]

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(client)
        try:
            wait_for("steady 200s under load", lambda: len(ok_since(0)) >= 4, 60, every=0.2)
            (replica,) = cluster.alive_actors("SDMModel")
            killed = time.monotonic()
            os.kill(replica["pid"], signal.SIGKILL)
            recovered = wait_for("a request sent after the kill answers 200", lambda: ok_since(killed), 120, every=0.2)
            first_ok = min(r[1] for r in recovered)
            wait_for("more 200s after recovery", lambda: len(ok_since(first_ok)) >= 8, 60, every=0.2)
        finally:
            stop.set()
    counts = Counter(r[2] for r in results)
    unavailable = [r for r in results if r[2] == 503]
    print(f"\nserving: {len(results)} requests by 4 clients; 1 fault (SDMModel replica SIGKILL, pid {replica['pid']} "
          f"on the {replica['node']} node); recovery {first_ok - killed:.1f}s (kill -> first 200 of a request sent "
          f"after it); by status {dict(sorted(counts.items()))}; 503 codes {dict(Counter(r[3] for r in unavailable))}")
    assert set(counts) <= {200, 503}, [r for r in results if r[2] not in (200, 503)]
    assert all(r[3] in ("model_unavailable", "overloaded") and r[4] for r in unavailable), unavailable
    assert all(killed <= r[1] <= first_ok for r in unavailable), "a 503 outside the outage"
    assert all(r[2] == 200 for r in results if r[0] > first_ok), "a request failed after recovery"

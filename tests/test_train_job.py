"""The Ray Train job on a real two-node Ray cluster (head + worker raylets on loopback), gloo DDP on CPUs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from ray_session import ray_session
from sdm import storage
from sdm.checkpoint import load_model, load_progress
from sdm.data.toy import write_toy_dataset
from sdm.pipeline import SDMPipeline
from sdm.run_report import REPORT_FILE
from sdm.testing import save_random_model, save_random_student
from sdm.tracking import TRACKING_FILE, read_run_events
from sdm.validation import Validator

pytestmark = pytest.mark.ray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node as separate raylets; the jobs connect to it by address."""
    ray_cluster_utils = pytest.importorskip("ray.cluster_utils")
    # The dashboard serves the state API the fault test uses to find a training worker's pid.
    c = ray_cluster_utils.Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True, "dashboard_port": _free_port()}
    )
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("toy") / "data")
    write_toy_dataset(uri, n=96, size=32, seed=0)
    return uri


def _job(cluster, *args: str) -> list[str]:
    return [sys.executable, "-m", "jobs.train", "--preset", "tiny", "--address", cluster.address,
            "--num-workers", "2", "--batch-size", "8", "--shuffle-buffer", "32", *args]


def _run(cmd: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _losses(text: str) -> list[float]:
    return [float(m) for m in re.findall(r"step \d+/\d+ loss ([0-9.]+)", text)]


def test_pretrain_two_workers_learns_exports_splits_data_and_logs_what_it_does(cluster, toy_data, tmp_path):
    run = str(tmp_path / "run")
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = _run(_job(cluster, "--data", toy_data, "--run", run, "--steps", "30", "--log-every", "5",
                    "--checkpoint-every", "15", "--audit-keys", "--set", "train.lr=2e-3", "--eval-every", "10",
                    "--eval-maps", "2"), env={"MLFLOW_TRACKING_URI": mlflow_uri})
    text = out.stdout + out.stderr
    assert "global batch 16 = 2 workers x 8 per worker x 1 accumulation" in text
    # channels_last by default: read off the DDP-wrapped model's convolution weights inside the worker
    assert "2 worker(s) x 1 torch thread(s), fp32, channels_last weights" in text
    losses = _losses(text)  # forwarded worker lines: the last may miss the driver's exit
    assert len(losses) >= 5 and np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2])
    # the two workers read disjoint samples within each epoch
    for epoch in range(2):
        a = set(storage.read_bytes(f"{run}/audit/epoch{epoch:04d}_rank0.txt").decode().split())
        b = set(storage.read_bytes(f"{run}/audit/epoch{epoch:04d}_rank1.txt").decode().split())
        assert a and b and not a & b
    # checkpoints every 15 steps, and the exported EMA model samples
    assert _checkpoints(run) == ["checkpoint_00000015", "checkpoint_00000030"]
    assert load_progress(f"{run}/checkpoint_00000030").step == 30
    pipe = SDMPipeline.from_pretrained(run, device="cpu")
    images = pipe(np.zeros((32, 32), dtype=np.int64), num_inference_steps=3, seed=0)
    assert images.shape == (1, 32, 32, 3)
    _assert_watchable(run, toy_data, out.stdout, mlflow_uri)


def _assert_watchable(run: str, data: str, stdout: str, mlflow_uri: str) -> None:
    """Every scalar of the step line at every log step, the validation draws, MLflow's copy, the report."""
    scalars, images = read_run_events(run)
    log_steps = [5, 10, 15, 20, 25, 30]
    for tag in ("loss", "mse", "vb", "grad_norm", "lr", "images_per_s", "data_wait_fraction", "label_drop_fraction",
                "skipped_steps"):
        assert [s for s, _ in scalars[f"train/{tag}"]] == log_steps, tag
    for q in range(4):  # a quarter of the timestep range is logged where the step's batch drew a timestep in it
        assert set(s for s, _ in scalars[f"train/loss_q{q}"]) <= set(log_steps)
    for tag in ("texture_ratio", "spectrum_db", "high_frequency_ratio"):
        assert [s for s, _ in scalars[f"val/{tag}"]] == [10, 20, 30], tag
    assert [s for s, _ in images["val/samples"]] == [10, 20, 30]
    assert scalars["train/lr"][-1][1] == pytest.approx(2e-3) and scalars["train/skipped_steps"][-1][1] == 0
    # the console line carries the same loss as the event file
    assert f"step 30/30 loss {scalars['train/loss'][-1][1]:.4f}" in stdout or "step 30/30" not in stdout

    # the sheet of step 30 is drawn again, byte for byte, from step 30's EMA weights (the exported model), as the
    # worker held them (channels_last, one thread)
    sheet = storage.read_bytes(f"{run}/samples/step-30.png")
    assert [s for s, png in images["val/samples"] if png == sheet] == [30]
    net, cfg = load_model(run)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        redrawn = Validator(data, cfg, num_maps=2, seed=0, guidance_scale=1.0).draw(
            net.to(memory_format=torch.channels_last), step=30)
    finally:
        torch.set_num_threads(threads)
    assert redrawn.sheet_png == sheet
    assert dict(scalars["val/texture_ratio"])[30] == pytest.approx(redrawn.figures["texture_ratio"])

    import mlflow.tracking

    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_uri)
    run_id = json.loads(storage.read_bytes(f"{run}/{TRACKING_FILE}"))["mlflow_run_id"]
    for tag in ("train/loss", "train/grad_norm", "val/spectrum_db"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, tag))
        assert [s for s, _ in history] == [s for s, _ in scalars[tag]], tag
        assert [v for _, v in history] == pytest.approx([v for _, v in scalars[tag]], rel=1e-6), tag
    assert client.get_run(run_id).data.params["steps"] == "30"

    report = storage.read_bytes(f"{run}/{REPORT_FILE}").decode()
    assert all(f"samples/step-{s}.png" in report for s in (10, 20, 30)) and "curves.png" in report
    assert f"report: {run}/{REPORT_FILE}" in stdout


def test_finetune_drops_labels_at_the_configured_rate(cluster, toy_data, tmp_path):
    pre = str(tmp_path / "pre")  # an exported model (the quick start fine-tunes from a pretraining run's checkpoint)
    save_random_model(pre)
    ft = str(tmp_path / "ft")
    out = _run(_job(cluster, "--data", toy_data, "--run", ft, "--stage", "finetune", "--init-from", pre,
                    "--steps", "40", "--log-every", "40", "--checkpoint-every", "40", "--drop-rate", "0.25",
                    "--no-channels-last", "--eval-every", "40", "--eval-maps", "1"))
    assert "2 worker(s) x 1 torch thread(s), fp32, contiguous weights" in out.stdout + out.stderr
    fraction = float(re.search(r"labels dropped ([0-9.]+)", out.stdout + out.stderr).group(1))
    # rank 0 saw 320 labels (binomial standard deviation 0.024); the draws are seeded, so this is reproducible
    assert abs(fraction - 0.25) < 0.06
    net, cfg = load_model(ft)
    assert cfg.name == "tiny"


def test_refuses_a_dataset_that_does_not_fit_the_model(cluster, toy_data, tmp_path):
    out = subprocess.run(
        _job(cluster, "--data", toy_data, "--run", str(tmp_path / "r"), "--steps", "2", "--set", "model.num_classes=9"),
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2
    assert "6 classes" in out.stderr and "9" in out.stderr


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _checkpoints(run: str) -> list[str]:
    if not os.path.isdir(run):
        return []
    return sorted(n for n in os.listdir(run) if n.startswith("checkpoint_") and os.path.isdir(os.path.join(run, n)))


def test_a_killed_worker_is_replaced_and_a_distillation_resumes_from_its_checkpoint_with_its_rounds_teacher(
        cluster, toy_data, tmp_path):
    """Progressive distillation in two rounds (8 -> 4 -> 2 steps) of 20 steps, a training worker SIGKILLed in the
    second: the group restarts from the last checkpoint, whose teacher is the one the second round began with (the
    EMA student at step 20), and the run ends with a 2-step student."""
    from ray.util.state import list_actors

    from sdm.checkpoint import EMA_FILE, TEACHER_FILE, load_weights

    save_random_model(str(tmp_path / "teacher"))
    save_random_student(str(tmp_path / "guidance"), str(tmp_path / "teacher"), target_steps=None)
    run = str(tmp_path / "run")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.train", "--stage", "distill-steps", "--teacher", str(tmp_path / "guidance"), "--from-steps", "8",
         "--target-steps", "2", "--address", cluster.address, "--num-workers", "2", "--batch-size", "8", "--shuffle-buffer", "32",
         "--data", toy_data, "--run", run, "--steps", "40", "--checkpoint-every", "10", "--log-every", "10", "--eval-every", "40",
         "--eval-maps", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        # step 30's line comes after checkpoint 20 was reported, and within the second round
        _wait_for(lambda: any("step 30/40 loss" in line for line in lines), 300, "step 30")
        with ray_session(address=cluster.address):
            workers = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "TrainWorker" in a.class_name]
        assert workers, "no training worker found"
        os.kill(workers[-1].pid, signal.SIGKILL)
        proc.wait(timeout=600)
        reader.join(timeout=30)
    finally:
        proc.kill()
    output = "".join(lines)
    assert proc.returncode == 0, output[-3000:]
    assert "round 2/2 from step 21: 4 -> 2 steps" in output
    assert re.search(r"resumed from .*checkpoint_000000[2-4]0 at step [2-4]0", output)
    assert re.search(r"done in \d+s: step 40,", output)  # the driver's summary; workers' last lines may not be forwarded
    names = _checkpoints(run)
    for name in names:  # every checkpoint left on the store is whole and loadable
        assert load_progress(os.path.join(run, name)).step == int(name.split("_")[1])
    ema = load_weights(os.path.join(run, "checkpoint_00000020"), EMA_FILE)  # the AveragedModel's: its module's, and a count
    round_start = {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}
    for name in ("checkpoint_00000030", "checkpoint_00000040"):
        assert load_progress(os.path.join(run, name)).teacher_round == 1
        teacher = load_weights(os.path.join(run, name), TEACHER_FILE)
        assert teacher.keys() == round_start.keys() and all(torch.equal(teacher[k], round_start[k]) for k in teacher)
    student = load_model(run)[1].student
    assert (student.method, student.timesteps, student.from_steps) == ("progressive", (428, 999), 8)


def test_rerunning_the_same_command_continues_from_the_last_step(cluster, toy_data, tmp_path):
    run = str(tmp_path / "run")
    cmd = _job(cluster, "--data", toy_data, "--run", run, "--steps", "30", "--checkpoint-every", "5", "--log-every", "1",
               "--eval-every", "10", "--eval-maps", "1")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: len(_checkpoints(run)) >= 2, 300, "two checkpoints")
    finally:
        proc.kill()
        proc.wait()
    last = max(load_progress(os.path.join(run, n)).step for n in _checkpoints(run))
    out = _run(cmd)
    text = out.stdout + out.stderr
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", text).group(1))
    assert resumed >= last
    steps = [int(s) for s in re.findall(r"step (\d+)/30 loss", text)]
    assert steps and steps[0] > resumed  # no step is trained twice
    assert re.search(r"done in \d+s: step 30,", text)
    # the curves go on from the checkpoint: the first attempt's steps beyond it are purged, none is missing
    scalars, images = read_run_events(run)
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 31))
    assert [s for s, _ in images["val/samples"]] == [10, 20, 30]
    assert all(s % 2 == 0 for s in steps[1:])  # a line per 5% of the run (2 steps), not one per log step

    # Run once more on the finished run: nothing is trained or exported again.
    weights = os.path.join(run, "model", "model.safetensors")
    exported = open(weights, "rb").read()
    again = _run(cmd)
    assert again.returncode == 0 and "complete already; reusing it (step 30" in again.stdout, again.stdout + again.stderr
    assert "loss" not in again.stdout and open(weights, "rb").read() == exported

"""Endurance: the memory of each long-lived process over a long run, sampled from the process itself after a
warm-up, printed over time with its slope and its growth from the end of warm-up to the end (target under 5%).

    python bench/soak.py serve        # a Serve replica, 3,000 requests, three models multiplexed two at a time
    python bench/soak.py generation   # the generation job's sampling actor, 5,000 tiny label maps
    python bench/soak.py training     # a Ray Train worker, 500 steps
    python bench/soak.py serve --requests 300   # smaller (tests/test_soak.py runs each at a small scale)

Each runs the real process on a local Ray cluster: the Serve app over HTTP (requests for model a, then b, then c,
`--block` at a time, so that every change of model loads one and evicts the least recently used), the generation job
(DDIM, 1 step, randomly initialised tiny model, 32x32 toy label maps, nothing scored) and the training job (tiny
preset, 1 worker, batch 4, checkpoints as it goes). The process is found by the title Ray gives it. Its memory is its
anonymous resident memory (RssAnon in /proc/PID/status: its heap, where a leak grows). Shared pages (Ray's object
store, which a worker maps as blocks pass through it) are not its own, and file-backed pages (the mapped libraries)
come and go as the kernel reclaims and re-reads them on a busy machine: either would read as growth or as shrinkage.

Warm-up is the first --warmup share of the samples (models loaded, caches and allocator pools filled). Growth is the
median of the last five samples over the median of the first five after warm-up; the slope is a least-squares fit of
all samples after warm-up, in MiB per 1,000 units of work (requests, label maps' seconds, steps).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_GROWTH = 0.05


def own_memory_mib(pid: int) -> float | None:
    """A process's own resident memory (RssAnon), in MiB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f)
    except OSError:
        return None
    return int(fields["RssAnon"].split()[0]) / 1024


def allocator_setting(pid: int) -> str:
    """The glibc malloc settings a process started with (sdm.process_env.ALLOCATOR_ENV), as `KEY=VALUE ...`."""
    from sdm.process_env import ALLOCATOR_ENV

    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return "unknown (the process is gone)"
    found = [f"{k}={env[k.encode()].decode()}" for k in ALLOCATOR_ENV if k.encode() in env]
    return " ".join(found) or "glibc's defaults"


def find_pids(title: str) -> list[int]:
    """Processes whose command line (Ray's process title) contains `title`, oldest first."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title in cmdline and "soak.py" not in cmdline:
            pids.append(int(name))
    return sorted(pids)


@dataclass
class Trace:
    """Memory samples of one process: (units of work done, MiB)."""

    process: str
    unit: str
    points: list[tuple[float, float]] = field(default_factory=list)
    warmup: float = 0.2
    allocator: str = "unknown"  # allocator_setting() of the process

    def after_warmup(self) -> np.ndarray:
        pts = np.array(self.points, dtype=np.float64)
        return pts[int(len(pts) * self.warmup):]

    def growth(self) -> float:
        """(median of the last 5 samples) / (median of the first 5 after warm-up) - 1."""
        pts = self.after_warmup()[:, 1]
        return float(np.median(pts[-5:]) / np.median(pts[:5]) - 1)

    def growth_mib(self) -> float:
        """The same rise in MiB."""
        pts = self.after_warmup()[:, 1]
        return float(np.median(pts[-5:]) - np.median(pts[:5]))

    def slope(self) -> float:
        """MiB per 1,000 units of work after warm-up (least squares)."""
        pts = self.after_warmup()
        return float(np.polyfit(pts[:, 0], pts[:, 1], 1)[0] * 1000)

    def report(self, rows: int = 10) -> str:
        pts = np.array(self.points)
        idx = np.unique(np.linspace(0, len(pts) - 1, rows).round().astype(int))
        lines = [f"{self.process}: memory (RssAnon) over {self.unit}, {len(pts)} samples, warm-up the first "
                 f"{self.warmup:.0%}; allocator: {self.allocator}"]
        lines += [f"  {pts[i, 0]:8.0f} {self.unit:9s} {pts[i, 1]:8.1f} MiB" for i in idx]
        pts_w = self.after_warmup()
        lines.append(f"  after warm-up: {pts_w[0, 1]:.1f} -> {pts_w[-1, 1]:.1f} MiB; growth {self.growth():+.2%} ({self.growth_mib():+.1f} MiB) "
                     f"(target under {TARGET_GROWTH:.0%}); slope {self.slope():+.3f} MiB per 1,000 {self.unit}")
        return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _label_png(seed: int, size: int = 32, classes: int = 6) -> bytes:
    import io

    from PIL import Image

    blocks = np.random.default_rng(seed).integers(0, classes, (size // 8, size // 8), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.kron(blocks, np.ones((8, 8), np.uint8))).save(buf, format="PNG")
    return buf.getvalue()


def soak_serve(requests_total: int, block: int, sample_every: int, workdir: str, steps: int = 2,
               log: Callable[[str], None] = print) -> Trace:
    """One replica of the Serve app holding at most two of three models; requests name a, b, c in turn, `block` each."""
    import ray
    import requests
    from ray import serve

    from sdm.testing import save_random_model
    from serve.app import build_app

    models = {name: os.path.join(workdir, name) for name in "abc"}
    for seed, path in enumerate(models.values()):
        save_random_model(path, "tiny", seed=seed)
    app = f"soak{uuid.uuid4().hex[:8]}"
    trace = Trace("serve replica", "requests")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"models": models, "max_models_per_replica": 2, "num_cpus": 0.5}), name=app, route_prefix=f"/{app}")
        url = f"http://127.0.0.1:{port}/{app}"
        (pid,) = find_pids(f"ServeReplica:{app}:SDMModel")
        trace.allocator = allocator_setting(pid)
        switches = 0
        for i in range(requests_total):
            model = "abc"[(i // block) % 3]
            switches += i > 0 and i % block == 0
            r = requests.post(f"{url}/v1/generate", files={"label": ("l.png", _label_png(i), "image/png")},
                              data={"steps": str(steps), "seed": str(i), "model": model}, timeout=300)
            r.raise_for_status()
            if (i + 1) % sample_every == 0:
                trace.points.append((i + 1, own_memory_mib(pid)))
        held = requests.get(f"{url}/healthz", timeout=30).json()["models"]
        log(f"serve: {requests_total} requests, {switches} model changes (each a load and, past the first, an eviction); "
            f"the replica holds {held} at the end")
        serve.shutdown()
    finally:
        ray.shutdown()
    return trace


def _stream_job(cmd: list[str], on_line: Callable[[str], None], timeout: float) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            on_line(line)
        return proc.wait()
    finally:
        timer.cancel()


def soak_training(steps: int, workdir: str, log_every: int = 5, timeout: float = 3600) -> Trace:
    """The training job on one worker; the worker's memory at each logged step."""
    from sdm.data.toy import write_toy_dataset

    data = os.path.join(workdir, "toy")
    write_toy_dataset(data, n=256, size=32, seed=0)
    trace = Trace("training worker", "steps")
    tail: list[str] = []

    def on_line(line: str) -> None:
        tail[:] = (tail + [line])[-30:]
        m = re.search(r"step (\d+)/\d+ loss", line)
        pids = find_pids("RayTrainWorker") if m else []
        if pids and (mib := own_memory_mib(pids[-1])) is not None:
            trace.points.append((int(m.group(1)), mib))
            trace.allocator = allocator_setting(pids[-1])

    rc = _stream_job([sys.executable, "-m", "jobs.train", "--preset", "tiny", "--data", data, "--run",
                      os.path.join(workdir, "run"), "--steps", str(steps), "--num-workers", "1", "--batch-size", "4",
                      "--log-every", str(log_every), "--checkpoint-every", str(max(steps // 5, 1))], on_line, timeout)
    if rc != 0:
        raise RuntimeError(f"the training job failed ({rc}):\n{''.join(tail)}")
    return trace


def soak_generation(maps: int, workdir: str, interval_s: float = 0.5, timeout: float = 3600,
                    shard_rows: int = 512) -> Trace:
    """The generation job over `maps` toy label maps; its sampling actor's memory every `interval_s`, over the
    label maps' share of the run (time since its first shard of `shard_rows` was written, as the job streams them
    at an even rate). Before that the actor is starting (imports, the model loaded): start-up, not work."""
    from sdm.data.toy import write_toy_dataset
    from sdm.generated_dataset import PROGRESS_DIR
    from sdm.testing import save_random_model

    labels, model, out = (os.path.join(workdir, name) for name in ("labels", "model", "out"))
    progress = os.path.join(out, PROGRESS_DIR)
    write_toy_dataset(labels, n=maps, size=32, seed=0, val_fraction=0.0)
    save_random_model(model, "tiny", seed=0)
    samples: list[tuple[float, float]] = []
    allocator = ["unknown"]
    done = threading.Event()

    def poll() -> None:
        start = None
        while not done.is_set():
            pids = find_pids("SampleBatch")
            if start is None and os.path.isdir(progress) and os.listdir(progress):
                start = time.perf_counter()
            if start is not None and pids and (mib := own_memory_mib(pids[0])) is not None:
                allocator[0] = allocator_setting(pids[0])
                samples.append((time.perf_counter() - start, mib))
            time.sleep(interval_s)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    tail: list[str] = []
    rc = _stream_job([sys.executable, "-m", "jobs.generate", "--model", model, "--labels", labels, "--out", out,
                      "--sampler", "ddim", "--steps", "1", "--segmenter", "none",
                      "--batch-size", "32", "--micro-batch", "32", "--shard-rows", str(shard_rows)],
                     lambda line: tail.__setitem__(slice(None), (tail + [line])[-30:]), timeout)
    done.set()
    poller.join()
    if rc != 0:
        raise RuntimeError(f"the generation job failed ({rc}):\n{''.join(tail)}")
    trace = Trace("generation actor", "seconds", allocator=allocator[0])
    end = samples[-1][0] if samples else 1.0
    trace.points = [(t, mib) for t, mib in samples if t < end]  # the last sample may be the actor's shutdown
    return trace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("process", choices=["serve", "generation", "training"])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--block", type=int, default=25, help="serve: requests per model before the next")
    p.add_argument("--maps", type=int, default=5000)
    p.add_argument("--steps", type=int, default=500)
    args = p.parse_args()
    from flops import machine_line

    print(machine_line())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.process == "serve":
            trace = soak_serve(args.requests, args.block, max(args.requests // 100, 1), tmp)
        elif args.process == "generation":
            trace = soak_generation(args.maps, tmp)
        else:
            trace = soak_training(args.steps, tmp)
    print(trace.report(rows=12))
    print(f"wall {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()

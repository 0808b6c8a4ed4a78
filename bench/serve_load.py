"""Load test of the Serve app: throughput and p50/p99 latency at concurrency 1, 8 and 32, with dynamic
batching on and off (max batch 1), against a direct in-process pipeline call. Prints the table and ratios.

    python bench/serve_load.py                      # a randomly initialised tiny model, on this machine
    python bench/serve_load.py --model runs/quickstart/finetune --steps 25

Every mode runs one model replica with one CPU thread (or the replica's GPU), and the direct calls use the
same thread count, so the ratios compare like with like. At concurrency 1 the three modes take turns request
by request; "direct" at concurrency c > 1 is one pipeline call on c label maps: the ceiling of batching.

Next to each img/s: the achieved model GFLOP/s (FLOPs per image x img/s) and its share of the matmul peak measured
in the same run with one thread (or on the GPU), in the precision the pipeline samples in (bf16 autocast: the bf16
peak). FLOPs per image are counted (bench/flops.py: FlopCounterMode) on one real call of the pipeline's sampling
runner on a full micro-batch: every step's guided network evaluation, the conditional and null branches as one
forward of 2x the images. A request of fewer images than the micro-batch runs padding rows too; they are work but
not model FLOPs, so they show as a lower share of the peak.
"""

from __future__ import annotations

import argparse
import io
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
import torch
from PIL import Image

from flops import Peaks, sampling_flops_per_image, speed_columns
from sdm.pipeline import SDMPipeline
from sdm.testing import save_random_model

TARGET_BATCH_SPEEDUP = 1.5  # batching on / off throughput at concurrency 8
TARGET_OVERHEAD_MS = 50.0  # HTTP + Serve p50 over the direct call at concurrency 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _label_png(size: tuple[int, int], num_classes: int) -> bytes:
    blocks = np.random.default_rng(0).integers(0, num_classes, (size[0] // 8, size[1] // 8), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.kron(blocks, np.ones((8, 8), np.uint8))).save(buf, format="PNG")
    return buf.getvalue()


def _row(mode: str, concurrency: int, latencies: list[float], images: int, wall: float, batch: float) -> dict:
    lat = sorted(latencies)
    return {
        "mode": mode,
        "c": concurrency,
        "n": images,
        "batch": batch,
        "img_s": images / wall,
        "p50": statistics.median(lat) * 1000,
        "p99": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))] * 1000,
    }


def _post(url: str, label: bytes, steps: int, seed: int) -> tuple[float, int]:
    """One generate request: (latency, batch size it ran in)."""
    t = time.perf_counter()
    r = requests.post(
        f"{url}/v1/generate",
        files={"label": ("label.png", label, "image/png")},
        data={"steps": str(steps), "seed": str(seed)},
        timeout=600,
    )
    r.raise_for_status()
    return time.perf_counter() - t, int(r.headers["x-sdm-batch-size"])


def bench_http(url: str, label: bytes, steps: int, concurrency: int, requests_: int) -> tuple[list[float], float, float]:
    """Closed loop: `concurrency` clients send `requests_` in all; (latencies, wall time, mean batch size)."""

    def one(i: int) -> tuple[float, int]:
        return _post(url, label, steps, i)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency)))  # warm-up
        start = time.perf_counter()
        results = list(pool.map(one, range(requests_)))
    wall = time.perf_counter() - start
    return [r[0] for r in results], wall, statistics.mean(r[1] for r in results)


def bench_direct(pipe: SDMPipeline, label: np.ndarray, steps: int, concurrency: int, calls: int) -> tuple[list[float], float]:
    pipe([label] * concurrency, num_inference_steps=steps)  # warm-up
    latencies = []
    start = time.perf_counter()
    for i in range(calls):
        t = time.perf_counter()
        pipe([label] * concurrency, num_inference_steps=steps, seed=i)
        latencies.append(time.perf_counter() - t)
    return latencies, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model URI (default: a randomly initialised tiny model in a temp dir)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=2, help="requests per level = rounds x concurrency (at least 16)")
    ap.add_argument("--num-gpus", type=float, default=0, help="GPUs per model replica (two replicas run at once)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    import ray
    from ray import serve

    from serve.app import build_app

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model is None:
        model = tmp.name
        save_random_model(model, "tiny")
        print(f"model: randomly initialised tiny preset at {model} (timings only; its images are noise)")
    torch.set_num_threads(1)  # as in a replica with num_cpus=1
    pipe = SDMPipeline.from_pretrained(model, device="cuda" if args.num_gpus else "cpu")
    m = pipe.config.model
    label_png = _label_png(tuple(m.image_size), m.num_classes)
    label = np.array(Image.open(io.BytesIO(label_png)))
    flops_per_image = sampling_flops_per_image(
        pipe.runner, pipe.prepare_labels([label] * pipe.runner.micro_batch), pipe.params(num_inference_steps=args.steps)
    )
    peaks = Peaks(pipe.device)
    peak = peaks(pipe.dtype)

    def gflops(img_s: float) -> tuple[float, float]:
        return speed_columns(flops_per_image, img_s, peak)

    ray.init(address="local", num_cpus=2, include_dashboard=False, num_gpus=int(args.num_gpus) or None)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    modes = {"serve batched": max(levels), "serve unbatched": 1}
    rows = []
    try:
        for mode, batch in modes.items():  # both deployed at once, so every level measures them side by side
            app = build_app(
                {
                    "model_uri": model,
                    "num_gpus": args.num_gpus,
                    "num_cpus": 0.5,  # two replicas on a 2-CPU machine; each still runs one torch thread
                    "max_batch_size": batch,
                    "max_ongoing_requests": max(levels) + 1,
                    "max_queued_requests": -1,
                    "max_queue_wait_s": 3600,
                }
            )
            serve.run(app, name=mode.split()[1], route_prefix=f"/{mode.split()[1]}")
        if 1 in levels:  # one request at a time, the three modes taking turns, so load drift hits all alike
            paired: dict[str, list[float]] = {"direct": [], **{mode: [] for mode in modes}}
            for i in range(17):  # round 0 warms up
                t = time.perf_counter()
                pipe(label, num_inference_steps=args.steps, seed=i)
                times = {"direct": time.perf_counter() - t}
                times |= {mode: _post(f"http://127.0.0.1:{port}/{mode.split()[1]}", label_png, args.steps, i)[0] for mode in modes}
                for mode, t in times.items():
                    if i > 0:
                        paired[mode].append(t)
            rows += [_row(mode, 1, paired[mode], len(paired[mode]), sum(paired[mode]), 1) for mode in paired]
            print("  " + ", ".join(f"{r['mode']} p50 {r['p50']:.0f} ms" for r in rows[-3:]) + " at c=1", flush=True)
        for c in (c for c in levels if c > 1):
            lat, wall = bench_direct(pipe, label, args.steps, c, max(3, 16 // c))
            rows.append(_row("direct", c, lat, c * len(lat), wall, c))
            for mode in modes:
                n = max(16, args.rounds * c)
                lat, wall, mean_batch = bench_http(f"http://127.0.0.1:{port}/{mode.split()[1]}", label_png, args.steps, c, n)
                rows.append(_row(mode, c, lat, n, wall, mean_batch))
            print("  " + ", ".join(f"{r['mode']} {r['img_s']:.2f} img/s ({gflops(r['img_s'])[0]:.1f} GFLOP/s)" for r in rows[-3:])
                  + f" at c={c}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    print(f"\n{m.image_size[0]}x{m.image_size[1]} {pipe.config.name}, {args.steps} DDIM steps, guidance on, device {pipe.device}")
    print(f"model: {flops_per_image / 1e9:.2f} GFLOP per image, micro-batch {pipe.runner.micro_batch}, "
          f"{pipe.dtype or torch.float32}; {peaks.summary()}")
    print(f"{'mode':<16} {'conc':>4} {'images':>6} {'batch':>6} {'img/s':>8} {'GFLOP/s':>8} {'% peak':>7} {'p50 ms':>9} {'p99 ms':>9}")
    for r in sorted(rows, key=lambda r: (r["mode"], r["c"])):
        achieved, share = gflops(r["img_s"])
        print(
            f"{r['mode']:<16} {r['c']:>4} {r['n']:>6} {r['batch']:>6.1f} {r['img_s']:>8.2f} {achieved:>8.1f} {share:>6.1f}%"
            f" {r['p50']:>9.1f} {r['p99']:>9.1f}"
        )
    by = {(r["mode"], r["c"]): r for r in rows}
    print()
    for c in levels:
        on, off = by[("serve batched", c)], by[("serve unbatched", c)]
        ceiling = by[("direct", c)]["img_s"]
        line = f"batching on/off throughput at c={c}: {on['img_s'] / off['img_s']:.2f}x"
        line += f" (batched reaches {on['img_s'] / ceiling:.0%} of the direct batch-of-{c} call)"
        if c == 8:
            line += f"  target >= {TARGET_BATCH_SPEEDUP}x: {'met' if on['img_s'] / off['img_s'] >= TARGET_BATCH_SPEEDUP else 'MISSED'}"
        print(line)
    if 1 in levels:
        direct = by[("direct", 1)]["p50"]
        for mode in ("serve batched", "serve unbatched"):
            overhead = by[(mode, 1)]["p50"] - direct
            verdict = "met" if overhead < TARGET_OVERHEAD_MS else "MISSED"
            print(f"HTTP + Serve overhead at c=1, p50 ({mode}): {overhead:.1f} ms  target < {TARGET_OVERHEAD_MS:.0f} ms: {verdict}")


if __name__ == "__main__":
    main()

"""Ray start-up and the pieces of Ray Data wiring that every job shares, written once."""

from __future__ import annotations

import argparse
import logging
import os
import socket

import pyarrow.fs
import ray
import ray.data


def init_ray(address: str | None, num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Join the given cluster or the job's (RAY_ADDRESS), else start a private local one: never a cluster that
    merely happens to run on this machine (`--address auto` asks for that). A local one gets `num_cpus` logical
    CPUs when given, and its dashboard when asked (Ray Train's placement-group cleaner polls the state API the
    dashboard serves, and warns every second without it)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # A new local cluster gets Ray's default, token authentication, and Ray warns that it chose it (and says where it
    # saved a new token): that choice is ours to keep, not news. Ray's other start-up lines go to its logs; the one
    # line below says what started.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    options: dict = {"num_cpus": num_cpus} if num_cpus else {}
    if dashboard:
        # Ray's actors that call the state API find its server by RAY_API_SERVER_ADDRESS; without it they look for
        # "the" cluster on the machine, and fail (with a traceback every second) when another one runs there too.
        port = _free_port()
        options.update(dashboard_port=port, runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
    context = ray.init(address="local", include_dashboard=dashboard, logging_level=logging.WARNING, **options)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    where = f"; dashboard http://{context.dashboard_url}" if context.dashboard_url else ""
    print(f"started a local Ray cluster ({cpus} CPUs{where}); its logs: {context.address_info['session_dir']}/logs", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_concurrency(text: str) -> int | tuple[int, int]:
    """`N` actors, or `MIN-MAX` for an autoscaling pool (an argparse type)."""
    lo, _, hi = text.partition("-")
    try:
        sizes = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None
    if not 1 <= sizes[0] <= sizes[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return sizes[0] if sizes[0] == sizes[1] else sizes


def actor_pool(concurrency: int | tuple[int, int]) -> ray.data.ActorPoolStrategy:
    if isinstance(concurrency, tuple):
        return ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    return ray.data.ActorPoolStrategy(size=concurrency)


def read_parquet(paths: list[str], filesystem: pyarrow.fs.FileSystem, columns: list[str] | None = None) -> ray.data.Dataset:
    """Parquet shards through Ray Data's task-based reader. Its default (DataSource V2) reader starts a pool of
    footer-reading actors for every read, each a new Python process: seconds of CPU on a small node, taken from the
    sampling actor or the training workers while they start (bench/generate_throughput.py)."""
    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False  # read at this call only: the plan keeps the reader
    try:
        return ray.data.read_parquet(paths, filesystem=filesystem, columns=columns)
    finally:
        ctx.use_datasource_v2 = v2

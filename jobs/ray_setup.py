"""Ray start-up and the pieces of Ray Data wiring that every job shares, written once."""

from __future__ import annotations

import argparse
import os

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
    ray.init(address="local", include_dashboard=dashboard, **({"num_cpus": num_cpus} if num_cpus else {}))


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

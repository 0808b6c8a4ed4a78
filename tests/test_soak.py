"""Endurance at a small scale (bench/soak.py runs the full one): the memory of a Serve replica with models loading
and evicting, of the generation job's sampling actor and of a training worker, sampled from the process after
warm-up, rises by less than a bound that a leak of a MiB per unit of work would cross several times over."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

from soak import soak_generation, soak_serve, soak_training  # noqa: E402

from sdm.process_env import ALLOCATOR_ENV  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.soak]


def _check(trace, bound_mib: float) -> None:
    print(trace.report())
    assert len(trace.after_warmup()) >= 10  # enough samples to see a trend
    # the process started with the allocator setting that keeps it flat (bench/soak.py at full scale)
    assert trace.allocator == " ".join(f"{k}={v}" for k, v in ALLOCATOR_ENV.items())
    assert trace.growth_mib() < bound_mib, trace.report()


def test_a_serve_replica_stays_flat_while_models_load_and_evict(tmp_path):
    """96 requests after warm-up, 11 model changes: a leak of 1 MiB a request would add 96 MiB."""
    _check(soak_serve(120, block=10, sample_every=3, workdir=str(tmp_path)), bound_mib=48)


def test_a_generation_actor_stays_flat_over_label_maps(tmp_path):
    """1,600 label maps, measured every 0.25 s from the first shard of 64 written (before it, the actor is still
    starting): about 16 s on a quiet 2-core machine. A leak of 250 KiB a label map would add about 300 MiB after
    warm-up (the actor's memory swings by some 40 to 60 MiB as batches pass)."""
    _check(soak_generation(1600, str(tmp_path), interval_s=0.25, shard_rows=64), bound_mib=96)


def test_a_training_worker_stays_flat_over_steps(tmp_path):
    """80 steps, 64 after warm-up: a leak of 2 MiB a step would add 128 MiB."""
    _check(soak_training(80, str(tmp_path), log_every=2), bound_mib=64)

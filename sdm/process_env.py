"""The environment every long-lived process of the system starts with: Serve replicas, the generation job's actors,
Ray Train workers.

glibc gives each thread that allocates an arena of its own (up to eight per core) and reuses memory freed in one
arena only there, so a process whose threads take turns (Serve's loading and sampling threads, Ray's and Train's)
rises in steps as new arenas fill. Two arenas keep its memory flat (bench/soak.py, docs/reliability.md). glibc reads
the setting as a process starts: it is given to the processes Ray starts, never applied to the running one.
"""

from __future__ import annotations

import os

ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "2"}


def set_allocator_env() -> None:
    """Give the Ray cluster that this process is about to start (its raylet, and every worker that inherits the
    raylet's environment) ALLOCATOR_ENV, where the environment does not set those variables already."""
    for key, value in ALLOCATOR_ENV.items():
        os.environ.setdefault(key, value)

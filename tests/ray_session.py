"""Ray sessions opened and closed inside the test process."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def ray_session(**init_kwargs: Any) -> Iterator[None]:
    """ray.init(**init_kwargs) for the block, then a shutdown that leaves no Ray object behind it: an ObjectRef
    or dataset freed once the core worker is gone crashes the interpreter (ray-project/ray#31145), and the test
    process opens several sessions in turn."""
    import ray

    ray.init(**init_kwargs)
    try:
        yield
    finally:
        gc.collect()
        ray.shutdown()


AWS_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def local_ray_cluster(s3_endpoint: str, **env: str) -> Iterator[str]:
    """A small local Ray cluster (2 CPUs, never one found on the machine) whose workers reach the S3 endpoint
    through the standard AWS variables (and see `env` too, e.g. AWS_MAX_ATTEMPTS); yields its address. The
    variables are restored afterwards."""
    import ray

    values = {**AWS_TEST_CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint, **env}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        with ray_session(address="local", num_cpus=2, include_dashboard=False):
            yield ray.get_runtime_context().gcs_address
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

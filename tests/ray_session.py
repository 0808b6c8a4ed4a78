"""Ray sessions opened and closed inside the test process."""

from __future__ import annotations

import gc
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

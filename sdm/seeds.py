"""Seeds derived from their parts: a leaf module (no torch), so the data layouts, the training worker and the
sampling path share one hash without importing each other."""

from __future__ import annotations

import hashlib
from typing import Any


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (base seed, key, sample index): stable across runs and machines."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def sample_seeds(seed: int, n: int) -> list[int]:
    """The seeds of samples 0..n-1 of a call with seed `seed`."""
    return [derive_seed(seed, k) for k in range(n)]

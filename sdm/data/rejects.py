"""The rejects record of a dataset: `rejects.jsonl` beside its card, one JSON object per input item that could not
be used, with the reason. `sdm data pack` and the generation job write it; anything that reads it reads it here."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from sdm import storage

REJECTS_FILE = "rejects.jsonl"


@dataclass(frozen=True)
class Reject:
    """An input item that could not be used, or a generated pair below the consistency threshold after its last
    redraw (key `<source key>_<k>`, with its score)."""

    key: str
    split: str
    reason: str
    consistency: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Its JSON object: key, split, reason, and the score only when there is one."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Reject":
        return cls(**d)


def write_rejects(uri: str, rejects: Iterable[Reject]) -> None:
    """Write the rejects record of the dataset at `uri`, one line per reject in the order given."""
    lines = "".join(json.dumps(r.to_dict()) + "\n" for r in rejects)
    storage.write_bytes(storage.join(uri, REJECTS_FILE), lines.encode())


def read_rejects(uri: str) -> list[Reject]:
    """The rejects record of the dataset at `uri`."""
    text = storage.read_bytes(storage.join(uri, REJECTS_FILE)).decode()
    return [Reject.from_dict(json.loads(line)) for line in text.splitlines()]

"""What the generation job's write stage reports to its driver, one Ray Data row {"kind", "value"} per record: a shard
written, an input item rejected, a pair to redraw, or the store failing a write. Each kind is a small dataclass
with its row encoding beside it; `from_row` is the one reader the driver uses."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Union

from sdm.data.card import ShardInfo
from sdm.data.rejects import Reject


@dataclass(frozen=True)
class ShardWritten:
    """A shard published with its progress record."""

    kind: ClassVar[str] = "shard"
    info: ShardInfo

    def value(self) -> dict[str, Any]:
        return asdict(self.info)

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> "ShardWritten":
        return cls(ShardInfo(**value))


@dataclass(frozen=True)
class Rejected:
    """An input item that could not be used, or a pair left below the consistency threshold."""

    kind: ClassVar[str] = "reject"
    reject: Reject

    def value(self) -> dict[str, Any]:
        return self.reject.to_dict()

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> "Rejected":
        return cls(Reject.from_dict(value))


class _PlainRecord:
    """A record of plain fields: its value is its fields."""

    def value(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> Any:
        return cls(**value)


@dataclass(frozen=True)
class Redraw(_PlainRecord):
    """A pair below the consistency threshold with a redraw left: output key `key` is drawn again at `attempt`."""

    kind: ClassVar[str] = "redraw"
    key: str
    attempt: int


@dataclass(frozen=True)
class StoreFailed(_PlainRecord):
    """The store failed a write through every retry; the driver stops the job. (Raised in the stage, the error
    would reach the driver only as text.)"""

    kind: ClassVar[str] = "store_error"
    message: str


StageRecord = Union[ShardWritten, Rejected, Redraw, StoreFailed]
KINDS: dict[str, type] = {c.kind: c for c in (ShardWritten, Rejected, Redraw, StoreFailed)}


def to_rows(records: Sequence[StageRecord]) -> dict[str, list[str]]:
    """Records as the columns of one output batch of the write stage."""
    return {"kind": [r.kind for r in records], "value": [json.dumps(r.value()) for r in records]}


def from_row(row: dict[str, Any]) -> StageRecord:
    """The record of one row that the write stage produced."""
    kind = KINDS.get(row["kind"])
    if kind is None:
        raise ValueError(f"unknown stage row kind {row['kind']!r}; known: {', '.join(KINDS)}")
    return kind.from_value(json.loads(row["value"]))

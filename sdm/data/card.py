"""The dataset card: a small JSON file that describes a dataset and lists its shards with checksums.

It is written last, so a dataset whose card exists is complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from sdm import storage
from sdm.config import SDMConfig
from sdm.errors import DatasetError

CARD_FILE = "dataset.json"
FORMAT_VERSION = 1


@dataclass
class ShardInfo:
    path: str  # relative to the dataset root
    split: str
    rows: int
    sha256: str
    bytes: int


@dataclass
class DatasetCard:
    name: str
    num_classes: int
    class_names: list[str]
    palette: list[list[int]]  # RGB per class id
    has_instance: bool
    split_sizes: dict[str, int] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)  # e.g. generation settings of a synthetic dataset

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "dataset card") -> "DatasetCard":
        try:
            d = json.loads(text)
            d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
            card = cls(**d)
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise DatasetError(f"{where} is malformed: {e}") from None
        if card.format_version != FORMAT_VERSION:
            raise DatasetError(f"{where} has format version {card.format_version}; this code reads {FORMAT_VERSION}")
        if len(card.class_names) != card.num_classes or len(card.palette) != card.num_classes:
            raise DatasetError(f"{where}: class_names and palette must have num_classes={card.num_classes} entries")
        return card


def check_classes_match(card: DatasetCard, uri: str, config: SDMConfig, model: str | None = None,
                        what: str = "dataset") -> None:
    """Refuse a dataset whose classes are not the model's (DatasetError), naming both: the dataset by URI and card
    name, the model by URI (when it has one) and config name."""
    if card.num_classes != config.model.num_classes:
        named = f"model {model} ({config.name!r})" if model else f"model config {config.name!r}"
        raise DatasetError(f"{what} {uri} ({card.name!r}) has {card.num_classes} classes but {named} takes "
                           f"{config.model.num_classes}")


def read_card(uri: str) -> DatasetCard:
    card_uri = storage.join(uri, CARD_FILE)
    if not storage.exists(card_uri):
        raise DatasetError(f"no dataset at {uri}: {CARD_FILE} is missing (an unfinished or wrong path?)")
    return DatasetCard.from_json(storage.read_bytes(card_uri).decode(), card_uri)


def write_card(uri: str, card: DatasetCard) -> None:
    storage.write_bytes(storage.join(uri, CARD_FILE), card.to_json().encode())


def withdraw_card(uri: str) -> None:
    """Remove the card of a dataset about to be rewritten, before its first shard is: shard names are
    deterministic, so a rewrite that failed part-way would otherwise leave the old card, looking complete, over a
    mix of old and new shards. Until write_card publishes the new one, nothing there looks like a dataset."""
    storage.delete(storage.join(uri, CARD_FILE))

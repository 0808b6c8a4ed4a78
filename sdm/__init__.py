"""SDM: semantic image synthesis with diffusion models. The library; it never imports ray."""

from sdm.config import SamplingParams, SDMConfig, get_preset, list_presets
from sdm.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    InvalidInputError,
    SDMError,
    StorageError,
)

__all__ = [
    "SDMConfig",
    "SamplingParams",
    "get_preset",
    "list_presets",
    "SDMError",
    "InvalidInputError",
    "ConfigError",
    "CheckpointError",
    "StorageError",
    "DatasetError",
]

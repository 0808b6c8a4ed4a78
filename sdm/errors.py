"""One exception type per kind of failure; every message names the bad thing."""


class SDMError(Exception):
    """Base class of every error this library raises on purpose."""


class InvalidInputError(SDMError, ValueError):
    """A label map, image or sampling parameter given by a caller is unusable."""


class ConfigError(SDMError, ValueError):
    """A configuration or preset is unknown, malformed or inconsistent."""


class CheckpointError(SDMError):
    """A checkpoint is missing, unreadable, or does not fit its config."""


class StorageError(SDMError):
    """A URI cannot be resolved, read or written."""


class DatasetError(SDMError):
    """A dataset on the store is malformed: card, shard, checksum or sample."""


class MissingWeightsError(SDMError):
    """Pretrained weights a metric needs (Inception for FID, AlexNet for LPIPS) are absent and cannot be
    downloaded; the message says which file to put where."""

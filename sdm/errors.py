"""One exception type per kind of failure; every message names the bad thing. And the exit status of every
program (`sdm ...`, `python -m jobs...`), so that scripts and schedulers can tell the outcomes apart."""

EXIT_OK = 0
EXIT_FAILED = 1  # the work started and failed (training out of restarts, a quick-start stage, the store failing a write)
EXIT_REFUSED = 2  # refused before any work: bad arguments, inputs, config or weights (argparse's status too)
EXIT_REJECTS = 3  # finished, but some input items were rejected; the rejects record says which and why


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


class ShardIntegrityError(DatasetError):
    """A shard's bytes are not the ones its dataset card lists (size or sha256): replaced by another shard, left
    over from an older version, partly synced or damaged. The message names the shard and the card."""


class MissingWeightsError(SDMError):
    """Pretrained weights a metric needs (Inception for FID, AlexNet for LPIPS) are absent and cannot be
    downloaded; the message says which file to put where."""

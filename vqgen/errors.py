"""Errors vqgen raises for bad input. Each names the thing that is wrong."""


class VQGenError(Exception):
    """Base class: bad input that a user can fix (config, data, checkpoint, weights)."""


class ConfigError(VQGenError):
    """A config key that is unknown, of the wrong type, or out of range.

    The message always starts with the dotted key, e.g. ``vqvae.train.lr: expected float, got 'abc'``.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class DataError(VQGenError):
    """An input file that cannot be read: a corrupt image, a missing dataset root, a bad record."""


class CheckpointError(VQGenError):
    """A checkpoint, model export or manifest that is missing, truncated or does not match."""


class StorageError(VQGenError):
    """A write that the filesystem refused: no space left, read-only, or no permission.

    Raised after the partial output is removed; what was written before (finished checkpoints,
    exports) is left as it was.
    """

"""Errors a user can cause. The CLI prints them on one line and exits non-zero."""


class CollafuseError(Exception):
    """Base class of every error caused by input (config, data, files, uploads)."""


class ConfigError(CollafuseError):
    """A config value is unknown, of the wrong type, or out of range."""


class DataError(CollafuseError):
    """A dataset or partition is missing or malformed."""


class CheckpointError(CollafuseError):
    """A run folder or checkpoint is missing, truncated or does not match the config."""


class UploadRejected(CollafuseError):
    """The server refused an upload that the protocol does not allow."""

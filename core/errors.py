"""Exceptions of dagc's public API.

Every error a user can cause (bad spec, bad checkpoint, bad configuration, bad data) is a
`DagcError`: the CLI prints its message as one line and exits with code 2.
"""


class DagcError(Exception):
    """Base class of the errors a user can cause; the message says what is wrong and what to do."""


class SpecError(DagcError, ValueError):
    """A network spec is invalid; the message names the field."""


class ConfigError(DagcError, ValueError):
    """A training configuration is invalid; the message names the field."""


class CheckpointError(DagcError):
    """A checkpoint is missing, truncated, foreign or of an unknown format version."""


class DataError(DagcError, ValueError):
    """A dataset or task name is unknown, or data does not fit the spec."""

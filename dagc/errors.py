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


class CompileError(DagcError):
    """A checkpoint cannot be compiled (not reduced, no path for a task, bad target, ...)."""


class ArtifactError(DagcError):
    """An artifact cannot be used: its directory or manifest is missing or malformed, a model file
    is missing or does not match its sha256 (the message names the file), the manifest's format
    version is unknown, or the requested backend is not available for it here."""


class InputError(DagcError, ValueError):
    """Inputs to `Engine.run` (or an image file, or an argument) are unusable: unknown or empty
    task list, wrong type, rank, channel count, size or dtype, non-finite or far out-of-range
    values, an empty batch, an unreadable image file. The message says what was expected."""


class BenchError(DagcError, ValueError):
    """The benchmark cannot run: mismatched artifact and checkpoint, unknown backend, bad option."""


class ServeError(DagcError):
    """`dagc serve` cannot serve: the Triton server binary is not installed, a port is taken or
    the address is not this machine's, or the server exited or was not ready in time (the message
    quotes its log)."""


class CostTableError(DagcError):
    """A cost table (`dagc.cost_table`) cannot be used: its file is unreadable, not valid JSON or not
    a valid table, or it prices another network, target, batch or thread count; or a latency target
    cannot be measured here (no GPU for torch-cuda, no OpenVINO)."""


class RunnerError(DagcError):
    """An execution back end cannot load or run a model: a TensorRT plan built for another GPU or
    TensorRT version, a failed TensorRT execution. The runtime reports a plan it cannot load as an
    `ArtifactError`, the compiler as a `CompileError`."""


class PluginError(DagcError):
    """A plug-in (an entry point of group ``dagc.datasets`` or ``dagc.kinds``, or a call of a
    ``register_*`` function) is broken: it fails to import, gives the wrong type, a malformed or
    clashing record. The message names the entry point and what is wrong."""

"""dagc: compile a searched multi-task central network into per-task inference models."""

__version__ = "0.1.0"

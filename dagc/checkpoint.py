"""The checkpoint contract: one `.safetensors` file, no pickle anywhere.

Tensors (names documented in FORMAT.md):
    theta.<name>     network weights and batch-norm statistics (the module's state_dict names)
    arch.gamma       (K, N, N) architecture logits Γ (entries outside the flow band are unused)
    arch.alpha       (K, N)    read-in logits A
    arch.beta        (K, N)    read-out logits B
    mask.gamma/alpha/beta      uint8 0/1 masks, present once the checkpoint is reduced (closed)
    optim.*, rewind.*          training state, only in a run's resumable `state.safetensors`
Metadata (all strings, JSON where structured):
    format = "dagc.checkpoint", format_version, spec (JSON), stage, plus free keys
    (config, metrics, step, ...).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from dagc.errors import CheckpointError, SpecError
from dagc.spec import Spec

FORMAT = "dagc.checkpoint"
FORMAT_VERSION = 1
STAGES = ("init", "warmup", "search", "reduced", "finetune")


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors by name, the spec, the stage and the remaining metadata."""

    tensors: dict[str, torch.Tensor]
    spec: Spec
    stage: str
    meta: dict[str, str] = field(default_factory=dict)
    source: str = "checkpoint"  # the file, for messages

    @property
    def reduced(self) -> bool:
        return "mask.gamma" in self.tensors

    def json(self, key: str, default: Any = None) -> Any:
        """A metadata entry decoded from JSON (``default`` if absent). Raises CheckpointError
        naming the key if the entry is not JSON."""
        if key not in self.meta:
            return default
        try:
            return json.loads(self.meta[key])
        except (json.JSONDecodeError, TypeError) as e:
            raise CheckpointError(f"{self.source}: metadata entry {key!r} is not valid JSON ({e}); "
                                  "re-run the command that wrote the file") from None

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors whose names start with ``prefix + '.'``, with the prefix removed."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}


def write_atomic(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, fsync it, then rename it over
    ``path``: a reader (or a crash) never sees a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], spec: Spec,
                    stage: str, **meta: Any) -> None:
    """Write a checkpoint atomically. Extra keyword metadata is stored as JSON strings."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "spec": spec.to_json(),
                "stage": stage}
    metadata.update({k: json.dumps(v, sort_keys=True) for k, v in meta.items()})
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata))


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes (8-byte little-endian header length, then
    the JSON header); safetensors' Python API reads metadata only from a path. Raises ValueError."""
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 or n > len(data) - 8:
        raise ValueError("header length beyond the end of the file")
    header = json.loads(data[8:8 + n])
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header.get("__metadata__") or {}


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint. Raises CheckpointError if the file is missing, truncated, not a dagc
    checkpoint, of an unknown format version, or holds an invalid spec."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; give the path of a .safetensors file written by dagc train")
    try:
        # One read of one open file: a writer may replace the path at any moment (write_atomic),
        # and two opens could see two different files (the header of one, the size of the other).
        data = path.read_bytes()
        tensors = load(data)
        meta = _metadata(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({e}); "
                              "re-run the command that wrote it") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dagc checkpoint (no format={FORMAT!r} in its metadata)")
    version = meta.get("format_version", "")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(f"{path} has checkpoint format version {version!r}; this dagc reads "
                              f"version {FORMAT_VERSION}: use the dagc release that wrote it")
    try:
        spec = Spec.from_json(meta["spec"])
    except (KeyError, SpecError) as e:
        raise CheckpointError(f"{path} holds no valid spec: {e}") from None
    stage = meta.get("stage", "")
    if stage not in STAGES:
        raise CheckpointError(f"{path} has unknown stage {stage!r}")
    _check_finite(path, tensors)
    rest = {k: v for k, v in meta.items() if k not in ("format", "format_version", "spec", "stage")}
    return Checkpoint(tensors=tensors, spec=spec, stage=stage, meta=rest, source=str(path))


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse NaN or infinite values in any floating-point tensor: no stage of dagc writes them
    (a diverged loss stops training first), and a model computed from them is no model."""
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: tensor {name} has {bad} NaN or infinite value(s) of {t.numel()}; "
                                  "the weights are unusable, use an earlier checkpoint or retrain")

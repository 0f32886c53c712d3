"""The checkpoint contract: one `.safetensors` file, no pickle anywhere.

Tensors (names documented in FORMAT.md):
    theta.<name>     network weights and batch-norm statistics (the module's state_dict names;
                     running statistics per task since format version 2)
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from dagc.blocks import BN_BUFFERS, blocks
from dagc.errors import CheckpointError, SpecError
from dagc.outputs import broken_link
from dagc.spec import Spec
from dagc.writing import write_atomic

FORMAT = "dagc.checkpoint"
# 2: batch-norm running statistics per task, (K, C) and counters (K,); 1 had one set, (C,) and ().
FORMAT_VERSION = 2
STAGES = ("init", "warmup", "search", "reduced", "finetune")


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors by name, the spec, the stage and the remaining metadata."""

    tensors: dict[str, torch.Tensor]
    spec: Spec
    stage: str
    meta: dict[str, str] = field(default_factory=dict)
    source: str = "checkpoint"  # the file, for messages
    migrated_from: int | None = None  # the format version it was read from, when not the current one

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


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], spec: Spec,
                    stage: str, *, then: str = "run the command again", **meta: Any) -> None:
    """Write a checkpoint atomically (`dagc.writing.write_atomic`). Extra keyword metadata is stored
    as JSON strings. Raises CheckpointError when the system fails the write (a full device: the
    message says so; ``then``: what to do once space is freed), ValueError for an unknown stage."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "spec": spec.to_json(),
                "stage": stage}
    metadata.update({k: json.dumps(v, sort_keys=True) for k, v in meta.items()})
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata), error=CheckpointError, then=then)


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


def load_checkpoint(path: str | os.PathLike, *, migrate: bool = False) -> Checkpoint:
    """Read a checkpoint. With ``migrate``, a version-1 checkpoint is read too, its one set of
    batch-norm statistics copied to every task (`migrate_v1`; ``migrated_from`` is then 1): only
    re-estimating them (`dagc recalibrate`) makes it right. Raises CheckpointError if the file is
    missing, truncated, not a dagc checkpoint, of an unknown format version (or version 1 without
    ``migrate``: one line saying how to recalibrate it), or holds an invalid spec."""
    path = Path(path)
    if not path.is_file():
        link = broken_link(path)
        raise CheckpointError(f"{'no checkpoint at ' + str(path) if link is None else f'{path} is {link}'}; give the "
                              "path of a .safetensors file written by dagc train")
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
    if version == "1" and not migrate:
        if "progress" in meta:
            raise CheckpointError(f"{path} is the state of a run started by an older dagc (checkpoint format 1, "
                                  "one set of batch-norm statistics for all tasks); it cannot be resumed: "
                                  "start the run again")
        raise CheckpointError(f"{path} has checkpoint format version 1, whose batch-norm statistics are shared by "
                              "all tasks (wrong for each task whose sub-network differs); re-estimate them per task "
                              f"with: dagc recalibrate {path}")
    if version not in (str(FORMAT_VERSION), "1"):
        raise CheckpointError(f"{path} has checkpoint format version {version!r}; this dagc reads "
                              f"version {FORMAT_VERSION}: use the dagc release that wrote it")
    try:
        spec = Spec.from_json(meta["spec"])
    except (KeyError, SpecError) as e:
        raise CheckpointError(f"{path} holds no valid spec: {e}") from None
    if version == "1":
        tensors = migrate_v1(tensors, spec)
    stage = meta.get("stage", "")
    if stage not in STAGES:
        raise CheckpointError(f"{path} has unknown stage {stage!r}")
    _check_finite(path, tensors)
    rest = {k: v for k, v in meta.items() if k not in ("format", "format_version", "spec", "stage")}
    return Checkpoint(tensors=tensors, spec=spec, stage=stage, meta=rest, source=str(path),
                      migrated_from=1 if version == "1" else None)


def migrate_v1(tensors: dict[str, torch.Tensor], spec: Spec) -> dict[str, torch.Tensor]:
    """Version-1 tensors in the current layout: every block's one set of batch-norm running
    statistics (C,) and counter () repeated for each of the spec's K tasks, (K, C) and (K,).
    Tensors of another shape are left as they are (the network's loader names them)."""
    out = dict(tensors)
    k = spec.n_tasks
    for b in blocks(spec):
        for which in BN_BUFFERS:
            for name in (f"theta.{b.bn_tensor(which)}", f"rewind.{b.bn_tensor(which)}"):
                t = out.get(name)
                if t is not None and t.dim() == (0 if which == "num_batches_tracked" else 1):
                    out[name] = t.unsqueeze(0).repeat(k, *([1] * t.dim())).contiguous()
    return out


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse NaN or infinite values in any floating-point tensor: no stage of dagc writes them
    (a diverged loss stops training first), and a model computed from them is no model."""
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: tensor {name} has {bad} NaN or infinite value(s) of {t.numel()}; "
                                  "the weights are unusable, use an earlier checkpoint or retrain")

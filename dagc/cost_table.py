"""Cost tables (issue 21): what every block of a central network costs on a deployment target, as a
validated JSON file, and a cache of them.

A table prices each block of the network (every hidden edge ``edges.i_j``, read-in ``read_in.j``
and read-out ``read_out.i``; `dagc.blocks`), each task's head, and ``call``, the fixed cost of one
model call, on one target:

``flops``
    exact, per sample, from `dagc.costs` (unit FLOPs; batch 1, no threads; ``call`` 0).
``onnxruntime-cpu``, ``openvino-cpu``, ``torch-cuda``
    latency in ms of one call at a batch size and intra-op thread count, measured by the compiler
    (`dagc.compiler.measure`): each block emitted as a small ONNX model as the compiler emits it
    (folded), timed round-robin after a warm-up, the median of the repeats. ``call`` is the median
    of an empty model's call (an Identity of the input), taken out of every block's time, so that a
    model's predicted cost is ``call + Σ its block applications + its heads`` (`predicted`).

A compiled model's cost is predicted from its block applications: a state instance that several
tasks share is computed once in the shared model (`predicted` counts what it is given).

The file (`write_table`, atomic; `load_table`, validated; a bad or mismatched file raises
`CostTableError`, one line)::

    {"format": "dagc.cost_table", "version": 1, "network": "<sha256 of the spec's network>",
     "target": "onnxruntime-cpu", "batch": 8, "threads": 2, "unit": "ms",
     "blocks": {"edges.0_1": 0.021, ...}, "heads": {"segmentation": 0.05, ...}, "call": 0.004,
     "machine": {...}, "versions": {...}, "method": {...}}

Tables are cached by (network fingerprint, target, batch, threads) under `cache_dir`
(``$DAGC_CACHE_DIR``, else ``$XDG_CACHE_HOME/dagc``, else ``~/.cache/dagc``), in ``cost_tables/``;
`cached_table` measures (with the function the caller gives: the core cannot measure) only on a miss.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dagc.blocks import blocks, parse_key
from dagc.costs import head_costs, mask_layout
from dagc.errors import CostTableError, SpecError
from dagc.spec import Spec
from dagc.writing import write_atomic

FORMAT = "dagc.cost_table"
VERSION = 1
FLOPS = "flops"
# target -> unit of its costs. Latency targets are measured per call at a batch and thread count.
TARGETS = {FLOPS: "FLOPs", "onnxruntime-cpu": "ms", "openvino-cpu": "ms", "torch-cuda": "ms"}
LATENCY_TARGETS = tuple(t for t, u in TARGETS.items() if u == "ms")

REMEASURE = "re-measure it (dagc inspect CHECKPOINT --costs TARGET --remeasure) or delete the file"
# Measure a table: (spec, target, batch, threads) -> CostTable. The compiler's
# `dagc.compiler.measure.measure_table` is one; the core only calls what it is given.
Measure = Callable[[Spec, str, int, "int | None"], "CostTable"]

__all__ = ["FORMAT", "VERSION", "FLOPS", "TARGETS", "LATENCY_TARGETS", "CostTable", "Measure", "network_fingerprint",
           "flops_table", "load_table", "write_table", "cache_dir", "cache_path", "cached_table", "check_target",
           "describe"]


def network_fingerprint(spec: Spec) -> str:
    """sha256 (hex) of the spec's network: everything that decides what a block or a head computes
    (states, read-out, flow constant, tasks and their heads, input size and channels, head options,
    down-sampling), not the preset's name nor the heads' dropout (the identity at inference)."""
    d = {k: v for k, v in spec.to_dict().items() if k not in ("preset", "head_dropout")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_target(target: object, batch: object = 1, threads: object = None, *,
                 error: type[Exception] = CostTableError, option: str = "--cost-target") -> None:
    """Raise ``error`` (one line) for an unknown target, a batch that is not a positive integer, or a
    thread count that is not a positive integer (a latency target) or not None (flops)."""
    if target not in TARGETS:
        raise error(f"unknown cost target {target!r}; choose one of {list(TARGETS)}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise error(f"the cost batch must be a positive integer, got {batch!r}")
    if target == FLOPS:
        if batch != 1 or threads is not None:
            raise error("FLOPs are counted per sample, not measured: a batch size or thread count is for a "
                        f"latency {option} ({', '.join(LATENCY_TARGETS)})")
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise error(f"the cost threads must be a positive integer for {target!r}, got {threads!r}")


@dataclass(frozen=True, eq=False)
class CostTable:
    """One target's price of every block and head of a network (see the module docstring).
    ``blocks`` and ``heads`` map block names and task names to costs in ``unit``. Equal (and
    hashed) by content (`digest`)."""

    network: str
    target: str
    batch: int
    threads: int | None
    unit: str
    blocks: Mapping[str, float]
    heads: Mapping[str, float]
    call: float = 0.0
    machine: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, Any] = field(default_factory=dict)
    method: Mapping[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ identity
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "network": self.network, "target": self.target,
                "batch": self.batch, "threads": self.threads, "unit": self.unit, "blocks": dict(self.blocks),
                "heads": dict(self.heads), "call": self.call, "machine": dict(self.machine),
                "versions": dict(self.versions), "method": dict(self.method)}

    @functools.cached_property
    def digest(self) -> str:
        """sha256 (hex) of the table's JSON: which measurement a run used (its checkpoint records it).
        Computed once: a table is not changed after it is made."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CostTable) and self.digest == other.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    @property
    def key(self) -> str:
        """What the table is for, in messages: ``onnxruntime-cpu at batch 8, 2 threads``."""
        if self.target == FLOPS:
            return "flops"
        return f"{self.target} at batch {self.batch}, {self.threads} thread{'s' if self.threads != 1 else ''}"

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, d: Any, source: str = "cost table", then: str = REMEASURE) -> CostTable:
        """A table from its JSON data, every field checked; raises CostTableError naming ``source``
        and the first bad field, then saying ``then`` (what to do)."""
        def bad(what: str) -> CostTableError:
            return CostTableError(f"{source}: {what}; {then}")

        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise bad(f"not a dagc cost table (no \"format\": \"{FORMAT}\")")
        if d.get("version") != VERSION:
            raise bad(f"cost table version {d.get('version')!r} is not one this dagc reads ({VERSION})")
        net = d.get("network")
        if not (isinstance(net, str) and len(net) == 64 and all(c in "0123456789abcdef" for c in net)):
            raise bad("\"network\" must be a sha256 fingerprint (64 hex digits)")
        target, batch, threads = d.get("target"), d.get("batch"), d.get("threads")
        try:
            check_target(target, batch, threads, option="target")
        except CostTableError as e:
            raise bad(str(e)) from None
        if d.get("unit") != TARGETS[target]:
            raise bad(f"\"unit\" must be {TARGETS[target]!r} for target {target!r}, got {d.get('unit')!r}")
        costs = {}
        for name in ("blocks", "heads"):
            m = d.get(name)
            if not isinstance(m, dict) or not m or not all(isinstance(k, str) and _cost_ok(v) for k, v in m.items()):
                raise bad(f"\"{name}\" must map names to finite costs >= 0")
            costs[name] = {k: float(v) for k, v in m.items()}
        for k in costs["blocks"]:
            try:
                parse_key(k)
            except SpecError as e:
                raise bad(f"\"blocks\": {e}") from None
        if not _cost_ok(d.get("call", 0.0)):
            raise bad("\"call\" must be a finite cost >= 0")
        extra = {}
        for name in ("machine", "versions", "method"):
            v = d.get(name, {})
            if not isinstance(v, dict):
                raise bad(f"\"{name}\" must be a JSON object")
            extra[name] = v
        return cls(net, target, batch, threads, TARGETS[target], costs["blocks"], costs["heads"],
                   float(d.get("call", 0.0)), **extra)

    def check(self, spec: Spec, target: str, batch: int, threads: int | None, source: str = "cost table") -> None:
        """Raise CostTableError (one line) unless this table prices ``spec``'s network, every block
        and head of it, on ``target`` at ``batch`` and ``threads``."""
        want = CostTable(network_fingerprint(spec), target, batch, threads, TARGETS.get(target, "?"), {}, {})
        if self.network != want.network:
            raise CostTableError(f"{source} was measured for another network (fingerprint {self.network[:12]}, "
                                 f"this one is {want.network[:12]}); measure a table for this network")
        if (self.target, self.batch, self.threads) != (target, batch, threads):
            raise CostTableError(f"{source} prices {self.key}, not {want.key}; measure a table for {want.key}")
        names = {b.key for b in blocks(spec)}
        if set(self.blocks) != names or set(self.heads) != set(spec.task_names):
            missing = sorted((names - set(self.blocks)) | (set(spec.task_names) - set(self.heads)))
            extra = sorted((set(self.blocks) - names) | (set(self.heads) - set(spec.task_names)))
            raise CostTableError(f"{source} does not price exactly this network's blocks and heads (missing "
                                 f"{missing[:3]}, unexpected {extra[:3]}); re-measure it")

    # ------------------------------------------------------------------ using
    def mask_layout(self, spec: Spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The block costs laid out as a task's masks (`dagc.costs.mask_layout`)."""
        return mask_layout(spec, lambda blk: self.blocks[blk.key])

    def fixed(self, task: str) -> float:
        """What a task's model costs besides its blocks: its head and one call."""
        return self.heads[task] + self.call

    def predicted(self, applied: Iterable[str], tasks: Iterable[str]) -> float:
        """A model's predicted cost: one call, every block application in ``applied`` (block names,
        once per application) and the heads of ``tasks``."""
        return self.call + sum(self.blocks[b] for b in applied) + sum(self.heads[t] for t in tasks)


def _cost_ok(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def flops_table(spec: Spec) -> CostTable:
    """The exact ``flops`` table of ``spec`` (per sample; `dagc.costs`)."""
    return CostTable(network_fingerprint(spec), FLOPS, 1, None, TARGETS[FLOPS],
                     {b.key: float(2 * b.macs) for b in blocks(spec)},
                     {t: float(head_costs(spec, t)["flops"]) for t in spec.task_names},
                     method={"how": "counted: 2 x the convs' and linears' MACs (dagc.costs)"})


def load_table(path: str | os.PathLike) -> CostTable:
    """Read and validate a table file; CostTableError (one line, naming the file) if it cannot be read
    or is not a valid table."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CostTableError(f"cannot read cost table {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CostTableError(f"cost table {path} is not valid JSON ({e.msg} at line {e.lineno}); re-measure it "
                             "(dagc inspect CHECKPOINT --costs TARGET --remeasure) or delete the file") from None
    return CostTable.from_dict(data, source=f"cost table {path}")


def write_table(table: CostTable, path: str | os.PathLike) -> Path:
    """Write ``table`` to ``path`` atomically (`dagc.writing.write_atomic`); CostTableError if the
    system fails the write."""
    text = json.dumps(table.to_dict(), indent=1, sort_keys=True) + "\n"
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), error=CostTableError,
                        then="run the command again")


def cache_dir() -> Path:
    """dagc's cache: ``$DAGC_CACHE_DIR``, else ``$XDG_CACHE_HOME/dagc``, else ``~/.cache/dagc``."""
    if os.environ.get("DAGC_CACHE_DIR"):
        return Path(os.environ["DAGC_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "dagc"
    return Path.home() / ".cache" / "dagc"


def cache_path(spec: Spec, target: str, batch: int, threads: int | None) -> Path:
    """Where the cache keeps the table of (``spec``'s network, target, batch, threads)."""
    check_target(target, batch, threads)
    tail = "" if target == FLOPS else f"-b{batch}-t{threads}"
    return cache_dir() / "cost_tables" / f"{network_fingerprint(spec)[:32]}-{target}{tail}.json"


def cached_table(spec: Spec, target: str, batch: int = 1, threads: int | None = None, *,
                 measure: Measure | None = None, refresh: bool = False) -> CostTable:
    """The table of ``spec`` on ``target`` at ``batch`` and ``threads``: ``flops`` counted, a latency
    target read from the cache, or (on a miss, or with ``refresh``) measured with ``measure`` and
    cached. Raises CostTableError for a bad target, a cached file that is not a valid table for it,
    a miss without ``measure``, or a failed write."""
    check_target(target, batch, threads)
    if target == FLOPS:
        return flops_table(spec)
    path = cache_path(spec, target, batch, threads)
    if path.exists() and not refresh:
        table = load_table(path)
        table.check(spec, target, batch, threads, source=f"cached cost table {path}")
        return table
    if measure is None:
        raise CostTableError(f"no cost table for this network on {target} at batch {batch}, {threads} threads in "
                             f"{path.parent}; measure one with dagc inspect CHECKPOINT --costs {target} "
                             f"--cost-batch {batch} --cost-threads {threads}")
    table = measure(spec, target, batch, threads)
    table.check(spec, target, batch, threads, source="the measured cost table")
    write_table(table, path)
    return table


def describe(table: CostTable, spec: Spec, used: Mapping[str, Iterable[str]] | None = None) -> str:
    """The table as text: one line per block (its cost and, with ``used`` (block -> tasks), the
    tasks whose models apply it), then the heads and the call."""
    scale, unit = (1e-6, "MFLOPs") if table.unit == "FLOPs" else (1.0, "ms")
    lines = [f"cost table: {table.key}, {unit} per {'sample' if table.target == FLOPS else 'call'} "
             f"(network {table.network[:12]})"]
    width = max(12, *(len(b.key) + 2 for b in blocks(spec)), *(len(t) + 7 for t in spec.task_names))
    for b in blocks(spec):
        tasks = "" if used is None else ",".join(used.get(b.key, ())) or "-"
        lines.append(f"  {b.key:<{width}}{table.blocks[b.key] * scale:>10.4f}  {tasks}".rstrip())
    for t in spec.task_names:
        lines.append(f"  {'head ' + t:<{width}}{table.heads[t] * scale:>10.4f}")
    if table.target != FLOPS:
        lines.append(f"  {'call':<{width}}{table.call * scale:>10.4f}  (one model call, on top of its blocks)")
    return "\n".join(lines)

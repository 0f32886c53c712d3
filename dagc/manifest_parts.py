"""The parts of a `dagc.manifest.Manifest`: frozen records, each with ``to_dict`` (its JSON form in
``manifest.json``) and ``read`` (from a `dagc.jsonfields.Fields`, raising ArtifactError naming the
field). Cross-field checks against the spec are the ``problem`` methods, which the Manifest runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from dagc.errors import ArtifactError, DataError
from dagc.jsonfields import Fields
from dagc.precisions import PRECISIONS
from dagc.preprocessing import Preprocessing
from dagc.spec import Spec, TaskSpec

__all__ = ["PREVIEW", "spec_order", "INPUT_DTYPES", "PRECISIONS", "Cost", "Costs", "FileEntry", "InputInfo", "TaskMasks", "TaskInfo",
           "ModelInfo", "SharingRow", "Topology", "Verification", "TensorRTSettings"]

PREVIEW = "none"  # the target of `dagc inspect CHECKPOINT`'s manifest: nothing compiled, no models
INPUT_DTYPES = ("float32",)
DEVICES = ("cpu", "cuda")  # what an AOTInductor package is compiled for
BATCH = "batch"  # the dynamic batch axis of every shape in the manifest
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


def spec_order(d: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """``d`` with the keys in ``names`` first, in that order (JSON sorts keys; the spec's task order
    matters), any other keys after them (validation then names them)."""
    return {**{t: d[t] for t in names if t in d}, **d}


def _batch_shape(o: Fields, key: str) -> tuple[int, ...]:
    """``["batch", d1, ...]`` -> (d1, ...)."""
    v = o.get(key)
    if (not isinstance(v, list) or len(v) < 2 or v[0] != BATCH
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in v[1:])):
        raise o.fail(key, f'a shape ["{BATCH}", positive integers...] (dynamic batch first)', v)
    return tuple(v[1:])


class _Numbers:
    """A dataclass of numeric fields (``int`` read as an integer, ``float`` as a number), its JSON an
    object of the same keys."""

    @classmethod
    def _kinds(cls) -> dict[str, str]:
        # Annotations are strings here (``from __future__ import annotations``).
        return {f.name: "integer" if f.type == "int" else "number" for f in fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._kinds()}

    @classmethod
    def read(cls, o: Fields, strict: bool = True):
        """``strict``: refuse other fields (False where the fields sit in a larger object)."""
        kinds = cls._kinds()
        if strict:
            o.only(*kinds)
        return cls(**{k: getattr(o, kind)(k) for k, kind in kinds.items()})


@dataclass(frozen=True)
class Cost(_Numbers):
    """Per-sample cost: multiply-accumulates, FLOPs (2 x MACs of convolutions and linear layers)
    and parameters."""

    macs: int
    flops: int
    params: int


@dataclass(frozen=True)
class Costs:
    """``supernet`` (unpruned soft supernet, every edge for every task), ``unshared`` (pruned graph
    before cross-task sharing), ``shared`` (the shared model) and ``per_task`` (task -> its own
    model)."""

    supernet: Cost
    unshared: Cost
    shared: Cost
    per_task: Mapping[str, Cost]

    def __post_init__(self) -> None:
        object.__setattr__(self, "per_task", MappingProxyType(dict(self.per_task)))

    def to_dict(self) -> dict[str, Any]:
        return {"supernet": self.supernet.to_dict(), "unshared": self.unshared.to_dict(),
                "shared": self.shared.to_dict(), "per_task": {t: c.to_dict() for t, c in self.per_task.items()}}

    @classmethod
    def read(cls, o: Fields, task_names: Sequence[str]) -> Costs:
        """``per_task`` comes back in the order of ``task_names`` (JSON sorts keys); others after."""
        per_task = {t: Cost.read(f) for t, f in o.children("per_task").items()}
        return cls(Cost.read(o.child("supernet")), Cost.read(o.child("unshared")), Cost.read(o.child("shared")),
                   spec_order(per_task, task_names))


@dataclass(frozen=True)
class FileEntry:
    """A file of the artifact: its sha256 (hex) and size (None in manifests that did not record it)."""

    sha256: str
    bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256} if self.bytes is None else {"sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def read(cls, o: Fields) -> FileEntry:
        o.only("sha256", "bytes")
        sha = o.string("sha256")
        if not _SHA256.match(sha):
            raise o.fail("sha256", "64 lower-case hex digits", sha)
        return cls(sha, o.optional("bytes", o.integer))


@dataclass(frozen=True)
class InputInfo:
    """The model inputs: ``names`` (one shared input, or one per task), ``shape`` (C, H, W) after the
    dynamic batch axis, ``dtype`` and the ``preprocessing`` (None when the checkpoint recorded none)."""

    names: tuple[str, ...]
    shape: tuple[int, int, int]
    dtype: str = "float32"
    preprocessing: Preprocessing | None = None

    def batch_shape(self) -> list:
        """``["batch", C, H, W]``, the JSON form of the shape."""
        return [BATCH, *self.shape]

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "shape": self.batch_shape(), "dtype": self.dtype,
                "preprocessing": None if self.preprocessing is None else self.preprocessing.to_dict()}

    @classmethod
    def read(cls, o: Fields, legacy: bool = False) -> InputInfo:
        """``legacy``: a version-1 manifest, whose preprocessing is the prose form."""
        o.only("names", "shape", "dtype", "preprocessing")
        shape = _batch_shape(o, "shape")
        if len(shape) != 3:
            raise o.fail("shape", '["batch", C, H, W]', o.get("shape"))
        names = o.strings("names")
        if not names or len(set(names)) != len(names):
            raise o.fail("names", "distinct input names", list(names))
        pre = None
        if o.d.get("preprocessing") is not None:
            try:
                read = Preprocessing.from_legacy if legacy else Preprocessing.from_dict
                pre = read(o.get("preprocessing"))
            except DataError as e:
                raise o.error(f"{o.source}: {o.path('')}{e}{o.hint}") from None
        return cls(names, (shape[0], shape[1], shape[2]), o.string("dtype", INPUT_DTYPES), pre)


@dataclass(frozen=True)
class TaskMasks:
    """A task's 0/1 masks: ``gamma`` (N x N hidden edges), ``alpha`` (N read-ins), ``beta`` (N read-outs)."""

    gamma: tuple[tuple[int, ...], ...]
    alpha: tuple[int, ...]
    beta: tuple[int, ...]

    @classmethod
    def of(cls, gamma, alpha, beta) -> TaskMasks:
        """From one task's mask arrays (numpy, (N, N), (N,), (N,)), as the checkpoint holds them."""
        return cls(tuple(tuple(int(v) for v in row) for row in gamma), tuple(int(v) for v in alpha),
                   tuple(int(v) for v in beta))

    def to_dict(self) -> dict[str, list]:
        return {"gamma": [list(r) for r in self.gamma], "alpha": list(self.alpha), "beta": list(self.beta)}

    @classmethod
    def read(cls, o: Fields) -> TaskMasks:
        o.only("gamma", "alpha", "beta")
        rows = o.get("gamma")
        if not isinstance(rows, list):
            raise o.fail("gamma", "a list of rows", rows)
        gamma = tuple(Fields({"row": r}, o.path(f"gamma[{i}]"), o.source, o.error, o.hint).integers("row")
                      for i, r in enumerate(rows))
        return cls(gamma, o.integers("alpha"), o.integers("beta"))

    def problem(self, n: int) -> str | None:
        if len(self.gamma) != n or any(len(r) != n for r in self.gamma) or len(self.alpha) != n or len(self.beta) != n:
            return f"masks must be gamma {n} x {n}, alpha and beta {n} values (the spec's hidden states)"
        if any(v not in (0, 1) for v in (*self.alpha, *self.beta, *(v for r in self.gamma for v in r))):
            return "masks must hold only 0 and 1"
        return None


@dataclass(frozen=True)
class TaskInfo:
    """One task: ``kind`` and ``classes`` (as the spec), the ``output`` name, the ``input`` it reads,
    ``output_shape`` after the batch axis, its own ``model`` file and its ``masks``."""

    name: str
    kind: str
    classes: int | None
    output: str
    input: str
    output_shape: tuple[int, ...]
    model: str
    masks: TaskMasks

    def batch_shape(self) -> list:
        """``["batch", ...output_shape]``, the JSON form of the output shape."""
        return [BATCH, *self.output_shape]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "classes": self.classes, "output": self.output, "input": self.input,
                "output_shape": self.batch_shape(), "model": self.model, "masks": self.masks.to_dict()}

    @classmethod
    def read(cls, name: str, o: Fields) -> TaskInfo:
        o.only("kind", "classes", "output", "input", "output_shape", "model", "masks")
        return cls(name, o.string("kind"), o.optional("classes", o.integer), o.string("output"), o.string("input"),
                   _batch_shape(o, "output_shape"), o.string("model"), TaskMasks.read(o.child("masks")))

    def problem(self, spec: Spec, input_names: Sequence[str]) -> str | None:
        """What disagrees with the spec's task and the inputs, as ``field: why``; None if nothing."""
        t: TaskSpec = spec.task(self.name)
        want = (t.out_channels, *spec.input_size) if t.dense else (t.out_channels,)
        if (self.kind, self.classes) != (t.kind, t.classes):
            return f"kind/classes {self.kind!r}/{self.classes!r} differ from the spec's {t.kind!r}/{t.classes!r}"
        if self.output != self.name:
            return f"output must be the task's name {self.name!r}, got {self.output!r}"
        if self.input not in input_names:
            return f"input {self.input!r} is not one of input.names {list(input_names)}"
        if self.output_shape != want:
            return f"output_shape {self.batch_shape()} must be {[BATCH, *want]} for this task"
        return self.masks.problem(spec.n_states)


_FORMAT_FIELDS = {"onnx": ("opset",), "tensorrt": ("precision", "batches", "built_from"),
                  "aoti": ("torch_version", "batch_range", "built_from")}
# A plan's entry copies its ONNX model's opset; a package records device / precision when not cpu / fp32;
# a reduced-precision ONNX file (dagc.precisions) records its precision and the fp32 file it was made from.
_OPTIONAL = {"tensorrt": ("opset",), "aoti": ("precision", "device"), "onnx": ("precision", "built_from")}


@dataclass(frozen=True)
class ModelInfo:
    """One model file: ``format`` (onnx, tensorrt, aoti), the ``tasks`` it computes, its ``inputs``
    and ``outputs`` (task names) in the model's order, its ``cost`` and the worst relative error of
    its verification; per format: ``opset`` (onnx); ``precision``, ``batches`` (the optimisation
    profile) and ``built_from`` (tensorrt); ``torch_version``, ``batch_range`` (min, max) and
    ``built_from`` (aoti), and optionally ``device`` (cuda: compiled for the GPU; absent: cpu) and
    ``precision`` (fp16/bf16 variants; absent: fp32)."""

    name: str
    format: str
    tasks: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    cost: Cost
    verified_max_rel_error: float
    opset: int | None = None
    precision: str | None = None
    batches: tuple[int, ...] | None = None
    built_from: str | None = None
    torch_version: str | None = None
    batch_range: tuple[int, int] | None = None
    device: str | None = None

    @property
    def flops(self) -> int:
        return self.cost.flops

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"tasks": list(self.tasks), "format": self.format, "inputs": list(self.inputs),
                             "outputs": list(self.outputs), "verified_max_rel_error": self.verified_max_rel_error,
                             **self.cost.to_dict()}
        for key in ("opset", "precision", "built_from", "torch_version", "device"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.batches is not None:
            d["batches"] = list(self.batches)
        if self.batch_range is not None:
            d["batch"] = {"min": self.batch_range[0], "max": self.batch_range[1]}
        return d

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any], source: str = "manifest") -> ModelInfo:
        """Read the `to_dict` form of model file ``name``; raises ArtifactError naming the field."""
        return cls.read(name, Fields(d, f"models[{name!r}]", source, ArtifactError))

    @classmethod
    def read(cls, name: str, o: Fields) -> ModelInfo:
        o.only("tasks", "format", "inputs", "outputs", "verified_max_rel_error", "macs", "flops", "params", "opset",
               "precision", "batches", "built_from", "torch_version", "batch", "device")
        rng = o.optional("batch", o.child)
        return cls(name, o.string("format"), o.strings("tasks"), o.strings("inputs"), o.strings("outputs"),
                   Cost.read(o, strict=False), o.number("verified_max_rel_error"), opset=o.optional("opset", o.integer),
                   precision=o.optional("precision", lambda k: o.string(k, PRECISIONS)),
                   batches=o.optional("batches", lambda k: o.integers(k, low=1)),
                   built_from=o.optional("built_from", o.string), torch_version=o.optional("torch_version", o.string),
                   batch_range=None if rng is None else (rng.integer("min", 1), rng.integer("max", 1)),
                   device=o.optional("device", lambda k: o.string(k, DEVICES)))

    def problem(self, task_names: Sequence[str], input_names: Sequence[str]) -> str | None:
        """What is inconsistent, as ``field ...``; None if nothing. The format must be known."""
        if not self.tasks or len(set(self.tasks)) != len(self.tasks) or not set(self.tasks) <= set(task_names):
            return f"tasks {list(self.tasks)} must be distinct tasks of the spec {list(task_names)}"
        if sorted(self.outputs) != sorted(self.tasks):
            return f"outputs {list(self.outputs)} must be its tasks {list(self.tasks)}"
        if not self.inputs or not set(self.inputs) <= set(input_names):
            return f"inputs {list(self.inputs)} must be among input.names {list(input_names)}"
        required = _FORMAT_FIELDS[self.format]
        for key in ("opset", "precision", "batches", "built_from", "torch_version", "batch_range", "device"):
            present = getattr(self, key) is not None
            if key in required and not present:
                return f"{key} is required for format {self.format!r}"
            if present and key not in required and key not in _OPTIONAL.get(self.format, ()):
                return f"{key} is not a field of format {self.format!r} models"
        return None


@dataclass(frozen=True)
class SharingRow:
    """One computed state instance: its ``id``, ``state`` (0-based hidden state, or "L" for the
    read-out), the ``tasks`` it is computed for and its number of incoming ``edges``."""

    id: str
    state: int | str
    tasks: tuple[str, ...]
    edges: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "tasks": list(self.tasks), "edges": self.edges}

    @classmethod
    def read(cls, o: Fields) -> SharingRow:
        o.only("id", "state", "tasks", "edges")
        state = o.get("state")
        if state != "L":
            state = o.integer("state")
        return cls(o.string("id"), state, o.strings("tasks"), o.integer("edges"))


@dataclass(frozen=True)
class Topology(_Numbers):
    """A task's depth D, width W and sparsity S (paper Sec. 3.1)."""

    D: int
    W: int
    S: float


@dataclass(frozen=True)
class Verification:
    """How the models were checked: the ``reference``, the error ``metric``, the tolerances."""

    reference: str
    metric: str
    onnx_rtol: float
    aoti_rtol: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"reference": self.reference, "metric": self.metric, "onnx_rtol": self.onnx_rtol}
        if self.aoti_rtol is not None:
            d["aoti_rtol"] = self.aoti_rtol
        return d

    @classmethod
    def read(cls, o: Fields) -> Verification:
        o.only("reference", "metric", "onnx_rtol", "aoti_rtol")
        return cls(o.string("reference"), o.string("metric"), o.number("onnx_rtol"), o.optional("aoti_rtol", o.number))


@dataclass(frozen=True)
class TensorRTSettings:
    """``--target tensorrt``'s settings: the profile's ``batches`` and the ``precision``."""

    batches: tuple[int, ...]
    precision: str

    def to_dict(self) -> dict[str, Any]:
        return {"batches": list(self.batches), "precision": self.precision}

    @classmethod
    def read(cls, o: Fields) -> TensorRTSettings:
        o.only("batches", "precision")
        return cls(o.integers("batches", low=1), o.string("precision", PRECISIONS))

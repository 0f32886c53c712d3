"""Reduced precisions of an artifact: which model files are variants of which, and the accuracy
check on the tasks that every reduced precision passed (the manifest's optional ``accuracy``).

A *variant* is a model file computed from another model of the same format at another precision
(``model.int8.onnx``, built from ``model.onnx``), or a file built from a variant (a TensorRT INT8
plan built from ``model.int8.onnx``). Routes (`dagc.routes`) are computed over the models that are
not variants; a precision's models are the route's models mapped to their variant of that
precision (`variant`). bf16 has no files: it is OpenVINO running the fp32 ONNX files with bf16
inference precision, allowed only where the manifest records a passed bf16 check. Likewise the
int8 / fp16 files run on OpenVINO only where their check on OpenVINO passed (``int8-openvino``):
OpenVINO executes QDQ graphs with its own kernels, so its metrics are checked, not assumed.

``accuracy`` in ``manifest.json`` (`Accuracy`)::

    dataset, split, samples {task: n}, max_metric_drop (relative)
    primary   task -> {metric, higher_is_better}
    precisions  precision -> {runner, calibration (int8: `Calibration`) or null,
                models: fp32 model file -> {file, fallback, metrics {task: {metric: value}},
                                            drop {task: relative drop of the primary metric},
                                            max_rel_error (against the fp32 file, held-out inputs),
                                            fp32_nodes [node kept in fp32 for accuracy] (version 3)}}
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Protocol

from dagc.errors import ArtifactError
from dagc.jsonfields import Fields
from dagc.precision_table import CHECKED_ON, REFERENCE, TABLE, spec_of

__all__ = ["PRECISIONS", "REFERENCE", "FILE_PRECISIONS", "OPENVINO", "CHECKS", "Calibration", "ModelCheck", "PrecisionCheck", "Accuracy",
           "precision_of", "REDUCED", "check_name", "unchecked_file", "is_variant", "routable", "variant", "variant_file", "runs_at", "at_precision", "relative_drop"]

PRECISIONS = tuple(TABLE)  # the records: `dagc.precision_table`
REDUCED = tuple(p for p in PRECISIONS if p != REFERENCE)
FILE_PRECISIONS = tuple(p.name for p in TABLE.values() if p.own_files)  # bf16 runs the fp32 files
RUNNERS = tuple(CHECKED_ON)
OPENVINO = "-openvino"  # suffix of the check of a precision's files run on OpenVINO: "int8-openvino"
CHECKS = (*PRECISIONS, *(f"{p}-{b}" for b in RUNNERS for p in FILE_PRECISIONS if b != TABLE[p].checked_on))


def check_name(precision: str, backend: str) -> str:
    """The accuracy record's key of ``precision``'s check on ``backend``: the precision itself on
    the backend its record checks it on, ``<precision>-<backend>`` on another (``int8-openvino``)."""
    return precision if backend == TABLE[precision].checked_on else f"{precision}-{backend}"


class _Model(Protocol):
    name: str
    format: str
    precision: str | None
    built_from: str | None


def precision_of(model: _Model) -> str:
    """A model's precision (``fp32`` when the manifest records none)."""
    return model.precision or REFERENCE


def routable(models: Iterable[_Model]) -> list:
    """The models task-subset routes choose among: per format, its full-precision models (precision
    fp32 or unrecorded), or all of them when a format has only reduced ones (``--fp16`` plans). The
    reduced-precision variants beside fp32 models (fp16/bf16 AOTInductor packages, int8/fp16 ONNX
    files and what is built from them: `is_variant`) are alternatives a caller picks by name or by
    ``load(..., precision=)``, never what a task subset runs by default."""
    typed = {m.name: m for m in models}
    kept = [m for m in typed.values() if not is_variant(typed, m.name)]
    full = {m.format for m in kept if spec_of(m.precision).reference}
    return [m for m in kept if m.format not in full or spec_of(m.precision).reference]


def is_variant(models: Mapping[str, _Model], name: str) -> bool:
    """Whether model ``name`` is another precision's form of a model of the same format, or built
    from one (module docstring)."""
    seen = set()
    m = models[name]
    while m.built_from is not None and m.built_from in models and m.name not in seen:
        seen.add(m.name)
        parent = models[m.built_from]
        if parent.format == m.format or is_variant(models, parent.name):
            return True
        m = parent
    return False


def _root(models: Mapping[str, _Model], name: str) -> str:
    """The model a chain of ``built_from`` starts from (the fp32 ONNX file)."""
    seen = set()
    while models[name].built_from in models and name not in seen:
        seen.add(name)
        name = models[name].built_from
    return name


def variant(models: Mapping[str, _Model], name: str, precision: str) -> str:
    """The file that computes what model ``name`` computes, at ``precision`` and in its format
    (``name`` itself when it has that precision). Raises ArtifactError when there is none."""
    m = models[name]
    if precision_of(m) == precision:
        return name
    root = _root(models, name)
    for other in models.values():
        if (other.format == m.format and precision_of(other) == precision and is_variant(models, other.name)
                and _root(models, other.name) == root):
            return other.name
    raise ArtifactError(f"the artifact has no {precision} form of {name}; recompile it with "
                        f"dagc compile --precision fp32,{precision}")


def runs_at(model: _Model, precision: str) -> bool:
    """Whether ``model`` is a file that runs at ``precision`` (bf16 runs the fp32 files)."""
    return precision_of(model) == (precision if TABLE[precision].own_files else REFERENCE)


def at_precision(models: Mapping[str, _Model], names, precision: str) -> tuple[str, ...]:
    """The files that compute what the fp32 models ``names`` compute, at ``precision``."""
    if not TABLE[precision].own_files:
        return tuple(names)
    return tuple(variant(models, n, precision) for n in names)


def variant_file(name: str, precision: str) -> str:
    """The file name of the ``precision`` form of fp32 model file ``name`` (``model.int8.onnx``)."""
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{precision}.{ext}"


def relative_drop(reference: float, value: float, higher_is_better: bool) -> float:
    """How much worse ``value`` is than ``reference``, relative to |reference| (negative: better)."""
    worse = reference - value if higher_is_better else value - reference
    return worse / max(abs(reference), 1e-12)


def _frozen(d: Mapping) -> Mapping:
    return MappingProxyType(dict(d))


def _metrics(o: Fields, key: str) -> dict[str, dict[str, float]]:
    return {t: {k: f.number(k) for k in f.d} for t, f in o.children(key).items()}


def _bool(o: Fields, key: str) -> bool:
    v = o.get(key)
    if not isinstance(v, bool):
        raise o.fail(key, "true or false", v)
    return v


@dataclass(frozen=True)
class Calibration:
    """How int8 models are quantized, the one settings type of the compiler (`dagc.compiler.quantize`)
    and of the manifest's record: ONNX Runtime's activation and weight types, calibration method,
    per-channel weights, pre-processing, whether in TensorRT's form (``symmetric``: signed int8
    activations and weights with zero points 0, no int32 biases), and the calibration data
    (``batches`` batches of ``batch_size`` training samples, drawn with ``seed``). The defaults are
    the measured choice (`dagc.compiler.quantize`'s docstring). A field added later takes
    ``metadata={"optional": True}``: manifests written before it then read with its default."""

    activations: str = "QUInt8"
    weights: str = "QInt8"
    method: str = "MinMax"
    per_channel: bool = True
    preprocess: bool = False
    batches: int = field(default=8, metadata={"low": 1})
    batch_size: int = field(default=16, metadata={"low": 1})
    seed: int = 0
    symmetric: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, o: Fields) -> Calibration:
        every = fields(cls)
        o.only(*(f.name for f in every))
        kw: dict[str, Any] = {}
        for f in every:
            if f.metadata.get("optional") and o.get(f.name) is None:
                continue
            kind = type(getattr(cls(), f.name))
            kw[f.name] = (_bool(o, f.name) if kind is bool else o.string(f.name) if kind is str
                          else o.integer(f.name, f.metadata.get("low", 0)))
        return cls(**kw)


@dataclass(frozen=True)
class ModelCheck:
    """One model's check: the ``file`` that ran, the ``fallback`` used (int8; None otherwise), its
    held-out ``metrics`` (task -> metric -> value), the relative ``drop`` of each task's primary
    metric against the fp32 file (empty for fp32 itself), its ``max_rel_error`` against it, and
    the nodes the file keeps in fp32 for accuracy (int8: `dagc.compiler.mixed_precision`; format
    version 3, empty when read from an older manifest)."""

    file: str
    metrics: Mapping[str, Mapping[str, float]]
    drop: Mapping[str, float]
    max_rel_error: float = 0.0
    fallback: str | None = None
    fp32_nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", _frozen({t: _frozen(m) for t, m in self.metrics.items()}))
        object.__setattr__(self, "drop", _frozen(self.drop))
        object.__setattr__(self, "fp32_nodes", tuple(self.fp32_nodes))

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "fallback": self.fallback, "max_rel_error": self.max_rel_error,
                "metrics": {t: dict(m) for t, m in self.metrics.items()}, "drop": dict(self.drop),
                "fp32_nodes": list(self.fp32_nodes)}

    @classmethod
    def read(cls, o: Fields) -> ModelCheck:
        o.only("file", "fallback", "metrics", "drop", "max_rel_error", "fp32_nodes")
        drop = o.child("drop")
        return cls(o.string("file"), _metrics(o, "metrics"), {t: drop.number(t) for t in drop.d},
                   o.number("max_rel_error"), o.optional("fallback", o.string),
                   o.optional("fp32_nodes", o.strings) or ())


@dataclass(frozen=True)
class PrecisionCheck:
    """One precision's check: the ``runner`` it ran on, its ``models`` (fp32 model file -> check),
    and for int8 the ``calibration``."""

    runner: str
    models: Mapping[str, ModelCheck]
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", _frozen(dict(sorted(self.models.items()))))

    def to_dict(self) -> dict[str, Any]:
        return {"runner": self.runner, "models": {n: c.to_dict() for n, c in self.models.items()},
                "calibration": None if self.calibration is None else self.calibration.to_dict()}

    @classmethod
    def read(cls, o: Fields) -> PrecisionCheck:
        o.only("runner", "models", "calibration")
        return cls(o.string("runner", RUNNERS), {n: ModelCheck.read(f) for n, f in o.children("models").items()},
                   o.optional("calibration", lambda k: Calibration.read(o.child(k))))


@dataclass(frozen=True)
class Accuracy:
    """The accuracy check on the tasks (module docstring): the data it ran on, each task's primary
    metric (name, whether higher is better), the allowed relative drop and every precision's check
    (fp32 included: the reference)."""

    dataset: str
    split: str
    samples: Mapping[str, int]
    primary: Mapping[str, tuple[str, bool]]
    max_metric_drop: float
    precisions: Mapping[str, PrecisionCheck]

    def __post_init__(self) -> None:
        for name in ("samples", "primary", "precisions"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "split": self.split, "samples": dict(self.samples),
                "primary": {t: {"metric": m, "higher_is_better": h} for t, (m, h) in self.primary.items()},
                "max_metric_drop": self.max_metric_drop,
                "precisions": {p: c.to_dict() for p, c in self.precisions.items()}}

    @classmethod
    def read(cls, o: Fields) -> Accuracy:
        o.only("dataset", "split", "samples", "primary", "max_metric_drop", "precisions")
        samples = o.child("samples")
        primary = {t: (f.string("metric"), _bool(f, "higher_is_better")) for t, f in o.children("primary").items()}
        return cls(o.string("dataset"), o.string("split"), {t: samples.integer(t) for t in samples.d}, primary,
                   o.number("max_metric_drop"),
                   {p: PrecisionCheck.read(f) for p, f in o.children("precisions").items()})

    def problem(self, task_names, models: Mapping[str, _Model]) -> str | None:
        """What disagrees with the manifest's tasks and models, as ``field ...``; None if nothing."""
        if not 0 <= self.max_metric_drop < 1:
            return f"max_metric_drop must be a fraction in [0, 1), got {self.max_metric_drop!r}"
        if REFERENCE not in self.precisions:
            return f"precisions must include the reference {REFERENCE!r}"
        if set(self.primary) != set(task_names):
            return f"primary must name every task {list(task_names)}"
        for p, check in self.precisions.items():
            if p not in CHECKS:
                return f"precisions has unknown precision {p!r} (known: {list(CHECKS)})"
            for ref, c in check.models.items():
                where = f"precisions[{p!r}].models[{ref!r}]"
                if ref not in models or c.file not in models:
                    return f"{where} names a file that is not a model of the manifest"
                if set(c.metrics) - set(task_names) or set(c.drop) - set(task_names):
                    return f"{where} has metrics of tasks that are not the spec's"
                problem = None if p == REFERENCE else self._drop_problem(ref, c)
                if problem:
                    return f"{where}.{problem}"
        return None

    def _drop_problem(self, ref: str, c: ModelCheck) -> str | None:
        """Whether a reduced precision's check of fp32 model ``ref`` records a pass: every drop within
        the allowance and equal to the one its own metrics and the fp32 ones give (a compile records
        only checks that passed; anything else is an edited record, and its models must not run)."""
        fp32 = self.precisions[REFERENCE].models.get(ref)
        if fp32 is None:
            return f"drop has no fp32 check of {ref} to compare with"
        for t, (key, higher) in self.primary.items():
            have = key in c.metrics.get(t, {}) and key in fp32.metrics.get(t, {})
            if have != (t in c.drop):
                return f"drop[{t!r}] {'is missing' if have else 'has no metrics to come from'}"
            if not have:
                continue
            d = c.drop[t]
            if d > self.max_metric_drop + 1e-9:
                return (f"drop[{t!r}] is {d:.2%}, more than the allowed {self.max_metric_drop:.2%}: the check failed "
                        "and its models must not run")
            if not math.isclose(d, relative_drop(fp32.metrics[t][key], c.metrics[t][key], higher),
                                rel_tol=1e-6, abs_tol=1e-9):
                return f"drop[{t!r}] {d!r} is not the drop of its metrics against the fp32 ones"
        return None

    def in_order(self, task_names) -> Accuracy:
        """The same record with every task-keyed mapping in ``task_names`` order (JSON sorts keys;
        the spec's task order is what readers show)."""
        def order(d: Mapping) -> dict:
            return {**{t: d[t] for t in task_names if t in d}, **d}

        checks = {p: replace(c, models={n: replace(m, metrics=order(m.metrics), drop=order(m.drop))
                                        for n, m in c.models.items()})
                  for p, c in self.precisions.items()}
        return replace(self, samples=order(self.samples), primary=order(self.primary), precisions=checks)

    def reduced(self) -> dict[str, PrecisionCheck]:
        """The checks of the reduced precisions (every one but the reference's), in order."""
        return {p: c for p, c in self.precisions.items() if p != REFERENCE}

    def passed(self, precision: str) -> bool:
        """Whether ``precision`` was checked (a compile records only the checks that passed)."""
        return precision in self.precisions


def unchecked_file(accuracy: Accuracy | None, models: Mapping[str, _Model]) -> str | None:
    """The problem, as ``models[...] ...``, of a reduced-precision ONNX file (`FILE_PRECISIONS`)
    that the accuracy record has no check of (the runtime runs only checked ones); None if none."""
    for name, m in models.items():
        if m.format != "onnx" or precision_of(m) not in FILE_PRECISIONS:
            continue
        check = None if accuracy is None else accuracy.precisions.get(precision_of(m))
        if check is None or all(c.file != name for c in check.models.values()):
            return (f"models[{name!r}] is an {precision_of(m)} file that accuracy.precisions records no passed check "
                    "of")
    return None


def read_accuracy(o: Fields, key: str) -> Accuracy | None:
    """The optional ``accuracy`` field (absent in artifacts compiled before it existed)."""
    return o.optional(key, lambda k: Accuracy.read(o.child(k)))


def check_loadable(accuracy: Accuracy | None, models: Mapping[str, _Model], precision: str, backend: str,
                   where: str) -> str:
    """Refuse (ArtifactError, one sentence) a ``precision`` the artifact cannot run on ``backend``:
    an unknown one, one with files of its own (int8, fp16) without such files, or on a backend
    that checks it (`RUNNERS`) without a passed check there, one run at an inference precision
    (bf16) off its backends (`PrecisionSpec.runs_on`) or without a passed check. Returns ``precision``."""
    if precision not in PRECISIONS:
        raise ArtifactError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    have = sorted({REFERENCE, *(precision_of(m) for m in models.values()),
                   *(p for p in (accuracy.precisions if accuracy is not None else ()) if p in PRECISIONS)})
    spec = TABLE[precision]
    if spec.runs_on is not None and backend not in spec.runs_on:
        on = " or ".join(repr(b) for b in spec.runs_on)
        raise ArtifactError(f"precision {precision!r} runs on backend {on} (its inference precision there), not "
                            f"{backend!r}")
    if spec.reference:
        return precision
    if not spec.own_files:
        if accuracy is None or not accuracy.passed(precision):
            raise ArtifactError(f"{where} records no passed {precision} accuracy check (precisions {have}); "
                                f"recompile it with dagc compile --precision {REFERENCE},{precision}")
    elif not any(precision_of(m) == precision for m in models.values()):
        raise ArtifactError(f"{where} has no {precision} models (precisions {have}); recompile it with "
                            f"dagc compile --precision {REFERENCE},{precision}")
    elif backend in RUNNERS and backend != spec.checked_on and (accuracy is None or not accuracy.passed(check_name(precision, backend))):
        raise ArtifactError(f"{where} records no passed accuracy check of its {precision} models on "
                            f"{CHECKED_ON[backend]} (a compile checks them when {backend} is installed); use backend {spec.checked_on!r}")
    return precision

"""The compile targets, declared as records (`Target`): the model format each emits beside the
ONNX models every compile writes, the devices it builds for, the reduced precisions its own files
are built at on request (those listed in ``--precision``, or ``--fp16`` / ``--bf16``:
`dagc.compiler.options`) and their tolerances (`dagc.precision_table`), the form of int8 files it reads, and what the manifest records of its build. `choose` checks a
request against the records; adding a target is adding a record to `REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dagc import manifest as mf
from dagc.compiler import aoti, tensorrt, verify
from dagc.compiler.ir import CompileError, Graph
from dagc.compiler.quantize import for_tensorrt
from dagc.precision_table import BF16, FP16, INT8, REFERENCE, TABLE, Files, spec_of, tolerances
from dagc.precisions import Calibration

__all__ = ["Build", "Target", "REGISTRY", "TARGETS", "choose", "model_file", "requested"]


def model_file(task: str | None, ext: str = "onnx") -> str:
    """File name of the shared model (task None) or of a task's model."""
    return f"model.{ext}" if task is None else f"task_{task}.{ext}"


@dataclass
class Build:
    """What a compile has produced so far; a target's ``add`` puts its models into files/models.
    ``precisions``: the reduced precisions asked of the target's own files (`CompileOptions.own`)."""

    files: dict[str, bytes]
    models: dict[str, mf.ModelInfo]
    graph: Graph
    reference: verify.Reference
    batches: Sequence[int]
    precisions: tuple[str, ...] = ()
    device: str = "cpu"


@dataclass(frozen=True)
class Target:
    """A compile target (module docstring). ``emits``: the format of the files it adds (``onnx``:
    none beyond the ONNX models); ``files``: what they are, for messages (``{p}``: a precision);
    ``adds``: whether its reduced-precision files come beside the fp32 ones (else instead);
    ``unavailable(device)``: why it cannot build for ``device`` here, or None; ``add(build)``: add
    its files; ``devices``: the ``--device`` values it takes (its first is the default);
    ``precisions``: the reduced precisions its files are built at on request, on ``reduced_on``
    devices; ``calibration``: the int8 settings in the form it reads; ``records(build)``: manifest
    fields it records (``tensorrt`` settings, the ``aoti_rtol`` tolerance)."""

    name: str
    emits: str
    files: str
    unavailable: Callable[[str], str | None]
    add: Callable[[Build], None]
    devices: tuple[str, ...] = ("cpu",)
    precisions: tuple[str, ...] = ()
    reduced_on: tuple[str, ...] = ()
    adds: bool = True
    calibration: Callable[[Calibration], Calibration] = lambda settings: settings
    records: Callable[[Build], Mapping[str, Any]] = lambda build: {}
    tolerances: Mapping[str, float] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tolerances", tolerances(self.emits))


def _plans(b: Build) -> None:
    """One strongly typed plan per ONNX model (fp16 asked: from its fp16 conversion; a model with
    Q/DQ nodes: int8), verified against ONNX Runtime running the model it was built from
    (`tensorrt.prepare`, `tensorrt.verify_plan`)."""
    spec = b.graph.spec
    shape = (spec.in_channels, *spec.input_size)
    for name in [n for n in list(b.files) if n.endswith(".onnx")]:
        info = b.models[name]
        if spec_of(info.precision).files is Files.CONVERTED:
            continue  # the checked fp16 ONNX files: fp16 plans are built from the fp32 files' own conversion
        precision = INT8 if tensorrt.has_qdq(b.files[name]) else (*b.precisions, REFERENCE)[0]
        source = tensorrt.prepare(b.files[name], precision)
        plan = tensorrt.build_plan(source, {i: shape for i in info.inputs}, b.batches)
        errors = tensorrt.verify_plan(plan, source, name, b.batches, precision=precision, shape=shape)
        plan_name = name[: -len(".onnx")] + ".plan"
        b.files[plan_name] = plan
        b.models[plan_name] = replace(info, name=plan_name, format="tensorrt", precision=precision,
                                      batches=tuple(b.batches), verified_max_rel_error=max(errors.values()),
                                      built_from=name)


def _packages(b: Build) -> None:
    aoti.add_packages(b.files, b.models, b.graph, b.reference, model_file, device=b.device,
                      precisions=(REFERENCE, *b.precisions))


# The manifest's model formats (`dagc.manifest.MODEL_FORMATS`) are the formats these targets write.
REGISTRY: dict[str, Target] = {t.name: t for t in (
    Target("onnx", "onnx", "ONNX models", lambda device: None, lambda b: None),
    Target("tensorrt", "tensorrt", "TensorRT {p} plans", lambda device: tensorrt.unavailable_reason(), _plans,
           devices=("cuda",), precisions=(FP16,), reduced_on=("cuda",), adds=False, calibration=for_tensorrt,
           records=lambda b: {"tensorrt": mf.TensorRTSettings(tuple(int(n) for n in b.batches),
                                                              (*b.precisions, REFERENCE)[0])}),
    Target("aoti", "aoti", "{p} AOTInductor packages", aoti.unavailable_reason, _packages, devices=aoti.DEVICES,
           precisions=(FP16, BF16), reduced_on=("cuda",), records=lambda b: {"aoti_rtol": aoti.AOTI_RTOL}),
)}
TARGETS = tuple(REGISTRY)
FLAGS = (FP16, BF16)  # the precisions ``--fp16`` / ``--bf16`` ask of a target's own files


def requested(fp16: bool, bf16: bool) -> tuple[str, ...]:
    """The precisions the ``--fp16`` / ``--bf16`` flags ask for."""
    return tuple(p for p, on in zip(FLAGS, (fp16, bf16)) if on)


def _flag_refusal(p: str) -> str:
    """Why ``--<p>`` means nothing to a target without it: what it does for the targets that take it."""
    where = [f"{'adds' if t.adds else 'makes'} {t.files.format(p=p)} (--target {t.name}"
             f"{f' --device {t.reduced_on[0]}' if len(t.devices) > 1 else ''})"
             for t in REGISTRY.values() if p in t.precisions]
    ask = f"{p} ONNX models" if TABLE[p].own_files else f"{p} on {TABLE[p].checked_on}"
    return f"--{p} {' or '.join(where)}; for {ask} use --precision {REFERENCE},{p}"


def choose(name: str, device: str | None, precisions: Sequence[str]) -> tuple[Target, str]:
    """The registered target ``name`` and the device it builds for (``device``, None: the
    target's default), for files at the reduced ``precisions`` (`requested`); CompileError if the
    target is unknown, does not take that device or precision, or cannot build here."""
    if name not in REGISTRY:
        raise CompileError(f"unknown target {name!r}; choose one of {list(TARGETS)}")
    target = REGISTRY[name]
    device = target.devices[0] if device is None else device
    if device not in target.devices:
        others = [f"--target {t.name}" for t in REGISTRY.values() if len(t.devices) > 1]
        hint = f"; --device is an option of {' or '.join(others)}" if len(target.devices) == 1 and others else ""
        raise CompileError(f"--target {name} builds for {' or '.join(target.devices)}, not --device {device!r}{hint}")
    for p in precisions:
        if p not in target.precisions:
            raise CompileError(_flag_refusal(p))
    if precisions and device not in target.reduced_on:
        flags = "/".join(f"--{p}" for p in precisions)
        raise CompileError(f"{target.files.format(p='/'.join(precisions))} are built for {' or '.join(target.reduced_on)}"
                           f"; add --device {target.reduced_on[0]} (or drop {flags})")
    reason = target.unavailable(device)
    if reason:
        raise CompileError(reason)
    return target, device

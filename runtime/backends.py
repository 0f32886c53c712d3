"""The runtime's backends, declared as records (`Backend`): the model formats each runs, its
precisions and devices, why it cannot run here, and how it makes the `dagc.runners.Runner` of a
model file. Resolution (``auto`` included) loops over the records (`REGISTRY`), so adding a
backend is adding a record (`register`); the engine, ``dagc run`` and ``dagc bench`` read only
these records (see `dagc.runtime.engine` for what each built-in backend is)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dagc.errors import ArtifactError, InputError, RunnerError
from dagc.manifest import ModelInfo
from dagc.precision_table import BF16, FP16, INT8, REFERENCE, TABLE
from dagc.runners import (
    ORT_DEVICES,
    OrtRunner,
    OvRunner,
    Runner,
    TrtRunner,
    openvino_unavailable,
    tensorrt_unavailable,
)
from dagc.runtime.torch_backend import TorchRunner

AUTO = "auto"  # not a backend: the first of `AUTO_ORDER` that can run the artifact here

__all__ = ["AUTO", "BACKENDS", "Backend", "REGISTRY", "register", "unregister", "known", "backend", "candidates",
           "resolve_backend", "make_runner", "unavailable"]


@dataclass(frozen=True)
class Backend:
    """One runtime backend.

    ``formats``: the model formats it runs (the artifact's models of the first are the ones it
    loads); ``precisions``: those it runs (`dagc.precision_table`); ``devices``: where;
    ``unavailable(precision)``: why it cannot run that precision here, or None; ``make(data, name,
    info, threads, precision)``: the runner of model file ``name`` (its verified bytes and its
    manifest entry, `dagc.manifest.ModelInfo`), raising RunnerError for a model it cannot load; ``missing``: what
    to say (``{dir}``: the artifact) when the artifact has no models of its formats; ``setup(threads)``:
    process-wide settings made once at load; ``label``: its name in reports. ``dagc bench`` times bare
    sessions and the ``beside`` backends' precisions next to the engines of a ``bench_host``.
    """

    name: str
    formats: tuple[str, ...]
    precisions: tuple[str, ...]
    devices: tuple[str, ...]
    unavailable: Callable[[str], str | None]
    make: Callable[[bytes, str, ModelInfo, int | None, str], Runner]
    missing: str = "{dir} has no ONNX models; recompile it with dagc compile"
    setup: Callable[[int | None], None] | None = None
    label: str = ""
    bench_host: bool = False
    beside: bool = False

    @property
    def format(self) -> str:
        """The format of the model files it loads."""
        return self.formats[0]


def _onnxruntime_unavailable(precision: str) -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "backend 'onnxruntime' needs the onnxruntime package; install dagc[cpu] (or onnxruntime-gpu)"
    return None


def _tensorrt_unavailable(precision: str) -> str | None:
    return unavailable()


def _plan(data: bytes, name: str, info: ModelInfo, threads: int | None, precision: str) -> Runner:
    try:
        return TrtRunner(data, info.batches or [1])
    except RunnerError as e:
        raise ArtifactError(f"{name}: {e}; recompile the artifact on this machine") from None


def _openvino(data: bytes, name: str, info: ModelInfo, threads: int | None, precision: str) -> Runner:
    try:
        return OvRunner(data, threads=threads, precision=precision)
    except RunnerError as e:
        raise ArtifactError(f"{name}: {e}") from None


def _torch_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)  # process-wide: the interpreter runs in this process


_FILES = (REFERENCE, INT8, FP16)  # the precisions with model files an artifact holds
_RECORDS = (
    # ONNX Runtime sessions: GPU providers first when present, CPU fallback (`dagc.runners.OrtRunner`)
    Backend("onnxruntime", ("onnx",), _FILES, ORT_DEVICES[1:], _onnxruntime_unavailable,
            lambda data, name, info, threads, precision: OrtRunner(data, threads=threads),
            label="ONNX Runtime", bench_host=True),
    # the artifact's TensorRT plans (profile from the entry's ``batches``)
    Backend("tensorrt", ("tensorrt",), _FILES, ("cuda",), _tensorrt_unavailable, _plan,
            missing="backend 'tensorrt' needs TensorRT plans and {dir} has none (compiled with --target onnx); "
                    "recompile with --target tensorrt on a GPU machine or use backend 'onnxruntime'",
            label="TensorRT"),
    # the reference interpreter runs the emitted operators only (no Q/DQ, no Cast): fp32
    Backend("torch", ("onnx",), (REFERENCE,), ("cpu",), lambda precision: None,
            lambda data, name, info, threads, precision: TorchRunner(data, name), setup=_torch_threads,
            label="PyTorch"),
    # OpenVINO on the CPU: the fp32 files at f32 or bf16 inference precision, the int8 / fp16 files at f32
    Backend("openvino", ("onnx",), (REFERENCE, INT8, BF16, FP16), ("cpu",), openvino_unavailable, _openvino,
            label="OpenVINO", beside=True),
)
REGISTRY: dict[str, Backend] = {b.name: b for b in _RECORDS}
AUTO_ORDER = ("tensorrt", "onnxruntime")  # what ``auto`` tries, in order
BACKENDS = (AUTO, *REGISTRY)  # the built-in names


def register(record: Backend) -> None:
    """Add a backend (a `Backend` record) that `dagc.runtime.load`, ``dagc run`` and ``dagc bench``
    then take by name. Raises InputError for a name already taken."""
    if record.name in known():
        raise InputError(f"backend {record.name!r} is already registered; give the record another name")
    REGISTRY[record.name] = record


def unregister(name: str) -> None:
    """Remove a backend `register` added (the built-in ones stay)."""
    if name in BACKENDS:
        raise InputError(f"backend {name!r} is built in and cannot be removed")
    REGISTRY.pop(name, None)


def known() -> tuple[str, ...]:
    """Every backend name `resolve_backend` takes, ``auto`` first."""
    return (AUTO, *REGISTRY)


def backend(name: str) -> Backend:
    """The record of a resolved backend ``name``; InputError for an unknown one."""
    if name not in REGISTRY:
        raise InputError(f"unknown backend {name!r}; choose one of {list(known())}")
    return REGISTRY[name]


def candidates(name: str) -> tuple[Backend, ...]:
    """The records ``name`` may resolve to: `AUTO_ORDER`'s for ``auto``, else its own (InputError
    for an unknown name)."""
    return tuple(REGISTRY[b] for b in AUTO_ORDER) if name == AUTO else (backend(name),)


def unavailable() -> str | None:
    """None when TensorRT plans can run here, else the reason in one sentence."""
    return tensorrt_unavailable("backend 'tensorrt'", "use backend 'onnxruntime'")


def _problem(record: Backend, formats: set[str], artifact_dir: Path, precision: str) -> str | None:
    """Why ``record`` cannot run an artifact whose models have ``formats`` here, or None."""
    if not set(record.formats) & formats:
        return record.missing.format(dir=artifact_dir)
    if precision in TABLE and precision not in record.precisions:
        on = " or ".join(repr(b.name) for b in REGISTRY.values() if precision in b.precisions)
        return f"precision {precision!r} runs on backend {on}, not {record.name!r}"
    return record.unavailable(precision)


def resolve_backend(name: str, formats, artifact_dir: Path, precision: str = REFERENCE) -> Backend:
    """The backend record to use for ``name`` (`known`) with an artifact whose model files have
    ``formats`` (``onnx``, ``tensorrt``, ...) at ``precision``: ``auto`` is the first of
    `AUTO_ORDER` that can run the artifact here (its last when none can: its refusal is the one
    raised). Raises ArtifactError when the backend cannot run here, does not run that precision or
    the artifact has no models for it, InputError for an unknown name."""
    formats = set(formats)
    chosen = candidates(name)
    usable = [b for b in chosen if _problem(b, formats, artifact_dir, precision) is None]
    record = usable[0] if usable else chosen[-1]
    problem = _problem(record, formats, artifact_dir, precision)
    if problem:
        raise ArtifactError(problem)
    return record


def make_runner(record: Backend, data: bytes, name: str, info: ModelInfo, threads: int | None,
                precision: str = REFERENCE) -> Runner:
    """The runner of model file ``name`` (its verified bytes ``data`` and manifest entry ``info``)
    on a resolved backend ``record`` at ``precision``. Raises ArtifactError for a model the backend
    cannot load."""
    return record.make(data, name, info, threads, precision)

"""The runtime's backends: which one ``auto`` means here, and the `dagc.runners.Runner` that runs a
model file on each (see `dagc.runtime.engine` for what each backend is)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from dagc.errors import ArtifactError, RunnerError
from dagc.runners import OrtRunner, OvRunner, Runner, TrtRunner, openvino_unavailable, tensorrt_unavailable
from dagc.runtime.torch_backend import TorchRunner

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch", "openvino")

__all__ = ["BACKENDS", "resolve_backend", "make_runner", "unavailable"]


def unavailable() -> str | None:
    """None when TensorRT plans can run here, else the reason in one sentence."""
    return tensorrt_unavailable("backend 'tensorrt'", "use backend 'onnxruntime'")


def resolve_backend(backend: str, formats: Collection[str], artifact_dir: Path) -> str:
    """The backend to use for ``backend`` (one of `BACKENDS`) with an artifact whose model files
    have ``formats`` (``onnx``, ``tensorrt``, ...): ``auto`` is ``tensorrt`` when there are plans
    and TensorRT runs here, else ``onnxruntime``. Raises ArtifactError when the backend cannot run
    here or the artifact has no models for it."""
    if backend == "auto":
        return "tensorrt" if "tensorrt" in formats and unavailable() is None else "onnxruntime"
    if backend == "tensorrt":
        if "tensorrt" not in formats:
            raise ArtifactError(f"backend 'tensorrt' needs TensorRT plans and {artifact_dir} has none "
                                "(compiled with --target onnx); recompile with --target tensorrt on a GPU "
                                "machine or use backend 'onnxruntime'")
        reason = unavailable()
        if reason:
            raise ArtifactError(reason)
    if backend == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ArtifactError("backend 'onnxruntime' needs the onnxruntime package; install dagc[cpu] "
                                "(or onnxruntime-gpu)") from None
    if backend == "openvino":
        reason = openvino_unavailable()
        if reason:
            raise ArtifactError(reason)
    if backend in ("onnxruntime", "torch", "openvino") and "onnx" not in formats:
        raise ArtifactError(f"{artifact_dir} has no ONNX models; recompile it with dagc compile")
    return backend


def make_runner(backend: str, data: bytes, name: str, info: Mapping[str, Any], threads: int | None, *,
                bf16: bool = False) -> Runner:
    """The runner of model file ``name`` (its verified bytes ``data`` and manifest entry ``info``)
    on a resolved ``backend``: an ONNX Runtime session (GPU providers first when present, CPU
    fallback; ``threads`` intra-op threads), OpenVINO on the CPU (f32 inference precision, bf16
    when ``bf16``), the torch interpreter, or the TensorRT plan (profile from
    ``info["batches"]``). Raises ArtifactError for a model the backend cannot load."""
    if backend == "onnxruntime":
        return OrtRunner(data, threads=threads)
    if backend == "openvino":
        try:
            return OvRunner(data, threads=threads, precision="bf16" if bf16 else "fp32")
        except RunnerError as e:
            raise ArtifactError(f"{name}: {e}") from None
    if backend == "torch":
        return TorchRunner(data, name)
    try:
        return TrtRunner(data, info.get("batches") or [1])
    except RunnerError as e:
        raise ArtifactError(f"{name}: {e}; recompile the artifact on this machine") from None

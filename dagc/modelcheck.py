"""Model files checked against the manifest that declares them: the one check that `load`,
``dagc inspect ARTIFACT``, ``dagc export triton``, ``dagc bench`` and the compiler's read-back run.

A sha256 says a file is the one the manifest lists, not that the manifest describes it: a model
of another task (or another artifact) with its sha256 updated, or a file truncated before its
sha256 was recorded, would otherwise reach ONNX Runtime and fail there with a traceback, or be
packaged by the Triton export. What is checked, per model format:

``onnx``
    The bytes parse as an ONNX ``ModelProto`` (``onnx.load_from_string``); the graph's inputs
    (initializers excluded) are the manifest entry's ``inputs`` in order, each float32
    ``[batch, C, H, W]`` with the manifest's ``input.shape``; its outputs are the entry's
    ``outputs`` in order, each float32 ``[batch, *tasks[t].output_shape]``; the default-domain
    opset is the entry's ``opset``.
``aoti``
    The bytes are a complete zip archive (every member's CRC checked) in PyTorch's ``pt2``
    package format with an AOTInductor model inside. A package records no input or output
    names that can be read without compiling it: its names are checked against the ONNX model
    it was built from (``built_from``, checked as above) when the compiler verifies it.
``tensorrt``
    A plan can be read only by TensorRT: the ONNX model it was built from is checked as above,
    and the runtime compares the plan's own input and output names with the manifest when it
    deserialises it (`check_io`).

Every refusal is an ArtifactError naming the file.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence

from dagc.artifact import load_artifact
from dagc.errors import ArtifactError
from dagc.manifest import Manifest

__all__ = ["load_checked", "verify_artifact", "check_model", "check_io"]

_HINT = "; recompile the artifact"


def load_checked(artifact_dir: str | os.PathLike) -> tuple[Manifest, dict[str, bytes]]:
    """An artifact's typed manifest and the bytes of every file, from one snapshot of the directory
    (`dagc.artifact.load_artifact`: every sha256 verified), with every model file checked against
    the manifest (`check_model`). Raises ArtifactError naming the first file or field that is wrong."""
    manifest, files = load_artifact(artifact_dir)
    for name in manifest.models:
        check_model(manifest, name, files[name])
    return manifest, files


def verify_artifact(artifact_dir: str | os.PathLike) -> Manifest:
    """`load_checked` without the bytes: the typed `Manifest` of a fully checked artifact. Raises
    ArtifactError naming the first file or field that is wrong."""
    return load_checked(artifact_dir)[0]


def check_model(manifest: Manifest, name: str, data: bytes) -> None:
    """Check the bytes ``data`` of model file ``name`` against its entry in ``manifest`` (module
    docstring: what is checked per format). Raises ArtifactError naming the file."""
    entry = manifest.models.get(name)
    if entry is None:
        raise ArtifactError(f"{name} is not a model of the manifest{_HINT}")
    if entry.format == "onnx":
        _check_onnx(manifest, name, data)
    elif entry.format == "aoti":
        _check_package(name, data)


def check_io(manifest: Manifest, name: str, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """Check a model's input and output names (as its runner reports them) against its manifest
    entry, in any order. Raises ArtifactError naming the file."""
    entry = manifest.models[name]
    for what, found, want in (("inputs", inputs, entry.inputs), ("outputs", outputs, entry.outputs)):
        if sorted(found) != sorted(want):
            raise ArtifactError(f"model file {name} has {what} {list(found)}, its manifest entry declares "
                                f"{list(want)}: the file is not the model the manifest describes{_HINT}")


def _check_onnx(manifest: Manifest, name: str, data: bytes) -> None:
    try:
        import onnx
    except ImportError:
        raise ArtifactError("checking ONNX model files needs the onnx package; install dagc[cpu]") from None
    try:
        model = onnx.load_from_string(data)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError (and others)
        raise ArtifactError(f"model file {name} is not a readable ONNX model (truncated or corrupted: "
                            f"{type(e).__name__}){_HINT}") from None
    entry = manifest.models[name]
    g = model.graph
    init = {t.name for t in g.initializer}
    inputs = [v for v in g.input if v.name not in init]
    check_io(manifest, name, [v.name for v in inputs], [v.name for v in g.output])
    if [v.name for v in inputs] != list(entry.inputs) or [v.name for v in g.output] != list(entry.outputs):
        raise ArtifactError(f"model file {name} has inputs {[v.name for v in inputs]} and outputs "
                            f"{[v.name for v in g.output]}, its manifest entry declares them in the order "
                            f"{list(entry.inputs)} and {list(entry.outputs)}{_HINT}")
    want = {v: manifest.input.shape for v in entry.inputs}
    want.update({t: manifest.tasks[t].output_shape for t in entry.outputs})
    for v in (*inputs, *g.output):
        _check_value(onnx, name, v, want[v.name])
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if entry.opset is not None and opset != entry.opset:
        raise ArtifactError(f"model file {name} has opset {opset}, its manifest entry declares {entry.opset}{_HINT}")


def _check_value(onnx, name: str, value, shape: tuple[int, ...]) -> None:
    """One graph input or output: float32, a dynamic (or any) batch axis, then ``shape``."""
    t = value.type.tensor_type
    found_type = onnx.TensorProto.DataType.Name(t.elem_type) if t.elem_type else "none"
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    if t.elem_type != onnx.TensorProto.FLOAT or len(dims) != len(shape) + 1 or list(dims[1:]) != list(shape):
        raise ArtifactError(f"model file {name}: {value.name!r} is {found_type} {dims}, the manifest declares "
                            f"FLOAT {['batch', *shape]}: the file is not the model the manifest describes{_HINT}")


def _check_package(name: str, data: bytes) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            bad = z.testzip()
            members = z.namelist()
            fmt = [m for m in members if m.rsplit("/", 1)[-1] == "archive_format"]
            value = z.read(fmt[0]).strip() if fmt else b""
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ArtifactError(f"model file {name} is not a readable AOTInductor package (truncated or "
                            f"corrupted: {e}){_HINT}") from None
    if bad is not None:
        raise ArtifactError(f"model file {name}: member {bad!r} of the package is corrupted{_HINT}")
    if value != b"pt2" or not any("/data/aotinductor/" in f"/{m}" for m in members):
        raise ArtifactError(f"model file {name} is not an AOTInductor package (no pt2 archive_format or "
                            f"no data/aotinductor/ model inside){_HINT}")

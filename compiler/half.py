"""fp16 ONNX models: the emitted float32 model converted by onnxconverter-common, with float32
inputs and outputs. Needs no TensorRT: `--precision fp16` (checked on ONNX Runtime) and TensorRT's
fp16 plans both start here."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from dagc.errors import CompileError

__all__ = ["fp16_model", "read_model"]


def read_model(model: bytes | str | os.PathLike) -> bytes:
    """An ONNX model's bytes, given as bytes or a file; CompileError naming an unreadable file."""
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    try:
        return Path(model).read_bytes()
    except OSError as e:
        raise CompileError(f"cannot read the ONNX model {model}: {e.strerror}") from None


def _float_outputs(original: onnx.ModelProto, converted: onnx.ModelProto) -> None:
    """Give ``converted`` the float32 outputs of ``original`` where the converter left an output
    in fp16 (onnxconverter-common does so when a node on its op block list, such as Resize,
    produces the output): the fp16 value is renamed and cast back to float32 under the output's
    name."""
    want = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    g = converted.graph
    for out in g.output:
        tt = out.type.tensor_type
        if want.get(out.name) != onnx.TensorProto.FLOAT or tt.elem_type == onnx.TensorProto.FLOAT:
            continue
        inner = f"{out.name}/fp16"
        for node in g.node:
            node.output[:] = [inner if o == out.name else o for o in node.output]
        for vi in [v for v in g.value_info if v.name == out.name]:
            g.value_info.remove(vi)
        g.node.append(onnx.helper.make_node("Cast", [inner], [out.name], to=onnx.TensorProto.FLOAT,
                                            name=f"{out.name}/to_float32"))
        tt.elem_type = onnx.TensorProto.FLOAT


def fp16_model(model: bytes | str | os.PathLike) -> bytes:
    """The fp16 version of a float32 ONNX model (bytes or file): onnxconverter-common's
    ``convert_float_to_float16(model, keep_io_types=True)``, so inputs and outputs stay float32
    (every output is made float32 even where the converter leaves one in fp16), then checked
    with ``onnx.checker``. Returns the model's bytes. Raises CompileError without
    onnxconverter-common or for a model that does not convert."""
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise CompileError("fp16 models need the onnxconverter-common package; install dagc[gpu] (or "
                           "pip install onnxconverter-common)") from None
    original = onnx.load_from_string(read_model(model))
    try:
        converted = float16.convert_float_to_float16(original, keep_io_types=True)
        _float_outputs(original, converted)
        onnx.checker.check_model(converted)
    except Exception as e:  # noqa: BLE001 - the converter and checker raise many types; report in one line
        raise CompileError(f"the ONNX model could not be converted to fp16: {str(e).strip().splitlines()[0]}") from None
    return converted.SerializeToString()

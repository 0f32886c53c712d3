"""TensorRT plans built from ONNX models, for TensorRT 10 and 11, and their verification against
ONNX Runtime (`dagc.runners.TrtRunner` against `dagc.runners.OrtRunner`, through
`dagc.runners.compare`).

Every network is *strongly typed*: the precision of each layer is the type its ONNX model gives
it, never a builder flag. TensorRT 11 removed weak typing (``BuilderFlag.FP16`` / ``INT8`` and the
calibrators no longer exist; its migration guide: convert the ONNX model to fp16 first, quantise
with explicit Q/DQ nodes); on TensorRT 10 strong typing is opted into with
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, on 11 it is unconditional (`creation_flags`).
So a precision is a property of the ONNX model the plan is built from:

``fp32``  the emitted model as it is;
``fp16``  the emitted model converted by onnxconverter-common (`dagc.compiler.half.fp16_model`: weights and
          activations fp16, float32 inputs and outputs kept);
``int8``  a model with QuantizeLinear/DequantizeLinear nodes (`has_qdq`), such as ONNX Runtime's
          ``quantize_static`` writes: TensorRT runs explicit quantisation. TensorRT takes only
          symmetric signed quantisation (int8 zero points, all 0) and no quantised (int32)
          biases (`qdq_problem`); ``quantize_static`` writes such models with
          ``activation_type=weight_type=QuantType.QInt8`` and the `TRT_QDQ_OPTIONS` extra options
          (its defaults, asymmetric uint8 activations and int32 biases, suit ONNX Runtime's CPU
          kernels, not TensorRT).

GPU only: without CUDA or the ``tensorrt`` package (whose libraries come only from NVIDIA's own
package index) every entry point that builds or runs a plan raises CompileError saying so; the
ONNX-side helpers (`has_qdq`, `plan_precision`, `creation_flags`) run anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from dagc.compiler.half import fp16_model, read_model
from dagc.errors import CompileError, RunnerError
from dagc.precision_table import FP16, INT8, REFERENCE, TABLE, Files, tolerances
from dagc.runners import TENSORRT_MAJORS, OrtRunner, TrtRunner, compare, tensorrt_major
from dagc.runners import tensorrt_unavailable as unavailable_reason

__all__ = ["PRECISIONS", "TOLERANCE", "unavailable_reason", "creation_flags", "has_qdq",
           "qdq_problem", "TRT_QDQ_OPTIONS", "plan_precision", "prepare", "build_plan", "verify_plan"]

# Relative to the output scale, as in the ONNX verification, against ONNX Runtime running the very
# model the plan was built from (`dagc.precision_table`: TF32 convolutions, int8 scale rounding).
TOLERANCE = tolerances("tensorrt")
PRECISIONS = tuple(TOLERANCE)
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_SIGNED_ZERO_POINTS = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.INT4, onnx.TensorProto.FLOAT8E4M3FN})
# quantize_static's extra options for TensorRT: symmetric scales, float biases, a Q/DQ pair on each
# weight (float weights behind Q->DQ, the form TensorRT's explicit quantisation reads) and one
# Q/DQ pair per consumer.
TRT_QDQ_OPTIONS = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                   "AddQDQPairToWeight": True, "DedicatedQDQPair": True}
SYMMETRIC_HINT = ("quantize it with onnxruntime.quantization.quantize_static(..., quant_format=QuantFormat.QDQ, "
                  "activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, "
                  f"extra_options={TRT_QDQ_OPTIONS})")


def _require() -> None:
    reason = unavailable_reason()
    if reason:
        raise CompileError(reason)


def creation_flags(version: str, strongly_typed_bit: int | None) -> int:
    """The ``create_network`` flags of a strongly typed network on TensorRT ``version``.

    Takes the version string and the value of ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
    (None where the bindings have none). TensorRT 10 needs the flag; TensorRT 11 types every
    network strongly (the flag is accepted and ignored), so 0. Raises CompileError for a version
    before 10 (weakly typed only) or a 10.x without the flag.
    """
    major = tensorrt_major(version)
    if major < TENSORRT_MAJORS[0]:
        raise CompileError(f"TensorRT {version} is too old; dagc builds strongly typed networks with TensorRT 10 or "
                           "11; upgrade tensorrt")
    if major >= 11:
        return 0
    if strongly_typed_bit is None:
        raise CompileError(f"TensorRT {version} has no strongly typed networks; upgrade to TensorRT 10.0 or newer")
    return 1 << int(strongly_typed_bit)


def has_qdq(model: bytes | onnx.ModelProto) -> bool:
    """Whether an ONNX model (bytes or proto) holds QuantizeLinear/DequantizeLinear nodes."""
    proto = onnx.load_from_string(model) if isinstance(model, (bytes, bytearray)) else model
    return any(n.op_type in QDQ_OPS for n in proto.graph.node)


def qdq_problem(model: bytes | onnx.ModelProto) -> str | None:
    """Why TensorRT cannot import the Q/DQ nodes of a model, or None: TensorRT quantises
    symmetrically only, so every zero point given must be a signed type (int8; int4 and fp8 also
    exist) and all zeros, and it dequantises no int32 (quantised-bias) values. Zero points
    computed at run time are not checked (dagc's models have none)."""
    from onnx import numpy_helper

    proto = onnx.load_from_string(model) if isinstance(model, (bytes, bytearray)) else model
    consts = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    for node in proto.graph.node:
        if node.op_type not in QDQ_OPS or len(node.input) < 3 or not node.input[2] or node.input[2] not in consts:
            continue
        zp = consts[node.input[2]]
        if zp.data_type == onnx.TensorProto.INT32:
            return f"{node.op_type} node {node.name!r} dequantises an int32 (quantised) bias, which TensorRT cannot"
        if zp.data_type not in _SIGNED_ZERO_POINTS:
            kind = onnx.TensorProto.DataType.Name(zp.data_type).lower()
            return f"{node.op_type} node {node.name!r} has {kind} zero points; TensorRT takes signed int8 ones"
        if np.any(numpy_helper.to_array(zp).astype(np.float64) != 0):
            return f"{node.op_type} node {node.name!r} has non-zero zero points; TensorRT quantises symmetrically"
    return None


def plan_precision(model: bytes) -> str:
    """The precision a strongly typed plan of this ONNX model runs in: ``int8`` with Q/DQ nodes,
    ``fp16`` when it holds fp16 weights, else ``fp32``."""
    proto = onnx.load_from_string(model)
    if has_qdq(proto):
        return INT8
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer):
        return FP16
    return REFERENCE


def prepare(model: bytes | str | os.PathLike, precision: str) -> bytes:
    """The ONNX bytes to build a ``precision`` plan from (see the module docstring): the model
    for fp32, its fp16 conversion for fp16, the model itself for int8, which must hold Q/DQ nodes.
    A model with Q/DQ nodes is int8 whatever is asked. Raises CompileError for an unknown
    precision, an int8 request for a model without Q/DQ nodes, or Q/DQ nodes TensorRT cannot
    take (`qdq_problem`)."""
    if precision not in PRECISIONS:
        raise CompileError(f"unknown TensorRT precision {precision!r}; choose one of {list(PRECISIONS)}")
    data = read_model(model)
    qdq = has_qdq(data)
    made = TABLE[precision].files
    if made is Files.QUANTIZED and not qdq:
        raise CompileError(f"{precision} plans are built from ONNX models with QuantizeLinear/DequantizeLinear nodes "
                           f"and this one has none; {SYMMETRIC_HINT}")
    problem = qdq_problem(data) if qdq else None
    if problem:
        raise CompileError(f"TensorRT cannot build this Q/DQ model: {problem}; {SYMMETRIC_HINT}")
    if made is Files.CONVERTED and not qdq:
        return fp16_model(data)
    return data


def build_plan(model: bytes | str | os.PathLike, input_shapes: Mapping[str, Sequence[int]],
               batches: Sequence[int]) -> bytes:
    """Build a serialized TensorRT engine from an ONNX model (bytes or file; float32, fp16 or with
    Q/DQ nodes, see `prepare`) as a strongly typed network, with one optimisation profile covering
    ``min(batches)..max(batches)`` (optimised for the median).

    Takes the ONNX model, each input's (C, H, W) and the batch sizes. Returns the plan bytes.
    Raises CompileError if TensorRT is unavailable or fails to parse or build.
    """
    _require()
    import tensorrt as trt

    data = read_model(model)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    bit = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    network = builder.create_network(creation_flags(trt.__version__, bit))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(data):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CompileError(f"TensorRT could not parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    lo, hi = min(batches), max(batches)
    opt = sorted(batches)[len(batches) // 2]
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        chw = tuple(input_shapes[name])
        profile.set_shape(name, (lo, *chw), (opt, *chw), (hi, *chw))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise CompileError("TensorRT failed to build an engine (see its log above)")
    return bytes(plan)


def verify_plan(plan: bytes, onnx_bytes: bytes, name: str, batches: Sequence[int], *, precision: str = REFERENCE,
                shape: Sequence[int], seed: int = 0) -> dict[str, float]:
    """Check a plan against ONNX Runtime (CPU) running the ONNX model it was built from (the
    output of `prepare`).

    Takes the plan, those ONNX bytes, the ONNX file's name (for messages), the plan's batch sizes,
    its precision, each input's (C, H, W) and the seed. Runs both on one seeded standard-normal
    batch of ``max(batches)`` and compares them with `dagc.runners.compare` at `TOLERANCE`.
    Returns task -> worst relative error. Raises CompileError if TensorRT is unavailable, cannot
    deserialize or run the plan, or an output differs beyond the tolerance.
    """
    _require()
    reference = OrtRunner(onnx_bytes, device="cpu")
    rng = np.random.default_rng(seed)
    feeds = {i: rng.standard_normal((max(batches), *shape)).astype(np.float32) for i in reference.inputs}
    try:
        runner = TrtRunner(plan, batches)
        return compare(runner, reference, [feeds], reference.outputs, rtol=TOLERANCE[precision],
                       what=f"{precision} TensorRT plan of {name}", against="ONNX Runtime")
    except RunnerError as e:
        raise CompileError(f"{name}: {e}") from None

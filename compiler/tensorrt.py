"""TensorRT plans built from the emitted ONNX models (TensorRT 10 Python API) and their verification
against ONNX Runtime (`dagc.runners.TrtRunner` against `dagc.runners.OrtRunner`, through
`dagc.runners.compare`). GPU only: without CUDA or the `tensorrt` package every entry point raises
CompileError saying so."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from dagc.errors import CompileError, RunnerError
from dagc.runners import OrtRunner, TrtRunner, compare
from dagc.runners import tensorrt_unavailable as unavailable_reason

# TensorRT may run fp32 convolutions in TF32 on Ampere and newer; tolerances relative to the output
# scale, as in the ONNX verification.
TOLERANCE = {"fp32": 1e-2, "fp16": 5e-2}


def _require() -> None:
    reason = unavailable_reason()
    if reason:
        raise CompileError(reason)


def build_plan(onnx_bytes: bytes, input_shapes: Mapping[str, Sequence[int]], batches: Sequence[int],
               fp16: bool = False) -> bytes:
    """Build a serialized TensorRT engine from an ONNX model with one optimisation profile
    covering ``min(batches)..max(batches)`` (optimised for the median).

    Takes the ONNX bytes, each input's (C, H, W), the batch sizes and the precision. Returns the
    plan bytes. Raises CompileError if TensorRT is unavailable or fails to parse or build.
    """
    _require()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CompileError(f"TensorRT could not parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
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


def verify_plan(plan: bytes, onnx_bytes: bytes, name: str, batches: Sequence[int], *, fp16: bool = False,
                shape: Sequence[int], seed: int = 0) -> dict[str, float]:
    """Check a plan against ONNX Runtime (CPU) running the ONNX model it was built from.

    Takes the plan, the ONNX bytes, the ONNX file's name (for messages), the plan's batch sizes,
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
        return compare(runner, reference, [feeds], reference.outputs, rtol=TOLERANCE["fp16" if fp16 else "fp32"],
                       what=f"TensorRT plan of {name}", against="ONNX Runtime")
    except RunnerError as e:
        raise CompileError(f"{name}: {e}") from None

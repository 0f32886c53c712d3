"""TensorRT plans built from the emitted ONNX models (TensorRT 10 Python API), and a minimal runner
used to verify them against ONNX Runtime. GPU only: without CUDA or the `tensorrt` package every
entry point raises CompileError saying so."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from dagc.errors import CompileError
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


def run_plan(plan: bytes, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a plan once on host arrays (through PyTorch CUDA tensors); returns outputs by name."""
    _require()
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise CompileError("TensorRT could not deserialize the plan (built for another GPU or version?)")
    context = engine.create_execution_context()
    keep = {}
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            t = torch.from_numpy(np.ascontiguousarray(inputs[name], dtype=np.float32)).cuda()
            context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, t.data_ptr())
            keep[name] = t
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            t = torch.empty(tuple(context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
            context.set_tensor_address(name, t.data_ptr())
            outputs[name] = t
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise CompileError("TensorRT execution failed")
    stream.synchronize()
    return {k: v.cpu().numpy() for k, v in outputs.items()}

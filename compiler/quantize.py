"""Reduced-precision ONNX models: int8 QDQ (ONNX Runtime static quantization) and fp16.

int8: per-channel int8 weights and int8 activations in the QDQ format (QuantizeLinear /
DequantizeLinear pairs around each quantized op), the explicit-quantization form that ONNX Runtime
runs with its int8 kernels and TensorRT builds INT8 engines from. Activation ranges come from
``batches`` batches of the run's own training data (`calibration_feeds`: the dataset and its
configuration are recorded in the checkpoint), drawn by a seeded generator, so the same checkpoint
and seed give byte-identical QDQ files (tests/test_precision.py).

The settings (`INT8`) were chosen by measurement on the default synthetic run's shared model
(2-core AMD EPYC, ONNX Runtime 1.32, 1 thread, batch 8, 8 calibration batches of 16, 512
held-out scenes; 2026-12-01; machine shared with other jobs, so the times are +-15%):

    activations  method      pre-process  calibrate  p50 (fp32 3.14 ms)  worst primary-metric drop
    QUInt8       MinMax      no           0.6 s      2.30 ms (1.36x)     +0.05% (normal)
    QInt8        MinMax      no           0.6 s      5.94 ms (0.53x)     +0.05%
    QUInt8       MinMax      yes          1.2 s      2.35 ms (1.33x)     +0.05%
    QUInt8       Entropy     no           1.1 s      2.54 ms (1.23x)     +0.05%
    QUInt8       Percentile  no           1.0 s      2.48 ms (1.27x)     +0.07%

- activations QUInt8: u8 activations x s8 weights is the fast path of ONNX Runtime's x86 int8
  kernels; QInt8 activations run slower than fp32 here.
- calibration MinMax: Entropy and Percentile were no better on the task metrics and calibrate
  about twice as long (the speed differences between them are within the noise).
- no `quant_pre_process` (symbolic shape inference + ORT optimisation): no change in speed or
  metrics on these already folded graphs, and without it the node names stay those of the
  emitted graph, which the fallbacks name.

With ``--target tensorrt`` the int8 files are written in TensorRT's form instead (`for_tensorrt`:
signed symmetric activations, `dagc.compiler.tensorrt.TRT_QDQ_OPTIONS`), since TensorRT refuses
unsigned zero points; the accuracy check then runs on that form.

Fallbacks (`FALLBACKS`, tried in order by `dagc.compiler.precision` when a task's metric drops
too much): ``none`` quantizes every Conv; ``first-conv`` keeps the convs that read a model input
(the read-in edges) in fp32; ``heads`` keeps each head's last convs (those that produce an output
with no other conv after them) in fp32; ``first-conv+heads`` both.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from dagc.compiler.tensorrt import TRT_QDQ_OPTIONS
from dagc.errors import CompileError, ConfigError, DataError
from dagc.trainer.batches import load_data
from dagc.trainer.config import TrainConfig

__all__ = ["INT8", "FALLBACKS", "Int8Settings", "calibration_feeds", "excluded_nodes", "quantize_int8",
           "load_run_data", "for_tensorrt"]

FALLBACKS = ("none", "first-conv", "heads", "first-conv+heads")
_WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Int8Settings:
    """How int8 models are quantized: activation type, calibration method, pre-processing, whether
    in TensorRT's form (``symmetric``: signed int8 activations and weights with zero points 0, no
    int32 biases, `dagc.compiler.tensorrt.TRT_QDQ_OPTIONS`), and the calibration data
    (``batches`` batches of ``batch_size`` training samples, drawn with ``seed``)."""

    activations: str = "QUInt8"
    weights: str = "QInt8"
    method: str = "MinMax"
    per_channel: bool = True
    preprocess: bool = False
    batches: int = 8
    batch_size: int = 16
    seed: int = 0
    symmetric: bool = False


INT8 = Int8Settings()


def load_run_data(ck, data_root: str | None = None):
    """The dataset a checkpoint was trained on, rebuilt from its recorded configuration (with
    ``data_root`` in place of the recorded root for on-disk datasets). Returns the
    `dagc.trainer.data.MultiTaskData`. Raises CompileError when the checkpoint records no
    configuration, ConfigError / DataError when the data cannot be read."""
    cfg = ck.json("config", None)
    if not isinstance(cfg, dict) or "dataset" not in cfg:
        raise CompileError("the checkpoint records no training configuration, so there is no data to calibrate "
                           "and check reduced precisions on; compile it with --precision fp32 or retrain it with "
                           "dagc train")
    if data_root is not None:
        cfg = {**cfg, "data_root": str(data_root)}
    try:
        config = TrainConfig.from_dict(cfg)
    except ConfigError as e:
        raise ConfigError(f"the checkpoint's training data: {e} (give --data-root for an on-disk dataset)") from None
    except TypeError as e:
        raise CompileError(f"the checkpoint's training configuration is malformed ({e})") from None
    return load_data(config)


def calibration_feeds(data, inputs: Sequence[str], task_inputs: Mapping[str, str],
                      settings: Int8Settings = INT8) -> list[dict[str, np.ndarray]]:
    """``settings.batches`` feed dicts (input name -> float32 (batch, C, H, W)) of training samples
    drawn with ``settings.seed``, for the model inputs ``inputs``; ``task_inputs`` maps each task
    to its input (datasets with one input per task draw from that task's images)."""
    rng = np.random.default_rng(settings.seed)
    train = data.train
    feeds = []
    for _ in range(settings.batches):
        feed = {}
        for name in inputs:
            if isinstance(train.inputs, np.ndarray):
                arr = train.inputs
            else:
                arr = train.inputs[next(t for t, i in task_inputs.items() if i == name)]
            idx = np.sort(rng.choice(len(arr), size=min(settings.batch_size, len(arr)), replace=False))
            feed[name] = np.ascontiguousarray(arr[idx], dtype=np.float32)
        feeds.append(feed)
    return feeds


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _first_convs(model: onnx.ModelProto) -> set[str]:
    """Weight ops whose data input comes from a model input through no other weight op."""
    inputs = {i.name for i in model.graph.input}
    prod = _producers(model)

    def reaches_input(tensor: str, seen: set) -> bool:
        if tensor in inputs:
            return True
        node = prod.get(tensor)
        if node is None or node.name in seen or node.op_type in _WEIGHT_OPS:
            return False
        seen.add(node.name)
        return any(reaches_input(t, seen) for t in node.input if t)

    return {n.name for n in model.graph.node if n.op_type in _WEIGHT_OPS and reaches_input(n.input[0], set())}


def _last_convs(model: onnx.ModelProto) -> set[str]:
    """Weight ops reached from a model output walking back through no other weight op."""
    prod = _producers(model)
    found: set[str] = set()
    stack = [o.name for o in model.graph.output]
    seen: set[str] = set()
    while stack:
        node = prod.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in _WEIGHT_OPS:
            found.add(node.name)
        else:
            stack.extend(t for t in node.input if t)
    return found


def excluded_nodes(model: onnx.ModelProto, fallback: str) -> list[str]:
    """The node names a fallback keeps in fp32 (sorted). Raises ValueError for an unknown one."""
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; choose one of {list(FALLBACKS)}")
    out: set[str] = set()
    if "first-conv" in fallback:
        out |= _first_convs(model)
    if "heads" in fallback:
        out |= _last_convs(model)
    return sorted(out)


class _Reader:
    """The feeds as ONNX Runtime's CalibrationDataReader wants them (``get_next`` until None)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], inputs: Sequence[str]) -> None:
        self._it: Iterator = iter([{i: f[i] for i in inputs} for f in feeds])

    def get_next(self):
        return next(self._it, None)


def quantize_int8(model: bytes, feeds: Sequence[Mapping[str, np.ndarray]], *, settings: Int8Settings = INT8,
                  exclude: Sequence[str] = ()) -> bytes:
    """The int8 QDQ form of an fp32 ONNX model (serialized), calibrated on ``feeds`` (dicts holding
    at least the model's inputs), with the nodes ``exclude`` kept in fp32. Deterministic: the same
    model, feeds and settings give the same bytes. Raises CompileError if ONNX Runtime fails."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    proto = onnx.load_from_string(model)
    inputs = [i.name for i in proto.graph.input]
    with tempfile.TemporaryDirectory(prefix="dagc-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        if settings.preprocess:
            quant_pre_process(proto, str(src), skip_symbolic_shape=False)
        else:
            src.write_bytes(model)
        # ONNX Runtime's quantizer logs advice through the root logger (which would print it on
        # stderr, under dagc's one-line errors); dagc records its choices in the manifest instead.
        logging.disable(logging.WARNING)
        try:
            quantize_static(str(src), str(dst), _Reader(feeds, inputs), quant_format=QuantFormat.QDQ,
                            per_channel=settings.per_channel, activation_type=getattr(QuantType, settings.activations),
                            weight_type=getattr(QuantType, settings.weights), nodes_to_exclude=list(exclude),
                            op_types_to_quantize=None, calibrate_method=getattr(CalibrationMethod, settings.method),
                            calibration_providers=["CPUExecutionProvider"],
                            extra_options=dict(TRT_QDQ_OPTIONS) if settings.symmetric else {})
        except (ValueError, RuntimeError) as e:
            raise CompileError(f"int8 quantization failed: {e}") from None
        finally:
            logging.disable(logging.NOTSET)
        out = onnx.load(str(dst))
    _strip_metadata(out)
    return out.SerializeToString()


def _strip_metadata(model: onnx.ModelProto) -> None:
    """Drop what would make the bytes depend on where or when they were made (none expected, but
    quantization tools have added producer fields and paths before)."""
    del model.metadata_props[:]
    model.producer_name = "dagc"
    model.producer_version = ""


def for_tensorrt(settings: Int8Settings) -> Int8Settings:
    """``settings`` in the form TensorRT imports (signed symmetric activations; ONNX Runtime's CPU
    kernels run it slower than the default uint8 form, measured above)."""
    return replace(settings, activations="QInt8", weights="QInt8", symmetric=True)


def with_settings(settings: Int8Settings, **changes) -> Int8Settings:
    """``settings`` with ``changes`` (batches, seed...). Raises DataError for a non-positive count."""
    new = replace(settings, **changes)
    if new.batches < 1 or new.batch_size < 1:
        raise DataError(f"--calibration-batches must be a positive integer, got {new.batches}")
    return new

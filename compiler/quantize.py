"""Reduced-precision ONNX models: int8 QDQ (ONNX Runtime static quantization) and fp16.

int8: per-channel int8 weights and int8 activations in the QDQ format (QuantizeLinear /
DequantizeLinear pairs around each quantized op), the explicit-quantization form that ONNX Runtime
runs with its int8 kernels and TensorRT builds INT8 engines from. Activation ranges come from
``batches`` batches of the run's own training data (`calibration_feeds`: the dataset and its
configuration are recorded in the checkpoint), drawn by a seeded generator, so the same checkpoint
and seed give byte-identical QDQ files (tests/test_precision.py).

The settings (`INT8`) were chosen by measurement on the default synthetic run's shared model
(2-core Intel Xeon, ONNX Runtime 1.32, 1 thread, batch 8, 8 calibration batches of 16, 512
held-out scenes; 2026-12-01; machine shared with other jobs, so the times are +-15%):

    activations  method      pre-process  calibrate  p50 (fp32 3.14 ms)  worst primary-metric drop
    QUInt8       MinMax      no           0.6 s      2.30 ms (1.36x)     +0.05% (normal)
    QInt8        MinMax      no           0.6 s      5.94 ms (0.53x)     +0.05%
    QUInt8       MinMax      yes          1.2 s      2.35 ms (1.33x)     +0.05%
    QUInt8       Entropy     no           1.1 s      2.54 ms (1.23x)     +0.05%
    QUInt8       Percentile  no           1.0 s      2.48 ms (1.27x)     +0.07%

- activations QUInt8: u8 activations x s8 weights is the fast path of ONNX Runtime's x86 int8
  kernels; QInt8 activations run slower than fp32 here.
- calibration MinMax (``--calibration``'s default, `CALIBRATIONS`): Percentile was no better on the
  task metrics and calibrates twice as long. The Entropy row was ONNX Runtime's own entropy
  calibrator, which gave min-max's ranges byte for byte (its bins cannot be set through
  quantize_static); ``--calibration entropy`` now runs `dagc.compiler.calibration`'s KL search (not timed here).
- no `quant_pre_process` (shape inference + ORT optimisation): no change in speed or metrics on
  these folded graphs, and the node names stay those of the emitted graph, which fallbacks name.

Then the graph around the convs, measured on the same machine nearly idle (load average 0.4-0.6;
Intel Xeon, AVX512-VNNI, AMX) on 2026-12-02, same model and settings, each variant timed
alternately in one process against the fp32 model at batch 8 (30 rounds of 5 calls, median
per-round ratio; fp32 3.9-4.2 ms at 1 thread, 3.3 ms at 2; two runs where a range is shown; the
per-op times below are from ONNX Runtime's profiler):

    variant (QUInt8, MinMax, per-channel)             1 thread   2 threads  worst drop
    every Conv quantized (the former default)         1.41x      1.04-1.12x +0.05%
    + read-in convs (Cin = 3) kept in fp32            1.48-1.53x 1.18x      +0.08%
    + AveragePool folded into the next 1x1 conv        1.58-1.68x 1.23x      +0.04%
    + ASPP Sum of 1x1 convs merged (the default)       1.62-1.63x 1.27-1.31x +0.14%
    on the former default: per-tensor weights 1.33x, ForceQuantizeNoInputCheck 1.46x, Sum -> Add
    chain 1.31x, the heads' last 1x1 convs in fp32 1.29x (drops within +0.23%); QInt8
    activations with session.qdqisint8allowed=1 about 0.2x (profiled: its s8s8 QLinearConv is
    10x slower than u8s8 here; without the option ORT leaves a third of the convs in fp32)

- read-in convs in fp32 (`narrow_read_ins`): a 3-channel input into 16 channels makes a poor int8
  GEMM (K = 27, N = 16) plus a transpose to NHWC: 0.27 ms int8 against 0.11 ms fp32 each. Wide
  ones stay int8: on the vgg16 run (read-ins 3->64 and 3->256) fp32 read-ins cost 1.75x -> 1.63x.
- `fold_pools`: QLinearAveragePool took 0.27 ms of the 2.9 ms call (fp32 pool 0.02 ms); folded: ~0.
- `merge_sums`: each of the 16 head outputs became QLinearConv + NHWC->NCHW Transpose +
  DequantizeLinear before the Sum, 0.03 ms per 3- or 5-channel transpose at 2 threads.
- 2 threads stay below 1.5x: the int8 model runs as fast on 1 thread as on 2 (2.60 / 2.61 ms),
  while the fp32 NCHWc convs gain 20% from the second core; dagc's sessions do not spin their
  workers (`dagc.runners.session_options`), and with spinning both got slower on this machine.

With ``--target tensorrt`` the int8 files are written in TensorRT's form instead (`for_tensorrt`:
signed symmetric activations, `dagc.compiler.tensorrt.TRT_QDQ_OPTIONS`), since TensorRT refuses
unsigned zero points; the accuracy check then runs on that form.

Before quantizing, `quantize_int8` applies the speed rules above: `narrow_read_ins` (read-in
convs with at most `NARROW_READ_IN` output channels) stay fp32 (ONNX Runtime's form only), and
`fold_pools` / `merge_sums` rewrite the graph into the same function with fewer, cheaper int8
ops. When a task's metric drops too much, `dagc.compiler.mixed_precision` keeps nodes in fp32, by
measured sensitivity, then by `FALLBACKS`: ``first-conv`` (every conv reading a model input),
``heads`` (convs with no other conv between them and an output), ``first-conv+heads``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from dagc.compiler.calibration import Reader, entropy_ranges
from dagc.compiler.tensorrt import TRT_QDQ_OPTIONS
from dagc.errors import CheckpointError, CompileError, DataError
from dagc.precision_table import INT8 as INT8_NAME
from dagc.precision_table import TABLE
from dagc.precisions import Calibration
from dagc.trainer.batches import run_data

__all__ = ["INT8", "FALLBACKS", "CALIBRATIONS", "prepared", "Int8Settings", "calibration_feeds", "excluded_nodes",
           "fold_pools", "merge_sums", "narrow_read_ins", "quantize_int8", "load_run_data", "for_tensorrt"]

FALLBACKS = TABLE[INT8_NAME].fallbacks
CALIBRATIONS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}  # -> CalibrationMethod
# Speed rules for ONNX Runtime's CPU int8 kernels, measured (module docstring): a read-in conv
# with at most this many output channels stays fp32; a pool folds into a 1x1 conv with at most
# this many output channels (the folded conv does that many MACs per pooled input element).
NARROW_READ_IN = 32
FOLD_MAX_OUT = 64
_WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


Int8Settings = Calibration  # the former name of the one settings type (`dagc.precisions.Calibration`)
INT8 = Calibration()


def load_run_data(ck, data_root: str | None = None):
    """`dagc.trainer.batches.run_data` for the precision checks: raises CompileError (pointing at
    --precision fp32) when the checkpoint records no training configuration."""
    try:
        return run_data(ck, data_root)
    except CheckpointError as e:
        raise CompileError(f"{e}: there is no data to calibrate and check reduced precisions on; compile it "
                           "with --precision fp32 or retrain it with dagc train") from None


def calibration_feeds(data, inputs: Sequence[str], task_inputs: Mapping[str, str],
                      settings: Calibration = INT8) -> list[dict[str, np.ndarray]]:
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


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def fold_pools(model: onnx.ModelProto, max_out: int = FOLD_MAX_OUT) -> int:
    """Fold each AveragePool (kernel = stride, no padding) whose only reader is a 1x1 Conv into that
    conv, in place: one Conv with kernel and stride k whose weights are the 1x1 weights / (k*k)
    tiled, exactly the same function. ONNX Runtime runs the int8 AveragePool far slower than the
    fp32 one (QLinearAveragePool: 0.27 ms of a 2.9 ms batch-8 call on the default run's shared
    model); the folded conv costs about nothing when it is narrow (at most ``max_out`` output
    channels; on vgg16's 256-channel convs it cost more than the pool). The conv keeps its name.
    Returns how many folded."""
    from onnx import numpy_helper

    init = {i.name: i for i in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    folded = set()
    for pool in model.graph.node:
        if pool.op_type != "AveragePool":
            continue
        pa = _attrs(pool)
        k = list(pa.get("kernel_shape", []))
        if (len(k) != 2 or list(pa.get("strides", [1, 1])) != k or any(pa.get("pads", [0])) or pa.get("ceil_mode", 0)
                or pa.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID") or any(d != 1 for d in pa.get("dilations", [1]))):
            continue
        conv = readers.get(pool.output[0], [])
        if len(conv) != 1 or conv[0].op_type != "Conv" or conv[0].input[1] not in init or len(readers[conv[0].input[1]]) != 1:
            continue
        conv, ca = conv[0], _attrs(conv[0])
        w = numpy_helper.to_array(init[conv.input[1]])
        if (w.ndim != 4 or w.shape[2:] != (1, 1) or w.shape[0] > max_out or ca.get("group", 1) != 1 or any(ca.get("pads", [0]))
                or any(v != 1 for v in ca.get("strides", [1])) or ca.get("auto_pad", b"NOTSET") != b"NOTSET"):
            continue
        tiled = (np.tile(w, (1, 1, *k)) / float(k[0] * k[1])).astype(w.dtype)
        init[conv.input[1]].CopyFrom(numpy_helper.from_array(tiled, conv.input[1]))
        conv.input[0] = pool.input[0]
        del conv.attribute[:]
        conv.attribute.extend([onnx.helper.make_attribute("kernel_shape", k), onnx.helper.make_attribute("strides", k)])
        folded.add(id(pool))
    keep = [n for n in model.graph.node if id(n) not in folded]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return len(folded)


def _plain_1x1(conv: onnx.NodeProto, init: Mapping, readers: Mapping) -> bool:
    """A Conv with 1x1 weights held in an initializer that only it reads, group 1, stride 1, no pad."""
    a = _attrs(conv)
    w = init.get(conv.input[1]) if len(conv.input) > 1 else None
    return (w is not None and len(readers[conv.input[1]]) == 1 and list(w.dims[2:]) == [1, 1]
            and a.get("group", 1) == 1 and not any(a.get("pads", [0])) and all(v == 1 for v in a.get("strides", [1]))
            and a.get("auto_pad", b"NOTSET") == b"NOTSET"
            and (len(conv.input) < 3 or not conv.input[2] or conv.input[2] in init))


def merge_sums(model: onnx.ModelProto, keep: Sequence[str] = ()) -> int:
    """Replace, in place, each Sum of 1x1 convs (the ASPP heads' branch outputs) by one 1x1 conv
    over the Concat of the convs' inputs (weights concatenated along the input channels, biases
    summed): the same function with one quantized conv, one Concat and no Sum instead of four
    convs and the dequantize / transpose ONNX Runtime puts after each (about 5% of the int8 call
    at batch 8). The merged conv takes the first conv's name; a Sum any of whose convs is in
    ``keep`` (kept in fp32 by a fallback) is left alone. Returns how many Sums were merged."""
    from onnx import numpy_helper, shape_inference

    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in shape_inference.infer_shapes(model).graph.value_info}
    init = {i.name: i for i in model.graph.initializer}
    prod = _producers(model)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    gone: set[int] = set()
    old: set[str] = set()
    for total in model.graph.node:
        convs = [prod.get(t) for t in total.input]
        if (total.op_type != "Sum" or len(convs) < 2 or len({id(c) for c in convs}) != len(convs)
                or not all(c is not None and c.op_type == "Conv" and len(readers[c.output[0]]) == 1
                           and c.name not in keep and _plain_1x1(c, init, readers) for c in convs)
                or len({init[c.input[1]].dims[0] for c in convs}) != 1
                or len({str(shapes.get(t)) for t in total.input}) != 1 or total.input[0] not in shapes):
            continue
        w = np.concatenate([numpy_helper.to_array(init[c.input[1]]) for c in convs], axis=1)
        b = sum((numpy_helper.to_array(init[c.input[2]]) for c in convs if len(c.input) > 2 and c.input[2]),
                np.zeros(w.shape[0], w.dtype))
        first = convs[0]
        cat = onnx.helper.make_node("Concat", [c.input[0] for c in convs], [f"{total.output[0]}/concat"],
                                    name=f"{total.name}/concat", axis=1)
        wn, bn = f"{first.input[1]}/merged", f"{first.input[1]}/merged_bias"
        model.graph.initializer.extend([numpy_helper.from_array(w, wn), numpy_helper.from_array(b.astype(w.dtype), bn)])
        conv = onnx.helper.make_node("Conv", [cat.output[0], wn, bn], [total.output[0]], name=first.name,
                                     kernel_shape=[1, 1])
        gone |= {id(c) for c in convs}
        old |= {t for c in convs for t in c.input[1:]}
        replaced[id(total)] = [cat, conv]
    nodes = [m for n in model.graph.node if id(n) not in gone for m in replaced.get(id(n), [n])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {t for n in nodes for t in n.input}
    kept = [i for i in model.graph.initializer if i.name in used or i.name not in old]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return len(replaced)


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


def narrow_read_ins(model: onnx.ModelProto, max_out: int = NARROW_READ_IN) -> list[str]:
    """The read-in convs (`excluded_nodes` ``first-conv``) with at most ``max_out`` output
    channels, which quantize_int8 keeps in fp32 for speed (sorted)."""
    init = {i.name: i for i in model.graph.initializer}
    first = _first_convs(model)
    return sorted(n.name for n in model.graph.node if n.name in first and n.input[1] in init
                  and init[n.input[1]].dims[0] <= max_out)


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


def prepared(model: bytes, settings: Calibration = INT8, exclude: Sequence[str] = ()) -> tuple[onnx.ModelProto, list[str]]:
    """The fp32 graph `quantize_int8` quantizes (the speed rules applied: pools folded, sums merged;
    node names kept) and every node it keeps in fp32 (``exclude`` and the narrow read-ins)."""
    proto = onnx.load_from_string(model)
    if not settings.symmetric:  # TensorRT's form: its own kernels, not measured here
        exclude = sorted({*exclude, *narrow_read_ins(proto)})
    fold_pools(proto)
    merge_sums(proto, keep=exclude)
    return proto, sorted(exclude)


def quantize_int8(model: bytes, feeds: Sequence[Mapping[str, np.ndarray]], *, settings: Calibration = INT8,
                  exclude: Sequence[str] = ()) -> bytes:
    """The int8 QDQ form of an fp32 ONNX model (serialized), calibrated on ``feeds`` (dicts holding
    at least the model's inputs), with the nodes ``exclude`` kept in fp32. Deterministic: the same
    model, feeds and settings give the same bytes. Raises CompileError if ONNX Runtime fails."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    proto, exclude = prepared(model, settings, exclude)
    inputs = [i.name for i in proto.graph.input]
    with tempfile.TemporaryDirectory(prefix="dagc-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        if settings.preprocess:
            quant_pre_process(proto, str(src), skip_symbolic_shape=False)
        else:
            onnx.save(proto, str(src))
        # ONNX Runtime's quantizer logs advice through the root logger (stderr, under dagc's one-line
        # errors) and its histogram calibrators print progress (stdout, in the compile summary);
        # dagc records its choices in the manifest instead.
        logging.disable(logging.WARNING)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                cache = entropy_ranges(src, Reader(feeds, inputs), Path(tmp)) if settings.method == "Entropy" else None
                quantize_static(str(src), str(dst), Reader(feeds, inputs), quant_format=QuantFormat.QDQ,
                                per_channel=settings.per_channel, activation_type=getattr(QuantType, settings.activations),
                                weight_type=getattr(QuantType, settings.weights), nodes_to_exclude=list(exclude),
                                op_types_to_quantize=None, calibrate_method=getattr(CalibrationMethod, settings.method),
                                calibration_providers=["CPUExecutionProvider"],
                                extra_options=dict(TRT_QDQ_OPTIONS) if settings.symmetric else {},
                                calibration_cache_path=cache)
        except (ValueError, RuntimeError) as e:
            raise CompileError(f"int8 quantization failed: {e}") from None
        finally:
            logging.disable(logging.NOTSET)
        out = onnx.load(str(dst))
    _strip_metadata(out)
    return out.SerializeToString()


def _strip_metadata(model: onnx.ModelProto) -> None:
    """Drop what would make the bytes depend on where or when they were made (tools have added paths)."""
    del model.metadata_props[:]
    model.producer_name = "dagc"
    model.producer_version = ""


def for_tensorrt(settings: Calibration) -> Calibration:
    """``settings`` in the form TensorRT imports (signed symmetric activations; ONNX Runtime's CPU
    kernels run it slower than the default uint8 form, measured above)."""
    return replace(settings, activations="QInt8", weights="QInt8", symmetric=True)


def with_settings(settings: Calibration, **changes) -> Calibration:
    """``settings`` with ``changes`` (batches, seed...). Raises DataError for a count that is not a
    positive integer or a seed that is not a non-negative integer."""
    new = replace(settings, **changes)
    if new.method not in CALIBRATIONS.values():
        raise DataError(f"--calibration must be one of {list(CALIBRATIONS)}, got {new.method!r}")
    for option, value, low in (("--calibration-batches", new.batches, 1), ("--calibration-seed", new.seed, 0),
                               ("the calibration batch size", new.batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            kind = "a positive" if low else "a non-negative"
            raise DataError(f"{option} must be {kind} integer, got {value!r}")
    return new

"""Ways of executing a model, one protocol for all of them, and the one comparison every
verification uses.

`Runner` is what every execution back end offers: the input names it reads, the output (task)
names it computes, and ``run(feeds, outputs=None)``, numpy arrays in and out. Implemented here for
ONNX Runtime (`OrtRunner`), OpenVINO Runtime (`OvRunner`) and TensorRT plans (`TrtRunner`), in `dagc.compiler.runners` for the
masked supernet, the lowered module and AOTInductor packages, and in `dagc.runtime.torch_backend`
for the PyTorch interpreter of the emitted ONNX. `compare` runs a runner and a reference on the
same inputs and refuses outputs that differ by more than a tolerance relative to the output scale
(`relative_error`).

These sit in the core because both the compiler (which verifies with them) and the runtime (which
serves with them) need them, and neither may import the other. ``onnxruntime``, ``openvino``,
``tensorrt`` and ``torch`` are imported only when a runner that needs them is created: the core imports without
them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from dagc.errors import CompileError, DagcError, RunnerError
from dagc.precision_table import REFERENCE, TABLE

__all__ = ["Runner", "OrtRunner", "OvRunner", "TrtRunner", "openvino_unavailable", "compare", "relative_error",
           "ort_providers", "session_options", "tensorrt_unavailable", "tensorrt_major", "TENSORRT_MAJORS"]


@runtime_checkable
class Runner(Protocol):
    """A model that can be run: ``inputs`` (the input names it reads, in its order), ``outputs``
    (the output names it computes, task names in dagc, in its order) and ``run``."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run on ``feeds`` (input name -> float32 array (batch, C, H, W); holds at least
        ``inputs``) and return output name -> array for ``outputs`` (default: all), in that order."""
        ...


# ---------------------------------------------------------------------------------------------------
# ONNX Runtime


def session_options(threads: int | None = None):
    """ONNX Runtime session options used everywhere in dagc: quiet, ``threads`` intra-op threads if
    given, and no busy-waiting worker threads (on small machines spinning workers steal the cores
    from everything else, the PyTorch reference included)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


ORT_DEVICES = ("auto", "cpu", "cuda")


def ort_providers(device: str = "auto") -> list[str]:
    """ONNX Runtime execution providers for ``device``, CPUExecutionProvider last: ``auto`` puts
    TensorrtExecutionProvider and CUDAExecutionProvider first when the installed ONNX Runtime offers
    them, ``cuda`` only CUDAExecutionProvider (when offered), ``cpu`` none. Raises ValueError for
    another device."""
    import onnxruntime as ort

    if device not in ORT_DEVICES:
        raise ValueError(f"unknown ONNX Runtime device {device!r}; choose one of {list(ORT_DEVICES)}")
    gpu = {"auto": ("TensorrtExecutionProvider", "CUDAExecutionProvider"), "cuda": ("CUDAExecutionProvider",),
           "cpu": ()}[device]
    available = ort.get_available_providers()
    return [p for p in gpu if p in available] + ["CPUExecutionProvider"]


class OrtRunner:
    """An ONNX model in an ONNX Runtime session: the only place dagc creates one.

    Takes the serialized model, the intra-op thread count (None: ONNX Runtime's default), the
    device (`ort_providers`) and optionally ``configure(session_options)``, which changes dagc's
    `session_options` before the session is made (another configuration of the same runtime, for
    a runtime backend record: `dagc.runtime.backends.Backend`). With ``auto`` a GPU provider that
    fails to initialise falls back to the CPU; with ``cuda`` or ``cpu`` a failure is raised (ONNX
    Runtime's own exception, as for an unreadable model). `run` is thread-safe (``InferenceSession.run`` is).
    """

    def __init__(self, model: bytes, *, threads: int | None = None, device: str = "auto",
                 configure: Callable[[Any], None] | None = None) -> None:
        import onnxruntime as ort

        opts = session_options(threads)
        if configure is not None:
            configure(opts)
        providers = ort_providers(device)
        try:
            self.session = ort.InferenceSession(model, opts, providers=providers)
        except Exception:  # noqa: BLE001 - a GPU provider that fails to initialise: run on the CPU
            if device != "auto" or providers == ["CPUExecutionProvider"]:
                raise
            self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        self.inputs = tuple(i.name for i in self.session.get_inputs())
        self.outputs = tuple(o.name for o in self.session.get_outputs())

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """See `Runner.run`; ``feeds`` must hold exactly the model's inputs (ONNX Runtime refuses
        others)."""
        names = self.outputs if outputs is None else outputs
        return dict(zip(names, self.session.run(names, feeds)))


# ---------------------------------------------------------------------------------------------------
# OpenVINO

# dagc precision -> OpenVINO INFERENCE_PRECISION_HINT (`dagc.precision_table`); the precisions
# with files of their own (int8 QDQ, fp16) run at the reference's
OV_PRECISIONS = {p.name: p.openvino[0] for p in TABLE.values() if p.openvino is not None}


def _ov_inference(precision: str) -> tuple[str, str | None]:
    spec = TABLE[precision]
    return spec.openvino or TABLE[REFERENCE].openvino


def openvino_unavailable(precision: str = REFERENCE) -> str | None:
    """None when OpenVINO can run ``precision`` (bf16 only where the CPU has bf16 support) here;
    otherwise why not, in one sentence."""
    try:
        import openvino as ov
    except ImportError:
        return "backend 'openvino' needs the openvino package; install dagc[cpu] (or pip install openvino)"
    need = _ov_inference(precision)[1] if precision in TABLE else None
    if need is not None and need not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return (f"this CPU has no {precision} support in OpenVINO (no {need} capability: AVX512-BF16 / AMX); use "
                f"precision {REFERENCE!r}")
    return None


class OvRunner:
    """An ONNX model compiled by OpenVINO Runtime for the CPU.

    Takes the serialized ONNX model, the intra-op thread count (None: OpenVINO's default) and the
    precision (`dagc.precision_table`): ``fp32`` (INFERENCE_PRECISION_HINT f32, OpenVINO's own
    default on bf16-capable CPUs being bf16), ``bf16``, or one with files of its own (int8 QDQ,
    fp16), whose files run at f32. Each calling thread gets its own infer request, so `run` is
    thread-safe. Raises RunnerError if OpenVINO cannot read or compile the model.
    """

    def __init__(self, model: bytes, *, threads: int | None = None, precision: str = REFERENCE) -> None:
        import io

        import openvino as ov

        if precision not in TABLE:
            raise RunnerError(f"OpenVINO runs precisions {list(TABLE)}, not {precision!r}")
        config = {"INFERENCE_PRECISION_HINT": _ov_inference(precision)[0]}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            core = ov.Core()
            self.compiled = core.compile_model(core.read_model(io.BytesIO(model)), "CPU", config)
        except RuntimeError as e:
            raise RunnerError(f"OpenVINO could not compile the model: {str(e).splitlines()[0]}") from None
        self.inputs = tuple(i.get_any_name() for i in self.compiled.inputs)
        self.outputs = tuple(o.get_any_name() for o in self.compiled.outputs)
        self._by_name = {o.get_any_name(): o for o in self.compiled.outputs}
        self.local = threading.local()

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """See `Runner.run`; reads the model's inputs from ``feeds``."""
        request = getattr(self.local, "request", None)
        if request is None:
            request = self.local.request = self.compiled.create_infer_request()
        names = self.outputs if outputs is None else tuple(outputs)
        result = request.infer({i: feeds[i] for i in self.inputs})
        return {t: np.array(result[self._by_name[t]], dtype=np.float32) for t in names}


# ---------------------------------------------------------------------------------------------------
# TensorRT


TENSORRT_MAJORS = (10, 11)  # the TensorRT versions whose API dagc uses (the tensor I/O API, strong typing)


def tensorrt_major(version: str) -> int:
    """The major version of a TensorRT version string (``"10.9.0.34"`` -> 10); 0 when unreadable."""
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def tensorrt_unavailable(what: str = "--target tensorrt", instead: str = "compile with --target onnx") -> str | None:
    """None when TensorRT can build and run here; otherwise why not, as one sentence naming
    ``what`` needs it and what to do ``instead``: no CUDA GPU, no ``tensorrt`` package (whose
    libraries come from NVIDIA's package index, see the README), or a TensorRT older than 10."""
    import torch

    if not torch.cuda.is_available():
        return f"{what} needs a CUDA GPU and none is available here; {instead}"
    try:
        import tensorrt
    except ImportError:
        return f"{what} needs the tensorrt package; install dagc[gpu] or {instead}"
    version = str(getattr(tensorrt, "__version__", "?"))
    if tensorrt_major(version) < TENSORRT_MAJORS[0]:
        return f"{what} needs TensorRT 10 or newer and {version} is installed; upgrade tensorrt or {instead}"
    return None


def _torch_dtype(trt_dtype):
    """The torch dtype of a TensorRT I/O tensor type; RunnerError for one dagc never binds."""
    import tensorrt as trt
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if trt_dtype not in table:
        raise RunnerError(f"the plan has an I/O tensor of type {trt_dtype}, which dagc cannot bind")
    return table[trt_dtype]


class TrtRunner:
    """A deserialised TensorRT plan, run through PyTorch CUDA tensors, with the name-based tensor
    I/O API that TensorRT 10 and 11 share (``set_input_shape``, ``set_tensor_address``,
    ``execute_async_v3``).

    Takes the plan bytes and the batch sizes its optimisation profile was built for (the profile
    covers ``min(batches)..max(batches)``). Each calling thread gets its own execution context and
    CUDA stream, so `run` is thread-safe; a batch beyond the profile runs in chunks of the largest
    batch, a chunk below the smallest is zero-padded up to it. Feeds and results are float32
    arrays; each I/O tensor is bound in the type the plan declares (float32 for dagc's plans,
    whose fp16 and int8 models keep float32 inputs and outputs) and converted. Raises RunnerError
    if the plan cannot be deserialised (built for another GPU or TensorRT version); the caller
    checks `tensorrt_unavailable` first.
    """

    def __init__(self, plan: bytes, batches: Sequence[int] = (1,)) -> None:
        import tensorrt as trt

        # The runtime (and its logger) must outlive the engine it deserialised.
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RunnerError("TensorRT could not deserialize the plan (built for another GPU or TensorRT version?)")
        self.lo, self.hi = int(min(batches)), int(max(batches))
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode
        self.inputs = tuple(n for n in names if self.engine.get_tensor_mode(n) == mode.INPUT)
        self.outputs = tuple(n for n in names if self.engine.get_tensor_mode(n) == mode.OUTPUT)
        self.dtypes = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.local = threading.local()

    def _state(self):
        import torch

        st = getattr(self.local, "state", None)
        if st is None:
            context = self.engine.create_execution_context()
            if context is None:
                raise RunnerError("TensorRT could not create an execution context (out of GPU memory?)")
            st = self.local.state = (context, torch.cuda.Stream())
        return st

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """See `Runner.run`. Raises RunnerError if TensorRT reports a failed execution."""
        import torch

        names = self.outputs if outputs is None else tuple(outputs)
        context, stream = self._state()
        n = next(iter(feeds.values())).shape[0]
        parts: dict[str, list[np.ndarray]] = {t: [] for t in names}
        with torch.cuda.stream(stream):
            for start in range(0, n, self.hi):
                stop = min(n, start + self.hi)
                # The input buffers stay referenced until the next chunk: the execution reads them.
                outs, _inputs = self._bind(context, feeds, start, stop)
                if not context.execute_async_v3(stream.cuda_stream):
                    raise RunnerError("TensorRT execution failed")
                for name in names:  # .cpu() copies on the current stream, after the execution
                    parts[name].append(outs[name][: stop - start].float().cpu().numpy())
        stream.synchronize()
        return {t: v[0] if len(v) == 1 else np.concatenate(v) for t, v in parts.items()}

    def _bind(self, context, feeds: Mapping[str, np.ndarray], start: int, stop: int):
        """Device buffers for rows ``start:stop`` of the inputs (padded up to the profile's smallest
        batch) and for all outputs, bound to ``context``: (outputs by name, inputs to keep alive)."""
        import torch

        size = max(stop - start, self.lo)
        keep = []
        for name in self.inputs:
            t = torch.zeros((size, *feeds[name].shape[1:]), dtype=self.dtypes[name], device="cuda")
            rows = np.ascontiguousarray(feeds[name][start:stop], dtype=np.float32)
            t[: stop - start].copy_(torch.from_numpy(rows))
            if not context.set_input_shape(name, tuple(t.shape)):
                raise RunnerError(f"input {name!r} of shape {tuple(t.shape)} is outside the plan's profile")
            context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outs = {}
        for name in self.outputs:
            t = torch.empty(tuple(context.get_tensor_shape(name)), dtype=self.dtypes[name], device="cuda")
            context.set_tensor_address(name, t.data_ptr())
            outs[name] = t
        return outs, keep


# ---------------------------------------------------------------------------------------------------
# the comparison


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max|got - ref| / max(1, max|ref|); inf when shapes differ or ``got`` is not finite."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape or not np.all(np.isfinite(got)):
        return float("inf")
    if got.size == 0:
        return 0.0
    return float(np.max(np.abs(got - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def compare(runner: Runner, reference: Runner, feeds: Iterable[Mapping[str, np.ndarray]],
            outputs: Sequence[str] | None = None, *, rtol: float, what: str, against: str = "the masked supernet",
            error: type[DagcError] = CompileError, consequence: str = "nothing was written") -> dict[str, float]:
    """Run ``runner`` and ``reference`` on every feed dict and compare their ``outputs`` (default:
    all of the runner's).

    Takes the two runners, the feed dicts (input name -> array, holding the inputs of both), the
    output names, the tolerance, what is compared and against what (for the message: "the
    {what} differs from {against}"), the error class to raise and the consequence the message ends
    with. Returns output -> worst `relative_error` over the feeds. Raises ``error`` naming the
    output if the reference does not compute it or an error exceeds ``rtol``.
    """
    names = tuple(runner.outputs if outputs is None else outputs)
    asked = tuple(t for t in names if t in reference.outputs)  # a runner may refuse names it lacks
    tail = f"; {consequence}" if consequence else ""
    worst = dict.fromkeys(names, 0.0)
    for f in feeds:
        got = runner.run(dict(f), names)
        ref = reference.run(dict(f), asked)
        for t in names:
            if t not in ref:
                raise error(f"task {t!r}: {against} computes no output for it (it has {sorted(ref)}){tail}")
            worst[t] = max(worst[t], relative_error(got[t], ref[t]))
    for t in names:
        if not worst[t] <= rtol:
            raise error(f"task {t!r}: the {what} differs from {against} by {worst[t]:.1e} (relative to the "
                        f"output scale; tolerance {rtol:.0e}){tail}")
    return worst

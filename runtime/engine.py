"""Load a compiled artifact and run any subset of its tasks: `load(artifact_dir) -> Engine`.

Backends (`BACKENDS`):

``onnxruntime``
    ONNX Runtime sessions of the artifact's ``.onnx`` files: CPUExecutionProvider, with
    TensorrtExecutionProvider / CUDAExecutionProvider put first when the installed ONNX Runtime
    offers them. Worker threads do not spin (``session.intra_op.allow_spinning = 0``): on small
    machines spinning workers steal the cores from everything else.
``tensorrt``
    The artifact's TensorRT ``.plan`` files (``dagc compile --target tensorrt``), run natively on
    the GPU (one execution context and CUDA stream per thread). Needs CUDA and the ``tensorrt``
    package.
``torch``
    The reference: a small interpreter of the ONNX operator set dagc emits (Conv, BatchNormalization,
    Relu, MaxPool, AveragePool, Resize, Sum/Add/Mul/Div, ReduceL2, Max, GlobalAveragePool, Flatten,
    Gemm, Identity, Constant) written with ``torch.nn.functional``, reading the weights from the ONNX
    initializers. An artifact holds no checkpoint, so this is how the lowered computation is
    reproduced in PyTorch; it is stateless and runs under ``torch.inference_mode``.
``auto``
    ``tensorrt`` when the artifact has plans and a CUDA GPU with TensorRT is present, else
    ``onnxruntime``.

Every model file's sha256 is checked against the manifest at load (`dagc.artifact.load_manifest`,
which gives the typed `dagc.manifest.Manifest`) and again when its session is created (lazily, on
first use, once per file). The models a task subset runs are the routes the compiler recorded in
the manifest (`dagc.routes`). `Engine.run` is safe to call from many threads at once.

Errors: `ArtifactError` (missing or tampered artifact, unknown manifest version, backend not
available) and `InputError` (bad images, unknown tasks, bad arguments); both are
`dagc.errors.DagcError`, so the CLI prints them as one line and exits with code 2.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dagc.artifact import load_manifest, read_verified
from dagc.errors import ArtifactError, DagcError, InputError
from dagc.manifest import Manifest, ModelInfo
from dagc.preprocessing import FORMULA
from dagc.runners import session_options, tensorrt_unavailable

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")

__all__ = ["load", "Engine", "ArtifactError", "InputError", "BACKENDS"]




def load(artifact_dir: str | Path, backend: str = "auto", *, threads: int | None = None,
         check_values: bool = True) -> Engine:
    """Open a compiled artifact for inference.

    Takes the artifact directory (written by ``dagc compile``), the backend (one of `BACKENDS`)
    and optionally the number of intra-op threads (ONNX Runtime sessions; for ``torch`` it sets
    ``torch.set_num_threads``, which is process-wide). ``check_values=False`` skips the scan of
    every input value (NaN/inf, far out of the preprocessed range) that `Engine.run` does by
    default; shape, dtype and task checks stay. The scan costs a pass over the batch, which is
    measurable only for sub-millisecond models (benchmarks/RESULTS.md). Verifies the manifest and every file's
    sha256 before returning. Raises ArtifactError (missing/tampered/unknown-version artifact,
    backend unavailable here, e.g. ``tensorrt`` without a GPU or without plans in the artifact) and
    InputError (unknown backend name, bad ``threads``).
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads must be a positive integer, got {threads!r}")
    d = Path(artifact_dir)
    manifest = load_manifest(d)
    return Engine(d, manifest, backend, threads, check_values=bool(check_values))


# ---------------------------------------------------------------------------------------------------
# models and model choice


class _Model:
    """One model file of the artifact as the manifest describes it; ``info`` is its manifest entry
    in JSON form (what the runners read: ``format``, ``batches``)."""

    __slots__ = ("name", "tasks", "inputs", "outputs", "flops", "info")

    def __init__(self, entry: ModelInfo) -> None:
        self.name = entry.name
        self.info = entry.to_dict()
        self.tasks = frozenset(entry.tasks)
        self.inputs = entry.inputs
        self.outputs = entry.outputs
        self.flops = entry.flops


class Engine:
    """A loaded artifact. Create it with `load`.

    Attributes:
        tasks: the task names, in the spec's order.
        input_spec: ``names`` (model inputs), ``shape`` (``["batch", C, H, W]``), ``dtype``
            (``"float32"``), ``preprocessing`` (`dagc.preprocessing.Preprocessing.to_dict`:
            ``raw_range``, ``mean``, ``std``...; None when the checkpoint recorded none) and
            ``task_inputs`` (task -> the input it reads): JSON-ready, for services.
        preprocessing: the same preprocessing, typed (`dagc.preprocessing.Preprocessing` or None).
        manifest: the artifact's manifest (`dagc.manifest.Manifest`, read-only).
        backend: the backend in use (``auto`` resolved).
        artifact_dir: the directory.
    """

    def __init__(self, artifact_dir: Path, manifest: Manifest, backend: str, threads: int | None, *,
                 check_values: bool = True) -> None:
        self.artifact_dir = artifact_dir
        self.check_values = check_values
        self.manifest = manifest
        self._threads = threads
        # the manifest was validated when it was read: the fields below are all there and agree
        inp = manifest.input
        self.tasks = manifest.spec.task_names
        self._chw = inp.shape
        self.preprocessing = inp.preprocessing
        self.input_spec = {"names": list(inp.names), "shape": inp.batch_shape(), "dtype": inp.dtype,
                           "preprocessing": None if inp.preprocessing is None else inp.preprocessing.to_dict(),
                           "task_inputs": manifest.task_inputs()}
        self.shared_input = len(inp.names) == 1
        models = {name: _Model(entry) for name, entry in manifest.models.items()}
        self.backend = self._resolve(backend, models)
        self._format = "tensorrt" if self.backend == "tensorrt" else "onnx"
        self._models = {n: m for n, m in models.items() if m.info["format"] == self._format}
        self._runners: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._plans: dict[frozenset, tuple[_Model, ...]] = {}
        self._limits = self._value_limits()
        if self.backend == "torch" and threads is not None:
            import torch

            torch.set_num_threads(threads)

    def __repr__(self) -> str:
        return f"Engine({str(self.artifact_dir)!r}, backend={self.backend!r}, tasks={list(self.tasks)})"

    # ------------------------------------------------------------------ backend choice
    def _resolve(self, backend: str, models: Mapping[str, _Model]) -> str:
        plans = [m for m in models.values() if m.info.get("format") == "tensorrt"]
        if backend == "auto":
            return "tensorrt" if plans and _tensorrt_unavailable() is None else "onnxruntime"
        if backend == "tensorrt":
            if not plans:
                raise ArtifactError(f"backend 'tensorrt' needs TensorRT plans and {self.artifact_dir} has none "
                                    "(compiled with --target onnx); recompile with --target tensorrt on a GPU "
                                    "machine or use backend 'onnxruntime'")
            reason = _tensorrt_unavailable()
            if reason:
                raise ArtifactError(reason)
        if backend == "onnxruntime":
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                raise ArtifactError("backend 'onnxruntime' needs the onnxruntime package; install dagc[cpu] "
                                    "(or onnxruntime-gpu)") from None
        if backend in ("onnxruntime", "torch") and not any(m.info.get("format") == "onnx" for m in models.values()):
            raise ArtifactError(f"{self.artifact_dir} has no ONNX models; recompile it with dagc compile")
        return backend

    # ------------------------------------------------------------------ model choice
    def models_for(self, tasks: Iterable[str] | None = None) -> tuple[str, ...]:
        """The model files `run` uses for ``tasks`` (default: all): the manifest's route for them
        in this backend's model format (`dagc.manifest.Manifest.route`).

        The cheapest way (by the manifest's FLOPs) to cover the tasks: one model that computes all
        of them (and reads only their inputs), or each task's own model; ties go to fewer models.
        One task therefore runs its per-task model, all tasks the shared model. Raises InputError
        for a bad task list, ArtifactError if no model of the backend's format covers them.
        """
        return tuple(m.name for m in self._plan(self._task_list(tasks)))

    def model_for(self, tasks: Iterable[str] | None = None) -> str:
        """`models_for` as one string: the file name, or names joined by ``+`` when several run."""
        return "+".join(self.models_for(tasks))

    def _plan(self, tasks: Sequence[str]) -> tuple[_Model, ...]:
        key = frozenset(tasks)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._choose(key)
            self._plans[key] = plan  # idempotent; a race only computes it twice
        return plan

    def _choose(self, want: frozenset) -> tuple[_Model, ...]:
        try:
            return tuple(self._models[name] for name in self.manifest.route(self._format, want))
        except ArtifactError as e:
            raise ArtifactError(f"{self.artifact_dir}, backend {self.backend!r}: {e}") from None

    # ------------------------------------------------------------------ runners
    def _runner(self, model: _Model):
        r = self._runners.get(model.name)
        if r is None:
            with self._lock:
                r = self._runners.get(model.name)
                if r is None:
                    data = self.read_verified(model.name)
                    if self.backend == "onnxruntime":
                        r = _OrtRunner(data, self._threads)
                    elif self.backend == "torch":
                        r = _TorchRunner(data, model.name)
                    else:
                        r = _TrtRunner(data, model.info)
                    self._runners[model.name] = r
        return r

    def read_verified(self, name: str) -> bytes:
        """The bytes of artifact file ``name``, checked against the manifest's sha256 now (the
        bytes returned are the bytes checked). Raises ArtifactError if it is unreadable or changed
        since it was compiled."""
        return read_verified(self.artifact_dir, name, self.manifest.files[name].sha256)

    # ------------------------------------------------------------------ inputs
    def _task_list(self, tasks: Iterable[str] | str | None) -> list[str]:
        if tasks is None:
            return list(self.tasks)
        if isinstance(tasks, str):
            tasks = [tasks]
        try:
            names = list(tasks)
        except TypeError:
            raise InputError(f"tasks must be a list of task names from {list(self.tasks)}, got "
                             f"{type(tasks).__name__}") from None
        if not names:
            raise InputError(f"the task list is empty; choose tasks from {list(self.tasks)} (or pass None for all)")
        unknown = [t for t in names if t not in self.tasks]
        if unknown:
            raise InputError(f"unknown task{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(repr(t) for t in unknown)}; this artifact has tasks {list(self.tasks)}")
        if len(set(names)) != len(names):
            raise InputError(f"tasks {names} name a task more than once")
        return names

    def _value_limits(self) -> tuple[float, float] | None:
        """Loose bounds on preprocessed values: the raw range mapped through (raw - mean) / std,
        widened by ten times its width on each side. Catches un-normalised 8-bit pixels without
        refusing any plausible input (or standard-normal test data)."""
        if self.preprocessing is None:
            return None
        lo, hi = self.preprocessing.value_bounds()
        width = float(np.max(hi - lo))
        return float(np.min(lo)) - 10 * width, float(np.max(hi)) + 10 * width

    def _check(self, label: str, x: Any) -> np.ndarray:
        c, h, w = self._chw
        # The common case (a contiguous float32 NCHW batch of the right size) passes with a few
        # attribute reads: the per-call cost matters for sub-millisecond models.
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 4 and x.shape[0] > 0
                and x.shape[1:] == self._chw and x.flags.c_contiguous):
            x = self._check_slow(label, x)
        if self.check_values:
            lo, hi = float(np.minimum.reduce(x, axis=None)), float(np.maximum.reduce(x, axis=None))
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise InputError(f"{label} contains NaN or infinite values")
            if self._limits is not None and (lo < self._limits[0] or hi > self._limits[1]):
                raw_lo, raw_hi = self.preprocessing.raw_range
                raise InputError(f"{label} has values in [{lo:.4g}, {hi:.4g}], far outside what preprocessing "
                                 f"gives (raw values in [{raw_lo:g}, {raw_hi:g}] through {FORMULA}); "
                                 "are these un-normalised pixels?" + self._hint())
        return x

    def _hint(self) -> str:
        return ("; apply the manifest's preprocessing ((raw - mean) / std per channel, engine.input_spec"
                "['preprocessing']) or read files with dagc.runtime.images.read_image"
                if self.input_spec["preprocessing"] else "")

    def _check_slow(self, label: str, x: Any) -> np.ndarray:
        """Every input that is not already a contiguous float32 batch of the right shape: explain
        what is wrong, or convert (float16/float64, non-contiguous) and return it."""
        c, h, w = self._chw
        if not isinstance(x, np.ndarray):
            raise InputError(f"{label} must be a numpy array of shape (batch, {c}, {h}, {w}), got "
                             f"{type(x).__name__}; convert it with numpy.asarray")
        if x.dtype.kind != "f":
            kind = "integer" if x.dtype.kind in "iu" else "boolean" if x.dtype.kind == "b" else "non-float"
            raise InputError(f"{label} has {kind} dtype {x.dtype}; the model takes float32 values{self._hint()}")
        if x.ndim != 4:
            extra = "; add a batch axis (x[None]) for a single image" if x.ndim == 3 else ""
            raise InputError(f"{label} must have 4 dimensions (batch, channels, height, width), got shape "
                             f"{tuple(x.shape)}{extra}")
        if x.shape[0] == 0:
            raise InputError(f"{label} has an empty batch (shape {tuple(x.shape)}); pass at least one image")
        if x.shape[1] != c:
            extra = ("; it looks like NHWC, transpose it with x.transpose(0, 3, 1, 2)"
                     if x.shape[3] == c else "")
            raise InputError(f"{label} has {x.shape[1]} channels (shape {tuple(x.shape)}); the model takes {c} "
                             f"channels in NCHW order (batch, channels, height, width){extra}")
        if tuple(x.shape[2:]) != (h, w):
            raise InputError(f"{label} has images of {x.shape[2]}x{x.shape[3]} (height x width); the model "
                             f"takes {h}x{w}; resize them first (dagc.runtime.images.read_image does)")
        if x.dtype != np.float32:
            x = x.astype(np.float32)  # float16 / float64: exact or nearest float32
        return np.ascontiguousarray(x)

    def _feeds(self, images: Any, tasks: Sequence[str]) -> dict[str, np.ndarray]:
        names = self.input_spec["names"]
        tin = self.input_spec["task_inputs"]
        c, h, w = self._chw
        if self.shared_input:
            if isinstance(images, Mapping):
                extra = [k for k in images if k != names[0]]
                if extra or names[0] not in images:
                    raise InputError(f"this artifact has one input shared by all tasks, {names[0]!r}; pass one "
                                     f"array (batch, {c}, {h}, {w}) or {{{names[0]!r}: array}}, got keys "
                                     f"{sorted(map(str, images))}")
                images = images[names[0]]
            return {names[0]: self._check("images", images)}
        if not isinstance(images, Mapping):
            raise InputError(f"this artifact has one input per task ({', '.join(names)}); pass a dict "
                             f"task name (or input name) -> array (batch, {c}, {h}, {w}), got "
                             f"{type(images).__name__}")
        by_input: dict[str, Any] = {}
        source: dict[str, str] = {}
        input_of_name = {**{n: n for n in names}, **tin}
        for key, value in images.items():
            inp = input_of_name.get(key) if isinstance(key, str) else None
            if inp is None:
                raise InputError(f"unknown input {key!r}; pass arrays keyed by task ({', '.join(self.tasks)}) "
                                 f"or input name ({', '.join(names)})")
            if inp in by_input:
                raise InputError(f"input {inp!r} is given twice (as {source[inp]!r} and {key!r})")
            by_input[inp], source[inp] = value, key
        feeds = {}
        for t in tasks:
            inp = tin[t]
            if inp not in by_input:
                raise InputError(f"no image for task {t!r}: pass it under {t!r} (or {inp!r})")
            if inp not in feeds:
                feeds[inp] = self._check(f"input {source[inp]!r}", by_input[inp])
        batches = {k: v.shape[0] for k, v in feeds.items()}
        if len(set(batches.values())) > 1:
            raise InputError(f"the inputs have different batch sizes {batches}; give every task the same batch size")
        return feeds

    # ------------------------------------------------------------------ run
    def run(self, images: Any, tasks: Iterable[str] | str | None = None) -> dict[str, np.ndarray]:
        """Run the model(s) that cover ``tasks`` (default: all) on a batch of preprocessed images.

        ``images``: a float32 numpy array (batch, C, H, W), already preprocessed as
        ``input_spec["preprocessing"]`` says, when the artifact has one shared input; a dict task
        name (or input name) -> such an array when each task has its own input (all with the same
        batch size). float16/float64 arrays are converted to float32; integer or boolean arrays are
        refused (apply the preprocessing first). ``tasks``: task names (or one name).

        Returns task -> float32 array, only the requested tasks, in the requested order:
        (batch, out, H, W) for dense tasks, (batch, classes) logits for classification.
        Raises InputError for an unknown/empty/repeated task list or unusable images, ArtifactError
        if a model file changed on disk since load. Thread-safe.
        """
        names = self._task_list(tasks)
        feeds = self._feeds(images, names)
        want = set(names)
        out: dict[str, np.ndarray] = {}
        for model in self._plan(names):
            outputs = [t for t in model.outputs if t in want]
            model_feeds = {i: feeds[i] for i in model.inputs}
            out.update(self._runner(model).run(model_feeds, outputs))
        return {t: out[t] for t in names}


# ---------------------------------------------------------------------------------------------------
# ONNX Runtime


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available] + [
        "CPUExecutionProvider"]


class _OrtRunner:
    def __init__(self, data: bytes, threads: int | None) -> None:
        import onnxruntime as ort

        opts = session_options(threads)
        providers = _ort_providers()
        try:
            self.session = ort.InferenceSession(data, opts, providers=providers)
        except Exception:  # noqa: BLE001 - a GPU provider that fails to initialise: run on the CPU
            if providers == ["CPUExecutionProvider"]:
                raise
            self.session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, self.session.run(outputs, feeds)))  # InferenceSession.run is thread-safe


# ---------------------------------------------------------------------------------------------------
# TensorRT


def _tensorrt_unavailable() -> str | None:
    """None when TensorRT plans can run here, else the reason in one sentence."""
    return tensorrt_unavailable("backend 'tensorrt'", "use backend 'onnxruntime'")


class _TrtRunner:
    """A deserialised plan; one execution context and one CUDA stream per calling thread. Batches
    beyond the plan's profile are run in chunks (and padded up to its smallest batch)."""

    def __init__(self, data: bytes, info: Mapping[str, Any]) -> None:
        import tensorrt as trt

        self.trt = trt
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(data)
        if self.engine is None:
            raise ArtifactError("TensorRT could not deserialize the plan (built for another GPU or TensorRT "
                                "version?); recompile the artifact on this machine")
        batches = info.get("batches") or [1]
        self.lo, self.hi = int(min(batches)), int(max(batches))
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.local = threading.local()

    def _state(self):
        import torch

        st = getattr(self.local, "state", None)
        if st is None:
            st = self.local.state = (self.engine.create_execution_context(), torch.cuda.Stream())
        return st

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        import torch

        context, stream = self._state()
        n = next(iter(feeds.values())).shape[0]
        parts: dict[str, list[np.ndarray]] = {t: [] for t in outputs}
        with torch.cuda.stream(stream):
            for start in range(0, n, self.hi):
                stop = min(n, start + self.hi)
                size = max(stop - start, self.lo)
                keep = []
                for name in self.inputs:
                    t = torch.zeros((size, *feeds[name].shape[1:]), dtype=torch.float32, device="cuda")
                    t[: stop - start].copy_(torch.from_numpy(feeds[name][start:stop]))
                    context.set_input_shape(name, tuple(t.shape))
                    context.set_tensor_address(name, t.data_ptr())
                    keep.append(t)
                outs = {}
                for name in self.outputs:
                    t = torch.empty(tuple(context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
                    context.set_tensor_address(name, t.data_ptr())
                    outs[name] = t
                if not context.execute_async_v3(stream.cuda_stream):
                    raise RuntimeError("TensorRT execution failed")
                for name in outputs:
                    parts[name].append(outs[name][: stop - start].cpu().numpy())
        stream.synchronize()
        return {t: v[0] if len(v) == 1 else np.concatenate(v) for t, v in parts.items()}


# ---------------------------------------------------------------------------------------------------
# PyTorch reference: an interpreter of the ONNX operators dagc emits


def _ints(v, n=2):
    return [int(a) for a in v] if v is not None else None


def _pads(attrs, node) -> tuple[int, int]:
    pads = _ints(attrs.get("pads")) or [0, 0, 0, 0]
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise ArtifactError(f"node {node!r}: auto_pad is not supported by the torch backend")
    if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3]:
        raise ArtifactError(f"node {node!r}: asymmetric pads {pads} are not supported by the torch backend")
    return pads[0], pads[1]


def _compile_node(node):
    """(function of the input tensors) for one ONNX node; raises ArtifactError if unsupported."""
    import torch
    import torch.nn.functional as F
    from onnx import helper

    attrs = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        attrs[a.name] = v.decode() if isinstance(v, bytes) else v
    op, name = node.op_type, node.name or node.output[0]

    def unsupported(why: str):
        return ArtifactError(f"the torch backend does not support {op} node {name!r} ({why}); use backend "
                             "'onnxruntime'")

    if op == "Conv":
        ph, pw = _pads(attrs, name)
        stride = _ints(attrs.get("strides")) or [1, 1]
        dil = _ints(attrs.get("dilations")) or [1, 1]
        group = int(attrs.get("group", 1))
        return lambda x, w, b=None: F.conv2d(x, w, b, stride, (ph, pw), dil, group)
    if op == "BatchNormalization":
        if attrs.get("training_mode", 0):
            raise unsupported("training mode")
        eps = float(attrs.get("epsilon", 1e-5))
        return lambda x, s, b, m, v: F.batch_norm(x, m, v, s, b, False, 0.0, eps)
    if op == "Relu":
        return F.relu
    if op in ("MaxPool", "AveragePool"):
        ph, pw = _pads(attrs, name)
        k = _ints(attrs["kernel_shape"])
        stride = _ints(attrs.get("strides")) or [1, 1]
        ceil = bool(attrs.get("ceil_mode", 0))
        if op == "MaxPool":
            dil = _ints(attrs.get("dilations")) or [1, 1]
            return lambda x: F.max_pool2d(x, k, stride, (ph, pw), dil, ceil)
        include = bool(attrs.get("count_include_pad", 0))
        return lambda x: F.avg_pool2d(x, k, stride, (ph, pw), ceil, include)
    if op == "GlobalAveragePool":
        return lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
    if op == "Flatten":
        axis = int(attrs.get("axis", 1))

        def flatten(x):
            a = axis if axis >= 0 else axis + x.dim()
            return x.reshape(int(np.prod(x.shape[:a])), -1)

        return flatten
    if op == "Gemm":
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        ta, tb = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))

        def gemm(a, b, c=None):
            a = a.t() if ta else a
            if tb and alpha == 1.0 and beta == 1.0:
                return F.linear(a, b, c)
            y = alpha * (a @ (b.t() if tb else b))
            return y if c is None else y + beta * c

        return gemm
    if op in ("Sum", "Add"):
        return lambda *xs: functools.reduce(torch.add, xs)
    if op == "Max":
        return lambda *xs: functools.reduce(torch.maximum, xs)
    if op == "Min":
        return lambda *xs: functools.reduce(torch.minimum, xs)
    if op == "Mul":
        return torch.mul
    if op == "Div":
        return torch.div
    if op == "Sub":
        return torch.sub
    if op == "Identity":
        return lambda x: x
    if op == "ReduceL2":
        keep = bool(attrs.get("keepdims", 1))
        axes_attr = attrs.get("axes")

        def reduce_l2(x, axes=None):
            dims = axes_attr if axes is None else axes.tolist()
            dims = tuple(int(d) for d in dims) if dims is not None and len(dims) else tuple(range(x.dim()))
            return torch.linalg.vector_norm(x, 2, dim=dims, keepdim=keep)

        return reduce_l2
    if op == "Resize":
        if attrs.get("mode", "nearest") != "linear":
            raise unsupported(f"mode {attrs.get('mode', 'nearest')!r}")
        ctm = attrs.get("coordinate_transformation_mode", "half_pixel")
        if ctm not in ("half_pixel", "pytorch_half_pixel"):
            raise unsupported(f"coordinate_transformation_mode {ctm!r}")
        if attrs.get("antialias", 0):
            raise unsupported("antialias")

        def resize(x, roi=None, scales=None, sizes=None):
            if sizes is not None and sizes.numel():
                return F.interpolate(x, size=[int(s) for s in sizes.tolist()[2:]], mode="bilinear",
                                     align_corners=False)
            s = [float(v) for v in scales.tolist()]
            if s[:2] != [1.0, 1.0]:
                raise DagcError(f"Resize node {name!r}: scaling batch or channels is not supported")
            return F.interpolate(x, scale_factor=s[2:], mode="bilinear", align_corners=False)

        return resize
    raise unsupported("operator not in the set dagc emits")


class _TorchRunner:
    """Runs an ONNX model dagc emitted with torch.nn.functional; no state is written during a run."""

    def __init__(self, data: bytes, name: str) -> None:
        import onnx
        import torch
        from onnx import numpy_helper

        try:
            model = onnx.load_from_string(data)
        except Exception as e:  # noqa: BLE001 - any parse failure means a broken file
            raise ArtifactError(f"{name}: not a readable ONNX model ({e})") from None
        g = model.graph
        self.consts: dict[str, torch.Tensor] = {
            t.name: torch.from_numpy(np.array(numpy_helper.to_array(t))) for t in g.initializer}
        self.nodes = []
        for node in g.node:
            if node.op_type == "Constant":
                from onnx import helper

                value = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                if "value" not in value:
                    raise ArtifactError(f"{name}: Constant node {node.name!r} without a tensor value")
                self.consts[node.output[0]] = torch.from_numpy(np.array(numpy_helper.to_array(value["value"])))
                continue
            if len(node.output) != 1:
                raise ArtifactError(f"{name}: node {node.name!r} ({node.op_type}) has several outputs, which the "
                                    "torch backend does not support; use backend 'onnxruntime'")
            self.nodes.append((_compile_node(node), tuple(node.input), node.output[0]))
        self.inputs = tuple(i.name for i in g.input if i.name not in self.consts)
        self._schedules: dict[tuple[str, ...], list] = {}

    def _schedule(self, outputs: tuple[str, ...]) -> list:
        sched = self._schedules.get(outputs)
        if sched is None:
            need = set(outputs)
            keep = []
            for fn, ins, out in reversed(self.nodes):
                if out in need:
                    keep.append((fn, ins, out))
                    need.update(i for i in ins if i)
            sched = keep[::-1]
            self._schedules[outputs] = sched
        return sched

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            values: dict[str, Any] = dict(self.consts)
            for k, v in feeds.items():
                values[k] = torch.from_numpy(v if v.flags.writeable else v.copy())
            for fn, ins, out in self._schedule(tuple(outputs)):
                args = [values[i] if i else None for i in ins]
                while args and args[-1] is None:
                    args.pop()
                values[out] = fn(*args)
            return {t: values[t].contiguous().numpy().copy() for t in outputs}

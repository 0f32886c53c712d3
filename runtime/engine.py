"""Load a compiled artifact and run any subset of its tasks: `load(artifact_dir) -> Engine`.

Backends (`BACKENDS`, and any added with `dagc.runtime.backends.register`; each runs a model
file through a `dagc.runners.Runner` its record makes):

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
    The reference: a small interpreter of the ONNX operator set dagc emits, written with
    ``torch.nn.functional`` (`dagc.runtime.torch_backend`). An artifact holds no checkpoint, so
    this is how the lowered computation is reproduced in PyTorch; it is stateless and runs under
    ``torch.inference_mode``.
``openvino``
    OpenVINO Runtime on the CPU, the ``.onnx`` files at f32 (bf16: ``precision="bf16"``).
``auto``
    ``tensorrt`` when the artifact has plans and a CUDA GPU with TensorRT is present, else
    ``onnxruntime``.

Every model file's sha256 is checked against the manifest at load, and every model file parsed and
checked against the inputs, outputs, shapes and dtypes its manifest entry declares
(`dagc.modelcheck.load_checked`, which gives the typed `dagc.manifest.Manifest` and the files'
bytes, read from one snapshot of the directory even while ``dagc compile --force`` replaces it);
the backend's models are kept in memory from that snapshot, and a session is created from them
lazily, on first use, once per file, its input and output names checked against the manifest. The
models a task subset runs are the routes the compiler recorded in the manifest (`dagc.routes`), in
the precision asked for at load (``precision="int8"``: each routed model's int8 form,
`dagc.precisions.variant`).
`Engine.run` is safe to call from many threads at once, and takes any batch size in bounded
memory: it feeds the models chunks of at most ``Engine.max_batch`` samples
(`dagc.runtime.chunks`) and writes their outputs into arrays allocated once.

Errors: `ArtifactError` (missing or tampered artifact, unknown manifest version, backend not
available, a plan this GPU cannot load) and `InputError` (bad images, unknown tasks, bad
arguments); a TensorRT execution that fails raises `RunnerError`. All are `dagc.errors.DagcError`,
so the CLI prints them as one line and exits with code 2.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dagc.artifact import read_verified
from dagc.errors import ArtifactError, InputError
from dagc.manifest import Manifest, ModelInfo
from dagc.modelcheck import check_io, load_checked
from dagc.precisions import PRECISIONS, REFERENCE, at_precision, check_loadable, runs_at
from dagc.preprocessing import FORMULA
from dagc.runners import Runner
from dagc.runtime.backends import BACKENDS, known, make_runner, resolve_backend
from dagc.runtime.chunks import default_max_batch

__all__ = ["load", "Engine", "ArtifactError", "InputError", "BACKENDS"]


def load(artifact_dir: str | Path, backend: str = "auto", *, threads: int | None = None,
         check_values: bool = True, max_batch: int | None = None, precision: str = REFERENCE) -> Engine:
    """Open a compiled artifact for inference.

    Takes the artifact directory (written by ``dagc compile``), the backend (one of `BACKENDS`, or
    one added with `dagc.runtime.backends.register`) and optionally the number of intra-op threads (ONNX Runtime sessions; for ``torch`` it sets
    ``torch.set_num_threads``, which is process-wide). ``check_values=False`` skips the scan of
    every input value (NaN/inf, far out of the preprocessed range) that `Engine.run` does by
    default; shape, dtype and task checks stay. The scan costs a pass over the batch, which is
    measurable only for sub-millisecond models (benchmarks/RESULTS.md). ``max_batch``: the most
    samples one model call takes; `Engine.run` runs larger batches in chunks of this size
    (`dagc.runtime.chunks`; default: about 64 MiB of activations per chunk). Verifies the manifest,
    every file's sha256 and every model file against the manifest before returning, all read from
    one snapshot of the directory (`dagc.artifact.read_artifact`: a concurrent ``--force`` replace
    gives the old or the new artifact, never a mix); the backend's model bytes are kept in memory
    for the sessions made on first use. ``precision``: the models' (`dagc.precisions`). Raises
    ArtifactError (missing/tampered/unknown-version artifact, a model file that is not the model
    its manifest entry declares, backend unavailable here, e.g. ``tensorrt`` without a GPU or
    without plans in the artifact, a precision the artifact lacks) and InputError (not a path,
    unknown backend or precision name, bad ``threads`` or ``max_batch``).
    """
    if backend not in known():
        raise InputError(f"unknown backend {backend!r}; choose one of {list(known())}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    for name, value in (("threads", threads), ("max_batch", max_batch)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(artifact_dir, (str, os.PathLike)):
        raise InputError(f"artifact_dir must be a path (str or os.PathLike), got {type(artifact_dir).__name__}")
    d = Path(artifact_dir)
    manifest, files = load_checked(d)  # one snapshot; every sha256, every model file against its entry
    engine = Engine(d, manifest, backend, threads, check_values=bool(check_values), files=files, precision=precision)
    if max_batch is not None:
        engine.max_batch = max_batch
    return engine


# ---------------------------------------------------------------------------------------------------
# models and model choice


class _Model:
    """One model file of the artifact as the manifest describes it; ``info`` is its manifest entry
    (what the runners read: ``format``, ``batches``)."""

    __slots__ = ("name", "tasks", "inputs", "outputs", "flops", "info")

    def __init__(self, entry: ModelInfo) -> None:
        self.name = entry.name
        self.info = entry
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
        precision: the models' precision (``fp32`` unless asked for at `load`).
        artifact_dir: the directory.
        max_batch: the most samples one model call takes; `run` chunks larger batches
            (`dagc.runtime.chunks`).
    """

    def __init__(self, artifact_dir: Path, manifest: Manifest, backend: str, threads: int | None, *,
                 files: Mapping[str, bytes], check_values: bool = True,
                 precision: str = REFERENCE) -> None:
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
        self._backend = resolve_backend(backend, {m.info.format for m in models.values()}, artifact_dir,
                                        precision)
        self.backend = self._backend.name
        self._format = self._backend.format
        self._models = {n: m for n, m in models.items() if m.info.format == self._format}
        self.precision = check_loadable(manifest.accuracy, {n: manifest.models[n] for n in self._models},
                                        precision, self.backend, f"{artifact_dir} ({self._format} models)")
        # the verified bytes of the models this backend runs (at this precision), from the snapshot
        # `load` read: runners made later never read a directory that may have been replaced since
        self._bytes = {n: files[n] for n in self._models if runs_at(manifest.models[n], precision)}
        self._runners: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._plans: dict[frozenset, tuple[_Model, ...]] = {}
        self._limits = self._value_limits()
        self.max_batch = default_max_batch(manifest)
        if self._backend.setup is not None:
            self._backend.setup(threads)

    def __repr__(self) -> str:
        return f"Engine({str(self.artifact_dir)!r}, backend={self.backend!r}, tasks={list(self.tasks)})"

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
            names = at_precision(self.manifest.models, self.manifest.route(self._format, want), self.precision)
            return tuple(self._models[name] for name in names)
        except ArtifactError as e:
            raise ArtifactError(f"{self.artifact_dir}, backend {self.backend!r}: {e}") from None

    # ------------------------------------------------------------------ runners
    def _runner(self, model: _Model) -> Runner:
        """The model's runner, created on first use (once, under the lock) from its verified bytes."""
        r = self._runners.get(model.name)
        if r is None:
            with self._lock:
                r = self._runners.get(model.name)
                if r is None:
                    data = self.read_verified(model.name)
                    r = make_runner(self._backend, data, model.name, model.info, self._threads, self.precision)
                    check_io(self.manifest, model.name, r.inputs, r.outputs)  # a plan's own names
                    self._runners[model.name] = r
        return r

    def read_verified(self, name: str) -> bytes:
        """The bytes of artifact file ``name``, checked against the manifest's sha256 (the bytes
        returned are the bytes checked): the models of this backend from the snapshot `load`
        read, any other file from the directory now. Raises ArtifactError if it is unreadable or
        changed since it was compiled."""
        if name in self._bytes:
            return self._bytes[name]
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
        (batch, out, H, W) for dense tasks, (batch, classes) logits for classification. A batch
        larger than `max_batch` runs in chunks of `max_batch` samples into outputs allocated
        once, so memory stays bounded whatever the batch size.
        Raises InputError for an unknown/empty/repeated task list or unusable images, ArtifactError
        if a model file changed on disk since load. Thread-safe.
        """
        names = self._task_list(tasks)
        feeds = self._feeds(images, names)
        n, step = next(iter(feeds.values())).shape[0], self.max_batch
        if n <= step:
            return self._run_once(feeds, names)
        out = {t: np.empty((n, *self.manifest.tasks[t].output_shape), np.float32) for t in names}
        for lo in range(0, n, step):
            part = self._run_once({k: v[lo:lo + step] for k, v in feeds.items()}, names)
            for t in names:
                out[t][lo:lo + step] = part[t]
        return out

    def _run_once(self, feeds: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        want = set(names)
        out: dict[str, np.ndarray] = {}
        for model in self._plan(names):
            outputs = [t for t in model.outputs if t in want]
            model_feeds = {i: feeds[i] for i in model.inputs}
            out.update(self._runner(model).run(model_feeds, outputs))
        return {t: out[t] for t in names}

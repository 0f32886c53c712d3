"""The ``aoti`` target: AOTInductor packages (``.pt2``) for C++ (LibTorch) deployment.

Each package is the lowered static module (`dagc.compiler.lower`) exported with a dynamic batch
dimension and compiled ahead of time by AOTInductor into native code plus its weights; C++ loads it
with ``torch::inductor::AOTIModelPackageLoader`` (see ``examples/cpp/``), Python with
``torch._inductor.aoti_load_package``. A package runs only with the same torch version (major.minor)
and on a CPU with the instruction set of the machine that compiled it, so the manifest records the
torch version and the C++ library checks it.

``device="cuda"`` compiles the packages for the GPU (Inductor's Triton and CUDA kernels; the model
and the example inputs on the GPU during export): such a package runs only on a CUDA device, and
its manifest entry records ``device: "cuda"``. On the GPU reduced-precision variants can be added
beside the fp32 packages (``model.fp16.pt2``, ``task_<t>.bf16.pt2``): the lowered module in that
dtype, wrapped so that the package still takes and returns float32 (cast on entry and exit, as
onnxconverter-common's ``keep_io_types``); their entries record ``precision``.

Every package is verified like the ONNX models: loaded back from its bytes and run on seeded random
inputs (several batch sizes, so the dynamic batch dimension is exercised) against the masked
supernet, on the device it was compiled for, at `AOTI_RTOL` (fp32) or `RTOL` of its precision. On
the GPU the check runs with TF32 off (`exact_cuda`), so that it measures the compiled code, not
TF32's rounding of both sides.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dagc import manifest_parts
from dagc.compiler.ir import CompileError, Graph
from dagc.compiler.lower import lower
from dagc.compiler.runners import AotiRunner, SupernetRunner, load_package
from dagc.manifest import ModelInfo
from dagc.precision_table import REFERENCE, TABLE, tolerances
from dagc.runners import Runner, compare

DEVICES = manifest_parts.DEVICES  # one list: what the manifest accepts is what can be built
# The precisions packages are built at and their tolerances (`dagc.precision_table`: measured).
RTOL = tolerances("aoti")
AOTI_RTOL = RTOL[REFERENCE]
DTYPES = {p: getattr(torch, TABLE[p].torch_dtype) for p in RTOL}
# Batch sizes of the verification inputs: 1 and odd sizes catch a batch dimension specialised by export.
VERIFY_BATCHES = (1, 2, 3)
MAX_BATCH = 65536

__all__ = ["AOTI_RTOL", "DEVICES", "DTYPES", "RTOL", "unavailable_reason", "build_package", "load_package",
           "verify_package", "add_packages", "package_name", "exact_cuda"]


def _cuda_unavailable() -> str | None:
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
        return (f"--target aoti --device cuda needs a CUDA GPU and a CUDA build of PyTorch (torch {torch.__version__}: "
                f"{build}); compile with --device cpu")
    if importlib.util.find_spec("triton") is None:
        return "--target aoti --device cuda needs triton (Inductor's GPU kernels); pip install triton"
    return None


def unavailable_reason(device: str = "cpu") -> str | None:
    """None if AOTInductor packages can be built here for ``device`` (`DEVICES`), otherwise one
    sentence saying why not (an unknown device; no C++ compiler; a torch without
    ``torch._inductor.aoti_compile_and_package``; for cuda no GPU, a CPU-only torch or no triton)."""
    if device not in DEVICES:
        return f"unknown --device {device!r}; choose one of {list(DEVICES)}"
    if device == "cuda":
        reason = _cuda_unavailable()
        if reason:
            return reason
    try:
        import torch._inductor as inductor
        import torch._inductor.config as config
    except ImportError as e:  # pragma: no cover - torch always ships inductor in the supported range
        return f"--target aoti needs torch with AOTInductor ({e}); install torch>=2.6"
    if not hasattr(inductor, "aoti_compile_and_package"):
        return "--target aoti needs torch>=2.6 (torch._inductor.aoti_compile_and_package is missing)"
    # Inductor compiles with the first of config.cpp.cxx that exists (set from $CXX at import).
    names = [c for c in config.cpp.cxx if c] or ["g++"]
    if not any(shutil.which(c) for c in names):
        return (f"--target aoti needs a C++ compiler ({' or '.join(map(repr, names))} not found); install g++ "
                "(Debian: apt-get install g++) or set CXX")
    return None


class _Float32IO(torch.nn.Module):
    """A module run in another dtype behind float32 inputs and outputs (the casts compile into
    the package's first and last kernels)."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module.to(dtype)
        self.dtype = dtype

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(y.float() for y in self.module(*(x.to(self.dtype) for x in inputs)))


def package_name(model_file: Callable[..., str], task: str | None, precision: str = REFERENCE) -> str:
    """The file name of a package: ``model.pt2`` / ``task_<t>.pt2`` for fp32, with the precision
    before the extension otherwise (``model.fp16.pt2``)."""
    return model_file(task, "pt2" if TABLE[precision].reference else f"{precision}.pt2")


@contextlib.contextmanager
def exact_cuda() -> Iterator[None]:
    """TF32 off for cuDNN convolutions and cuBLAS matmuls inside the block (PyTorch turns it on
    for convolutions by default), restored after."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def build_package(graph: Graph, tasks: Sequence[str] | None = None, *, device: str = "cpu",
                  precision: str = REFERENCE) -> tuple[bytes, list[str], list[str]]:
    """Compile the graph's model for ``tasks`` (default: all, the shared model) into a ``.pt2``.

    Takes the optimised IR, the task subset, the device to compile for (`DEVICES`) and the
    precision the model computes in (`DTYPES`; fp16/bf16 keep float32 inputs and outputs).
    Returns (package bytes, input names in the order the package takes them, output task names
    in the order it returns them). Inputs are float32 (batch, C, H, W) with a dynamic batch of 1
    to `MAX_BATCH`. Raises CompileError if export or compilation fails (the message carries the
    first line of the cause).
    """
    lowered = lower(graph, tasks)
    module = lowered if DTYPES[precision] is torch.float32 else _Float32IO(lowered, DTYPES[precision])
    module = module.to(device).eval()
    spec = graph.spec
    shape = (spec.in_channels, *spec.input_size)
    # Example batch 2: export specialises dimensions whose example size is 0 or 1.
    example = tuple(torch.zeros(2, *shape, device=device) for _ in lowered.inputs)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        exported = torch.export.export(module, example, dynamic_shapes={"inputs": tuple({0: batch} for _ in example)})
        with tempfile.TemporaryDirectory(prefix="dagc-aoti-") as tmp, warnings.catch_warnings():
            # torch 2.13's own pytree code trips its LeafSpec deprecation; nothing for a user to act on.
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            path = Path(tmp) / "model.pt2"
            torch._inductor.aoti_compile_and_package(exported, package_path=str(path))
            data = path.read_bytes()
    except Exception as e:  # export/inductor raise many unrelated types; report, don't traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompileError(f"AOTInductor could not compile the {precision} model for tasks {list(lowered.tasks)} "
                           f"({device}): {first}") from e
    return data, list(lowered.inputs), list(lowered.tasks)


def verify_package(data: bytes, inputs: Sequence[str], outputs: Sequence[str], reference: Runner, graph: Graph,
                   *, rtol: float = AOTI_RTOL, seed: int = 0, device: str = "cpu",
                   what: str = "AOTInductor package") -> dict[str, float]:
    """Check that the package computes what ``reference`` (normally the masked supernet) computes.

    Takes the package bytes, its input and output names (from `build_package`), the reference
    runner (`dagc.compiler.verify.supernet_reference`, on the same device), the IR (for the input
    shape), the tolerance, the seed, the device the package was compiled for and what it is (for
    the message). Runs it (`AotiRunner`) on standard-normal inputs of each batch size in
    `VERIFY_BATCHES` and compares with `dagc.runners.compare` (on cuda inside `exact_cuda`).
    Returns task -> worst relative error (max|pkg - ref| / max(1, max|ref|)). Raises CompileError
    naming the task if an error exceeds ``rtol``.
    """
    spec = graph.spec
    runner = AotiRunner(data, inputs, outputs, device=device)
    rng = np.random.default_rng(seed)
    feeds = ({i: rng.standard_normal((b, spec.in_channels, *spec.input_size)).astype(np.float32) for i in inputs}
             for b in VERIFY_BATCHES)
    with exact_cuda() if device == "cuda" else contextlib.nullcontext():
        return compare(runner, reference, feeds, rtol=rtol, what=what)


def _on_device(reference: Runner, device: str) -> Runner:
    """The reference on ``device``: a copy of a `SupernetRunner`'s network moved there (the
    compile's own stays on the CPU); another runner as it is."""
    if device == "cpu" or not isinstance(reference, SupernetRunner):
        return reference
    return SupernetRunner(copy.deepcopy(reference.net).to(device), reference.outputs)


def add_packages(files: dict[str, bytes], models: dict[str, ModelInfo], graph: Graph, reference: Runner,
                 model_file: Callable[..., str], *, device: str = "cpu",
                 precisions: Sequence[str] = (REFERENCE,)) -> None:
    """Build and verify one package per ONNX model (shared, then per task) and precision and add
    them to ``files`` and ``models``.

    ``model_file(task, ext)`` names a model file (task None: the shared model), as in
    `dagc.compiler.compile.model_file` (packages are named by `package_name`); ``models`` must
    already hold the ONNX entries; ``device`` is what the packages are compiled for and
    ``precisions`` (`DTYPES`) which of them to build. A package's manifest entry copies its ONNX
    model's (tasks, costs) with ``format`` "aoti", its own ``inputs``/``outputs`` order,
    ``verified_max_rel_error``, ``torch_version``, ``batch`` (the dynamic range), ``built_from``
    (the ONNX file describing the same model), and ``device`` / ``precision`` when they are not
    cpu / fp32. Raises CompileError (see `build_package`, `verify_package`).
    """
    reference = _on_device(reference, device)
    for task in (None, *graph.tasks):
        onnx_name = model_file(task, "onnx")
        for precision in precisions:
            name = package_name(model_file, task, precision)
            data, inputs, outputs = build_package(graph, None if task is None else [task], device=device,
                                                  precision=precision)
            errors = verify_package(data, inputs, outputs, reference, graph, rtol=RTOL[precision], device=device,
                                    what=f"{precision} AOTInductor package {name}")
            files[name] = data
            models[name] = replace(models[onnx_name], name=name, format="aoti", inputs=tuple(inputs),
                                   outputs=tuple(outputs), verified_max_rel_error=max(errors.values()), opset=None,
                                   torch_version=torch.__version__, batch_range=(1, MAX_BATCH), built_from=onnx_name,
                                   device=None if device == "cpu" else device,
                                   precision=None if TABLE[precision].reference else precision)

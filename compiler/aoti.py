"""The ``aoti`` target: AOTInductor packages (``.pt2``) for C++ (LibTorch) deployment.

Each package is the lowered static module (`dagc.compiler.lower`) exported with a dynamic batch
dimension and compiled ahead of time by AOTInductor into native code plus its weights; C++ loads it
with ``torch::inductor::AOTIModelPackageLoader`` (see ``examples/cpp/``), Python with
``torch._inductor.aoti_load_package``. A package runs only with the same torch version (major.minor)
and on a CPU with the instruction set of the machine that compiled it, so the manifest records the
torch version and the C++ library checks it.

Every package is verified like the ONNX models: loaded back from its bytes and run on seeded random
inputs (several batch sizes, so the dynamic batch dimension is exercised) against the masked
supernet, at `AOTI_RTOL`.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dagc.compiler.ir import CompileError, Graph
from dagc.compiler.lower import lower
from dagc.compiler.runners import AotiRunner, load_package
from dagc.runners import Runner, compare

AOTI_RTOL = 1e-4
# Batch sizes of the verification inputs: 1 and odd sizes catch a batch dimension specialised by export.
VERIFY_BATCHES = (1, 2, 3)
MAX_BATCH = 65536

__all__ = ["AOTI_RTOL", "unavailable_reason", "build_package", "load_package", "verify_package", "add_packages"]


def unavailable_reason() -> str | None:
    """None if AOTInductor packages can be built here, otherwise one sentence saying why not (no
    C++ compiler, or a torch without ``torch._inductor.aoti_compile_and_package``)."""
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


def build_package(graph: Graph, tasks: Sequence[str] | None = None) -> tuple[bytes, list[str], list[str]]:
    """Compile the graph's model for ``tasks`` (default: all, the shared model) into a ``.pt2``.

    Takes the optimised IR and the task subset. Returns (package bytes, input names in the order
    the package takes them, output task names in the order it returns them). Inputs are float32
    (batch, C, H, W) with a dynamic batch of 1 to `MAX_BATCH`. Raises CompileError if export or
    compilation fails (the message carries the first line of the cause).
    """
    module = lower(graph, tasks)
    spec = graph.spec
    shape = (spec.in_channels, *spec.input_size)
    # Example batch 2: export specialises dimensions whose example size is 0 or 1.
    example = tuple(torch.zeros(2, *shape) for _ in module.inputs)
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
        raise CompileError(f"AOTInductor could not compile the model for tasks {list(module.tasks)}: {first}") from e
    return data, list(module.inputs), list(module.tasks)


def verify_package(data: bytes, inputs: Sequence[str], outputs: Sequence[str], reference: Runner, graph: Graph,
                   *, rtol: float = AOTI_RTOL, seed: int = 0) -> dict[str, float]:
    """Check that the package computes what ``reference`` (normally the masked supernet) computes.

    Takes the package bytes, its input and output names (from `build_package`), the reference
    runner (`dagc.compiler.verify.supernet_reference`), the IR (for the input shape), the
    tolerance and the seed. Runs it (`AotiRunner`) on standard-normal inputs of each batch size in
    `VERIFY_BATCHES` and compares with `dagc.runners.compare`. Returns task -> worst relative
    error (max|pkg - ref| / max(1, max|ref|)). Raises CompileError naming the task if an error
    exceeds ``rtol``.
    """
    spec = graph.spec
    runner = AotiRunner(data, inputs, outputs)
    rng = np.random.default_rng(seed)
    feeds = ({i: rng.standard_normal((b, spec.in_channels, *spec.input_size)).astype(np.float32) for i in inputs}
             for b in VERIFY_BATCHES)
    return compare(runner, reference, feeds, rtol=rtol, what="AOTInductor package")


def add_packages(files: dict[str, bytes], models: dict[str, dict[str, Any]], graph: Graph, reference: Runner,
                 model_file: Callable[..., str]) -> None:
    """Build and verify one package per ONNX model (shared, then per task) and add them to
    ``files`` and ``models``.

    ``model_file(task, ext)`` names a model file (task None: the shared model), as in
    `dagc.compiler.compile.model_file`; ``models`` must already hold the ONNX entries. A
    package's manifest entry copies its ONNX model's (tasks, costs) with ``format`` "aoti", its own
    ``inputs``/``outputs`` order, ``verified_max_rel_error``, ``torch_version``, ``batch`` (the
    dynamic range) and ``built_from`` (the ONNX file describing the same model). Raises
    CompileError (see `build_package`, `verify_package`).
    """
    for task in (None, *graph.tasks):
        onnx_name, name = model_file(task, "onnx"), model_file(task, "pt2")
        data, inputs, outputs = build_package(graph, None if task is None else [task])
        errors = verify_package(data, inputs, outputs, reference, graph)
        files[name] = data
        entry = {k: v for k, v in models[onnx_name].items() if k != "opset"}
        models[name] = {**entry, "format": "aoti", "inputs": inputs, "outputs": outputs,
                        "verified_max_rel_error": max(errors.values()), "torch_version": torch.__version__,
                        "batch": {"min": 1, "max": MAX_BATCH}, "built_from": onnx_name}

"""Measured cost tables (`dagc.cost_table`, issue 21): every block, head and the call itself of a
network, emitted as the compiler emits them (`dagc.compiler.onnx_export.part_to_onnx`: a block
folded, as in a compiled model) and timed on a latency target.

Targets:

``onnxruntime-cpu``
    ONNX Runtime's CPU execution provider (`dagc.runners.OrtRunner`, dagc's session options) with
    ``threads`` intra-op threads.
``openvino-cpu``
    OpenVINO Runtime on the CPU, f32 (`dagc.runners.OvRunner`), ``threads`` inference threads.
``torch-cuda``
    declared; measuring it is not built: without a CUDA GPU it says so, with one that it is not
    built yet (one line either way).

Timing (`time_parts`): every part gets its own session and a fixed random input of the table's
batch; after ``warmup`` calls of each, the parts are called round-robin, one call each per round in
a fresh random order, so machine noise hits all alike, for ``repeats`` rounds (fewer, but at
least `MIN_ROUNDS`, once ``max_seconds`` have passed); a part's time is the median of its calls
(``time.perf_counter`` around ``run``, in ms). A block's cost is its median less the median of
the empty model (`onnx_export.CALL`, an Identity of the input: what any call costs), at least 0;
that call cost is the table's ``call``.

The weights are synthetic (He-normal convs, zero biases; seeded): latency does not depend on the
values, and the table is one per network, not per trained checkpoint.
"""

from __future__ import annotations

import os
import platform
import random
import time
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import numpy as np

import dagc
from dagc.blocks import blocks, head
from dagc.compiler.ir import Graph, folded_names, input_name
from dagc.compiler.onnx_export import CALL, HEAD_PREFIX, part_inputs, part_to_onnx
from dagc.cost_table import LATENCY_TARGETS, CostTable, check_target, network_fingerprint
from dagc.errors import CostTableError
from dagc.precision_table import REFERENCE
from dagc.runners import OrtRunner, OvRunner, Runner, openvino_unavailable
from dagc.spec import Spec

WARMUP = 5
REPEATS = 50
MIN_ROUNDS = 5
MAX_SECONDS = 120.0

__all__ = ["measure_table", "part_models", "time_parts", "runner_for", "feeds_for", "machine_info",
           "WARMUP", "REPEATS"]


def _synthetic_params(spec: Spec, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights for every part: each block's folded conv (``fold.<block>.weight/bias``) and every
    head's layers, He-normal with zero biases."""
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}

    def conv(w: str, b: str | None, cout: int, cin: int, k: int) -> None:
        params[w] = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        if b is not None:
            params[b] = np.zeros(cout, np.float32)

    for blk in blocks(spec):
        conv(*folded_names(blk.key), blk.cout, blk.cin, blk.conv.kernel)
    for t in spec.task_names:
        for layer in head(spec, t).layers:
            if hasattr(layer, "kernel"):
                conv(layer.weight, layer.bias, layer.cout, layer.cin, layer.kernel)
            else:
                params[layer.weight] = (rng.standard_normal((layer.cout, layer.cin)) / np.sqrt(layer.cin)).astype(np.float32)
                params[layer.bias] = np.zeros(layer.cout, np.float32)
    return params


def _timing_graph(spec: Spec) -> Graph:
    """A graph without nodes that holds the parts' weights (`part_to_onnx` reads its params)."""
    return Graph(spec, (input_name(None),), (), (), _synthetic_params(spec))


def part_models(spec: Spec, opset: int = 17) -> dict[str, tuple[bytes, dict[str, tuple[int, int, int]]]]:
    """Every part of ``spec``'s network as a serialized ONNX model with its inputs' per-sample
    shapes: the blocks by name, ``head.<task>`` for each head, and `CALL`."""
    graph = _timing_graph(spec)
    names = [b.key for b in blocks(spec)] + [HEAD_PREFIX + t for t in spec.task_names] + [CALL]
    return {n: (part_to_onnx(graph, n, opset=opset).SerializeToString(), part_inputs(graph, n)) for n in names}


def feeds_for(shapes: Mapping[str, tuple[int, ...]], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed random float32 input of ``batch`` samples for each input of the given shapes."""
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((batch, *s)).astype(np.float32) for n, s in shapes.items()}


def _ort(model: bytes, threads: int | None) -> Runner:
    return OrtRunner(model, threads=threads, device="cpu")


def _openvino(model: bytes, threads: int | None) -> Runner:
    reason = openvino_unavailable(REFERENCE)
    if reason:
        raise CostTableError(f"cost target 'openvino-cpu': {reason}")
    return OvRunner(model, threads=threads, precision=REFERENCE)


def _torch_cuda(model: bytes, threads: int | None) -> Runner:
    import torch

    if not torch.cuda.is_available():
        raise CostTableError("cost target 'torch-cuda' needs a CUDA GPU and a CUDA build of PyTorch; none is "
                             "available here (use onnxruntime-cpu or openvino-cpu)")
    raise CostTableError("cost target 'torch-cuda' is declared but its measurement is not built yet; use "
                         "onnxruntime-cpu or openvino-cpu")


# Latency target -> the runner that times its parts (fp32, the reference precision).
RUNNERS = {"onnxruntime-cpu": _ort, "openvino-cpu": _openvino, "torch-cuda": _torch_cuda}


def runner_for(target: str, model: bytes, threads: int | None) -> Runner:
    """A runner of the serialized ONNX ``model`` on a latency ``target``; CostTableError when the
    target cannot run here."""
    if target not in RUNNERS:
        raise CostTableError(f"cost target {target!r} is not measured; choose one of {list(LATENCY_TARGETS)}")
    return RUNNERS[target](model, threads)


def time_parts(parts: Mapping[str, tuple[Runner, dict[str, np.ndarray]]], *, warmup: int = WARMUP,
               repeats: int = REPEATS, max_seconds: float = MAX_SECONDS, seed: int = 0) -> dict[str, list[float]]:
    """Each part's call times in ms, timed round-robin (see the module docstring). Takes name ->
    (runner, feeds); returns name -> the times of its calls."""
    for runner, feeds in parts.values():
        for _ in range(warmup):
            runner.run(feeds)
    names = list(parts)
    times: dict[str, list[float]] = {n: [] for n in names}
    order = random.Random(seed)
    start = time.perf_counter()
    for r in range(repeats):
        if r >= MIN_ROUNDS and time.perf_counter() - start > max_seconds:
            break
        order.shuffle(names)
        for n in names:
            runner, feeds = parts[n]
            t0 = time.perf_counter()
            runner.run(feeds)
            times[n].append((time.perf_counter() - t0) * 1e3)
    return times


def machine_info() -> dict[str, Any]:
    """The machine a table was measured on: CPU model, cores, OS, Python."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "system": platform.system(),
            "python": platform.python_version()}


def _versions(target: str) -> dict[str, str]:
    out = {"dagc": dagc.__version__}
    for pkg in {"onnxruntime-cpu": ("onnxruntime", "onnx"), "openvino-cpu": ("openvino", "onnx"),
                "torch-cuda": ("torch",)}[target]:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
    return {n: float(np.median(v)) for n, v in times.items()}


def table_from_times(spec: Spec, target: str, batch: int, threads: int | None, times: Mapping[str, list[float]],
                     method: Mapping[str, Any]) -> CostTable:
    """The table of measured ``times`` (`time_parts` of `part_models`): each part's median less the
    call's, at least 0."""
    med = medians(times)
    call = med[CALL]
    net = {n: max(0.0, m - call) for n, m in med.items() if n != CALL}
    return CostTable(network_fingerprint(spec), target, batch, threads, "ms",
                     {b.key: net[b.key] for b in blocks(spec)},
                     {t: net[HEAD_PREFIX + t] for t in spec.task_names}, call,
                     machine_info(), _versions(target),
                     {**method, "statistic": "median of the timed calls, less the call's median",
                      "form": "each block folded (conv with bias, ReLU, pool) as in a compiled model",
                      "rounds": min(len(v) for v in times.values())})


def measure_table(spec: Spec, target: str, batch: int, threads: int | None, *, warmup: int = WARMUP,
                  repeats: int = REPEATS, max_seconds: float = MAX_SECONDS, seed: int = 0) -> CostTable:
    """Measure the table of ``spec`` on a latency ``target`` at ``batch`` and ``threads`` (see the
    module docstring); `dagc.cost_table.Measure`. Raises CostTableError for a target that is not a
    latency target or cannot run here, or a bad batch or thread count."""
    check_target(target, batch, threads)
    if target not in LATENCY_TARGETS:
        raise CostTableError(f"cost target {target!r} is counted, not measured")
    parts = {n: (runner_for(target, model, threads), feeds_for(shapes, batch, seed))
             for n, (model, shapes) in part_models(spec).items()}
    times = time_parts(parts, warmup=warmup, repeats=repeats, max_seconds=max_seconds, seed=seed)
    return table_from_times(spec, target, batch, threads, times,
                            {"warmup": warmup, "repeats": repeats, "max_seconds": max_seconds, "seed": seed})

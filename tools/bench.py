"""`dagc bench`: the compiled models against the supernets they came from, side by side, in one process.

Variants (keys of ``result["batches"][B]["variants"]``):

``supernet``
    (a) the unpruned supernet: soft weights σ(logits), every edge, every task; PyTorch eager, eval
    mode, ``torch.no_grad``. Built from the checkpoint's θ and logits without its masks.
``masked``
    (b) the masked supernet in PyTorch eager (`network_from_checkpoint(ck).eval()`), all tasks:
    what research code runs at test time.
``naive_onnx``
    (c) the masked supernet exported with ``torch.onnx.export`` and run in ONNX Runtime (CPU
    execution provider; the engine's session options). The export is what a user gets without
    dagc, with the smallest change that makes it export at all (see `naive_export`).
``shared``
    (d) the compiled shared model through the runtime engine (``engine.run(x)``, all tasks).
``task:<t>``
    (e) each compiled per-task model through the engine (``engine.run(x, tasks=[t])``).
``bare:shared``, ``bare:<t>``
    the same ONNX files in a bare ``onnxruntime.InferenceSession`` (only when the engine's backend
    is ``onnxruntime``): what the engine adds on top of the model (input checks, model choice).
``unchecked:<t>``
    (e) again, with the engine loaded with ``check_values=False`` (no scan of the input values;
    shape, dtype and task checks stay); timed alongside the bare sessions.

Every variant is a `dagc.runners.Runner` (`SupernetRunner` for (a) and (b), ONNX Runtime sessions
for (c) and the bare sessions, the engine for (d) and (e)), called with the same float32 numpy
inputs and returning numpy arrays, so that every variant pays the same conversions.

Timing: ``time.perf_counter`` around each batch call, after ``warmup`` calls of each variant; the
variants run round-robin (one call each per round, in a fresh random order every round, so that
no variant always follows the same one) so machine noise hits all alike; rounds continue until both ``min_reps`` and ``min_seconds`` are reached. Latency
percentiles p50/p90/p99 in ms per batch call; throughput = batch / p50.

Memory (``peak_rss_mb``): the growth of the process's resident set from just before a variant is
built to the peak of its first call at each batch (batches ascending, so weights + workspace),
variants built one after another. On Linux the peak is VmHWM of ``/proc/self/status`` after resetting
it with ``/proc/self/clear_refs`` (and ``malloc_trim`` before the baseline); elsewhere the growth
of ``resource.getrusage(...).ru_maxrss``, a lower bound (it only grows past earlier peaks). The method
is recorded in ``result["config"]["memory_method"]``. ``model_rss_mb``: the growth from building
it (weights, sessions; sessions created lazily by the engine appear in the first call instead). The
naive export itself runs before (c)'s baseline: its tracing is not (c)'s memory.

FLOPs per image: (a) the manifest's ``costs.supernet``; (b) and (c) `graph_costs` of the unshared,
unfolded IR (`build_graph`): each task's active edges, as the masked supernet runs them;
(d) ``costs.shared``; (e) ``costs.per_task[t]``.

Ratios per batch, of (d) over (a), (b), (c): ``speedup`` = p50(x) / p50(d), ``flops_ratio`` =
FLOPs(x) / FLOPs(d), ``efficiency`` = speedup / flops_ratio (1.0: as fast as its FLOPs allow).
Per task: ``latency_vs_shared`` = p50(e_t) / p50(d), ``latency_vs_bare`` = p50(e_t) / p50(bare e_t)
and ``unchecked_vs_bare`` = p50(unchecked e_t) / p50(bare e_t).

Errors: `BenchError` (a `DagcError`) for an artifact and a checkpoint that do not belong together,
an unknown backend or device, bad batch sizes, or a naive export that disagrees with the masked
supernet (checked with `dagc.runners.compare`, the comparison every compile verification uses).

The table, JSON and plot are in `dagc.tools.bench_report`, memory and machine in
`dagc.tools.bench_system`, the naive export in `dagc.tools.naive_export`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from dagc.artifact import load_manifest
from dagc.checkpoint import Checkpoint, load_checkpoint
from dagc.compiler.flops import graph_costs
from dagc.compiler.ir import build_graph, masks_of
from dagc.compiler.runners import SupernetRunner
from dagc.errors import BenchError, DagcError
from dagc.manifest import Manifest, TaskMasks
from dagc.runners import OrtRunner, Runner, compare
from dagc.runtime import Engine, backends, load
from dagc.tools import bench_precision
from dagc.tools.bench_report import format_table, plot, write_json
from dagc.tools.bench_system import Memory, latency_stats, machine
from dagc.tools.naive_export import NaiveRunner, naive_export
from dagc.trainer.network import CentralNetwork, load_network_tensors, network_from_checkpoint

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")  # built in; `bench_precision.engine_backends`
NAIVE_RTOL = 1e-4

__all__ = ["BenchError", "benchmark", "format_table", "plot", "write_json", "naive_export", "BACKENDS"]


# ---------------------------------------------------------------------------------------------------
# checks


def _check_pair(manifest: Manifest, ck, artifact_dir: Path, checkpoint: Path) -> None:
    if manifest.spec != ck.spec:
        a, b = manifest.spec.to_dict(), ck.spec.to_dict()
        diffs = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise BenchError(f"checkpoint {checkpoint} does not belong to artifact {artifact_dir}: their network "
                         f"specs differ (in {', '.join(diffs) or 'the spec'}); pass the checkpoint the "
                         "artifact was compiled from")
    if not ck.reduced:
        raise BenchError(f"checkpoint {checkpoint} has not been reduced (no masks), so it cannot be the one "
                         f"artifact {artifact_dir} was compiled from")
    gamma, alpha, beta = masks_of(ck.tensors, ck.spec)
    for k, t in enumerate(ck.spec.task_names):
        if manifest.tasks[t].masks != TaskMasks.of(gamma[k], alpha[k], beta[k]):
            raise BenchError(f"checkpoint {checkpoint} does not belong to artifact {artifact_dir}: task {t!r} "
                             "has other masks in the checkpoint than in the artifact; pass the checkpoint the "
                             "artifact was compiled from")


# ---------------------------------------------------------------------------------------------------
# benchmark


def benchmark(artifact_dir: str | os.PathLike, checkpoint: str | os.PathLike, *,
              batches: Sequence[int] = (1, 8, 32), backend: str = "auto", threads: int | None = None,
              warmup: int = 5, min_reps: int = 20, min_seconds: float = 1.0, device: str = "cpu",
              bare: bool = True, seed: int = 0, precisions: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure (a)-(e) (see the module docstring) side by side for each batch size; returns a
    JSON-able dict: ``machine``, ``config``, ``variants`` (per variant: label, FLOPs, MACs and
    parameters per image, held parameters, build memory), ``batches`` (str(batch) -> ``variants``
    (latency stats, ``peak_rss_mb``) and ``ratios``), ``naive_export``.

    Takes the artifact directory, the reduced checkpoint it was compiled from, the batch sizes,
    the engine backend (`BACKENDS`), the thread count (``torch.set_num_threads`` and ONNX Runtime's
    ``intra_op_num_threads``; None: the libraries' defaults), warm-up calls per variant, the
    minimum repetitions and seconds per batch size, the device of the PyTorch variants and of the
    naive export's session (``cpu`` or ``cuda``), whether to time bare ONNX Runtime sessions of the
    compiled files, the seed of the random inputs, and the precisions to time beside fp32
    (`dagc.tools.bench_precision`; None: every one the artifact has).

    Raises BenchError (see the module docstring), the engine's ArtifactError for a missing or
    tampered artifact, CheckpointError for an unreadable checkpoint.
    """
    engines = bench_precision.engine_backends()
    if backend not in engines:
        raise BenchError(f"unknown backend {backend!r}; choose one of {list(engines)}")
    if device not in ("cpu", "cuda"):
        raise BenchError(f"unknown device {device!r}; choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("device 'cuda' needs a CUDA GPU and a CUDA build of PyTorch; none is available")
    batches = [int(b) for b in batches]
    if not batches or any(b < 1 for b in batches) or len(set(batches)) != len(batches):
        raise BenchError(f"batch sizes must be distinct positive integers, got {list(batches)}")
    if threads is not None and int(threads) < 1:
        raise BenchError(f"threads must be a positive integer, got {threads}")
    if warmup < 0 or min_reps < 1 or min_seconds < 0:
        raise BenchError("warmup must be >= 0, min_reps >= 1 and min_seconds >= 0")
    artifact_dir, checkpoint = Path(artifact_dir), Path(checkpoint)
    try:
        manifest = load_manifest(artifact_dir)
    except DagcError as e:
        raise BenchError(f"cannot read artifact {artifact_dir}: {e}") from None
    bench_precision.check_requested(manifest, precisions, backend, artifact_dir)
    ck = load_checkpoint(checkpoint)
    _check_pair(manifest, ck, artifact_dir, checkpoint)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        run = _Bench(manifest, ck, artifact_dir, sorted(batches), backend, threads, device, seed)
        run.build_all(bare, precisions)
        run.time_all(warmup, min_reps, min_seconds, seed)
        return run.result(checkpoint, warmup, min_reps, min_seconds)
    finally:
        torch.set_num_threads(old_threads)


class _EngineRunner:
    """``engine.run(images, tasks)`` as a runner: the engine's inputs, the outputs of ``tasks``
    (None: all)."""

    def __init__(self, engine: Engine, tasks: Sequence[str] | None) -> None:
        self.engine = engine
        self.tasks = None if tasks is None else list(tasks)
        self.inputs = tuple(engine.input_spec["names"])
        self.outputs = tuple(engine.tasks if tasks is None else tasks)

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        images = feeds[self.inputs[0]] if len(self.inputs) == 1 else feeds
        return self.engine.run(images, self.tasks if outputs is None else outputs)


def _call(runner: Runner, inputs: dict[int, dict[str, np.ndarray]]) -> Callable[[int], dict[str, np.ndarray]]:
    """call(batch) -> runner's outputs on that batch's inputs (the feeds are selected once, here,
    so that a timed call is the runner's call only)."""
    feeds = {b: {n: x[n] for n in runner.inputs} for b, x in inputs.items()}
    return lambda b: runner.run(feeds[b])


def _theta_count(net: CentralNetwork) -> int:
    return sum(p.numel() for p in net.weight_parameters())


class _Bench:
    """One benchmark: the variants (runners) built one after another with their memory measured,
    the naive export checked against the masked supernet, then all timed round-robin."""

    def __init__(self, manifest: Manifest, ck: Checkpoint, artifact_dir: Path, batches: list[int], backend: str,
                 threads: int | None, device: str, seed: int) -> None:
        self.manifest, self.ck, self.artifact_dir = manifest, ck, artifact_dir
        self.spec = ck.spec
        self.tasks = list(self.spec.task_names)
        self.batches, self.backend, self.threads, self.device = batches, backend, threads, device
        self.mem = Memory()
        rng = np.random.default_rng(seed)
        shape = (self.spec.in_channels, *self.spec.input_size)
        self.inputs = {b: {n: rng.standard_normal((b, *shape)).astype(np.float32) for n in manifest.input.names}
                       for b in batches}
        self.variants: dict[str, dict[str, Any]] = {}
        self.runners: dict[str, Runner] = {}
        self.calls: dict[str, Callable[[int], Any]] = {}
        self.results: dict[str, dict[str, Any]] = {str(b): {"variants": {}} for b in batches}
        self.export_info: dict[str, Any] = {}
        self.exported: dict[int | None, bytes] = {}
        self.masked_net: CentralNetwork | None = None
        self.engines: dict[str | None, Engine] = {}

    # ------------------------------------------------------------------ building
    def build_all(self, bare: bool, precisions: Sequence[str] | None = None) -> None:
        """Build (a)-(e), check the naive export, then the bare sessions and unchecked engines
        (only when the engine's backend is onnxruntime)."""
        costs = self.manifest.costs
        unshared = graph_costs(build_graph(self.spec, self.ck.tensors))
        self.add("supernet", "(a) unpruned supernet, PyTorch", self._supernet, costs.supernet.to_dict())
        self.add("masked", "(b) masked supernet, PyTorch", self._masked, unshared)
        self._export_naive()
        self.add("naive_onnx", "(c) masked supernet, naive ONNX export, ONNX Runtime", self._naive, unshared)
        self._check_naive()
        self.add("shared", "(d) compiled shared model, runtime", self._engine(None), costs.shared.to_dict())
        for t in self.tasks:
            self.add(f"task:{t}", f"(e) compiled {t} model, runtime", self._engine(t), costs.per_task[t].to_dict())
        bench_precision.add_variants(self, _EngineRunner, costs.shared.to_dict(), precisions)  # int8, OpenVINO...
        if bare and backends.backend(self.engines[None].backend).bench_host:
            self.add("bare:shared", "compiled shared model, bare ONNX Runtime session", self._bare(None),
                     costs.shared.to_dict())
            for t in self.tasks:
                self.add(f"bare:{t}", f"compiled {t} model, bare ONNX Runtime session", self._bare(t),
                         costs.per_task[t].to_dict())
                self.add(f"unchecked:{t}", f"compiled {t} model, runtime, check_values=False",
                         self._engine(t, check_values=False), costs.per_task[t].to_dict())

    def add(self, key: str, label: str, build: Callable[[], tuple[Runner, int]], c: dict[str, Any]) -> None:
        """Build one variant (``build() -> (runner, parameters held)``) and make its first call at
        each batch size, measuring memory."""
        base = self.mem.baseline()
        t0 = time.perf_counter()
        runner, held = build()
        build_s = time.perf_counter() - t0
        model_mb = (self.mem.current() - base) / 2**20
        self.runners[key] = runner
        self.calls[key] = call = _call(runner, self.inputs)
        self.variants[key] = {"label": label, "flops": int(c["flops"]), "macs": int(c["macs"]),
                              "params": int(c["params"]), "params_held": int(held),
                              "model_rss_mb": round(model_mb, 2), "build_seconds": round(build_s, 3)}
        for b in self.batches:  # first call at each batch (ascending): weights + workspace
            out = call(b)
            peak_mb = (self.mem.peak() - base) / 2**20
            self.results[str(b)]["variants"][key] = {"peak_rss_mb": round(peak_mb, 2)}
            del out

    def _supernet(self) -> tuple[Runner, int]:
        net = CentralNetwork(self.spec)
        load_network_tensors(net, {k: v for k, v in self.ck.tensors.items() if not k.startswith("mask.")})
        net = net.eval().to(self.device)
        return SupernetRunner(net), _theta_count(net)

    def _masked(self) -> tuple[Runner, int]:
        net = network_from_checkpoint(self.ck).eval().to(self.device)
        self.masked_net = net
        return SupernetRunner(net), _theta_count(net)

    def _export_naive(self) -> None:
        """The export itself (timed, not part of (c)'s memory): one dynamic-batch model, or one
        static model per batch size if the dynamic export fails."""
        net, batches = self.masked_net, self.batches
        try:
            data, info = naive_export(net.cpu(), batches[0], dynamic=True)
            self.exported[None] = data
        except Exception as e:  # noqa: BLE001 - fall back to one static export per batch size
            info = {"dynamic_error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            seconds = 0.0
            for b in batches:
                data, one = naive_export(net.cpu(), b, dynamic=False)
                seconds += one["export_seconds"]
                self.exported[b] = data
            info = {**one, **info, "export_seconds": round(seconds, 3)}
        finally:
            net.to(self.device)
        self.export_info.update(info)
        model = onnx.load_from_string(data)
        self.export_info["params_held"] = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        self.export_info["onnx_bytes"] = len(data)
        self.export_info["onnx_nodes"] = len(model.graph.node)

    def _naive(self) -> tuple[Runner, int]:
        runner = NaiveRunner(self.exported, self.threads, self.device)
        self.exported = {}
        return runner, self.export_info["params_held"]

    def _check_naive(self) -> None:
        """The naive export against the masked supernet, at every batch size (`dagc.runners.compare`)."""
        errors = {}
        for b in self.batches:
            worst = compare(self.runners["naive_onnx"], self.runners["masked"], [self.inputs[b]], self.tasks,
                            rtol=NAIVE_RTOL, what=f"naive ONNX export at batch {b}", error=BenchError,
                            consequence="")
            errors[str(b)] = max(worst.values())
        self.export_info["verified_max_rel_error"] = errors
        self.export_info["verified_rtol"] = NAIVE_RTOL

    def _engine(self, task: str | None, check_values: bool = True) -> Callable[[], tuple[Runner, int]]:
        def build() -> tuple[Runner, int]:
            eng = load(self.artifact_dir, self.backend, threads=self.threads, check_values=check_values)
            if check_values:
                self.engines[task] = eng
            sel = None if task is None else [task]
            entry = self.manifest.models.get(eng.model_for(sel))  # None when several models run
            held = 0 if entry is None else entry.cost.params
            return _EngineRunner(eng, sel), held
        return build

    def _bare(self, task: str | None) -> Callable[[], tuple[Runner, int]]:
        def build() -> tuple[Runner, int]:
            name = "model.onnx" if task is None else self.manifest.tasks[task].model
            data = (self.artifact_dir / name).read_bytes()
            runner = OrtRunner(data, threads=self.threads, device=self.device)
            return runner, self.manifest.models[name].cost.params
        return build

    # ------------------------------------------------------------------ timing
    def time_all(self, warmup: int, min_reps: int, min_seconds: float, seed: int) -> None:
        """Per batch: ``warmup`` calls of each variant, then rounds of one call each in a fresh random
        order until both ``min_reps`` rounds and ``min_seconds`` are reached."""
        keys = list(self.calls)
        order_rng = np.random.default_rng(seed + 1)
        for b in self.batches:
            for _ in range(warmup):
                for k in keys:
                    self.calls[k](b)
            times: dict[str, list[float]] = {k: [] for k in keys}
            start = time.perf_counter()
            rnd = 0
            while rnd < min_reps or time.perf_counter() - start < min_seconds:
                for k in order_rng.permutation(keys):
                    t0 = time.perf_counter()
                    self.calls[k](b)
                    times[k].append(time.perf_counter() - t0)
                rnd += 1
            entry = self.results[str(b)]
            for k in keys:
                entry["variants"][k].update(latency_stats(times[k], b))
            entry["ratios"] = {**_ratios(entry["variants"], self.variants, self.tasks),
                               **bench_precision.ratios(entry["variants"])}

    def result(self, checkpoint: Path, warmup: int, min_reps: int, min_seconds: float) -> dict[str, Any]:
        """The JSON-able result (see `benchmark`)."""
        h, w = self.spec.input_size
        return {
            "machine": machine(),
            "config": {"artifact": str(self.artifact_dir), "checkpoint": str(checkpoint), "batches": self.batches,
                       "backend": self.backend, "backend_resolved": self.engines[None].backend,
                       "device": self.device, "threads": self.threads, "warmup": warmup, "min_reps": min_reps,
                       "min_seconds": min_seconds,
                       "input": {"names": list(self.manifest.input.names), "shape": [self.spec.in_channels, h, w]},
                       "tasks": self.tasks, "preset": self.spec.preset, "memory_method": self.mem.method,
                       "timing": "time.perf_counter per batch call; variants round-robin, random order each round"},
            "variants": self.variants,
            "naive_export": self.export_info,
            "batches": self.results,
            "precision_metrics": bench_precision.metric_deltas(self.manifest),
        }


def _ratios(stats: dict[str, dict], variants: dict[str, dict], tasks: list[str]) -> dict[str, Any]:
    d = stats["shared"]["p50_ms"]
    fd = variants["shared"]["flops"]
    out: dict[str, Any] = {}
    for x in ("supernet", "masked", "naive_onnx"):
        speedup = stats[x]["p50_ms"] / d
        fr = variants[x]["flops"] / fd
        out[f"shared_vs_{x}"] = {"speedup": speedup, "flops_ratio": fr, "efficiency": speedup / fr}
    per_task = {}
    for t in tasks:
        e = stats[f"task:{t}"]["p50_ms"]
        row = {"latency_vs_shared": e / d, "flops_vs_shared": variants[f"task:{t}"]["flops"] / fd}
        if f"bare:{t}" in stats:
            row["latency_vs_bare"] = e / stats[f"bare:{t}"]["p50_ms"]
            row["unchecked_vs_bare"] = stats[f"unchecked:{t}"]["p50_ms"] / stats[f"bare:{t}"]["p50_ms"]
        per_task[t] = row
    out["per_task"] = per_task
    if "bare:shared" in stats:
        out["shared_vs_bare"] = d / stats["bare:shared"]["p50_ms"]
    return out

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
supernet.
"""

from __future__ import annotations

import ctypes
import datetime
import io
import json
import os
import platform
import resource
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dagc.errors import BenchError, DagcError

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")
NAIVE_RTOL = 1e-4

__all__ = ["BenchError", "benchmark", "format_table", "plot", "write_json", "naive_export", "BACKENDS"]



# ---------------------------------------------------------------------------------------------------
# memory


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class _Memory:
    """Peak RSS growth: VmHWM after a reset via /proc/self/clear_refs, else ru_maxrss."""

    def __init__(self) -> None:
        self.hwm = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm = _proc_status("VmHWM") is not None and _proc_status("VmRSS") is not None
        except OSError:
            self.hwm = False
        self._trim = None
        if sys.platform.startswith("linux"):
            try:
                self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                self._trim = None
        self.method = ("Linux VmHWM (peak resident set, reset via /proc/self/clear_refs) minus VmRSS before "
                       "the variant was built" if self.hwm else
                       "growth of resource.getrusage(RUSAGE_SELF).ru_maxrss (a lower bound)")

    @staticmethod
    def _maxrss() -> int:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r) if sys.platform == "darwin" else int(r) * 1024

    def baseline(self) -> int:
        if self._trim is not None:
            self._trim(0)
        if self.hwm:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _proc_status("VmRSS") or 0
        return self._maxrss()

    def current(self) -> int:
        return (_proc_status("VmRSS") or 0) if self.hwm else self._maxrss()

    def peak(self) -> int:
        return (_proc_status("VmHWM") or 0) if self.hwm else self._maxrss()


# ---------------------------------------------------------------------------------------------------
# the naive export


def _wrapper(net):
    import torch

    spec = net.spec

    class NaiveWrapper(torch.nn.Module):
        """The masked supernet with tensor inputs and a tuple of task outputs (what export needs)."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, *xs):
            if spec.shared_input:
                out = self.net(xs[0])
            else:
                out = self.net(dict(zip(spec.task_names, xs)))
            return tuple(out[t] for t in spec.task_names)

    return NaiveWrapper().eval()


def naive_export(net, batch: int, *, dynamic: bool = True) -> tuple[bytes, dict[str, Any]]:
    """Export the masked supernet ``net`` with ``torch.onnx.export``; returns (ONNX bytes, info).

    The TorchScript exporter (``dynamo=False``) traces the network, so the masks' Python branches
    are baked in: the stacked lanes, gathers and index-adds are exported as they run. Two changes
    are unavoidable: (1) the dynamo exporter (``dynamo=True``) cannot trace the network at all (its
    lane selection reads the masks with ``.tolist()``, a data-dependent branch), so the TorchScript
    exporter is used; (2) it refuses the stacked ASPP heads' zero-padded grouped-convolution weight
    (``F.pad``: "convolution for kernel of unknown shape"), so during the export the padding is done
    by concatenating zeros (same values). With ``dynamic`` the batch axis is dynamic (one export for
    every batch size); otherwise the model is exported at ``batch``.
    """
    import torch

    spec = net.spec
    h, w = spec.input_size
    names = ["image"] if spec.shared_input else [f"image_{t}" for t in spec.task_names]
    example = tuple(torch.zeros(batch, spec.in_channels, h, w) for _ in names)
    buf = io.BytesIO()
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_wrapper(net), example, buf, dynamo=False, input_names=names,
                          output_names=list(spec.task_names), opset_version=17,
                          dynamic_axes={n: {0: "batch"} for n in names} if dynamic else None)
    info = {"exporter": f"torch.onnx.export(dynamo=False), torch {torch.__version__}, opset 17",
            "dynamic_batch": dynamic, "export_seconds": round(time.perf_counter() - t0, 3),
            "note": "TorchScript exporter (the dynamo exporter fails on the masks' data-dependent "
                    "lane selection)"}
    return buf.getvalue(), info


def _ort_session(data: bytes, threads: int | None, device: str):
    import onnxruntime as ort

    from dagc.runners import session_options

    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        providers = [p for p in ("CUDAExecutionProvider",) if p in ort.get_available_providers()] + providers
    return ort.InferenceSession(data, session_options(threads), providers=providers)


# ---------------------------------------------------------------------------------------------------
# checks


def _check_pair(manifest: dict, ck, artifact_dir: Path, checkpoint: Path) -> None:
    from dagc.compiler.ir import masks_of

    spec_json = json.loads(json.dumps(ck.spec.to_dict()))
    if manifest.get("spec") != spec_json:
        a = manifest.get("spec", {})
        diffs = sorted(k for k in set(a) | set(spec_json) if a.get(k) != spec_json.get(k))
        raise BenchError(f"checkpoint {checkpoint} does not belong to artifact {artifact_dir}: their network "
                         f"specs differ (in {', '.join(diffs) or 'the spec'}); pass the checkpoint the "
                         "artifact was compiled from")
    if not ck.reduced:
        raise BenchError(f"checkpoint {checkpoint} has not been reduced (no masks), so it cannot be the one "
                         f"artifact {artifact_dir} was compiled from")
    gamma, alpha, beta = masks_of(ck.tensors, ck.spec)
    for k, t in enumerate(ck.spec.task_names):
        m = manifest["tasks"][t]["masks"]
        if (m["gamma"] != gamma[k].tolist() or m["alpha"] != alpha[k].tolist()
                or m["beta"] != beta[k].tolist()):
            raise BenchError(f"checkpoint {checkpoint} does not belong to artifact {artifact_dir}: task {t!r} "
                             "has other masks in the checkpoint than in the artifact; pass the checkpoint the "
                             "artifact was compiled from")


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    from dagc.compiler.verify import relative_error

    return relative_error(got, ref)


# ---------------------------------------------------------------------------------------------------
# benchmark


def _stats(times_s: list[float], batch: int) -> dict[str, Any]:
    ms = np.asarray(times_s) * 1e3
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return {"reps": len(ms), "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(ms.mean()),
            "min_ms": float(ms.min()), "throughput_ips": batch / (p50 / 1e3)}


def _machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "usable_cpus": usable,
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def benchmark(artifact_dir: str | os.PathLike, checkpoint: str | os.PathLike, *,
              batches: Sequence[int] = (1, 8, 32), backend: str = "auto", threads: int | None = None,
              warmup: int = 5, min_reps: int = 20, min_seconds: float = 1.0, device: str = "cpu",
              bare: bool = True, seed: int = 0) -> dict[str, Any]:
    """Measure (a)-(e) (see the module docstring) side by side for each batch size; returns a
    JSON-able dict: ``machine``, ``config``, ``variants`` (per variant: label, FLOPs, MACs and
    parameters per image, held parameters, build memory), ``batches`` (str(batch) -> ``variants``
    (latency stats, ``peak_rss_mb``) and ``ratios``), ``naive_export``.

    Takes the artifact directory, the reduced checkpoint it was compiled from, the batch sizes,
    the engine backend (`BACKENDS`), the thread count (``torch.set_num_threads`` and ONNX Runtime's
    ``intra_op_num_threads``; None: the libraries' defaults), warm-up calls per variant, the
    minimum repetitions and seconds per batch size, the device of the PyTorch variants and of the
    naive export's session (``cpu`` or ``cuda``), whether to time bare ONNX Runtime sessions of the
    compiled files, and the seed of the random inputs.

    Raises BenchError (see the module docstring), the engine's ArtifactError for a missing or
    tampered artifact, CheckpointError for an unreadable checkpoint.
    """
    import torch

    from dagc.artifact import read_manifest
    from dagc.checkpoint import load_checkpoint
    from dagc.compiler.flops import graph_costs
    from dagc.compiler.ir import build_graph
    from dagc.trainer.network import CentralNetwork, load_network_tensors, network_from_checkpoint

    if backend not in BACKENDS:
        raise BenchError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
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
    batches = sorted(batches)
    artifact_dir, checkpoint = Path(artifact_dir), Path(checkpoint)
    try:
        manifest = read_manifest(artifact_dir)
    except DagcError as e:
        raise BenchError(f"cannot read artifact {artifact_dir}: {e}") from None
    ck = load_checkpoint(checkpoint)
    _check_pair(manifest, ck, artifact_dir, checkpoint)
    from dagc.runtime import load

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _run(manifest, ck, artifact_dir, checkpoint, batches, backend, threads, warmup, min_reps,
                    min_seconds, device, bare, seed, load, graph_costs, build_graph, CentralNetwork,
                    load_network_tensors, network_from_checkpoint)
    finally:
        torch.set_num_threads(old_threads)


def _run(manifest, ck, artifact_dir, checkpoint, batches, backend, threads, warmup, min_reps, min_seconds,
         device, bare, seed, load, graph_costs, build_graph, CentralNetwork, load_network_tensors,
         network_from_checkpoint) -> dict[str, Any]:
    import torch

    spec = ck.spec
    tasks = list(spec.task_names)
    costs = manifest["costs"]
    unshared = graph_costs(build_graph(spec, ck.tensors))
    mem = _Memory()
    dev = torch.device(device)
    h, w = spec.input_size
    input_names = list(manifest["input"]["names"])
    rng = np.random.default_rng(seed)
    inputs = {b: {n: rng.standard_normal((b, spec.in_channels, h, w)).astype(np.float32) for n in input_names}
              for b in batches}
    torch_inputs = {b: {n: torch.from_numpy(v).to(dev) for n, v in d.items()} for b, d in inputs.items()}

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def torch_call(net) -> Callable[[int], Any]:
        def call(b: int):
            x = torch_inputs[b]
            with torch.no_grad():
                out = net(x["image"]) if spec.shared_input else net(
                    {t: x[f"image_{t}"] for t in tasks})
            sync()
            return out
        return call

    def engine_input(b: int):
        return inputs[b]["image"] if spec.shared_input else inputs[b]

    def theta_count(net) -> int:
        return sum(p.numel() for p in net.weight_parameters())

    # Each variant: label, builder -> (call(batch) -> outputs, held params), FLOPs costs.
    variants: dict[str, dict[str, Any]] = {}
    calls: dict[str, Callable[[int], Any]] = {}
    export_info: dict[str, Any] = {}
    engines = {}

    def build_supernet():
        net = CentralNetwork(spec)
        load_network_tensors(net, {k: v for k, v in ck.tensors.items() if not k.startswith("mask.")})
        net = net.eval().to(dev)
        return torch_call(net), theta_count(net)

    masked_net: dict[str, Any] = {}

    def build_masked():
        net = network_from_checkpoint(ck).eval().to(dev)
        masked_net["net"] = net
        return torch_call(net), theta_count(net)

    exported: dict[Any, bytes] = {}

    def export_naive() -> None:
        """The export itself (timed, not part of (c)'s memory): one dynamic-batch model, or one
        static model per batch size if the dynamic export fails."""
        import onnx

        net = masked_net["net"]
        try:
            data, info = naive_export(net.cpu(), batches[0], dynamic=True)
            exported[None] = data
        except Exception as e:  # noqa: BLE001 - fall back to one static export per batch size
            info = {"dynamic_error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            seconds = 0.0
            for b in batches:
                data, one = naive_export(net.cpu(), b, dynamic=False)
                seconds += one["export_seconds"]
                exported[b] = data
            info = {**one, **info, "export_seconds": round(seconds, 3)}
        finally:
            net.to(dev)
        export_info.update(info)
        model = onnx.load_from_string(data)
        export_info["params_held"] = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        export_info["onnx_bytes"] = len(data)
        export_info["onnx_nodes"] = len(model.graph.node)

    def build_naive():
        sessions = {b: _ort_session(data, threads, device) for b, data in exported.items()}
        exported.clear()

        def call(b: int):
            s = sessions.get(b) or sessions[None]
            outs = s.run(tasks, inputs[b])
            return dict(zip(tasks, outs))
        return call, export_info["params_held"]

    def build_engine(task: str | None, check_values: bool = True):
        def builder():
            eng = load(artifact_dir, backend, threads=threads, check_values=check_values)
            if check_values:
                engines[task] = eng
            name = eng.model_for(None if task is None else [task])
            held = int(manifest["models"].get(name, {}).get("params", 0))
            sel = None if task is None else [task]
            return (lambda b: eng.run(engine_input(b), tasks=sel)), held
        return builder

    def build_bare(task: str | None):
        def builder():
            name = "model.onnx" if task is None else manifest["tasks"][task]["model"]
            data = (artifact_dir / name).read_bytes()
            sess = _ort_session(data, threads, device)
            outs = tasks if task is None else [task]
            feeds = manifest["models"][name]["inputs"]
            return (lambda b: dict(zip(outs, sess.run(outs, {n: inputs[b][n] for n in feeds})))), \
                int(manifest["models"][name]["params"])
        return builder

    plan: list[tuple[str, str, Callable, dict]] = [
        ("supernet", "(a) unpruned supernet, PyTorch", build_supernet, costs["supernet"]),
        ("masked", "(b) masked supernet, PyTorch", build_masked, unshared),
        ("naive_onnx", "(c) masked supernet, naive ONNX export, ONNX Runtime", build_naive, unshared),
        ("shared", "(d) compiled shared model, runtime", build_engine(None), costs["shared"]),
    ]
    plan += [(f"task:{t}", f"(e) compiled {t} model, runtime", build_engine(t), costs["per_task"][t])
             for t in tasks]

    results: dict[str, dict[str, Any]] = {str(b): {"variants": {}} for b in batches}
    reference: dict[int, dict[str, np.ndarray]] = {}
    naive_errors: dict[str, float] = {}

    def to_numpy(out) -> dict[str, np.ndarray]:
        return {t: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for t, v in out.items()}

    def add(key, label, builder, c):
        base = mem.baseline()
        t0 = time.perf_counter()
        call, held = builder()
        build_s = time.perf_counter() - t0
        model_mb = (mem.current() - base) / 2**20
        calls[key] = call
        variants[key] = {"label": label, "flops": int(c["flops"]), "macs": int(c["macs"]),
                         "params": int(c["params"]), "params_held": int(held),
                         "model_rss_mb": round(model_mb, 2), "build_seconds": round(build_s, 3)}
        for b in batches:  # first call at each batch: memory, and the naive export's check
            out = call(b)
            peak_mb = (mem.peak() - base) / 2**20
            results[str(b)]["variants"][key] = {"peak_rss_mb": round(peak_mb, 2)}
            if key == "masked":
                reference[b] = to_numpy(out)
            elif key == "naive_onnx":
                got = to_numpy(out)
                err = max(_rel_err(got[t], reference[b][t]) for t in tasks)
                naive_errors[str(b)] = err
                if not err <= NAIVE_RTOL:
                    raise BenchError(f"the naive ONNX export of the masked supernet differs from it by {err:.1e} "
                                     f"at batch {b} (relative to the output scale; tolerance {NAIVE_RTOL:.0e})")
            del out

    for key, label, builder, c in plan:
        if key == "naive_onnx":
            export_naive()
        add(key, label, builder, c)
    resolved = engines[None].backend
    if bare and resolved == "onnxruntime":
        add("bare:shared", "compiled shared model, bare ONNX Runtime session", build_bare(None), costs["shared"])
        for t in tasks:
            add(f"bare:{t}", f"compiled {t} model, bare ONNX Runtime session", build_bare(t), costs["per_task"][t])
            add(f"unchecked:{t}", f"compiled {t} model, runtime, check_values=False",
                build_engine(t, check_values=False), costs["per_task"][t])
    reference.clear()
    export_info["verified_max_rel_error"] = naive_errors
    export_info["verified_rtol"] = NAIVE_RTOL

    keys = list(calls)
    order_rng = np.random.default_rng(seed + 1)
    for b in batches:
        for _ in range(warmup):
            for k in keys:
                calls[k](b)
        times: dict[str, list[float]] = {k: [] for k in keys}
        start = time.perf_counter()
        rnd = 0
        while rnd < min_reps or time.perf_counter() - start < min_seconds:
            for k in order_rng.permutation(keys):
                t0 = time.perf_counter()
                calls[k](b)
                times[k].append(time.perf_counter() - t0)
            rnd += 1
        entry = results[str(b)]
        for k in keys:
            entry["variants"][k].update(_stats(times[k], b))
        entry["ratios"] = _ratios(entry["variants"], variants, tasks)

    return {
        "machine": _machine(),
        "config": {"artifact": str(artifact_dir), "checkpoint": str(checkpoint), "batches": batches,
                   "backend": backend, "backend_resolved": resolved, "device": device, "threads": threads,
                   "warmup": warmup, "min_reps": min_reps, "min_seconds": min_seconds,
                   "input": {"names": input_names, "shape": [spec.in_channels, h, w]}, "tasks": tasks,
                   "preset": spec.preset, "memory_method": mem.method,
                   "timing": "time.perf_counter per batch call; variants round-robin, random order each round"},
        "variants": variants,
        "naive_export": export_info,
        "batches": results,
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


# ---------------------------------------------------------------------------------------------------
# output


def format_table(result: dict[str, Any]) -> str:
    """One screen: per batch each variant's p50/p90 ms, throughput, MFLOPs per image and peak
    memory; then the ratios of the shared model over (a), (b), (c) and of each task's model."""
    m, cfg = result["machine"], result["config"]
    lines = [f"{m['cpu'] or m['platform']}, {m['usable_cpus']} CPUs, threads {cfg['threads'] or 'default'}; "
             f"torch {m['torch']}, onnxruntime {m['onnxruntime']}; backend {cfg['backend_resolved']}, "
             f"device {cfg['device']}; input {'x'.join(map(str, cfg['input']['shape']))}"]
    variants = result["variants"]
    for b, entry in result["batches"].items():
        lines += ["", f"batch {b}",
                  f"  {'variant':<22}{'p50 ms':>10}{'p90 ms':>10}{'img/s':>10}{'MFLOPs':>11}{'peak MB':>9}"]
        for k, s in entry["variants"].items():
            lines.append(f"  {k:<22}{s['p50_ms']:>10.3f}{s['p90_ms']:>10.3f}{s['throughput_ips']:>10.1f}"
                         f"{variants[k]['flops'] / 1e6:>11.2f}{s['peak_rss_mb']:>9.1f}")
        r = entry["ratios"]
        parts = [f"{x[len('shared_vs_'):]} {v['speedup']:.2f}x (FLOPs {v['flops_ratio']:.2f}x, eff. "
                 f"{v['efficiency']:.2f})" for x, v in r.items() if x.startswith("shared_vs_") and isinstance(v, dict)]
        lines.append("  shared model vs " + "; ".join(parts))
        task_parts = []
        for t, v in r["per_task"].items():
            s = f"{t} {v['latency_vs_shared']:.2f} of shared"
            if "latency_vs_bare" in v:
                s += f", {v['latency_vs_bare']:.2f} of bare ({v['unchecked_vs_bare']:.2f} unchecked)"
            task_parts.append(s)
        lines.append("  one task via runtime: " + "; ".join(task_parts))
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``result`` as indented JSON, atomically."""
    from dagc.checkpoint import write_atomic

    text = json.dumps(result, indent=1, allow_nan=False) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be read

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, write)


def plot(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Latency (p50, ms, log scale) against batch size, one line per variant; PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dagc.checkpoint import write_atomic

    batches = [int(b) for b in result["batches"]]
    fig, ax = plt.subplots(figsize=(9.5, 4.8), dpi=110)
    colors = plt.get_cmap("tab20").colors
    for i, (k, info) in enumerate(result["variants"].items()):
        ys = [result["batches"][str(b)]["variants"][k]["p50_ms"] for b in batches]
        style = "--" if k.startswith("bare:") else ":" if k.startswith("task:") else "-"
        ax.plot(batches, ys, style, marker="o", color=colors[i % len(colors)], label=k if k.startswith(("task:", "bare:")) else info["label"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("latency per batch, p50 (ms)")
    cfg = result["config"]
    ax.set_title(f"{cfg.get('preset') or 'model'} {'x'.join(map(str, cfg['input']['shape'][1:]))}, "
                 f"{cfg['device']}, backend {cfg['backend_resolved']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, 0o644)

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(path, write)
    finally:
        plt.close(fig)

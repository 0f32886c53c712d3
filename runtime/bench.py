"""`dagc bench`: the compiled models against the models they came from, side by side in one process.

Variants, per batch size:
    (a) supernet        the unpruned supernet (σ-weighted, every edge, every task), PyTorch eager
    (b) masked          the masked supernet (what research code runs at test time), PyTorch eager
    (c) naive_onnx      (b) exported as is with torch.onnx.export, in ONNX Runtime
    (d) compiled        the compiled shared model through `dagc.runtime` (all tasks)
    (e) task:<t>        each task through `dagc.runtime` (its per-task model)
    (f) raw:<t>         the same per-task ONNX file in a bare ONNX Runtime session, to show what
                        the runtime itself costs on top

Variants run round-robin, one call each per round, so machine noise hits all of them alike.
Peak memory is the growth of the process's maximum resident set size (`ru_maxrss`) over each
variant's warm-up, measured in order of expected size; a variant that stays below an earlier
peak shows 0, so read it as an upper-bound indicator, not an exact figure.
"""

from __future__ import annotations

import io
import json
import os
import platform
import resource
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from dagc.checkpoint import load_checkpoint, write_atomic
from dagc.errors import DagcError
from dagc.spec import Spec
from dagc.trainer.network import CentralNetwork, load_network_tensors, network_from_checkpoint


class BenchError(DagcError):
    """The artifact and checkpoint do not belong together, or the benchmark cannot run."""


def _session(model: bytes | str, threads: int | None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _naive_export(net: CentralNetwork, example: list[torch.Tensor]) -> bytes:
    """torch.onnx.export of the masked supernet as it is (dynamic batch)."""
    spec = net.spec

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, *xs):
            # One task at a time, as research code evaluates: the stacked heads concatenate their
            # weights at run time, which the TorchScript exporter cannot trace.
            if spec.shared_input:
                return tuple(self.net(xs[0], tasks=[t])[t] for t in spec.task_names)
            return tuple(self.net({t: x}, tasks=[t])[t] for t, x in zip(spec.task_names, xs, strict=True))

    names = ["image"] if spec.shared_input else [f"image_{t}" for t in spec.task_names]
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter: the torch.export-based one cannot export the hard-mode network,
        # whose Python control flow reads the masks. It warns that it is deprecated.
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper().eval(), tuple(example), buf, dynamo=False, opset_version=17,
                          input_names=names, output_names=list(spec.task_names),
                          dynamic_axes={n: {0: "batch"} for n in names})
    return buf.getvalue()


def benchmark(artifact_dir: str | Path, checkpoint: str | Path, *, batches=(1, 8, 32), backend: str = "auto",
              threads: int | None = None, warmup: int = 3, min_reps: int = 20, min_seconds: float = 1.0,
              seed: int = 0) -> dict[str, Any]:
    """Measure every variant at every batch size; returns a JSON-able dict (see module doc).

    Raises BenchError if the checkpoint is not the one the artifact was compiled from (different
    spec) or the naive export disagrees with the masked supernet; ArtifactError / InputError from
    the runtime; CheckpointError for a bad checkpoint.
    """
    from dagc.runtime import load

    if threads is not None:
        torch.set_num_threads(threads)
    engine = load(artifact_dir, backend=backend, threads=threads)
    manifest = engine.manifest
    ck = load_checkpoint(checkpoint)
    if Spec.from_dict(manifest["spec"]) != ck.spec:
        raise BenchError(f"{checkpoint} is not the checkpoint {artifact_dir} was compiled from (their specs differ)")
    spec = ck.spec
    soft = CentralNetwork(spec)
    load_network_tensors(soft, {k: v for k, v in ck.tensors.items() if not k.startswith("mask.")})
    soft.eval()
    masked = network_from_checkpoint(ck).eval()
    costs = manifest["costs"]
    names = list(manifest["input"]["names"])
    shape = (spec.in_channels, *spec.input_size)
    rng = np.random.default_rng(seed)

    x_export = [torch.from_numpy(rng.standard_normal((2, *shape)).astype(np.float32)) for _ in names]
    t0 = time.perf_counter()
    naive = _session(_naive_export(masked, x_export), threads)
    export_seconds = time.perf_counter() - t0
    raw = {t: _session(str(Path(artifact_dir) / f"task_{t}.onnx"), threads) for t in spec.task_names}

    def torch_call(net):
        def call(xs):
            with torch.inference_mode():
                x = torch.from_numpy(xs[0]) if spec.shared_input else {
                    t: torch.from_numpy(a) for t, a in zip(spec.task_names, xs, strict=True)}
                return {k: v.numpy() for k, v in net(x).items()}
        return call

    def feed(xs):
        return xs[0] if spec.shared_input else dict(zip(names, xs, strict=True))

    variants: dict[str, tuple[Callable, dict]] = {}
    for t in spec.task_names:  # smallest first, for the peak-memory reading
        task_input = [engine.input_spec["task_inputs"][t]]
        idx = [names.index(i) for i in task_input]
        variants[f"raw:{t}"] = (lambda xs, t=t, idx=idx, ti=task_input: dict(zip([t], raw[t].run(
            [t], {n: xs[i] for n, i in zip(ti, idx, strict=True)}), strict=True)), costs["per_task"][t])
        variants[f"task:{t}"] = (lambda xs, t=t: engine.run(feed(xs) if spec.shared_input else
                                                            {t: xs[names.index(engine.input_spec['task_inputs'][t])]},
                                                            tasks=[t]), costs["per_task"][t])
    variants["compiled"] = (lambda xs: engine.run(feed(xs)), costs["shared"])
    variants["naive_onnx"] = (lambda xs: dict(zip(spec.task_names, naive.run(list(spec.task_names),
                                                                             dict(zip(names, xs, strict=True))),
                                                  strict=True)), costs["unshared"])
    variants["masked"] = (torch_call(masked), costs["unshared"])
    variants["supernet"] = (torch_call(soft), costs["supernet"])

    per_batch = {}
    for b in batches:
        xs = [rng.standard_normal((b, *shape)).astype(np.float32) for _ in names]
        ref = variants["masked"][0](xs)
        got = variants["naive_onnx"][0](xs)
        for t in spec.task_names:
            err = float(np.abs(ref[t] - got[t]).max()) / max(1.0, float(np.abs(ref[t]).max()))
            if err > 1e-4:
                raise BenchError(f"the naive ONNX export of the masked supernet differs from it on task {t!r} by {err:.1e}")
        memory = {}
        for name, (fn, _) in variants.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            for _ in range(warmup):
                fn(xs)
            memory[name] = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024.0
        times: dict[str, list[float]] = {n: [] for n in variants}
        start = time.perf_counter()
        while min(len(v) for v in times.values()) < min_reps or time.perf_counter() - start < min_seconds:
            for name, (fn, _) in variants.items():
                t0 = time.perf_counter()
                fn(xs)
                times[name].append(time.perf_counter() - t0)
        stats = {}
        for name, (_, cost) in variants.items():
            ms = np.array(times[name]) * 1e3
            p50 = float(np.percentile(ms, 50))
            stats[name] = {"p50_ms": p50, "p90_ms": float(np.percentile(ms, 90)),
                           "p99_ms": float(np.percentile(ms, 99)), "reps": len(ms),
                           "images_per_s": b / (p50 / 1e3), "flops_per_image": cost["flops"],
                           "params": cost["params"], "peak_rss_growth_mb": memory[name]}
        d = stats["compiled"]
        ratios = {}
        for other in ("supernet", "masked", "naive_onnx"):
            speedup = stats[other]["p50_ms"] / d["p50_ms"]
            flops_ratio = stats[other]["flops_per_image"] / d["flops_per_image"]
            ratios[f"compiled_vs_{other}"] = {"speedup": speedup, "flops_ratio": flops_ratio,
                                              "efficiency": speedup / flops_ratio}
        for t in spec.task_names:
            ratios[f"task:{t}_vs_raw"] = stats[f"task:{t}"]["p50_ms"] / stats[f"raw:{t}"]["p50_ms"]
        per_batch[str(b)] = {"variants": stats, "ratios": ratios}
    return {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "config": {"artifact": str(artifact_dir), "checkpoint": str(checkpoint), "backend": engine.backend,
                   "batches": list(batches), "threads": threads, "min_reps": min_reps, "min_seconds": min_seconds,
                   "input": list(shape), "tasks": list(spec.task_names)},
        "naive_export_seconds": export_seconds,
        "batches": per_batch,
    }


def format_table(result: dict[str, Any]) -> str:
    """One screen: per batch each variant's p50 latency, throughput and MFLOPs, then the ratios."""
    lines = [f"backend {result['config']['backend']}, input {tuple(result['config']['input'])}, "
             f"{result['machine']['torch_threads']} threads"]
    for b, block in result["batches"].items():
        lines += ["", f"batch {b}", f"  {'variant':<22}{'p50 ms':>10}{'p99 ms':>10}{'img/s':>10}{'MFLOPs/img':>12}"]
        for name, s in block["variants"].items():
            lines.append(f"  {name:<22}{s['p50_ms']:>10.2f}{s['p99_ms']:>10.2f}{s['images_per_s']:>10.1f}"
                         f"{s['flops_per_image'] / 1e6:>12.2f}")
        for name, r in block["ratios"].items():
            if isinstance(r, dict):
                lines.append(f"  {name:<22} speed-up {r['speedup']:6.2f}x  FLOPs ratio {r['flops_ratio']:6.2f}x  "
                             f"efficiency {r['efficiency']:.2f}")
            else:
                lines.append(f"  {name:<22} {r:6.2f}x the bare session's latency")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    text = json.dumps(result, indent=2, sort_keys=True)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Latency (p50) against batch size, one line per variant, log scale; PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [int(b) for b in result["batches"]]
    names = list(next(iter(result["batches"].values()))["variants"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        ax.plot(batches, [result["batches"][str(b)]["variants"][name]["p50_ms"] for b in batches], marker="o",
                label=name, linestyle="--" if name.startswith(("raw:", "task:")) else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title(f"dagc bench ({result['config']['backend']}, {result['machine']['torch_threads']} threads)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)

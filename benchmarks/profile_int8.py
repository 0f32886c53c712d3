"""Where int8's time goes: ONNX Runtime's per-op profiler on an artifact's fp32 and int8 shared
models, at each thread count, op type by op type (issue 22, part 5).

    python benchmarks/profile_int8.py ART [--batch 8] [--threads 1,2] [--calls 200] [--rounds 3]
                                      [--modes sequential,parallel] [--out profile.json]

For every (model, threads, execution mode) a session is profiled over ``--calls`` calls after a
warm-up, ``--rounds`` times in alternating order (so load on the machine hits every variant alike);
per op type the kernel time per call (median over rounds), its count, and the wall time per call
are reported. Kernel times add up to less than the wall time: the rest is the executor's own
work between kernels (and, with 2 threads, the time the caller waits for the worker).

``spinning`` lets the intra-op workers busy-wait between kernels (ONNX Runtime's default, which
dagc's sessions turn off). ``parallel`` is ONNX Runtime's inter-op execution mode (``ExecutionMode.ORT_PARALLEL``, ``threads``
inter-op threads, one intra-op thread each): independent branches (the tasks' heads) run at once.
Sessions use dagc's own options otherwise (`dagc.runners.session_options`: no spinning workers).
Results in benchmarks/RESULTS.md ("int8 speed: where the time goes").
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dagc.artifact import load_manifest
from dagc.manifest import Manifest
from dagc.precision_table import INT8, REFERENCE
from dagc.runners import session_options
from dagc.tools.bench_system import machine
from dagc.writing import write_atomic

MODES = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL, "spinning": ort.ExecutionMode.ORT_SEQUENTIAL,
         "parallel": ort.ExecutionMode.ORT_PARALLEL}


def shared_files(art: Path, manifest: Manifest | None = None) -> dict[str, Path]:
    """The shared model's file at fp32 and int8 (precision -> path), from ``manifest`` (default: the
    artifact's). Raises SystemExit when the artifact has no int8 shared model."""
    manifest = load_manifest(art) if manifest is None else manifest
    files = {}
    for name, m in manifest.models.items():
        precision = m.precision or REFERENCE
        if len(m.tasks) == len(manifest.spec.task_names) and m.format == "onnx" and precision in (REFERENCE, INT8):
            files[precision] = art / name
    if INT8 not in files:
        raise SystemExit(f"{art} has no int8 shared model: compile it with --precision {REFERENCE},{INT8}")
    return files


def session(path: Path, threads: int, mode: str, profile_dir: str | None) -> ort.InferenceSession:
    opts = session_options(1 if mode == "parallel" else threads)
    opts.execution_mode = MODES[mode]
    if mode == "parallel":
        opts.inter_op_num_threads = threads
    if mode == "spinning":  # ONNX Runtime's default, which dagc turns off
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(profile_dir, path.stem)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def kernel_times(trace: Path, calls: int) -> dict[str, dict[str, float]]:
    """Per op type: kernel ms per call and nodes per call, from a profiler trace of ``calls`` calls."""
    events = json.loads(trace.read_text())
    ms: dict[str, float] = collections.defaultdict(float)
    nodes: dict[str, set] = collections.defaultdict(set)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            ms[op] += e["dur"] / 1e3
            nodes[op].add(e["name"])
    return {op: {"ms": ms[op] / calls, "nodes": len(nodes[op])} for op in ms}


def profile_once(path: Path, threads: int, mode: str, feed: dict, calls: int) -> dict:
    """One profiled session: wall ms per call (unprofiled, then profiled) and kernel ms per op type."""
    with tempfile.TemporaryDirectory() as d:
        plain = session(path, threads, mode, None)
        for _ in range(5):
            plain.run(None, feed)
        t0 = time.perf_counter()
        for _ in range(calls):
            plain.run(None, feed)
        wall = (time.perf_counter() - t0) / calls * 1e3
        prof = session(path, threads, mode, d)
        for _ in range(5):
            prof.run(None, feed)
        # The warm-up calls are in the trace too; count them.
        for _ in range(calls):
            prof.run(None, feed)
        trace = Path(prof.end_profiling())
        return {"wall_ms": wall, "ops": kernel_times(trace, calls + 5)}


def profile(art: Path, batch: int, threads: list[int], modes: list[str], calls: int, rounds: int) -> dict:
    manifest = load_manifest(art)
    files = shared_files(art, manifest)
    x = np.random.default_rng(0).standard_normal((batch, *manifest.input.shape)).astype(np.float32)
    feed = {n: x for n in manifest.input.names}
    keys = [(p, t, m) for t in threads for m in modes for p in files]
    runs: dict[tuple, list[dict]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys if r % 2 == 0 else keys[::-1]:
            runs[k].append(profile_once(files[k[0]], k[1], k[2], feed, calls))
    out = {}
    for (p, t, m), rs in runs.items():
        ops = sorted({op for r in rs for op in r["ops"]})
        out[f"{p}/{t}t/{m}"] = {
            "precision": p, "threads": t, "mode": m,
            "wall_ms": statistics.median(r["wall_ms"] for r in rs),
            "ops": {op: {"ms": statistics.median(r["ops"].get(op, {"ms": 0.0})["ms"] for r in rs),
                         "nodes": max(r["ops"].get(op, {"nodes": 0})["nodes"] for r in rs)} for op in ops}}
    return out


def table(results: dict) -> str:
    """Op types as rows, variants as columns: kernel ms per call (nodes), then wall and kernel sums."""
    cols = list(results)
    ops = sorted({op for v in results.values() for op in v["ops"]},
                 key=lambda op: -max(v["ops"].get(op, {"ms": 0})["ms"] for v in results.values()))
    lines = ["| op | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for op in ops:
        cells = [f"{v['ops'][op]['ms']:.3f} ({v['ops'][op]['nodes']})" if op in v["ops"] else "–"
                 for v in results.values()]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append("| kernels, sum | " + " | ".join(f"{sum(o['ms'] for o in v['ops'].values()):.3f}"
                                                 for v in results.values()) + " |")
    lines.append("| wall per call | " + " | ".join(f"**{v['wall_ms']:.3f}**" for v in results.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--modes", default="sequential")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    modes = [m.strip() for m in a.modes.split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown --modes {unknown}; choose from {list(MODES)}")
    results = profile(a.artifact, a.batch, threads, modes, a.calls, a.rounds)
    print(table(results))
    for t in threads:
        for m in modes:
            fp32, int8 = results[f"{REFERENCE}/{t}t/{m}"], results[f"{INT8}/{t}t/{m}"]
            print(f"{t} thread(s), {m}: int8 {fp32['wall_ms'] / int8['wall_ms']:.2f}x fp32 "
                  f"({fp32['wall_ms']:.3f} / {int8['wall_ms']:.3f} ms per call)")
    if a.out is not None:
        doc = {"machine": machine(), "artifact": str(a.artifact), "batch": a.batch, "calls": a.calls,
               "rounds": a.rounds, "date": time.strftime("%Y-%m-%d"), "results": results}
        text = json.dumps(doc, indent=1) + "\n"
        write_atomic(a.out, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()

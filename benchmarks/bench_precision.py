"""The shared model at each precision of an artifact, side by side in one process, with the task
metrics the compile's accuracy check recorded.

    python benchmarks/bench_precision.py ART [ART ...] [--batch 8] [--threads 1] [--blocks 40]
        [--calls 5] [--out precision.json]

Variants (those the artifact has): the fp32 shared model and its int8 / fp16 files through the
runtime on ONNX Runtime, and on OpenVINO the fp32 file (f32), the int8 file, and the fp32 file at
bf16 (when the bf16 check passed). As in `bench_overhead.py`, the variants alternate in blocks of
``--calls`` back-to-back calls (the block order reversed every round) so that noise from other
jobs on the machine hits every variant alike; the statistic is the median block time per call,
and the ratio of each variant to fp32 is taken per round (median over rounds). Inputs are seeded
standard-normal noise (the speed does not depend on the values). Results in benchmarks/RESULTS.md
("Reduced precision").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from dagc.artifact import load_manifest
from dagc.checkpoint import write_atomic
from dagc.runtime import load
from dagc.tools.bench_precision import metric_deltas, variants
from dagc.tools.bench_system import machine


def time_side_by_side(engines: dict, feed, blocks: int, calls: int, reference: str) -> dict:
    """Median ms per call of each engine, timed in alternating order block by block, and the
    median per-block ratio of ``reference``'s time to each engine's."""
    for e in engines.values():  # sessions are created on first use; then warm up
        for _ in range(3):
            e.run(feed)
    keys = list(engines)
    per_call: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(blocks):
        for k in keys if r % 2 == 0 else keys[::-1]:
            t0 = time.perf_counter()
            for _ in range(calls):
                engines[k].run(feed)
            per_call[k].append((time.perf_counter() - t0) / calls * 1e3)
    ref = np.asarray(per_call[reference])
    return {"p50_ms": {k: float(np.median(v)) for k, v in per_call.items()},
            "speedup_vs_fp32": {k: float(np.median(ref / np.asarray(v))) for k, v in per_call.items()}}


def measure(art: Path, batch: int, threads: int, blocks: int, calls: int) -> dict:
    """One artifact: per variant the median ms per call, and the median per-round ratio to fp32."""
    manifest = load_manifest(art)
    engines = {"shared": load(art, "onnxruntime", threads=threads)}
    for key, (backend, p) in variants(manifest, "onnxruntime").items():
        engines[key] = load(art, backend, threads=threads, precision=p)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *manifest.input.shape)).astype(np.float32)
    feed = x if len(manifest.input.names) == 1 else {n: x for n in manifest.input.names}
    timing = time_side_by_side(engines, feed, blocks, calls, reference="shared")
    return {"artifact": str(art), "preset": manifest.spec.preset, "input": list(manifest.input.shape),
            "flops_per_image": manifest.costs.shared.flops, "models": {k: e.model_for() for k, e in engines.items()},
            **timing, "metrics": metric_deltas(manifest)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    result = {"machine": machine(), "batch": a.batch, "threads": a.threads, "blocks": a.blocks, "calls": a.calls,
              "artifacts": [measure(p, a.batch, a.threads, a.blocks, a.calls) for p in a.artifacts]}
    for r in result["artifacts"]:
        print(f"{r['artifact']} ({r['preset']}, {'x'.join(map(str, r['input']))}, "
              f"{r['flops_per_image'] / 1e6:.1f} MFLOPs/image), batch {a.batch}, {a.threads} thread(s):")
        for k, ms in r["p50_ms"].items():
            print(f"  {k:<16}{r['models'][k]:<22}{ms:>9.2f} ms  {r['speedup_vs_fp32'][k]:>5.2f}x fp32")
        for p, tasks in r["metrics"].items():
            print(f"  {p}: " + "; ".join(f"{t} {v['metric']} {v['fp32']:.4f} -> {v['value']:.4f} ({v['drop']:+.2%})"
                                        for t, v in tasks.items()))
    if a.out is not None:
        text = json.dumps(result, indent=1) + "\n"

        def write(tmp: str) -> None:
            Path(tmp).write_text(text)

        write_atomic(a.out, write)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""Accuracy-aware mixed precision (issue 22, part 4): the shared model at fp32, quantized whole to
int8, and int8 with the nodes `dagc.compiler.mixed_precision` keeps in fp32 under a
--max-metric-drop that whole-model int8 breaks, timed side by side in one process.

    python benchmarks/mixed_precision.py [--checkpoint CKPT] [--max-metric-drop D] [--batch 8]
        [--threads 2] [--blocks 30] [--calls 5] [--calibration-batches 8] [--out mixed_precision.json]

Without --checkpoint it trains a short run of the default configuration (synthetic data, the
dataset's preset; 40 warm-up, 80 search, 10 fine-tune iterations on 512 scenes, 64 held out).
Two compiles of fp32,int8: at the default allowance (whole-model int8: fallback ``none``) and at
--max-metric-drop (default: half the shared model's worst whole-model drop, so that whole-model
int8 fails it). The three variants alternate in blocks of --calls back-to-back calls (order
reversed every round) as in `bench_precision.py`; the statistic is the median block time per call
and the median per-round ratio to fp32. Inputs are seeded standard-normal noise. The JSON also
holds each compile's drops and fallbacks and the fp32 nodes. Numbers from a shared machine are
noisy: rerun before quoting them (RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_precision import time_side_by_side  # noqa: E402

from dagc.artifact import load_manifest  # noqa: E402
from dagc.compiler.compile import compile_artifact
from dagc.runtime import load
from dagc.tools.bench_system import machine
from dagc.trainer.train import TrainConfig, train
from dagc.writing import write_atomic

SHARED = "model.onnx"


def short_run(tmp: Path) -> Path:
    train(TrainConfig(warmup_iters=40, search_iters=80, finetune_iters=10, n_train=512, n_test=64), tmp / "run",
          progress=False)
    return tmp / "run" / "checkpoint.safetensors"


def int8_record(art: Path) -> dict:
    checks = load_manifest(art).accuracy.precisions["int8"].models
    return {n: {"fallback": c.fallback, "fp32_nodes": list(c.fp32_nodes), "drop": dict(c.drop)}
            for n, c in checks.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--max-metric-drop", type=float, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--calibration-batches", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dagc-mixed-") as tmp:
        tmp = Path(tmp)
        ckpt = a.checkpoint or short_run(tmp)
        t0 = time.perf_counter()
        compile_artifact(ckpt, tmp / "whole", precisions="fp32,int8", calibration_batches=a.calibration_batches)
        whole_s = time.perf_counter() - t0
        whole = int8_record(tmp / "whole")
        budget = a.max_metric_drop if a.max_metric_drop is not None else max(whole[SHARED]["drop"].values()) / 2
        if budget <= 0:
            sys.exit(f"whole-model int8 loses nothing on {SHARED} (worst drop {2 * budget:+.4%}): no allowance makes "
                     "it fail; give --max-metric-drop or another --checkpoint")
        t0 = time.perf_counter()
        compile_artifact(ckpt, tmp / "mixed", precisions="fp32,int8", calibration_batches=a.calibration_batches,
                         max_metric_drop=budget)
        mixed_s = time.perf_counter() - t0
        mixed = int8_record(tmp / "mixed")
        manifest = load_manifest(tmp / "whole")
        engines = {"fp32": load(tmp / "whole", "onnxruntime", threads=a.threads),
                   "int8 whole": load(tmp / "whole", "onnxruntime", threads=a.threads, precision="int8"),
                   "int8 mixed": load(tmp / "mixed", "onnxruntime", threads=a.threads, precision="int8")}
        x = np.random.default_rng(0).standard_normal((a.batch, *manifest.input.shape)).astype(np.float32)
        feed = x if len(manifest.input.names) == 1 else {n: x for n in manifest.input.names}
        timing = time_side_by_side(engines, feed, a.blocks, a.calls, reference="fp32")
    result = {"machine": machine(), "checkpoint": str(a.checkpoint or "short default run"), "batch": a.batch,
              "threads": a.threads, "blocks": a.blocks, "calls": a.calls, "max_metric_drop": budget,
              "compile_seconds": {"whole": round(whole_s, 1), "mixed": round(mixed_s, 1)},
              "whole": whole, "mixed": mixed, **timing}
    print(f"allowed drop {budget:.4%}; shared model worst drop: whole int8 {max(whole[SHARED]['drop'].values()):+.4%}"
          f" ({whole[SHARED]['fallback']}), mixed {max(mixed[SHARED]['drop'].values()):+.4%} "
          f"({mixed[SHARED]['fallback']}, {len(mixed[SHARED]['fp32_nodes'])} node(s) in fp32)")
    print(f"compile: {whole_s:.1f} s whole, {mixed_s:.1f} s with the search; batch {a.batch}, {a.threads} thread(s):")
    for k, ms in timing["p50_ms"].items():
        print(f"  {k:<12}{ms:>9.2f} ms  {timing['speedup_vs_fp32'][k]:>5.2f}x fp32")
    if a.out is not None:
        text = json.dumps(result, indent=1) + "\n"
        write_atomic(a.out, lambda tmp: Path(tmp).write_text(text))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

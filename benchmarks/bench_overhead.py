"""The runtime's own per-call cost: one task through `Engine.run` against a bare ONNX Runtime
session of the same per-task model, in one process.

    python benchmarks/bench_overhead.py [--blocks 300] [--calls 20] [--batch 1,8] [--out overhead.json]

`dagc bench` times each variant once per round in random order, which is fine for ratios of
milliseconds but too noisy to resolve a few tens of microseconds. Here the variants alternate in
blocks of ``--calls`` back-to-back calls (block order flipped every block), and the median block
time per call is compared: bare session, engine with value checks (default), engine with
``check_values=False``. Same artifact as `bench_runtime.py`'s ``tiny`` (trained briefly, 32x32,
4 tasks), one intra-op thread. The bare session is the ``InferenceSession`` of a CPU
`dagc.runners.OrtRunner`, called directly. Writes ``benchmarks/overhead.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from dagc.checkpoint import write_atomic
from dagc.compiler.compile import compile_checkpoint
from dagc.runners import OrtRunner
from dagc.runtime import load

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_runtime import tiny_checkpoint  # noqa: E402


def per_call_us(calls: dict, blocks: int, per_block: int) -> dict[str, float]:
    """Median seconds per call (in µs) of each callable, timed in alternating blocks."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    keys = list(calls)
    for f in calls.values():  # warm-up
        for _ in range(per_block):
            f()
    for b in range(blocks):
        for k in (keys if b % 2 == 0 else keys[::-1]):
            f = calls[k]
            t0 = time.perf_counter()
            for _ in range(per_block):
                f()
            times[k].append((time.perf_counter() - t0) / per_block)
    return {k: float(np.median(v) * 1e6) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=300)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--out", type=Path, default=HERE / "overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        compile_checkpoint(tiny_checkpoint(tmp), tmp / "art")
        checked = load(tmp / "art", "onnxruntime", threads=1)
        unchecked = load(tmp / "art", "onnxruntime", threads=1, check_values=False)
        c, h, w = checked.input_spec["shape"][1:]
        for batch in (int(b) for b in args.batch.split(",")):
            x = np.random.default_rng(0).standard_normal((batch, c, h, w)).astype(np.float32)
            for task in checked.tasks:
                name = checked.models_for([task])[0]
                bare = OrtRunner((tmp / "art" / name).read_bytes(), threads=1, device="cpu")
                sess, feed = bare.session, bare.inputs[0]
                calls = {"bare": lambda s=sess, t=task, f=feed, x=x: s.run([t], {f: x}),
                         "engine": lambda t=task, x=x: checked.run(x, [t]),
                         "unchecked": lambda t=task, x=x: unchecked.run(x, [t])}
                us = per_call_us(calls, args.blocks, args.calls)
                row = {"batch": batch, "task": task, "model": name, **{f"{k}_us": round(v, 1) for k, v in us.items()},
                       "engine_over_bare": us["engine"] / us["bare"],
                       "unchecked_over_bare": us["unchecked"] / us["bare"],
                       "engine_minus_bare_us": us["engine"] - us["bare"],
                       "unchecked_minus_bare_us": us["unchecked"] - us["bare"]}
                rows.append(row)
                print(f"batch {batch:>2} {task:<13} bare {us['bare']:8.1f} µs  engine {us['engine']:8.1f} "
                      f"(+{row['engine_minus_bare_us']:5.1f}, {row['engine_over_bare']:.3f}x)  unchecked "
                      f"{us['unchecked']:8.1f} (+{row['unchecked_minus_bare_us']:5.1f}, "
                      f"{row['unchecked_over_bare']:.3f}x)", flush=True)
    doc = {"rows": rows, "blocks": args.blocks, "calls_per_block": args.calls,
           "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                       "torch": torch.__version__, "onnxruntime": ort.__version__, "threads": 1},
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    text = json.dumps(doc, indent=2)
    write_atomic(args.out, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()

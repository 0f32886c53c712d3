"""CUDA training steps: stacked tasks versus one task at a time, in fp32 and bf16, side by side.

    python benchmarks/bench_gpu_train.py [--reps 50] [--json gpu_train.json] [--device cuda]

The steps of `bench_stacked` (K=3 dense tasks: segmentation, depth, normals; Adam on θ, and on
Γ, A, B in the search stage) on the GPU: the `tiny` preset at 32x32 (batch 16, the default
training setting) and `vgg16` at 64x64 (batch 8), warm-up and search stages, each in fp32 and
under ``torch.autocast(dtype=torch.bfloat16)`` (what ``dagc train --amp bf16`` does). Per
configuration the two variants alternate step by step so that clock changes hit both alike; each
step is timed with ``torch.cuda.synchronize`` before and after (``time.perf_counter``), after
``--warmup`` untimed steps, and the median is reported with the speedup of stacking. With the
defaults that is 2 presets x 2 stages x 2 precisions x 2 variants x 60 = 960 training iterations.

``--device cpu`` (or no GPU) runs the same code on the CPU with the sizes cut down, for the dry run
of ``benchmarks/gpu_check.sh``; such numbers are not GPU figures and the JSON says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stacked import TASKS, make_batch, step_one_by_one, step_stacked  # noqa: E402

from dagc.spec import preset  # noqa: E402
from dagc.trainer.network import CentralNetwork  # noqa: E402
from dagc.trainer.stages import make_optimizer  # noqa: E402

CONFIGS = {"cuda": (("tiny", (32, 32), 16), ("vgg16", (64, 64), 8)), "cpu": (("tiny", (8, 8), 2),)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(preset_name: str, size, batch: int, stage: str, precision: str, device: str, reps: int,
          warmup: int) -> dict:
    """Median step time of the stacked and the one-task-at-a-time step for one configuration."""
    torch.manual_seed(0)
    spec = preset(preset_name, TASKS, input_size=size)
    net = CentralNetwork(spec).to(device).train()
    opt = make_optimizer(net, stage, 1e-4, 1e-2)
    x, targets = make_batch(spec, batch)
    x, targets = x.to(device), {k: v.to(device) for k, v in targets.items()}
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    fns = {"stacked": step_stacked, "one_by_one": step_one_by_one}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            with autocast:
                fn(net, opt, x, targets)
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"preset": preset_name, "input": list(size), "batch": batch, "stage": stage, "precision": precision,
            "K": len(TASKS), "iterations": 2 * (warmup + reps), "stacked_ms": 1000 * med["stacked"],
            "one_by_one_ms": 1000 * med["one_by_one"], "speedup": med["one_by_one"] / med["stacked"]}


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--json", default="gpu_train.json")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu_train: no CUDA GPU here; running the CPU dry run instead (not GPU figures)", flush=True)
        device = "cpu"
    reps, warmup = (args.reps, args.warmup) if device == "cuda" else (1, 1)
    results = []
    for name, size, batch in CONFIGS[device]:
        for stage in ("warmup", "search"):
            for precision in ("fp32", "bf16"):
                results.append(bench(name, size, batch, stage, precision, device, reps, warmup))
                print(json.dumps(results[-1]), flush=True)
    report = {"machine": machine(device), "date": time.strftime("%Y-%m-%d"), "dry_run": device != "cuda",
              "timing": "torch.cuda.synchronize + time.perf_counter per step; variants alternate; median",
              "results": results}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

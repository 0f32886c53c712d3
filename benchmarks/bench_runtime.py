"""The runtime tables of benchmarks/RESULTS.md: compiled models against the supernets, side by side.

    python benchmarks/bench_runtime.py [--only tiny|vgg16] [--threads N] [--vgg-size 32] [--no-gpu]

Builds, compiles and benchmarks (`dagc.tools.bench.benchmark`, batches 1, 8, 32):

``tiny``
    the `tiny` preset at 32x32 with the 4 synthetic tasks (segmentation, depth, normal, edge),
    *trained* with `dagc train` with the defaults' iteration counts reduced (warm-up 40, search 80,
    fine-tune 10; 512 training scenes): real masks from a real (short) search, so tasks share
    states. Weights are barely trained, which does not matter for latency.
``vgg16``
    the `vgg16` preset with M = 7 and three dense tasks (segmentation 13 classes, depth, normals),
    at a CPU-sized 32x32 by default (``--vgg-size``; at 64x64 the unpruned supernet alone needs
    about 1 min per batch-32 call on 2 cores): random weights and batch-norm statistics, masks from
    the flow-based reduction of random architecture weights (`bench_compile.make_checkpoint`), and
    random per-task architecture logits (otherwise the soft supernet, whose tasks would then have
    identical weights, runs one lane for all tasks instead of one per task). Random masks share
    nothing across tasks. Fewer repetitions (1 warm-up, 3 rounds) so it fits in minutes.

Writes ``benchmarks/runtime_<name>.json`` and ``.png`` and prints the tables and the issue's goals.
When a CUDA GPU is present it also writes ``runtime_<name>_gpu.{json,png}``: the PyTorch variants on
the GPU, the naive export in ONNX Runtime's CUDA provider (when installed), the compiled models on
TensorRT plans (``--target tensorrt``) when TensorRT is installed, else ONNX Runtime.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from dagc.checkpoint import load_checkpoint, save_checkpoint
from dagc.compiler.compile import compile_checkpoint
from dagc.runners import tensorrt_unavailable
from dagc.tools.bench import benchmark, format_table, plot, write_json
from dagc.trainer.train import TrainConfig, train

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_compile import make_checkpoint  # noqa: E402

BATCHES = (1, 8, 32)


def tiny_checkpoint(tmp: Path) -> Path:
    cfg = TrainConfig(warmup_iters=40, search_iters=80, finetune_iters=10, n_train=512, n_test=64)
    train(cfg, tmp / "tiny_run", progress=False)
    return tmp / "tiny_run" / "checkpoint.safetensors"


def vgg16_checkpoint(tmp: Path, size: int) -> Path:
    path = tmp / "vgg16.safetensors"
    make_checkpoint(path, 7, size)
    ck = load_checkpoint(path)
    g = torch.Generator().manual_seed(1)
    tensors = dict(ck.tensors)
    for name in ("gamma", "alpha", "beta"):  # per-task logits, as after a search
        tensors[f"arch.{name}"] = torch.randn(tensors[f"arch.{name}"].shape, generator=g)
    save_checkpoint(path, tensors, ck.spec, ck.stage)
    return path


def goals(result: dict) -> list[str]:
    """The issue's goals, checked on one result."""
    out = []
    b8 = result["batches"].get("8")
    if b8 is not None:
        e = b8["ratios"]["shared_vs_masked"]["efficiency"]
        out.append(f"goal 1: efficiency of the shared model vs the masked supernet at batch 8 = {e:.2f} "
                   f"(>= 0.8: {'met' if e >= 0.8 else 'MISSED'})")
    for b, entry in result["batches"].items():
        r = entry["ratios"]["shared_vs_naive_onnx"]
        ok = r["speedup"] >= 0.8 * r["flops_ratio"]
        out.append(f"goal 2, batch {b}: speedup over the naive export {r['speedup']:.2f}x vs 0.8 x FLOPs ratio "
                   f"{0.8 * r['flops_ratio']:.2f}x ({'met' if ok else 'MISSED'})")
    for b, entry in result["batches"].items():
        rows = entry["ratios"]["per_task"]
        worst_shared = max(v["latency_vs_shared"] for v in rows.values())
        bare = [v["latency_vs_bare"] for v in rows.values() if "latency_vs_bare" in v]
        unchecked = [v["unchecked_vs_bare"] for v in rows.values() if "unchecked_vs_bare" in v]
        line = (f"goal 3, batch {b}: one task via the runtime costs at most {worst_shared:.2f}x the shared model")
        if bare:
            line += (f"; runtime / bare session of the per-task model: {min(bare):.2f}-{max(bare):.2f}x "
                     f"({'met' if max(bare) <= 1.05 else 'MISSED'}, 5% noise allowance); with "
                     f"check_values=False {min(unchecked):.2f}-{max(unchecked):.2f}x "
                     f"({'met' if max(unchecked) <= 1.05 else 'MISSED'})")
        out.append(line)
    return out


def run_one(name: str, ckpt: Path, tmp: Path, *, threads, warmup, min_reps, min_seconds, gpu: bool) -> None:
    t0 = time.perf_counter()
    compile_checkpoint(ckpt, tmp / f"{name}_art")
    print(f"[{name}] compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    result = benchmark(tmp / f"{name}_art", ckpt, batches=BATCHES, threads=threads, warmup=warmup,
                       min_reps=min_reps, min_seconds=min_seconds)
    result["config"]["artifact"] = result["config"]["checkpoint"] = "(temporary; see benchmarks/bench_runtime.py)"
    result["config"]["build"] = BUILD[name]
    write_json(result, HERE / f"runtime_{name}.json")
    plot(result, HERE / f"runtime_{name}.png")
    print(f"\n=== {name} (CPU), benchmark {time.perf_counter() - t0:.0f} s ===")
    print(format_table(result))
    print("\n".join(goals(result)), flush=True)
    if gpu and torch.cuda.is_available():
        target = "tensorrt" if tensorrt_unavailable() is None else "onnx"
        compile_checkpoint(ckpt, tmp / f"{name}_gpu_art", target=target, force=True)
        result = benchmark(tmp / f"{name}_gpu_art", ckpt, batches=BATCHES, backend="auto", device="cuda",
                           warmup=max(warmup, 3), min_reps=min_reps, min_seconds=min_seconds)
        result["config"]["artifact"] = result["config"]["checkpoint"] = "(temporary)"
        result["config"]["build"] = BUILD[name] + f"; compiled with --target {target}"
        write_json(result, HERE / f"runtime_{name}_gpu.json")
        plot(result, HERE / f"runtime_{name}_gpu.png")
        print(f"\n=== {name} (GPU: {result['machine']['gpu']}) ===")
        print(format_table(result))
        print("\n".join(goals(result)), flush=True)


BUILD = {
    "tiny": "tiny preset, 32x32, 4 synthetic tasks; dagc train with warm-up 40, search 80, fine-tune 10 "
            "iterations, 512 training scenes (real masks from a short search)",
    "vgg16": "vgg16 preset, M=7, segmentation(13)/depth/normal; random weights and BN statistics, masks from "
             "the flow-based reduction of random architecture weights, random per-task logits",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["tiny", "vgg16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vgg-size", type=int, default=32)
    ap.add_argument("--no-gpu", action="store_true")
    args = ap.parse_args()
    BUILD["vgg16"] = f"{BUILD['vgg16']}; input {args.vgg_size}x{args.vgg_size}"
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.only in (None, "tiny"):
            t0 = time.perf_counter()
            ckpt = tiny_checkpoint(tmp)
            print(f"[tiny] trained in {time.perf_counter() - t0:.1f} s", flush=True)
            run_one("tiny", ckpt, tmp, threads=args.threads, warmup=5, min_reps=20, min_seconds=1.0,
                    gpu=not args.no_gpu)
        if args.only in (None, "vgg16"):
            ckpt = vgg16_checkpoint(tmp, args.vgg_size)
            run_one("vgg16", ckpt, tmp, threads=args.threads, warmup=1, min_reps=3, min_seconds=0.0,
                    gpu=not args.no_gpu)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()

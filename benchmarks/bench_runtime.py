"""The runtime tables of benchmarks/RESULTS.md: compiled models against the supernets, side by side.

    python benchmarks/bench_runtime.py [--only tiny|vgg16] [--threads N] [--vgg-size 32] [--no-gpu]
    python benchmarks/bench_runtime.py --gpu-only [--json-dir DIR] [--dry-run]

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

The GPU table (when a CUDA GPU is present; ``--gpu-only`` for it alone; the vgg16 checkpoint at
64x64 there) writes ``runtime_<name>_gpu.json`` (into ``--json-dir``): everything in PyTorch on the
GPU, since that is the engine this project's GPU machine can run (no TensorRT, ONNX Runtime CPU
only) — (a) the unpruned and (b) the masked supernet in eager mode, and the compiled shared model
as AOTInductor CUDA packages in fp32, fp16 and bf16 (`dagc.compiler.aoti.build_package`, each
verified against the masked supernet on the GPU first), at batch 1, 8 and 32. Inputs and outputs
stay on the GPU (no host copies in the timings); each call is timed with ``torch.cuda.synchronize``
before and after, variants round-robin in a fresh random order per round, after warm-up calls;
p50/p90 latency, throughput, and the speedups over (a) and (b). TF32 stays at PyTorch's defaults
(on for cuDNN convolutions), as a user would run it. ``--dry-run`` (and any run without a GPU)
times the eager variants once on the CPU at batch 1 and skips the AOTInductor packages (a CPU
compile takes minutes): it checks the code path, its numbers are not GPU figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dagc.checkpoint import load_checkpoint, save_checkpoint
from dagc.compiler import aoti
from dagc.compiler.compile import compile_checkpoint, load_graph
from dagc.compiler.flops import graph_costs
from dagc.compiler.runners import SupernetRunner, load_package
from dagc.costs import supernet_costs
from dagc.tools.bench import benchmark, format_table, plot, write_json
from dagc.tools.bench_system import machine
from dagc.trainer.network import CentralNetwork, load_network_tensors
from dagc.trainer.train import TrainConfig, train

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_compile import make_checkpoint  # noqa: E402

BATCHES = (1, 8, 32)


def tiny_checkpoint(tmp: Path, device: str = "cpu", quick: bool = False) -> Path:
    iters = dict(warmup_iters=2, search_iters=2, finetune_iters=1, n_train=16, n_test=8) if quick else \
        dict(warmup_iters=40, search_iters=80, finetune_iters=10, n_train=512, n_test=64)
    train(TrainConfig(**iters, recipe="paper", device=device), tmp / "tiny_run", progress=False)
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
        gpu_table(name, ckpt, HERE)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _gpu_variants(ckpt: Path, device: str, precisions, deadline: float | None = None) -> tuple[dict, dict, dict]:
    """The GPU table's variants: key -> (callable on a device tensor, label, FLOPs per image),
    plus each package's verification error and build seconds (None: not built, because
    ``time.perf_counter()`` had passed ``deadline``)."""
    ck, net, raw, graph = load_graph(ckpt)
    if not ck.spec.shared_input:
        raise SystemExit("the GPU table needs a checkpoint whose tasks share one input")
    unpruned = CentralNetwork(ck.spec)
    load_network_tensors(unpruned, {k: v for k, v in ck.tensors.items() if not k.startswith("mask.")})
    unpruned, masked = unpruned.eval().to(device), net.eval().to(device)
    variants = {"supernet": (unpruned, "(a) unpruned supernet, PyTorch eager", supernet_costs(ck.spec)["flops"]),
                "masked": (masked, "(b) masked supernet, PyTorch eager", graph_costs(raw)["flops"])}
    errors, build_s = {}, {}
    reason = aoti.unavailable_reason(device) if precisions else None
    if reason:  # e.g. no g++ on the GPU machine: the eager rows are still worth having
        print(f"[gpu table] AOTInductor packages skipped: {reason}", flush=True)
        return variants, {p: None for p in precisions}, {"unavailable": reason}
    for p in precisions:
        t0 = time.perf_counter()
        if deadline is not None and t0 > deadline:
            errors[p] = build_s[p] = None
            print(f"[gpu table] aoti {p}: skipped, past the time budget (--budget-s)", flush=True)
            continue
        data, inputs, outputs = aoti.build_package(graph, None, device=device, precision=p)
        build_s[p] = round(time.perf_counter() - t0, 1)
        worst = aoti.verify_package(data, inputs, outputs, SupernetRunner(masked), graph, rtol=aoti.RTOL[p],
                                    device=device)
        errors[p] = max(worst.values())
        variants[f"aoti_{p}"] = (load_package(data), f"compiled shared model, AOTInductor {device} {p}",
                                 graph_costs(graph)["flops"])
        print(f"[gpu table] aoti {p}: built in {build_s[p]} s, verified max rel error {errors[p]:.1e}", flush=True)
    return variants, errors, build_s


# One function for the whole measurement: the variants, inputs and timings share the loop state.
def gpu_table(name: str, ckpt: Path, out_dir: Path, *, device: str = "cuda", batches=BATCHES, warmup: int = 10,
              reps: int = 50, precisions=("fp32", "fp16", "bf16"), deadline: float | None = None) -> dict:
    """Time the GPU table's variants (module docstring) and write ``runtime_<name>_gpu.json`` into
    ``out_dir``; returns the result. Packages not begun by ``deadline`` (a ``time.perf_counter``
    value) are left out, with null in ``aoti``."""
    variants, errors, build_s = _gpu_variants(ckpt, device, precisions, deadline)
    spec = load_checkpoint(ckpt).spec
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, spec.in_channels, *spec.input_size, generator=gen).to(device) for b in batches}
    order = np.random.default_rng(1)
    table = {}
    with torch.no_grad():
        for b in batches:
            times = {k: [] for k in variants}
            peak = {}
            for k, (fn, _, _) in variants.items():
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                for _ in range(max(warmup, 1)):
                    fn(inputs[b])
                _sync(device)
                if device == "cuda":
                    peak[k] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            for _ in range(reps):
                for k in order.permutation(list(variants)):
                    _sync(device)
                    t0 = time.perf_counter()
                    variants[k][0](inputs[b])
                    _sync(device)
                    times[k].append(time.perf_counter() - t0)
            rows = {}
            for k, (_, label, flops) in variants.items():
                p50, p90 = statistics.median(times[k]) * 1e3, float(np.percentile(times[k], 90)) * 1e3
                rows[k] = {"label": label, "p50_ms": p50, "p90_ms": p90, "throughput": b / p50 * 1e3,
                           "flops_per_image": int(flops), "peak_memory_mib": peak.get(k)}
            for row in rows.values():
                row["speedup_vs_masked"] = rows["masked"]["p50_ms"] / row["p50_ms"]
                row["speedup_vs_supernet"] = rows["supernet"]["p50_ms"] / row["p50_ms"]
            table[str(b)] = rows
    result = {"machine": {**machine(), "device": device,
                          **({"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
                             if device == "cuda" else {})},
              "date": time.strftime("%Y-%m-%d"), "dry_run": device != "cuda", "build": BUILD[name],
              "config": {"batches": list(batches), "warmup": warmup, "reps": reps,
                         "tf32_cudnn": torch.backends.cudnn.allow_tf32,
                         "timing": "torch.cuda.synchronize + time.perf_counter per call; round-robin, random order"},
              "aoti": {"verified_max_rel_error": errors, "build_seconds": build_s,
                       "rtol": {p: aoti.RTOL[p] for p in precisions}},
              "batches": table}
    path = Path(out_dir) / f"runtime_{name}_gpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n=== {name} GPU table ({result['machine'].get('gpu') or device}) -> {path} ===")
    print(format_gpu_table(result), flush=True)
    return result


def format_gpu_table(result: dict) -> str:
    """The GPU table as text: one row per batch and variant."""
    lines = [f"{'batch':>5}  {'variant':<52}{'p50 ms':>9}{'img/s':>11}{'vs (b)':>8}{'vs (a)':>8}"]
    for b, rows in result["batches"].items():
        for row in rows.values():
            lines.append(f"{b:>5}  {row['label']:<52}{row['p50_ms']:>9.3f}{row['throughput']:>11.0f}"
                         f"{row['speedup_vs_masked']:>7.2f}x{row['speedup_vs_supernet']:>7.2f}x")
    return "\n".join(lines)


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
    ap.add_argument("--gpu-only", action="store_true", help="only the GPU table (vgg16 at 64x64)")
    ap.add_argument("--json-dir", type=Path, default=HERE, help="where the GPU table's JSON goes")
    ap.add_argument("--dry-run", action="store_true", help="the GPU table's code path on the CPU, quickly")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="GPU table: build no further AOTInductor package after this many seconds")
    args = ap.parse_args()
    if args.gpu_only or args.dry_run:
        gpu_only(args)
        return
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


def gpu_only(args) -> None:
    """The GPU table for tiny and vgg16 (64x64), or its dry run on the CPU."""
    dry = args.dry_run or not torch.cuda.is_available()
    device = "cpu" if dry else "cuda"
    if dry:
        print("GPU table: dry run on the CPU (no GPU here, or --dry-run): eager variants once at batch 1, "
              "AOTInductor packages skipped", flush=True)
    args.json_dir.mkdir(parents=True, exist_ok=True)
    deadline = None if args.budget_s is None else time.perf_counter() + args.budget_s
    kw = dict(device=device, batches=(1,), warmup=0, reps=1, precisions=()) if dry else {"deadline": deadline}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.only in (None, "tiny"):
            gpu_table("tiny", tiny_checkpoint(tmp, device, quick=dry), args.json_dir, **kw)
        if args.only in (None, "vgg16") and not dry:
            BUILD["vgg16"] = f"{BUILD['vgg16']}; input 64x64"
            gpu_table("vgg16", vgg16_checkpoint(tmp, 64), args.json_dir, **kw)


if __name__ == "__main__":
    main()

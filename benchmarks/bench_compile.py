"""Compile time of a vgg16 checkpoint (M=7, three dense tasks), TensorRT build excluded.

    python benchmarks/bench_compile.py [--flow-constant 7] [--size 64] [--repeats 3]

The checkpoint has random weights and batch-norm statistics, and masks from the flow-based
reduction of random architecture weights (the shape of a real search's output), closed as after
training. Prints the time of each compile and of its parts, and the resulting FLOPs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dagc.checkpoint import save_checkpoint
from dagc.compiler import onnx_export, verify
from dagc.compiler.compile import compile_checkpoint, load_graph
from dagc.spec import TaskSpec, preset
from dagc.trainer.network import CentralNetwork, network_tensors
from dagc.trainer.recalibrate import reestimate_statistics
from dagc.trainer.reduction import flow_based_reduction
from dagc.trainer.topology import close_masks

TASKS = [TaskSpec("segmentation", "segmentation", 13), TaskSpec("depth", "depth"), TaskSpec("normal", "normal")]


def make_checkpoint(path: Path, m: int, size: int, seed: int = 0) -> None:
    spec = preset("vgg16", TASKS, flow_constant=m, input_size=(size, size))
    torch.manual_seed(seed)
    net = CentralNetwork(spec)
    rng = np.random.default_rng(seed)
    band = net.band.numpy()
    masks = []
    for _ in spec.tasks:
        g = rng.uniform(0.05, 0.95, band.shape) * band
        a, b = rng.uniform(0.05, 0.95, spec.n_states), rng.uniform(0.05, 0.95, spec.n_states)
        masks.append(close_masks(*flow_based_reduction(g, a, b)))
    net.set_masks(*(torch.from_numpy(np.stack([mk[i] for mk in masks])) for i in range(3)))
    # Each task's statistics as training leaves them (equal where the tasks' upstream is), so the
    # compiler shares what a trained model would share.
    gen = torch.Generator().manual_seed(seed)
    reestimate_statistics(net, [torch.randn(4, 3, size, size, generator=gen) for _ in range(2)])
    save_checkpoint(path, network_tensors(net), spec, "finetune")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flow-constant", type=int, default=7)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "vgg16.safetensors"
        make_checkpoint(ckpt, args.flow_constant, args.size)
        totals = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            manifest = compile_checkpoint(ckpt, Path(tmp) / f"art{r}")
            totals.append(time.perf_counter() - t0)
        # Where the time goes, once.
        parts = {}
        t0 = time.perf_counter()
        ck, net, raw, graph = load_graph(ckpt)
        parts["load + IR + passes"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        models = [onnx_export.to_onnx(graph, t) for t in (None, *([t] for t in ck.spec.task_names))]
        parts["emit ONNX (4 models)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for m in models:
            onnx_export.check(m)
        parts["onnx.checker full_check"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = verify.supernet_reference(net)
        for m in models:
            verify.verify(m, ref, graph)
        parts["verify (ORT vs supernet, 3 inputs x 4 models)"] = time.perf_counter() - t0
    c = manifest["costs"]
    result = {
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"), "flow_constant": args.flow_constant, "input": args.size,
        "compile_seconds": totals, "median_seconds": statistics.median(totals),
        "parts_seconds": parts,
        "mflops": {"supernet": c["supernet"]["flops"] / 1e6, "shared": c["shared"]["flops"] / 1e6,
                   "unshared": c["unshared"]["flops"] / 1e6,
                   **{t: v["flops"] / 1e6 for t, v in c["per_task"].items()}},
        "topology": manifest["topology"],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

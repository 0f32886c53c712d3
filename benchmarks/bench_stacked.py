"""Training-step time, stacked tasks versus one task at a time, side by side in one run.

    python benchmarks/bench_stacked.py [--reps 20] [--out benchmarks/stacked.json]

For K=3 dense tasks (segmentation, depth, normals) on the `tiny` preset (8x8 to 32x32) and on
`vgg16` (64x64), it times a warm-up step (shared input, Γ/A/B frozen: the stacked network runs once) and
a search step (all logits trained: one conv call per edge for all K tasks), each against the same
step done as K single-task forward/backward passes with gradient accumulation. Steps alternate
between the two variants so that machine noise hits both alike; the median is reported. For
vgg16 it also profiles one stacked search step and prints where the time goes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from dagc.spec import TaskSpec, preset
from dagc.trainer.kinds import task_loss
from dagc.trainer.network import CentralNetwork
from dagc.trainer.stages import make_optimizer

TASKS = [TaskSpec("seg", "segmentation", 5), TaskSpec("depth", "depth"), TaskSpec("normal", "normal")]


def make_batch(spec, batch):
    h, w = spec.input_size
    x = torch.randn(batch, 3, h, w)
    targets = {"seg": torch.randint(0, 5, (batch, h, w)), "depth": torch.rand(batch, 1, h, w),
               "normal": torch.nn.functional.normalize(torch.randn(batch, 3, h, w), dim=1)}
    return x, targets


def step_stacked(net, opt, x, targets):
    opt.zero_grad(set_to_none=True)
    out = net(x)
    sum(task_loss(t, out[t.name], targets[t.name]) for t in net.spec.tasks).backward()
    opt.step()


def step_one_by_one(net, opt, x, targets):
    opt.zero_grad(set_to_none=True)
    for t in net.spec.tasks:
        out = net(x, tasks=[t.name])[t.name]
        task_loss(t, out, targets[t.name]).backward()
    opt.step()


def bench(preset_name, size, batch, stage, reps, warmup=3):
    torch.manual_seed(0)
    spec = preset(preset_name, TASKS, input_size=size)
    net = CentralNetwork(spec).train()
    opt = make_optimizer(net, stage, 1e-4, 1e-2)
    x, targets = make_batch(spec, batch)
    times = {"stacked": [], "one_by_one": []}
    fns = {"stacked": step_stacked, "one_by_one": step_one_by_one}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(net, opt, x, targets)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"preset": preset_name, "input": list(size), "batch": batch, "stage": stage, "K": len(TASKS),
            "stacked_ms": 1000 * med["stacked"], "one_by_one_ms": 1000 * med["one_by_one"],
            "speedup": med["one_by_one"] / med["stacked"]}


def profile_vgg16(batch):
    torch.manual_seed(0)
    spec = preset("vgg16", TASKS, input_size=(64, 64))
    net = CentralNetwork(spec).train()
    opt = make_optimizer(net, "search", 1e-4, 1e-2)
    x, targets = make_batch(spec, batch)
    step_stacked(net, opt, x, targets)
    # Where the time goes, by module family: time the trunk and the heads of one forward+backward.
    timings = {}
    for part in ("trunk", "heads"):
        t0 = time.perf_counter()
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            if part == "trunk":
                ge, ga, gb = net.edge_weights(range(3))
                vl = net._trunk(x, ge, ga, gb, [1, 1, 1])
                vl.float().pow(2).mean().backward()
            else:
                feat = torch.randn(3 * batch, spec.readout.channels, 4, 4, requires_grad=True)
                loss = 0
                for k, t in enumerate(spec.tasks):
                    loss = loss + net.heads[t.name](feat[k * batch:(k + 1) * batch], (64, 64)).pow(2).mean()
                loss.backward()
        timings[part] = (time.perf_counter() - t0) / 3 * 1000
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step_stacked(net, opt, x, targets)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    top = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1000, "share": e.self_cpu_time_total / total}
           for e in rows]
    return {"forward_backward_ms": timings, "top_ops": top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--vgg-reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/stacked.json")
    args = ap.parse_args()
    results = []
    # tiny from overhead-bound (8x8, batch 2: per-call overhead dominates) to compute-bound
    # (32x32, batch 16, the default training setting: convolutions dominate).
    for size, batch in (((8, 8), 2), ((16, 16), 4), ((32, 32), 16)):
        for stage in ("warmup", "search"):
            results.append(bench("tiny", size, batch, stage, args.reps))
            print(json.dumps(results[-1]))
    for stage in ("warmup", "search"):
        results.append(bench("vgg16", (64, 64), 8, stage, args.vgg_reps, warmup=1))
        print(json.dumps(results[-1]))
    prof = profile_vgg16(8)
    print(json.dumps(prof, indent=1))
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "threads": torch.get_num_threads(), "python": platform.python_version(),
                          "torch": torch.__version__},
              "date": time.strftime("%Y-%m-%d"), "results": results, "vgg16_profile": prof}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

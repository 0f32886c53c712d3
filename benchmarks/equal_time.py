"""Issue 27's comparison a user makes: `dagc train` with its defaults against the plain PyTorch
network (`plain_network.py`) on ``multidigits``, side by side on the same cores, per seed.

    python benchmarks/equal_time.py --work /tmp/equal_time [--seeds 0,1,2] [--plain-seconds 420]

Per seed, two processes at one torch thread each run at the same time (one core each): the plain
network trains for ``--plain-seconds`` and is scored on the held-out split at fixed points of its
training time (scoring not counted); `dagc train` runs its defaults and is scored once, at the end
(its wall time includes data loading, the expected-time probe, the per-stage validation and the
statistics re-estimation, as a user waits for them). Then, in this process at one thread, both
deployed models run in ONNX Runtime side by side (dagc's compiled shared model, `dagc compile`,
against the plain network exported with torch.onnx), batch 1 and 64, alternating, median of
repeated calls; FLOPs per sample of both (`dagc.costs` conventions). Writes ``--json`` and a
plot of each task's held-out metric against wall time (``--plot``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from plain_network import PlainNet, macs, train_plain  # noqa: E402

from dagc.checkpoint import write_atomic  # noqa: E402
from dagc.trainer.batches import load_data  # noqa: E402
from dagc.trainer.train import TrainConfig, train  # noqa: E402

DATASET = "multidigits"
CHECKPOINTS = (15, 30, 60, 90, 120, 180, 240, 300, 360, 420, 540, 600)
PRIMARY = {"left": "accuracy", "right": "accuracy", "parts": "miou"}


def role_plain(work: Path, seed: int, seconds: float) -> None:
    torch.set_num_threads(1)
    data = load_data(TrainConfig(dataset=DATASET, seed=seed))
    net, curve = train_plain(data, seconds, seed=seed, checkpoints=CHECKPOINTS)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(work / f"plain_{seed}.safetensors"))
    (work / f"plain_{seed}.json").write_text(json.dumps({"curve": curve, "macs": macs(net, data)}))


def role_dagc(work: Path, seed: int) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    m = train(TrainConfig(dataset=DATASET, seed=seed), work / f"dagc_{seed}", progress=False)
    m["wall_seconds"] = time.perf_counter() - t0
    (work / f"dagc_{seed}.json").write_text(json.dumps(m))


def latency(work: Path, seed: int, reps: int) -> dict:
    """FLOPs and ONNX Runtime latency of both deployed models, side by side at one thread."""
    import onnxruntime as ort

    from dagc.compiler.compile import compile_checkpoint

    torch.set_num_threads(1)
    art = work / f"dagc_{seed}_art"
    if not art.exists():
        compile_checkpoint(work / f"dagc_{seed}" / "checkpoint.safetensors", art, batches=[1, 64])
    manifest = json.loads((art / "manifest.json").read_text())
    data = load_data(TrainConfig(dataset=DATASET, seed=seed))
    net = PlainNet(data)
    net.load_state_dict(load_file(str(work / f"plain_{seed}.safetensors")))
    net.eval()
    plain_onnx = work / f"plain_{seed}.onnx"
    names = [t.name for t in data.tasks]
    torch.onnx.export(net, (torch.zeros(1, 1, 32, 32),), str(plain_onnx), input_names=["x"], output_names=names,
                      dynamic_axes={"x": {0: "b"}, **{n: {0: "b"} for n in names}}, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    shared = next(f for f, m in manifest["models"].items() if f.endswith(".onnx") and len(m["tasks"]) == len(names))
    sessions = {"dagc": ort.InferenceSession(str(art / shared), opts), "plain": ort.InferenceSession(str(plain_onnx), opts)}
    out: dict = {"dagc_model": shared, "flops": {"dagc": manifest["models"][shared]["flops"], "plain": 2 * macs(net, data),
                                                  "dagc_supernet": manifest["costs"]["supernet"]["flops"]}}
    for b in (1, 64):
        x = data.test.inputs[:b].astype(np.float32)
        times = {k: [] for k in sessions}
        for _ in range(3):
            for s in sessions.values():
                s.run(None, {s.get_inputs()[0].name: x})
        for _ in range(reps):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, {s.get_inputs()[0].name: x})
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        out[f"batch{b}_ms"] = med
        out[f"batch{b}_dagc_over_plain"] = med["dagc"] / med["plain"]
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, task in zip(axes, PRIMARY):
        for i, r in enumerate(results.values()):
            curve = r["plain"]["curve"]
            ax.plot([c["seconds"] for c in curve], [c["held_out"][task][PRIMARY[task]] for c in curve], "-o", ms=3,
                    color="tab:blue", alpha=0.7, label="plain network" if i == 0 else None)
            ax.plot([r["dagc"]["wall_seconds"]], [r["dagc"]["final"][task][PRIMARY[task]]], "s", color="tab:red",
                    label="dagc train (defaults)" if i == 0 else None)
        ax.set_title(f"{task} ({PRIMARY[task]}, held out)")
        ax.set_xlabel("wall time, s (one core)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/equal_time"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--plain-seconds", type=float, default=420)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--role", choices=("plain", "dagc"), help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=HERE / "equal_time.json")
    ap.add_argument("--plot", type=Path, default=HERE / "equal_time.png")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.role == "plain":
        return role_plain(args.work, args.seed, args.plain_seconds)
    if args.role == "dagc":
        return role_dagc(args.work, args.seed)
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for seed in (int(s) for s in args.seeds.split(",")):
        if not (args.work / f"dagc_{seed}.json").is_file():
            procs = [subprocess.Popen([sys.executable, __file__, "--work", str(args.work), "--role", role, "--seed",
                                       str(seed), "--plain-seconds", str(args.plain_seconds)], env=env)
                     for role in ("plain", "dagc")]
            if any(p.wait() for p in procs):
                raise SystemExit(f"seed {seed}: a training process failed")
        plain = json.loads((args.work / f"plain_{seed}.json").read_text())
        dagc = json.loads((args.work / f"dagc_{seed}.json").read_text())
        keep = {k: dagc[k] for k in ("final", "wall_seconds", "train_seconds", "topology", "validation", "config")
                if k in dagc}
        results[seed] = {"plain": plain, "dagc": keep, "deployed": latency(args.work, seed, args.reps)}
        print(seed, json.dumps({"dagc": {t: keep["final"][t][PRIMARY[t]] for t in PRIMARY},
                                "dagc_wall": round(keep["wall_seconds"]), "plain_last": plain["curve"][-1]["held_out"],
                                "deployed": results[seed]["deployed"]}), flush=True)
    doc = {"results": results, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                       "torch": torch.__version__, "threads": 1}}
    text = json.dumps(doc, indent=2, sort_keys=True)
    write_atomic(args.json, lambda tmp: Path(tmp).write_text(text))
    plot(results, args.plot)


if __name__ == "__main__":
    main()

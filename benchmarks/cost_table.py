"""Do block costs add up? A cost table's sum over a compiled sub-network against that compiled
model's measured latency, side by side in one run (issue 21).

    python benchmarks/cost_table.py [CHECKPOINT] [--batch 1,8] [--threads 1] [--repeats 50]
                                    [--out benchmarks/cost_table.json]

CHECKPOINT: a reduced checkpoint (default: a short `dagc train` run on synthetic data, trained
here into a temporary directory). For each batch size, every part of the network (each block as
the compiler emits it, each head, the empty call; `dagc.compiler.measure.part_models`) and every
compiled model of the checkpoint (the shared model and each task's, `dagc compile`'s ONNX files)
get an ONNX Runtime CPU session with ``--threads`` intra-op threads and are timed round-robin in
the same rounds (`dagc.compiler.measure.time_parts`: one call each per round, a fresh random order
every round, medians). The onnxruntime-cpu table is built from the parts' medians exactly as
`dagc inspect --costs` builds it (`table_from_times`); its prediction for a compiled model is
``call + Σ its block applications + its heads`` (`dagc.compiler.budget_report.predicted_costs`).
Printed and written per model: predicted ms, measured ms, measured / predicted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from dagc.checkpoint import load_checkpoint
from dagc.compiler.budget_report import predicted_costs
from dagc.compiler.compile import compile_artifact, model_file
from dagc.compiler.ir import build_graph, slice_of
from dagc.compiler.measure import feeds_for, part_models, runner_for, table_from_times, time_parts
from dagc.compiler.passes import optimize
from dagc.trainer.train import TrainConfig, train

TARGET = "onnxruntime-cpu"
QUICK_RUN = dict(warmup_iters=20, search_iters=40, finetune_iters=20, batch_size=8, n_train=64, n_test=16,
                 stats_batches=2, val_fraction=0.0)


def quick_checkpoint(root: Path) -> Path:
    """A short synthetic run's checkpoint (a reduced network to compile; its accuracy is irrelevant)."""
    train(TrainConfig(**QUICK_RUN), root / "run", progress=False)
    return root / "run" / "checkpoint.safetensors"


def measure(ckpt: Path, artifact: Path, batch: int, threads: int, warmup: int, repeats: int, seed: int) -> dict:
    """One batch size: parts and compiled models timed in the same rounds; the table, its
    predictions and the measured medians."""
    ck = load_checkpoint(ckpt)
    spec = ck.spec
    graph = optimize(build_graph(spec, ck.tensors))
    parts = {n: (runner_for(TARGET, model, threads), feeds_for(shapes, batch, seed))
             for n, (model, shapes) in part_models(spec).items()}
    shape = (spec.in_channels, *spec.input_size)
    models = {}
    for task in (None, *spec.task_names):
        runner = runner_for(TARGET, (artifact / model_file(task)).read_bytes(), threads)
        models["shared" if task is None else task] = (runner, feeds_for({n: shape for n in runner.inputs}, batch, seed))
    times = time_parts({**parts, **{f"model:{k}": v for k, v in models.items()}}, warmup=warmup, repeats=repeats,
                       max_seconds=600.0, seed=seed)
    table = table_from_times(spec, TARGET, batch, threads, {n: times[n] for n in parts},
                             {"warmup": warmup, "repeats": repeats, "seed": seed})
    predicted = predicted_costs(graph, table)
    rows = {}
    for k in models:
        measured = sorted(times[f"model:{k}"])[len(times[f"model:{k}"]) // 2]
        rows[k] = {"predicted_ms": predicted[k], "measured_ms": measured, "measured_over_predicted": measured / predicted[k],
                   "blocks": sum(len(n.edges) for n in slice_of(graph, None if k == "shared" else [k]).nodes)}
    return {"batch": batch, "threads": threads, "models": rows, "table": table.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", nargs="?", type=Path, help="A reduced checkpoint (default: a short synthetic run).")
    ap.add_argument("--batch", default="1,8", help="Comma-separated batch sizes (default 1,8).")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1).")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=50, help="Timed rounds (default 50).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/cost_table.json"))
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        ckpt = args.checkpoint if args.checkpoint is not None else quick_checkpoint(root)
        compile_artifact(ckpt, root / "art")
        results = [measure(ckpt, root / "art", b, args.threads, args.warmup, args.repeats, args.seed) for b in batches]
        seconds = time.perf_counter() - t0
    machine = results[0]["table"]["machine"]
    print(f"{TARGET}, {args.threads} thread(s), {args.repeats} rounds; {machine.get('cpu')} ({machine.get('cores')} cores)")
    print(f"{'batch':>5}  {'model':<14}{'blocks':>7}{'predicted ms':>14}{'measured ms':>13}{'measured/pred':>15}")
    for r in results:
        for k, row in r["models"].items():
            print(f"{r['batch']:>5}  {k:<14}{row['blocks']:>7}{row['predicted_ms']:>14.4f}{row['measured_ms']:>13.4f}"
                  f"{row['measured_over_predicted']:>15.3f}")
    out = {"target": TARGET, "checkpoint": str(args.checkpoint) if args.checkpoint else "a short synthetic run "
           f"({QUICK_RUN})", "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
           "seconds": round(seconds, 1), "command": " ".join(sys.argv), "results": results}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

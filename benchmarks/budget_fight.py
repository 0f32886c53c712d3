"""Issue 21's fight at equal training compute: dagc searched under latency budgets against
shared-bottom and single-task trained for the same total iterations, each at its own compiled
latency, per seed.

    python benchmarks/budget_fight.py --dataset synthetic [--seeds 0,1,2] [--budgets 1.5,2.25,3]
                                      [--scope task|shared] [--train-only]
                                      [--batch 8] [--threads 1] [--work /tmp/dagc_fight]

``--scope shared`` gives each budget to the compiled shared model (``--budget-scope shared``; runs
``dagc_shared_<b>ms``) instead of to each task model; ``--train-only`` trains (and reuses) the runs
and prints each dagc run's predicted cost against its budget, decisiveness and Δ_T, without
compiling or timing anything (time later, on a quiet machine, without the flag).

Per seed: shared-bottom and single-task train with ``baseline_protocol="total"`` (as many iterations
as dagc's warm-up + search + fine-tune) and are compiled. dagc trains once per budget (``--budgets``,
ms per task model; 3 is about shared-bottom's predicted task model on synthetic at batch 8, one
thread) with ``--budget <ms> --cost-target onnxruntime-cpu`` at ``--batch`` / ``--threads`` plus
``EXTRA`` (the recommended search settings), and is compiled. Time it on a quiet machine: a call
longer than the scheduler's slice is stretched by every other busy process, a short one is not. Then every compiled model of the seed
(dagc's shared and per-task models for each budget, shared-bottom's shared model, single-task's task
models) is timed in ONNX Runtime in the same rounds (`dagc.compiler.measure.time_parts`: round-robin,
a fresh order every round, medians), so the latencies are ratios measured side by side. Δ_T is
against single-task (equal total). Single-task's latency is the sum of its task models (one call
each). Runs go to ``--work/<dataset>/seed<k>/<name>/`` (finished runs are reused), results to
``--json`` and a plot of Δ_T against measured latency to ``--plot``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dagc.checkpoint import load_checkpoint, write_atomic
from dagc.compiler.compile import compile_artifact, model_file
from dagc.compiler.measure import feeds_for, runner_for, time_parts
from dagc.tools.evaluate import compare, load_run
from dagc.trainer.train import TrainConfig, train

HERE = Path(__file__).resolve().parent
TARGET = "onnxruntime-cpu"
# The search settings RESULTS recommends for a decided structure ("A search that decides"): three
# epochs of search and the select squeeze. The baselines get the same total iterations.
EXTRA = {"synthetic": dict(search_iters=87, select_weight=0.1), "digits": dict(select_weight=0.1)}


def trained(work: Path, dataset: str, seed: int, name: str, **kw) -> Path:
    out = work / dataset / f"seed{seed}" / name
    if not (out / "metrics.json").is_file():
        resume = out.is_dir() and any(out.iterdir())
        t0 = time.perf_counter()
        cfg = None if resume else TrainConfig(dataset=dataset, seed=seed, **EXTRA[dataset], **kw)
        train(cfg, out, resume=resume, progress=False)
        print(f"[{dataset} seed {seed}] {name}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def compiled(run: Path) -> list[tuple[Path, Path]]:
    """(checkpoint, artifact) of a run: one, or one per task for single-task (its task runs)."""
    ckpts = [run / "checkpoint.safetensors"] if (run / "checkpoint.safetensors").is_file() else \
        sorted(run.glob("*/checkpoint.safetensors"))
    out = []
    for ck in ckpts:
        art = ck.parent / "artifact"
        if not (art / "manifest.json").is_file():
            compile_artifact(ck, art, force=art.exists())
        out.append((ck, art))
    return out


def runners(run: Path, batch: int, threads: int, *, tasks: bool) -> dict[str, tuple]:
    """Runner and feeds of a run's compiled shared model (and of each task model with ``tasks``)."""
    parts = {}
    for ck, art in compiled(run):
        spec = load_checkpoint(ck).spec
        shape = (spec.in_channels, *spec.input_size)
        for task in (None, *spec.task_names) if tasks else (None,):
            r = runner_for(TARGET, (art / model_file(task)).read_bytes(), threads)
            key = ck.parent.name if ck.parent != run else ("shared" if task is None else task)
            parts[key] = (r, feeds_for({n: shape for n in r.inputs}, batch))
    return parts


def median_ms(parts: dict, repeats: int) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in time_parts(parts, repeats=repeats, max_seconds=300.0).items()}


def run_name(scope: str, budget: float) -> str:
    return f"dagc_{budget:g}ms" if scope == "task" else f"dagc_{scope}_{budget:g}ms"


def one_seed(args, seed: int) -> dict:
    sb = trained(args.work, args.dataset, seed, "shared-bottom", baseline="shared-bottom", baseline_protocol="total")
    st = trained(args.work, args.dataset, seed, "single-task", baseline="single-task", baseline_protocol="total")
    names = {b: run_name(args.scope, b) for b in args.budgets}
    dagc = {b: trained(args.work, args.dataset, seed, names[b], budget=f"{b:g}ms", cost_target=TARGET,
                       cost_batch=args.batch, cost_threads=args.threads, budget_scope=args.scope)
            for b in args.budgets}
    if args.train_only:
        return {"rows": {names[b]: _trained_row(run, b, load_run(st)) for b, run in dagc.items()}}
    parts = {f"shared-bottom/{k}": v for k, v in runners(sb, args.batch, args.threads, tasks=True).items()}
    parts |= {f"single-task/{k}": v for k, v in runners(st, args.batch, args.threads, tasks=False).items()}
    for b, run in dagc.items():
        parts |= {f"{names[b]}/{k}": v for k, v in runners(run, args.batch, args.threads, tasks=True).items()}
    ms = median_ms(parts, args.repeats)
    base = load_run(st)

    def task_ms(prefix: str) -> dict[str, float]:
        return {k.split("/", 1)[1]: v for k, v in ms.items() if k.startswith(prefix + "/") and not k.endswith("/shared")}

    rows = {"shared-bottom": {"latency_ms": ms["shared-bottom/shared"], "task_latency_ms": task_ms("shared-bottom"),
                              **_scores(load_run(sb), base)},
            "single-task": {"latency_ms": sum(task_ms("single-task").values()), "task_latency_ms": task_ms("single-task"),
                            **_scores(base, base)}}
    for b, run in dagc.items():
        tasks = task_ms(names[b])
        shared = ms[f"{names[b]}/shared"]
        rows[f"dagc {b:g} ms" if args.scope == "task" else f"dagc {args.scope} {b:g} ms"] = {
            "budget_ms": b, "scope": args.scope, "latency_ms": shared, "task_latency_ms": tasks,
            "worst_task_over_budget": max(tasks.values()) / b, "shared_over_budget": shared / b,
            "decided": _decided(run), **_scores(load_run(run), base)}
    return {"rows": rows}


def _trained_row(run: Path, budget: float, base: dict) -> dict:
    """A trained run's row without timing: its predicted cost against the budget (metrics.json)."""
    m = json.loads((run / "metrics.json").read_text())
    return {"budget_ms": budget, "predicted": m.get("budget"), "decided": _decided(run), **_scores(load_run(run), base)}


def _scores(run: dict, base: dict) -> dict:
    c = compare(run, base)
    return {"delta_t": c["delta_t"], "delta": c["per_task"], "final": run["final"]}


def _decided(run: Path) -> dict[str, bool]:
    m = json.loads((run / "metrics.json").read_text())
    return {t: d["decided"] for t, d in (m.get("decisiveness") or {}).items()}


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, r in enumerate(doc["seeds"].values()):
        rows = r["rows"]
        d = sorted((v["latency_ms"], v["delta_t"]) for k, v in rows.items() if k.startswith("dagc"))
        ax.plot(*zip(*d), "o-", color="C0", label="dagc (budgets)" if i == 0 else None)
        ax.plot(rows["shared-bottom"]["latency_ms"], rows["shared-bottom"]["delta_t"], "s", color="C1",
                label="shared-bottom" if i == 0 else None)
        ax.plot(rows["single-task"]["latency_ms"], 0.0, "^", color="C2", label="single-task" if i == 0 else None)
    ax.axhline(0, color="0.8", lw=0.8)
    ax.set_xlabel(f"compiled model(s), measured ms (ORT CPU, batch {doc['batch']}, {doc['threads']} thread)")
    ax.set_ylabel("Δ_T vs single-task (equal total), %")
    ax.set_title(f"{doc['dataset']}: equal total training iterations, seeds {','.join(doc['seeds'])}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=sorted(EXTRA), required=True)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--budgets", default="1.5,2.25,3", help="Budgets, ms, per task model (default: about 0.5, 0.75 and "
                    "1 times shared-bottom's task model on synthetic, batch 8, one thread) or for the shared model "
                    "(--scope shared; shared-bottom's measures 3.9-4.1 ms there).")
    ap.add_argument("--scope", choices=("task", "shared"), default="task",
                    help="What each budget is for: each task model (default) or the compiled shared model.")
    ap.add_argument("--train-only", action="store_true", help="Train the runs and print predictions; time nothing.")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dagc_fight"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    args.budgets = [float(b) for b in args.budgets.split(",")]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    doc = {"dataset": args.dataset, "batch": args.batch, "threads": args.threads, "budgets_ms": args.budgets,
           "extra": EXTRA[args.dataset], "seeds": {s: one_seed(args, int(s)) for s in args.seeds.split(",")},
           "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                       "torch": torch.__version__},
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "wall_seconds": round(time.perf_counter() - t0, 1)}
    if args.train_only:
        for seed, r in doc["seeds"].items():
            for name, row in r["rows"].items():
                p = row["predicted"] or {}
                cost = p.get("cost")
                shown = f"{cost:.3f}" if isinstance(cost, float) else json.dumps(cost)
                print(f"seed {seed} {name:<20} predicted {shown} ms vs budget {row['budget_ms']:g} ms "
                      f"(fits {p.get('fits')})  decided {sum(row['decided'].values())}/{len(row['decided'])}  "
                      f"Δ_T {row['delta_t']:+6.2f}%  per task {json.dumps(row['delta'])}")
        return
    for seed, r in doc["seeds"].items():
        print(f"seed {seed}")
        for name, row in r["rows"].items():
            ratio = (f"shared/budget {row['shared_over_budget']:.2f}" if row.get("scope") == "shared"
                     else f"worst task/budget {row['worst_task_over_budget']:.2f}") if "budget_ms" in row else ""
            extra = (f"  budget {row['budget_ms']:.3f} ms  {ratio}  "
                     f"decided {sum(row['decided'].values())}/{len(row['decided'])}") if "budget_ms" in row else ""
            worst = max(row["task_latency_ms"].values())
            print(f"  {name:<16} shared {row['latency_ms']:8.3f} ms  slowest task model {worst:7.3f} ms  "
                  f"Δ_T {row['delta_t']:+6.2f}%{extra}")
    json_path = args.json or HERE / f"budget_fight_{args.dataset}.json"
    write_atomic(json_path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n"))
    plot(doc, args.plot or HERE / f"budget_fight_{args.dataset}.png")


if __name__ == "__main__":
    main()

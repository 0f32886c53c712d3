"""The paper's comparison tables (Tables 1-4 and the ablations of Table 6) on the data available
here: the single-task and shared-bottom baselines, dagc, and dagc without each of its four
components, all trained with `dagc train`'s defaults, then Δ per task (Eq. 10) and Δ_T (Eq. 11)
against the single-task baseline and the parameters relative to one backbone.

    python benchmarks/protocol_table.py --dataset synthetic [--seeds 0] [--work /tmp/dagc_protocol]
    python benchmarks/protocol_table.py --dataset digits --seeds 0,1,2
    python benchmarks/protocol_table.py --dataset synthetic --seeds 0,1,2 --methods single-task,shared-bottom,dagc

Baselines train for ``finetune_iters`` (the paper's protocol); the rows marked "(equal total)"
train them for warmup + search + finetune iterations instead (``baseline_protocol="total"``).
``--methods`` picks rows (default: all but the equal-total ones); Δ is always against the
single-task row of the paper's protocol, which is therefore always run.

Runs go to ``--work/<dataset>/seed<k>/<method>/`` (an existing finished run is reused, an
interrupted one resumed), results to ``benchmarks/protocol_<dataset>.json``; the markdown table is
printed. Training uses one torch thread per process so two datasets can run side by side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from dagc.checkpoint import write_atomic
from dagc.tools.evaluate import compare, load_run
from dagc.trainer.kinds import PRIMARY
from dagc.trainer.train import TrainConfig, train

HERE = Path(__file__).resolve().parent
# The protocol RESULTS measured: the paper's recipe (iterations, batch 16, constant rates).
RECIPE = "paper"
METHODS = {
    "single-task": dict(baseline="single-task"),
    "shared-bottom": dict(baseline="shared-bottom"),
    "single-task (equal total)": dict(baseline="single-task", baseline_protocol="total"),
    "shared-bottom (equal total)": dict(baseline="shared-bottom", baseline_protocol="total"),
    "dagc": {},
    "dagc w/o flow restriction": dict(ablations=("no-flow-restriction",)),
    "dagc w/o read-in/out": dict(ablations=("no-read-in-out",)),
    "dagc w/o FBR": dict(ablations=("no-fbr",)),
    "dagc w/o squeeze loss": dict(ablations=("no-squeeze",)),
}


def run_dir(work: Path, dataset: str, seed: int, method: str) -> Path:
    return work / dataset / f"seed{seed}" / method.replace(" ", "_").replace("/", "").replace("(", "").replace(")", "")


def run_method(work: Path, dataset: str, seed: int, method: str) -> dict:
    out = run_dir(work, dataset, seed, method)
    if (out / "metrics.json").is_file():
        return load_run(out)
    t0 = time.perf_counter()
    resume = out.is_dir() and any(out.iterdir())
    cfg = None if resume else TrainConfig(dataset=dataset, seed=seed, recipe=RECIPE, **METHODS[method])
    train(cfg, out, resume=resume, progress=False)
    print(f"[{dataset} seed {seed}] {method}: {time.perf_counter() - t0:.0f} s", flush=True)
    return load_run(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=("synthetic", "digits"), required=True)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dagc_protocol"))
    ap.add_argument("--methods", default=None, help="comma-separated rows (default: all but '(equal total)')")
    args = ap.parse_args()
    methods = [m for m in METHODS if "equal total" not in m] if args.methods is None else \
        ["single-task", *(m.strip() for m in args.methods.split(",") if m.strip() != "single-task")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    t_start = time.perf_counter()
    results: dict[str, dict] = {}
    for seed in seeds:
        runs = {m: run_method(args.work, args.dataset, seed, m) for m in methods}
        base = runs["single-task"]
        for m, r in runs.items():
            c = compare(r, base)
            results.setdefault(m, {"seeds": {}})["seeds"][seed] = {
                "final": r["final"], "delta": c["per_task"], "delta_t": c["delta_t"],
                "params_ratio": r["params_ratio"]}
    tasks = list(next(iter(results.values()))["seeds"][seeds[0]]["final"])
    kinds = load_run(run_dir(args.work, args.dataset, seeds[0], "dagc"))["tasks"]
    for r in results.values():
        per_seed = list(r["seeds"].values())
        r["mean"] = {"delta": {t: float(np.mean([s["delta"][t] for s in per_seed])) for t in tasks},
                     "delta_t": float(np.mean([s["delta_t"] for s in per_seed])),
                     "delta_t_std": float(np.std([s["delta_t"] for s in per_seed])),
                     "params_ratio": float(np.mean([s["params_ratio"] for s in per_seed])),
                     "primary": {t: float(np.mean([s["final"][t][PRIMARY[kinds[t]][0]] for s in per_seed]))
                                 for t in tasks}}
    doc = {"dataset": args.dataset, "seeds": seeds, "methods": {m: METHODS[m] for m in methods}, "tasks": tasks,
           "primary_metric": {t: PRIMARY[kinds[t]][0] for t in tasks}, "results": results,
           "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                       "torch": torch.__version__, "threads": 1},
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "wall_seconds": round(time.perf_counter() - t_start, 1)}
    path = HERE / f"protocol_{args.dataset}.json"
    text = json.dumps(doc, indent=2, sort_keys=True)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
    print(markdown(doc))


def markdown(doc: dict) -> str:
    """The table: one row per method, Δ per task (primary metric value in brackets), Δ_T, params."""
    tasks = doc.get("tasks") or list(doc["primary_metric"])  # the spec's task order
    head = "| method | " + " | ".join(f"{t} Δ% ({doc['primary_metric'][t]})" for t in tasks) + \
        " | Δ_T % | params |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    for m in sorted(doc["results"], key=lambda m: list(METHODS).index(m) if m in METHODS else len(METHODS)):
        mean = doc["results"][m]["mean"]
        cells = [f"{mean['delta'][t]:+.1f} ({mean['primary'][t]:.3f})" for t in tasks]
        spread = f" ± {mean['delta_t_std']:.1f}" if len(doc["seeds"]) > 1 else ""
        lines.append(f"| {m} | " + " | ".join(cells) + f" | **{mean['delta_t']:+.1f}**{spread} | "
                     f"{mean['params_ratio']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

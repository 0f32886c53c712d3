"""Cost tables on the command line (issue 21): `dagc inspect CHECKPOINT --costs TARGET` (the table of
the checkpoint's network on a target, measured and cached on a miss, and what each compiled model
is predicted to cost), and the budget lines of `dagc bench` (the compiled models' measured latency
against the budget their run searched for, where the bench ran them at the budget's batch and
thread count)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dagc.blocks import blocks
from dagc.checkpoint import load_checkpoint
from dagc.compiler.budget_report import budget_report, predicted_costs, run_cost_table
from dagc.compiler.ir import build_graph, masks_of
from dagc.compiler.measure import measure_table
from dagc.compiler.passes import optimize
from dagc.cost_table import FLOPS, LATENCY_TARGETS, cache_path, cached_table, check_target, describe
from dagc.errors import DagcError
from dagc.trainer.budget import SHARED, read_budget

__all__ = ["inspect_costs", "bench_budget", "bench_budget_lines"]


def _settings(ck, target: str, batch: int | None, threads: int | None) -> tuple[int, int | None]:
    """The batch and threads a table of ``target`` is asked for: as given, else the run's own when
    its budget was priced on ``target``, else 1 (None for flops)."""
    if target not in LATENCY_TARGETS:
        if target == FLOPS and (batch is not None or threads is not None):
            raise DagcError("--cost-batch and --cost-threads say how a latency --costs target is measured; FLOPs "
                            "are counted per sample: drop them")
        return 1, None
    config = ck.json("config") or {}
    own = isinstance(config, dict) and config.get("cost_target") == target
    batch = batch if batch is not None else (config.get("cost_batch") if own else None) or 1
    threads = threads if threads is not None else (config.get("cost_threads") if own else None) or 1
    return batch, threads


def inspect_costs(path: Path, target: str, batch: int | None = None, threads: int | None = None,
                  remeasure: bool = False) -> str:
    """The cost table of the network of checkpoint ``path`` on ``target`` (the run's own when it
    priced its budget with that very table, else the cache's, measured on a miss or with
    ``remeasure``), the tasks that apply each block, and the predicted cost of each compiled
    model. Raises DagcError (CostTableError, CheckpointError, ...) with one line."""
    if Path(path).is_dir():
        raise DagcError(f"--costs prices a checkpoint's network; give the checkpoint (.safetensors), not the "
                        f"directory {path}")
    ck = load_checkpoint(path)
    check_target(target, 1, None if target == FLOPS else 1, option="--costs")
    batch, threads = _settings(ck, target, batch, threads)
    check_target(target, batch, threads, option="--costs")
    own = run_cost_table(ck)
    if own is not None and (own.target, own.batch, own.threads) == (target, batch, threads) and not remeasure:
        table, origin = own, "the table the run's budget was priced with (recorded in the checkpoint)"
    else:
        table = cached_table(ck.spec, target, batch, threads, measure=measure_table, refresh=remeasure)
        origin = "counted" if target == FLOPS else f"cached in {cache_path(ck.spec, target, batch, threads)}"
    used = None
    lines = []
    if ck.reduced:
        gamma, alpha, beta = masks_of(ck.tensors, ck.spec)
        from_masks = {b.key: [t for k, t in enumerate(ck.spec.task_names) if b.mask(gamma, alpha, beta)[k]]
                      for b in blocks(ck.spec)}
        used = {k: v for k, v in from_masks.items() if v}
        predicted = predicted_costs(optimize(build_graph(ck.spec, ck.tensors)), table)
        scale, unit = (1e-6, "MFLOPs, blocks + heads") if target == FLOPS else (1.0, "ms, call + blocks + heads")
        lines = ["", f"predicted cost of the compiled models ({unit}): "
                 + ", ".join(f"{'shared model' if k == 'shared' else k} {v * scale:.4f}" for k, v in predicted.items())]
    return "\n".join([describe(table, ck.spec, used), f"({origin})", *lines])


def bench_budget(result: dict[str, Any], checkpoint: Path) -> dict[str, Any] | None:
    """The compiled models against the budget of ``checkpoint``'s run, from a `dagc.tools.bench`
    result (None without a budget): a FLOPs budget against their counted FLOPs; a latency budget
    against their measured p50 at the budget's batch, when the bench ran that batch with the
    budget's thread count (``measured`` False otherwise), beside the cost table's prediction."""
    report = budget_report(checkpoint)
    if report is None:
        return None
    table, budget = report.table, report.budget
    shared_scope = report.scope == SHARED  # the budget judges the shared model alone
    names = {"shared": "shared"} if shared_scope else {**{t: t for t in report.predicted if t != "shared"}, "shared": "shared"}
    out: dict[str, Any] = {"budget": report.text, "scope": report.scope, "unit": budget.unit, "target": table.target,
                           "batch": table.batch, "threads": table.threads, "models": {}}
    if table.target == FLOPS:
        for model, key in names.items():
            flops = result["variants"][key if key == "shared" else f"task:{key}"]["flops"]
            out["models"][model] = {"flops": flops, "vs_budget": flops / budget.value}
        out["measured"] = True
        return out
    config = result["config"]
    at = result["batches"].get(str(table.batch))
    out["measured"] = at is not None and config.get("threads") == table.threads
    out["bench"] = {"batches": config.get("batches"), "threads": config.get("threads"),
                    "backend": config.get("backend_resolved")}
    for model, key in names.items():
        row = {"predicted_ms": report.predicted[model]}
        if out["measured"]:
            stats = at["variants"]
            p50 = stats[key if key == "shared" else f"task:{key}"]["p50_ms"]
            row.update(measured_ms=p50, vs_budget=p50 / budget.value, vs_predicted=p50 / report.predicted[model])
            if f"bare:{key}" in stats:  # the bare ONNX Runtime session: what the table's parts were timed as
                row["bare_ms"] = stats[f"bare:{key}"]["p50_ms"]
        out["models"][model] = row
    return out


def bench_budget_lines(b: dict[str, Any] | None) -> list[str]:
    """`bench_budget` as text ([] without a budget)."""
    if b is None:
        return []
    budget = read_budget(b["budget"])
    per = "for the shared model" if b.get("scope") == SHARED else "per task model"

    def verdict(ratio: float) -> str:
        return "fits" if ratio <= 1 else f"{ratio - 1:+.0%} over"

    if b["target"] == FLOPS:
        rows = [f"{m} {r['flops'] / 1e6:.2f} MFLOPs ({verdict(r['vs_budget'])})" for m, r in b["models"].items()]
        return [f"budget {budget.show()} {per} (counted): {', '.join(rows)}"]
    where = f"{b['target']} at batch {b['batch']}, {b['threads']} thread{'s' if b['threads'] != 1 else ''}"
    if not b["measured"]:
        ran = b["bench"]
        return [f"budget {budget.show()} {per} is for {where}: this bench ran batches {ran['batches']} with "
                f"{ran['threads'] or 'the default number of'} threads; rerun with --batch {b['batch']} --threads "
                f"{b['threads']} to measure it"]

    def row(m: str, r: dict[str, Any]) -> str:
        bare = f"bare session {r['bare_ms']:.3f}, " if "bare_ms" in r else ""
        return (f"{'shared model' if m == 'shared' else m} {r['measured_ms']:.3f} ms ({verdict(r['vs_budget'])}; "
                f"{bare}table predicted {r['predicted_ms']:.3f})")

    return [f"budget {budget.show()} {per} ({where}), p50 measured here through the runtime (backend "
            f"{b['bench']['backend']}): " + ", ".join(row(m, r) for m, r in b["models"].items())]

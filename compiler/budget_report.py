"""What the compiled models cost against the budget their run searched for (issue 21): the cost
table's prediction for each task model and for the shared model, printed by `dagc compile` and
`dagc inspect` (`dagc.compiler.compile.summary`), judged against the budget's scope: each task
model, or (``--budget-scope shared``) the shared model.

A compiled model's predicted cost is ``call + Σ its block applications + its heads`` in the
table's unit (`dagc.cost_table.CostTable.predicted`), over the optimised graph the compiler emits
(`dagc.compiler.passes.optimize`): a state instance shared by several tasks counts once in the
shared model, and in each task model that needs it. For a FLOPs budget this is exactly the
manifest's FLOPs (`dagc.compiler.flops.graph_costs`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dagc.checkpoint import load_checkpoint
from dagc.compiler.ir import Graph, build_graph, slice_of
from dagc.compiler.passes import optimize
from dagc.cost_table import FLOPS, CostTable, flops_table
from dagc.errors import CheckpointError, CostTableError
from dagc.trainer.budget import SHARED, TASK, Budget, read_budget

__all__ = ["BudgetReport", "predicted_costs", "budget_report", "budget_of", "budget_lines", "run_cost_table"]


@dataclass(frozen=True)
class BudgetReport:
    """A run's budget (as given, and parsed), the table that priced it, the predicted cost of
    each compiled model (``predicted`` maps ``"shared"`` and each task to a cost in the table's
    unit) and what the budget was for (``scope``: each task model, or the shared model)."""

    text: str
    budget: Budget
    table: CostTable
    predicted: Mapping[str, float]
    scope: str = TASK


def predicted_costs(graph: Graph, table: CostTable) -> dict[str, float]:
    """``{"shared": ..., <task>: ...}``: the predicted cost of the shared model and of each task's
    model of the optimised ``graph`` (see the module docstring)."""
    def cost(tasks: list[str]) -> float:
        part = slice_of(graph, tasks)
        return table.predicted([e.block for n in part.nodes for e in n.edges], tasks)

    return {"shared": cost(list(graph.tasks)), **{t: cost([t]) for t in graph.tasks}}


def run_cost_table(ck) -> CostTable | None:
    """The table a checkpoint's run priced its budget with: the one it records, or (a FLOPs budget
    recorded before tables were) the counted FLOPs; None without a budget. Raises CheckpointError
    for a recorded table that is malformed or not this network's and target's."""
    config = ck.json("config") or {}
    if not isinstance(config, dict) or not config.get("budget"):
        return None
    data = ck.json("cost_table")
    target = config.get("cost_target") or FLOPS
    if data is None:
        if target != FLOPS:
            raise CheckpointError(f"{ck.source}: its run had a {target} budget but the checkpoint holds no cost "
                                  "table (metadata 'cost_table'); retrain or fix the checkpoint")
        return flops_table(ck.spec)
    source = f"{ck.source}: metadata 'cost_table'"
    try:
        table = CostTable.from_dict(data, source=source, then="retrain or fix the checkpoint")
        table.check(ck.spec, target, config.get("cost_batch") or 1, config.get("cost_threads"), source=source)
    except CostTableError as e:
        raise CheckpointError(str(e)) from None
    return table


def budget_report(ckpt_path: str | Path) -> BudgetReport | None:
    """The budget report of a reduced checkpoint (None: its run had no budget). Raises
    CheckpointError (unreadable checkpoint, bad recorded table or budget), CompileError (not
    reduced)."""
    ck = load_checkpoint(ckpt_path)
    return budget_of(ck, lambda: optimize(build_graph(ck.spec, ck.tensors)))


def budget_of(ck, graph: Graph | Callable[[], Graph]) -> BudgetReport | None:
    """`budget_report` of a checkpoint already read and its optimised IR (or how to build it,
    called only when the run had a budget): a compile passes what it read
    (`dagc.compiler.pipeline.Source`). Raises as `budget_report`."""
    table = run_cost_table(ck)
    if table is None:
        return None
    config = ck.json("config")
    text = config["budget"]
    try:
        budget = read_budget(text)
    except Exception as e:  # noqa: BLE001 - a ConfigError from an edited configuration
        raise CheckpointError(f"{ck.source}: its configuration's budget: {e}") from None
    graph = graph() if callable(graph) else graph
    scope = config.get("budget_scope") or TASK  # runs from before scopes were per task
    return BudgetReport(text, budget, table, predicted_costs(graph, table), scope)


def budget_lines(report: BudgetReport) -> list[str]:
    """The summary's lines: the budget, where it was priced, each task model's predicted cost
    (fits, or by how much it is over) and the shared model's."""
    b, table = report.budget, report.table
    unit = "MFLOPs" if table.target == FLOPS else "ms"
    scale = 1e-6 if table.target == FLOPS else 1.0

    def show(x: float) -> str:
        return f"{x * scale:.3f}"

    fit = [f"{t} {show(c)} ({'fits' if c <= b.value else f'{c / b.value - 1:+.0%} over'})"
           for t, c in report.predicted.items() if t != "shared"]
    where = "counted" if table.target == FLOPS else f"predicted by the cost table of {table.key}"
    shared = report.predicted["shared"]
    if report.scope == SHARED:
        tasks = ", ".join(f"{t} {show(c)}" for t, c in report.predicted.items() if t != "shared")
        verdict = "fits" if shared <= b.value else f"{shared / b.value - 1:+.0%} over"
        return [f"budget: {b.show()} for the shared model ({where}, {unit}): shared {show(shared)} ({verdict})",
                f"  task models alone: {tasks}"]
    return [f"budget: {b.show()} per task model ({where}, {unit}): {', '.join(fit)}",
            f"  shared model: {show(shared)} {unit} for all tasks ({shared / b.value:.2f} x the per-task budget)"]

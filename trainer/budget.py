"""A deployment budget for the search (issue 21): what a task's deployed model may cost, in FLOPs or
as a latency on a target.

``--budget 30MFLOPs`` prices every block by its FLOPs (`dagc.cost_table.flops_table`, from
`dagc.costs`); ``--budget 2ms --cost-target onnxruntime-cpu [--cost-batch B --cost-threads T]`` by
its latency measured on that target (a cost table, `dagc.cost_table`, measured by the compiler and
cached). Either way the budget

* replaces Eq. 9's edge count by the cost-aware squeeze (`dagc.trainer.losses.squeeze_loss` with
  costs): per task, max(Σ c σ(γ) + Σ c σ(α) + Σ c σ(β) − (budget − head − call), 0), in the loss
  units of `loss_scale`, so read-ins and read-outs cost what they cost;
* lets Algorithm 1 stop once the task's sub-network (its closed masks, head and one call included)
  fits the budget, instead of only at the first disconnecting removal (`fits`).

A budget is per task (each task's own model, its head included) or, with ``--budget-scope shared``,
for the compiled shared model of all tasks: states that several tasks share computed once
(`dagc.sharing`, the compiler's own rule), every head, one call (`shared_cost`). The shared scope
prices the squeeze with `dagc.trainer.losses.shared_squeeze_loss` and reduces all tasks jointly
until the shared model fits (`dagc.trainer.budget_reduction`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dagc.cost_table import FLOPS, LATENCY_TARGETS, TARGETS, CostTable, Measure, cached_table, flops_table
from dagc.errors import ConfigError
from dagc.sharing import shared_blocks
from dagc.spec import Spec
from dagc.trainer.topology import close_masks

UNITS = {"flops": 1.0, "kflops": 1e3, "mflops": 1e6, "gflops": 1e9}  # -> FLOPs
TIME_UNITS = {"s": 1e3, "ms": 1.0, "us": 1e-3, "µs": 1e-3}  # -> ms
MFLOPS = 1e6  # the loss's unit of a FLOPs budget: about one edge of a small network, so λ_sq keeps its scale
# The loss's unit of a latency budget: 10 µs per sample (a table's ms per call / batch / 0.01). A CPU
# core spends about that on 1 MFLOP of these convs (tiny's 9.4-MFLOP edges take 0.09 ms at batch 1 and
# 0.75 ms at batch 8 with ONNX Runtime, one thread), so a latency-priced edge weighs in the squeeze
# about what its FLOPs-priced twin does, at any batch, and λ_sq keeps its scale. A much faster target
# (a GPU) makes the terms smaller: raise λ_sq there.
LATENCY_LOSS_UNIT = 0.01
# What a budget prices: each task's own model (its head, one call), or the compiled shared model of
# all tasks (states shared across tasks computed once, every head, one call).
TASK, SHARED = "task", "shared"
SCOPES = (TASK, SHARED)

__all__ = ["UNITS", "TIME_UNITS", "MFLOPS", "LATENCY_LOSS_UNIT", "TASK", "SHARED", "SCOPES", "Budget", "read_budget", "parse_budget",
           "check_budget", "loss_scale", "cost_table_for", "task_budgets", "shared_budget", "shared_cost",
           "loss_costs", "fits", "task_cost", "budget_outcome", "budget_warning"]


@dataclass(frozen=True)
class Budget:
    """A parsed budget: ``value`` in FLOPs (``unit`` "FLOPs") or ms (``unit`` "ms")."""

    value: float
    unit: str

    @property
    def latency(self) -> bool:
        return self.unit == "ms"

    def show(self, x: float | None = None) -> str:
        """``x`` (default: the budget) in the budget's display unit: ``30 MFLOPs``, ``2 ms``."""
        x = self.value if x is None else x
        return f"{x:.4g} ms" if self.latency else f"{x / MFLOPS:.4g} MFLOPs"


def read_budget(text: str) -> Budget:
    """A budget written as a number and a unit: FLOPs (``30MFLOPs``, ``1.5 GFLOPs``; FLOPs, KFLOPs,
    MFLOPs, GFLOPs) or a latency (``2ms``, ``500us``, ``0.01s``), any case. Raises ConfigError for
    anything else."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-zµ]+)\s*", text) if isinstance(text, str) else None
    unit = m.group(2).lower() if m else None
    if m is None or (unit not in UNITS and unit not in TIME_UNITS):
        raise ConfigError(f"budget must be a number and a unit of {['FLOPs', 'KFLOPs', 'MFLOPs', 'GFLOPs']} (counted) "
                          f"or {['s', 'ms', 'us']} (a latency, with a latency --cost-target), e.g. 30MFLOPs or 2ms; "
                          f"got {text!r}")
    flops = unit in UNITS
    value = float(m.group(1)) * (UNITS[unit] if flops else TIME_UNITS[unit])
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"budget must be positive and finite, got {text!r}")
    return Budget(value, "FLOPs" if flops else "ms")


def check_budget(budget: str | None, target: object, batch: object, threads: object, alone: bool = True,
                 scope: object = TASK) -> None:
    """Raise ConfigError (naming the option) unless a run's budget, cost target, cost batch,
    threads and scope agree: a known target; batch and threads positive integers for a latency
    target, None for flops; a latency target only with a budget; a latency budget with a latency
    target, FLOPs with flops; a budget only ``alone`` (no other rule decides where the reduction
    stops); a known scope (`SCOPES`), and ``shared`` only with a budget."""
    if scope not in SCOPES:
        raise ConfigError(f"budget_scope must be one of {list(SCOPES)}, got {scope!r}")
    if scope == SHARED and budget is None:
        raise ConfigError("--budget-scope shared says what a --budget prices; add one, e.g. --budget 4ms")
    if target not in TARGETS:
        raise ConfigError(f"unknown cost target {target!r}; choose one of {list(TARGETS)}")
    latency = target in LATENCY_TARGETS
    if not latency and (batch is not None or threads is not None):
        raise ConfigError("--cost-batch and --cost-threads say how a latency --cost-target is measured; FLOPs are "
                          f"counted per sample: drop them or add --cost-target {LATENCY_TARGETS[0]}")
    for name, v in (("cost_batch", batch), ("cost_threads", threads)) if latency else ():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if budget is None:
        if latency:
            raise ConfigError(f"--cost-target {target} prices a --budget; add one, e.g. --budget 2ms")
        return
    parsed = read_budget(budget)
    if not alone:
        raise ConfigError("--budget sets where the reduction stops; drop --target-sparsity, --baseline or the no-fbr "
                          "ablation")
    if parsed.latency and not latency:
        raise ConfigError(f"--budget {budget} is a latency: it needs a latency --cost-target "
                          f"({', '.join(LATENCY_TARGETS)}), e.g. --cost-target {LATENCY_TARGETS[0]}")
    if latency and not parsed.latency:
        raise ConfigError(f"--budget {budget} counts FLOPs, --cost-target {target} measures a latency: give the "
                          "budget as a latency (e.g. 2ms) or drop --cost-target")


def parse_budget(text: str) -> float:
    """The value of a budget (`read_budget`): FLOPs, or ms for a latency."""
    return read_budget(text).value


def loss_scale(table: CostTable) -> float:
    """What one unit of ``table`` is in the squeeze loss's units: 1/MFLOPS for FLOPs, and for a
    latency table 1 / (batch · `LATENCY_LOSS_UNIT`) (ms per call -> 10 µs per sample)."""
    return 1.0 / MFLOPS if table.target == FLOPS else 1.0 / (table.batch * LATENCY_LOSS_UNIT)


def cost_table_for(spec: Spec, target: str, batch: int | None, threads: int | None,
                   measure: Measure | None = None) -> CostTable:
    """The table a budget on ``target`` prices ``spec`` with: counted FLOPs, or a latency table from
    the cache (`dagc.cost_table.cached_table`), measured with ``measure`` on a miss. Raises
    CostTableError as `cached_table`."""
    if target == FLOPS:
        return flops_table(spec)
    return cached_table(spec, target, batch, threads, measure=measure)


def task_budgets(spec: Spec, budget: float, table: CostTable | None = None) -> np.ndarray:
    """What each task's blocks may cost (K,), in the table's unit (default table: FLOPs): the budget
    less the task's head and one call. Raises ConfigError when a head (and a call) alone exceed the
    budget."""
    table = flops_table(spec) if table is None else table
    fixed = np.array([table.fixed(t) for t in spec.task_names], dtype=np.float64)
    over = [(t, h) for t, h in zip(spec.task_names, fixed) if h >= budget]
    if over:
        t, h = over[0]
        b = Budget(budget, "FLOPs" if table.target == FLOPS else "ms")
        what = "head alone" if table.target == FLOPS else f"head and one call alone on {table.key}"
        raise ConfigError(f"the budget of {b.show()} is below task {t!r}'s {what} ({b.show(h)}); raise --budget")
    return budget - fixed


def shared_budget(spec: Spec, budget: float, table: CostTable | None = None) -> float:
    """What the shared model's blocks may cost, in the table's unit (default table: FLOPs): the
    budget less every head and one call. Raises ConfigError when these alone exceed the budget."""
    table = flops_table(spec) if table is None else table
    fixed = sum(table.heads[t] for t in spec.task_names) + table.call
    if fixed >= budget:
        b = Budget(budget, "FLOPs" if table.target == FLOPS else "ms")
        raise ConfigError(f"the shared budget of {b.show()} is below the heads of all tasks and one call alone "
                          f"({b.show(fixed)}); raise --budget")
    return budget - fixed


def shared_cost(spec: Spec, gamma, alpha, beta, table: CostTable | None = None) -> float:
    """The exact cost of the compiled shared model of stacked 0/1 masks (K, N, N), (K, N), (K, N)
    (closed here, each task's), in the table's unit (default: FLOPs): its block applications
    (`dagc.sharing.shared_blocks`), every head and one call."""
    table = flops_table(spec) if table is None else table
    closed = [close_masks(g, a, b) for g, a, b in zip(gamma, alpha, beta)]
    masks = [np.stack([c[i] for c in closed]) for i in range(3)]
    return table.predicted(shared_blocks(spec, *masks), spec.task_names)


def loss_costs(spec: Spec, budget: float, device: torch.device | str = "cpu", table: CostTable | None = None,
               scope: str = TASK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cost-aware squeeze's tensors in the loss's units (`loss_scale`): hidden-edge costs (N, N),
    read-in costs (N,), read-out costs (N,) and the budget for the blocks: each task's (K,), or with
    ``scope`` shared the shared model's (1,) (`shared_budget`). Made once per (spec, budget,
    device, table, scope): every search step asks for them. Read-only. ``table`` (default: FLOPs)
    prices the blocks, ``budget`` is in its unit. Raises as `task_budgets` / `shared_budget`."""
    table = flops_table(spec) if table is None else table
    try:
        return _loss_costs(spec, budget, str(device), table, scope)
    except TypeError:  # a spec built by hand with a list field is not hashable: build uncached
        return _loss_costs.__wrapped__(spec, budget, str(device), table, scope)


@functools.lru_cache(maxsize=8)
def _loss_costs(spec: Spec, budget: float, device: str, table: CostTable, scope: str) -> tuple[torch.Tensor, ...]:
    g, a, b = table.mask_layout(spec)
    scale = loss_scale(table)
    left = np.array([shared_budget(spec, budget, table)]) if scope == SHARED else task_budgets(spec, budget, table)
    out = (g, a, b, left)
    return tuple(torch.as_tensor(x * scale, dtype=torch.float32, device=device) for x in out)


def fits(spec: Spec, task: str, budget: float, table: CostTable | None = None
         ) -> Callable[[np.ndarray, np.ndarray, np.ndarray], bool]:
    """Whether a task's binary masks (gamma (N, N), alpha (N,), beta (N,)), once closed, cost no
    more than ``budget`` (in the table's unit; default table: FLOPs) with the task's head and one
    call. Raises SpecError for an unknown task."""
    cost = task_cost(spec, task, table)
    return lambda g, a, b: cost(g, a, b) <= budget


def task_cost(spec: Spec, task: str, table: CostTable | None = None
              ) -> Callable[[np.ndarray, np.ndarray, np.ndarray], float]:
    """What a task's model of binary masks (gamma (N, N), alpha (N,), beta (N,)), once closed,
    costs in the table's unit (default: FLOPs), its head and one call included. Raises SpecError
    for an unknown task."""
    spec.task(task)
    table = flops_table(spec) if table is None else table
    g_cost, a_cost, b_cost = table.mask_layout(spec)
    fixed = table.fixed(task)

    def cost(g: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
        g, a, b = close_masks(g, a, b)
        return float((g * g_cost).sum() + (a * a_cost).sum() + (b * b_cost).sum()) + fixed

    return cost


def budget_outcome(spec: Spec, text: str, scope: str, masks: tuple, table: CostTable | None = None) -> dict:
    """metrics.json's ``budget``: the budget as given, its ``scope``, the unit, the ``cost`` of the
    reduced masks (stacked (K, N, N), (K, N), (K, N); the shared model's, or task -> its model's)
    and whether it ``fits``. The budgeted reduction (`dagc.trainer.budget_reduction`) ends at the
    cheapest cost it reaches when nothing fits, so an over-budget ``cost`` is that cheapest cost."""
    table = flops_table(spec) if table is None else table
    value = read_budget(text).value
    g, a, b = (np.asarray(m) for m in masks)
    if scope == SHARED:
        cost: float | dict[str, float] = shared_cost(spec, g, a, b, table)
        worst = cost
    else:
        cost = {t: task_cost(spec, t, table)(g[k], a[k], b[k]) for k, t in enumerate(spec.task_names)}
        worst = max(cost.values())
    return {"budget": text, "scope": scope, "unit": read_budget(text).unit, "cost": cost, "fits": worst <= value}


def budget_warning(outcome: dict | None) -> str | None:
    """One line when a budgeted run's models do not fit (None when they do, or without a budget):
    the cheapest cost reached, against the budget, and what to do."""
    if not outcome or outcome["fits"]:
        return None
    b = read_budget(outcome["budget"])
    if outcome["scope"] == SHARED:
        what = f"the shared model's cheapest reachable cost is {b.show(outcome['cost'])}"
    else:
        over = {t: c for t, c in outcome["cost"].items() if c > b.value}
        what = "the cheapest reachable task models are " + ", ".join(f"{t} {b.show(c)}" for t, c in over.items())
    return (f"warning: no read-in/read-out choice fits the budget of {b.show()} ({outcome['scope']} scope): {what}; "
            "raise --budget")

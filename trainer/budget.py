"""A deployment budget for the search (issue 21): what a task's deployed model may cost, in FLOPs.

``--budget 30MFLOPs`` prices every block by its FLOPs (`dagc.costs.block_flops`) and

* replaces Eq. 9's edge count by the cost-aware squeeze (`dagc.trainer.losses.squeeze_loss` with
  costs): per task, max(Σ c σ(γ) + Σ c σ(α) + Σ c σ(β) − (budget − head), 0), in MFLOPs, so read-ins
  and read-outs cost what they cost;
* lets Algorithm 1 stop once the task's sub-network (its closed masks, head included) fits the
  budget, instead of only at the first disconnecting removal (`fits`).

A budget is per task (each task's own model, its head included); the shared model computes states
that several tasks share once and costs at most the sum. Latency budgets (a cost table measured on
a target) are not built yet.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

import numpy as np
import torch

from dagc.costs import block_flops, head_costs
from dagc.errors import ConfigError
from dagc.spec import Spec
from dagc.trainer.topology import close_masks

UNITS = {"flops": 1.0, "kflops": 1e3, "mflops": 1e6, "gflops": 1e9}
MFLOPS = 1e6  # the loss's unit: about one edge of a small network, so λ_sq keeps its scale

__all__ = ["UNITS", "parse_budget", "task_budgets", "loss_costs", "fits"]


def parse_budget(text: str) -> float:
    """FLOPs of a budget written as a number and a unit, ``30MFLOPs`` or ``1.5 GFLOPs`` (units:
    FLOPs, KFLOPs, MFLOPs, GFLOPs, any case). Raises ConfigError for anything else."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]+)\s*", text) if isinstance(text, str) else None
    unit = m.group(2).lower() if m else None
    if m is None or unit not in UNITS:
        hint = " (latency budgets need a measured cost table, not built yet)" if unit in ("ms", "us", "s") else ""
        raise ConfigError(f"budget must be a number and a unit of {['FLOPs', 'KFLOPs', 'MFLOPs', 'GFLOPs']}, "
                          f"e.g. 30MFLOPs; got {text!r}{hint}")
    value = float(m.group(1)) * UNITS[unit]
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"budget must be positive and finite, got {text!r}")
    return value


def task_budgets(spec: Spec, budget: float) -> np.ndarray:
    """What each task's blocks may cost (K,), in FLOPs: the budget less the task's head. Raises
    ConfigError when a head alone exceeds the budget."""
    heads = np.array([head_costs(spec, t)["flops"] for t in spec.task_names], dtype=np.float64)
    over = [(t, h) for t, h in zip(spec.task_names, heads) if h >= budget]
    if over:
        t, h = over[0]
        raise ConfigError(f"the budget of {budget / MFLOPS:g} MFLOPs is below task {t!r}'s head alone "
                          f"({h / MFLOPS:g} MFLOPs); raise --budget")
    return budget - heads


def loss_costs(spec: Spec, budget: float, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cost-aware squeeze's tensors, in MFLOPs: hidden-edge costs (N, N), read-in costs (N,),
    read-out costs (N,) and each task's budget for its blocks (K,), made once per (spec, budget,
    device): every search step asks for them. Read-only. Raises as `task_budgets`."""
    try:
        return _loss_costs(spec, budget, str(device))
    except TypeError:  # a spec built by hand with a list field is not hashable: build uncached
        return _loss_costs.__wrapped__(spec, budget, str(device))


@functools.lru_cache(maxsize=8)
def _loss_costs(spec: Spec, budget: float, device: str) -> tuple[torch.Tensor, ...]:
    g, a, b = block_flops(spec)
    out = (g, a, b, task_budgets(spec, budget))
    return tuple(torch.as_tensor(x / MFLOPS, dtype=torch.float32, device=device) for x in out)


def fits(spec: Spec, task: str, budget: float) -> Callable[[np.ndarray, np.ndarray, np.ndarray], bool]:
    """Whether a task's binary masks (gamma (N, N), alpha (N,), beta (N,)), once closed, cost no
    more than ``budget`` FLOPs with the task's head. Raises SpecError for an unknown task."""
    g_cost, a_cost, b_cost = block_flops(spec)
    head = head_costs(spec, task)["flops"]

    def check(g: np.ndarray, a: np.ndarray, b: np.ndarray) -> bool:
        g, a, b = close_masks(g, a, b)
        return float((g * g_cost).sum() + (a * a_cost).sum() + (b * b_cost).sum()) + head <= budget

    return check

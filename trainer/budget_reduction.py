"""Algorithm 1 under a budget (issue 21): per task (``--budget-scope task``) or jointly for the
compiled shared model (``shared``), with a fallback to other read-ins and read-outs when the
set-up's own cannot fit.

Shared scope. Every task starts from Algorithm 1's set-up (its own [N_α, N_β]); then, until the
shared model's exact cost (`dagc.trainer.budget.shared_cost`) fits, the one edge removed next is the
globally weakest of the tasks' candidates: each task proposes the edge its own reduction would
remove next (FBR: smallest flow score; threshold: smallest ψ; random: a seeded draw, compared by a
second draw), and the smallest proposal across tasks goes. A task whose proposal would disconnect
its input from its read-out is finished, as Algorithm 1 stops there. Globally weakest rather than
round-robin: flow scores are in the same units for every task (ψ times flow ratios), so the search's
least valued edge is cut first wherever it is, and a well-decided task's strong edges are not cut
just because it is its turn.

Fallback (both scopes). Algorithm 1 keeps each task's set-up range [N_α, N_β]; when even its
minimal chain there does not fit (e.g. a task reads in at full resolution, RESULTS "What does not
hold"), the other ranges (i, j) are tried, in the search's order of preference σ(α_i)·σ(β_j)
(j > i, or i = j = N-1, as `dagc.trainer.reduction.state_range` allows), reduced the same way:
per task, the first that fits wins; shared, a task (or every task together, since shared states
are paid once) switches to the first range (in that order, over all tasks) with which the shared
model fits, else to the one that lowers the shared cost most, and again, until it fits or no
switch lowers it. This is greedy: it meets the budget whenever one such switch, or a sequence of
switches that each lower the cost, reaches it; it does not search every combination of ranges. A result that still does not fit is the
cheapest reached, and training says so in one warning line (metrics.json ``budget``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dagc.cost_table import CostTable
from dagc.errors import SpecError
from dagc.spec import Spec
from dagc.trainer.budget import shared_cost, task_cost
from dagc.trainer.reduction import (
    _first_smallest_positive,
    _initial_flow_matrix,
    _reduce,
    flow_scores,
    state_range,
)
from dagc.trainer.topology import close_masks, is_flow_connected, split_flow_matrix

__all__ = ["chooser", "candidate_ranges", "reduce_task", "reduce_shared"]

Masks = tuple[np.ndarray, np.ndarray, np.ndarray]


def chooser(method: str, seed: int) -> tuple[Callable[[np.ndarray], int | None], Callable[[np.ndarray, int], float]]:
    """(choose, score) of a reduction ``method``: the edge it removes next from Ψ (None: none
    left), and that edge's score, lower = weaker, comparable across tasks."""
    if method == "fbr":
        return (lambda psi: _first_smallest_positive(flow_scores(psi))), (lambda psi, e: float(flow_scores(psi).flat[e]))
    if method == "threshold":
        return _first_smallest_positive, (lambda psi, e: float(psi.flat[e]))
    rng = np.random.default_rng(seed)

    def draw(psi: np.ndarray) -> int | None:
        candidates = np.flatnonzero(psi)
        return None if candidates.size == 0 else int(candidates[rng.integers(candidates.size)])

    return draw, (lambda psi, e: float(rng.random()))


def candidate_ranges(alpha: np.ndarray, beta: np.ndarray) -> list[tuple[int, int]]:
    """Every state range [i, j] a task may read in at i and out of j by the set-up's rule (j > i,
    or i = j = N-1), the set-up's own first, then by σ(α_i)·σ(β_j), highest first (ties: lower i, j)."""
    n = len(alpha)
    first = state_range(alpha, beta)
    others = [(i, j) for i in range(n) for j in range(i, n) if (j > i or i == n - 1) and (i, j) != first]
    others.sort(key=lambda r: (-alpha[r[0]] * beta[r[1]], r))
    return [first, *others]


def _reduced(g, a, b, method: str, seed: int, fits, states) -> Masks | None:
    """One task's reduction in ``states`` (None where that range is disconnected), closed."""
    choose, _ = chooser(method, seed)
    try:
        return close_masks(*_reduce(g, a, b, choose, None, fits=fits, states=states))
    except SpecError:
        return None


def reduce_task(spec: Spec, task: str, scores: Masks, method: str, seed: int, budget: float,
                table: CostTable | None = None) -> tuple[Masks, float]:
    """One task's budgeted reduction of its σ(Γ, A, B) ``scores``: Algorithm 1 stopping once the
    task's model fits ``budget``; if it cannot in the set-up's range, the first other range
    (`candidate_ranges`) where it does, else the cheapest result. Returns the closed masks and
    their cost. Raises SpecError as Algorithm 1 does for the set-up's range."""
    cost = task_cost(spec, task, table)

    def fit(g, a, b) -> bool:
        return cost(g, a, b) <= budget

    g, a, b = scores
    ranges = candidate_ranges(a, b)
    choose, _ = chooser(method, seed)
    best = close_masks(*_reduce(g, a, b, choose, None, fits=fit))  # the set-up's range: raises as Algorithm 1
    for states in ranges[1:]:
        if cost(*best) <= budget:
            break
        got = _reduced(g, a, b, method, seed, fit, states)
        if got is not None and cost(*got) < cost(*best):
            best = got
    return best, cost(*best)


# Keeps the joint loop, its fallback and their shared state (the tasks' Ψ) in one place.
def reduce_shared(spec: Spec, scores: list[Masks], method: str, seed: int, budget: float,
                  table: CostTable | None = None) -> tuple[list[Masks], float]:
    """All tasks' budgeted reduction for the shared model (see the module docstring): ``scores``
    holds each task's σ(Γ, A, B); task k's random draws are seeded ``seed + k``. Returns each task's
    closed masks and the shared model's cost. Raises SpecError as Algorithm 1 does."""
    k = len(scores)
    pick = [chooser(method, seed + t) for t in range(k)]
    psis = []
    for g, a, b in scores:
        psi = _initial_flow_matrix(g, a, b)
        if not is_flow_connected(psi):
            _reduce(g, a, b, pick[0][0], None)  # raises Algorithm 1's own error
        psis.append(psi)

    def masks_of(ps: list[np.ndarray]) -> list[Masks]:
        return [close_masks(*split_flow_matrix((p != 0).astype(np.int64))) for p in ps]

    def cost_of(ms: list[Masks]) -> float:
        return shared_cost(spec, *(np.stack([m[i] for m in ms]) for i in range(3)), table=table)

    done = [False] * k
    while cost_of(masks_of(psis)) > budget:
        best = None
        for t in range(k):
            if done[t]:
                continue
            edge = pick[t][0](psis[t])
            trial = None if edge is None else psis[t].copy()
            if trial is not None:
                trial.flat[edge] = 0.0
            if trial is None or not is_flow_connected(trial):
                done[t] = True
                continue
            s = pick[t][1](psis[t], edge)
            if best is None or s < best[0]:
                best = (s, t, trial)
        if best is None:
            break
        psis[best[1]] = best[2]
    masks = masks_of(psis)
    cost = cost_of(masks)
    while cost > budget:  # the fallback: other read-in / read-out ranges, minimal chains
        options = []
        for t, (g, a, b) in enumerate(scores):
            def fit(*m, t=t, now=masks) -> bool:  # the shared model with task t's masks replaced
                return cost_of([*now[:t], m, *now[t + 1:]]) <= budget

            for order, states in enumerate(candidate_ranges(a, b)[1:]):
                got = _reduced(g, a, b, method, seed + t, fit, states)
                if got is not None:
                    trial = [*masks[:t], got, *masks[t + 1:]]
                    options.append((-(a[states[0]] * b[states[1]]), order, t, cost_of(trial), trial))
        # Every task to the same range: states shared across tasks are paid once, so moving one
        # task alone off a shared chain can cost more even where moving all of them costs less.
        for order, states in enumerate(sorted({r for _, a, b in scores for r in candidate_ranges(a, b)})):
            moved = [_reduced(g, a, b, method, seed + t, None, states) for t, (g, a, b) in enumerate(scores)]
            if all(m is not None for m in moved):
                options.append((0.0, order, k, cost_of(moved), moved))
        fitting = [o for o in options if o[3] <= budget]
        chosen = min(fitting, key=lambda o: o[:3]) if fitting else min(options, key=lambda o: (o[3], o[:3]), default=None)
        if chosen is None or chosen[3] >= cost:
            break
        masks, cost = chosen[4], chosen[3]
    return masks, cost

"""How decisively the search chose each task's structure (issue 12), measured on σ(Γ, A, B) at
the end of the search, the values Algorithm 1 reduces.

Per task:

``alpha_margin`` / ``beta_margin``
    σ of argmax A (resp. B) minus σ of the runner-up; N_α and N_β of Algorithm 1 come from these
    argmaxes, so a small margin means the sub-network's depth was picked by noise. 1.0 when N = 1.
``alpha_runner_up`` / ``beta_runner_up``
    σ of the runner-up (None when N = 1); a runner-up above 1 − `SATURATED` with a small margin
    is a *saturated* tie: several read-ins (read-outs) are all on, and a longer search only
    saturates them further.
``decided_edges``
    the fraction of band edges with |σ(γ) − 0.5| > `DECIDED_EDGE` (σ below 0.1 or above 0.9).
``first_removals``
    Algorithm 1's first `FIRST_REMOVALS` removals (`dagc.trainer.reduction.first_removals`), each
    with ``relative_gap`` = (runner-up score − score) / runner-up score.
``near_tie``
    whether one of those removals won by a relative gap below `NEAR_TIE_GAP`.
``decided``
    both margins >= `MARGIN_THRESHOLD` and no near-tie.

The thresholds are conventions, not the paper's. `MARGIN_THRESHOLD`: in the issue's default run
(arch lr 0.01, 250 search iterations) the A margins were 0.02–0.09 and the chosen sub-networks
changed from seed to seed, so a margin below 0.1 is treated as undecided.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from dagc.trainer.network import CentralNetwork
from dagc.trainer.reduction import first_removals

MARGIN_THRESHOLD = 0.1
DECIDED_EDGE = 0.4
NEAR_TIE_GAP = 0.05
SATURATED = 0.1
FIRST_REMOVALS = 3

__all__ = ["MARGIN_THRESHOLD", "network_decisiveness", "task_decisiveness", "warning_line"]


def _margin(values: np.ndarray) -> tuple[float, float | None]:
    """The largest value minus the second largest (1.0 for a single value), and the second."""
    if values.size < 2:
        return 1.0, None
    top = np.sort(values)[::-1]
    return float(top[0] - top[1]), float(top[1])


def task_decisiveness(gamma, alpha, beta, band) -> dict[str, Any]:
    """The decisiveness of one task (see the module doc for the keys).

    Takes σ(Γ) masked to the band (N×N), σ(A) and σ(B) (N each), all in [0, 1], and the band
    (N×N, 1 where an edge exists). Returns a JSON-ready dict. Raises SpecError (from the
    reduction) on malformed arrays.
    """
    g, a, b = (np.asarray(x, dtype=np.float64) for x in (gamma, alpha, beta))
    on_band = np.asarray(band) != 0
    edges = g[on_band]
    decided_edges = float(np.mean(np.abs(edges - 0.5) > DECIDED_EDGE)) if edges.size else 1.0
    removals = first_removals(g, a, b, FIRST_REMOVALS)
    for r in removals:
        ru = r["runner_up"]
        r["relative_gap"] = None if ru is None or ru <= 0 else (ru - r["score"]) / ru
    near_tie = any(r["relative_gap"] is not None and r["relative_gap"] < NEAR_TIE_GAP for r in removals)
    (am, a2), (bm, b2) = _margin(a), _margin(b)
    return {"alpha_margin": am, "beta_margin": bm, "alpha_runner_up": a2, "beta_runner_up": b2,
            "decided_edges": decided_edges,
            "first_removals": removals, "near_tie": near_tie,
            "decided": am >= MARGIN_THRESHOLD and bm >= MARGIN_THRESHOLD and not near_tie}


def network_decisiveness(net: CentralNetwork) -> dict[str, dict[str, Any]]:
    """Per task of ``net``, `task_decisiveness` of its current logits (after the search: those the
    reduction used; fine-tuning does not change them). Returns task -> dict."""
    with torch.no_grad():
        band = net.band.cpu().double()
        gam = (torch.sigmoid(net.arch_gamma.detach().cpu().double()) * band).numpy()
        alp = torch.sigmoid(net.arch_alpha.detach().cpu().double()).numpy()
        bet = torch.sigmoid(net.arch_beta.detach().cpu().double()).numpy()
    return {t.name: task_decisiveness(gam[k], alp[k], bet[k], band.numpy()) for k, t in enumerate(net.spec.tasks)}


def warning_line(decisiveness: Mapping[str, Mapping[str, Any]] | None) -> str | None:
    """One line naming the tasks whose structure was not decided, with a remedy; None if every
    task was decided (or there was no search: ``decisiveness`` None or empty)."""
    undecided = [t for t, d in (decisiveness or {}).items() if not d["decided"]]
    if not undecided:
        return None
    worst = min(min(decisiveness[t]["alpha_margin"], decisiveness[t]["beta_margin"]) for t in undecided)
    saturated = [t for t in undecided if _saturated_tie(decisiveness[t])]
    note = (f"; the A/B ties of {', '.join(saturated)} are between entries all at σ > {1 - SATURATED:.1f} "
            "(saturated), which a longer search does not break" if saturated else "")
    return (f"warning: the search did not decide the structure of {', '.join(undecided)} (smallest A/B margin "
            f"{worst:.3f} < {MARGIN_THRESHOLD}, or Algorithm 1's first removals were near-ties); "
            f"train longer (--search-iters) or with a higher --arch-lr{note}")


def _saturated_tie(d: Mapping[str, Any]) -> bool:
    """Whether a task's small A or B margin is a tie between saturated entries."""
    return any(d[f"{x}_margin"] < MARGIN_THRESHOLD and (d[f"{x}_runner_up"] or 0.0) > 1 - SATURATED
               for x in ("alpha", "beta"))

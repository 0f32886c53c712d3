"""Reduction of one task's searched weights to binary masks (paper Algorithm 1) and baselines.

All three reductions share the set-up and the stopping rule below (the conventions this project
fixed for Algorithm 1); they differ only in which edge they try to remove next (FBR: the smallest
non-zero `flow_scores`; threshold: the smallest ψ; random: a seeded draw):

- set-up: ``N_α = argmax alpha`` and ``N_β = min(N-1, max(N_α+1, argmax beta))`` (0-based,
  first maximum on ties as numpy's argmax); only states in [N_α, N_β] keep edges (hidden edges
  with both ends in the range, read-ins into and read-outs from states in the range); these
  merge into the flow matrix Ψ (node 0 = input, node i+1 = hidden state i, node N+1 = read-out).
- loop: pick an edge; if zeroing it disconnects node 0 from node N+1, stop and return the last
  connected Ψ; otherwise zero it and go on. With ``target_sparsity`` the loop also stops, before
  picking, once the sparsity (see `dagc.trainer.topology.sparsity`) is <= the target.
- result: Ψ binarised and split back into (gamma_hat, alpha_hat, beta_hat), 0/1 np.int64.

Further interpretations (not fixed by the paper):

- If Ψ is already disconnected after the set-up (e.g. alpha or beta is 0 on every state of
  [N_α, N_β]), there is no "last connected Ψ" to return: SpecError.
- The target is also checked on the set-up Ψ: if the truncation to [N_α, N_β] alone reaches
  it, nothing is removed.
- The total edge count for the sparsity is that of the task's whole central network,
  count_nonzero(gamma) + 2N, taken from the gamma given (before the truncation), since gamma is
  non-zero exactly on its band (a sigmoid output is never 0).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dagc.errors import ConfigError, SpecError

from .topology import (
    _as_flow_matrix,
    _as_task_arrays,
    flow_matrix,
    is_flow_connected,
    split_flow_matrix,
)

__all__ = [
    "first_removals",
    "flow_based_reduction",
    "flow_scores",
    "random_reduction",
    "state_range",
    "threshold_reduction",
]

# Given the current Ψ, the flat (row-major) index of the edge to try next, or None to stop.
_EdgeChooser = Callable[[np.ndarray], "int | None"]


def state_range(alpha, beta) -> tuple[int, int]:
    """The inclusive range [N_α, N_β] of hidden states that keep edges.

    Takes alpha and beta, 1-D arrays of the same length N >= 1. Returns
    (N_α, N_β) = (argmax alpha, min(N-1, max(N_α+1, argmax beta))), 0-based, first maximum on
    ties. Raises SpecError if the arrays are not 1-D of the same non-zero length or contain NaN.
    """
    a = np.asarray(alpha, dtype=np.float64)
    b = np.asarray(beta, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise SpecError(
            f"alpha and beta must be 1-D of the same length N >= 1, got {a.shape} and {b.shape}"
        )
    if np.isnan(a).any() or np.isnan(b).any():
        raise SpecError("alpha and beta must not contain NaN")
    n_alpha = int(np.argmax(a))
    n_beta = min(a.size - 1, max(n_alpha + 1, int(np.argmax(b))))
    return n_alpha, n_beta


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise numerator / denominator, 0 where the denominator is 0 (the paper's convention)."""
    numerator, denominator = np.broadcast_arrays(numerator, denominator)
    out = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def flow_scores(psi) -> np.ndarray:
    """Information-flow score of every entry of a flow matrix (Algorithm 1, line 13).

    ``S_ij = ψ_ij · ((Σ_k ψ_ki / Σ_k ψ_ik) / In_j + (Σ_k ψ_jk / Σ_k ψ_kj) / Out_j)`` where In_j
    and Out_j count the non-zero entries of column j and row j; a term with a zero denominator
    counts as 0. Vectorised: the first ratio depends on i only, the second term on j only.

    Takes an (N+2)×(N+2) array with values in [0, 1], zero on and below the diagonal. Returns
    a float64 array of the same shape (0 where ψ is 0). Raises SpecError on a malformed Ψ.
    """
    arr = _as_flow_matrix(psi)
    active = arr != 0
    out_sum = arr.sum(axis=1)
    in_sum = arr.sum(axis=0)
    in_count = active.sum(axis=0)
    out_count = active.sum(axis=1)
    source_term = _safe_divide(_safe_divide(in_sum, out_sum)[:, None], in_count[None, :])
    target_term = _safe_divide(_safe_divide(out_sum, in_sum), out_count)
    return arr * (source_term + target_term[None, :])


def _first_smallest_positive(values: np.ndarray) -> int | None:
    """Flat index of the smallest positive entry, first in row-major order; None if none."""
    masked = np.where(values > 0, values, np.inf)
    index = int(np.argmin(masked))  # argmin returns the first of equal minima
    return None if np.isinf(masked.flat[index]) else index


def _check_target(target_sparsity) -> float | None:
    """Return the target sparsity as a float, or None; ConfigError if outside (0, 1]."""
    if target_sparsity is None:
        return None
    try:
        target = float(target_sparsity)
    except (TypeError, ValueError):
        raise ConfigError(
            f"target_sparsity must be a number in (0, 1], got {target_sparsity!r}"
        ) from None
    if not 0.0 < target <= 1.0:  # also rejects NaN
        raise ConfigError(f"target_sparsity must be in (0, 1], got {target_sparsity!r}")
    return target


def _initial_flow_matrix(gamma: np.ndarray, alpha: np.ndarray, beta: np.ndarray,
                         states: tuple[int, int] | None = None) -> np.ndarray:
    """Ψ restricted to the states in [N_α, N_β] (Algorithm 1, lines 2-8), or in ``states``."""
    n_alpha, n_beta = state_range(alpha, beta) if states is None else states
    keep = np.zeros(gamma.shape[0], dtype=bool)
    keep[n_alpha : n_beta + 1] = True
    return flow_matrix(
        np.where(np.outer(keep, keep), gamma, 0.0),
        np.where(keep, alpha, 0.0),
        np.where(keep, beta, 0.0),
    )


def _reduce(gamma, alpha, beta, choose: _EdgeChooser, target_sparsity, removed: list | None = None, fits=None,
            states: tuple[int, int] | None = None):
    """Shared set-up and stopping rule; `choose` decides which edge to try next. ``removed``, if
    given, receives (Ψ before the removal, flat index of the removed edge) for every removal;
    ``fits`` (binary gamma, alpha, beta -> bool), if given, stops at the first Ψ that fits;
    ``states`` replaces the set-up's [N_α, N_β] (a budget's fallback, `dagc.trainer.budget_reduction`)."""
    g, a, b = _as_task_arrays(gamma, alpha, beta)
    target = _check_target(target_sparsity)
    total_edges = np.count_nonzero(g) + 2 * g.shape[0]
    psi = _initial_flow_matrix(g, a, b, states)
    if not is_flow_connected(psi):
        n_alpha, n_beta = state_range(a, b) if states is None else states
        raise SpecError(
            "input and read-out are not connected before any removal: no path through states "
            f"[{n_alpha}, {n_beta}] (are alpha or beta zero on all of them?)"
        )
    while target is None or np.count_nonzero(psi) / total_edges > target:
        if fits is not None and fits(*split_flow_matrix((psi != 0).astype(np.int64))):
            break
        edge = choose(psi)
        if edge is None:
            break
        trial = psi.copy()
        trial.flat[edge] = 0.0
        if not is_flow_connected(trial):
            break
        if removed is not None:
            removed.append((psi, edge))
        psi = trial
    return split_flow_matrix((psi != 0).astype(np.int64))


def flow_based_reduction(gamma, alpha, beta, *, target_sparsity=None, fits=None):
    """Flow-based reduction (paper Algorithm 1) of one task's sigmoid-ed weights.

    Repeatedly zeroes the edge with the smallest non-zero `flow_scores` (ties: first in row-major
    order of Ψ; an edge whose score is 0 is never removed) and stops at the first removal that
    would disconnect the input from the read-out, or when no edge has a positive score, or
    (with `target_sparsity`) once the sparsity is <= the target, or (with ``fits``, a budget's
    test of binary gamma, alpha, beta: `dagc.trainer.budget.fits`) before the first removal once
    the sub-network fits. See the module docstring for the set-up and the interpretations.

    Takes gamma (N×N, zero outside the flow-restricted band, in particular on and below the
    diagonal), alpha (N), beta (N), all in [0, 1], and optionally target_sparsity in (0, 1] and fits.
    Returns (gamma_hat, alpha_hat, beta_hat), 0/1 np.int64 arrays of the input shapes, whose
    graph connects input to read-out. Raises SpecError on wrong shapes, NaN, values outside
    [0, 1], a bad target, or an input already disconnected within [N_α, N_β].
    """
    return _reduce(
        gamma,
        alpha,
        beta,
        lambda psi: _first_smallest_positive(flow_scores(psi)),
        target_sparsity,
        fits=fits,
    )


def threshold_reduction(gamma, alpha, beta, *, target_sparsity=None, fits=None):
    """Baseline: like `flow_based_reduction`, but removes the edge with the smallest ψ.

    Ties go to the first edge in row-major order of Ψ. Takes, returns and raises as
    `flow_based_reduction`.
    """
    return _reduce(gamma, alpha, beta, _first_smallest_positive, target_sparsity, fits=fits)


def random_reduction(gamma, alpha, beta, *, seed, target_sparsity=None, fits=None):
    """Baseline: like `flow_based_reduction`, but removes a uniformly random remaining edge.

    The edge is drawn among the non-zero entries of Ψ with ``np.random.default_rng(seed)``
    (one generator per call, one draw per step), so the result is deterministic for a given
    seed. Takes `seed` (anything `np.random.default_rng` accepts) plus the arguments of
    `flow_based_reduction`; returns and raises as it does.
    """
    rng = np.random.default_rng(seed)

    def choose(psi: np.ndarray) -> int | None:
        candidates = np.flatnonzero(psi)
        if candidates.size == 0:
            return None
        return int(candidates[rng.integers(candidates.size)])

    return _reduce(gamma, alpha, beta, choose, target_sparsity, fits=fits)


def first_removals(gamma, alpha, beta, count: int = 3) -> list[dict]:
    """How close Algorithm 1's first removals were to ties: for each of the first ``count`` edges
    that `flow_based_reduction` removes (the same run of the same loop, so the same result), the
    edge as (i, j) of Ψ, its flow score, and the runner-up's (the next smallest positive score in
    the same Ψ; None if it was the only candidate).

    Takes the arguments of `flow_based_reduction` and ``count >= 0``. Returns a list of at most
    ``count`` dicts ``{"edge": [i, j], "score": s, "runner_up": s2 | None}``. Raises as
    `flow_based_reduction`.
    """
    removed: list = []
    _reduce(gamma, alpha, beta, lambda psi: _first_smallest_positive(flow_scores(psi)), None, removed)
    out = []
    for psi, edge in removed[:count]:
        scores = flow_scores(psi)
        score = float(scores.flat[edge])
        rest = scores.copy()
        rest.flat[edge] = 0.0
        nxt = _first_smallest_positive(rest)
        i, j = divmod(edge, psi.shape[1])
        out.append({"edge": [i, j], "score": score,
                    "runner_up": None if nxt is None else float(rest.flat[nxt])})
    return out

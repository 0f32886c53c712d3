"""Graph helpers for one task's sub-network of the central network (numpy only).

A task's sub-network is given as three arrays, the layout the trainer stores:
``gamma`` (N×N, ``gamma[i, j]`` is the edge hidden state i -> hidden state j, only i < j),
``alpha`` (length N, read-in: input -> hidden state j) and ``beta`` (length N, read-out:
hidden state i -> read-out). They merge into the (N+2)×(N+2) flow matrix Ψ with node 0 = input,
node i+1 = hidden state i and node N+1 = read-out.

Hidden edges only go from a lower to a higher state index, so node order is a topological order
of Ψ: every graph pass below is one sweep over the nodes instead of a general graph search.
"""

from __future__ import annotations

import numpy as np

from dagc.errors import SpecError

__all__ = [
    "close_masks",
    "flow_band",
    "flow_matrix",
    "is_connected",
    "is_flow_connected",
    "sparsity",
    "split_flow_matrix",
    "topology_metrics",
]


def _as_unit_array(name: str, value, *, binary: bool = False) -> np.ndarray:
    """Return `value` as float64 after checking it is real, NaN-free and in [0, 1] (or 0/1)."""
    arr = np.asarray(value)
    if not (
        arr.dtype == np.bool_
        or np.issubdtype(arr.dtype, np.integer)
        or np.issubdtype(arr.dtype, np.floating)
    ):
        raise SpecError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if np.isnan(arr).any():
        raise SpecError(f"{name} contains NaN")
    if ((arr < 0.0) | (arr > 1.0)).any():
        raise SpecError(f"{name} has values outside [0, 1]")
    if binary and not np.isin(arr, (0.0, 1.0)).all():
        raise SpecError(f"{name} must be a 0/1 mask, got other values")
    return arr


def _as_hidden_matrix(name: str, value, *, binary: bool = False) -> np.ndarray:
    """Check an N×N hidden-edge array (square, N >= 1, zero on and below the diagonal)."""
    arr = _as_unit_array(name, value, binary=binary)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] < 1:
        raise SpecError(f"{name} must be a square N×N array with N >= 1, got shape {arr.shape}")
    if np.any(np.tril(arr) != 0):
        raise SpecError(
            f"{name} must be zero on and below the diagonal "
            "(a hidden edge goes from state i to a later state j > i only)"
        )
    return arr


def _as_task_arrays(gamma, alpha, beta, *, binary: bool = False):
    """Validate one task's (gamma, alpha, beta) and return them as float64 arrays."""
    g = _as_hidden_matrix("gamma", gamma, binary=binary)
    n = g.shape[0]
    a = _as_unit_array("alpha", alpha, binary=binary)
    b = _as_unit_array("beta", beta, binary=binary)
    for name, vec in (("alpha", a), ("beta", b)):
        if vec.shape != (n,):
            raise SpecError(
                f"{name} must have shape ({n},) to match gamma of shape {g.shape}, got {vec.shape}"
            )
    return g, a, b


def _as_flow_matrix(psi) -> np.ndarray:
    """Check a flow matrix: square, at least input and read-out, strictly upper triangular."""
    arr = _as_unit_array("psi", psi)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] < 2:
        raise SpecError(f"psi must be a square (N+2)×(N+2) array, got shape {arr.shape}")
    # The one-sweep passes rely on node order being topological.
    if np.any(np.tril(arr) != 0):
        raise SpecError("psi must be zero on and below the diagonal (node order is topological)")
    return arr


def _forward_reach(psi: np.ndarray) -> np.ndarray:
    """Boolean vector: which nodes of a (topologically ordered) Ψ are reachable from node 0."""
    reach = np.zeros(psi.shape[0], dtype=bool)
    reach[0] = True
    for v in range(1, psi.shape[0]):
        reach[v] = np.any(reach[:v] & (psi[:v, v] != 0))
    return reach


def _backward_reach(psi: np.ndarray) -> np.ndarray:
    """Boolean vector: which nodes of a (topologically ordered) Ψ reach the last node."""
    size = psi.shape[0]
    reach = np.zeros(size, dtype=bool)
    reach[-1] = True
    for u in range(size - 2, -1, -1):
        reach[u] = np.any(reach[u + 1 :] & (psi[u, u + 1 :] != 0))
    return reach


def _longest_path(psi: np.ndarray) -> int:
    """Number of edges on the longest path of a (topologically ordered) Ψ; 0 without edges."""
    length = np.zeros(psi.shape[0], dtype=np.int64)
    for v in range(1, psi.shape[0]):
        preds = psi[:v, v] != 0
        if preds.any():
            length[v] = length[:v][preds].max() + 1
    return int(length.max())


def flow_band(n_states: int, flow_constant: int) -> np.ndarray:
    """The flow-restricted band of structurally existing hidden edges.

    Takes the number of hidden states N >= 1 and the flow constant M >= 1. Returns an N×N int64
    array with 1 at (i, j) where 0 < j - i <= M and 0 elsewhere. Raises SpecError if N or M is
    not a positive integer.
    """
    for name, value in (("n_states", n_states), ("flow_constant", flow_constant)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise SpecError(f"{name} must be a positive integer, got {value!r}")
    offset = np.arange(n_states)[None, :] - np.arange(n_states)[:, None]
    return ((offset > 0) & (offset <= flow_constant)).astype(np.int64)


def flow_matrix(gamma, alpha, beta) -> np.ndarray:
    """Merge one task's arrays into the flow matrix Ψ.

    Takes gamma (N×N), alpha (N) and beta (N) with values in [0, 1]. Returns the (N+2)×(N+2)
    float64 matrix with Ψ[i+1, j+1] = gamma[i, j], Ψ[0, j+1] = alpha[j] and
    Ψ[i+1, N+1] = beta[i] (node 0 = input, node N+1 = read-out). Raises SpecError on wrong
    shapes, NaN, values outside [0, 1] or gamma entries on or below the diagonal.
    """
    g, a, b = _as_task_arrays(gamma, alpha, beta)
    n = g.shape[0]
    psi = np.zeros((n + 2, n + 2), dtype=np.float64)
    psi[1 : n + 1, 1 : n + 1] = g
    psi[0, 1 : n + 1] = a
    psi[1 : n + 1, n + 1] = b
    return psi


def split_flow_matrix(psi) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `flow_matrix`.

    Takes an (N+2)×(N+2) array. Returns copies (gamma, alpha, beta) = (Ψ[1:N+1, 1:N+1],
    Ψ[0, 1:N+1], Ψ[1:N+1, N+1]) in Ψ's dtype. Raises SpecError if Ψ is not square with N >= 1.
    """
    arr = np.asarray(psi)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] < 3:
        raise SpecError(f"psi must be a square (N+2)×(N+2) array with N >= 1, got {arr.shape}")
    return arr[1:-1, 1:-1].copy(), arr[0, 1:-1].copy(), arr[1:-1, -1].copy()


def is_flow_connected(psi) -> bool:
    """Whether the last node of a flow matrix Ψ is reachable from node 0 over non-zero entries.

    Takes an (N+2)×(N+2) array with values in [0, 1], zero on and below the diagonal. Returns a
    bool. Raises SpecError on a malformed Ψ.
    """
    return bool(_forward_reach(_as_flow_matrix(psi))[-1])


def is_connected(gamma, alpha, beta) -> bool:
    """Whether the read-out is reachable from the input over the non-zero entries.

    Takes one task's gamma (N×N), alpha (N) and beta (N), weights or 0/1 masks in [0, 1].
    Returns a bool. Raises SpecError on malformed input (see `flow_matrix`).
    """
    return bool(_forward_reach(flow_matrix(gamma, alpha, beta))[-1])


def close_masks(gamma, alpha, beta) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep exactly the edges that lie on some input -> read-out path.

    A block applied to a dead (zero) state does not output zero (BN bias, ReLU), and a state
    that does not reach the read-out is computed for nothing; so the masks are closed once,
    right after reduction, so that the masked supernet, fine-tuning and the compiled models all
    compute the same function.

    An edge u -> v is kept iff u is reachable from the input and v reaches the read-out (over
    the given edges); so the read-in into state j is kept iff j reaches the read-out and the
    read-out from state i iff i is reachable from the input. Idempotent; a connected input stays
    connected (every edge of an input -> read-out path is kept).

    Takes one task's 0/1 masks gamma (N×N), alpha (N), beta (N) of any real or bool dtype.
    Returns (gamma, alpha, beta) as 0/1 int64 arrays of the same shapes. Raises SpecError on
    wrong shapes, values other than 0/1, or gamma entries on or below the diagonal.
    """
    g, a, b = _as_task_arrays(gamma, alpha, beta, binary=True)
    psi = flow_matrix(g, a, b)
    on_path = np.outer(_forward_reach(psi), _backward_reach(psi))
    closed = ((psi != 0) & on_path).astype(np.int64)
    return split_flow_matrix(closed)


def sparsity(gamma_hat, alpha_hat, beta_hat, gamma) -> float:
    """Sparsity S of a task's sub-network: kept edges / all edges of the central network.

    Takes the kept masks gamma_hat (N×N), alpha_hat (N), beta_hat (N) (0/1, or weights whose
    non-zero entries count as kept) and `gamma`, the task's N×N weights or band: its non-zero
    entries are the structurally existing hidden edges. All edges = count_nonzero(gamma) + 2N
    (every state has a read-in and a read-out). Returns a float in [0, 1]. Raises SpecError on
    malformed input or on a kept hidden edge where `gamma` is zero.
    """
    g_hat, a_hat, b_hat = _as_task_arrays(gamma_hat, alpha_hat, beta_hat)
    structure = _as_hidden_matrix("gamma", gamma)
    if structure.shape != g_hat.shape:
        raise SpecError(f"gamma has shape {structure.shape} but gamma_hat has shape {g_hat.shape}")
    if np.any((g_hat != 0) & (structure == 0)):
        raise SpecError("gamma_hat keeps a hidden edge that does not exist in gamma")
    n = g_hat.shape[0]
    kept = np.count_nonzero(g_hat) + np.count_nonzero(a_hat) + np.count_nonzero(b_hat)
    return float(kept / (np.count_nonzero(structure) + 2 * n))


def topology_metrics(gamma, alpha, beta, band) -> dict:
    """Depth D, width W and sparsity S (paper Sec. 3.1) of one task's binary masks.

    Interpretation: the graph has the nodes {input, hidden states, read-out} and the active
    edges (hidden, read-in and read-out), taken as given (close the masks first to ignore
    dangling edges).

    - D: the longest path, in edges, between any two connected vertices; the graph is a DAG, so
      this is its longest path (a chain input -> 3 states -> read-out has D = 4). 0 without edges.
    - W: the maximum out-degree over hidden states, counting hidden -> hidden and hidden ->
      read-out edges (the input's read-in fan-out is not a hidden state's). 0 without edges.
    - S: active edges (hidden + read-in + read-out) / all edges of the central network,
      band.sum() + 2N.

    Takes 0/1 masks gamma (N×N), alpha (N), beta (N) and `band`, the N×N 0/1 array of
    structurally existing hidden edges (see `flow_band`). Returns {"D": int, "W": int,
    "S": float}. Raises SpecError on malformed input or an active hidden edge outside the band.
    """
    g, a, b = _as_task_arrays(gamma, alpha, beta, binary=True)
    structure = _as_hidden_matrix("band", band, binary=True)
    if structure.shape != g.shape:
        raise SpecError(f"band has shape {structure.shape} but gamma has shape {g.shape}")
    if np.any((g != 0) & (structure == 0)):
        raise SpecError("gamma has an active edge outside the band")
    psi = flow_matrix(g, a, b)
    n = g.shape[0]
    width = int(np.count_nonzero(psi[1 : n + 1, 1:], axis=1).max())
    return {
        "D": _longest_path(psi),
        "W": width,
        "S": sparsity(g, a, b, structure),
    }

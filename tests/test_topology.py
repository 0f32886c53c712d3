"""Tests of dagc.trainer.topology: band, connectivity, mask closure and D / W / S metrics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dagc.trainer.topology import (
    close_masks,
    flow_band,
    flow_matrix,
    is_connected,
    is_flow_connected,
    sparsity,
    split_flow_matrix,
    topology_metrics,
)


def _edges(gamma, alpha, beta):
    """Edge list over nodes 'in', 0..N-1, 'out' (independent of the flow-matrix layout)."""
    n = len(alpha)
    edges = [(int(i), int(j)) for i, j in zip(*np.nonzero(np.asarray(gamma)))]
    edges += [("in", j) for j in range(n) if alpha[j]]
    edges += [(i, "out") for i in range(n) if beta[i]]
    return edges


def _reach(edges, start, forward=True):
    """Plain depth-first search, used as the reference for the sweep-based passes."""
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        for u, v in edges:
            a, b = (u, v) if forward else (v, u)
            if a == node and b not in seen:
                seen.add(b)
                stack.append(b)
    return seen


@st.composite
def binary_task(draw, min_n=1, max_n=8):
    n = draw(st.integers(min_n, max_n))
    m = draw(st.integers(1, n))
    band = flow_band(n, m)
    bits = st.integers(0, 1)
    gamma = draw(arrays(np.int64, (n, n), elements=bits)) * band
    alpha = draw(arrays(np.int64, n, elements=bits))
    beta = draw(arrays(np.int64, n, elements=bits))
    return gamma, alpha, beta, band


# --- flow_band --------------------------------------------------------------------------------


def test_flow_band_hand():
    np.testing.assert_array_equal(
        flow_band(4, 2),
        [[0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]],
    )
    assert flow_band(4, 2).dtype == np.int64
    # M >= N - 1 is the complete DAG.
    np.testing.assert_array_equal(flow_band(3, 5), np.triu(np.ones((3, 3), np.int64), 1))
    np.testing.assert_array_equal(flow_band(1, 1), [[0]])


@pytest.mark.parametrize("n, m", [(0, 1), (3, 0), (2.0, 1), (True, 1), (3, -1)])
def test_flow_band_rejects_bad_arguments(n, m):
    with pytest.raises(ValueError):
        flow_band(n, m)


# --- flow matrix and connectivity -------------------------------------------------------------


def test_flow_matrix_layout_and_split_roundtrip():
    gamma = np.array([[0, 0.5, 0.25], [0, 0, 0.75], [0, 0, 0]])
    alpha = np.array([0.1, 0.2, 0.3])
    beta = np.array([0.4, 0.5, 0.6])
    psi = flow_matrix(gamma, alpha, beta)
    assert psi.shape == (5, 5)
    assert psi[1, 2] == 0.5 and psi[2, 3] == 0.75 and psi[1, 3] == 0.25
    np.testing.assert_array_equal(psi[0, 1:4], alpha)
    np.testing.assert_array_equal(psi[1:4, 4], beta)
    assert psi[0, 4] == 0 and not psi[:, 0].any() and not psi[4].any()
    for got, want in zip(split_flow_matrix(psi), (gamma, alpha, beta)):
        np.testing.assert_array_equal(got, want)


def test_is_connected_hand():
    gamma = np.array([[0, 1, 0], [0, 0, 0], [0, 0, 0]])
    # in -> s0 -> s1, but only s2 reads out: disconnected.
    assert not is_connected(gamma, [1, 0, 0], [0, 0, 1])
    assert is_connected(gamma, [1, 0, 0], [0, 1, 0])
    # Weights, not only masks, are accepted: non-zero means present.
    assert is_connected(gamma * 0.3, [0.2, 0, 0], [0, 0.9, 0])
    assert not is_connected(np.zeros((2, 2)), [0, 0], [1, 1])
    assert is_flow_connected(flow_matrix(gamma, [1, 0, 0], [0, 1, 0]))


@pytest.mark.parametrize(
    "gamma, alpha, beta",
    [
        (np.zeros((2, 3)), [0, 0], [0, 0]),  # not square
        (np.zeros((0, 0)), [], []),  # N = 0
        (np.zeros((2, 2)), [0, 0, 0], [0, 0]),  # alpha length
        (np.zeros((2, 2)), [0, 0], [[0, 0]]),  # beta shape
        (np.array([[0, 0], [1, 0]]), [1, 0], [0, 1]),  # edge backwards
        (np.array([[1, 0], [0, 0]]), [1, 0], [0, 1]),  # self-loop
        (np.array([[0, np.nan], [0, 0]]), [1, 0], [0, 1]),  # NaN
        (np.zeros((2, 2)), [1.5, 0], [0, 1]),  # > 1
        (np.zeros((2, 2)), [1, 0], [0, -0.1]),  # < 0
        (np.zeros((2, 2)), ["a", "b"], [0, 1]),  # not numeric
    ],
)
def test_malformed_input_raises(gamma, alpha, beta):
    with pytest.raises(ValueError):
        is_connected(gamma, alpha, beta)


# --- close_masks ------------------------------------------------------------------------------


def test_close_masks_hand_dangling_edges():
    # in -> s0 -> s1 -> out is the only path. Dangling: s1 -> s2 and the read-in into s2 (s2
    # never reaches the read-out), and s3 -> out (s3 is never reached from the input).
    gamma = np.zeros((4, 4), np.int64)
    gamma[0, 1] = gamma[1, 2] = 1
    alpha = np.array([1, 0, 1, 0])
    beta = np.array([0, 1, 0, 1])
    g, a, b = close_masks(gamma, alpha, beta)
    want_gamma = np.zeros((4, 4), np.int64)
    want_gamma[0, 1] = 1
    np.testing.assert_array_equal(g, want_gamma)
    np.testing.assert_array_equal(a, [1, 0, 0, 0])
    np.testing.assert_array_equal(b, [0, 1, 0, 0])
    assert g.dtype == a.dtype == b.dtype == np.int64


def test_close_masks_keeps_dead_start_out_of_reduction_result():
    # The reduction can leave a state with no input but an outgoing edge (see test_reduction);
    # that edge is not on any input -> read-out path.
    g, a, b = close_masks(np.array([[0, 1], [0, 0]]), np.array([0, 1]), np.array([0, 1]))
    np.testing.assert_array_equal(g, [[0, 0], [0, 0]])
    np.testing.assert_array_equal(a, [0, 1])
    np.testing.assert_array_equal(b, [0, 1])


def test_close_masks_accepts_bool_and_float_masks():
    g, a, b = close_masks(
        np.array([[False, True], [False, False]]), np.array([1.0, 0.0]), np.array([False, True])
    )
    np.testing.assert_array_equal(g, [[0, 1], [0, 0]])
    np.testing.assert_array_equal(a, [1, 0])
    np.testing.assert_array_equal(b, [0, 1])
    assert g.dtype == a.dtype == b.dtype == np.int64


def test_close_masks_rejects_non_binary():
    with pytest.raises(ValueError, match="0/1"):
        close_masks(np.array([[0, 0.5], [0, 0]]), [1, 0], [0, 1])


@settings(max_examples=100, deadline=None)
@given(binary_task())
def test_close_masks_properties(task):
    gamma, alpha, beta, _ = task
    closed = close_masks(gamma, alpha, beta)
    # Idempotent, and only removes.
    for again, once in zip(close_masks(*closed), closed):
        np.testing.assert_array_equal(again, once)
    for once, given_mask in zip(closed, (gamma, alpha, beta)):
        assert once.shape == np.shape(given_mask)
        assert np.all(once <= given_mask)
    assert is_connected(*closed) == is_connected(gamma, alpha, beta)
    # Exactly the edges on some input -> read-out path (reference: plain DFS on the input).
    edges = _edges(gamma, alpha, beta)
    from_input = _reach(edges, "in")
    to_output = _reach(edges, "out", forward=False)
    on_path = {(u, v) for u, v in edges if u in from_input and v in to_output}
    assert set(_edges(*closed)) == on_path


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_chain_of_three():
    # in -> s0 -> s1 -> s2 -> out: 4 edges long, every hidden state has out-degree 1.
    band = flow_band(3, 1)
    gamma = np.array([[0, 1, 0], [0, 0, 1], [0, 0, 0]])
    metrics = topology_metrics(gamma, [1, 0, 0], [0, 0, 1], band)
    assert metrics == {"D": 4, "W": 1, "S": 4 / 8}  # 4 active of 2 hidden + 3 + 3
    assert isinstance(metrics["D"], int) and isinstance(metrics["W"], int)
    assert isinstance(metrics["S"], float)


def test_metrics_parallel():
    # s0 fans out to s1 and s2, both read out: W = 2; longest path in -> s0 -> s1 -> out = 3.
    band = flow_band(3, 2)
    gamma = np.array([[0, 1, 1], [0, 0, 0], [0, 0, 0]])
    metrics = topology_metrics(gamma, [1, 0, 0], [0, 1, 1], band)
    assert metrics == {"D": 3, "W": 2, "S": 5 / 9}


def test_metrics_width_counts_read_out_but_not_read_in():
    # s0 -> s1 and s0 -> out: out-degree 2. The input's three read-ins do not count.
    band = flow_band(3, 2)
    gamma = np.array([[0, 1, 0], [0, 0, 0], [0, 0, 0]])
    metrics = topology_metrics(gamma, [1, 1, 1], [1, 1, 1], band)
    assert metrics["W"] == 2
    assert metrics["D"] == 3  # in -> s0 -> s1 -> out
    assert metrics["S"] == 7 / 9


def test_metrics_empty():
    metrics = topology_metrics(np.zeros((2, 2)), [0, 0], [0, 0], flow_band(2, 1))
    assert metrics == {"D": 0, "W": 0, "S": 0.0}


def test_metrics_rejects_edge_outside_band():
    gamma = np.array([[0, 0, 1], [0, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="band"):
        topology_metrics(gamma, [1, 0, 0], [0, 0, 1], flow_band(3, 1))
    with pytest.raises(ValueError, match="shape"):
        topology_metrics(gamma, [1, 0, 0], [0, 0, 1], flow_band(4, 1))


def test_sparsity_counts_against_the_whole_central_network():
    weights = np.array([[0, 0.7, 0.2], [0, 0, 0.6], [0, 0, 0]])
    kept = np.array([[0, 1, 0], [0, 0, 1], [0, 0, 0]])
    # 2 hidden + 1 read-in + 1 read-out kept, of 3 hidden + 3 + 3.
    assert sparsity(kept, [1, 0, 0], [0, 0, 1], weights) == 4 / 9
    assert sparsity(kept, [1, 0, 0], [0, 0, 1], flow_band(3, 2)) == 4 / 9
    with pytest.raises(ValueError, match="does not exist"):
        sparsity(kept, [1, 0, 0], [0, 0, 1], flow_band(3, 2) * np.eye(3, k=2, dtype=np.int64))


@settings(max_examples=100, deadline=None)
@given(binary_task())
def test_metrics_bounds(task):
    gamma, alpha, beta, band = task
    n = len(alpha)
    metrics = topology_metrics(gamma, alpha, beta, band)
    assert 0 <= metrics["D"] <= n + 1
    # Paper Property 2 with read-outs: at most M hidden successors plus the read-out.
    m = int(np.count_nonzero(band, axis=1).max()) if band.any() else 0
    assert 0 <= metrics["W"] <= m + 1
    assert 0.0 <= metrics["S"] <= 1.0
    if is_connected(gamma, alpha, beta):
        assert metrics["D"] >= 2

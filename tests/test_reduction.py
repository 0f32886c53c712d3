"""Tests of dagc.trainer.reduction: Algorithm 1 (flow-based) and the threshold / random baselines.

Node numbering of Ψ in the comments: 0 = input, i+1 = hidden state s_i, N+1 = read-out.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dagc.trainer.reduction import (
    flow_based_reduction,
    flow_scores,
    random_reduction,
    state_range,
    threshold_reduction,
)
from dagc.trainer.topology import flow_band, flow_matrix, is_connected, sparsity

REDUCTIONS = {
    "flow": flow_based_reduction,
    "threshold": threshold_reduction,
    "random": lambda g, a, b, **kw: random_reduction(g, a, b, seed=7, **kw),
}


def _naive_scores(psi):
    """Algorithm 1, line 13, written as the paper's double loop (reference for the vectorised one)."""
    psi = np.asarray(psi, dtype=float)
    size = psi.shape[0]
    scores = np.zeros_like(psi)
    for i in range(size):
        for j in range(size):
            if psi[i, j] == 0:
                continue
            in_j = np.count_nonzero(psi[:, j])
            out_j = np.count_nonzero(psi[j, :])
            into_i, out_of_i = psi[:, i].sum(), psi[i, :].sum()
            out_of_j, into_j = psi[j, :].sum(), psi[:, j].sum()
            first = into_i / out_of_i / in_j if out_of_i and in_j else 0.0
            second = out_of_j / into_j / out_j if into_j and out_j else 0.0
            scores[i, j] = psi[i, j] * (first + second)
    return scores


def _assert_masks(result, gamma, alpha, beta):
    for got, want in zip(result, (gamma, alpha, beta)):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int64


# Hand case 1: N = 3, M = 2, a chain s0 -> s1 -> s2 with the skip s0 -> s2.
CHAIN_GAMMA = np.array([[0, 0.8, 0.3], [0, 0, 0.7], [0, 0, 0]])
CHAIN_ALPHA = np.array([0.9, 0.2, 0.1])  # N_α = 0
CHAIN_BETA = np.array([0.1, 0.2, 0.8])  # argmax 2, N_β = min(2, max(1, 2)) = 2
CHAIN_TOTAL = 3 + 2 * 3  # hidden edges in the band + read-ins + read-outs


def test_hand_chain_first_scores():
    # Ψ rows (node 0..4): 0: [., .9, .2, .1, .]; 1: [., ., .8, .3, .1]; 2: [., ., ., .7, .2];
    # 3: [., ., ., ., .8].
    # Row sums r = [1.2, 1.2, .9, .8, 0], column sums c = [0, .9, 1.0, 1.1, 1.1],
    # In = [0, 1, 2, 3, 3], Out = [3, 3, 2, 1, 0].
    # Source term c_i / r_i: [0, .75, 1.1111, 1.375, 0 (r_4 = 0)].
    # Target term (r_j / c_j) / Out_j: [0 (c_0 = 0), .4444, .45, .72727, 0 (Out_4 = 0)].
    # S_ij = ψ_ij (c_i/r_i / In_j + (r_j/c_j)/Out_j):
    #   (0,1) .9 (0 + .4444) = .4        (0,2) .2 (0 + .45) = .09    (0,3) .1 (.72727) = .072727
    #   (1,2) .8 (.75/2 + .45) = .66     (1,3) .3 (.75/3 + .72727) = .293182
    #   (1,4) .1 (.75/3 + 0) = .025      (2,3) .7 (1.1111/3 + .72727) = .768350
    #   (2,4) .2 (1.1111/3) = .074074    (3,4) .8 (1.375/3) = .366667
    # The smallest is (1,4): the read-out from s0 goes first.
    psi = flow_matrix(CHAIN_GAMMA, CHAIN_ALPHA, CHAIN_BETA)
    want = np.zeros((5, 5))
    want[0, 1:4] = [0.4, 0.09, 0.1 * 0.8 / 1.1]
    want[1, 2:5] = [0.66, 0.3 * (0.25 + 0.8 / 1.1), 0.025]
    want[2, 3:5] = [0.7 * (1 / 0.9 / 3 + 0.8 / 1.1), 0.2 / 0.9 / 3]
    want[3, 4] = 0.8 * 1.375 / 3
    np.testing.assert_allclose(flow_scores(psi), want, rtol=1e-12, atol=0)
    np.testing.assert_allclose(flow_scores(psi), _naive_scores(psi), rtol=1e-12, atol=0)
    assert np.unravel_index(np.argmin(np.where(want > 0, want, np.inf)), want.shape) == (1, 4)


def test_hand_chain_flow_order_and_result():
    # Removal order (minimum score of each step): (1,4) .025, (0,3) .0727, (0,2) .09,
    # (2,4) .0889, (1,3) .3627; what remains is the chain 0 -> 1 -> 2 -> 3 -> 4, whose next
    # candidate (3,4) (score .7) disconnects: stop. A target sparsity of (9 - k) / 9 stops after
    # exactly k removals, which shows the order.
    order = [(1, 4), (0, 3), (0, 2), (2, 4), (1, 3)]
    psi = (flow_matrix(CHAIN_GAMMA, CHAIN_ALPHA, CHAIN_BETA) != 0).astype(np.int64)
    for k, (i, j) in enumerate(order, start=1):
        psi[i, j] = 0
        result = flow_based_reduction(
            CHAIN_GAMMA, CHAIN_ALPHA, CHAIN_BETA, target_sparsity=(CHAIN_TOTAL - k) / CHAIN_TOTAL
        )
        _assert_masks(result, psi[1:4, 1:4], psi[0, 1:4], psi[1:4, 4])
    chain = np.array([[0, 1, 0], [0, 0, 1], [0, 0, 0]])
    _assert_masks(
        flow_based_reduction(CHAIN_GAMMA, CHAIN_ALPHA, CHAIN_BETA), chain, [1, 0, 0], [0, 0, 1]
    )


def test_hand_chain_threshold_differs_from_flow_at_first_step():
    # Smallest ψ: .1 at (0,3) and (1,4); row-major tie-breaking removes (0,3), the read-in into
    # s2, whereas the flow score removes (1,4) first.
    first = threshold_reduction(
        CHAIN_GAMMA, CHAIN_ALPHA, CHAIN_BETA, target_sparsity=(CHAIN_TOTAL - 1) / CHAIN_TOTAL
    )
    _assert_masks(first, (CHAIN_GAMMA > 0).astype(int), [1, 1, 0], [1, 1, 1])
    # Then (1,4) .1, (0,2) .2, (2,4) .2, (1,3) .3; then (2,3) .7 would disconnect.
    chain = np.array([[0, 1, 0], [0, 0, 1], [0, 0, 0]])
    _assert_masks(
        threshold_reduction(CHAIN_GAMMA, CHAIN_ALPHA, CHAIN_BETA), chain, [1, 0, 0], [0, 0, 1]
    )


def test_hand_truncation_when_n_alpha_is_positive():
    # N = 4: N_α = argmax alpha = 1; argmax beta = 0 < N_α, so N_β = N_α + 1 = 2. Only s1, s2
    # keep edges: s0 and s3 (and their read-ins, read-outs and hidden edges) are dropped.
    gamma = np.zeros((4, 4))
    gamma[0, 1], gamma[1, 2], gamma[2, 3], gamma[0, 2], gamma[1, 3] = 0.9, 0.6, 0.9, 0.5, 0.5
    alpha = np.array([0.1, 0.9, 0.2, 0.3])
    beta = np.array([0.9, 0.2, 0.3, 0.4])
    assert state_range(alpha, beta) == (1, 2)
    # Ψ within the range: 0->2 .9, 0->3 .2, 2->3 .6, 2->5 .2, 3->5 .3.
    # Step 1: r = [1.1, ., .8, .3], c = [0, ., .9, .8, ., .5], In_2 = 1, In_3 = 2, In_5 = 2,
    #   Out_2 = 2, Out_3 = 1. S(0,2) = .9 (.8/.9/2) = .4, S(0,3) = .2 (.3/.8) = .075,
    #   S(2,3) = .6 (.9/.8/2 + .375) = .5625, S(2,5) = .2 (.9/.8/2) = .1125,
    #   S(3,5) = .3 (.8/.3/2) = .4. Remove (0,3).
    # Step 2: S(0,2) = .4, S(2,3) = .6 (.9/.8 + .3/.6) = .975, S(2,5) = .1125, S(3,5) = .3.
    #   Remove (2,5).
    # Step 3: the chain 0 -> 2 -> 3 -> 5; S(0,2) = S(3,5) = .6 is the minimum; removing (0,2)
    #   disconnects: stop.
    want_gamma = np.zeros((4, 4), np.int64)
    want_gamma[1, 2] = 1
    _assert_masks(flow_based_reduction(gamma, alpha, beta), want_gamma, [0, 1, 0, 0], [0, 0, 1, 0])


def test_hand_tie_goes_to_first_in_row_major_order():
    # N = 2: Ψ: 0->1 .75, 0->2 .25, 1->2 .25, 1->3 .5, 2->3 .75.
    # r = [1, .75, .75, 0], c = [0, .75, .5, 1.25], In = [0, 1, 2, 2], Out = [2, 2, 1, 0].
    # Source terms c_i/r_i = [0, 1, 2/3, 0]; target terms (r_j/c_j)/Out_j = [0, .5, 1.5, 0].
    # S(0,1) = .75 (.5) = .375, S(0,2) = .25 (1.5) = .375, S(1,2) = .25 (1/2 + 1.5) = .5,
    # S(1,3) = .5 (1/2) = .25, S(2,3) = .75 (2/3 / 2) = .25.
    # Tie at .25: (1,3) comes first in row-major order, so the read-out from s0 goes.
    gamma = np.array([[0, 0.25], [0, 0]])
    alpha = np.array([0.75, 0.25])
    beta = np.array([0.5, 0.75])
    scores = flow_scores(flow_matrix(gamma, alpha, beta))
    assert scores[1, 3] == scores[2, 3] == 0.25
    total = 1 + 2 * 2
    _assert_masks(
        flow_based_reduction(gamma, alpha, beta, target_sparsity=(total - 1) / total),
        [[0, 1], [0, 0]],
        [1, 1],
        [0, 1],
    )
    # Step 2: r = [1, .25, .75], c = [0, .75, .5, .75], In = [0, 1, 2, 1], Out = [2, 1, 1, 0]:
    #   S(0,1) = .75 ((.25/.75)/1) = .25, S(0,2) = .25 (1.5) = .375, S(1,2) = .25 (3/2 + 1.5)
    #   = .75, S(2,3) = .75 (2/3) = .5. Remove (0,1): still connected through 0 -> 2 -> 3.
    # Step 3: s0 has no input any more, its source term is 0: S(0,2) = .25 (1.5) = .375 and
    #   S(1,2) = .25 (0 + 1.5) = .375 tie; (0,2) comes first and its removal disconnects: stop.
    #   The dangling s0 -> s1 stays (close_masks removes it later).
    _assert_masks(flow_based_reduction(gamma, alpha, beta), [[0, 1], [0, 0]], [0, 1], [0, 1])


def test_hand_n_alpha_is_last_state():
    # N_α = N - 1 = 2, so N_β = min(2, 3) = 2: only in -> s2 -> out exists; any removal
    # disconnects, so that single path is the result, whatever the reduction.
    gamma = np.array([[0, 0.9, 0.9], [0, 0, 0.9], [0, 0, 0]])
    alpha = np.array([0.1, 0.2, 0.95])
    beta = np.array([0.9, 0.9, 0.1])
    assert state_range(alpha, beta) == (2, 2)
    for reduce in REDUCTIONS.values():
        _assert_masks(reduce(gamma, alpha, beta), np.zeros((3, 3)), [0, 0, 1], [0, 0, 1])


def test_single_state():
    for reduce in REDUCTIONS.values():
        _assert_masks(reduce(np.zeros((1, 1)), [0.3], [0.6]), [[0]], [1], [1])


def test_zero_score_edges_are_never_removed():
    # s1 has a read-in but nothing out: Out = 0 and its read-in's source term is 0 (node 0 has
    # no input), so that edge's score is 0 and it survives; the rest is one path, so nothing
    # else can go either.
    gamma = np.zeros((3, 3))
    alpha = np.array([0.9, 0.5, 0.0])
    beta = np.array([0.0, 0.0, 0.9])
    gamma[0, 2] = 0.5
    scores = flow_scores(flow_matrix(gamma, alpha, beta))
    assert scores[0, 2] == 0.0
    _assert_masks(flow_based_reduction(gamma, alpha, beta), gamma > 0, [1, 1, 0], [0, 0, 1])


def test_initially_disconnected_raises():
    # beta is zero on the whole range [0, 1]: there is no connected Ψ to return.
    gamma = np.array([[0, 0.5], [0, 0]])
    with pytest.raises(ValueError, match="not connected"):
        flow_based_reduction(gamma, [0.9, 0.1], [0.0, 0.0])


@pytest.mark.parametrize(
    "gamma, alpha, beta, kwargs",
    [
        (np.zeros((2, 3)), [0.5, 0.5], [0.5, 0.5], {}),
        (np.zeros((2, 2)), [0.5, 0.5, 0.5], [0.5, 0.5], {}),
        (np.zeros((2, 2)), [0.5, np.nan], [0.5, 0.5], {}),
        (np.zeros((2, 2)), [0.5, 1.2], [0.5, 0.5], {}),
        (np.array([[0, 0], [0.5, 0]]), [0.5, 0.5], [0.5, 0.5], {}),
        (np.zeros((2, 2)), [0.5, 0.5], [0.5, 0.5], {"target_sparsity": 0.0}),
        (np.zeros((2, 2)), [0.5, 0.5], [0.5, 0.5], {"target_sparsity": 1.5}),
        (np.zeros((2, 2)), [0.5, 0.5], [0.5, 0.5], {"target_sparsity": float("nan")}),
        (np.zeros((2, 2)), [0.5, 0.5], [0.5, 0.5], {"target_sparsity": "half"}),
    ],
)
@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_malformed_input_raises(name, gamma, alpha, beta, kwargs):
    with pytest.raises(ValueError):
        REDUCTIONS[name](gamma, alpha, beta, **kwargs)


def test_random_reduction_depends_on_seed_only():
    gamma = flow_band(6, 3) * 0.5
    alpha = np.full(6, 0.5)
    beta = np.linspace(0.1, 0.9, 6)
    results = {seed: random_reduction(gamma, alpha, beta, seed=seed) for seed in range(20)}
    for seed, result in results.items():
        _assert_masks(random_reduction(gamma, alpha, beta, seed=seed), *result)
    assert len({tuple(np.concatenate([r.ravel() for r in res])) for res in results.values()}) > 1


# --- properties -------------------------------------------------------------------------------


@st.composite
def task_weights(draw):
    n = draw(st.integers(2, 10))
    m = draw(st.integers(1, n))
    band = flow_band(n, m)
    unit = st.floats(0.01, 0.99, allow_nan=False)
    gamma = draw(arrays(np.float64, (n, n), elements=unit)) * band
    alpha = draw(arrays(np.float64, n, elements=unit))
    beta = draw(arrays(np.float64, n, elements=unit))
    return gamma, alpha, beta, band


def _expected_range(alpha, beta):
    n_alpha = int(np.argmax(alpha))
    return n_alpha, min(len(alpha) - 1, max(n_alpha + 1, int(np.argmax(beta))))


def _outside_range_is_zero(result, band, lo, hi):
    gamma_hat, alpha_hat, beta_hat = result
    inside = np.zeros(len(alpha_hat), bool)
    inside[lo : hi + 1] = True
    return (
        not gamma_hat[~np.outer(inside, inside)].any()
        and not gamma_hat[band == 0].any()
        and not alpha_hat[~inside].any()
        and not beta_hat[~inside].any()
    )


@settings(max_examples=100, deadline=None)
@given(task_weights())
def test_reductions_connected_in_range_binary_deterministic(task):
    gamma, alpha, beta, band = task
    lo, hi = _expected_range(alpha, beta)
    assert state_range(alpha, beta) == (lo, hi)
    for name, reduce in REDUCTIONS.items():
        result = reduce(gamma, alpha, beta)
        assert is_connected(*result), name
        assert _outside_range_is_zero(result, band, lo, hi), name
        for got, given_array in zip(result, (gamma, alpha, beta)):
            assert got.dtype == np.int64 and got.shape == given_array.shape
            assert np.isin(got, (0, 1)).all()
        for again, once in zip(reduce(gamma, alpha, beta), result):
            np.testing.assert_array_equal(again, once)


@settings(max_examples=100, deadline=None)
@given(task_weights(), st.floats(0.05, 1.0))
def test_target_sparsity_stops_early_on_the_same_path(task, target):
    gamma, alpha, beta, band = task
    lo, hi = _expected_range(alpha, beta)
    total = np.count_nonzero(gamma) + 2 * len(alpha)
    inside = np.zeros(len(alpha), bool)
    inside[lo : hi + 1] = True
    initial_kept = np.count_nonzero(gamma[np.outer(inside, inside)]) + 2 * inside.sum()
    for name, reduce in REDUCTIONS.items():
        full = reduce(gamma, alpha, beta)
        early = reduce(gamma, alpha, beta, target_sparsity=target)
        assert is_connected(*early), name
        assert _outside_range_is_zero(early, band, lo, hi), name
        # The same removal sequence, cut short: early keeps a superset of full.
        for e, f in zip(early, full):
            assert np.all(e >= f), name
        s_early = sparsity(*early, gamma)
        kept = round(s_early * total)
        # Either the target was reached, or the disconnection rule stopped first (same result).
        if s_early > target:
            for e, f in zip(early, full):
                np.testing.assert_array_equal(e, f)
        # Never more than one edge below the target, unless nothing was removed at all.
        if kept < initial_kept:
            assert (kept + 1) / total > target, name


@settings(max_examples=100, deadline=None)
@given(task_weights(), st.data())
def test_flow_scores_match_the_paper_double_loop(task, data):
    gamma, alpha, beta, _ = task
    psi = flow_matrix(gamma, alpha, beta)
    # Knock out some entries so that zero denominators (In, Out, sums) occur.
    keep = data.draw(arrays(np.bool_, psi.shape))
    psi = psi * keep
    np.testing.assert_allclose(flow_scores(psi), _naive_scores(psi), rtol=1e-12, atol=1e-15)
    assert np.all(flow_scores(psi)[psi == 0] == 0)

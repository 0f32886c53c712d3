"""Baselines and ablations as masks and search spaces (`dagc.trainer.baselines`)."""

import dataclasses

import numpy as np
import pytest
import torch

from dagc.compiler.flops import graph_costs, supernet_costs
from dagc.compiler.ir import build_graph
from dagc.spec import TaskSpec, preset
from dagc.trainer.baselines import (
    chain_masks,
    complete_dag,
    fix_read_in_out,
    full_masks,
    parameter_ratio,
)
from dagc.trainer.network import CentralNetwork, network_tensors
from dagc.trainer.topology import close_masks, topology_metrics
from dagc.trainer.train import TrainConfig

TASKS = [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth")]


@pytest.fixture
def spec():
    return preset("tiny", TASKS, input_size=(16, 16))


def test_chain_is_the_plain_backbone_for_every_task(spec):
    g, a, b = chain_masks(spec)
    n = spec.n_states
    net = CentralNetwork(spec)
    net.set_masks(torch.from_numpy(g), torch.from_numpy(a), torch.from_numpy(b))  # closed and connected
    for k in range(spec.n_tasks):
        assert g[k].sum() == n - 1 and a[k].tolist() == [1] + [0] * (n - 1) and b[k].tolist() == [0] * (n - 1) + [1]
        topo = topology_metrics(g[k], a[k], b[k], net.band.numpy())
        assert topo["D"] == n + 1  # input, N states, read-out in a row
    tensors = network_tensors(net)
    assert parameter_ratio(spec, tensors) == pytest.approx(1.0)


def test_full_masks_keep_every_edge_and_cost_more_than_the_chain(spec):
    g, a, b = full_masks(spec)
    for k in range(spec.n_tasks):
        closed = close_masks(g[k], a[k], b[k])
        assert all((x == y).all() for x, y in zip(closed, (g[k], a[k], b[k])))
        assert int(g[k].sum()) == len(spec.hidden_edges())
    net = CentralNetwork(spec)
    net.set_masks(*(torch.from_numpy(m) for m in (g, a, b)))
    # Every block once: exactly the unpruned supernet's parameters.
    chain = CentralNetwork(spec)
    chain.set_masks(*(torch.from_numpy(m) for m in chain_masks(spec)))
    chain_params = graph_costs(build_graph(spec, network_tensors(chain)))["params"]
    ratio = parameter_ratio(spec, network_tensors(net))
    assert ratio == pytest.approx(supernet_costs(spec)["params"] / chain_params) and ratio > 1.2


def test_single_task_costs_k_backbones_shared_bottom_one(spec):
    # K single-task chains hold K backbones; the ratio is measured against one backbone + all heads,
    # so K separate nets of one task each add up to between K - 1 and K backbones.
    total = 0.0
    for t in spec.tasks:
        one = dataclasses.replace(spec, tasks=(t,))
        net = CentralNetwork(one)
        net.set_masks(*(torch.from_numpy(m) for m in chain_masks(one)))
        total += parameter_ratio(one, network_tensors(net))
    assert total == pytest.approx(2.0)


def test_complete_dag_has_every_forward_edge(spec):
    full = complete_dag(spec)
    n = full.n_states
    assert len(full.hidden_edges()) == n * (n - 1) // 2 > len(spec.hidden_edges())
    assert full.tasks == spec.tasks and full.states == spec.states


def test_fixed_read_in_out_saturates_the_logits(spec):
    net = CentralNetwork(spec)
    fix_read_in_out(net)
    a, b = torch.sigmoid(net.arch_alpha), torch.sigmoid(net.arch_beta)
    n = spec.n_states
    expect_a, expect_b = np.zeros((spec.n_tasks, n)), np.zeros((spec.n_tasks, n))
    expect_a[:, 0] = 1
    expect_b[:, -1] = 1
    np.testing.assert_allclose(a.detach().numpy(), expect_a, atol=1e-12)
    np.testing.assert_allclose(b.detach().numpy(), expect_b, atol=1e-12)
    assert TrainConfig(ablations=("no-read-in-out", "no-squeeze")).frozen_logits == ("arch_alpha", "arch_beta")
    assert TrainConfig(ablations=("no-fbr",)).frozen_logits == ()

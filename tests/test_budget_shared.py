"""A budget for the compiled shared model (issue 21, ``--budget-scope shared``): the exact cost of the
shared model from binary masks (`dagc.sharing`) against the compiler's own optimised graph, its
squeeze surrogate, and the joint reduction."""

import numpy as np
import pytest
import torch

from dagc.compiler.flops import graph_costs
from dagc.compiler.ir import build_graph
from dagc.compiler.passes import optimize
from dagc.costs import block_flops, head_costs
from dagc.errors import ConfigError
from dagc.sharing import instances, shared_blocks
from dagc.spec import TaskSpec, preset
from dagc.trainer.budget import shared_cost
from dagc.trainer.config import TrainConfig
from dagc.trainer.losses import shared_squeeze_loss, squeeze_loss
from dagc.trainer.network import CentralNetwork, network_tensors
from dagc.trainer.recalibrate import reestimate_statistics
from dagc.trainer.topology import close_masks, flow_band, flow_matrix, is_flow_connected

TASKS = (TaskSpec("seg", "segmentation", 3), TaskSpec("cls", "classification", 4), TaskSpec("cls2", "classification", 2))


def _spec(shared_input=True):
    return preset("tiny", TASKS, in_channels=1, input_size=(32, 32), shared_input=shared_input)


def _random_masks(spec, seed, copy=0.7):
    """Closed, connected random masks; each task after the first copies each of the first task's
    entries with probability ``copy``, so that some instances can be shared."""
    rng = np.random.default_rng(seed)
    n = spec.n_states
    band = flow_band(n, spec.flow_constant)

    def draw():
        while True:
            g, a, b = band * (rng.random((n, n)) < 0.5), rng.random(n) < 0.4, rng.random(n) < 0.4
            if is_flow_connected(flow_matrix(g, a, b)):
                return g.astype(np.int64), a.astype(np.int64), b.astype(np.int64)

    first = draw()
    masks = [close_masks(*first)]
    for _ in spec.task_names[1:]:
        while True:
            other = draw()
            mixed = [np.where(rng.random(f.shape) < copy, f, o) for f, o in zip(first, other)]
            if is_flow_connected(flow_matrix(*mixed)):
                masks.append(close_masks(*mixed))
                break
    return tuple(np.stack([m[i] for m in masks]) for i in range(3))


def _compiled_flops(spec, masks, seed):
    """FLOPs of the compiler's optimised shared model of a network with these masks and each task's
    statistics re-estimated as training does (task after task, over the same batches)."""
    torch.manual_seed(seed)
    net = CentralNetwork(spec)
    net.set_masks(*(torch.from_numpy(m) for m in masks))
    shape = (4, spec.in_channels, *spec.input_size)
    batches = [torch.randn(shape) if spec.shared_input else torch.randn(spec.n_tasks, *shape) for _ in range(2)]
    reestimate_statistics(net, batches)
    graph = optimize(build_graph(spec, network_tensors(net)))
    return graph_costs(graph)["flops"], graph


def _predicted_flops(spec, masks):
    from dagc.blocks import block

    applied = shared_blocks(spec, *masks)
    return sum(2 * block(spec, b).macs for b in applied) + sum(head_costs(spec, t)["flops"] for t in spec.task_names)


@pytest.mark.parametrize("seed", range(4))
def test_the_shared_cost_from_masks_is_the_compilers_shared_model(seed):
    spec = _spec()
    masks = _random_masks(spec, seed)
    flops, graph = _compiled_flops(spec, masks, seed)
    assert _predicted_flops(spec, masks) == flops == shared_cost(spec, *masks)  # the trainer's prediction
    inst = instances(spec, *masks)
    assert sorted((i.state if i.state >= 0 else 99, i.tasks) for i in inst) == \
        sorted((n.state if n.state >= 0 else 99, n.tasks) for n in graph.nodes)


def test_masks_that_coincide_share_everything_and_an_input_per_task_shares_nothing():
    spec = _spec()
    one = _random_masks(spec, 11)
    same = tuple(np.repeat(m[:1], spec.n_tasks, axis=0) for m in one)
    inst = instances(spec, *same)
    assert all(i.tasks == spec.task_names for i in inst)  # one model's worth of blocks, every head
    assert _predicted_flops(spec, same) == _compiled_flops(spec, same, 0)[0]
    apart = _spec(shared_input=False)
    assert all(len(i.tasks) == 1 for i in instances(apart, *same))
    assert _predicted_flops(apart, same) == _compiled_flops(apart, same, 0)[0]
    shared = sum(1 for i in instances(spec, *_random_masks(spec, 2)) if len(i.tasks) > 1)
    assert shared > 0  # the random cases above do exercise sharing


def test_masks_that_are_not_closed_are_refused():
    spec = _spec()
    masks = tuple(m.copy() for m in _random_masks(spec, 3))
    i, j = np.argwhere(flow_band(spec.n_states, spec.flow_constant))[0]
    masks[0][0, :, :] = 0
    masks[1][0, :] = 0
    masks[0][0, i, j] = 1  # an edge from a state the task does not compute
    with pytest.raises(Exception, match="not closed"):
        instances(spec, *masks)


def test_the_scope_is_validated_and_recorded():
    with pytest.raises(ConfigError, match="budget_scope must be one of"):
        TrainConfig(budget="30MFLOPs", budget_scope="all")
    with pytest.raises(ConfigError, match="add one"):
        TrainConfig(budget_scope="shared")
    assert TrainConfig(budget="30MFLOPs", budget_scope="shared").to_dict()["budget_scope"] == "shared"


def test_the_shared_squeeze_is_the_per_task_one_for_one_task_and_prices_shared_blocks_once():
    torch.manual_seed(0)
    spec = _spec()
    g_c, a_c, b_c = (torch.as_tensor(x, dtype=torch.float32) for x in block_flops(spec))
    n = spec.n_states
    gamma, alpha, beta = torch.randn(1, n, n), torch.randn(1, n), torch.randn(1, n)
    one = shared_squeeze_loss(gamma, g_c, 1e5, (alpha, a_c, beta, b_c))
    assert torch.allclose(one, squeeze_loss(gamma, g_c, torch.tensor([1e5]), (alpha, a_c, beta, b_c)), rtol=1e-6)
    # saturated logits are binary masks: with the same masks in every task the union is the exact
    # shared cost (one model's blocks), with an input per task the sum of the task models
    masks = tuple(np.repeat(m[:1], spec.n_tasks, axis=0) for m in _random_masks(spec, 5))
    logits = [torch.as_tensor(np.where(m > 0, 40.0, -40.0), dtype=torch.float32) for m in masks]
    read = (logits[1], a_c, logits[2], b_c)
    heads = sum(head_costs(spec, t)["flops"] for t in spec.task_names)
    assert float(shared_squeeze_loss(logits[0], g_c, 0.0, read)) == pytest.approx(
        shared_cost(spec, *masks) - heads, rel=1e-5)
    assert float(shared_squeeze_loss(logits[0], g_c, 0.0, read, union=False)) == pytest.approx(
        shared_cost(_spec(False), *masks) - heads, rel=1e-5)
    assert float(shared_squeeze_loss(logits[0], g_c, 1e12, read)) == 0  # within budget: free

"""A budget for the compiled shared model (issue 21, ``--budget-scope shared``): the exact cost of the
shared model from binary masks (`dagc.sharing`) against the compiler's own optimised graph, its
squeeze surrogate, and the joint reduction."""

import numpy as np
import pytest
import torch

from dagc.checkpoint import load_checkpoint
from dagc.compiler.budget_report import budget_lines, budget_report
from dagc.compiler.flops import graph_costs
from dagc.compiler.ir import build_graph
from dagc.compiler.passes import optimize
from dagc.costs import block_flops, head_costs
from dagc.errors import ConfigError
from dagc.sharing import instances, shared_blocks
from dagc.spec import TaskSpec, preset
from dagc.tools.costs import bench_budget_lines
from dagc.trainer.budget import budget_outcome, budget_warning, shared_cost, task_cost
from dagc.trainer.budget_reduction import reduce_shared, reduce_task
from dagc.trainer.config import TrainConfig
from dagc.trainer.losses import shared_squeeze_loss, squeeze_loss
from dagc.trainer.network import CentralNetwork, network_tensors
from dagc.trainer.recalibrate import reestimate_statistics
from dagc.trainer.reduction import flow_based_reduction
from dagc.trainer.topology import close_masks, flow_band, flow_matrix, is_flow_connected
from dagc.trainer.train import train

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


def _scores(spec, seed):
    rng = np.random.default_rng(seed)
    band = flow_band(spec.n_states, spec.flow_constant)
    return [(band * rng.uniform(0.05, 0.95, band.shape), rng.uniform(0.05, 0.95, spec.n_states),
             rng.uniform(0.05, 0.95, spec.n_states)) for _ in spec.task_names]


def _stacked(masks):
    return tuple(np.stack([m[i] for m in masks]) for i in range(3))


@pytest.mark.parametrize("seed", range(3))
def test_the_joint_reduction_stops_once_the_shared_model_fits_and_the_budget_sets_the_size(seed):
    spec = _spec()
    scores = _scores(spec, seed)
    paper = [close_masks(*flow_based_reduction(*s)) for s in scores]
    everything, top = reduce_shared(spec, scores, "fbr", 0, 1e15)
    assert top == shared_cost(spec, *_stacked(everything)) > shared_cost(spec, *_stacked(paper))
    lo = shared_cost(spec, *_stacked(paper))
    sizes = []
    for budget in np.linspace(lo, top, 5):
        got, cost = reduce_shared(spec, scores, "fbr", 0, budget)
        assert cost == shared_cost(spec, *_stacked(got)) <= budget  # exact, and within the budget
        sizes.append(cost)
    assert sizes[-1] == top and sizes[0] <= lo


def test_a_budget_below_the_set_ups_chains_falls_back_to_cheaper_read_ins_or_says_what_it_reached():
    spec = _spec()
    scores = _scores(spec, 7)
    for s in scores:  # every task prefers reading in at full resolution (state 0), the dearest read-in
        s[1][:] = 0.1
        s[1][0] = 0.9
    paper = [close_masks(*flow_based_reduction(*s)) for s in scores]
    lo = shared_cost(spec, *_stacked(paper))
    floor, reached = reduce_shared(spec, scores, "fbr", 0, 1.0)  # nothing fits: the cheapest it reaches
    assert reached == shared_cost(spec, *_stacked(floor)) < lo
    got, cost = reduce_shared(spec, scores, "fbr", 0, (lo + reached) / 2)
    assert cost <= (lo + reached) / 2 and any(m[1][0] == 0 for m in got)  # within budget: someone reads in later
    outcome = budget_outcome(spec, "1FLOPs", "shared", _stacked(floor))
    assert outcome["cost"] == reached and not outcome["fits"]
    assert budget_warning(outcome).startswith("warning: no read-in/read-out choice fits the budget of 1e-06 MFLOPs")
    assert f"{reached / 1e6:.4g} MFLOPs" in budget_warning(outcome)
    # the per-task scope takes the same fallback
    seg = task_cost(spec, "seg")
    _, cheapest = reduce_task(spec, "seg", scores[0], "fbr", 0, 1.0)
    assert cheapest < seg(*paper[0])
    (g, a, b), c = reduce_task(spec, "seg", scores[0], "fbr", 0, (seg(*paper[0]) + cheapest) / 2)
    assert c <= (seg(*paper[0]) + cheapest) / 2 and a[0] == 0


def test_a_shared_budget_run_records_the_compiled_shared_models_cost(tmp_path):
    fast = dict(warmup_iters=2, search_iters=4, finetune_iters=2, batch_size=4, n_train=16, n_test=8)
    metrics = train(TrainConfig(budget="1000GFLOPs", budget_scope="shared", **fast), tmp_path / "r", progress=False)
    ck = load_checkpoint(tmp_path / "r" / "checkpoint.safetensors")
    assert ck.json("config")["budget_scope"] == "shared"
    compiled = graph_costs(optimize(build_graph(ck.spec, ck.tensors)))["flops"]
    assert metrics["budget"] == {"budget": "1000GFLOPs", "scope": "shared", "unit": "FLOPs", "cost": compiled,
                                 "fits": True}
    tight = f"{compiled * 0.6 / 1e6:.3f}MFLOPs"
    metrics = train(TrainConfig(budget=tight, budget_scope="shared", **fast), tmp_path / "t", progress=False)
    ck = load_checkpoint(tmp_path / "t" / "checkpoint.safetensors")
    smaller = graph_costs(optimize(build_graph(ck.spec, ck.tensors)))["flops"]
    assert metrics["budget"]["cost"] == smaller and metrics["budget"]["fits"] == (smaller <= compiled * 0.6 + 1e3)
    assert smaller < compiled
    # compile / inspect judge the shared model against a shared budget
    lines = budget_lines(budget_report(tmp_path / "r" / "checkpoint.safetensors"))
    assert lines[0] == f"budget: 1e+06 MFLOPs for the shared model (counted, MFLOPs): shared {compiled / 1e6:.3f} (fits)"
    assert lines[1].startswith("  task models alone: ")


def test_bench_prints_the_shared_model_against_a_shared_budget():
    b = {"budget": "4ms", "scope": "shared", "unit": "ms", "target": "onnxruntime-cpu", "batch": 8, "threads": 1,
         "measured": True, "bench": {"batches": [8], "threads": 1, "backend": "onnxruntime"},
         "models": {"shared": {"predicted_ms": 4.3, "measured_ms": 4.2, "vs_budget": 1.05, "vs_predicted": 0.98}}}
    (line,) = bench_budget_lines(b)
    assert line.startswith("budget 4 ms for the shared model (onnxruntime-cpu at batch 8, 1 thread)")
    assert "shared model 4.200 ms (+5% over; table predicted 4.300)" in line

"""Compiler IR, passes and lowering: each pass keeps the function; sharing, dead states, early exit."""

import dataclasses
import re

import pytest
import torch
from compiler_cases import random_graph, random_reduced_net
from hypothesis import given, settings
from hypothesis import strategies as st

from dagc.compiler.ir import READOUT, CompileError, Edge, Graph, Node, build_graph, check_graph, slice_of
from dagc.compiler.lower import lower
from dagc.compiler.passes import PASSES as PIPELINE
from dagc.compiler.passes import early_exit, eliminate_dead, fold, optimize, share
from dagc.spec import TaskSpec, preset
from dagc.trainer.network import network_tensors

DENSE = [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth"), TaskSpec("normal", "normal")]
CLS = [TaskSpec("a", "classification", 3), TaskSpec("b", "classification", 4)]
PASSES = {"none": lambda g: g, "dead": eliminate_dead, "exit": early_exit, "share": share, "fold": fold,
          "all": optimize}


def _close(ref, got, label="", tol=1e-4):
    for t in ref:
        scale = max(1.0, float(ref[t].abs().max()))
        err = float((ref[t] - got[t]).abs().max()) / scale
        assert err < tol, (label, t, err)


def _inputs(spec, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    h, w = spec.input_size
    if spec.shared_input:
        return {"image": torch.randn(batch, spec.in_channels, h, w, generator=gen)}
    return {f"image_{t}": torch.randn(batch, spec.in_channels, h, w, generator=gen) for t in spec.task_names}


def _supernet(net, inputs):
    with torch.no_grad():
        if net.spec.shared_input:
            return net(inputs["image"])
        return net({t: inputs[f"image_{t}"] for t in net.spec.task_names})


# Random reduced supernets (tests/compiler_cases.py) over specs, flow constants and densities.
RANDOM_CASES = dict(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 6), k=st.integers(1, 3),
                    density=st.floats(0.2, 0.9), cls=st.booleans())


def _random_case(seed, m, k, density, cls):
    """(net, graph) of a random reduced supernet: dense tasks on "tiny", or classification on
    "omniglot" with a shared or per-task input."""
    if cls:
        spec = preset("omniglot", CLS[: min(k, 2)], in_channels=1, shared_input=bool(seed % 2), flow_constant=m)
    else:
        spec = preset("tiny", DENSE[:k], input_size=(16, 16), flow_constant=m)
    return random_graph(spec, seed, density, same=seed % 3 == 0)


@settings(max_examples=100, deadline=None)
@given(**RANDOM_CASES)
def test_lowered_graph_equals_masked_supernet_after_every_pass(seed, m, k, density, cls):
    net, g = _random_case(seed, m, k, density, cls)
    spec = g.spec
    inputs = _inputs(spec, 2, seed)
    ref = _supernet(net, inputs)
    for name, p in PASSES.items():
        with torch.no_grad():
            got = lower(p(g)).run(inputs)
        _close(ref, got, name)


def test_identical_tasks_share_every_state_and_per_task_inputs_share_nothing():
    spec = preset("tiny", DENSE, input_size=(16, 16))
    net = random_reduced_net(spec, 3, same=True)
    g = optimize(build_graph(spec, network_tensors(net)))
    hidden = [n for n in g.nodes if n.state != READOUT]
    assert hidden and all(n.tasks == spec.task_names for n in hidden)
    assert len({src for _, src in g.heads}) == 1  # one read-out instance serves all three heads
    spec_own = preset("omniglot", CLS, in_channels=1, shared_input=False)
    net = random_reduced_net(spec_own, 3, same=True)
    g = optimize(build_graph(spec_own, network_tensors(net)))
    assert all(len(n.tasks) == 1 for n in g.nodes)


def test_share_merges_only_identical_edge_sets():
    spec = preset("tiny", DENSE[:2], input_size=(16, 16))
    e0 = Edge("read_in.0", "input:image", 1.0)
    nodes = (
        Node("v0:seg", 0, ("seg",), (e0,)),
        Node("v0:depth", 0, ("depth",), (e0,)),
        Node("v1:seg", 1, ("seg",), (Edge("edges.0_1", "v0:seg", 1.0),)),
        Node("v1:depth", 1, ("depth",), (Edge("edges.0_1", "v0:depth", 0.5), Edge("read_in.1", "input:image", 0.5))),
        Node("L:seg", READOUT, ("seg",), (Edge("read_out.1", "v1:seg"),)),
        Node("L:depth", READOUT, ("depth",), (Edge("read_out.1", "v1:depth"),)),
    )
    g = share(Graph(spec, ("image",), nodes, (("seg", "L:seg"), ("depth", "L:depth"))))
    assert [n.id for n in g.nodes] == ["v0:seg+depth", "v1:seg", "v1:depth", "L:seg", "L:depth"]
    assert g.node("v1:depth").edges[0].src == "v0:seg+depth"


def test_dead_state_elimination_and_early_exit_by_hand():
    spec = preset("tiny", DENSE[:1], input_size=(16, 16))
    nodes = (
        Node("v0:seg", 0, ("seg",), (Edge("read_in.0", "input:image"),)),
        Node("v1:seg", 1, ("seg",), (Edge("edges.0_1", "v0:seg"),)),  # reaches no head: dead
        Node("v2:seg", 2, ("seg",), (Edge("edges.9_2", "v9:ghost"),)),  # unreachable from the input
        Node("L:seg", READOUT, ("seg",), (Edge("read_out.0", "v0:seg"),)),
    )
    g = Graph(spec, ("image",), nodes, (("seg", "L:seg"),))
    assert [n.id for n in eliminate_dead(g).nodes] == ["v0:seg", "L:seg"]
    assert [n.id for n in early_exit(g).nodes] == ["v0:seg", "L:seg"]
    cut = Graph(spec, ("image",), nodes[1:], (("seg", "L:seg"),))
    with pytest.raises(CompileError, match="'seg' has no path"):
        eliminate_dead(cut)


def test_fold_removes_batch_norm_and_scales():
    spec = preset("tiny", DENSE[:2], input_size=(16, 16))
    g = fold(build_graph(spec, network_tensors(random_reduced_net(spec, 5))))
    assert all(e.folded for n in g.nodes for e in n.edges)
    model = lower(g)
    assert len(model.bns) == 0
    dump = g.dump()
    assert "read_in" in dump and "head seg <- L:seg" in dump


def test_unreduced_checkpoint_is_refused():
    from dagc.trainer.network import CentralNetwork
    spec = preset("tiny", DENSE[:1], input_size=(16, 16))
    with pytest.raises(CompileError, match="not been reduced"):
        build_graph(spec, network_tensors(CentralNetwork(spec)))


# ------------------------------------------------------------------------------ invariants and slices
def _valid_graph():
    spec = preset("tiny", DENSE[:2], input_size=(16, 16))
    return random_graph(spec, 5, density=0.6)[1]


def _with_node(g, node_id, **kw):
    return g.replace(nodes=tuple(dataclasses.replace(n, **kw) if n.id == node_id else n for n in g.nodes))


def _with_edge(g, node_id, **kw):
    n = g.node(node_id)
    return _with_node(g, node_id, edges=(dataclasses.replace(n.edges[0], **kw), *n.edges[1:]))


def _breakages(g):
    """(name, broken graph, what the check must say) for many ways to break a valid graph."""
    hidden = [n for n in g.nodes if n.state != READOUT]
    first, second = hidden[0], next(n for n in hidden if any(not e.src.startswith("input:") for e in n.edges))
    reader = next(e for e in second.edges if not e.src.startswith("input:"))
    (t0, l0), (t1, l1) = g.heads
    yield "duplicate id", g.replace(nodes=(*g.nodes, g.nodes[0])), f"node id {g.nodes[0].id!r} is used twice"
    order = [n for n in g.nodes if n.id != reader.src]
    order.insert(order.index(second) + 1, g.node(reader.src))
    yield "order", g.replace(nodes=tuple(order)), f"reads {reader.src!r}, which is not a node defined before it"
    yield "head on hidden", g.replace(heads=((t0, first.id), (t1, l1))), "which is not a read-out node"
    yield "head order", g.replace(heads=((t1, l1), (t0, l0))), "in its task order"
    yield "head task", g.replace(heads=((t0, l1), (t1, l1))), f"reads {l1}, which does not serve it"
    yield "bad block", _with_edge(g, first.id, block="edges.0_5"), "'edges.0_5' is not a block"
    wrong = f"read_in.{(first.state + 1) % g.spec.n_states}"
    yield "wrong state", _with_edge(g, first.id, block=wrong, src="input:image"), "not the node's state"
    out = g.node(l0).edges[0]
    alt = next(n for n in hidden if t0 in n.tasks and n.state != g.node(out.src).state)
    yield "source state", _with_edge(g, l0, src=alt.id), f"reads a node of state {alt.state}, not of its source state"
    yield "zero scale", _with_edge(g, first.id, scale=0.0), "has scale 0.0, not a positive number"
    yield "nan scale", _with_edge(g, first.id, scale=float("nan")), "not a positive number"
    yield "folded key", _with_edge(g, first.id, folded="nope.s1"), "['fold.nope.s1.weight', 'fold.nope.s1.bias']"
    yield "lost params", g.replace(params={}), "that the graph does not have"
    headless = {k: v for k, v in g.params.items() if not k.startswith(f"heads.{t1}.")}
    yield "head params", g.replace(params=headless), f"the head of task {t1!r} uses parameters"
    yield "undeclared input", _with_node(g, first.id, edges=(Edge(f"read_in.{first.state}", "input:other"),)), \
        "does not read a declared input"
    yield "no edges", _with_node(g, first.id, edges=()), f"node {first.id} has no incoming edge"
    yield "edge twice", _with_node(g, first.id, edges=(first.edges[0], first.edges[0])), "lists an edge twice"
    yield "unknown task", _with_node(g, first.id, tasks=("ghost",)), "not a non-empty list of distinct tasks"
    yield "no task", _with_node(g, first.id, tasks=()), "not a non-empty list of distinct tasks"
    yield "bad state", _with_node(g, first.id, state=99), "has state 99"
    lost = next(t for t in g.spec.task_names if t not in g.node(reader.src).tasks)
    moved = tuple(dataclasses.replace(e, stats=lost) for e in g.node(reader.src).edges)
    yield "task not at source", _with_node(g, reader.src, tasks=(lost,), edges=moved), "that its source does not"
    yield "no statistics", _with_edge(g, first.id, stats=None), "names no task whose batch-norm statistics"
    yield "statistics of another task", _with_edge(g, first.id, stats="ghost"), \
        "uses the batch-norm statistics of 'ghost', a task the node does not serve"
    twin = dataclasses.replace(first, id=first.id + "'")
    yield "two instances", g.replace(nodes=(first, twin, *g.nodes[1:])), "has two instances of state"
    yield "inputs", g.replace(inputs=("image", "image")), "are not unique"


def test_a_valid_graph_passes_and_every_breakage_is_named():
    g = _valid_graph()
    check_graph(g)
    seen = []
    for name, broken, what in _breakages(g):
        with pytest.raises(CompileError, match=re.escape(what)):
            check_graph(broken)
        seen.append(name)
    assert len(seen) == 24, seen


@settings(max_examples=40, deadline=None)
@given(**RANDOM_CASES)
def test_every_pass_output_passes_the_check(seed, m, k, density, cls):
    _, g = _random_case(seed, m, k, density, cls)
    check_graph(g)
    for p in PIPELINE:
        g2 = p(g)
        check_graph(g2)
        for q in PIPELINE:  # in any order, not only optimize's
            check_graph(q(g2))
        g = g2


def test_optimize_names_the_pass_that_breaks_an_invariant(monkeypatch):
    import dagc.compiler.passes as passes

    def broken(g):
        return g.replace(heads=tuple(reversed(g.heads)))

    monkeypatch.setattr(passes, "PASSES", (passes.eliminate_dead, broken))
    with pytest.raises(CompileError, match="pass broken produced an invalid graph: heads"):
        optimize(_valid_graph())
    passes.optimize(_valid_graph(), check=False)


def test_slice_is_what_the_heads_depend_on():
    spec = preset("omniglot", CLS, in_channels=1, shared_input=False)
    _, g = random_graph(spec, 2)
    for t in spec.task_names:
        part = slice_of(g, [t])
        # Without sharing, a task's slice is exactly the instances serving it, and its own input.
        assert part.nodes == tuple(n for n in g.nodes if t in n.tasks)
        assert part.inputs == (f"image_{t}",) and part.undeclared == ()
    assert slice_of(g).ids == {n.id for n in g.nodes} and slice_of(g).inputs == g.inputs
    assert slice_of(g, ["b", "a", "b"]).nodes == slice_of(g).nodes
    head_a = dict(g.heads)["a"]
    assert slice_of(g, ["a"], through={head_a}).nodes == (g.node(head_a),)
    with pytest.raises(CompileError, match=r"unknown task\(s\) \['nope'\]"):
        slice_of(g, ["nope"])
    dangling = g.replace(nodes=tuple(n for n in g.nodes if n.state != 0))
    with pytest.raises(CompileError, match="which it does not define"):
        slice_of(dangling)

"""Compiler IR, passes and lowering: each pass keeps the function; sharing, dead states, early exit."""

import pytest
import torch
from compiler_cases import random_reduced_net
from hypothesis import given, settings
from hypothesis import strategies as st

from dagc.compiler.ir import READOUT, CompileError, Edge, Graph, Node, build_graph
from dagc.compiler.lower import lower
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


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 6), k=st.integers(1, 3), density=st.floats(0.2, 0.9),
       cls=st.booleans())
def test_lowered_graph_equals_masked_supernet_after_every_pass(seed, m, k, density, cls):
    if cls:
        spec = preset("omniglot", CLS[: min(k, 2)], in_channels=1, shared_input=bool(seed % 2), flow_constant=m)
    else:
        spec = preset("tiny", DENSE[:k], input_size=(16, 16), flow_constant=m)
    net = random_reduced_net(spec, seed, density, same=seed % 3 == 0)
    g = build_graph(spec, network_tensors(net))
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

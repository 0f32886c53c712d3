"""Analytic MACs / FLOPs / parameters of compiled graphs (dagc.compiler.flops)."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dagc.compiler.flops import cost_summary, graph_costs, head_costs, supernet_costs
from dagc.compiler.ir import CompileError, Edge, Graph, Node, build_graph
from dagc.spec import Spec, StateSpec, TaskSpec, preset
from dagc.trainer.network import CentralNetwork, network_tensors
from dagc.trainer.topology import close_masks, flow_band, is_connected

# ------------------------------------------------------------------------------ hand-built graph
# Two hidden states: v0 (2 ch, stride 1), v1 (4 ch, stride 2); read-out 3 ch at stride 2; input
# 1 x 4 x 4. So v0 is 4x4 (16 px), v1 and the read-out are 2x2 (4 px).
HAND = Spec(
    states=(StateSpec(2, 1), StateSpec(4, 2)), readout=StateSpec(3, 2), flow_constant=1,
    tasks=(TaskSpec("c", "classification", 2), TaskSpec("d", "depth")),
    in_channels=1, input_size=(4, 4), head_channels=5, aspp_rates=(1, 2),
)


def _hand_graph(folded=False):
    def e(block, src, scale=1.0):
        return Edge(block, src, scale, f"{block}.s{round(1 / scale)}" if folded else None)

    nodes = (
        Node("v0:c", 0, ("c",), (e("read_in.0", "input:image"),)),
        Node("v0:d", 0, ("d",), (e("read_in.0", "input:image"),)),  # dangling: nothing reads it
        Node("v1:c", 1, ("c",), (e("read_in.1", "input:image", 0.5), e("edges.0_1", "v0:c", 0.5))),
        Node("v1:d", 1, ("d",), (e("read_in.1", "input:image"),)),
        Node("L:c", -1, ("c",), (e("read_out.0", "v0:c"), e("read_out.1", "v1:c"))),
        Node("L:d", -1, ("d",), (e("read_out.1", "v1:d"),)),
    )
    return Graph(HAND, ("image",), nodes, (("c", "L:c"), ("d", "L:d")))


def test_hand_computed_costs():
    g = _hand_graph()
    # MACs = C_out * C_in * k * k * H_out * W_out (conv output before pooling):
    #   read_in.0  2*1*9*16 = 288      read_in.1  4*1*9*4 = 144     edges.0_1 4*2*9*16 = 1152
    #   read_out.0 3*2*1*4  = 24       read_out.1 3*4*1*4 = 48      linear    3*2 = 6
    #   ASPP rate 1: 5*3*9*4 + 5*5*4 + 1*5*4 = 540 + 100 + 20 = 660; rate 2 on the 2x2 read-out: its
    #   taps at offset ±2 read only padding, so its 3x3 conv is its centre tap (Conv.live):
    #   5*3*1*4 + 100 + 20 = 180; both: 840
    # Params (conv weight + BN weight/bias unfolded): read_in.0 18+4, read_in.1 36+8, edges.0_1 72+8,
    #   read_out.0 6+6, read_out.1 12+6; linear 6+2; ASPP per rate (135+5)+(25+5)+(5+1) = 176, x2 = 352.
    assert graph_costs(g, ["c"]) == {"macs": 1662, "flops": 3324, "params": 184}
    assert graph_costs(g, ["d"]) == {"macs": 1032, "flops": 2064, "params": 414}
    # Both: MACs of every edge computed (read_in.1 and read_out.1 twice), parameters once.
    assert graph_costs(g) == {"macs": 2694, "flops": 5388, "params": 22 + 44 + 80 + 12 + 18 + 8 + 352}
    assert head_costs(HAND, "c") == {"macs": 6, "flops": 12, "params": 8}
    assert head_costs(HAND, "d") == {"macs": 840, "flops": 1680, "params": 352}


def test_hand_folded_costs():
    g = _hand_graph(folded=True)
    # Folded: conv weight + bias (C_out) instead of BN weight + bias (2 C_out). read_in.1 is folded
    # twice, with scale 1/2 (task c) and 1 (task d): two tensors.
    assert graph_costs(g, ["c"]) == {"macs": 1662, "flops": 3324, "params": 184 - (2 + 4 + 4 + 3 + 3)}
    assert graph_costs(g)["params"] == (18 + 2) + (36 + 4) * 2 + (72 + 4) + (6 + 3) + (12 + 3) + 8 + 352


def test_supernet_hand():
    # Trunk: read-ins 288 + 144, edge 0_1 1152, read-outs 24 + 48 = 1656 MACs per task.
    s = supernet_costs(HAND)
    assert s["macs"] == 2 * 1656 + 6 + 840  # the depth head as in test_hand_computed_costs
    assert s["params"] == 22 + 44 + 80 + 12 + 18 + 8 + 352
    assert supernet_costs(HAND, ["c"])["macs"] == 1656 + 6


def test_unknown_task_and_block():
    with pytest.raises(CompileError, match="unknown task"):
        graph_costs(_hand_graph(), ["nope"])
    bad = Graph(HAND, ("image",), (Node("L:c", -1, ("c",), (Edge("read_out.7", "input:image"),)),),
                (("c", "L:c"),))
    with pytest.raises(CompileError, match="read_out.7"):
        graph_costs(bad)


# ------------------------------------------------------------------------------ against torch
TASKS = [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth"), TaskSpec("cls", "classification", 4)]


def _spec(m=3):
    return preset("tiny", TASKS, input_size=(16, 16), flow_constant=m)


def _random_reduced_net(spec, seed, density=0.5):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = CentralNetwork(spec)
    band = flow_band(spec.n_states, spec.flow_constant)
    gs, as_, bs = [], [], []
    for _ in spec.tasks:
        while True:
            g = (rng.random(band.shape) < density).astype(np.int64) * band
            a = (rng.random(spec.n_states) < density).astype(np.int64)
            b = (rng.random(spec.n_states) < density).astype(np.int64)
            if is_connected(g, a, b):
                break
        g, a, b = close_masks(g, a, b)
        gs.append(g), as_.append(a), bs.append(b)
    net.set_masks(*(torch.from_numpy(np.stack(x)) for x in (gs, as_, bs)))
    return net.eval()


def _torch_flops(net, task):
    h, w = net.spec.input_size
    x = torch.randn(1, net.spec.in_channels, h, w)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x, tasks=[task])
    return fc.get_total_flops()


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("seed", range(4))
def test_matches_flop_counter(seed, m):
    spec = _spec(m)
    net = _random_reduced_net(spec, seed)
    graph = build_graph(spec, network_tensors(net))
    for task in spec.task_names:  # dense (ASPP) and classification (linear) heads
        assert graph_costs(graph, [task])["flops"] == _torch_flops(net, task), task


def test_supernet_matches_flop_counter_and_parameters():
    spec = _spec()
    torch.manual_seed(0)
    net = CentralNetwork(spec).eval()  # soft mode: one task computes every edge
    for task in spec.task_names:
        assert supernet_costs(spec, [task])["flops"] == _torch_flops(net, task)
    n_arch = sum(p.numel() for p in net.arch_parameters())
    assert supernet_costs(spec)["params"] == sum(p.numel() for p in net.parameters()) - n_arch


def _used_param_count(graph, tasks):
    """Parameters counted from the tensors themselves (graph.params) for the nodes the tasks need."""
    heads = dict(graph.heads)
    by_id = {n.id: n for n in graph.nodes}
    todo, seen, keys = [heads[t] for t in tasks], set(), set()
    while todo:
        nid = todo.pop()
        if nid in seen:
            continue
        seen.add(nid)
        for e in by_id[nid].edges:
            if e.folded:
                keys |= {f"fold.{e.folded}.weight", f"fold.{e.folded}.bias"}
            else:
                keys |= {f"{e.block}.conv.weight", f"{e.block}.bn.weight", f"{e.block}.bn.bias"}
            if not e.src.startswith("input:"):
                todo.append(e.src)
    keys |= {k for k in graph.params for t in tasks if k.startswith(f"heads.{t}.")}
    return sum(int(graph.params[k].size) for k in keys)


@pytest.mark.parametrize("seed", range(3))
def test_orderings_and_passes(seed):
    passes = pytest.importorskip("dagc.compiler.passes")
    spec = _spec()
    net = _random_reduced_net(spec, seed, density=0.7)
    raw = build_graph(spec, network_tensors(net))
    opt = passes.optimize(raw)
    shared = graph_costs(opt)
    sup = supernet_costs(spec)
    per_task = {t: graph_costs(opt, [t]) for t in spec.task_names}
    # Folding may store one block under several scales (one per task), so the folded shared model
    # can hold more parameters than the supernet; unfolded, it never does.
    unfolded = passes.share(passes.early_exit(passes.eliminate_dead(raw)))
    assert sup["params"] >= graph_costs(unfolded)["params"]
    assert graph_costs(unfolded)["macs"] == shared["macs"]
    for key in ("macs", "flops", "params"):
        if key != "params":
            assert sup[key] >= shared[key]
        assert shared[key] <= sum(c[key] for c in per_task.values())
        for t, c in per_task.items():
            assert c[key] <= shared[key]
            assert c[key] <= supernet_costs(spec, [t])[key]
    for t in spec.task_names:
        # Sharing and folding change nothing a task computes, only how its parameters are stored.
        assert per_task[t]["macs"] == graph_costs(raw, [t])["macs"]
        assert per_task[t]["params"] == _used_param_count(opt, [t])
        assert graph_costs(raw, [t])["params"] == _used_param_count(raw, [t])
    assert shared["params"] == _used_param_count(opt, spec.task_names)
    summary = cost_summary(opt)
    assert summary["shared"] == shared and summary["tasks"] == per_task and summary["supernet"] == sup

"""Analytic compute and size of a compiled graph and of the unpruned supernet.

All counts are per sample (batch 1) at the spec's ``input_size``, from the IR alone (no tracing).

Conventions:

* MACs (multiply-accumulates) are counted for convolutions and linear layers only. A conv's MACs
  are ``C_out * C_in * k * k * H_out * W_out`` with ``H_out, W_out`` the conv's own output (before
  any max-pool; a dilated 3x3 conv with padding = dilation keeps its input size); a linear layer's
  are ``in * out``. Biases, batch norm, ReLU, pooling (max and average), the sums of a state's
  edges, resizes (average pooling, bilinear interpolation), the L2 normalisation of normals and
  the heads' final upsampling are *not* counted.
* FLOPs = 2 * MACs (the convention of ``torch.utils.flop_counter.FlopCounterMode``, which the
  tests check these numbers against).
* Parameters: the weights and biases of the convs and linears used, plus the batch norm's
  ``weight`` and ``bias`` for an edge that is not folded. Running statistics
  (``running_mean``/``running_var``/``num_batches_tracked``) are buffers, not parameters, and are
  not counted; neither are the architecture logits Γ, A, B or the masks (not needed at inference).
  A folded edge (``Edge.folded``) has a conv weight and a bias and no batch norm. A parameter
  tensor used by several edges (the same block unfolded, or the same folded key) counts once;
  MACs count every edge computed.

Block shapes (``H, W`` = ``spec.input_size``, ``s_j`` = stride of hidden state j, ``s_L`` the
read-out's):

    read_in.j   conv3x3  C_in -> C_j    at H/s_j x W/s_j (input average-pooled first)
    edges.i_j   conv3x3  C_i  -> C_j    at H/s_i x W/s_i (the conv runs before the max-pool)
    read_out.i  conv1x1  C_i  -> C_L    at H/s_L x W/s_L (state resized first)
    aspp head   per rate: conv3x3 C_L -> h, conv1x1 h -> h, conv1x1 h -> out, at H/s_L x W/s_L
    linear head C_L -> classes (after global average pooling)
"""

from __future__ import annotations

from collections.abc import Sequence

from dagc.compiler.ir import INPUT_PREFIX, CompileError, Graph
from dagc.spec import Spec, TaskSpec

__all__ = ["block_shape", "block_macs", "head_costs", "graph_costs", "supernet_costs", "cost_summary"]


def _costs(macs: int, params: int) -> dict:
    return {"macs": int(macs), "flops": 2 * int(macs), "params": int(params)}


def block_shape(spec: Spec, block: str) -> tuple[int, int, int, int, int]:
    """(C_in, C_out, kernel, H_out, W_out) of a supernet block's conv ("read_in.j", "edges.i_j",
    "read_out.i"). Raises CompileError for a name that is not a block of the spec."""
    h, w = spec.input_size
    st = spec.states
    try:
        kind, rest = block.split(".", 1)
        if kind == "read_in":
            j = int(rest)
            cin, cout, k, stride = spec.in_channels, st[j].channels, 3, st[j].stride
        elif kind == "edges":
            i, j = (int(v) for v in rest.split("_"))
            if not 0 < j - i <= spec.flow_constant:
                raise ValueError
            cin, cout, k, stride = st[i].channels, st[j].channels, 3, st[i].stride
        elif kind == "read_out":
            i = int(rest)
            cin, cout, k, stride = st[i].channels, spec.readout.channels, 1, spec.readout.stride
        else:
            raise ValueError
    except (ValueError, IndexError):
        raise CompileError(f"{block!r} is not a block of this network (expected read_in.j, edges.i_j "
                           f"with 0 < j - i <= {spec.flow_constant}, or read_out.i, 0 <= i, j < "
                           f"{spec.n_states})") from None
    return cin, cout, k, h // stride, w // stride


def block_macs(spec: Spec, block: str) -> int:
    cin, cout, k, ho, wo = block_shape(spec, block)
    return cout * cin * k * k * ho * wo


def _block_params(spec: Spec, block: str, folded: bool) -> int:
    cin, cout, k, _, _ = block_shape(spec, block)
    # Unfolded: conv (no bias) + BN weight and bias. Folded: conv weight + bias.
    return cout * cin * k * k + (cout if folded else 2 * cout)


def head_costs(spec: Spec, task: TaskSpec | str) -> dict:
    """MACs / FLOPs / parameters of one task's head (see the module docstring)."""
    t = spec.task(task) if isinstance(task, str) else task
    cl, out = spec.readout.channels, t.out_channels
    if t.head == "linear":
        return _costs(cl * out, cl * out + out)
    h, w = spec.input_size
    pix = (h // spec.readout.stride) * (w // spec.readout.stride)
    hc = spec.head_channels
    per_rate_macs = (hc * cl * 9 + hc * hc + out * hc) * pix
    per_rate_params = (hc * cl * 9 + hc) + (hc * hc + hc) + (out * hc + out)
    n = len(spec.aspp_rates)
    return _costs(n * per_rate_macs, n * per_rate_params)


def graph_costs(graph: Graph, tasks: Sequence[str] | None = None) -> dict:
    """``{"macs", "flops", "params"}`` of the part of ``graph`` that the heads of ``tasks`` need
    (default: every task, i.e. the shared multi-output model; one task: its own model).

    A node is needed if a needed head reads it or a needed node has an edge from it; the heads of
    ``tasks`` are included. Raises CompileError for a task the graph has no head for, or an edge
    whose block is not a block of the spec.
    """
    spec = graph.spec
    names = list(graph.tasks) if tasks is None else list(dict.fromkeys(tasks))
    heads = dict(graph.heads)
    unknown = [t for t in names if t not in heads]
    if unknown:
        raise CompileError(f"unknown task(s) {unknown}; the graph has tasks {list(graph.tasks)}")
    by_id = {n.id: n for n in graph.nodes}
    needed: dict[str, None] = {}  # insertion-ordered set
    stack = [heads[t] for t in names]
    while stack:  # every node a needed head or node reads, once
        nid = stack.pop()
        if nid in needed:
            continue
        if nid not in by_id:
            raise CompileError(f"the graph reads node {nid!r}, which it does not define")
        needed[nid] = None
        stack.extend(e.src for e in by_id[nid].edges if not e.src.startswith(INPUT_PREFIX))
    macs = 0
    tensors: dict[str, int] = {}  # parameter tensor key -> size, each counted once
    for nid in needed:
        for e in by_id[nid].edges:
            macs += block_macs(spec, e.block)
            key = f"fold.{e.folded}" if e.folded is not None else e.block
            if key not in tensors:
                tensors[key] = _block_params(spec, e.block, folded=e.folded is not None)
    params = sum(tensors.values())
    for t in names:
        hc = head_costs(spec, t)
        macs += hc["macs"]
        params += hc["params"]
    return _costs(macs, params)


def supernet_costs(spec: Spec, tasks: Sequence[str] | None = None) -> dict:
    """``{"macs", "flops", "params"}`` of the unpruned supernet running ``tasks`` (default: all K),
    as the supernet runs them: each task computes every state, so MACs =
    len(tasks) * (all read-ins + all band edges + all read-outs) + the tasks' heads. Parameters:
    every block once (conv + batch norm, unfolded) plus the tasks' heads."""
    names = list(spec.task_names) if tasks is None else list(dict.fromkeys(tasks))
    for t in names:
        spec.task(t)  # raises SpecError for an unknown task
    n = spec.n_states
    blocks = ([f"read_in.{j}" for j in range(n)] + [f"edges.{i}_{j}" for i, j in spec.hidden_edges()]
              + [f"read_out.{i}" for i in range(n)])
    trunk_macs = sum(block_macs(spec, b) for b in blocks)
    trunk_params = sum(_block_params(spec, b, folded=False) for b in blocks)
    heads = [head_costs(spec, t) for t in names]
    return _costs(len(names) * trunk_macs + sum(h["macs"] for h in heads),
                  trunk_params + sum(h["params"] for h in heads))


def cost_summary(graph: Graph) -> dict:
    """The costs section of an artifact manifest (what `dagc.compiler.report.report_markdown`
    reads): ``shared`` (all tasks, this graph), ``tasks`` (task -> its own model), ``supernet``
    (the unpruned supernet, all tasks) and ``supernet_tasks`` (task -> the unpruned supernet
    running that task alone)."""
    return {
        "shared": graph_costs(graph),
        "tasks": {t: graph_costs(graph, [t]) for t in graph.tasks},
        "supernet": supernet_costs(graph.spec),
        "supernet_tasks": {t: supernet_costs(graph.spec, [t]) for t in graph.tasks},
    }

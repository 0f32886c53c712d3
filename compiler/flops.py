"""Analytic compute and size of a compiled graph and of the unpruned supernet.

All counts are per sample (batch 1) at the spec's ``input_size``, from the IR and the block and
head definitions alone (no tracing); the conventions (what counts as a MAC, a FLOP, a parameter)
and the counter itself are the core's, `dagc.costs`, which the trainer uses too.

Block shapes (``H, W`` = ``spec.input_size``, ``s_j`` = stride of hidden state j, ``s_L`` the
read-out's; `dagc.blocks`):

    read_in.j   conv3x3  C_in -> C_j    at H/s_j x W/s_j (input average-pooled first)
    edges.i_j   conv3x3  C_i  -> C_j    at H/s_i x W/s_i (the conv runs before the max-pool)
    read_out.i  conv1x1  C_i  -> C_L    at H/s_L x W/s_L (state resized first)
    aspp head   per rate: conv3x3 C_L -> h, conv1x1 h -> h, conv1x1 h -> out, at H/s_L x W/s_L
    linear head C_L -> classes (after global average pooling)
"""

from __future__ import annotations

from collections.abc import Sequence

from dagc.compiler.ir import Graph, slice_of, spec_block
from dagc.costs import head_costs, network_costs, supernet_costs
from dagc.spec import Spec

__all__ = ["block_shape", "block_macs", "head_costs", "graph_costs", "supernet_costs", "cost_summary"]


def block_shape(spec: Spec, name: str) -> tuple[int, int, int, int, int]:
    """(C_in, C_out, kernel, H_out, W_out) of a supernet block's conv ("read_in.j", "edges.i_j",
    "read_out.i"). Raises CompileError for a name that is not a block of the spec."""
    b = spec_block(spec, name)
    return b.cin, b.cout, b.conv.kernel, *b.conv.hw


def block_macs(spec: Spec, name: str) -> int:
    """MACs of one application of a block; raises CompileError as `block_shape`."""
    return spec_block(spec, name).macs


def graph_costs(graph: Graph, tasks: Sequence[str] | None = None) -> dict:
    """``{"macs", "flops", "params"}`` of the part of ``graph`` that the heads of ``tasks`` need
    (default: every task, i.e. the shared multi-output model; one task: its own model).

    A node is needed if a needed head reads it or a needed node has an edge from it; the heads of
    ``tasks`` are included. Raises CompileError for a task the graph has no head for, or an edge
    whose block is not a block of the spec.
    """
    names = list(graph.tasks) if tasks is None else list(dict.fromkeys(tasks))
    part = slice_of(graph, names)
    return network_costs(graph.spec, [(graph.block(e), e.folded) for n in part.nodes for e in n.edges], names)


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

"""Compiler passes: small pure functions from IR to IR (`dagc.compiler.ir.Graph`).

    eliminate_dead   drop instances not reachable from an input or not reaching any head
    early_exit       drop, per task, every instance after the task's last active read-out
    share            value numbering: an instance whose edges are identical (same blocks, same
                     shared sources, same scale, equal batch-norm statistics) in several tasks is
                     computed once for all of them
    fold             each edge's batch norm (its task's statistics) and the positive 1/In factor
                     folded into its conv

`optimize` runs them in that order and checks the graph's invariants (`check_graph`) after each.
None mutates its input.
"""

from __future__ import annotations

import numpy as np

from dagc.blocks import BlockDef
from dagc.compiler.ir import (
    INPUT_PREFIX,
    READOUT,
    CompileError,
    Edge,
    Graph,
    Node,
    check_graph,
    folded_names,
    node_id,
    slice_of,
    stats_names,
)


def eliminate_dead(g: Graph) -> Graph:
    """Remove every instance that is not reachable from a model input or that no head needs,
    together with its edges; an edge out of a removed instance goes with it. (Graphs built from
    a checkpoint have closed masks, so there this only removes what a hand-made or transformed IR
    left dangling.) Raises CompileError if a head's read-out is unreachable."""
    reachable: set[str] = set()
    for n in g.nodes:
        if any(e.src.startswith(INPUT_PREFIX) or e.src in reachable for e in n.edges):
            reachable.add(n.id)
    for task, src in g.heads:
        if src not in reachable:
            raise CompileError(f"task {task!r} has no path from its input to its read-out")
    keep = slice_of(g, through=reachable).ids
    nodes = tuple(
        Node(n.id, n.state, n.tasks, tuple(e for e in n.edges if e.src.startswith(INPUT_PREFIX) or e.src in keep))
        for n in g.nodes if n.id in keep
    )
    return g.replace(nodes=nodes)


def early_exit(g: Graph) -> Graph:
    """Drop each task from the instances of states after its last active read-out (the paper's
    early exit: a task that reads out at state i computes nothing beyond i); instances left
    serving no task are removed."""
    last = {task: max(g.block(e).src for e in g.node(src).edges) for task, src in g.heads}
    nodes = []
    for n in g.nodes:
        tasks = n.tasks if n.state == READOUT else tuple(t for t in n.tasks if n.state <= last[t])
        if tasks:
            nodes.append(Node(n.id, n.state, tasks, n.edges))
    return g.replace(nodes=tuple(nodes))


def share(g: Graph) -> Graph:
    """Value numbering across tasks: instances of the same state whose edges apply the same blocks,
    with the same scales and equal batch-norm statistics (compared value for value, not assumed),
    to the same (already shared) sources compute the same value, so they become one instance
    serving the union of their tasks. Ids are renamed after the tasks served."""
    order = {t: i for i, t in enumerate(g.spec.task_names)}
    stats = _stats_classes(g)
    groups: dict[tuple, list[Node]] = {}
    rep: dict[str, tuple] = {}  # old id -> its group's key
    for n in g.nodes:
        edges = tuple(sorted((e.block, _canon(e.src, rep), e.scale, e.folded, stats(e)) for e in n.edges))
        key = (n.state, edges)
        groups.setdefault(key, []).append(n)
        rep[n.id] = key
    new_id = {key: node_id(ns[0].state, tuple(sorted({t for n in ns for t in n.tasks}, key=order.get)))
              for key, ns in groups.items()}

    def rename(src: str) -> str:
        return src if src.startswith(INPUT_PREFIX) else new_id[rep[src]]

    nodes = []
    for key, ns in groups.items():
        first = ns[0]
        tasks = tuple(sorted({t for n in ns for t in n.tasks}, key=order.get))
        edges = tuple(Edge(e.block, rename(e.src), e.scale, e.folded, e.stats) for e in first.edges)
        nodes.append(Node(new_id[key], first.state, tasks, edges))
    nodes.sort(key=lambda n: (n.state == READOUT, n.state))
    heads = tuple((t, rename(src)) for t, src in g.heads)
    return g.replace(nodes=tuple(nodes), heads=heads)


def _canon(src: str, rep: dict[str, tuple]) -> object:
    return src if src.startswith(INPUT_PREFIX) else rep[src]


def _stats_classes(g: Graph):
    """A function from an edge to the first task (spec order) whose running statistics of the
    edge's block equal, value for value, those the edge uses (None for an edge without them)."""
    seen: dict[tuple[str, str], str] = {}

    def same(block, a: str, b: str) -> bool:
        return all(np.array_equal(g.params[x], g.params[y]) for x, y in zip(stats_names(block, a), stats_names(block, b)))

    def of(e: Edge) -> str | None:
        if e.stats is None:
            return None
        if (e.block, e.stats) not in seen:
            b = g.block(e)
            seen[e.block, e.stats] = next(t for t in g.spec.task_names if same(b, t, e.stats))
        return seen[e.block, e.stats]

    return of


def fold(g: Graph) -> Graph:
    """Fold each edge's eval-mode batch norm (with its task's statistics) and its positive scale
    into its conv: ``w' = w · s·γ/√(σ²+ε)``, ``b' = s·(β − μ·γ/√(σ²+ε))``. ReLU and max-pool commute
    with a positive scale, so the averaging of Eq. 4 costs nothing at inference. Folded parameters
    are added as ``fold.<block>.s<n>.<task>.weight/bias`` (n = 1/scale; task: the first whose
    statistics equal the edge's); each such triple is folded once and shared by every edge that
    uses it."""
    params = dict(g.params)
    stats = _stats_classes(g)
    nodes = []
    for n in g.nodes:
        edges = []
        for e in n.edges:
            if e.folded is not None:
                edges.append(e)
                continue
            if e.stats is None:
                raise CompileError(f"edge {e.block}({e.src}) of node {n.id} names no task whose batch-norm "
                                   "statistics it uses; nothing to fold")
            inv = round(1.0 / e.scale)
            task = stats(e)
            key = f"{e.block}.s{inv}.{task}"
            weight, bias = folded_names(key)
            if weight not in params:
                params[weight], params[bias] = _folded(g.params, g.block(e), task, 1.0 / inv)
            edges.append(Edge(e.block, e.src, e.scale, key, e.stats))
        nodes.append(Node(n.id, n.state, n.tasks, tuple(edges)))
    return g.replace(nodes=tuple(nodes), params=params)


def _folded(params, block: BlockDef, task: str, scale: float) -> tuple[np.ndarray, np.ndarray]:
    w = params[block.conv.weight].astype(np.float64)
    gamma, beta, mean, var = (params[k].astype(np.float64)
                              for k in (block.bn_tensor("weight"), block.bn_tensor("bias"), *stats_names(block, task)))
    inv = gamma / np.sqrt(var + block.bn_eps)
    weight = w * (scale * inv)[:, None, None, None]
    bias = scale * (beta - mean * inv)
    return weight.astype(np.float32), bias.astype(np.float32)


PASSES = (eliminate_dead, early_exit, share, fold)


def optimize(g: Graph, *, check: bool = True) -> Graph:
    """All passes (`PASSES`): dead-state elimination, early exit, cross-task sharing, folding.

    Takes a graph (as `dagc.compiler.ir.build_graph` gives); returns the optimised graph. With
    ``check`` (the default), `check_graph` runs on every pass's output. Raises CompileError from a
    pass, or naming the pass whose output violates an invariant.
    """
    for p in PASSES:
        g = p(g)
        if check:
            try:
                check_graph(g)
            except CompileError as e:
                raise CompileError(f"pass {p.__name__} produced an {e}") from None
    return g


__all__ = ["eliminate_dead", "early_exit", "share", "fold", "optimize", "PASSES", "READOUT"]

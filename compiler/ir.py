"""Graph IR of *task state instances*: what a reduced checkpoint computes, and nothing else.

A `Node` is one instance of a hidden state (``state >= 0``) or of the read-out state
(``state == READOUT``) that serves a set of tasks. Its value is the sum of its incoming `Edge`s;
each edge applies one supernet block (``block``: "read_in.j", "edges.i_j" or "read_out.i") to a
source (another node, or a model input ``"input:<name>"``) and multiplies by a positive ``scale``
(the 1/In averaging factor; 1 for read-outs) after normalising with the batch-norm running
statistics of one task (``stats``: each task has its own, FORMAT.md). Every task has one head,
reading one read-out node.

Parameters stay outside the structure, in ``Graph.params`` (numpy arrays keyed by the supernet's
``theta.*`` names, with each task's running statistics under `stats_names`, plus ``fold.*``
entries once `dagc.compiler.passes.fold` ran), so the IR is small, printable (`Graph.dump`) and
easy to assert on.

What an edge's block computes (eval mode) is its `dagc.blocks.BlockDef` (`Graph.block`). A folded
edge (``edge.folded`` set) uses conv weight and bias ``fold.<key>.weight/bias`` (`folded_names`)
with BN and ``scale`` already folded in (ReLU and max-pool commute with a positive scale).

`slice_of` is the one analysis of which nodes and inputs some tasks' heads depend on; `check_graph`
the one invariant check, which `dagc.compiler.passes.optimize` runs after every pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from dagc.blocks import HIDDEN, READ_IN, READ_OUT, BlockDef, BlockKey, blocks, head, parse_key
from dagc.blocks import block as block_def
from dagc.errors import CompileError, SpecError
from dagc.sharing import READOUT
from dagc.spec import Spec

INPUT_PREFIX = "input:"


@dataclass(frozen=True)
class Edge:
    """One active incoming edge: ``scale * block(src)`` (or the folded block).

    ``block`` is the block's name (``"edges.2_4"``); `key` its typed form, `Graph.block` its
    definition. ``stats`` is the task whose batch-norm running statistics the block normalises
    with (`stats_names`)."""

    block: str
    src: str
    scale: float = 1.0
    folded: str | None = None
    stats: str | None = None

    @property
    def key(self) -> BlockKey:
        """The typed block name; raises SpecError if ``block`` is not a block name."""
        return parse_key(self.block)

    @property
    def kind(self) -> str:
        return self.key.kind


STATS = ("running_mean", "running_var")


def stats_names(block: BlockDef, task: str) -> tuple[str, str]:
    """The parameter keys (running mean, running variance) of one task's batch-norm statistics of
    ``block``: ``<bn>.running_mean.<task>`` and ``<bn>.running_var.<task>``."""
    return tuple(f"{block.bn_tensor(s)}.{task}" for s in STATS)


def edge_tensors(g: Graph, e: Edge) -> tuple[str, ...]:
    """The parameter keys an edge uses: its folded conv, or its block's conv weight, batch-norm
    weight and bias, and the running statistics of ``e.stats``. Raises CompileError for an unfolded
    edge without ``stats``."""
    if e.folded is not None:
        return folded_names(e.folded)
    if e.stats is None:
        raise CompileError(f"edge {e.block}({e.src}) names no task whose batch-norm statistics it uses")
    b = g.block(e)
    return (b.conv.weight, b.bn_tensor("weight"), b.bn_tensor("bias"), *stats_names(b, e.stats))


def folded_names(folded: str) -> tuple[str, str]:
    """The parameter keys (weight, bias) of a folded edge's conv, from its ``Edge.folded`` key."""
    return f"fold.{folded}.weight", f"fold.{folded}.bias"


@dataclass(frozen=True)
class Node:
    """A state instance: the sum of its edges, computed once for all of ``tasks``."""

    id: str
    state: int
    tasks: tuple[str, ...]
    edges: tuple[Edge, ...]


@dataclass(frozen=True)
class Graph:
    """A whole compiled computation: inputs, nodes in topological order, one head per task."""

    spec: Spec
    inputs: tuple[str, ...]
    nodes: tuple[Node, ...]
    heads: tuple[tuple[str, str], ...]  # (task, read-out node id), in the spec's task order
    params: Mapping[str, np.ndarray] = field(repr=False, compare=False, default_factory=dict)

    def node(self, node_id: str) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.heads)

    def block(self, edge: Edge | str) -> BlockDef:
        """The definition of an edge's block (or of a block name) in this graph's network.
        Raises CompileError, naming the block, if it is not a block of the spec."""
        return spec_block(self.spec, edge.block if isinstance(edge, Edge) else edge)

    def task_input(self, task: str) -> str:
        """The model input a task reads: the shared image, or its own."""
        return self.inputs[0] if self.spec.shared_input else input_name(task)

    def replace(self, **kw) -> Graph:
        return replace(self, **kw)

    def dump(self) -> str:
        """A readable listing, one node per line, e.g.
        ``v2:seg+depth = 0.5*read_in.2(input:image) + 0.5*edges.0_2(v0:seg+depth)``."""
        lines = [f"inputs: {', '.join(self.inputs)}"]
        for n in self.nodes:
            terms = " + ".join(
                f"{e.scale:g}*{e.folded or e.block}({e.src})" if e.scale != 1 else f"{e.folded or e.block}({e.src})"
                for e in n.edges
            )
            lines.append(f"{n.id} = {terms}")
        lines += [f"head {t} <- {src}" for t, src in self.heads]
        return "\n".join(lines)


def spec_block(spec: Spec, name: str) -> BlockDef:
    """`dagc.blocks.block` for the compiler: raises CompileError, naming the block, if ``name`` is
    not a block of ``spec``."""
    try:
        return block_def(spec, name)
    except SpecError as e:
        raise CompileError(str(e)) from None


def input_name(task: str | None) -> str:
    """Model input name: ``image`` when shared, ``image_<task>`` when each task has its own."""
    return "image" if task is None else f"image_{task}"


def node_id(state: int, tasks: tuple[str, ...]) -> str:
    return f"{'L' if state == READOUT else f'v{state}'}:{'+'.join(tasks)}"


def masks_of(tensors: Mapping[str, object], spec: Spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (K, N, N), (K, N), (K, N) 0/1 masks of a reduced checkpoint's tensors.

    Raises CompileError if the checkpoint has not been reduced yet.
    """
    if "mask.gamma" not in tensors:
        raise CompileError("the checkpoint has not been reduced yet (no masks); finish its search with "
                           "dagc train (or dagc train --resume RUN_DIR) and compile RUN_DIR/checkpoint.safetensors")
    return tuple(np.asarray(tensors[f"mask.{n}"], dtype=np.int64) for n in ("gamma", "alpha", "beta"))


def build_graph(spec: Spec, tensors: Mapping[str, object], *,
                masks: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Graph:
    """The unoptimised IR of a reduced checkpoint: one instance of every state per task that has
    an active incoming edge, one read-out instance per task. Nothing is shared or folded yet.

    Takes the spec and the checkpoint tensors (torch or numpy). Raises CompileError if the
    checkpoint is not reduced, its masks set an edge outside the flow band, or a task has no
    active read-out. ``masks``: the tensors' `masks_of`, when the caller has them already.
    """
    masks = masks_of(tensors, spec) if masks is None else masks
    used = sum(int(np.count_nonzero(b.mask(*masks))) for b in blocks(spec))
    if used != sum(int(np.count_nonzero(m)) for m in masks):
        raise CompileError("the checkpoint's masks set an edge outside the flow-restricted band")
    inputs = (input_name(None),) if spec.shared_input else tuple(input_name(t) for t in spec.task_names)
    # The blocks into each state, read-in first, then the hidden edges by source state.
    into = {j: [block_def(spec, BlockKey(READ_IN, None, j))] for j in range(spec.n_states)}
    for b in blocks(spec, HIDDEN):
        into[b.dst].append(b)
    nodes: list[Node] = []
    heads = []
    for k, task in enumerate(spec.task_names):
        src_in = INPUT_PREFIX + (inputs[0] if spec.shared_input else input_name(task))
        for j in range(spec.n_states):
            active = [b for b in into[j] if b.mask(*masks)[k]]
            if active:
                scale = 1.0 / len(active)
                edges = tuple(Edge(b.key, _source(b, task, src_in), scale, stats=task) for b in active)
                nodes.append(Node(node_id(j, (task,)), j, (task,), edges))
        outs = tuple(Edge(b.key, _source(b, task, src_in), stats=task)
                     for b in blocks(spec, READ_OUT) if b.mask(*masks)[k])
        if not outs:
            raise CompileError(f"task {task!r} has no active read-out: its masks leave no path to the output")
        nodes.append(Node(node_id(READOUT, (task,)), READOUT, (task,), outs))
        heads.append((task, node_id(READOUT, (task,))))
    params = {k[len("theta."):]: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
              for k, v in tensors.items() if k.startswith("theta.")}
    return Graph(spec, inputs, _topological(nodes), tuple(heads), _task_stats(spec, params))


def _task_stats(spec: Spec, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``params`` with every block's (K, C) running statistics split into one entry per task
    (`stats_names`) and its batch counters dropped (eval mode does not read them)."""
    out = dict(params)
    for b in blocks(spec):
        out.pop(b.bn_tensor("num_batches_tracked"), None)
        stacked = [out.pop(b.bn_tensor(s), None) for s in STATS]
        if any(a is None for a in stacked):
            continue  # check_graph names what an edge lacks
        for s, a in zip(STATS, stacked):
            if a.shape != (spec.n_tasks, b.cout):
                raise CompileError(f"{b.bn_tensor(s)} has shape {a.shape}, not (tasks, channels) = "
                                   f"{(spec.n_tasks, b.cout)}")
        for k, task in enumerate(spec.task_names):
            for name, a in zip(stats_names(b, task), stacked):
                out[name] = a[k]
    return out


def _source(b: BlockDef, task: str, src_in: str) -> str:
    """What a block of one task's unshared graph reads: the input, or the task's instance of its
    source state (closed masks give every active block's source an instance)."""
    return src_in if b.src is None else node_id(b.src, (task,))


def _topological(nodes: list[Node]) -> tuple[Node, ...]:
    """Hidden states in state order (edges only go forward), read-outs last; stable otherwise."""
    return tuple(sorted(nodes, key=lambda n: (n.state == READOUT, n.state)))


# ---------------------------------------------------------------------------------- slices
@dataclass(frozen=True)
class Slice:
    """The part of a graph that some tasks' heads depend on: ``nodes`` in graph order, the
    declared model ``inputs`` they read (in ``graph.inputs`` order) and any ``undeclared`` input
    names they read (sorted; a well-formed graph has none)."""

    nodes: tuple[Node, ...]
    inputs: tuple[str, ...]
    undeclared: tuple[str, ...] = ()

    @property
    def ids(self) -> frozenset[str]:
        return frozenset(n.id for n in self.nodes)


def slice_of(graph: Graph, tasks: Sequence[str] | None = None, *, through: set[str] | None = None) -> Slice:
    """The nodes and inputs the heads of ``tasks`` (default: every task) depend on, transitively.

    With ``through``, the walk only enters nodes whose id is in it (sources outside it are
    treated as absent; heads outside it contribute nothing). Raises CompileError for a task the
    graph has no head for, or (without ``through``) a source the graph does not define.
    """
    heads = dict(graph.heads)
    names = list(graph.tasks) if tasks is None else list(dict.fromkeys(tasks))
    unknown = [t for t in names if t not in heads]
    if unknown:
        raise CompileError(f"unknown task(s) {unknown}; the graph has tasks {list(graph.tasks)}")
    by_id = {n.id: n for n in graph.nodes}
    needed: set[str] = set()
    read: set[str] = set()
    todo = [heads[t] for t in names]
    while todo:
        nid = todo.pop()
        if nid in needed or (through is not None and nid not in through):
            continue
        if nid not in by_id:
            raise CompileError(f"the graph reads node {nid!r}, which it does not define")
        needed.add(nid)
        for e in by_id[nid].edges:
            if e.src.startswith(INPUT_PREFIX):
                read.add(e.src[len(INPUT_PREFIX):])
            else:
                todo.append(e.src)
    return Slice(tuple(n for n in graph.nodes if n.id in needed), tuple(i for i in graph.inputs if i in read),
                 tuple(sorted(read - set(graph.inputs))))


# ---------------------------------------------------------------------------------- invariants
def check_graph(g: Graph) -> None:
    """Check the invariants every graph (built, or output by any pass) keeps.

    Ids are unique; inputs are unique; every node serves at least one known task, has at least one
    edge, and each task has at most one instance of a state; every edge applies a block of the spec
    that writes the node's state, with a positive finite scale; a read-in reads a declared input,
    any other block reads a node defined earlier (so nodes are in topological order) of the
    block's source state that serves all of the node's tasks; an unfolded edge names the task
    whose batch-norm statistics it uses, and a folded one may, a task the node serves; the
    parameters an edge uses are in ``g.params`` (`edge_tensors`); heads are one per task,
    in the spec's task order, each on a read-out node that serves its task, with its parameters in
    ``g.params``. Takes a graph; returns
    None. Raises CompileError naming the first violation.
    """
    def fail(what: str) -> None:
        raise CompileError(f"invalid graph: {what}")

    if len(set(g.inputs)) != len(g.inputs):
        fail(f"inputs {list(g.inputs)} are not unique")
    known = set(g.spec.task_names)
    defined: dict[str, Node] = {}
    instances: set[tuple[str, int]] = set()
    for n in g.nodes:
        if n.id in defined:
            fail(f"node id {n.id!r} is used twice")
        if not n.tasks or len(set(n.tasks)) != len(n.tasks) or not set(n.tasks) <= known:
            fail(f"node {n.id} serves tasks {list(n.tasks)}, not a non-empty list of distinct tasks of the spec")
        if n.state != READOUT and not 0 <= n.state < g.spec.n_states:
            fail(f"node {n.id} has state {n.state}, outside 0..{g.spec.n_states - 1} and not the read-out")
        for t in n.tasks:
            if (t, n.state) in instances:
                fail(f"task {t!r} has two instances of state {n.state} (one is {n.id})")
            instances.add((t, n.state))
        if not n.edges:
            fail(f"node {n.id} has no incoming edge")
        if len({(e.block, e.src) for e in n.edges}) != len(n.edges):
            fail(f"node {n.id} lists an edge twice")
        for e in n.edges:
            _check_edge(g, n, e, defined, fail)
        defined[n.id] = n
    _check_heads(g, defined, fail)


def _check_edge(g: Graph, n: Node, e: Edge, defined: Mapping[str, Node], fail) -> None:
    where = f"edge {e.block}({e.src}) of node {n.id}"
    b = g.block(e)
    if (b.dst if b.kind != READ_OUT else READOUT) != n.state:
        fail(f"{where} writes {'the read-out' if b.kind == READ_OUT else f'state {b.dst}'}, not the node's state")
    if not (np.isfinite(e.scale) and e.scale > 0):
        fail(f"{where} has scale {e.scale}, not a positive number")
    if b.kind == READ_IN:
        if not (e.src.startswith(INPUT_PREFIX) and e.src[len(INPUT_PREFIX):] in g.inputs):
            fail(f"{where} does not read a declared input {[INPUT_PREFIX + i for i in g.inputs]}")
    else:
        src = defined.get(e.src)
        if src is None:
            fail(f"{where} reads {e.src!r}, which is not a node defined before it")
        if src.state != b.src:
            fail(f"{where} reads a node of state {src.state}, not of its source state {b.src}")
        if not set(n.tasks) <= set(src.tasks):
            fail(f"{where}: the node serves tasks {sorted(set(n.tasks) - set(src.tasks))} that its source does not")
    if e.folded is None and e.stats is None:
        fail(f"{where} names no task whose batch-norm statistics it uses")
    if e.stats is not None and e.stats not in n.tasks:
        fail(f"{where} uses the batch-norm statistics of {e.stats!r}, a task the node does not serve")
    missing = [k for k in edge_tensors(g, e) if k not in g.params]
    if missing:
        fail(f"{where} uses parameters {missing} that the graph does not have")


def _check_heads(g: Graph, defined: Mapping[str, Node], fail) -> None:
    tasks = [t for t, _ in g.heads]
    order = [t for t in g.spec.task_names if t in tasks]
    if tasks != order:
        fail(f"heads {tasks} are not distinct tasks of the spec in its task order {list(g.spec.task_names)}")
    for t, src in g.heads:
        n = defined.get(src)
        if n is None or n.state != READOUT:
            fail(f"the head of task {t!r} reads {src!r}, which is not a read-out node of the graph")
        if t not in n.tasks:
            fail(f"the head of task {t!r} reads {src}, which does not serve it")
        missing = [k for k in head(g.spec, t).tensors if k not in g.params]
        if missing:
            fail(f"the head of task {t!r} uses parameters {missing[:2]} that the graph does not have")

"""Graph IR of *task state instances*: what a reduced checkpoint computes, and nothing else.

A `Node` is one instance of a hidden state (``state >= 0``) or of the read-out state
(``state == READOUT``) that serves a set of tasks. Its value is the sum of its incoming `Edge`s;
each edge applies one supernet block (``block``: "read_in.j", "edges.i_j" or "read_out.i") to a
source (another node, or a model input ``"input:<name>"``) and multiplies by a positive ``scale``
(the 1/In averaging factor; 1 for read-outs). Every task has one head, reading one read-out node.

Parameters stay outside the structure, in ``Graph.params`` (numpy arrays keyed by the supernet's
``theta.*`` names, plus ``fold.*`` entries once `dagc.compiler.passes.fold` ran), so the IR is
small, printable (`Graph.dump`) and easy to assert on.

Semantics of an edge (eval mode):
    read_in.j   avg_pool(input, stride_j) -> conv3x3 -> BN -> ReLU
    edges.i_j   conv3x3 -> BN -> ReLU -> max_pool(stride_j / stride_i)
    read_out.i  resize(stride_i -> stride_L) -> conv1x1 -> BN -> ReLU
A folded edge (``edge.folded`` set) uses conv weight and bias ``fold.<key>.weight/bias`` with BN and
``scale`` already folded in (ReLU and max-pool commute with a positive scale).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from dagc.errors import CompileError
from dagc.spec import Spec

READOUT = -1
INPUT_PREFIX = "input:"



@dataclass(frozen=True)
class Edge:
    """One active incoming edge: ``scale * block(src)`` (or the folded block)."""

    block: str
    src: str
    scale: float = 1.0
    folded: str | None = None

    @property
    def kind(self) -> str:
        return self.block.split(".", 1)[0]


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


def build_graph(spec: Spec, tensors: Mapping[str, object]) -> Graph:
    """The unoptimised IR of a reduced checkpoint: one instance of every state per task that has
    an active incoming edge, one read-out instance per task. Nothing is shared or folded yet.

    Takes the spec and the checkpoint tensors (torch or numpy). Raises CompileError if the
    checkpoint is not reduced or a task has no active read-out.
    """
    gamma, alpha, beta = masks_of(tensors, spec)
    inputs = (input_name(None),) if spec.shared_input else tuple(input_name(t) for t in spec.task_names)
    nodes: list[Node] = []
    heads = []
    for k, task in enumerate(spec.task_names):
        src_in = INPUT_PREFIX + (inputs[0] if spec.shared_input else input_name(task))
        ids: dict[int, str] = {}
        for j in range(spec.n_states):
            blocks = [(f"read_in.{j}", src_in)] if alpha[k, j] else []
            blocks += [(f"edges.{i}_{j}", ids.get(i, node_id(i, (task,)))) for i in range(j) if gamma[k, i, j]]
            if not blocks:
                continue
            ids[j] = node_id(j, (task,))
            scale = 1.0 / len(blocks)
            nodes.append(Node(ids[j], j, (task,), tuple(Edge(b, s, scale) for b, s in blocks)))
        outs = tuple(Edge(f"read_out.{i}", ids.get(i, node_id(i, (task,)))) for i in range(spec.n_states) if beta[k, i])
        if not outs:
            raise CompileError(f"task {task!r} has no active read-out: its masks leave no path to the output")
        nodes.append(Node(node_id(READOUT, (task,)), READOUT, (task,), outs))
        heads.append((task, node_id(READOUT, (task,))))
    params = {k[len("theta."):]: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
              for k, v in tensors.items() if k.startswith("theta.")}
    order = _topological(nodes)
    return Graph(spec, inputs, order, tuple(heads), params)


def _topological(nodes: list[Node]) -> tuple[Node, ...]:
    """Hidden states in state order (edges only go forward), read-outs last; stable otherwise."""
    return tuple(sorted(nodes, key=lambda n: (n.state == READOUT, n.state)))

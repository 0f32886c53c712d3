"""`dagc inspect --network FILE`: a network file described before any training -- its hidden
states, strides, edges and flow constant, the supernet's parameters, and its FLOPs at each input
size (counted by `dagc.costs`, per sample)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from dagc.blocks import HIDDEN, READ_IN, READ_OUT, blocks
from dagc.costs import head_costs, network_costs, supernet_costs
from dagc.errors import DagcError, SpecError
from dagc.network_file import Network
from dagc.spec import KINDS, Spec, TaskSpec

# Without --tasks: one dense task with a single output channel, so that the head counted is the
# ASPP head every dense task has (a labelled task's head grows with its classes).
DEFAULT_TASKS = (TaskSpec("depth", "depth"),)

__all__ = ["DEFAULT_TASKS", "describe_network", "parse_tasks"]


def parse_tasks(text: str | None) -> tuple[TaskSpec, ...]:
    """Takes ``--tasks``: comma-separated ``[NAME=]KIND[:CLASSES]`` (e.g. ``seg=segmentation:21,depth``;
    the name defaults to the kind), or None for `DEFAULT_TASKS`. Returns the tasks. Raises
    DagcError naming the item that is malformed (a spec checks kinds, classes and names)."""
    if text is None:
        return DEFAULT_TASKS
    tasks = []
    for item in (t.strip() for t in text.split(",")):
        name, _, rest = item.rpartition("=")
        kind, _, classes = rest.partition(":")
        if kind not in KINDS or (classes and not classes.isdigit()):
            raise DagcError(f"--tasks: {item!r} is not [NAME=]KIND[:CLASSES] with KIND one of {list(KINDS)}, "
                            "e.g. seg=segmentation:21,depth")
        tasks.append(TaskSpec(name or kind, kind, int(classes) if classes else None))
    return tuple(tasks)


def describe_network(path: str | os.PathLike, tasks: Sequence[TaskSpec] = DEFAULT_TASKS,
                     input_sizes: Sequence[tuple[int, ...]] = (), in_channels: int = 3) -> str:
    """Takes a network file, the tasks to put on it, the input sizes (H, W) to count FLOPs at
    (default: the file's ``input_size``) and the input channels. Returns the text `dagc inspect
    --network` prints. Raises SpecError for an invalid file (naming it and the field), DagcError
    for tasks or an input size that do not fit it."""
    network = Network.load(path)
    sizes = [tuple(s) for s in input_sizes] or ([network.input_size] if network.input_size else [])
    if not sizes:
        raise DagcError(f"{path} gives no input_size; give --input-size HxW to count FLOPs at")
    specs = []
    for size in sizes:
        try:
            specs.append(Spec.from_network(network, tasks, in_channels=in_channels, input_size=size))
        except SpecError as e:
            raise DagcError(f"{path} does not fit these tasks and this input: {e}") from None
    return "\n".join([*_structure(network, specs[0].hidden_edges(), path), "", *_costs(specs)])


def _structure(net: Network, edges: Sequence[tuple[int, int]], path: str | os.PathLike) -> list[str]:
    """Lines describing the states, the hidden ``edges`` (i, j) and the heads of ``net``."""
    lines = [f"network: {path} (name {net.name!r})" + (f": {net.description}" if net.description else ""),
             f"N = {net.n_states} hidden states, flow constant M = {net.flow_constant} (edges i -> j for "
             f"0 < j - i <= M; M = {max(1, net.n_states - 1)} is the complete DAG); indices 0-based",
             "", f"{'state':<8}{'channels':>9}{'stride':>8}   hidden edges in"]
    for j, s in enumerate(net.states):
        into = " ".join(str(i) for i, d in edges if d == j) or "-"
        lines.append(f"{j:<8}{s.channels:>9}{s.stride:>8}   {into}")
    lines.append(f"{'read-out':<8}{net.readout.channels:>9}{net.readout.stride:>8}   read-out edges from every state")
    lines += ["", f"edges: {len(edges)} hidden, {net.n_states} read-in (input -> each state), "
              f"{net.n_states} read-out (each state -> read-out): {len(edges) + 2 * net.n_states} per task; "
              f"downsampling {net.downsample.replace('_', ' ')}",
              f"heads: aspp {net.head_channels} channels, rates {list(net.aspp_rates)}, dropout {net.head_dropout:g}"
              + (f", refined at the input's resolution ({net.refine_channels} channels) " if net.refine_channels else " ")
              + "(dense tasks); linear (classification)"]
    return lines


def _costs(specs: Sequence[Spec]) -> list[str]:
    """Lines with the supernet's parameters (they do not depend on the input size) and, per input
    size, the FLOPs of one task's pass through every edge, of the heads and of the whole supernet."""
    first = specs[0]
    tasks = ", ".join(f"{t.name} ({t.kind}" + (f", {t.classes} classes" if t.classes else "") + f", {t.head} head)"
                      for t in first.tasks)
    every = [(b, None) for b in blocks(first)]
    backbone = network_costs(first, every, [])["params"]
    heads = sum(head_costs(first, t)["params"] for t in first.task_names)
    lines = [f"tasks: {tasks}; input channels: {first.in_channels}",
             f"parameters (unpruned supernet): {supernet_costs(first)['params']:,} = {backbone:,} in the edges "
             f"(read-in {_params(first, READ_IN):,}, hidden {_params(first, HIDDEN):,}, read-out "
             f"{_params(first, READ_OUT):,}) + {heads:,} in the heads", "",
             "MFLOPs per sample, before any training (the searched and reduced model computes less: dagc inspect "
             "CHECKPOINT)", f"{'input':<12}{'one task, every edge':>22}{'heads':>12}{'supernet, all tasks':>22}"]
    for spec in specs:
        one = network_costs(spec, [(b, None) for b in blocks(spec)], [])["flops"]
        head = sum(head_costs(spec, t)["flops"] for t in spec.task_names)
        size = "x".join(map(str, spec.input_size))
        lines.append(f"{size:<12}{one / 1e6:>22.2f}{head / 1e6:>12.2f}{supernet_costs(spec)['flops'] / 1e6:>22.2f}")
    return lines


def _params(spec: Spec, kind: str) -> int:
    """Parameters of the blocks of one kind (read-in, hidden or read-out), each once."""
    return network_costs(spec, [(b, None) for b in blocks(spec, kind)], [])["params"]

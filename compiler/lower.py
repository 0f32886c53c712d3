"""Lowering: a static PyTorch module that computes exactly a `Graph`, with no masks and no
multiplication by zero. Usable as the reference backend, for export, and for fine-tuning (its
weights are ordinary parameters). What each edge computes is its block's definition
(`dagc.blocks.BlockDef`, via `Graph.block`); the heads are the network's own modules."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dagc.blocks import head
from dagc.compiler.ir import INPUT_PREFIX, READOUT, Edge, Graph, check_graph, edge_tensors, slice_of
from dagc.trainer.block import LiveConv2d
from dagc.trainer.network import make_head, resize


def _name(e: Edge) -> str:
    """The module key of an edge's conv (and batch norm): one per folded conv, or per block and
    statistics."""
    return (e.folded or f"{e.block}.{e.stats}").replace(".", "_")


class LoweredModel(nn.Module):
    """The graph's computation for ``tasks`` (default: all), in node order.

    ``forward(*inputs)`` takes the graph's model inputs in order (each (B, C, H, W)) and returns
    one tensor per task, in ``self.tasks`` order. Raises CompileError for an invalid graph
    (`check_graph`) or a task it has no head for.
    """

    def __init__(self, graph: Graph, tasks: Sequence[str] | None = None) -> None:
        super().__init__()
        check_graph(graph)
        spec = graph.spec
        self.tasks = tuple(tasks) if tasks is not None else graph.tasks
        part = slice_of(graph, self.tasks)
        self.nodes = list(part.nodes)
        self.inputs = part.inputs
        heads = dict(graph.heads)
        self.head_src = [heads[t] for t in self.tasks]
        self.head_in = [INPUT_PREFIX + graph.task_input(t) for t in self.tasks]  # what a refining head reads
        self.blocks = {e.block: graph.block(e) for n in self.nodes for e in n.edges}
        self.convs = nn.ModuleDict()
        self.bns = nn.ModuleDict()
        for n in self.nodes:
            for e in n.edges:
                self._add_block(graph, e)
        self.heads = nn.ModuleDict()
        for t in self.tasks:
            hd, module = head(spec, t), make_head(spec.task(t), spec)
            skip = len(hd.prefix) + 1
            module.load_state_dict({k[skip:]: torch.from_numpy(graph.params[k].copy()) for k in hd.tensors})
            self.heads[t] = module
        self.size = tuple(spec.input_size)

    def _add_block(self, graph: Graph, e: Edge) -> None:
        key = _name(e)
        if key in self.convs:
            return
        b = self.blocks[e.block]
        tensors = [torch.from_numpy(graph.params[k].copy()) for k in edge_tensors(graph, e)]
        if e.folded:
            w, bias = tensors
        else:
            w, bias = tensors[0], None
        conv = LiveConv2d(b.cin, b.cout, b.conv.kernel, padding=b.conv.padding, bias=bias is not None)
        with torch.no_grad():
            conv.weight.copy_(w)
            if bias is not None:
                conv.bias.copy_(bias)
        self.convs[key] = conv
        if not e.folded:
            bn = nn.BatchNorm2d(b.cout, eps=b.bn_eps)
            bn.load_state_dict(dict(zip(("weight", "bias", "running_mean", "running_var"), tensors[1:])), strict=False)
            self.bns[key] = bn.eval()

    def _edge(self, e: Edge, x: Tensor) -> Tensor:
        b = self.blocks[e.block]
        key = _name(e)
        y = self.convs[key](resize(x, b.from_stride, b.to_stride))
        if not e.folded:
            y = self.bns[key](y)
        y = F.relu(y)
        if b.pool > 1:
            y = F.max_pool2d(y, b.pool)
        if not e.folded and e.scale != 1.0:
            y = y * e.scale
        return y

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        values: dict[str, Tensor] = {INPUT_PREFIX + name: x for name, x in zip(self.inputs, inputs, strict=True)}
        for n in self.nodes:
            total = None
            for e in n.edges:
                y = self._edge(e, values[e.src])
                total = y if total is None else total + y
            values[n.id] = total
        size = tuple(inputs[0].shape[-2:])
        return tuple(self.heads[t](values[src], size, values[img])
                     for t, src, img in zip(self.tasks, self.head_src, self.head_in, strict=True))

    def run(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Convenience: inputs by name in, outputs by task out."""
        return dict(zip(self.tasks, self(*(inputs[i] for i in self.inputs)), strict=True))


def lower(graph: Graph, tasks: Sequence[str] | None = None) -> LoweredModel:
    """A LoweredModel for the graph (all tasks, or only what ``tasks`` need), in eval mode.
    Raises CompileError for an invalid graph or an unknown task."""
    return LoweredModel(graph, tasks).eval()


__all__ = ["lower", "LoweredModel", "READOUT"]

"""Lowering: a static PyTorch module that computes exactly a `Graph`, with no masks and no
multiplication by zero. Usable as the reference backend, for export, and for fine-tuning (its
weights are ordinary parameters)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dagc.compiler.ir import INPUT_PREFIX, READOUT, Edge, Graph
from dagc.compiler.passes import BN_EPS
from dagc.trainer.network import make_head, resize


def _name(key: str) -> str:
    return key.replace(".", "_")


class LoweredModel(nn.Module):
    """The graph's computation for ``tasks`` (default: all), in node order.

    ``forward(*inputs)`` takes the graph's model inputs in order (each (B, C, H, W)) and returns
    one tensor per task, in ``self.tasks`` order.
    """

    def __init__(self, graph: Graph, tasks: Sequence[str] | None = None) -> None:
        super().__init__()
        spec = graph.spec
        self.tasks = tuple(tasks) if tasks is not None else graph.tasks
        heads = dict(graph.heads)
        needed = {heads[t] for t in self.tasks}
        for n in reversed(graph.nodes):
            if n.id in needed:
                needed.update(e.src for e in n.edges)
        self.nodes = [n for n in graph.nodes if n.id in needed]
        self.inputs = tuple(i for i in graph.inputs if INPUT_PREFIX + i in needed)
        self.head_src = [heads[t] for t in self.tasks]
        self.strides = [s.stride for s in spec.states]
        self.readout_stride = spec.readout.stride
        self.convs = nn.ModuleDict()
        self.bns = nn.ModuleDict()
        for n in self.nodes:
            for e in n.edges:
                self._add_block(graph, e)
        self.heads = nn.ModuleDict()
        for t in self.tasks:
            head = make_head(spec.task(t), spec)
            prefix = f"heads.{t}."
            head.load_state_dict({k[len(prefix):]: torch.from_numpy(v.copy()) for k, v in graph.params.items()
                                  if k.startswith(prefix)})
            self.heads[t] = head
        self.size = tuple(spec.input_size)

    def _add_block(self, graph: Graph, e: Edge) -> None:
        key = _name(e.folded or e.block)
        if key in self.convs:
            return
        p = graph.params
        w = p[f"fold.{e.folded}.weight"] if e.folded else p[f"{e.block}.conv.weight"]
        conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=w.shape[2] // 2, bias=bool(e.folded))
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(w))
            if e.folded:
                conv.bias.copy_(torch.from_numpy(p[f"fold.{e.folded}.bias"]))
        self.convs[key] = conv
        if not e.folded:
            bn = nn.BatchNorm2d(w.shape[0], eps=BN_EPS)
            bn.load_state_dict({k: torch.from_numpy(p[f"{e.block}.bn.{k}"].copy())
                                for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")})
            self.bns[key] = bn.eval()

    def _edge(self, e: Edge, x: Tensor) -> Tensor:
        kind, where = e.block.split(".", 1)
        key = _name(e.folded or e.block)
        if kind == "read_in":
            x = resize(x, 1, self.strides[int(where)])
        elif kind == "read_out":
            x = resize(x, self.strides[int(where)], self.readout_stride)
        y = self.convs[key](x)
        if not e.folded:
            y = self.bns[key](y)
        y = F.relu(y)
        if kind == "edges":
            i, j = (int(v) for v in where.split("_"))
            if self.strides[j] > self.strides[i]:
                y = F.max_pool2d(y, self.strides[j] // self.strides[i])
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
        return tuple(self.heads[t](values[src], size) for t, src in zip(self.tasks, self.head_src, strict=True))

    def run(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Convenience: inputs by name in, outputs by task out."""
        return dict(zip(self.tasks, self(*(inputs[i] for i in self.inputs)), strict=True))


def lower(graph: Graph, tasks: Sequence[str] | None = None) -> LoweredModel:
    """A LoweredModel for the graph (all tasks, or only what ``tasks`` need), in eval mode."""
    return LoweredModel(graph, tasks).eval()


__all__ = ["lower", "LoweredModel", "READOUT"]

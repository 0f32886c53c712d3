"""Accuracy-aware mixed precision for int8: the fewest nodes kept in fp32 that bring every task
of a model within ``--max-metric-drop`` (issue 22, part 4).

`choose_int8` quantizes a model whole first (``none``: only `dagc.compiler.quantize`'s speed
rules keep nodes in fp32). When a task's primary metric drops too much it

1. ranks the quantized weight ops that the failing tasks' outputs depend on (`upstream`: in the
   shared model a node only other tasks read cannot help) by *sensitivity* (`sensitivities`):
   the error each one's int8 form adds on its own, measured on the calibration batches. One ONNX
   Runtime run of a probe model computes, next to every fp32 conv output, the same conv fed
   through the int8 model's own Q/DQ of its input and its int8 weights (and bias), with the fp32
   input; the sensitivity is the output's relative noise energy sum((int8 - fp32)^2) /
   sum(fp32^2). Local error, not its effect through the rest of the network: the ranking only
   orders the candidates, the task metrics decide (step 2);
2. keeps the top k of that ranking in fp32 (``mixed``) for the fewest k whose held-out metrics
   pass, searched by doubling k from 1 and then bisecting (`keep_fewest`): at most
   `MAX_EVALUATIONS` accuracy checks per model, and at most `MAX_FP32_SHARE` of the model's
   quantized convs in fp32 (beyond that the int8 model would be little faster than fp32);
3. then tries the fixed fallbacks (`dagc.compiler.quantize.FALLBACKS`) as before.

The nodes kept in fp32 for accuracy (by the search or a fallback; not those of the speed rules)
are recorded in the manifest (`dagc.precisions.ModelCheck.fp32_nodes`) and printed by the compile
summary (`fp32_nodes_text`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from dagc.compiler.quantize import (
    _WEIGHT_OPS,
    FALLBACKS,
    INT8,
    Int8Settings,
    excluded_nodes,
    prepared,
    quantize_int8,
)
from dagc.runners import OrtRunner

__all__ = ["MIXED", "MAX_EVALUATIONS", "MAX_FP32_SHARE", "Attempt", "sensitivities", "upstream", "ranked_nodes",
           "keep_fewest",
           "choose_int8", "fp32_nodes_text"]

MIXED = "mixed"  # the fallback name recorded for a searched set of fp32 nodes
# Bounds of the search per model: doubling then bisecting over k needs about 2*log2(k) checks, so
# 10 reaches a few dozen nodes; each check is one quantization and one pass over the held-out split.
MAX_EVALUATIONS = 10
MAX_FP32_SHARE = 0.5


@dataclass(frozen=True)
class Attempt:
    """One int8 form of a model: its bytes, what the caller's check returned for it (``scored``),
    each task's relative drop, the fallback that made it and the nodes it keeps in fp32 for accuracy."""

    model: bytes
    scored: Any
    drop: Mapping[str, float]
    fallback: str
    fp32_nodes: tuple[str, ...] = ()

    @property
    def worst(self) -> float:
        return max(self.drop.values(), default=-math.inf)


def _probe(base: onnx.ModelProto, qdq: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """``base`` (the fp32 graph that was quantized) with, for every weight op of ``qdq`` whose inputs
    all come through DequantizeLinear (quantized activations and weights), a copy of that op and its
    Q/DQ nodes reading the fp32 tensors; returns the model and node -> (fp32 output, probe output)."""
    prod = {o: n for n in qdq.graph.node for o in n.output}
    init = {i.name: i for i in qdq.graph.initializer}
    known = {i.name for i in base.graph.input} | {o for n in base.graph.node for o in n.output}
    base_init = {i.name for i in base.graph.initializer}
    base_nodes = {n.name: n for n in base.graph.node}
    added, extra, probes = [], {}, {}
    for op in qdq.graph.node:
        if op.op_type not in _WEIGHT_OPS or op.name not in base_nodes:
            continue
        copies = []
        for t in filter(None, op.input):
            dq = prod.get(t)
            if dq is None or dq.op_type != "DequantizeLinear":
                break
            if dq.input[0] not in init:  # an activation: its QuantizeLinear must read an fp32 tensor
                q = prod.get(dq.input[0])
                if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in known:
                    break
                copies.append(q)
            copies.append(dq)
        else:
            tag = f"probe/{op.name}/"
            rename = {o: tag + o for n in (*copies, op) for o in n.output}
            for n in (*copies, op):
                c = onnx.NodeProto()
                c.CopyFrom(n)
                c.name = tag + n.name
                c.input[:] = [rename.get(t, t) for t in n.input]
                c.output[:] = [rename[o] for o in n.output]
                added.append(c)
                extra.update({t: init[t] for t in n.input if t in init and t not in base_init})
            probes[op.name] = (base_nodes[op.name].output[0], rename[op.output[0]])
    model = onnx.ModelProto()
    model.CopyFrom(base)
    model.graph.node.extend(added)
    model.graph.initializer.extend(extra.values())
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for pair in probes.values() for t in pair if t not in have)
    return model, probes


def sensitivities(model: bytes, qdq: bytes, feeds: Sequence[Mapping[str, np.ndarray]],
                  settings: Int8Settings = INT8) -> dict[str, float]:
    """Each quantized weight op of ``qdq`` (`quantize_int8` of fp32 ``model`` with ``settings``) ->
    the relative noise energy its int8 form adds to its output on ``feeds`` (module docstring)."""
    base, _ = prepared(model, settings)
    probe, pairs = _probe(base, onnx.load_from_string(qdq))
    if not pairs:
        return {}
    runner = OrtRunner(probe.SerializeToString(), threads=1, device="cpu")
    names = sorted({t for pair in pairs.values() for t in pair})
    noise, signal = dict.fromkeys(pairs, 0.0), dict.fromkeys(pairs, 0.0)
    for feed in feeds:
        out = runner.run({i: feed[i] for i in runner.inputs}, names)
        for node, (ref, got) in pairs.items():
            r = out[ref].astype(np.float64)
            noise[node] += float(np.sum((out[got] - r) ** 2))
            signal[node] += float(np.sum(r ** 2))
    return {n: noise[n] / max(signal[n], 1e-30) for n in pairs}


def upstream(model: onnx.ModelProto, outputs: Sequence[str]) -> set[str]:
    """The nodes that ``outputs`` (graph output names; dagc names each model output after its task)
    depend on: only these can bring a failing task back within the allowance."""
    prod = {o: n for n in model.graph.node for o in n.output}
    found: set[str] = set()
    stack = [t for t in outputs if t in prod]
    while stack:
        node = prod.get(stack.pop())
        if node is not None and node.name not in found:
            found.add(node.name)
            stack.extend(t for t in node.input if t)
    return found


def ranked_nodes(scores: Mapping[str, float]) -> list[str]:
    """The nodes, most sensitive first (ties by name, so the order is deterministic)."""
    return sorted(scores, key=lambda n: (-scores[n], n))


def keep_fewest(ranked: Sequence[str], attempt: Callable[[tuple[str, ...]], Attempt], max_drop: float,
                most: int, evaluations: int = MAX_EVALUATIONS) -> tuple[Attempt | None, list[Attempt]]:
    """The attempt keeping the fewest of ``ranked`` (a prefix, at most ``most``) in fp32 that passes
    ``max_drop``, or None; and every attempt made. k doubles from 1 until a pass, then bisects
    between the last failing and the first passing k. Bisection assumes that keeping more nodes in
    fp32 does not make a metric worse, which quantization noise does not guarantee: the k found
    passes, but a smaller one skipped over might too. At most ``evaluations`` calls of ``attempt``."""
    made: dict[int, Attempt] = {}

    def passes(k: int) -> bool:
        if k not in made:
            made[k] = attempt(tuple(ranked[:k]))
        return made[k].worst <= max_drop

    most = min(most, len(ranked))
    lo, hi, k = 0, None, 1  # lo: the largest k known to fail (0: the whole model, checked before)
    while hi is None and 0 < k <= most and len(made) < evaluations:
        if passes(k):
            hi = k
        else:
            lo, k = k, (min(2 * k, most) if k < most else 0)
    while hi is not None and hi - lo > 1 and len(made) < evaluations:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    return (None if hi is None else made[hi]), [made[k] for k in sorted(made)]


def choose_int8(model: bytes, feeds: Sequence[Mapping[str, np.ndarray]], settings: Int8Settings,
                check: Callable[[bytes], tuple[Any, Mapping[str, float]]],
                max_drop: float) -> tuple[Attempt, list[str]]:
    """The int8 form of fp32 ``model`` (serialized) to keep: the first of whole-model, the sensitivity
    search and the fixed fallbacks (module docstring) whose every task drops at most ``max_drop``,
    else the attempt with the smallest worst drop (the caller refuses it). ``check`` scores an int8
    model: (what it measured, task -> relative drop). Also returns what was tried, in order."""
    def attempt(fallback: str, exclude: tuple[str, ...]) -> Attempt:
        q = quantize_int8(model, feeds, settings=settings, exclude=exclude)
        scored, drop = check(q)
        return Attempt(q, scored, dict(drop), fallback, tuple(sorted(exclude)))

    made = [attempt(FALLBACKS[0], ())]
    tried = [FALLBACKS[0]]
    if made[0].worst <= max_drop:
        return made[0], tried
    failing = [t for t, d in made[0].drop.items() if d > max_drop]
    near = upstream(onnx.load_from_string(model), failing)
    scores = sensitivities(model, made[0].model, feeds, settings)
    ranked = ranked_nodes({n: s for n, s in scores.items() if n in near or not near})
    if ranked:
        found, searched = keep_fewest(ranked, lambda ex: attempt(MIXED, ex), max_drop,
                                      max(1, int(len(scores) * MAX_FP32_SHARE)))
        tried.append(f"{MIXED} ({len(searched)} checks up to {max(len(a.fp32_nodes) for a in searched)} of "
                     f"{len(ranked)} convs in fp32)")
        if found is not None:
            return found, tried
        made += searched
    proto = onnx.load_from_string(model)
    seen = {()}
    for fallback in FALLBACKS[1:]:
        exclude = tuple(excluded_nodes(proto, fallback))
        if exclude in seen:
            continue  # e.g. a model whose first convs are its heads' last convs
        seen.add(exclude)
        tried.append(fallback)
        made.append(attempt(fallback, exclude))
        if made[-1].worst <= max_drop:
            return made[-1], tried
    return min(made, key=lambda a: a.worst), tried


def fp32_nodes_text(accuracy) -> str:
    """The nodes each int8 model keeps in fp32 for accuracy, one line per model ('' when none)."""
    check = None if accuracy is None else accuracy.precisions.get("int8")
    lines = [f"int8 {c.file}: {len(c.fp32_nodes)} node(s) kept in fp32 ({c.fallback}): {', '.join(c.fp32_nodes)}"
             for c in (check.models.values() if check is not None else ()) if c.fp32_nodes]
    return "\n".join(lines)

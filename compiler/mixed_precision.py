"""Accuracy-aware mixed precision for int8: the fewest nodes kept in fp32 that bring every task
of a model within ``--max-metric-drop`` (issue 22, part 4).

`choose_int8` quantizes a model whole first (``none``: only `dagc.compiler.quantize`'s speed
rules keep nodes in fp32). When a task's primary metric drops too much it

1. ranks the quantized weight ops that the failing tasks' outputs depend on (`upstream`: in the
   shared model a node only other tasks read cannot help) by *sensitivity* (`sensitivities`): for
   each, the int8 model with that op alone back in fp32 (`_reverted`) runs on the calibration
   batches, and the relative error of the failing tasks' outputs against the fp32 model is what
   is left; the op leaving the least comes first. One op at a time, not their combinations: the
   ranking only orders the candidates, the task metrics decide (step 2);
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
    excluded_nodes,
    prepared,
    quantize_int8,
)
from dagc.precision_table import TABLE
from dagc.precisions import Calibration
from dagc.runners import OrtRunner

__all__ = ["MIXED", "MAX_EVALUATIONS", "MAX_FP32_SHARE", "Attempt", "sensitivities", "upstream", "ranked_nodes",
           "keep_fewest", "choose_int8", "fp32_nodes_text"]

MIXED = "mixed"  # the fallback name recorded for a searched set of fp32 nodes
# Bounds of the search per model: doubling then bisecting over k needs about 2*log2(k) checks, so
# 10 reaches a few dozen nodes; each check is one quantization and one pass over the held-out split.
MAX_EVALUATIONS = 10
MAX_FP32_SHARE = 0.5


@dataclass(frozen=True)
class Attempt:
    """One reduced form of a model (here int8): its bytes, what the caller's check returned for it
    (``scored``), each task's relative drop, the fallback that made it (None: a precision without
    fallbacks, `dagc.compiler.precision`) and the nodes it keeps in fp32 for accuracy."""

    model: bytes
    scored: Any
    drop: Mapping[str, float]
    fallback: str | None
    fp32_nodes: tuple[str, ...] = ()

    @property
    def worst(self) -> float:
        return max(self.drop.values(), default=-math.inf)


def _reverted(qdq: onnx.ModelProto, name: str, base: onnx.ModelProto) -> onnx.ModelProto | None:
    """``qdq`` with weight op ``name`` in fp32, as ``nodes_to_exclude`` would leave it: reading the
    float tensor its input QuantizeLinear reads and ``base``'s (the fp32 graph's) weights and bias;
    its output keeps its Q/DQ for the quantized ops after it. None when it is not quantized."""
    prod = {o: n for n in qdq.graph.node for o in n.output}
    base_init = {i.name: i for i in base.graph.initializer}
    op = next(n for n in qdq.graph.node if n.name == name)
    fp32 = next(n for n in base.graph.node if n.name == name)
    inputs, weights = list(op.input), []
    for k, t in enumerate(op.input):
        dq = prod.get(t)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = prod.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            inputs[k] = q.input[0]
        elif fp32.input[k] in base_init:  # renamed: the int8 graph's DequantizeLinear may output that name
            w = onnx.TensorProto()
            w.CopyFrom(base_init[fp32.input[k]])
            w.name = inputs[k] = f"{w.name}/fp32"
            weights.append(w)
    if inputs == list(op.input):
        return None
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    next(n for n in model.graph.node if n.name == name).input[:] = inputs
    model.graph.initializer.extend(weights)
    return model


def _relative_error(runner: OrtRunner, feeds, outputs: Sequence[str], refs: Sequence[Mapping]) -> float:
    """Sum over ``outputs`` of sum((y - ref)^2) / sum(ref^2) on ``feeds`` (each output weighs alike)."""
    noise, signal = dict.fromkeys(outputs, 0.0), dict.fromkeys(outputs, 0.0)
    for feed, ref in zip(feeds, refs):
        out = runner.run({i: feed[i] for i in runner.inputs}, list(outputs))
        for t in outputs:
            r = ref[t].astype(np.float64)
            noise[t] += float(np.sum((out[t] - r) ** 2))
            signal[t] += float(np.sum(r ** 2))
    return sum(noise[t] / max(signal[t], 1e-30) for t in outputs)


def sensitivities(model: bytes, qdq: bytes, feeds: Sequence[Mapping[str, np.ndarray]], outputs: Sequence[str],
                  settings: Calibration = INT8, candidates: Sequence[str] | None = None) -> dict[str, float]:
    """Each quantized weight op of ``qdq`` (`quantize_int8` of fp32 ``model`` with ``settings``;
    only those in ``candidates`` when given) -> the relative error of ``outputs`` against the fp32
    model on ``feeds`` that is left when that op alone runs in fp32 (`_reverted`): the lower, the
    more keeping it in fp32 recovers. One ONNX Runtime session and pass over ``feeds`` per op."""
    base, _ = prepared(model, settings)
    q = onnx.load_from_string(qdq)
    fp32 = OrtRunner(model, threads=1, device="cpu")
    refs = [fp32.run({i: f[i] for i in fp32.inputs}, list(outputs)) for f in feeds]
    names = [n.name for n in q.graph.node if n.op_type in _WEIGHT_OPS and (candidates is None or n.name in candidates)]
    scores = {}
    for name in names:
        reverted = _reverted(q, name, base)
        if reverted is not None:
            runner = OrtRunner(reverted.SerializeToString(), threads=1, device="cpu")
            scores[name] = _relative_error(runner, feeds, outputs, refs)
    return scores


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
    """The nodes whose fp32 form leaves the least error first (ties by name: a deterministic order)."""
    return sorted(scores, key=lambda n: (scores[n], n))


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


def choose_int8(model: bytes, feeds: Sequence[Mapping[str, np.ndarray]], settings: Calibration,
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
    proto = onnx.load_from_string(model)
    failing = [t for t, d in made[0].drop.items() if d > max_drop and t in {o.name for o in proto.graph.output}]
    failing = failing or [o.name for o in proto.graph.output]
    ranked = ranked_nodes(sensitivities(model, made[0].model, feeds, failing, settings, upstream(proto, failing)))
    q = onnx.load_from_string(made[0].model)
    weights = {i.name for i in q.graph.initializer}  # a quantized op reads DequantizeLinear's output
    quantized = [n for n in q.graph.node if n.op_type in _WEIGHT_OPS and n.input[1] not in weights]
    if ranked:
        found, searched = keep_fewest(ranked, lambda ex: attempt(MIXED, ex), max_drop,
                                      max(1, int(len(quantized) * MAX_FP32_SHARE)), MAX_EVALUATIONS)
        most = max((len(a.fp32_nodes) for a in searched), default=0)
        tried.append(f"{MIXED} ({len(searched)} checks up to {most} of {len(ranked)} convs in fp32)")
        if found is not None:
            return found, tried
        made += searched
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
    """The nodes each reduced-precision model keeps in fp32 for accuracy, one line per model ('' when
    none). Only the precisions' own checks (`dagc.precision_table.TABLE`): a check of the same files
    on another backend (``int8-openvino``) keeps the same nodes."""
    checks = {} if accuracy is None else accuracy.reduced()
    lines = [f"{p} {c.file}: {len(c.fp32_nodes)} node(s) kept in fp32 ({c.fallback}): {', '.join(c.fp32_nodes)}"
             for p, check in checks.items() if p in TABLE for c in check.models.values() if c.fp32_nodes]
    return "\n".join(lines)

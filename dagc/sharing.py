"""Which state instances the compiled shared model computes once for several tasks, read off the
tasks' binary masks alone, so that the trainer (which may not import the compiler) can price the
shared model a budget is for (issue 21, ``--budget-scope shared``).

The compiler's value numbering (`dagc.compiler.passes.share`) merges the instances of a state in
several tasks when their edges apply the same blocks, with the same scales, to the same (already
merged) sources, and normalise with batch-norm running statistics that are equal value for value.
The scale is 1/In, so the same blocks give the same scales. The statistics are each task's own
(issue 26) and are re-estimated once the structure is final (`dagc.trainer.recalibrate`), task
after task over the same batches; so

* with one input for all tasks, a block whose input is the same instance gets bit-identical
  statistics in every task that applies it, and the rule is structural: tasks share the instance of
  state j exactly when they apply the same blocks into j and share the instance of each of their
  hidden sources; likewise the read-out instance (each task keeps its own head);
* with an input per task, the read-ins read different images, so no instance is ever shared.

This is exact for statistics re-estimated as training does by default (``stats_batches`` > 0;
tests/test_budget_shared.py checks it against the compiler's optimised graph). With fine-tuning's
running averages kept instead (``stats_batches`` 0) nothing makes two tasks' statistics equal, and
the compiler may share less than this says.

The masks must be closed (`dagc.trainer.topology.close_masks`, as every reduced checkpoint's are):
then the compiler's dead-state elimination and early exit drop nothing, and every active block's
source state has an instance in its task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dagc.blocks import READ_OUT, blocks, parse_key
from dagc.errors import SpecError
from dagc.spec import Spec

__all__ = ["READOUT", "Instance", "instances", "shared_blocks"]

READOUT = -1  # the read-out state's number, as the compiler's IR writes it


@dataclass(frozen=True)
class Instance:
    """One state instance of the shared model: ``state`` (a hidden state, or `READOUT`), the
    ``tasks`` it serves (spec order) and the ``blocks`` (names) whose sum it is."""

    state: int
    tasks: tuple[str, ...]
    blocks: tuple[str, ...]


def instances(spec: Spec, gamma, alpha, beta) -> tuple[Instance, ...]:
    """The state instances of the compiled shared model of stacked closed 0/1 masks (K, N, N),
    (K, N), (K, N), in state order, read-out last (see the module docstring for the rule).
    Raises SpecError for masks of the wrong shapes or not closed (an active block whose source
    state the task does not compute)."""
    k, n = spec.n_tasks, spec.n_states
    masks = tuple(np.asarray(m) != 0 for m in (gamma, alpha, beta))
    if [m.shape for m in masks] != [(k, n, n), (k, n), (k, n)]:
        raise SpecError(f"masks must be (K, N, N), (K, N), (K, N) = {(k, n, n)}, {(k, n)}, {(k, n)}; got "
                        f"{[m.shape for m in masks]}")
    into: dict[int, list] = {j: [] for j in (*range(n), READOUT)}
    for b in blocks(spec):
        into[READOUT if b.kind == READ_OUT else b.dst].append(b)
    found: dict[tuple[int, int], int] = {}  # (task index, state) -> index of its instance
    out: list[Instance] = []
    for state in (*range(n), READOUT):
        groups: dict[tuple, list[int]] = {}
        for t in range(k):
            active = [b for b in into[state] if b.mask(*masks)[t]]
            if not active:
                continue
            missing = [b.key for b in active if b.src is not None and (t, b.src) not in found]
            if missing:
                raise SpecError(f"task {spec.task_names[t]!r}'s masks are not closed: {missing[0]} reads state "
                                f"{parse_key(missing[0]).src}, which the task does not compute")
            # What the instance's value depends on: its blocks and their sources' instances (a read-in's
            # source: the one shared image, or the task's own).
            sources = tuple(found[t, b.src] if b.src is not None else (None if spec.shared_input else t)
                            for b in active)
            groups.setdefault((tuple(b.key for b in active), sources), []).append(t)
        for (keys, _), ts in groups.items():
            for t in ts:
                found[t, state] = len(out)
            out.append(Instance(state, tuple(spec.task_names[t] for t in ts), keys))
    return tuple(out)


def shared_blocks(spec: Spec, gamma, alpha, beta) -> list[str]:
    """The block applications (names, one per application) of the compiled shared model of closed
    masks: each instance's blocks once. Its cost is these plus every head and one call
    (`dagc.cost_table.CostTable.predicted`). Raises as `instances`."""
    return [b for inst in instances(spec, gamma, alpha, beta) for b in inst.blocks]


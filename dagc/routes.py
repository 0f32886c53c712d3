"""Task-subset routes: which models of an artifact cover a set of tasks most cheaply.

The one rule, used by the compiler (which records the routes in the manifest), by the manifest
reader (which computes them for version-1 manifests, written before routes were recorded) and,
through the manifest, by the runtime, the Triton export and the C++ example:

    cover a task subset with one model that computes all of its tasks and reads only their
    inputs, or with each task's own (single-task) model; minimise (FLOPs per sample, number of
    models, the model names).

One task therefore runs its per-task model and all tasks the shared model; a model reading the
input of a task outside the subset (the shared model when each task has its own input) is never
chosen for it, since the caller would have no image to give it.

Which subsets are recorded (`recorded_subsets`): every non-empty subset when the spec has at most
`ROUTE_MAX_TASKS` tasks (2^K - 1 of them, 255 at the cap); beyond that each task alone and all
tasks, and a reader covers another subset with `cheapest_cover` when it is asked for.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

__all__ = ["ROUTE_MAX_TASKS", "CostedModel", "recorded_subsets", "cheapest_cover", "compute_routes", "route_key",
           "parse_route_key"]

ROUTE_MAX_TASKS = 8


class CostedModel(Protocol):
    """What the rule needs of a model (`dagc.manifest.ModelInfo` is one)."""

    name: str
    format: str
    tasks: tuple[str, ...]
    inputs: tuple[str, ...]

    @property
    def flops(self) -> int: ...


def route_key(subset: Sequence[str]) -> str:
    """The manifest's key of a subset: its task names (spec order) joined by ``,`` (task names
    hold only letters, digits, ``_`` and ``-``)."""
    return ",".join(subset)


def parse_route_key(key: str) -> tuple[str, ...]:
    """The subset a `route_key` names."""
    return tuple(key.split(","))


def recorded_subsets(task_names: Sequence[str]) -> list[tuple[str, ...]]:
    """The subsets (tuples in spec order) whose routes a manifest records; see the module docstring."""
    names = tuple(task_names)
    if len(names) > ROUTE_MAX_TASKS:
        return [(t,) for t in names] + [names]
    return [s for k in range(1, len(names) + 1) for s in itertools.combinations(names, k)]


def cheapest_cover(subset: Sequence[str], models: Iterable[CostedModel], task_order: Sequence[str],
                   task_inputs: Mapping[str, str]) -> tuple[str, ...] | None:
    """The rule of the module docstring.

    Takes the wanted tasks, the candidate models (one format), every task name in spec order and
    task -> the input it reads. Returns the chosen model names (per-task models in spec order),
    or None when no model, and not every task's own model, is there.
    """
    want = frozenset(subset)
    have_inputs = {task_inputs[t] for t in want}
    models = list(models)
    options: list[tuple[int, int, list[str]]] = []
    for m in models:
        if want <= set(m.tasks) and set(m.inputs) <= have_inputs:
            options.append((m.flops, 1, [m.name]))
    single = {t: [m for m in models if tuple(m.tasks) == (t,)] for t in want}
    if all(single.values()):
        own = [min(single[t], key=lambda m: (m.flops, m.name)) for t in task_order if t in want]
        options.append((sum(m.flops for m in own), len(own), [m.name for m in own]))
    if not options:
        return None
    return tuple(min(options)[2])


def compute_routes(task_names: Sequence[str], task_inputs: Mapping[str, str],
                   models: Iterable[CostedModel]) -> dict[str, dict[tuple[str, ...], tuple[str, ...]]]:
    """Routes of every `recorded_subsets` subset, per model format present among ``models``:
    format -> subset -> model names. A subset that no model of a format covers gets no route."""
    by_format: dict[str, list[CostedModel]] = {}
    for m in models:
        by_format.setdefault(m.format, []).append(m)
    routes: dict[str, dict[tuple[str, ...], tuple[str, ...]]] = {}
    for fmt, group in sorted(by_format.items()):
        found = {s: cheapest_cover(s, group, task_names, task_inputs) for s in recorded_subsets(task_names)}
        routes[fmt] = {s: r for s, r in found.items() if r is not None}
    return routes

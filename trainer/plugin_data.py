"""The checks a plug-in dataset passes where it enters dagc: its `Dataset` record when it is
registered (`check_dataset`) and what its loader returns (`check_loaded`), so that a broken
plug-in ends in one line naming it, before anything is written."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from dagc.errors import DataError, PluginError, SpecError
from dagc.spec import PRESETS, TaskSpec, check_task
from dagc.trainer.data import IGNORE_INDEX, Dataset, LoadOptions, MultiTaskData, Split
from dagc.trainer.kinds import training_of
from dagc.trainer.recipes import RECIPES

__all__ = ["check_dataset", "check_loaded"]


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_dataset(ds: object, where: str) -> Dataset:
    """Returns ``ds`` if it is a well-formed `Dataset` record; raises PluginError naming ``where``
    and the field otherwise."""
    if not isinstance(ds, Dataset):
        raise PluginError(f"{where}: expected a dagc.trainer.data.Dataset, got {type(ds).__name__}")
    name = ds.name
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise PluginError(f"{where}: name must be letters, digits, '_' or '-', got {name!r}")
    if not callable(ds.load):
        raise PluginError(f"{where}: load must be a function LoadOptions -> MultiTaskData, got {ds.load!r}")
    if ds.preset not in PRESETS:
        raise PluginError(f"{where}: preset must be one of {list(PRESETS)}, got {ds.preset!r}")
    if ds.recipe not in RECIPES:
        raise PluginError(f"{where}: recipe must be one of {list(RECIPES)}, got {ds.recipe!r}")
    if not isinstance(ds.on_disk, bool):
        raise PluginError(f"{where}: on_disk must be True or False, got {ds.on_disk!r}")
    if not isinstance(ds.tasks, tuple) or not all(isinstance(t, str) and t for t in ds.tasks):
        raise PluginError(f"{where}: tasks must be a tuple of task names, got {ds.tasks!r}")
    for field in ("find_tasks", "choose_preset"):
        if getattr(ds, field) is not None and not callable(getattr(ds, field)):
            raise PluginError(f"{where}: {field} must be None or a function, got {getattr(ds, field)!r}")
    if not ds.tasks and ds.find_tasks is None:
        raise PluginError(f"{where}: no tasks; give tasks (names) or find_tasks")
    if not _count(ds.min_size):
        raise PluginError(f"{where}: min_size must be an integer >= 1, got {ds.min_size!r}")
    size = ds.input_size
    if size is not None and not (isinstance(size, tuple) and len(size) == 2 and all(_count(v) for v in size)):
        raise PluginError(f"{where}: input_size must be None or a pair of integers (H, W), got {size!r}")
    for field in ("n_train", "n_test"):
        if getattr(ds, field) is not None and not _count(getattr(ds, field)):
            raise PluginError(f"{where}: {field} must be None or an integer >= 1, got {getattr(ds, field)!r}")
    return ds


def check_loaded(data: object, opts: LoadOptions, where: str) -> MultiTaskData:
    """Returns what a plug-in loader returned if it is a `MultiTaskData` that fits the request and
    dagc's array conventions (`dagc.trainer.data`); raises DataError naming ``where`` and what is
    wrong otherwise."""
    if not isinstance(data, MultiTaskData):
        raise DataError(f"{where}: the loader returned {type(data).__name__}, not a dagc.trainer.data.MultiTaskData")
    tasks = data.tasks
    if not isinstance(tasks, tuple) or not all(isinstance(t, TaskSpec) for t in tasks):
        raise DataError(f"{where}: MultiTaskData.tasks must be a tuple of dagc.spec.TaskSpec, got {tasks!r}")
    if tuple(t.name for t in tasks) != opts.tasks:
        raise DataError(f"{where}: the loader returned tasks {[t.name for t in tasks]}, but "
                        f"{list(opts.tasks)} were asked for (LoadOptions.tasks, in that order)")
    for t in tasks:
        training_of(t.kind, f"{where}: task {t.name!r}")  # loads the kind plug-ins; SpecError if unknown
    # A task made before its plug-in kind was registered gets the kind's head now.
    tasks = tuple(replace(t) if t.head is None else t for t in tasks)
    data = replace(data, tasks=tasks)
    for t in tasks:
        try:
            check_task(t, f"{where}: task {t.name!r}")
        except SpecError as e:
            raise DataError(str(e)) from None
    if not _count(data.in_channels):
        raise DataError(f"{where}: in_channels must be an integer >= 1, got {data.in_channels!r}")
    size = tuple(data.input_size) if isinstance(data.input_size, (tuple, list)) else None
    if size is None or len(size) != 2 or not all(_count(v) for v in size):
        raise DataError(f"{where}: input_size must be a pair of integers (H, W), got {data.input_size!r}")
    if not isinstance(data.shared_input, bool):
        raise DataError(f"{where}: shared_input must be True or False, got {data.shared_input!r}")
    if not isinstance(data.preprocessing, dict):
        raise DataError(f"{where}: preprocessing must be a dict, got {type(data.preprocessing).__name__}")
    for split_name in ("train", "test"):
        _check_split(data, getattr(data, split_name), f"{where}: {split_name} split", size)
    return data


def _check_split(data: MultiTaskData, split: object, where: str, size: tuple[int, int]) -> None:
    if not isinstance(split, Split):
        raise DataError(f"{where}: expected a dagc.trainer.data.Split, got {type(split).__name__}")
    if not isinstance(split.targets, dict) or set(split.targets) != {t.name for t in data.tasks}:
        got = sorted(split.targets) if isinstance(split.targets, dict) else type(split.targets).__name__
        raise DataError(f"{where}: targets must be a dict with one array per task "
                        f"{[t.name for t in data.tasks]}, got {got}")
    if data.shared_input != isinstance(split.inputs, np.ndarray):
        raise DataError(f"{where}: inputs must be one array (shared_input) or a dict task -> array (per-task "
                        f"inputs), as shared_input={data.shared_input} says")
    want = (data.in_channels, *size)
    for t in data.tasks:
        x = split.inputs if data.shared_input else split.inputs.get(t.name)
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4 or x.shape[1:] != want:
            got = (x.dtype, x.shape) if isinstance(x, np.ndarray) else type(x).__name__
            raise DataError(f"{where}: inputs of task {t.name!r} must be float32 (n, {', '.join(map(str, want))}), "
                            f"got {got}")
        if len(x) == 0 or not np.isfinite(x).all():
            raise DataError(f"{where}: inputs of task {t.name!r} must be non-empty and finite")
        _check_target(t, split.targets[t.name], len(x), size, where)


def _check_target(t: TaskSpec, y: object, n: int, size: tuple[int, int], where: str) -> None:
    if t.labelled:
        shape, what = ((n, *size) if t.dense else (n,)), "integer labels"
    else:
        shape, what = ((n, t.out_channels, *size) if t.dense else (n, t.out_channels)), "float32 values"
    ok = isinstance(y, np.ndarray) and y.shape == shape
    if ok:
        ok = np.issubdtype(y.dtype, np.integer) if t.labelled else y.dtype == np.float32
    if not ok:
        got = (str(y.dtype), y.shape) if isinstance(y, np.ndarray) else type(y).__name__
        raise DataError(f"{where}: targets of task {t.name!r} ({t.kind}) must be {what} of shape {shape}, got {got}")
    if t.labelled:
        bad = (y != IGNORE_INDEX) & ((y < 0) | (y >= t.classes))
        if bad.any():
            raise DataError(f"{where}: labels of task {t.name!r} must be in 0..{t.classes - 1} or {IGNORE_INDEX}")
    elif not np.isfinite(y).all():
        raise DataError(f"{where}: targets of task {t.name!r} hold NaN or infinite values")

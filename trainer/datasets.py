"""The datasets a run can train on, registered in one place: `REGISTRY`.

Built in (nothing is downloaded: generated or bundled), standing in for the paper's benchmarks:

    synthetic       rendered scenes, 4 dense tasks on one image     `dagc.trainer.synthetic`
    digits          scikit-learn's digits, 3 classification tasks   `dagc.trainer.digits`
    multidigits     two of those digits per image, 2 classifications
                    and a segmentation on one input                 `dagc.trainer.multidigits`

Read from a directory the user has (``root``, ``--data-root``), the paper's real benchmarks:

    nyuv2, cityscapes, cityscapes19, omniglot                        `dagc.trainer.readers`
    pascal-context                                                   `dagc.trainer.pascal`

Read from a directory the user writes (FORMAT.md, "Folder datasets"), the user's own data:

    folder          tasks declared in ROOT/dataset.json              `dagc.trainer.folder`

Each module describes its dataset and exports its `Dataset` record (name, loader, tasks, default
preset, input size and sample counts); adding a dataset is writing its module and naming its
record in `REGISTRY`. Every dataset gives the same `MultiTaskData` (`dagc.trainer.data`
describes the arrays).

A plug-in adds a dataset without editing dagc: `register_dataset`, or an entry point of group
``dagc.datasets`` (`dagc.trainer.plugins`), loaded (with the kinds of group ``dagc.kinds``) the
first time the registry is consulted: `dataset`, `registry`, `task_names`, `load_dataset`. What a
plug-in's loader returns is checked (`dagc.trainer.plugin_data.check_loaded`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from dagc.errors import DagcError, DataError, PluginError
from dagc.trainer import digits, folder, kinds, multidigits, pascal, plugins, readers, synthetic
from dagc.trainer.data import (
    Dataset,
    LoadOptions,
    MultiTaskData,
    Split,
    check_count,
    check_root,
    check_seed,
    check_size,
    check_tasks,
)
from dagc.trainer.plugin_data import check_dataset, check_loaded

REGISTRY: dict[str, Dataset] = {d.name: d for d in (
    synthetic.DATASET, digits.DATASET, multidigits.DATASET, *readers.DATASETS, pascal.DATASET, folder.DATASET)}
DATASETS = tuple(REGISTRY)
# Read from a directory the user has: the paper's real benchmarks.
ON_DISK = tuple(name for name, d in REGISTRY.items() if d.on_disk)
BUILTIN = dict(REGISTRY)
# Where each registered plug-in dataset came from (an entry point, or register_dataset).
PLUGINS: dict[str, str] = {}
_loaded = False

__all__ = ["DATASETS", "ON_DISK", "REGISTRY", "Dataset", "MultiTaskData", "Split", "dataset", "load_dataset",
           "task_names", "register_dataset", "registry", "load_plugins"]


def register_dataset(ds: Dataset, *, where: str = "register_dataset") -> None:
    """Registers a user's dataset under ``ds.name`` (then ``dagc train --dataset NAME`` and
    `load_dataset` use it). Registering an equal record again does nothing. Raises PluginError
    (naming ``where``) for a malformed record or a name already registered (a built-in one
    included) with another record."""
    check_dataset(ds, where)
    known = REGISTRY.get(ds.name)
    if known is not None and known != ds:
        what = "the built-in" if ds.name in BUILTIN else "an already registered"
        raise PluginError(f"{where}: dataset {ds.name!r} clashes with {what} dataset of that name; choose another name")
    REGISTRY[ds.name] = ds
    if ds.name not in BUILTIN:
        PLUGINS[ds.name] = where


def load_plugins() -> None:
    """Registers the kinds (group ``dagc.kinds``) and datasets (group ``dagc.datasets``) of the
    installed packages' entry points, once. Raises PluginError for a broken one."""
    global _loaded
    if _loaded:
        return
    kinds.load_plugins()
    for name, where, obj in plugins.entry_point_objects(plugins.DATASET_GROUP):
        if isinstance(obj, Dataset) and obj.name != name:
            raise PluginError(f"{where}: the entry point's name must be the dataset's, got dataset {obj.name!r}")
        register_dataset(obj, where=where)
    _loaded = True


def registry() -> dict[str, Dataset]:
    """Every registered dataset, name -> `Dataset` (plug-ins loaded first)."""
    load_plugins()
    return REGISTRY


def dataset(name: str) -> Dataset:
    """Takes a dataset name; returns its registered `Dataset` (plug-ins loaded first). Raises
    DataError (a ValueError) for an unknown name, PluginError for a broken plug-in."""
    if name not in registry():
        raise DataError(f"unknown dataset {name!r}; choose one of {list(REGISTRY)} (or install a plug-in with an "
                        f"entry point of group {plugins.DATASET_GROUP!r})")
    return REGISTRY[name]


def task_names(name: str, root: str | os.PathLike | None = None) -> tuple[str, ...]:
    """Takes a dataset name and, for a dataset whose tasks are found on disk (``omniglot``: its
    alphabets), its root directory; returns every task it offers, in the default order.

    Raises DataError (a ValueError) for an unknown dataset, or omniglot without a readable root.
    """
    ds = dataset(name)
    return ds.tasks if ds.find_tasks is None else ds.find_tasks(root)


def load_dataset(name: str, *, tasks: Sequence[str] | None = None, seed: int = 0,
                 input_size: tuple[int, int] | None = None, n_train: int | None = None,
                 n_test: int | None = None, root: str | os.PathLike | None = None) -> MultiTaskData:
    """Takes a dataset name and options; returns the dataset with the selected tasks.

    ``tasks`` (default: all, see `task_names`) picks and orders the tasks; the arrays do not
    depend on which tasks are picked. ``seed`` fixes every random choice. ``input_size`` is
    (H, W) (default: the dataset's, e.g. (32, 32) for synthetic, (8, 8) for digits, the files'
    own for the NumPy releases). ``n_train`` / ``n_test`` are sample counts (synthetic: scenes,
    default 2048 / 512; digits and Omniglot: a cap per task; other on-disk datasets: the first n
    samples of a split; default all). ``root`` is the directory of an on-disk dataset (`ON_DISK`)
    and must be None for the built-in ones.

    Raises DataError (a ValueError) for an unknown dataset or task, or an invalid option; for
    on-disk datasets also for a missing or malformed file (the message names it).
    """
    ds = dataset(name)
    if ds.on_disk and root is None:
        raise DataError(f"dataset {name!r} is read from disk; give its root directory (--data-root DIR)")
    if not ds.on_disk and root is not None:
        raise DataError(f"dataset {name!r} is built in and reads no directory; drop root (--data-root)")
    base = check_root(name, root) if root is not None else None
    opts = LoadOptions(root=base, seed=check_seed(seed), size=check_size(ds, input_size),
                       n_train=check_count("n_train", n_train, ds.n_train),
                       n_test=check_count("n_test", n_test, ds.n_test),
                       tasks=check_tasks(name, tasks, task_names(name, base)))
    if name not in PLUGINS:
        return ds.load(opts)
    where = f"dataset {name!r} ({PLUGINS[name]})"
    try:
        data = ds.load(opts)
    except DagcError:
        raise
    except Exception as e:  # a plug-in's bug: one line naming it, not a traceback
        raise DataError(f"{where}: its loader raised {type(e).__name__}: {' '.join(str(e).split())}") from None
    return check_loaded(data, opts, where)

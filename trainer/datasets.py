"""The datasets a run can train on, registered in one place: `REGISTRY`.

Built in (nothing is downloaded: generated or bundled), standing in for the paper's benchmarks:

    synthetic       rendered scenes, 4 dense tasks on one image     `dagc.trainer.synthetic`
    digits          scikit-learn's digits, 3 classification tasks   `dagc.trainer.digits`

Read from a directory the user has (``root``, ``--data-root``), the paper's real benchmarks:

    nyuv2, cityscapes, cityscapes19, omniglot                        `dagc.trainer.readers`
    pascal-context                                                   `dagc.trainer.pascal`

Read from a directory the user writes (FORMAT.md, "Folder datasets"), the user's own data:

    folder          tasks declared in ROOT/dataset.json              `dagc.trainer.folder`

Each module describes its dataset and exports its `Dataset` record (name, loader, tasks, default
preset, input size and sample counts); adding a dataset is writing its module and naming its
record in `REGISTRY`. Every dataset gives the same `MultiTaskData` (`dagc.trainer.data`
describes the arrays).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from dagc.errors import DataError
from dagc.trainer import digits, folder, pascal, readers, synthetic
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

REGISTRY: dict[str, Dataset] = {d.name: d for d in (
    synthetic.DATASET, digits.DATASET, *readers.DATASETS, pascal.DATASET, folder.DATASET)}
DATASETS = tuple(REGISTRY)
# Read from a directory the user has: the paper's real benchmarks.
ON_DISK = tuple(name for name, d in REGISTRY.items() if d.on_disk)

__all__ = ["DATASETS", "ON_DISK", "REGISTRY", "Dataset", "MultiTaskData", "Split", "dataset", "load_dataset",
           "task_names"]


def dataset(name: str) -> Dataset:
    """Takes a dataset name; returns its registered `Dataset`. Raises DataError (a ValueError)
    for an unknown name."""
    if name not in REGISTRY:
        raise DataError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
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
    return ds.load(opts)

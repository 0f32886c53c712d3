"""What every dataset is made of: its splits, the record a dataset registers with
(`dagc.trainer.datasets` holds the registry), the options a loader gets, and the checks and the
input standardisation that every loader shares.

Conventions of every dataset: inputs float32 (n, C, H, W), standardised per channel with the
train split's mean / std (the statistics are in ``preprocessing``); segmentation targets int64
(n, H, W) with ``IGNORE_INDEX`` for unlabelled pixels; depth, edge and saliency float32
(n, 1, H, W); normals float32 (n, 3, H, W); classification int64 (n,). Missing depth is 0 and a
missing normal the zero vector (the losses and metrics skip them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dagc.errors import DataError
from dagc.preprocessing import Preprocessing
from dagc.spec import TaskSpec

# Label value that segmentation losses and metrics skip (unlabelled pixels in real datasets).
IGNORE_INDEX = -1


@dataclass(frozen=True)
class Split:
    """Inputs and per-task targets of one split.

    ``inputs`` is one float32 array (n, C, H, W) shared by all tasks when the dataset has a
    shared input, else a dict task -> (n_k, C, H, W); ``targets[task]`` is aligned with the
    task's inputs.
    """

    inputs: np.ndarray | dict[str, np.ndarray]
    targets: dict[str, np.ndarray]

    def size(self, task: str) -> int:
        """Takes a task name; returns how many samples the split holds for it.

        Raises DataError (a ValueError) for a task not in this split.
        """
        if task not in self.targets:
            raise DataError(f"unknown task {task!r}; this split has {list(self.targets)}")
        return int(self.targets[task].shape[0])


@dataclass(frozen=True)
class MultiTaskData:
    """A loaded dataset: its geometry, its tasks and its train / test splits."""

    name: str
    in_channels: int
    input_size: tuple[int, int]
    shared_input: bool
    tasks: tuple[TaskSpec, ...]
    train: Split
    test: Split
    # How a raw input becomes a model input: ``(raw - mean) / std`` per channel, raw as described.
    preprocessing: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LoadOptions:
    """What a dataset's loader gets, already checked (`dagc.trainer.datasets.load_dataset`).

    Fields: ``root`` the dataset's directory (None for a built-in one); ``tasks`` the selected
    tasks, in order; ``seed`` every random choice; ``size`` (H, W) of the inputs (None: the
    files' own); ``n_train`` / ``n_test`` how many samples to keep (None: all; the dataset's
    docstring says whether per task).
    """

    root: Path | None
    tasks: tuple[str, ...]
    seed: int
    size: tuple[int, int] | None
    n_train: int | None
    n_test: int | None


@dataclass(frozen=True)
class Dataset:
    """A dataset as registered in `dagc.trainer.datasets`: its name, its loader and its defaults.

    Fields:
        name: the name of ``--dataset``.
        load: the loader, `LoadOptions` -> `MultiTaskData`; raises DataError for bad files.
        tasks: the tasks it offers, in the default order; ``()`` when they are found on disk.
        find_tasks: for a dataset whose tasks are found on disk (Omniglot's alphabets), the
            function from its root directory (None when not given) to its tasks; it raises
            DataError without a readable root. None for the other datasets.
        preset: the central network preset it trains with by default (`dagc.spec.PRESETS`).
        recipe: the training recipe it trains with by default (`dagc.trainer.recipes.RECIPES`).
        choose_preset: for a dataset whose preset depends on its files (``folder``: the image
            size), the function from its root directory and the asked (H, W) (None: the files'
            own) to the preset; it raises DataError naming a bad file. None for the others.
        on_disk: read from a directory the user has (``--data-root``), else built in.
        input_size: the default (H, W); None for the files' own.
        min_size: the smallest height and width it accepts.
        n_train, n_test: the default sample counts (None: all).
    """

    name: str
    load: Callable[[LoadOptions], MultiTaskData]
    preset: str
    on_disk: bool
    tasks: tuple[str, ...] = ()
    find_tasks: Callable[[str | os.PathLike | None], tuple[str, ...]] | None = None
    choose_preset: Callable[[str | os.PathLike, tuple[int, int] | None], str] | None = None
    input_size: tuple[int, int] | None = None
    min_size: int = 8
    n_train: int | None = None
    n_test: int | None = None
    recipe: str = "measured"


# --------------------------------------------------------------------------------- validation
def check_tasks(dataset: str, tasks: Sequence[str] | None, valid: tuple[str, ...]) -> tuple[str, ...]:
    """Returns the selected task names out of ``valid`` (all when ``tasks`` is None); raises
    DataError for an unknown, repeated or empty selection."""
    if tasks is None:
        return valid
    if isinstance(tasks, str):  # a bare string would otherwise be read as a list of letters
        tasks = (tasks,)
    selected = tuple(tasks)
    bad = [t for t in selected if t not in valid]
    if bad or not selected:
        raise DataError(f"unknown task(s) {bad} for dataset {dataset!r}; choose from {list(valid)}")
    if len(set(selected)) != len(selected):
        raise DataError(f"tasks: name each task at most once, got {list(selected)}")
    return selected


def check_size(dataset: Dataset, input_size: tuple[int, int] | None) -> tuple[int, int] | None:
    """Returns (H, W) for the dataset (its default for None); raises DataError for a malformed
    or too small size."""
    if input_size is None:
        return dataset.input_size
    low = dataset.min_size
    try:
        h, w = input_size
    except (TypeError, ValueError):
        raise DataError(f"input_size must be a pair (H, W), got {input_size!r}") from None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (h, w)):
        raise DataError(f"input_size must be two integers (H, W), got {input_size!r}")
    if h < low or w < low:
        raise DataError(f"input_size for {dataset.name!r} must be at least ({low}, {low}), "
                        f"got {(int(h), int(w))}")
    return int(h), int(w)


def check_count(name: str, value: int | None, default: int | None) -> int | None:
    """Returns the sample count to use (``default`` for None); raises DataError unless >= 1."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_seed(seed: int) -> int:
    """Returns the seed as an int; raises DataError unless it is an integer >= 0."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def check_root(name: str, root: str | os.PathLike) -> Path:
    """Returns ``root`` as a Path; raises DataError unless it is an existing directory."""
    path = Path(root)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise DataError(f"data root {path} {what}; give the folder that holds the {name} dataset")
    return path


# ---------------------------------------------------------------------------- standardisation
def standardise(train: np.ndarray, test: np.ndarray, raw: str,
                raw_range: tuple[float, float] = (0.0, 1.0)) -> tuple[np.ndarray, np.ndarray, dict]:
    """Takes (n, C, H, W) train and test inputs, a description of the raw values and their range;
    returns both standardised per channel with the train split's statistics (the test split must
    not leak into them), and those statistics as a preprocessing record for deployment
    (`dagc.preprocessing.Preprocessing.to_dict`)."""
    mean = train.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64).astype(np.float32)
    # A constant channel would otherwise divide by zero.
    std = np.maximum(train.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64), 1e-6).astype(np.float32)
    scale = 1.0 / std
    prep = Preprocessing(raw_range, tuple(mean.ravel().tolist()), tuple(std.ravel().tolist()), description=raw).to_dict()
    return (train - mean) * scale, (test - mean) * scale, prep

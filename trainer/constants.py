"""The best constant predictors of each kind, fitted on training targets: every metric's floor to
beat (the kind table, `dagc.trainer.kinds`, picks one per kind). Each takes the task, its training
targets and the shape a model's prediction would have for a batch, and returns that prediction.
"""

from __future__ import annotations

import numpy as np

from dagc.errors import DataError
from dagc.spec import TaskSpec
from dagc.trainer.data import IGNORE_INDEX

__all__ = ["majority_class", "mean_direction", "median_depth", "mean_value"]


def majority_class(task: TaskSpec, train_targets: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Labelled kinds: the most frequent label (``IGNORE_INDEX`` skipped), as one-hot logits."""
    t = train_targets.ravel()
    counts = np.bincount(t[t != IGNORE_INDEX], minlength=task.classes)
    logits = np.zeros(task.classes, dtype=np.float32)
    logits[int(counts.argmax())] = 1.0
    view = (1, task.classes) + (1,) * (len(shape) - 2)
    return np.broadcast_to(logits.reshape(view), shape)


def mean_direction(task: TaskSpec, train_targets: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Normals: the normalised mean direction (zero vectors add nothing to it)."""
    mean = train_targets.mean(axis=(0, 2, 3))
    mean = mean / max(np.linalg.norm(mean), 1e-12)
    return np.broadcast_to(mean.reshape(1, 3, 1, 1).astype(np.float32), shape)


def median_depth(task: TaskSpec, train_targets: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Depth: the median valid (> 0) depth, the constant minimising mean absolute error (depth's
    primary metric). Raises DataError when the targets hold no valid depth."""
    valid = train_targets[train_targets > 0]
    if valid.size == 0:
        raise DataError(f"task {task.name!r}: the training depth has no valid pixel (all <= 0)")
    return np.full(shape, np.median(valid), dtype=np.float32)


def mean_value(task: TaskSpec, train_targets: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Edge / saliency maps: the mean value. Every constant has the same max F (all pixels called
    positive), and the mean minimises the L2 error they are trained with."""
    return np.full(shape, train_targets.mean(), dtype=np.float32)

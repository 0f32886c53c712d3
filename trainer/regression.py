"""The per-image ``regression`` kind's meter and constant predictor: a task predicts a vector of
``TaskSpec.classes`` values per image (targets float32 (n, classes)); it trains with the L2 or
L1 loss of ``--dense-loss`` (`dagc.trainer.losses.regression_loss`) and is scored by

* ``mae``: the mean absolute error over every value of every image (the primary metric);
* ``rmse``: the root of the mean squared error over the same values;

both lower is better (`dagc.trainer.metrics.LOWER_IS_BETTER`). Its constant predictor is the
per-component median of the training targets, the constant that minimises MAE.
"""

from __future__ import annotations

import math

import numpy as np

from dagc.errors import DataError
from dagc.spec import TaskSpec
from dagc.trainer.metrics import EDGE_MAX_DIST, Meter

__all__ = ["RegressionMeter", "median_vector"]


class RegressionMeter(Meter):
    """``mae`` and ``rmse`` of predictions (B, D) against targets (B, D), D = ``task.classes``."""

    def __init__(self, task: TaskSpec, edge_max_dist: float = EDGE_MAX_DIST) -> None:
        super().__init__(task, edge_max_dist)
        self.abs = 0.0
        self.sq = 0.0
        self.count = 0

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        pred = np.asarray(pred, dtype=np.float64)
        target = np.asarray(target, dtype=np.float64)
        d = self.task.classes
        if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != d:
            raise DataError(f"task {self.task.name!r}: predictions {pred.shape} do not fit targets {target.shape}; "
                            f"expected (B, {d}) for both")
        if not np.isfinite(target).all():
            raise DataError(f"task {self.task.name!r}: the regression targets hold NaN or infinite values")
        err = pred - target
        self.abs += float(np.abs(err).sum())
        self.sq += float((err * err).sum())
        self.count += err.size

    def result(self) -> dict[str, float]:
        if self.count == 0:
            raise self._empty()
        return {"mae": self.abs / self.count, "rmse": math.sqrt(self.sq / self.count)}


def median_vector(task: TaskSpec, train_targets: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Regression: the per-component median of the training vectors (the constant minimising MAE)."""
    targets = np.asarray(train_targets, dtype=np.float64).reshape(len(train_targets), -1)
    if targets.size == 0:
        raise DataError(f"task {task.name!r}: no training targets to fit a constant to")
    median = np.median(targets, axis=0).astype(np.float32)
    return np.broadcast_to(median.reshape(1, -1), shape)

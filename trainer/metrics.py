"""Task metrics (paper Sec. 4.1) and the best constant predictors they are compared against.

A `TaskMeter` accumulates one task's predictions batch by batch; `constant_prediction` gives the
best constant predictor of a task fitted on training targets (majority class, mean depth, mean
normal direction, mean edge value), so every metric has a floor to beat.
"""

from __future__ import annotations

import numpy as np

from dagc.spec import TaskSpec
from dagc.trainer.losses import IGNORE_INDEX

# The metric summarising each kind, and whether higher is better.
PRIMARY = {
    "segmentation": ("miou", True),
    "classification": ("accuracy", True),
    "depth": ("abs_err", False),
    "normal": ("mean_angle", False),
    "edge": ("max_f", True),
    "saliency": ("max_f", True),
}
# Thresholds at which binary-map tasks (edges, saliency) are scored; max_f is the best F-measure
# over them (BSDS' ODS F for a 0-pixel tolerance), the usual way to compare edge maps.
F_THRESHOLDS = np.linspace(0.0, 1.0, 101)


class TaskMeter:
    """Accumulates a task's metrics over batches of numpy predictions and targets.

    Predictions: logits (B, classes[, H, W]) for label tasks, values (B, C, H, W) otherwise.
    """

    def __init__(self, task: TaskSpec) -> None:
        self.task = task
        self.n = 0
        if task.kind in ("segmentation", "classification"):
            self.confusion = np.zeros((task.classes, task.classes), dtype=np.int64)
        self.sums: dict[str, float] = {}
        self.angles: list[np.ndarray] = []

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        kind = self.task.kind
        if kind in ("segmentation", "classification"):
            labels = pred.argmax(axis=1).ravel()
            t = target.ravel()
            keep = t != IGNORE_INDEX
            k = self.task.classes
            self.confusion += np.bincount(t[keep] * k + labels[keep], minlength=k * k).reshape(k, k)
        elif kind == "normal":
            p = pred / np.maximum(np.linalg.norm(pred, axis=1, keepdims=True), 1e-12)
            cos = np.clip((p * target).sum(axis=1), -1.0, 1.0)
            self.angles.append(np.degrees(np.arccos(cos)).ravel())
        else:
            err = np.abs(pred - target)
            self._add("abs_err", err.sum(), err.size)
            self._add("mse", (err**2).sum(), 0)
            if kind == "depth":
                self._add("rel_err", (err / np.maximum(target, 1e-6)).sum(), 0)
            else:
                # Histograms of the predictions on positive and negative pixels: enough to get
                # precision and recall at every threshold without keeping the predictions.
                positive = target.ravel() > 0.5
                bins = np.clip(np.searchsorted(F_THRESHOLDS, pred.ravel(), side="right") - 1, 0, len(F_THRESHOLDS) - 1)
                self.pos_hist = getattr(self, "pos_hist", 0) + np.bincount(bins[positive], minlength=len(F_THRESHOLDS))
                self.neg_hist = getattr(self, "neg_hist", 0) + np.bincount(bins[~positive], minlength=len(F_THRESHOLDS))

    def _add(self, key: str, value: float, count: int) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.n += count

    def result(self) -> dict[str, float]:
        """The task's metrics as plain floats (angles in degrees)."""
        kind = self.task.kind
        if kind in ("segmentation", "classification"):
            c = self.confusion
            total = max(int(c.sum()), 1)
            acc = float(np.trace(c)) / total
            if kind == "classification":
                return {"accuracy": acc}
            inter = np.diag(c).astype(np.float64)
            union = c.sum(0) + c.sum(1) - inter
            present = union > 0
            return {"miou": float((inter[present] / union[present]).mean()), "pixel_acc": acc}
        if kind == "normal":
            a = np.concatenate(self.angles) if self.angles else np.zeros(1)
            return {"mean_angle": float(a.mean()), "median_angle": float(np.median(a)),
                    "within_11.25": float((a < 11.25).mean()), "within_22.5": float((a < 22.5).mean()),
                    "within_30": float((a < 30).mean())}
        out = {"abs_err": self.sums["abs_err"] / max(self.n, 1), "mse": self.sums["mse"] / max(self.n, 1)}
        if kind == "depth":
            out["rel_err"] = self.sums["rel_err"] / max(self.n, 1)
        else:
            # A pixel is called positive at threshold t when its prediction is >= t.
            tp = np.cumsum(self.pos_hist[::-1])[::-1].astype(np.float64)
            fp = np.cumsum(self.neg_hist[::-1])[::-1].astype(np.float64)
            recall = tp / max(tp[0], 1.0)
            precision = tp / np.maximum(tp + fp, 1.0)
            f = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
            out["max_f"] = float(f.max())
        return out


def constant_prediction(task: TaskSpec, train_targets: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The best constant predictor of a task, fitted on the training targets, broadcast to
    ``shape`` (the shape a model's prediction would have for a batch).

    Majority class for label tasks (as one-hot logits), median depth, mean edge / saliency value,
    and the normalised mean normal direction.
    """
    if task.kind in ("segmentation", "classification"):
        t = train_targets.ravel()
        counts = np.bincount(t[t != IGNORE_INDEX], minlength=task.classes)
        logits = np.zeros(task.classes, dtype=np.float32)
        logits[int(counts.argmax())] = 1.0
        view = (1, task.classes) + (1,) * (len(shape) - 2)
        return np.broadcast_to(logits.reshape(view), shape)
    if task.kind == "normal":
        mean = train_targets.mean(axis=(0, 2, 3))
        mean = mean / max(np.linalg.norm(mean), 1e-12)
        return np.broadcast_to(mean.reshape(1, 3, 1, 1).astype(np.float32), shape)
    if task.kind == "depth":
        # The constant minimising mean absolute error, depth's primary metric, is the median.
        return np.full(shape, np.median(train_targets), dtype=np.float32)
    # Edge / saliency maps: every constant has the same max F (all pixels called positive), and
    # the mean minimises the L2 error they are trained with.
    return np.full(shape, train_targets.mean(), dtype=np.float32)


def is_better(task: TaskSpec, a: float, b: float) -> bool:
    """Whether primary-metric value ``a`` beats ``b`` for this task."""
    return a > b if PRIMARY[task.kind][1] else a < b

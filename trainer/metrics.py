"""Task metrics (paper Sec. 4.1) and the relative performance Δ (Eq. 10-11); the best constant
predictors they are compared against are `dagc.trainer.constants`.

A `Meter` accumulates one task's predictions batch by batch, one subclass per kind (which kind
uses which meter, constant predictor and primary metric is the kind table's, `dagc.trainer.kinds`);
``result()`` gives:

* classification: ``accuracy``;
* segmentation: ``miou`` (mean over the classes present in targets or predictions) and
  ``pixel_acc``; labels ``IGNORE_INDEX`` (-1) are skipped;
* depth: ``abs_err``, ``rel_err`` (mean |d̂ − d| / d), ``mse`` and ``delta_1.25``,
  ``delta_1.25^2``, ``delta_1.25^3``: the fraction (0..1) of pixels with
  max(d̂/d, d/d̂) < 1.25^k, a prediction <= 0 counting as a miss. Only pixels with d > 0 count
  (real datasets mark missing depth with 0);
* normal: ``mean_angle``, ``median_angle`` (degrees) and ``within_11.25``, ``within_22.5``,
  ``within_30`` (fractions), over the pixels whose target is not the zero vector;
* edge: ``ods_f``, the optimal-dataset-scale F-measure with a matching distance tolerance
  (BSDS / seism as used by ASTMT on PASCAL-Context), ``max_f`` (the same at zero tolerance),
  ``abs_err`` and ``mse``;
* saliency: ``max_f`` (best F over thresholds of the pooled precision and recall),
  ``max_miou`` (best, over thresholds, mean per-image IoU of the thresholded map: ASTMT's and
  MTI-Net's saliency mIoU), ``abs_err`` and ``mse``;
* regression (one vector per image): ``mae`` and ``rmse`` (`dagc.trainer.regression`).

`relative_performance` and `delta_t` compare a method with single-task baselines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from dagc.errors import ConfigError, DataError
from dagc.spec import TaskSpec
from dagc.trainer.data import IGNORE_INDEX

# Metric keys where a lower value is better: l_j = 1 in Eq. 10.
LOWER_IS_BETTER = frozenset({"abs_err", "rel_err", "mse", "rmse", "mae", "mean_angle", "median_angle"})
# Thresholds at which binary-map tasks (edges, saliency) are scored; a pixel is called positive
# at threshold t when its prediction is >= t (everything at t = 0). The grid contains ASTMT's
# saliency thresholds (0.2, 0.25, ..., 0.9) and is as fine as BSDS' 99 edge thresholds.
F_THRESHOLDS = np.linspace(0.0, 1.0, 101)
# BSDS / seism edge matching tolerance, as a fraction of the image diagonal (ASTMT's maxDist).
EDGE_MAX_DIST = 0.0075
DEPTH_DELTAS = {"delta_1.25": 1.25, "delta_1.25^2": 1.25**2, "delta_1.25^3": 1.25**3}
ANGLE_WITHIN = {"within_11.25": 11.25, "within_22.5": 22.5, "within_30": 30.0}


class Meter:
    """Accumulates one task's metrics over batches of numpy predictions and targets; one subclass
    per task kind (the kind table, `dagc.trainer.kinds`, says which).

    Predictions: logits (B, classes[, H, W]) for labelled kinds, values (B, C, H, W) otherwise;
    targets: labels (B[, H, W]) or values of the prediction's shape. ``edge_max_dist`` is the
    edge matching tolerance as a fraction of the image diagonal (0: exact pixels); a tolerance
    under one pixel, e.g. the default on 32×32 images, is exact matching. Raises ConfigError
    for a negative or non-finite ``edge_max_dist``.
    """

    def __init__(self, task: TaskSpec, edge_max_dist: float = EDGE_MAX_DIST) -> None:
        if not (isinstance(edge_max_dist, (int, float)) and math.isfinite(edge_max_dist) and edge_max_dist >= 0):
            raise ConfigError(f"edge_max_dist must be a finite number >= 0 (a fraction of the image "
                              f"diagonal, e.g. {EDGE_MAX_DIST}), got {edge_max_dist!r}")
        self.task = task
        self.edge_max_dist = float(edge_max_dist)

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        """Adds one batch. Raises DataError when shapes or labels do not fit the task."""
        raise NotImplementedError

    def result(self) -> dict[str, float]:
        """The task's metrics as plain floats (angles in degrees, fractions in 0..1).

        Raises DataError when nothing valid was seen (no labelled pixel, no depth > 0, ...).
        """
        raise NotImplementedError

    def _empty(self) -> DataError:
        return DataError(f"task {self.task.name!r}: no valid target to score; check the data (labels "
                         f"{IGNORE_INDEX}, depth <= 0 and zero normals are skipped)")


class _LabelMeter(Meter):
    """A confusion matrix of labels (classification and segmentation)."""

    def __init__(self, task: TaskSpec, edge_max_dist: float = EDGE_MAX_DIST) -> None:
        super().__init__(task, edge_max_dist)
        self.confusion = np.zeros((task.classes, task.classes), dtype=np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        pred, target = np.asarray(pred), np.asarray(target)
        k, name = self.task.classes, self.task.name
        if pred.ndim != target.ndim + 1 or pred.shape[1] != k or pred.shape[:1] + pred.shape[2:] != target.shape:
            raise DataError(f"task {name!r}: predictions {pred.shape} do not fit targets {target.shape}; "
                            f"expected logits (B, {k}, ...) for labels (B, ...)")
        labels = pred.argmax(axis=1).ravel()
        t = target.ravel().astype(np.int64)
        keep = t != IGNORE_INDEX
        t, labels = t[keep], labels[keep]
        if t.size and (t.min() < 0 or t.max() >= k):
            raise DataError(f"task {name!r}: target labels must be in [0, {k - 1}] or {IGNORE_INDEX} "
                            f"(ignored), got values from {t.min()} to {t.max()}")
        self.confusion += np.bincount(t * k + labels, minlength=k * k).reshape(k, k)

    def _accuracy(self) -> float:
        c = self.confusion
        if c.sum() == 0:
            raise self._empty()
        return float(np.trace(c)) / float(c.sum())


class ClassificationMeter(_LabelMeter):
    """``accuracy``."""

    def result(self) -> dict[str, float]:
        return {"accuracy": self._accuracy()}


class SegmentationMeter(_LabelMeter):
    """``miou`` (mean over the classes present in targets or predictions) and ``pixel_acc``."""

    def result(self) -> dict[str, float]:
        acc = self._accuracy()
        c = self.confusion
        inter = np.diag(c).astype(np.float64)
        union = c.sum(0) + c.sum(1) - inter
        present = union > 0
        return {"miou": float((inter[present] / union[present]).mean()), "pixel_acc": acc}


class _DenseMeter(Meter):
    """Dense regression maps (B, C, H, W): sums over the valid pixels seen so far."""

    def __init__(self, task: TaskSpec, edge_max_dist: float = EDGE_MAX_DIST) -> None:
        super().__init__(task, edge_max_dist)
        self.n = 0  # valid pixels seen so far
        self.sums: dict[str, float] = {}

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        pred, target = np.asarray(pred), np.asarray(target)
        if pred.shape != target.shape or pred.ndim != 4:
            raise DataError(f"task {self.task.name!r}: predictions {pred.shape} and targets {target.shape} must "
                            "both be (B, C, H, W)")
        self._update(pred.astype(np.float64, copy=False), target.astype(np.float64, copy=False))

    def _update(self, pred: np.ndarray, target: np.ndarray) -> None:
        raise NotImplementedError

    def _add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def _means(self) -> dict[str, float]:
        if self.n == 0:
            raise self._empty()
        return {key: value / self.n for key, value in self.sums.items()}


class DepthMeter(_DenseMeter):
    """``abs_err``, ``rel_err``, ``mse`` and the ``delta_1.25^k`` fractions, over pixels with d > 0."""

    def _update(self, pred: np.ndarray, target: np.ndarray) -> None:
        valid = target > 0
        d, p = target[valid], pred[valid]
        err = np.abs(p - d)
        self._add("abs_err", err.sum())
        self._add("mse", (err**2).sum())
        self._add("rel_err", (err / d).sum())
        ratio = np.full(p.shape, np.inf)
        ok = p > 0
        ratio[ok] = np.maximum(p[ok] / d[ok], d[ok] / p[ok])
        for key, limit in DEPTH_DELTAS.items():
            self._add(key, np.count_nonzero(ratio < limit))
        self.n += d.size

    def result(self) -> dict[str, float]:
        return self._means()


class NormalMeter(_DenseMeter):
    """``mean_angle``, ``median_angle`` (degrees) and the ``within_*`` fractions, over the pixels
    whose target is not the zero vector."""

    def __init__(self, task: TaskSpec, edge_max_dist: float = EDGE_MAX_DIST) -> None:
        super().__init__(task, edge_max_dist)
        self.angles: list[np.ndarray] = []

    def _update(self, pred: np.ndarray, target: np.ndarray) -> None:
        valid = (target != 0).any(axis=1)  # (B, H, W), the rule of losses.valid_normal
        p = np.moveaxis(pred, 1, -1)[valid]
        g = np.moveaxis(target, 1, -1)[valid]
        p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        cos = np.clip((p * g).sum(axis=1), -1.0, 1.0)
        self.angles.append(np.degrees(np.arccos(cos)))

    def result(self) -> dict[str, float]:
        a = np.concatenate(self.angles) if self.angles else np.zeros(0)
        if a.size == 0:
            raise self._empty()
        out = {"mean_angle": float(a.mean()), "median_angle": float(np.median(a))}
        out.update({key: float((a < limit).mean()) for key, limit in ANGLE_WITHIN.items()})
        return out


class _BinaryMapMeter(_DenseMeter):
    """Binary maps (edges, saliency), one channel: ``abs_err``, ``mse`` and ``max_f``."""

    def __init__(self, task: TaskSpec, edge_max_dist: float = EDGE_MAX_DIST) -> None:
        super().__init__(task, edge_max_dist)
        # Histograms of the predictions on positive and negative pixels: enough to get
        # precision and recall at every threshold without keeping the predictions.
        self.pos_hist = np.zeros(len(F_THRESHOLDS), dtype=np.int64)
        self.neg_hist = np.zeros(len(F_THRESHOLDS), dtype=np.int64)

    def _update(self, pred: np.ndarray, target: np.ndarray) -> None:
        err = np.abs(pred - target)
        self._add("abs_err", err.sum())
        self._add("mse", (err**2).sum())
        self.n += err.size
        # One image per (sample, channel); the maps have one channel.
        images = pred.reshape(-1, *pred.shape[-2:])
        positive = target.reshape(images.shape) > 0.5
        bins = _bins(images)
        t = len(F_THRESHOLDS)
        self.pos_hist += np.bincount(bins[positive], minlength=t)
        self.neg_hist += np.bincount(bins[~positive], minlength=t)
        self._update_images(images, positive, bins)

    def _update_images(self, images: np.ndarray, positive: np.ndarray, bins: np.ndarray) -> None:
        raise NotImplementedError

    def _max_f(self) -> dict[str, float]:
        out = self._means()
        exact = _at_least(self.pos_hist)
        out["max_f"] = _best_f(exact, self._predicted(), exact, int(self.pos_hist.sum()))
        return out

    def _predicted(self) -> np.ndarray:
        return _at_least(self.pos_hist + self.neg_hist)


class EdgeMeter(_BinaryMapMeter):
    """Also ``ods_f``, the optimal-dataset-scale F-measure with the ``edge_max_dist`` tolerance."""

    def __init__(self, task: TaskSpec, edge_max_dist: float = EDGE_MAX_DIST) -> None:
        super().__init__(task, edge_max_dist)
        self.near_hist = np.zeros(len(F_THRESHOLDS), dtype=np.int64)     # predictions within tolerance of an edge
        self.matched_hist = np.zeros(len(F_THRESHOLDS), dtype=np.int64)  # per edge pixel: best prediction nearby

    def _update_images(self, images: np.ndarray, positive: np.ndarray, bins: np.ndarray) -> None:
        t = len(F_THRESHOLDS)
        near, best = _edge_matches(images, positive, self.edge_max_dist)
        self.near_hist += np.bincount(bins[near], minlength=t)
        self.matched_hist += np.bincount(_bins(best[positive]), minlength=t)

    def result(self) -> dict[str, float]:
        out = self._max_f()
        out["ods_f"] = _best_f(_at_least(self.near_hist), self._predicted(), _at_least(self.matched_hist),
                               int(self.pos_hist.sum()))
        return out


class SaliencyMeter(_BinaryMapMeter):
    """Also ``max_miou``: the best, over thresholds, mean per-image IoU of the thresholded map."""

    def __init__(self, task: TaskSpec, edge_max_dist: float = EDGE_MAX_DIST) -> None:
        super().__init__(task, edge_max_dist)
        self.iou_sum = np.zeros(len(F_THRESHOLDS), dtype=np.float64)
        self.images = 0

    def _update_images(self, images: np.ndarray, positive: np.ndarray, bins: np.ndarray) -> None:
        # Per image and threshold: TP and FP counts, from per-image histograms.
        b, t = len(images), len(F_THRESHOLDS)
        flat_bins = bins.reshape(b, -1) + (np.arange(b) * t)[:, None]
        flat_pos = positive.reshape(b, -1)
        tp = _at_least(np.bincount(flat_bins[flat_pos], minlength=b * t).reshape(b, t))
        fp = _at_least(np.bincount(flat_bins[~flat_pos], minlength=b * t).reshape(b, t))
        union = flat_pos.sum(axis=1)[:, None] + fp
        # ASTMT's convention: an image with no salient pixel and none predicted scores 1.
        iou = np.where(union > 0, tp / np.maximum(union, 1), 1.0)
        self.iou_sum += iou.sum(axis=0)
        self.images += b

    def result(self) -> dict[str, float]:
        out = self._max_f()
        out["max_miou"] = float((self.iou_sum / self.images).max())
        return out


def _bins(values: np.ndarray) -> np.ndarray:
    """Index of the largest threshold <= each value (values below 0 go to threshold 0)."""
    return np.clip(np.searchsorted(F_THRESHOLDS, values, side="right") - 1, 0, len(F_THRESHOLDS) - 1)


def _at_least(hist: np.ndarray) -> np.ndarray:
    """From counts per threshold bin (last axis) to counts at or above each threshold."""
    return np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]


def _best_f(tp_precision: np.ndarray, predicted: np.ndarray, tp_recall: np.ndarray, actual: int) -> float:
    """The best F-measure over thresholds, from per-threshold counts (precision 0 when nothing
    is predicted, recall 0 when nothing is positive)."""
    precision = tp_precision / np.maximum(predicted, 1)
    recall = tp_recall / max(actual, 1)
    f = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(f.max())


def _edge_matches(images: np.ndarray, edges: np.ndarray, max_dist: float) -> tuple[np.ndarray, np.ndarray]:
    """Tolerance matching of edge maps: returns (near, best), both shaped like ``images``.

    ``near``: pixels within ``max_dist`` × diagonal of a ground-truth edge pixel (a predicted
    pixel there is a true positive); ``best``: the largest prediction within that distance of
    each pixel (a ground-truth edge pixel is recalled at every threshold up to it). Unlike BSDS'
    one-to-one matching, several predicted pixels may match one edge pixel, and predictions are
    not thinned first: thick predictions are scored more leniently than by seism.
    """
    h, w = images.shape[-2:]
    radius = max_dist * math.hypot(h, w)
    if radius < 1:
        return edges, images
    # scipy comes with scikit-learn (a dependency); imported here as only this path needs it.
    from scipy.ndimage import binary_dilation, maximum_filter

    # Pixel offsets within Euclidean distance `radius`; dilating by them is the same as
    # thresholding a distance transform, in one call for the whole batch.
    r = int(math.floor(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = ((dy**2 + dx**2) <= radius**2)[None]
    near = binary_dilation(edges, structure=disk)
    best = maximum_filter(images, footprint=disk, mode="constant", cval=-np.inf)
    return near, best


def relative_performance(method: Mapping[str, float], single_task: Mapping[str, float],
                         lower_is_better: frozenset[str] | set[str] = LOWER_IS_BETTER) -> float:
    """Eq. 10: Δ_Ti = 100/|M| · Σ_j (−1)^{l_j} (M_j − M_j^single) / M_j^single, in percent.

    Takes a task's metrics for the method and for the single-task baseline (metric -> value; the
    metrics averaged are the keys of ``method``, e.g. ``DELTA_METRICS[kind]``) and the keys
    where lower is better (l_j = 1). (The paper's sum runs "j = 0 … |M|": over the |M| metrics.)
    Returns Δ_Ti; positive means better than the baseline. Raises DataError when ``method`` is
    empty, a key has no baseline, or a baseline is zero or not finite.
    """
    if not method:
        raise DataError("relative_performance needs at least one metric in `method`")
    total = 0.0
    for key, value in method.items():
        if key not in single_task:
            raise DataError(f"metric {key!r} has no single-task baseline; give single_task every key of method")
        base = float(single_task[key])
        if base == 0 or not math.isfinite(base):
            raise DataError(f"single-task baseline of {key!r} is {base}; Eq. 10 divides by it, so leave "
                            "this metric out")
        sign = -1.0 if key in lower_is_better else 1.0
        total += sign * (float(value) - base) / base
    return 100.0 * total / len(method)


def delta_t(per_task: Mapping[str, float]) -> float:
    """Eq. 11: Δ_T, the mean of the per-task Δ_Ti (task -> Δ_Ti, in percent).

    Raises DataError when ``per_task`` is empty.
    """
    if not per_task:
        raise DataError("delta_t needs the relative performance of at least one task")
    return float(sum(per_task.values())) / len(per_task)

"""How the trainer trains and scores each task kind: one table keyed by kind.

A kind's structural facts (dense or not, output channels, head) are the core's
(`dagc.spec.KINDS`); this table adds, per kind, its loss and which target pixels are valid, its
metrics (a `dagc.trainer.metrics.Meter`), the metric that summarises it and the ones the paper's
tables average over (Eq. 10), and its best constant predictor. Adding a kind means one entry in
`dagc.spec.KINDS` and one here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from dagc.errors import SpecError
from dagc.spec import KINDS, TaskSpec
from dagc.trainer.constants import majority_class, mean_direction, mean_value, median_depth
from dagc.trainer.losses import ValidPixels, cross_entropy_loss, regression_loss, valid_depth, valid_normal
from dagc.trainer.metrics import (
    EDGE_MAX_DIST,
    LOWER_IS_BETTER,
    ClassificationMeter,
    DepthMeter,
    EdgeMeter,
    Meter,
    NormalMeter,
    SaliencyMeter,
    SegmentationMeter,
)

# (pred, target, dense_loss, valid) -> scalar loss; see `dagc.trainer.losses`.
Loss = Callable[[Tensor, Tensor, str, ValidPixels | None], Tensor]
# (task, training targets, prediction shape) -> the constant prediction; see `dagc.trainer.constants`.
ConstantPredictor = Callable[[TaskSpec, np.ndarray, tuple[int, ...]], np.ndarray]


@dataclass(frozen=True)
class KindTraining:
    """What training and evaluation do with one task kind.

    Fields:
        loss: the task loss; labelled kinds use cross-entropy, the others ``dense_loss`` regression.
        valid_pixels: which target pixels carry a value (None: all), for the loss; the meter
            skips the same pixels.
        meter: the `Meter` class that scores the kind.
        primary: the metric that summarises the kind (whether higher is better follows from
            `LOWER_IS_BETTER`).
        delta_metrics: the metrics the paper's tables report, which Δ (Eq. 10) averages over.
        constant: the best constant predictor, the floor every metric is compared with.
    """

    loss: Loss
    valid_pixels: ValidPixels | None
    meter: type[Meter]
    primary: str
    delta_metrics: tuple[str, ...]
    constant: ConstantPredictor

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger primary metric is better."""
        return self.primary not in LOWER_IS_BETTER


# Edges: the toleranced ODS F of the benchmark the paper follows; saliency: mIoU, the saliency
# column of the paper's Table 13.
TRAINING: dict[str, KindTraining] = {
    "segmentation": KindTraining(cross_entropy_loss, None, SegmentationMeter, "miou", ("miou", "pixel_acc"),
                                 majority_class),
    "classification": KindTraining(cross_entropy_loss, None, ClassificationMeter, "accuracy", ("accuracy",),
                                   majority_class),
    "depth": KindTraining(regression_loss, valid_depth, DepthMeter, "abs_err",
                          ("abs_err", "rel_err", "delta_1.25", "delta_1.25^2", "delta_1.25^3"), median_depth),
    "normal": KindTraining(regression_loss, valid_normal, NormalMeter, "mean_angle",
                           ("mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30"),
                           mean_direction),
    "edge": KindTraining(regression_loss, None, EdgeMeter, "ods_f", ("ods_f",), mean_value),
    "saliency": KindTraining(regression_loss, None, SaliencyMeter, "max_miou", ("max_miou", "max_f"), mean_value),
}
if set(TRAINING) != set(KINDS):  # a kind registered in the core but not here (or the reverse)
    raise SpecError(f"dagc.trainer.kinds.TRAINING covers {sorted(TRAINING)}, but dagc.spec.KINDS has "
                    f"{sorted(KINDS)}; register every kind in both")

# Views of the table by kind: the primary metric and whether higher is better; the Δ metrics.
PRIMARY: dict[str, tuple[str, bool]] = {k: (t.primary, t.higher_is_better) for k, t in TRAINING.items()}
DELTA_METRICS: dict[str, tuple[str, ...]] = {k: t.delta_metrics for k, t in TRAINING.items()}


def kind_training(task: TaskSpec) -> KindTraining:
    """Takes a task; returns its kind's entry of `TRAINING`. Raises SpecError for an unknown kind."""
    if task.kind not in TRAINING:
        raise SpecError(f"task {task.name!r}: unknown kind {task.kind!r}; choose one of {list(TRAINING)}")
    return TRAINING[task.kind]


def task_loss(task: TaskSpec, pred: Tensor, target: Tensor, dense_loss: str = "l2") -> Tensor:
    """Loss of one task, a scalar tensor: cross-entropy for labelled kinds (labels
    ``IGNORE_INDEX`` skipped), L2 or L1 (``dense_loss``) regression for the others (edges and
    saliency on their {0, 1} maps), over the kind's valid pixels. Raises ConfigError
    for an unknown ``dense_loss`` (on a regression kind), SpecError for an unknown kind."""
    kind = kind_training(task)
    return kind.loss(pred, target, dense_loss, kind.valid_pixels)


def task_meter(task: TaskSpec, edge_max_dist: float = EDGE_MAX_DIST) -> Meter:
    """The `Meter` of a task's kind, which accumulates its metrics batch by batch (see
    `dagc.trainer.metrics` for each kind's metrics). Raises ConfigError for a bad
    ``edge_max_dist``, SpecError for an unknown kind."""
    return kind_training(task).meter(task, edge_max_dist)


def constant_prediction(task: TaskSpec, train_targets: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The best constant predictor of a task fitted on the training targets, broadcast to
    ``shape`` (the shape a model's prediction would have for a batch): majority class (one-hot
    logits), median valid depth, mean normal direction, or mean map value. Raises DataError when
    the targets hold no valid depth."""
    return kind_training(task).constant(task, train_targets, shape)

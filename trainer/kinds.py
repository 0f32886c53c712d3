"""How the trainer trains and scores each task kind: one table keyed by kind.

A kind's structural facts (dense or not, output channels, head) are the core's
(`dagc.spec.KINDS`); this table adds, per kind, its loss and which target pixels are valid, its
metrics (a `dagc.trainer.metrics.Meter`), the metric that summarises it and the ones the paper's
tables average over (Eq. 10), and its best constant predictor. A built-in kind is one entry in
`dagc.spec.BUILTIN_KINDS` and one here; a plug-in kind is registered with `register_kind` (both
halves at once), directly or through an entry point of group ``dagc.kinds``
(`dagc.trainer.plugins`), which the functions here load the first time they are called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from dagc.errors import PluginError, SpecError
from dagc.spec import BUILTIN_KINDS, KINDS, TaskKind, TaskSpec, check_kind
from dagc.spec import register_kind as register_structure
from dagc.trainer import plugins
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
from dagc.trainer.regression import RegressionMeter, median_vector

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
    "regression": KindTraining(regression_loss, None, RegressionMeter, "mae", ("mae", "rmse"), median_vector),
}
BUILTIN_TRAINING = dict(TRAINING)
if set(TRAINING) != set(BUILTIN_KINDS):  # a kind registered in the core but not here (or the reverse)
    raise SpecError(f"dagc.trainer.kinds.TRAINING covers {sorted(TRAINING)}, but dagc.spec.BUILTIN_KINDS has "
                    f"{sorted(BUILTIN_KINDS)}; register every kind in both")

# Views of the table by kind: the primary metric and whether higher is better; the Δ metrics.
PRIMARY: dict[str, tuple[str, bool]] = {k: (t.primary, t.higher_is_better) for k, t in TRAINING.items()}
DELTA_METRICS: dict[str, tuple[str, ...]] = {k: t.delta_metrics for k, t in TRAINING.items()}


_loaded = False


def check_training(training: object, where: str) -> KindTraining:
    """Returns ``training`` if it is a well-formed `KindTraining`; raises PluginError naming ``where``
    and the field otherwise."""
    if not isinstance(training, KindTraining):
        raise PluginError(f"{where}: expected a dagc.trainer.kinds.KindTraining, got {type(training).__name__}")
    for field in ("loss", "constant"):
        if not callable(getattr(training, field)):
            raise PluginError(f"{where}: {field} must be a function, got {getattr(training, field)!r}")
    if training.valid_pixels is not None and not callable(training.valid_pixels):
        raise PluginError(f"{where}: valid_pixels must be None or a function, got {training.valid_pixels!r}")
    if not (isinstance(training.meter, type) and issubclass(training.meter, Meter)):
        raise PluginError(f"{where}: meter must be a subclass of dagc.trainer.metrics.Meter, got {training.meter!r}")
    metrics = training.delta_metrics
    if not isinstance(metrics, tuple) or not metrics or not all(isinstance(m, str) and m for m in metrics):
        raise PluginError(f"{where}: delta_metrics must be a non-empty tuple of metric names, got {metrics!r}")
    if not isinstance(training.primary, str) or not training.primary:
        raise PluginError(f"{where}: primary must be a metric name, got {training.primary!r}")
    return training


def register_kind(kind: TaskKind, training: KindTraining, *, where: str = "register_kind") -> None:
    """Registers a task kind: its structural facts (`dagc.spec.register_kind`, shared with the
    compiler and runtime) and how it trains and scores (`KindTraining`). Its head must be the
    compiler's for it (``"aspp"`` dense, ``"linear"`` per image), so compile, ONNX export, the
    runtime and Triton work unchanged. Registering the identical pair again does nothing.

    Raises PluginError (naming ``where``) for a malformed kind or training record, or a name that
    is registered already (a built-in one included) with other facts."""
    try:
        check_kind(kind, f"{where}: task kind")
    except SpecError as e:
        raise PluginError(str(e)) from None
    check_training(training, f"{where}: kind {kind.name!r}")
    known = TRAINING.get(kind.name)
    if known is not None and (known != training or KINDS.get(kind.name) != kind):
        what = "a built-in" if kind.name in BUILTIN_TRAINING else "an already registered"
        raise PluginError(f"{where}: kind {kind.name!r} clashes with {what} kind of that name; choose another name")
    try:
        register_structure(kind, f"{where}: task kind")
    except SpecError as e:
        raise PluginError(str(e)) from None
    TRAINING[kind.name] = training
    PRIMARY[kind.name] = (training.primary, training.higher_is_better)
    DELTA_METRICS[kind.name] = training.delta_metrics


def load_plugins() -> None:
    """Registers the kinds of every entry point of group ``dagc.kinds`` (once; see
    `dagc.trainer.plugins`). Raises PluginError for a broken one."""
    global _loaded
    if _loaded:
        return
    for name, where, obj in plugins.entry_point_objects(plugins.KIND_GROUP):
        if not (isinstance(obj, tuple) and len(obj) == 2):
            raise PluginError(f"{where}: expected a (TaskKind, KindTraining) pair (or a function returning one), "
                              f"got {type(obj).__name__}")
        kind, training = obj
        if isinstance(kind, TaskKind) and kind.name != name:
            raise PluginError(f"{where}: the entry point's name must be the kind's, got kind {kind.name!r}")
        register_kind(kind, training, where=where)
    _loaded = True


def kind_training(task: TaskSpec) -> KindTraining:
    """Takes a task; returns its kind's entry of `TRAINING`. Raises SpecError for an unknown kind,
    PluginError for a broken plug-in."""
    return training_of(task.kind, f"task {task.name!r}")


def training_of(kind: str, where: str = "task") -> KindTraining:
    """Takes a kind's name; returns its entry of `TRAINING` (plug-ins loaded first). Raises
    SpecError for an unknown kind (a checkpoint of a plug-in kind whose plug-in is not installed)."""
    if kind not in TRAINING:
        load_plugins()
    if kind not in TRAINING:
        hint = (" (the spec says how it is built, but training and scoring it need its plug-in installed: "
                f"a package with an entry point {kind!r} in group {plugins.KIND_GROUP!r})") if kind in KINDS else ""
        raise SpecError(f"{where}: unknown kind {kind!r}{hint}; choose one of {list(TRAINING)}")
    return TRAINING[kind]


def primary_metric(kind: str) -> tuple[str, bool]:
    """A kind's primary metric and whether higher is better (`PRIMARY`, plug-ins loaded first)."""
    training = training_of(kind)
    return training.primary, training.higher_is_better


def delta_metrics(kind: str) -> tuple[str, ...]:
    """The metrics Δ averages over for a kind (`DELTA_METRICS`, plug-ins loaded first)."""
    return training_of(kind).delta_metrics


__all__ = ["KindTraining", "TRAINING", "PRIMARY", "DELTA_METRICS", "register_kind", "load_plugins", "kind_training",
           "training_of", "primary_metric", "delta_metrics", "task_loss", "task_meter", "constant_prediction"]


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

"""Task metrics on small hand-checked inputs, and the constant predictors they are compared with."""

import numpy as np
import pytest
import torch

from dagc.errors import ConfigError, DataError
from dagc.spec import KINDS, TaskSpec
from dagc.trainer.kinds import DELTA_METRICS, PRIMARY, TRAINING, constant_prediction, task_meter
from dagc.trainer.losses import IGNORE_INDEX, squeeze_loss
from dagc.trainer.metrics import LOWER_IS_BETTER, delta_t, relative_performance


def _onehot(labels, classes):
    return np.moveaxis(np.eye(classes)[labels], -1, 1)


def test_segmentation_miou_and_pixel_accuracy_by_hand():
    task = TaskSpec("s", "segmentation", 3)
    target = np.array([[[0, 0, 1, 1], [2, 2, 2, IGNORE_INDEX]]])
    pred = np.array([[[0, 1, 1, 1], [2, 2, 0, 1]]])
    m = task_meter(task)
    # Split across two updates: the meter must accumulate, not average per batch.
    m.update(_onehot(pred[:, :1], 3), target[:, :1])
    m.update(_onehot(pred[:, 1:], 3), target[:, 1:])
    r = m.result()
    # 7 labelled pixels, 5 right. IoU = TP / (target + pred - TP) over labelled pixels:
    # class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 2 / (3 + 2 - 2) = 2/3.
    assert r["pixel_acc"] == pytest.approx(5 / 7)
    assert r["miou"] == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)


def test_classification_accuracy():
    m = task_meter(TaskSpec("c", "classification", 4))
    m.update(np.eye(4)[[0, 1, 2, 3]], np.array([0, 1, 3, 3]))
    assert m.result() == {"accuracy": 0.75}


def test_depth_errors():
    m = task_meter(TaskSpec("d", "depth"))
    m.update(np.array([[[[1.0, 3.0]]]]), np.array([[[[2.0, 2.0]]]]))
    r = m.result()
    assert r["abs_err"] == pytest.approx(1.0) and r["rel_err"] == pytest.approx(0.5) and r["mse"] == pytest.approx(1.0)


def test_normal_angles_in_degrees():
    m = task_meter(TaskSpec("n", "normal"))
    target = np.zeros((1, 3, 1, 2))
    target[0, 2] = 1.0
    pred = np.zeros((1, 3, 1, 2))
    pred[0, 2, 0, 0] = 5.0  # same direction, not unit length: 0 degrees
    pred[0, 0, 0, 1] = 1.0  # perpendicular: 90 degrees
    m.update(pred, target)
    r = m.result()
    assert r["mean_angle"] == pytest.approx(45.0)
    assert r["within_11.25"] == pytest.approx(0.5)


def test_edge_max_f_by_hand():
    m = task_meter(TaskSpec("e", "edge"))
    target = np.array([[[[1, 1, 0, 0]]]], dtype=float)
    pred = np.array([[[[0.9, 0.3, 0.6, 0.1]]]])
    m.update(pred, target)
    # Threshold 0.9: P=1, R=1/2, F=2/3. Threshold 0.3: P=2/3, R=1, F=0.8. Best 0.8.
    assert m.result()["max_f"] == pytest.approx(0.8)


def test_constant_predictors():
    seg = TaskSpec("s", "segmentation", 3)
    train = np.array([[[2, 2, 1], [0, 2, IGNORE_INDEX]]])
    pred = constant_prediction(seg, train, (2, 3, 4, 4))
    assert pred.shape == (2, 3, 4, 4) and (pred.argmax(1) == 2).all()
    depth = constant_prediction(TaskSpec("d", "depth"), np.array([1.0, 2.0, 10.0]), (1, 1, 2, 2))
    assert (depth == 2.0).all()
    normals = np.zeros((2, 3, 1, 1))
    normals[0, 0] = normals[1, 2] = 1.0
    n = constant_prediction(TaskSpec("n", "normal"), normals, (1, 3, 1, 1))
    np.testing.assert_allclose(n.ravel(), [2**-0.5, 0, 2**-0.5], rtol=1e-6)


def test_squeeze_loss_is_eq_9():
    band = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    logits = torch.zeros(2, 3, 3)
    logits[1] = 10.0  # task 1: about 3 edges on, task 0: 3 x 0.5
    assert float(squeeze_loss(logits, band, kappa=1.0)) == pytest.approx(0.5 + (3 * torch.sigmoid(torch.tensor(10.0)).item() - 1))
    assert float(squeeze_loss(logits, band, kappa=5.0)) == 0.0


# ------------------------------------------------------------------ the paper's full metric set
def test_labels_outside_the_classes_are_a_data_error():
    m = task_meter(TaskSpec("s", "segmentation", 3))
    with pytest.raises(DataError, match=r"\[0, 2\]"):
        m.update(_onehot(np.array([[[0, 1]]]), 3), np.array([[[0, 3]]]))
    with pytest.raises(DataError, match="do not fit"):
        m.update(_onehot(np.array([[[0, 1]]]), 3), np.array([[0, 1]]))
    with pytest.raises(DataError, match="no valid target"):
        m.update(_onehot(np.array([[[0, 1]]]), 3), np.full((1, 1, 2), IGNORE_INDEX))
        m.result()


def test_depth_deltas_and_errors_skip_invalid_pixels():
    gt = np.array([2.0, 2.0, 0.0, 4.0, 1.0]).reshape(1, 1, 1, 5)
    pred = np.array([1.1, 3.0, 7.0, -1.0, 1.2]).reshape(1, 1, 1, 5)
    m = task_meter(TaskSpec("d", "depth"))
    m.update(pred, gt)
    r = m.result()
    # Valid: pixels 0, 1, 3, 4. |err| = 0.9, 1, 5, 0.2; ratios 1.818, 1.5, miss (pred <= 0), 1.2.
    assert r["abs_err"] == pytest.approx(7.1 / 4)
    assert r["mse"] == pytest.approx((0.81 + 1 + 25 + 0.04) / 4)
    assert r["rel_err"] == pytest.approx((0.45 + 0.5 + 1.25 + 0.2) / 4)
    assert (r["delta_1.25"], r["delta_1.25^2"], r["delta_1.25^3"]) == pytest.approx((0.25, 0.5, 0.75))
    # The invalid pixel's prediction is irrelevant.
    other = task_meter(TaskSpec("d", "depth"))
    other.update(np.where(gt > 0, pred, -123.0), gt)
    assert other.result() == r


def test_depth_delta_threshold_is_strict_and_all_invalid_is_an_error():
    m = task_meter(TaskSpec("d", "depth"))
    m.update(np.array([[[[2.5, 2.0]]]]), np.array([[[[2.0, 2.0]]]]))  # ratios 1.25 (not within), 1
    assert m.result()["delta_1.25"] == 0.5 and m.result()["delta_1.25^2"] == 1.0
    empty = task_meter(TaskSpec("d", "depth"))
    empty.update(np.ones((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)))
    with pytest.raises(DataError, match="no valid target"):
        empty.result()


def test_normals_skip_zero_targets_and_report_every_threshold():
    target = np.zeros((1, 3, 1, 4))
    target[0, 2, 0, :3] = 1.0  # pixel 3: zero vector, invalid
    pred = np.zeros((1, 3, 1, 4))
    pred[0, 2, 0, 0] = 1.0                                            # 0 degrees
    pred[0, :, 0, 1] = [np.sin(np.radians(20)), 0, np.cos(np.radians(20))]  # 20 degrees
    pred[0, :, 0, 2] = [1.0, 0, 0]                                    # 90 degrees
    pred[0, :, 0, 3] = [-1.0, 0, 0]                                   # ignored
    m = task_meter(TaskSpec("n", "normal"))
    m.update(pred, target)
    r = m.result()
    assert r["mean_angle"] == pytest.approx(110 / 3) and r["median_angle"] == pytest.approx(20)
    assert (r["within_11.25"], r["within_22.5"], r["within_30"]) == pytest.approx((1 / 3, 2 / 3, 2 / 3))


def _edge_case():
    target = np.zeros((1, 1, 10, 10))
    target[0, 0, :, 5] = 1.0       # a vertical ground-truth edge, 10 pixels
    pred = np.zeros((1, 1, 10, 10))
    pred[0, 0, :, 6] = 0.8         # predicted one pixel to the right
    pred[0, 0, 0, 0] = 0.9         # a spurious response far from it
    return pred, target


def test_edge_ods_f_with_a_one_pixel_tolerance_by_hand():
    pred, target = _edge_case()
    m = task_meter(TaskSpec("e", "edge"), edge_max_dist=1.2 / np.hypot(10, 10))  # 1.2 pixels
    m.update(pred, target)
    r = m.result()
    # Thresholds in (0, 0.8]: 11 predicted, 10 near the edge: P = 10/11; every edge pixel has a
    # prediction 1 pixel away: R = 1; F = 20/21. Threshold 0: P = 30/100 (columns 4-6), F = 6/13.
    assert r["ods_f"] == pytest.approx(20 / 21)
    # Zero tolerance: no predicted pixel is on the edge; the best is everything positive at
    # threshold 0: P = 10/100, R = 1, F = 2/11.
    assert r["max_f"] == pytest.approx(2 / 11)
    exact = task_meter(TaskSpec("e", "edge"), edge_max_dist=0)
    exact.update(pred, target)
    assert exact.result()["ods_f"] == pytest.approx(2 / 11)


def _brute_force_ods_f(pred, target, radius):
    """The definition, pixel pair by pixel pair, one threshold at a time."""
    best = 0.0
    for t in np.linspace(0.0, 1.0, 101):
        tp_p = n_p = tp_r = n_r = 0
        for p, g in zip(pred[:, 0], target[:, 0] > 0.5):
            on = np.argwhere(p >= t)
            gt = np.argwhere(g)
            d = np.sqrt(((on[:, None, :] - gt[None, :, :]) ** 2).sum(-1)) if len(on) and len(gt) else None
            n_p, n_r = n_p + len(on), n_r + len(gt)
            if d is not None:
                tp_p += int((d.min(axis=1) <= radius).sum())
                tp_r += int((d.min(axis=0) <= radius).sum())
        prec, rec = tp_p / max(n_p, 1), tp_r / max(n_r, 1)
        best = max(best, 2 * prec * rec / max(prec + rec, 1e-12))
    return best


def test_edge_ods_f_matches_the_brute_force_definition():
    rng = np.random.default_rng(0)
    target = (rng.random((3, 1, 12, 12)) < 0.08).astype(float)
    target[2] = 0.0  # an image without edges
    pred = np.clip(target * 0.5 + rng.random(target.shape) * 0.6 - 0.1, -0.2, 1.2)
    radius = 0.14 * np.hypot(12, 12)  # about 2.4 pixels
    m = task_meter(TaskSpec("e", "edge"), edge_max_dist=0.14)
    m.update(pred[:2], target[:2])
    m.update(pred[2:], target[2:])
    assert m.result()["ods_f"] == pytest.approx(_brute_force_ods_f(pred, target, radius))
    assert m.result()["ods_f"] > m.result()["max_f"]


def test_edge_default_tolerance_is_exact_on_small_images():
    # 0.0075 x the diagonal of 32 x 32 is a third of a pixel: ODS F is the exact-pixel F.
    rng = np.random.default_rng(1)
    target = (rng.random((2, 1, 32, 32)) < 0.1).astype(float)
    m = task_meter(TaskSpec("e", "edge"))
    m.update(rng.random(target.shape) * 0.5 + target * 0.3, target)
    assert m.result()["ods_f"] == m.result()["max_f"] > 0.2


def test_saliency_max_f_and_max_miou_by_hand():
    target = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=float).reshape(2, 1, 1, 4)
    pred = np.array([[0.9, 0.4, 0.6, 0.1], [0.3, 0.2, 0.1, 0.0]]).reshape(2, 1, 1, 4)
    m = task_meter(TaskSpec("sal", "saliency"))
    m.update(pred[:1], target[:1])
    m.update(pred[1:], target[1:])
    r = m.result()
    # Per-image IoU at a threshold in (0.3, 0.4]: image 1 predicts {0.9, 0.4, 0.6}: 2/3; image 2
    # predicts nothing and has nothing salient: 1 (ASTMT). Mean 5/6, the best threshold.
    assert r["max_miou"] == pytest.approx(5 / 6)
    # Pooled over pixels, same threshold: P = 2/3, R = 1, F = 0.8 (the best).
    assert r["max_f"] == pytest.approx(0.8)
    assert PRIMARY["saliency"][0] in r and PRIMARY["edge"][0] == "ods_f"


def test_bad_meter_configuration_and_shapes():
    with pytest.raises(ConfigError, match="edge_max_dist"):
        task_meter(TaskSpec("e", "edge"), edge_max_dist=-0.1)
    with pytest.raises(DataError, match=r"\(B, C, H, W\)"):
        task_meter(TaskSpec("d", "depth")).update(np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 3)))


def test_every_kind_reports_its_delta_metrics_and_primary():
    rng = np.random.default_rng(2)
    cases = {
        "segmentation": (rng.random((2, 3, 4, 4)), rng.integers(0, 3, (2, 4, 4))),
        "classification": (rng.random((5, 3)), rng.integers(0, 3, 5)),
        "depth": (rng.random((2, 1, 4, 4)) + 0.5, rng.random((2, 1, 4, 4)) + 0.5),
        "normal": (rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))),
        "edge": (rng.random((2, 1, 4, 4)), (rng.random((2, 1, 4, 4)) < 0.3).astype(float)),
        "saliency": (rng.random((2, 1, 4, 4)), (rng.random((2, 1, 4, 4)) < 0.5).astype(float)),
    }
    for kind, (pred, target) in cases.items():
        m = task_meter(TaskSpec("t", kind, 3 if kind in ("segmentation", "classification") else None))
        m.update(pred, target)
        r = m.result()
        assert set(DELTA_METRICS[kind]) <= set(r) and PRIMARY[kind][0] in r, kind
        metric, higher = PRIMARY[kind]
        assert (metric in LOWER_IS_BETTER) == (not higher), kind
        assert all(isinstance(v, float) and np.isfinite(v) for v in r.values()), kind


# ------------------------------------------------------------------ relative performance (Eq. 10-11)
# NYU-v2, Table 11 (full results) of the paper: Single-Task and Shared Bottom.
_SINGLE = {"sem": {"miou": 27.5, "pixel_acc": 58.9},
           "dep": {"abs_err": 0.62, "rel_err": 0.25, "delta_1.25": 57.9, "delta_1.25^2": 85.8, "delta_1.25^3": 95.7},
           "norm": {"mean_angle": 17.5, "median_angle": 15.2, "within_11.25": 34.9, "within_22.5": 73.3,
                    "within_30": 85.7}}
_SHARED_BOTTOM = {"sem": {"miou": 24.1, "pixel_acc": 57.2},
                  "dep": {"abs_err": 0.58, "rel_err": 0.23, "delta_1.25": 62.4, "delta_1.25^2": 88.2,
                          "delta_1.25^3": 96.5},
                  "norm": {"mean_angle": 16.6, "median_angle": 13.4, "within_11.25": 42.5, "within_22.5": 73.2,
                           "within_30": 84.6}}


def test_relative_performance_reproduces_the_papers_table_2():
    per_task = {t: relative_performance(_SHARED_BOTTOM[t], _SINGLE[t]) for t in _SINGLE}
    # Table 2 (from the rounded Table 11 values): -7.6, +5.2, +7.5; Δ_T = +1.7.
    assert per_task == pytest.approx({"sem": -7.6, "dep": 5.2, "norm": 7.5}, abs=0.05)
    assert delta_t(per_task) == pytest.approx(1.7, abs=0.05)
    assert relative_performance(_SINGLE["dep"], _SINGLE["dep"]) == 0.0


def test_relative_performance_by_hand_and_its_errors():
    # miou +10 % better, abs_err 0.4 vs 0.5: 20 % lower, which is better: (10 + 20) / 2.
    assert relative_performance({"miou": 0.55, "abs_err": 0.4}, {"miou": 0.5, "abs_err": 0.5, "x": 1.0}) \
        == pytest.approx(15.0)
    # The set passed decides the sign: abs_err treated as higher-is-better.
    assert relative_performance({"abs_err": 0.4}, {"abs_err": 0.5}, set()) == pytest.approx(-20.0)
    assert delta_t({"a": 15.0, "b": -5.0, "c": 2.0}) == pytest.approx(4.0)
    with pytest.raises(DataError, match="'rel_err' has no single-task baseline"):
        relative_performance({"rel_err": 0.2}, {"abs_err": 0.5})
    with pytest.raises(DataError, match="is 0.0"):
        relative_performance({"miou": 0.2}, {"miou": 0.0})
    with pytest.raises(DataError):
        relative_performance({}, {"miou": 0.5})
    with pytest.raises(ValueError):  # DataError is a ValueError too
        delta_t({})
    assert {"abs_err", "rel_err", "mse", "mean_angle", "median_angle"} <= LOWER_IS_BETTER


def test_constant_depth_is_the_median_of_valid_pixels():
    depth = constant_prediction(TaskSpec("d", "depth"), np.array([0.0, 0.0, 0.0, 1.0, 3.0, 4.0]), (1, 1, 1, 1))
    assert depth.item() == 3.0
    with pytest.raises(DataError, match="no valid pixel"):
        constant_prediction(TaskSpec("d", "depth"), np.zeros(3), (1, 1, 1, 1))


def test_the_kind_table_covers_every_kind_of_the_spec():
    assert set(TRAINING) == set(KINDS)
    for kind, entry in TRAINING.items():
        assert entry.primary in entry.delta_metrics, kind
        assert PRIMARY[kind] == (entry.primary, entry.higher_is_better)

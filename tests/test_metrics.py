"""Task metrics on small hand-checked inputs, and the constant predictors they are compared with."""

import numpy as np
import pytest
import torch

from dagc.spec import TaskSpec
from dagc.trainer.losses import IGNORE_INDEX, squeeze_loss
from dagc.trainer.metrics import TaskMeter, constant_prediction


def _onehot(labels, classes):
    return np.moveaxis(np.eye(classes)[labels], -1, 1)


def test_segmentation_miou_and_pixel_accuracy_by_hand():
    task = TaskSpec("s", "segmentation", 3)
    target = np.array([[[0, 0, 1, 1], [2, 2, 2, IGNORE_INDEX]]])
    pred = np.array([[[0, 1, 1, 1], [2, 2, 0, 1]]])
    m = TaskMeter(task)
    # Split across two updates: the meter must accumulate, not average per batch.
    m.update(_onehot(pred[:, :1], 3), target[:, :1])
    m.update(_onehot(pred[:, 1:], 3), target[:, 1:])
    r = m.result()
    # 7 labelled pixels, 5 right. IoU = TP / (target + pred - TP) over labelled pixels:
    # class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 2 / (3 + 2 - 2) = 2/3.
    assert r["pixel_acc"] == pytest.approx(5 / 7)
    assert r["miou"] == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)


def test_classification_accuracy():
    m = TaskMeter(TaskSpec("c", "classification", 4))
    m.update(np.eye(4)[[0, 1, 2, 3]], np.array([0, 1, 3, 3]))
    assert m.result() == {"accuracy": 0.75}


def test_depth_errors():
    m = TaskMeter(TaskSpec("d", "depth"))
    m.update(np.array([[[[1.0, 3.0]]]]), np.array([[[[2.0, 2.0]]]]))
    r = m.result()
    assert r["abs_err"] == pytest.approx(1.0) and r["rel_err"] == pytest.approx(0.5) and r["mse"] == pytest.approx(1.0)


def test_normal_angles_in_degrees():
    m = TaskMeter(TaskSpec("n", "normal"))
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
    m = TaskMeter(TaskSpec("e", "edge"))
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

"""Task losses: invalid depth / normal pixels are skipped, valid batches train exactly as before."""

import pytest
import torch
import torch.nn.functional as F

from dagc.errors import ConfigError
from dagc.spec import TaskSpec
from dagc.trainer.kinds import task_loss
from dagc.trainer.losses import IGNORE_INDEX, valid_normal

DEPTH = TaskSpec("d", "depth")
NORMAL = TaskSpec("n", "normal")


def _grad(task, pred, target, dense_loss="l2"):
    pred = pred.clone().requires_grad_(True)
    loss = task_loss(task, pred, target, dense_loss)
    loss.backward()
    return loss.detach(), pred.grad


@pytest.mark.parametrize("dense_loss,plain", [("l2", F.mse_loss), ("l1", F.l1_loss)])
def test_all_valid_targets_give_exactly_the_plain_mean(dense_loss, plain):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 1, 5, 5, generator=g), torch.rand(2, 1, 5, 5, generator=g) + 0.1
    assert torch.equal(task_loss(DEPTH, pred, target, dense_loss), plain(pred, target))
    npred, ntarget = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    assert torch.equal(task_loss(NORMAL, npred, ntarget, dense_loss), plain(npred, ntarget))


@pytest.mark.parametrize("dense_loss", ["l2", "l1"])
def test_invalid_depth_pixels_change_neither_loss_nor_gradient(dense_loss):
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 1, 4, 4, generator=g), torch.rand(2, 1, 4, 4, generator=g) + 0.5
    invalid = torch.zeros_like(target, dtype=torch.bool)
    invalid[0, 0, 1, :3] = invalid[1, 0, 3, 2] = True
    masked_target = target.masked_fill(invalid, 0.0)
    loss, grad = _grad(DEPTH, pred, masked_target, dense_loss)
    # The mean over the 28 valid pixels only ...
    valid = ~invalid
    plain = F.mse_loss if dense_loss == "l2" else F.l1_loss
    want = plain(pred[valid], target[valid])
    assert loss == pytest.approx(float(want), rel=1e-6)
    # ... whatever the predictions or the (NaN, negative) invalid targets there are.
    other_pred = pred.masked_fill(invalid, 100.0)
    other_target = masked_target.clone()
    other_target[0, 0, 1, 0], other_target[0, 0, 1, 1] = float("nan"), -5.0
    other_loss, other_grad = _grad(DEPTH, other_pred, other_target, dense_loss)
    assert other_loss == pytest.approx(float(loss), rel=1e-6)
    assert (grad[invalid] == 0).all() and (other_grad[invalid] == 0).all()
    torch.testing.assert_close(grad[valid], other_grad[valid])
    assert (grad[valid] != 0).any()


def test_zero_normal_targets_are_skipped_across_all_channels():
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(1, 3, 3, 3, generator=g)
    target = F.normalize(torch.randn(1, 3, 3, 3, generator=g), dim=1)
    target[0, :, 0, 0] = 0.0  # the zero vector: invalid
    target[0, 1, 2, 2] = 0.0  # one zero component only: still valid
    loss, grad = _grad(NORMAL, pred, target)
    keep = valid_normal(target).expand_as(target)
    assert int(keep.sum()) == 3 * 8
    assert loss == pytest.approx(float(F.mse_loss(pred[keep], target[keep])), rel=1e-6)
    assert (grad[0, :, 0, 0] == 0).all() and (grad[keep] != 0).all()


def test_a_batch_without_valid_pixels_has_zero_loss_and_gradient():
    loss, grad = _grad(DEPTH, torch.randn(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert float(loss) == 0.0 and (grad == 0).all()


def test_edge_and_saliency_maps_are_not_masked():
    # Zeros are negatives of a {0, 1} map, not missing labels: every pixel counts.
    pred, target = torch.full((1, 1, 2, 2), 0.5), torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    for kind in ("edge", "saliency"):
        assert float(task_loss(TaskSpec("m", kind), pred, target)) == pytest.approx(0.25)


def test_segmentation_ignores_unlabelled_pixels():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 3, 2, 2, generator=g)
    labels = torch.tensor([[[0, 2], [1, IGNORE_INDEX]]])
    seg = TaskSpec("s", "segmentation", 3)
    other = logits.clone()
    other[0, :, 1, 1] = torch.tensor([9.0, -9.0, 0.0])
    assert torch.equal(task_loss(seg, logits, labels), task_loss(seg, other, labels))


def test_unknown_dense_loss_is_a_config_error():
    with pytest.raises(ConfigError, match="dense_loss must be one of"):
        task_loss(DEPTH, torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1), "huber")

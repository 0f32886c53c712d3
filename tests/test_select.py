"""The one-read-in, one-read-out squeeze (`dagc.trainer.losses.select_loss`, `--select-weight`):
a price on every read-in and read-out beyond the one Algorithm 1 deploys."""

import pytest
import torch

from dagc.errors import ConfigError
from dagc.spec import TaskSpec, preset
from dagc.trainer.losses import select_loss
from dagc.trainer.network import CentralNetwork
from dagc.trainer.stages import search_step
from dagc.trainer.train import TrainConfig

SPEC = preset("tiny", (TaskSpec("seg", "segmentation", 3), TaskSpec("cls", "classification", 4)), in_channels=1)


def test_one_saturated_read_in_and_read_out_per_task_is_free_and_each_extra_one_costs_one():
    n = 6
    one = torch.full((2, n), -30.0)
    one[:, 2] = 30.0
    assert float(select_loss(one, one)) == pytest.approx(0.0, abs=1e-6)
    two = one.clone()
    two[0, 4] = 30.0  # task 0 saturates a second read-out
    assert float(select_loss(one, two)) == pytest.approx(1.0, abs=1e-6)
    assert float(select_loss(two, two)) == pytest.approx(2.0, abs=1e-6)


def test_the_gradient_lowers_every_read_out_of_a_task_over_one_and_none_of_a_task_within():
    alpha = torch.full((2, 6), -30.0, requires_grad=True)
    beta = torch.zeros(2, 6)
    beta[1] = -30.0
    beta[1, 0] = 0.0  # task 1: Σσ(β) = 0.5, within one
    beta.requires_grad_(True)
    select_loss(alpha, beta).backward()
    assert (beta.grad[0] > 0).all() and (beta.grad[1] == 0).all()


def _net():
    torch.manual_seed(0)
    return CentralNetwork(SPEC)


def test_a_search_step_with_the_select_weight_moves_the_read_outs_down_where_the_paper_s_does_not():
    x = torch.randn(4, 1, 32, 32)
    targets = {"seg": torch.randint(0, 3, (4, 32, 32)), "cls": torch.randint(0, 4, (4,))}
    read_outs = {}
    for weight in (0.0, 1.0):
        net = _net()
        with torch.no_grad():
            net.arch_beta.fill_(2.0)  # every read-out well above one: Σσ(β) ≈ 0.88 N
        opt = torch.optim.SGD([net.arch_beta], lr=1.0)  # Adam's first step is lr·sign(g): blind to the size
        losses = search_step(net, opt, x, targets, 0.0, 1.0, select_weight=weight)
        assert ("select" in losses) == (weight > 0)
        read_outs[weight] = torch.sigmoid(net.arch_beta.detach()).sum(dim=1)
    assert (read_outs[1.0] < read_outs[0.0]).all()


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), True])
def test_a_bad_select_weight_is_refused(value):
    with pytest.raises(ConfigError, match="select_weight must be a number >= 0"):
        TrainConfig(select_weight=value)

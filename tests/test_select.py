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


def test_only_the_leading_read_in_and_read_out_of_each_task_are_free():
    n = 6
    one = torch.full((2, n), -30.0)
    one[:, 2] = 30.0
    assert float(select_loss(one, one)) == pytest.approx(0.0, abs=1e-6)
    two = one.clone()
    two[0, 4] = 30.0  # task 0 saturates a second read-out: it costs one
    assert float(select_loss(one, two)) == pytest.approx(1.0, abs=1e-6)
    half = one.clone()
    half[1, 0] = 0.0  # task 1: a runner-up at σ = 0.5 costs 0.5, the leader nothing
    assert float(select_loss(half, two)) == pytest.approx(1.5, abs=1e-6)


def test_the_gradient_lowers_every_runner_up_and_leaves_the_leader_to_the_task():
    alpha = torch.full((2, 6), -30.0, requires_grad=True)
    beta = torch.zeros(2, 6)
    beta[:, 3] = 1.0  # the leader of each task
    beta.requires_grad_(True)
    select_loss(alpha, beta).backward()
    runners_up = [i for i in range(6) if i != 3]
    assert (beta.grad[:, runners_up] > 0).all() and (beta.grad[:, 3] == 0).all()


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


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan"), True])
def test_a_bad_select_start_is_refused(value):
    with pytest.raises(ConfigError, match="select_after must be a fraction of the search in"):
        TrainConfig(select_after=value)


def test_the_select_squeeze_starts_after_its_fraction_of_the_search():
    cfg = TrainConfig(select_weight=0.2, select_after=0.5, warmup_iters=1, search_iters=10, finetune_iters=1)
    assert [cfg.search_select_weight(s) for s in range(10)] == [0.0] * 5 + [0.2] * 5

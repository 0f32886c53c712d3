"""A FLOPs budget for the search (`dagc.trainer.budget`, issue 21): the cost-aware squeeze loss,
the reduction that stops once a task fits, and the option as a user gives it."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from dagc.checkpoint import load_checkpoint
from dagc.compiler.compile import preview_manifest, run_budget, summary
from dagc.costs import block_flops, head_costs, supernet_costs
from dagc.errors import ConfigError
from dagc.spec import TaskSpec, preset
from dagc.trainer.budget import MFLOPS, fits, loss_costs, parse_budget, task_budgets
from dagc.trainer.losses import squeeze_loss
from dagc.trainer.reduction import flow_based_reduction
from dagc.trainer.topology import close_masks, flow_band
from dagc.trainer.train import TrainConfig, train

SPEC = preset("tiny", (TaskSpec("seg", "segmentation", 3), TaskSpec("cls", "classification", 4)), in_channels=1)
FAST = dict(warmup_iters=2, search_iters=4, finetune_iters=2, batch_size=4, n_train=16, n_test=8)


def test_unit_costs_on_gamma_with_budget_kappa_are_eq_9_exactly():
    torch.manual_seed(0)
    k, n = 3, SPEC.n_states
    gamma, alpha, beta = torch.randn(k, n, n, requires_grad=True), torch.randn(k, n), torch.randn(k, n)
    band = torch.as_tensor(flow_band(n, SPEC.flow_constant), dtype=torch.float32)
    kappa = 4.0
    eq9 = sum(torch.clamp((torch.sigmoid(gamma[t]) * band).sum() - kappa, min=0) for t in range(k))
    zero = torch.zeros(n)
    priced = squeeze_loss(gamma, band, torch.full((k,), kappa), (alpha, zero, beta, zero))
    assert torch.equal(priced, squeeze_loss(gamma, band, kappa))
    assert torch.allclose(priced, eq9, rtol=0, atol=1e-6) and float(priced.detach()) > 0
    (g1,) = torch.autograd.grad(priced, gamma)
    (g2,) = torch.autograd.grad(eq9, gamma)
    assert torch.allclose(g1, g2, atol=1e-7)


def test_block_costs_add_up_to_the_supernet_and_price_read_ins_and_read_outs():
    g, a, b = block_flops(SPEC)
    assert (g[flow_band(SPEC.n_states, SPEC.flow_constant) == 0] == 0).all() and (a > 0).all() and (b > 0).all()
    per_task = supernet_costs(SPEC, ["seg"])["flops"] - head_costs(SPEC, "seg")["flops"]
    assert g.sum() + a.sum() + b.sum() == per_task
    g_t, a_t, b_t, budgets = loss_costs(SPEC, 30 * MFLOPS)
    assert torch.allclose(budgets, torch.tensor([30 - head_costs(SPEC, t)["flops"] / MFLOPS for t in SPEC.task_names]))
    alpha = torch.zeros(2, SPEC.n_states, requires_grad=True)
    beta = torch.zeros(2, SPEC.n_states, requires_grad=True)
    gamma = torch.zeros(2, SPEC.n_states, SPEC.n_states, requires_grad=True)
    loss = squeeze_loss(gamma, g_t, budgets * 0, (alpha, a_t, beta, b_t))
    loss.backward()
    assert float(loss.detach()) > 0 and (alpha.grad > 0).all() and (beta.grad > 0).all()  # a read-in costs what it costs
    assert float(squeeze_loss(gamma, g_t, budgets * 0 + 1e6, (alpha, a_t, beta, b_t)).detach()) == 0  # within budget: free


def _scores(seed):
    rng = np.random.default_rng(seed)
    band = flow_band(SPEC.n_states, SPEC.flow_constant)
    return band * rng.uniform(0.05, 0.95, band.shape), rng.uniform(0.05, 0.95, SPEC.n_states), \
        rng.uniform(0.05, 0.95, SPEC.n_states)


def _cost(task, masks):
    g_c, a_c, b_c = block_flops(SPEC)
    g, a, b = close_masks(*masks)
    return (g * g_c).sum() + (a * a_c).sum() + (b * b_c).sum() + head_costs(SPEC, task)["flops"]


@pytest.mark.parametrize("seed", range(4))
def test_the_reduction_stops_once_a_task_fits_and_the_budget_sets_the_size(seed):
    scores = _scores(seed)
    paper = flow_based_reduction(*scores)
    everything = flow_based_reduction(*scores, fits=fits(SPEC, "seg", 1e15))
    nothing = flow_based_reduction(*scores, fits=fits(SPEC, "seg", 1.0))
    assert all((x == y).all() for x, y in zip(nothing, paper))  # never fits: the paper's stop
    assert sum(m.sum() for m in everything) >= sum(m.sum() for m in paper)
    lo, hi = _cost("seg", paper), _cost("seg", everything)
    sizes = []
    for budget in np.linspace(lo, hi, 5):
        got = flow_based_reduction(*scores, fits=fits(SPEC, "seg", budget))
        assert _cost("seg", got) <= budget + 1e-6
        sizes.append(_cost("seg", got))
    assert sizes == sorted(sizes)  # a larger budget never gives a smaller model


@pytest.mark.parametrize("text, flops", [("30MFLOPs", 30e6), ("1.5 gflops", 1.5e9), ("2e5FLOPs", 2e5),
                                         ("7KFLOPs", 7e3)])
def test_budgets_parse_with_their_units(text, flops):
    assert parse_budget(text) == flops


@pytest.mark.parametrize("text, words", [("2ms", "is a latency: it needs a latency --cost-target"), ("30", "a unit"),
                                         ("-3MFLOPs", "a unit"), ("0MFLOPs", "positive"), ("MFLOPs", "a unit")])
def test_a_bad_budget_is_refused_in_the_configuration(text, words):
    with pytest.raises(ConfigError, match=words):
        TrainConfig(budget=text)


def test_a_budget_below_a_head_or_beside_another_stopping_rule_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="below task 'segmentation'"):
        train(TrainConfig(budget="1KFLOPs", **FAST), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="drop --target-sparsity"):
        TrainConfig(budget="30MFLOPs", target_sparsity=0.5)
    with pytest.raises(ConfigError, match="below task 'seg'"):
        task_budgets(SPEC, head_costs(SPEC, "seg")["flops"])
    res = subprocess.run([sys.executable, "-m", "dagc", "train", "--out", str(tmp_path / "c"), "--budget", "2ms"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "needs a latency --cost-target" in res.stderr
    assert not (tmp_path / "c").exists()


def test_a_budgeted_run_records_its_budget_and_keeps_what_fits(tmp_path):
    """Everything fits a huge budget: the reduction keeps every edge between N_α and N_β, so the
    sub-networks are at least as large as Algorithm 1's own stop leaves them."""
    paper = train(TrainConfig(**FAST), tmp_path / "paper", progress=False)
    big = train(TrainConfig(budget="1000GFLOPs", **FAST), tmp_path / "big", progress=False)
    assert load_checkpoint(tmp_path / "big" / "checkpoint.safetensors").json("config")["budget"] == "1000GFLOPs"
    for t in paper["topology"]:
        assert big["topology"][t]["S"] >= paper["topology"][t]["S"]
    assert sum(big["topology"][t]["S"] for t in big["topology"]) > sum(paper["topology"][t]["S"] for t in paper["topology"])
    # compile and inspect say what each task's model costs against the budget
    ckpt = tmp_path / "big" / "checkpoint.safetensors"
    assert run_budget(ckpt) == 1e12 and run_budget(tmp_path / "paper" / "checkpoint.safetensors") is None
    line = [x for x in summary(preview_manifest(ckpt), run_budget(ckpt)).splitlines() if x.startswith("budget:")]
    assert line == ["budget: 1e+06 MFLOPs per task model: " + ", ".join(
        f"{t} {c.flops / 1e6:.2f} (fits)" for t, c in preview_manifest(ckpt).costs.per_task.items())]
    tight = summary(preview_manifest(ckpt), 1e6)
    assert all(f"{t} " in tight for t in big["topology"]) and "over)" in tight

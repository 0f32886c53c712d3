"""The central network: stacked execution equals running the tasks one at a time."""

import copy

import pytest
import torch
from compiler_cases import random_masks
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dagc.errors import DataError, SpecError
from dagc.spec import StateSpec, TaskSpec, preset
from dagc.trainer.batchnorm import batch_statistics
from dagc.trainer.network import CentralNetwork, TaskBatchNorm

DENSE = [TaskSpec("seg", "segmentation", 4), TaskSpec("depth", "depth"), TaskSpec("normal", "normal")]
CLS = [TaskSpec("a", "classification", 3), TaskSpec("b", "classification", 5),
       TaskSpec("c", "classification", 2)]


def _loss(name, y):
    # Any function that depends on every output element and differs per task.
    return (y.double() ** 2).mean() * (1 + len(name)) + y.double().mean()


def _run_stacked(net, x, tasks):
    out = net(x, tasks=tasks)
    sum(_loss(t, out[t]) for t in tasks).backward()
    return out


def _run_one_by_one(net, x, tasks):
    out = {}
    for t in tasks:
        xt = x if net.spec.shared_input else x[[list(net.spec.task_names).index(t)]]
        out[t] = net(xt, tasks=[t])[t]
        _loss(t, out[t]).backward()
    return out


def _assert_same(net_a, net_b, out_a, out_b, tol=1e-9):
    for t in out_a:
        torch.testing.assert_close(out_a[t], out_b[t], rtol=tol, atol=tol)
    grads_a = {n: p.grad for n, p in net_a.named_parameters()}
    for n, p in net_b.named_parameters():
        ga, gb = grads_a[n], p.grad
        if ga is None or gb is None:
            assert (ga is None or not ga.any()) and (gb is None or not gb.any()), n
        else:
            torch.testing.assert_close(ga, gb, rtol=tol, atol=tol, msg=f"gradient of {n}")
    bufs_a = dict(net_a.named_buffers())
    for n, b in net_b.named_buffers():
        torch.testing.assert_close(bufs_a[n], b, rtol=tol, atol=tol, msg=f"buffer {n}")


def _pair(spec, seed=0):
    torch.manual_seed(seed)
    net = CentralNetwork(spec).double()
    with torch.no_grad():
        for p in net.arch_parameters():
            p.normal_()
    return net, copy.deepcopy(net)


def test_task_batchnorm_matches_pytorch_batchnorm():
    torch.manual_seed(0)
    ours, ref = TaskBatchNorm(6).double(), nn.BatchNorm2d(6).double()
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
        ref.weight.copy_(ours.weight), ref.bias.copy_(ours.bias)
    for _ in range(3):
        x = torch.randn(4, 6, 5, 5, dtype=torch.double) * 3 + 1
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean[0], ref.running_mean)
    torch.testing.assert_close(ours.running_var[0], ref.running_var)
    ours.eval(), ref.eval()
    x = torch.randn(4, 6, 5, 5, dtype=torch.double)
    torch.testing.assert_close(ours(x), ref(x))


def test_task_batchnorm_keeps_running_statistics_per_task():
    torch.manual_seed(0)
    ours = TaskBatchNorm(6, tasks=3).double()
    refs = [nn.BatchNorm2d(6).double() for _ in range(3)]
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
        for r in refs:
            r.weight.copy_(ours.weight), r.bias.copy_(ours.bias)
    # Two lanes, sample-major (row b*2 + g); the first stands for tasks 2 and 0, the second for task 1.
    for _ in range(2):
        x = torch.randn(4 * 2, 6, 5, 5, dtype=torch.double) * 2 + 1
        y = ours(x, [[2, 0], [1]])
        torch.testing.assert_close(y[0::2], refs[2](x[0::2]))
        refs[0](x[0::2])
        torch.testing.assert_close(y[1::2], refs[1](x[1::2]))
    for t, r in enumerate(refs):
        torch.testing.assert_close(ours.running_mean[t], r.running_mean)
        torch.testing.assert_close(ours.running_var[t], r.running_var)
        assert int(ours.num_batches_tracked[t]) == int(r.num_batches_tracked)
    # Eval: each lane with its own task's running statistics.
    ours.eval()
    for r in refs:
        r.eval()
    x = torch.randn(3 * 3, 6, 5, 5, dtype=torch.double)
    y = ours(x, [[1], [0], [2]])
    for lane, t in enumerate((1, 0, 2)):
        torch.testing.assert_close(y[lane::3], refs[t](x[lane::3]))
    # Batch statistics in eval mode: normalised like training, nothing updated.
    before = ours.running_mean.clone()
    with batch_statistics(ours):
        y = ours(x, [[1], [0], [2]])
    torch.testing.assert_close(ours.running_mean, before)
    for lane in range(3):
        refs[0].train()
        torch.testing.assert_close(y[lane::3], refs[0](x[lane::3]))


def test_task_batchnorm_cumulative_average():
    ours = TaskBatchNorm(2, tasks=2, momentum=None).double()
    xs = [torch.randn(6, 2, 3, 3, dtype=torch.double) + i for i in range(3)]
    for x in xs:
        ours(x, [[1]])
    torch.testing.assert_close(ours.running_mean[1], torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0))
    torch.testing.assert_close(ours.running_mean[0], torch.zeros(2, dtype=torch.double))
    assert ours.num_batches_tracked.tolist() == [0, 3]


def test_soft_mode_stacked_equals_one_task_at_a_time():
    spec = preset("tiny", DENSE, input_size=(16, 16))
    a, b = _pair(spec)
    x = torch.randn(3, 3, 16, 16, dtype=torch.double)
    _assert_same(a, b, _run_stacked(a, x, spec.task_names), _run_one_by_one(b, x, spec.task_names))
    assert a.arch_gamma.grad is not None and a.arch_gamma.grad.abs().sum() > 0


def test_warmup_collapse_runs_network_once_and_matches():
    spec = preset("tiny", DENSE, input_size=(16, 16))
    a, b = _pair(spec)
    with torch.no_grad():
        for p in (*a.arch_parameters(), *b.arch_parameters()):
            p.zero_()
            p.requires_grad_(False)
    calls = []
    hook = a.edges["0_1"].conv.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    x = torch.randn(3, 3, 16, 16, dtype=torch.double)
    out_a = _run_stacked(a, x, spec.task_names)
    hook.remove()
    assert calls == [3], "warm-up with a shared input must run each edge once on B samples"
    _assert_same(a, b, out_a, _run_one_by_one(b, x, spec.task_names))


def test_per_task_inputs_stacked_equals_one_task_at_a_time():
    spec = preset("omniglot", CLS, in_channels=1, shared_input=False)
    a, b = _pair(spec, seed=1)
    x = torch.randn(3, 4, 1, 8, 8, dtype=torch.double)
    _assert_same(a, b, _run_stacked(a, x, spec.task_names), _run_one_by_one(b, x, spec.task_names))


def _closed_masks(spec):
    """Three hand-made closed masks on the tiny preset (6 states, M=3)."""
    k, n = spec.n_tasks, spec.n_states
    g, al, be = torch.zeros(k, n, n), torch.zeros(k, n), torch.zeros(k, n)
    # task 0: chain 0->1->2->3->4->5, read-out from 5 and 2.
    al[0, 0] = 1
    for i in range(5):
        g[0, i, i + 1] = 1
    be[0, 5] = be[0, 2] = 1
    # task 1: read-in into 1 and 2, 1->4, 2->4, read-out 4 (shares edge 1 with nothing).
    al[1, 1] = al[1, 2] = 1
    g[1, 1, 4] = g[1, 2, 4] = 1
    be[1, 4] = 1
    # task 2: early exit: read-in 0, 0->1, 0->2, 1->2, read-out 2; shares edges 0->1, 1->2 with task 0.
    al[2, 0] = 1
    g[2, 0, 1] = g[2, 0, 2] = g[2, 1, 2] = 1
    be[2, 2] = 1
    return g, al, be


def test_hard_mode_stacked_equals_one_task_at_a_time_and_skips_inactive_edges():
    spec = preset("tiny", DENSE, input_size=(16, 16))
    a, b = _pair(spec)
    for net in (a, b):
        net.set_masks(*_closed_masks(spec))
    seen = {}
    for key in ("0_1", "3_4", "1_4"):
        a.edges[key].conv.register_forward_hook(
            lambda m, i, o, key=key: seen.__setitem__(key, o.shape[0]))
    x = torch.randn(3, 3, 16, 16, dtype=torch.double)
    out_a = _run_stacked(a, x, spec.task_names)
    # 0->1 is used by tasks 0 and 2 (two lanes of 3), 3->4 and 1->4 by one task each.
    assert seen == {"0_1": 6, "3_4": 3, "1_4": 3}
    _assert_same(a, b, out_a, _run_one_by_one(b, x, spec.task_names))
    assert a.arch_gamma.grad is None or not a.arch_gamma.grad.any()


def test_hard_mode_output_is_independent_of_inactive_weights():
    spec = preset("tiny", DENSE, input_size=(16, 16))
    net, _ = _pair(spec)
    net.set_masks(*_closed_masks(spec))
    net.eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.double)
    before = net(x, tasks=["depth"])["depth"]
    with torch.no_grad():
        net.edges["0_1"].conv.weight.add_(1.0)  # used by seg and normal only
        net.read_in[0].conv.weight.add_(1.0)
    after = net(x, tasks=["depth"])["depth"]
    torch.testing.assert_close(before, after)


def test_outputs_have_task_shapes_and_normals_are_unit():
    spec = preset("tiny", DENSE + [TaskSpec("cls", "classification", 7)], input_size=(16, 16))
    net = CentralNetwork(spec).eval()
    out = net(torch.randn(2, 3, 16, 16))
    assert out["seg"].shape == (2, 4, 16, 16)
    assert out["depth"].shape == (2, 1, 16, 16)
    assert out["cls"].shape == (2, 7)
    torch.testing.assert_close(out["normal"].norm(dim=1), torch.ones(2, 16, 16))


def test_bad_inputs_and_masks_raise_documented_errors():
    spec = preset("tiny", DENSE, input_size=(16, 16))
    net = CentralNetwork(spec)
    with pytest.raises(DataError, match="unknown task"):
        net(torch.randn(2, 3, 16, 16), tasks=["nope"])
    with pytest.raises(DataError, match=r"\(B, 3, H, W\)"):
        net(torch.randn(2, 1, 16, 16))
    with pytest.raises(DataError, match="divisible"):
        net(torch.randn(2, 3, 18, 18))
    g, a, b = _closed_masks(spec)
    g[0, 0, 5] = 1  # outside the M=3 band
    with pytest.raises(SpecError, match="band"):
        net.set_masks(g, a, b)
    with pytest.raises(SpecError, match="shapes"):
        net.set_masks(g[:2], a, b)
    g, a, b = _closed_masks(spec)
    g[1, 3, 4] = 1  # state 3 is dead for task 1: the edge dangles
    with pytest.raises(SpecError, match="'depth' are not closed"):
        net.set_masks(g, a, b)
    g, a, b = _closed_masks(spec)
    b[2] = 0
    with pytest.raises(SpecError, match="'normal' leave no path"):
        net.set_masks(g, a, b)


def test_custom_readout_stride_smaller_than_states_upsamples():
    from dagc.spec import Spec
    spec = Spec(states=(StateSpec(4, 1), StateSpec(4, 2), StateSpec(4, 4)), readout=StateSpec(4, 2),
                flow_constant=2, tasks=(TaskSpec("d", "depth"),), input_size=(8, 8))
    out = CentralNetwork(spec)(torch.randn(2, 3, 8, 8))
    assert out["d"].shape == (2, 1, 8, 8)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 5))
def test_random_closed_masks_stacked_equals_one_task_at_a_time(seed, m):
    import numpy as np

    spec = preset("tiny", DENSE, input_size=(8, 8), flow_constant=m)
    a, b = _pair(spec, seed=seed % 1000)
    masks = random_masks(spec, np.random.default_rng(seed))
    for net in (a, b):
        net.set_masks(*masks)
    x = torch.randn(2, 3, 8, 8, dtype=torch.double, generator=torch.Generator().manual_seed(seed))
    _assert_same(a, b, _run_stacked(a, x, spec.task_names), _run_one_by_one(b, x, spec.task_names))

"""Batch-norm statistics per task (issue 26): a shared-input problem whose tasks' sub-networks differ by
construction. The compiled models, the masked supernet in eval mode and each task's stand-alone
network with its own batch norm compute the same function; after a short training each task's
eval-mode metric stays within 1 point of its batch-statistics metric, where one blend of every
task's statistics does not."""

import numpy as np
import pytest
import torch
from compiler_cases import random_network

from dagc.checkpoint import load_checkpoint, save_checkpoint
from dagc.compiler.compile import compile_checkpoint
from dagc.compiler.ir import build_graph
from dagc.compiler.passes import optimize
from dagc.errors import CheckpointError
from dagc.runtime import load
from dagc.spec import TaskSpec, preset
from dagc.trainer.batchnorm import task_batchnorms
from dagc.trainer.datasets import load_dataset
from dagc.trainer.network import CentralNetwork, load_network_tensors, network_tensors
from dagc.trainer.recalibrate import reestimate_statistics, statistics_batches, statistics_check
from dagc.trainer.stages import finetune_step, make_optimizer

TASKS = [TaskSpec("seg", "segmentation", 4), TaskSpec("edge", "edge"), TaskSpec("cls", "classification", 5)]


def _masks(spec):
    """Three closed masks on the tiny preset (6 states, M=3) whose sub-networks differ: ``seg`` is
    the chain through every state; ``edge`` shares seg's v0 and v1 but averages a read-in into v2
    and reads out at v2; ``cls`` reads in at v1 only, so its v1, which ``edge`` also computes with
    edge 1->2's block, is another value."""
    n = spec.n_states
    g, a, b = torch.zeros(3, n, n), torch.zeros(3, n), torch.zeros(3, n)
    a[0, 0] = 1
    for i in range(5):
        g[0, i, i + 1] = 1
    b[0, 5] = 1
    a[1, 0] = a[1, 2] = 1
    g[1, 0, 1] = g[1, 1, 2] = 1
    b[1, 2] = 1
    a[2, 1] = 1
    g[2, 1, 2] = g[2, 2, 3] = 1
    b[2, 3] = b[2, 2] = 1
    return g, a, b


def _batches(spec, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, *spec.input_size, generator=gen) * 1.5 + 0.3 for _ in range(n)]


def _stand_alone(net, task):
    """Task ``task``'s own network: a one-task spec with the same states, the shared weights and
    the task's masks; its batch norm is re-estimated on its own by the caller."""
    k = net.spec.task_names.index(task)
    own = CentralNetwork(preset("tiny", [net.spec.task(task)], input_size=net.spec.input_size))
    weights = dict(net.named_parameters())
    with torch.no_grad():
        for name, p in own.named_parameters():
            if not name.startswith("arch_"):
                p.copy_(weights[name])
    own.set_masks(net.mask_gamma[k:k + 1], net.mask_alpha[k:k + 1], net.mask_beta[k:k + 1])
    return own


def test_compiled_equals_supernet_equals_each_tasks_own_network(tmp_path):
    spec = preset("tiny", TASKS, input_size=(16, 16))
    net = random_network(spec, 0)
    net.set_masks(*_masks(spec))
    reestimate_statistics(net, _batches(spec, 6))
    # The statistics really are per task: block edges.1_2 is used by edge and cls on other inputs.
    bn = net.edges["1_2"].bn
    assert not torch.allclose(bn.running_mean[1], bn.running_mean[2], atol=1e-3)

    x = _batches(spec, 1, seed=7)[0]
    with torch.no_grad():
        supernet = {t: v.numpy() for t, v in net.eval()(x).items()}
        own = {}
        for t in spec.task_names:
            alone = _stand_alone(net, t)
            reestimate_statistics(alone, _batches(spec, 6))
            own[t] = alone.eval()(x)[t].numpy()
    for t in spec.task_names:
        np.testing.assert_allclose(supernet[t], own[t], rtol=1e-4, atol=1e-5, err_msg=t)

    ckpt = tmp_path / "c.safetensors"
    save_checkpoint(ckpt, network_tensors(net), spec, "finetune")
    compile_checkpoint(ckpt, tmp_path / "art")
    engine = load(tmp_path / "art", backend="onnxruntime")
    compiled = engine.run(x.numpy())
    for t in spec.task_names:
        np.testing.assert_allclose(compiled[t], own[t], rtol=1e-4, atol=1e-4, err_msg=t)
    for t in spec.task_names:  # each per-task model alone, too
        np.testing.assert_allclose(engine.run(x.numpy(), tasks=[t])[t], own[t], rtol=1e-4, atol=1e-4, err_msg=t)

    # States are still computed once where tasks agree: seg and edge share v0 and v1 (same read-in,
    # same edge, bit-identical statistics), and nothing else.
    graph = optimize(build_graph(spec, network_tensors(net)))
    shared = sorted(n.id for n in graph.nodes if len(n.tasks) > 1)
    assert shared == ["v0:seg+edge", "v1:seg+edge"]


def test_sharing_is_checked_not_assumed():
    spec = preset("tiny", TASKS[:2], input_size=(16, 16))
    net = random_network(spec, 0)
    g, a, b = _masks(spec)
    net.set_masks(g[[0, 0]], a[[0, 0]], b[[0, 0]])  # identical structures
    reestimate_statistics(net, _batches(spec, 3))
    graph = optimize(build_graph(spec, network_tensors(net)))
    assert all(n.tasks == ("seg", "edge") for n in graph.nodes if n.state >= 0)
    with torch.no_grad():  # the same structure but other statistics: nothing is shared after them
        net.edges["2_3"].bn.running_var[1].mul_(1.5)
    graph = optimize(build_graph(spec, network_tensors(net)))
    assert sorted(n.id for n in graph.nodes if len(n.tasks) > 1) == ["v0:seg+edge", "v1:seg+edge", "v2:seg+edge"]


def _train(net, data, iters, seed=0):
    opt = make_optimizer(net, "finetune", 3e-3, 0.1)
    rng = np.random.default_rng(seed)
    for _ in range(iters):
        idx = rng.integers(0, data.train.size(data.tasks[0].name), 16)
        x = torch.from_numpy(data.train.inputs[idx])
        targets = {t.name: torch.from_numpy(data.train.targets[t.name][idx]) for t in data.tasks}
        finetune_step(net, opt, x, targets)


def _blend(net):
    """Every task's statistics replaced by their average: what one shared set amounts to."""
    with torch.no_grad():
        for bn in task_batchnorms(net):
            bn.running_mean.copy_(bn.running_mean.mean(0, keepdim=True).expand_as(bn.running_mean))
            bn.running_var.copy_(bn.running_var.mean(0, keepdim=True).expand_as(bn.running_var))


def test_short_training_eval_metrics_match_batch_statistics():
    data = load_dataset("synthetic", tasks=["segmentation", "edge"], n_train=512, n_test=256, seed=0)
    spec = preset("tiny", data.tasks, input_size=tuple(data.input_size))
    net = random_network(spec, 0)
    g, a, b = _masks(spec)
    # seg: the whole chain; edge: reads in at v1 only and reads out at v2 (a different v1).
    a[1] = 0
    a[1, 1] = 1
    g[1] = 0
    g[1, 1, 2] = 1
    net.set_masks(g[:2], a[:2], b[:2])
    _train(net, data, 150)
    reestimate_statistics(net, statistics_batches(data.train, spec, 16, 32))
    check = statistics_check(net, data.test, 16, samples=256)
    for t, c in check.items():
        assert abs(c["eval"] - c["batch_statistics"]) <= 0.01, (t, c)
    _blend(net)
    blended = statistics_check(net, data.test, 16, samples=256)
    assert max(abs(c["eval"] - c["batch_statistics"]) for c in blended.values()) > 0.01, blended


def test_version_1_checkpoint_is_refused_with_the_command_then_migrated(tmp_path, monkeypatch):
    import dagc.checkpoint as ckmod

    spec = preset("tiny", TASKS[:2], input_size=(16, 16))
    net = random_network(spec, 0)
    net.set_masks(*(m[:2] for m in _masks(spec)))
    reestimate_statistics(net, _batches(spec, 2))
    old = {k: (v[0] if k.endswith(("running_mean", "running_var", "num_batches_tracked")) else v)
           for k, v in network_tensors(net).items()}
    path = tmp_path / "v1.safetensors"
    monkeypatch.setattr(ckmod, "FORMAT_VERSION", 1)
    save_checkpoint(path, old, spec, "finetune")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"version 1.*dagc recalibrate .*v1\.safetensors"):
        load_checkpoint(path)
    ck = load_checkpoint(path, migrate=True)
    assert ck.migrated_from == 1
    assert ck.tensors["theta.edges.0_1.bn.running_mean"].shape == (2, spec.states[1].channels)
    fresh = CentralNetwork(spec)
    load_network_tensors(fresh, ck.tensors)
    torch.testing.assert_close(fresh.edges["0_1"].bn.running_mean[1], net.edges["0_1"].bn.running_mean[0])


def test_recalibrate_cli_migrates_a_version_1_run_and_compile_names_the_command(tmp_path, monkeypatch, capsys):
    import dagc.checkpoint as ckmod
    from dagc.tools.cli import main
    from dagc.trainer.train import TrainConfig, train

    cfg = TrainConfig(tasks=("segmentation", "edge"), warmup_iters=2, search_iters=2, finetune_iters=2,
                      batch_size=4, n_train=16, n_test=8, stats_batches=2)
    train(cfg, tmp_path / "run", progress=False)
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    old = {k: (v[0] if k.endswith(("running_mean", "running_var", "num_batches_tracked")) else v)
           for k, v in ck.tensors.items()}
    v1 = tmp_path / "v1.safetensors"
    monkeypatch.setattr(ckmod, "FORMAT_VERSION", 1)
    save_checkpoint(v1, old, ck.spec, ck.stage, **{k: ck.json(k) for k in ck.meta})
    monkeypatch.undo()

    def dagc(*args):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in args])
        out, err = capsys.readouterr()
        return e.value.code, out, err

    code, _, err = dagc("compile", v1, "--out", tmp_path / "art")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"dagc recalibrate {v1}" in err and not (tmp_path / "art").exists()
    code, out, err = dagc("recalibrate", v1)
    fixed = tmp_path / "v1.recalibrated.safetensors"
    assert code == 0, err
    assert "migrated from checkpoint format 1" in out and f"wrote {fixed}" in out
    new = load_checkpoint(fixed)
    assert new.migrated_from is None and new.tensors["theta.read_in.0.bn.running_mean"].shape[0] == 2
    assert set(new.json("metrics")["statistics_check"]) == {"segmentation", "edge"}
    before, written = v1.read_bytes(), fixed.read_bytes()
    code, _, err = dagc("recalibrate", v1)  # never replaces a file
    assert code == 2 and "exists" in err and fixed.read_bytes() == written and v1.read_bytes() == before
    code, out, err = dagc("compile", fixed, "--out", tmp_path / "art")
    assert code == 0, err


def test_recalibrate_refuses_bad_input_in_one_line(tmp_path, capsys):
    from dagc.tools.cli import main

    spec = preset("tiny", TASKS[:2], input_size=(16, 16))
    net = random_network(spec, 0)
    net.set_masks(*(m[:2] for m in _masks(spec)))
    bare = tmp_path / "bare.safetensors"  # no training configuration: no data to re-estimate on
    save_checkpoint(bare, network_tensors(net), spec, "finetune")
    state = tmp_path / "state.safetensors"
    save_checkpoint(state, network_tensors(net), spec, "finetune", progress={"stage": "done", "step": 0},
                    config={"dataset": "synthetic"})
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    cases = [
        ([tmp_path / "missing.safetensors"], "no checkpoint at"),
        ([tmp_path / "junk.safetensors"], "truncated or not a safetensors file"),
        ([bare], "records no training configuration"),
        ([state], "resumable state, not a checkpoint"),
        ([bare, "--out", tmp_path / "no" / "dir.safetensors"], "is not a directory"),
        ([bare, "--out", bare], "exists"),
        ([bare, "--batches", "0"], "--batches must be a positive integer"),
    ]
    for args, words in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(SystemExit) as e:
            main(["recalibrate", *map(str, args)])
        _, err = capsys.readouterr()
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and words in err, (args, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, args

"""benchmarks/reduction_study.py: the quick study's JSON, the reductions' target sparsity, the
search being dagc train's, the soft-masked variant, and bad configurations."""

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dagc.checkpoint import load_checkpoint
from dagc.errors import ConfigError
from dagc.trainer.batches import build_spec, load_data
from dagc.trainer.network import network_tensors
from dagc.trainer.reduction import flow_based_reduction, random_reduction, threshold_reduction
from dagc.trainer.stages import reduce_network
from dagc.trainer.train import TrainConfig, train

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "reduction_study.py"
_spec = importlib.util.spec_from_file_location("reduction_study", _PATH)
rs = importlib.util.module_from_spec(_spec)
sys.modules["reduction_study"] = rs  # dataclasses look their module up there
_spec.loader.exec_module(rs)

METHODS = ("fbr", "threshold", "random")


@pytest.fixture(scope="module")
def quick_result():
    return rs.run_study(rs.quick_config())


@pytest.fixture(scope="module", params=["synthetic", "digits"])
def searched(request):
    """A network searched with the quick settings, its spec and total edge count per task."""
    cfg = rs.quick_config().train_config(request.param, 0)
    data = load_data(cfg)
    net, _, _ = rs.search_network(cfg, data, build_spec(cfg, data))
    return net, int(net.band.sum()) + 2 * net.spec.n_states


def test_quick_json_structure_and_retained_definition(quick_result, tmp_path):
    study = rs.quick_config()
    rs.write_json(quick_result, tmp_path / "r.json")
    rs.plot(quick_result, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]  # no temporary left
    res = json.loads((tmp_path / "r.json").read_text())
    assert {"config", "definitions", "machine", "versions", "date", "runs", "summary"} <= set(res)
    assert res["config"]["targets"] == list(study.targets)
    assert {"torch", "numpy", "python"} <= set(res["versions"])
    assert [(r["dataset"], r["seed"]) for r in res["runs"]] == [("synthetic", 0), ("digits", 0)]
    variants = {"soft", "hard", "hard_bn"}
    for run in res["runs"]:
        recs = run["records"]
        expected = {(m, t, d, v) for m in METHODS for t in (None, *study.targets)
                    for d in range(study.random_draws if m == "random" else 1) for v in variants}
        assert {(r["method"], r["target"], r["draw"], r["variant"]) for r in recs} == expected
        assert len(recs) == len(expected)
        unreduced = run["unreduced"]
        for r in recs:
            assert set(r["retained"]) == set(run["tasks"])
            for task, info in run["tasks"].items():
                base, pruned = unreduced[task][info["metric"]], r["primary"][task]
                want = pruned / base if info["higher_is_better"] else base / pruned
                assert r["retained"][task] == pytest.approx(want)
                assert 0 < r["topology"][task]["S"] <= 1
            assert r["retained_mean"] == pytest.approx(np.mean(list(r["retained"].values())))
            assert r["sparsity_mean"] == pytest.approx(np.mean([v["S"] for v in r["topology"].values()]))
        # The three variants of one reduction share its masks, hence its topology.
        by_key = {}
        for r in recs:
            by_key.setdefault((r["method"], r["target"], r["draw"]), []).append(r["topology"])
        assert all(all(t == ts[0] for t in ts) for ts in by_key.values())
    summary = res["summary"]
    for ds in ("synthetic", "digits"):
        for v in variants:
            for m in METHODS:
                cell = summary[ds][v][m]
                assert set(cell) == {"auto", "0.2", "0.3"}
                run = next(r for r in res["runs"] if r["dataset"] == ds)
                mine = [r["retained_mean"] for r in run["records"]
                        if r["variant"] == v and r["method"] == m and r["target"] == 0.2]
                assert cell["0.2"]["retained_mean"] == pytest.approx(np.mean(mine))
                assert cell["0.2"]["seeds"] == 1 and cell["0.2"]["retained_std"] == 0.0


def test_closed_masks_never_keep_more_than_the_target(quick_result):
    """After closing, a target's network has at most target·E edges, unless the method stopped at
    its own rule first (then it is the automatic stop's network)."""
    for run in quick_result["runs"]:
        e = run["total_edges"]
        recs = [r for r in run["records"] if r["variant"] == "hard"]
        for r in recs:
            if r["target"] is None:
                continue
            auto = next(a for a in recs if a["method"] == r["method"] and a["draw"] == r["draw"]
                        and a["target"] is None)
            for task, topo in r["topology"].items():
                kept = round(topo["S"] * e)
                assert kept <= r["target"] * e + 1e-9 or topo == auto["topology"][task], (r["method"], task)


def _unclosed(net, method, task_idx, target, seed):
    """The reduction's masks of one task before `reduce_network` closes them (same inputs)."""
    with torch.no_grad():
        g = (torch.sigmoid(net.arch_gamma[task_idx]) * net.band).double().numpy()
        a = torch.sigmoid(net.arch_alpha[task_idx]).double().numpy()
        b = torch.sigmoid(net.arch_beta[task_idx]).double().numpy()
    if method == "fbr":
        return flow_based_reduction(g, a, b, target_sparsity=target)
    if method == "threshold":
        return threshold_reduction(g, a, b, target_sparsity=target)
    return random_reduction(g, a, b, seed=seed + task_idx, target_sparsity=target)


def _count(masks):
    return int(sum(np.count_nonzero(m) for m in masks))


def _reachable_targets(net, method, k, e):
    """Edge counts strictly between the method's own stop and the set-up, for task k."""
    auto = _count(_unclosed(net, method, k, None, 7))
    setup = _count(_unclosed(net, method, k, 1.0, 7))
    return range(auto + 1, setup)


def test_reduction_meets_target_within_one_edge_for_every_method(searched):
    """The stopping rule: aiming at (c + 1/2)/E edges, each method keeps exactly c edges (so it is
    within one edge of any target), as long as c lies between the method's own stop and what the
    set-up keeps. Checked on the masks the target rule sees (before closing), for every method,
    task and reachable c; and `reduce_network`'s closed masks never keep more."""
    net, e = searched
    checked = 0
    for method in METHODS:
        for k, task in enumerate(net.spec.tasks):
            for c in _reachable_targets(net, method, k, e):
                target = (c + 0.5) / e
                assert _count(_unclosed(net, method, k, target, 7)) == c, (method, task.name, c)
                topo = reduce_network(copy.deepcopy(net), method, seed=7, target_sparsity=target)
                assert round(topo[task.name]["S"] * e) <= c
                checked += 1
    assert checked >= 10  # the quick search leaves room between set-up and stop


@pytest.mark.xfail(strict=True, reason="trainer/reduction.py checks the target on Ψ before closing; "
                   "close_masks in reduce_network then drops dangling edges, so threshold and random "
                   "reductions can end more than one edge below the target")
def test_closed_sparsity_within_one_edge_of_the_target(searched):
    net, e = searched
    for method in METHODS:
        for k, task in enumerate(net.spec.tasks):
            for c in _reachable_targets(net, method, k, e):
                topo = reduce_network(copy.deepcopy(net), method, seed=7, target_sparsity=(c + 0.5) / e)
                assert round(topo[task.name]["S"] * e) == c, (method, task.name, c)


def test_search_is_the_same_as_dagc_train(tmp_path):
    # Without a validation slice: the study trains on the whole training split (its protocol).
    cfg = TrainConfig(warmup_iters=3, search_iters=4, finetune_iters=1, batch_size=4, n_train=16, n_test=8,
                      val_fraction=0.0)
    train(cfg, tmp_path / "run", progress=False)
    stored = load_checkpoint(tmp_path / "run" / "search.safetensors").tensors
    data = load_data(cfg)
    net, snapshot, _ = rs.search_network(cfg, data, build_spec(cfg, data))
    state = net.state_dict()
    assert stored["arch.gamma"].abs().sum() > 0  # the search moved the logits
    for name in ("gamma", "alpha", "beta"):
        torch.testing.assert_close(state[f"arch_{name}"], stored[f"arch.{name}"], rtol=0, atol=0)
    for k, v in state.items():
        if not k.startswith("arch_"):
            torch.testing.assert_close(v, stored[f"theta.{k}"], rtol=0, atol=0)
    warm = load_checkpoint(tmp_path / "run" / "warmup.safetensors").tensors
    for k, v in snapshot.items():
        torch.testing.assert_close(v, warm[f"theta.{k}"], rtol=0, atol=0)


def test_soft_masked_network_keeps_searched_weights(searched):
    net, _ = searched
    cfg = rs.quick_config().train_config("digits" if not net.spec.shared_input else "synthetic", 0)
    x = load_data(cfg).test.inputs
    x = torch.from_numpy(x[:4]) if net.spec.shared_input else torch.stack(
        [torch.from_numpy(x[t.name][:4]) for t in net.spec.tasks])
    net.eval()
    with torch.no_grad():
        want = net(x)
        full = copy.deepcopy(net)
        k, n = net.spec.n_tasks, net.spec.n_states
        full.set_masks(net.band.expand(k, n, n).clone(), torch.ones(k, n), torch.ones(k, n))
        got = rs.soft_masked(net, full)(x)  # every edge kept: the unreduced network
        for t in want:
            torch.testing.assert_close(got[t], want[t], rtol=1e-5, atol=1e-5)
        reduced = copy.deepcopy(net)
        reduce_network(reduced, "fbr")
        pruned = rs.soft_masked(net, reduced)(x)
        hard = reduced(x)
    assert any(not torch.allclose(pruned[t], want[t]) for t in want)  # removing edges changed it
    assert any(not torch.allclose(pruned[t], hard[t]) for t in want)  # and it is not the binary net


def test_batchnorm_reestimation_replaces_running_statistics(searched):
    net, _ = searched
    reduced = copy.deepcopy(net)
    reduce_network(reduced, "fbr")
    bn = reduced.read_in[int(np.flatnonzero(reduced.mask_alpha.sum(0).numpy())[0])].bn
    before = bn.running_mean.clone()
    cfg = rs.quick_config().train_config("synthetic" if net.spec.shared_input else "digits", 0)
    rs.reestimate_batchnorm(reduced, load_data(cfg), cfg, 3)
    assert not torch.equal(bn.running_mean, before)
    assert torch.isfinite(bn.running_var).all() and bn.momentum == 0.1 and not reduced.training


def test_retained_is_a_ratio_oriented_by_the_metric():
    assert rs.retained(0.4, 0.8, True) == 0.5
    assert rs.retained(2.0, 1.0, False) == 0.5
    assert math.isnan(rs.retained(1.0, 0.0, True))


@pytest.mark.parametrize("kw, word", [
    (dict(targets=(0.0,)), "target"), (dict(targets=(1.5,)), "target"), (dict(seeds=()), "seeds"),
    (dict(seeds=(0, 0)), "seeds"), (dict(datasets=("mnist",)), "datasets"), (dict(methods=("magic",)), "methods"),
    (dict(random_draws=0), "random_draws"), (dict(bn_batches=-1), "bn_batches"), (dict(batch_size=1), "batch_size"),
])
def test_bad_configuration_is_a_config_error(kw, word):
    with pytest.raises(ConfigError, match=word):
        rs.StudyConfig(**kw)


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    rc = rs.main(["--quick", "--targets", "0.5,2", "--json", str(tmp_path / "a.json"),
                  "--plot", str(tmp_path / "a.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith("reduction_study: error: ") and "target" in err
    assert not list(tmp_path.iterdir())
    rc = rs.main(["--quick", "--json", str(tmp_path / "missing" / "a.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "does not exist" in err


def test_finetune_is_the_same_as_dagc_train(tmp_path):
    """The study fine-tunes with dagc train's own loop: the same reduction and rewind give the
    checkpoint that dagc train writes, tensor for tensor."""
    cfg = TrainConfig(warmup_iters=3, search_iters=4, finetune_iters=3, batch_size=4, n_train=16, n_test=8,
                      val_fraction=0.0)
    train(cfg, tmp_path / "run", progress=False)
    stored = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors").tensors
    data = load_data(cfg)
    net, snapshot, _ = rs.search_network(cfg, data, build_spec(cfg, data))
    reduce_network(net, cfg.reduction, seed=cfg.seed)
    rs.finetune(net, snapshot, data, cfg)
    mine = network_tensors(net)
    assert mine.keys() == stored.keys()
    for k, v in mine.items():
        torch.testing.assert_close(v, stored[k], rtol=0, atol=0, msg=k)

"""The paper's protocol end to end on small real runs: baselines, ablations, reduction choices,
and `dagc evaluate` over real run directories."""

import json

import numpy as np
import pytest
import torch

from dagc.checkpoint import load_checkpoint
from dagc.compiler.compile import inspect_checkpoint
from dagc.errors import ConfigError
from dagc.tools.cli import main
from dagc.tools.evaluate import compare, load_run
from dagc.trainer.baselines import chain_masks, full_masks
from dagc.trainer.train import TrainConfig, train

# digits: three classification tasks with their own inputs; a few iterations per stage.
FAST = dict(dataset="digits", warmup_iters=3, search_iters=4, finetune_iters=3, batch_size=4, n_train=40,
            n_test=20, save_every=2, log_every=1, tasks=("low", "parity"))


def _cfg(**kw):
    return TrainConfig(**{**FAST, **kw})


def _masks(path):
    t = load_checkpoint(path).tensors
    return [t[f"mask.{n}"].numpy() for n in ("gamma", "alpha", "beta")]


def test_shared_bottom_trains_the_chain_for_the_fine_tuning_budget(tmp_path):
    m = train(_cfg(baseline="shared-bottom"), tmp_path / "sb", progress=False)
    ck = load_checkpoint(tmp_path / "sb" / "checkpoint.safetensors")
    for got, want in zip(_masks(tmp_path / "sb" / "checkpoint.safetensors"), chain_masks(ck.spec)):
        np.testing.assert_array_equal(got, want)
    assert m["losses"]["warmup"] == [] and m["losses"]["search"] == []
    assert m["losses"]["finetune"][-1]["step"] == 3  # the paper's protocol: finetune_iters
    assert m["parameters"]["relative_to_backbone"] == pytest.approx(1.0)
    assert inspect_checkpoint(tmp_path / "sb" / "checkpoint.safetensors")["tasks"]  # compilable


def test_single_task_is_one_run_per_task_and_resumes(tmp_path):
    out = tmp_path / "st"

    class Stop(Exception):
        pass

    def stop_in_second_task(run):
        if run.spec.task_names == ("parity",) and run.step == 2:  # of finetune_iters = 3
            raise Stop

    with pytest.raises(Stop):
        train(_cfg(baseline="single-task"), out, progress=False, on_step=stop_in_second_task)
    assert (out / "low" / "metrics.json").is_file() and not (out / "metrics.json").exists()
    first = (out / "low" / "metrics.json").read_bytes()
    m = train(None, out, resume=True, progress=False)
    assert (out / "low" / "metrics.json").read_bytes() == first  # the finished task is not trained again
    assert set(m["final"]) == {"low", "parity"} and m["runs"] == {"low": "low", "parity": "parity"}
    for t in ("low", "parity"):
        ck = load_checkpoint(out / t / "checkpoint.safetensors")
        assert ck.spec.task_names == (t,)
    assert m["parameters"]["relative_to_backbone"] == pytest.approx(2.0)
    assert json.loads((out / "metrics.json").read_text())["final"] == m["final"]
    # evaluate against it: a shared-bottom run, Δ per task and Δ_T computed from the real files
    train(_cfg(baseline="shared-bottom"), tmp_path / "sb", progress=False)
    c = compare(load_run(tmp_path / "sb"), load_run(out))
    assert set(c["per_task"]) == {"low", "parity"}
    assert c["delta_t"] == pytest.approx(np.mean(list(c["per_task"].values())))


def test_ablations_change_what_they_say(tmp_path):
    # no-flow-restriction: the complete DAG
    train(_cfg(ablations=("no-flow-restriction",)), tmp_path / "dag", progress=False)
    spec = load_checkpoint(tmp_path / "dag" / "checkpoint.safetensors").spec
    assert spec.flow_constant == spec.n_states - 1
    # no-read-in-out: A and B stay e_1 / e_N through the search
    train(_cfg(ablations=("no-read-in-out",)), tmp_path / "rio", progress=False)
    t = load_checkpoint(tmp_path / "rio" / "search.safetensors").tensors
    a, b = t["arch.alpha"], t["arch.beta"]  # the saturated logits, untouched by the search
    assert torch.all(a[:, 0] == 30) and torch.all(a[:, 1:] == -30)
    assert torch.all(b[:, -1] == 30) and torch.all(b[:, :-1] == -30)
    _, alpha, beta = _masks(tmp_path / "rio" / "checkpoint.safetensors")
    assert alpha[:, 1:].sum() == 0 and beta[:, :-1].sum() == 0
    # no-fbr: every edge kept
    m = train(_cfg(ablations=("no-fbr",)), tmp_path / "nofbr", progress=False)
    ck = load_checkpoint(tmp_path / "nofbr" / "checkpoint.safetensors")
    for got, want in zip(_masks(tmp_path / "nofbr" / "checkpoint.safetensors"), full_masks(ck.spec)):
        np.testing.assert_array_equal(got, want)
    assert all(v["S"] == pytest.approx(1.0) for v in m["topology"].values())
    # no-squeeze: the search loss is the task loss alone
    m = train(_cfg(ablations=("no-squeeze",), kappa=0.0), tmp_path / "nosq", progress=False)
    for e in m["losses"]["search"]:
        assert e["squeeze"] > 0 and e["loss"] == pytest.approx(e["low"] + e["parity"], rel=1e-6)


def test_reduction_choices_reach_the_target_sparsity(tmp_path):
    for method in ("threshold", "random", "fbr"):
        m = train(_cfg(reduction=method, target_sparsity=0.5), tmp_path / method, progress=False)
        assert m["config"]["reduction"] == method
        for topo in m["topology"].values():
            assert topo["S"] <= 0.5 + 1e-9


@pytest.mark.parametrize("kw, match", [
    (dict(baseline="multi"), "baseline must be one of"),
    (dict(ablations=("no-magic",)), "unknown ablation"),
    (dict(ablations=("no-fbr", "no-fbr")), "at most once"),
    (dict(baseline="shared-bottom", ablations=("no-squeeze",)), "no search to ablate"),
    (dict(baseline="single-task", reduction="random"), "not reduced"),
    (dict(ablations=("no-fbr",), target_sparsity=0.3), "keeps every edge"),
    (dict(ablations=("no-flow-restriction",), flow_constant=2), "drop --flow-constant"),
])
def test_bad_protocol_options_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**kw)


def test_cli_protocol_options(tmp_path, capsys):
    args = ["train", "--dataset", "digits", "--tasks", "low,parity", "--warmup-iters", "2", "--search-iters", "2",
            "--finetune-iters", "2", "--batch-size", "4", "--quiet"]
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path / "a"), "--ablation", "no-squeeze", "--ablation", "no-fbr"])
    assert e.value.code == 0
    cfg = json.loads((tmp_path / "a" / "metrics.json").read_text())["config"]
    assert cfg["ablations"] == ["no-squeeze", "no-fbr"]
    assert "relative to one backbone" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path / "b"), "--baseline", "shared-bottom", "--ablation", "no-fbr"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no search to ablate" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(tmp_path / "a"), "--against", str(tmp_path / "a")])
    assert e.value.code == 0 and "Δ_T (%): +0.00" in capsys.readouterr().out

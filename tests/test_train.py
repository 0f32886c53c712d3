"""The three-stage run: artifacts, rewind, resume (also after a real SIGKILL), bad configuration."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dagc.checkpoint import load_checkpoint
from dagc.errors import CheckpointError, ConfigError
from dagc.trainer.network import CentralNetwork, network_from_checkpoint
from dagc.trainer.stages import rewind, theta_snapshot
from dagc.trainer.topology import close_masks, is_connected
from dagc.trainer.train import TrainConfig, train

FAST = dict(warmup_iters=4, search_iters=6, finetune_iters=4, batch_size=4, n_train=24, n_test=8,
            save_every=2, log_every=2)


def _cfg(**kw):
    return TrainConfig(**{**FAST, **kw})


def test_run_writes_reduced_checkpoint_metrics_and_stage_files(tmp_path):
    metrics = train(_cfg(), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert {"checkpoint.safetensors", "state.safetensors", "warmup.safetensors", "search.safetensors",
            "metrics.json", "train.log"} <= set(os.listdir(run))
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]
    ck = load_checkpoint(run / "checkpoint.safetensors")
    assert ck.stage == "finetune" and ck.reduced
    assert len(ck.json("preprocessing")["mean"]) == 3
    assert not any(k.startswith(("optim.", "rewind.")) for k in ck.tensors)
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["final"] == metrics["final"]
    assert set(on_disk["losses"]) == {"warmup", "search", "finetune"}
    assert [e["step"] for e in on_disk["losses"]["search"]] == [2, 4, 6]
    assert all("squeeze" in e for e in on_disk["losses"]["search"])
    for k, task in enumerate(ck.spec.tasks):
        g, a, b = (ck.tensors[f"mask.{n}"][k].numpy().astype(np.int64) for n in ("gamma", "alpha", "beta"))
        assert is_connected(g, a, b), task.name
        # Closed: nothing dangling that would make the supernet differ from compiled models.
        for got, want in zip((g, a, b), close_masks(g, a, b)):
            np.testing.assert_array_equal(got, want)
        topo = on_disk["topology"][task.name]
        assert 0 < topo["S"] <= 1 and topo["D"] >= 2 and topo["W"] >= 1
    assert set(on_disk["final"]) == {"segmentation", "depth", "normal", "edge"}
    assert "miou" in on_disk["final"]["segmentation"] and "mean_angle" in on_disk["final"]["normal"]
    # The stored model is the fine-tuned one: it reproduces the held-out metrics it claims.
    net = network_from_checkpoint(ck)
    assert net.hard


def test_rewind_restores_theta_and_keeps_logits():
    from dagc.spec import TaskSpec, preset
    net = CentralNetwork(preset("tiny", [TaskSpec("d", "depth")], input_size=(16, 16)))
    snap = theta_snapshot(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net.read_in[0].bn.running_mean.add_(3.0)
    logits = net.arch_gamma.detach().clone()
    rewind(net, snap)
    for k, v in theta_snapshot(net).items():
        torch.testing.assert_close(v, snap[k], msg=k)
    torch.testing.assert_close(net.arch_gamma.detach(), logits)


def test_interrupted_run_resumes_to_the_same_model(tmp_path):
    full = tmp_path / "full"
    train(_cfg(), full, progress=False)

    class Stop(Exception):
        pass

    def stop_in_search(run):
        if run.stage == "search" and run.step == 5:
            raise Stop

    part = tmp_path / "part"
    with pytest.raises(Stop):
        train(_cfg(), part, progress=False, on_step=stop_in_search)
    assert not (part / "checkpoint.safetensors").exists()
    assert load_checkpoint(part / "state.safetensors").json("progress") == {"stage": "search", "step": 4}
    with pytest.raises(ConfigError, match="already holds a run"):
        train(_cfg(), part, progress=False)
    train(None, part, resume=True, progress=False)
    a = load_checkpoint(full / "checkpoint.safetensors").tensors
    b = load_checkpoint(part / "checkpoint.safetensors").tensors
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_killed_process_leaves_a_valid_state_and_resumes(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dagc", "train", "--out", str(run), "--quiet", "--warmup-iters", "30",
           "--search-iters", "200", "--finetune-iters", "5", "--batch-size", "4", "--save-every", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = run / "state.safetensors"
    deadline = time.time() + 300  # generous: CI machines are shared and noisy
    progress = None
    try:
        # Kill it while it is checkpointing often, in the middle of the search stage.
        while time.time() < deadline:
            if state.exists():
                try:
                    progress = load_checkpoint(state).json("progress")
                except CheckpointError:
                    pytest.fail("a reader saw a corrupt state file while the run was writing it")
                if progress["stage"] == "search" and progress["step"] >= 6:
                    break
            time.sleep(0.05)
        else:
            pytest.fail(f"the run did not reach search step 6 in time; last progress seen: {progress}, "
                        f"exit code {proc.poll()}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ck = load_checkpoint(state)
    assert ck.json("progress")["stage"] == "search"
    assert not (run / "checkpoint.safetensors").exists()
    done = subprocess.run([sys.executable, "-m", "dagc", "train", "--resume", str(run), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(run / "checkpoint.safetensors").reduced


def test_digits_run_has_per_task_inputs(tmp_path):
    metrics = train(_cfg(dataset="digits", preset="omniglot", n_train=None, n_test=None), tmp_path / "d",
                    progress=False)
    assert set(metrics["final"]) == {"low", "high", "parity"}
    assert all(0 <= m["accuracy"] <= 1 for m in metrics["final"].values())
    assert metrics["test_samples"]["parity"] > metrics["test_samples"]["low"]


@pytest.mark.parametrize("kw, match", [
    (dict(dataset="imagenet"), "unknown dataset"),
    (dict(preset="resnet"), "unknown preset"),
    (dict(tasks=("segmentation", "colour")), "unknown task"),
    (dict(flow_constant=0), "flow_constant"),
    (dict(warmup_iters=0), "warmup_iters"),
    (dict(search_iters=-3), "search_iters"),
    (dict(weight_lr=0.0), "weight_lr"),
    (dict(batch_size=1), "batch_size"),
    (dict(reduction="magic"), "reduction"),
])
def test_bad_configuration_is_refused_with_the_field_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**kw)


def test_preset_that_does_not_fit_the_data_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not fit"):
        train(_cfg(dataset="digits", preset="vgg16"), tmp_path / "x", progress=False)
    assert not (tmp_path / "x" / "state.safetensors").exists()


def test_task_subset_keeps_the_given_order(tmp_path):
    metrics = train(_cfg(tasks=("depth", "segmentation")), tmp_path / "s", progress=False)
    assert list(metrics["spec"]["tasks"][i]["name"] for i in range(2)) == ["depth", "segmentation"]
    assert set(metrics["final"]) == {"depth", "segmentation"}


@pytest.mark.slow
def test_default_run_beats_constant_predictors_widely(tmp_path):
    """The README's claim for `dagc train --out DIR` (about 3 minutes on 2 cores)."""
    metrics = train(TrainConfig(), tmp_path / "default", progress=False)
    p = metrics["primary"]
    assert p["segmentation"]["model"] > 5 * p["segmentation"]["constant"]  # mIoU
    assert p["depth"]["model"] < 0.6 * p["depth"]["constant"]  # abs. error
    assert p["normal"]["model"] < 0.6 * p["normal"]["constant"]  # mean angle
    assert p["edge"]["model"] > 1.5 * p["edge"]["constant"]  # max F


@pytest.mark.slow
def test_digits_default_run_reaches_90_percent_on_every_task(tmp_path):
    metrics = train(TrainConfig(dataset="digits"), tmp_path / "digits", progress=False)
    for task, m in metrics["final"].items():
        assert m["accuracy"] >= 0.9, task

"""The checkpoint contract: round trip, atomic writes, and clear refusals of bad files."""

import os

import pytest
import torch
from safetensors.torch import save_file

from dagc.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from dagc.errors import CheckpointError
from dagc.spec import TaskSpec, preset
from dagc.trainer.network import CentralNetwork, network_from_checkpoint, network_tensors

SPEC = preset("tiny", [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth")], input_size=(16, 16))


def test_round_trip_restores_the_same_function(tmp_path):
    torch.manual_seed(0)
    net = CentralNetwork(SPEC)
    with torch.no_grad():
        net.arch_gamma.normal_()
    net.eval()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, network_tensors(net), SPEC, "search", config={"seed": 3})
    ck = load_checkpoint(path)
    assert ck.spec == SPEC and ck.stage == "search" and not ck.reduced
    assert ck.json("config") == {"seed": 3}
    again = network_from_checkpoint(ck).eval()
    x = torch.randn(2, 3, 16, 16)
    for t, y in net(x).items():
        torch.testing.assert_close(again(x)[t], y)
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_masks_are_stored_as_uint8_and_restored(tmp_path):
    net = CentralNetwork(SPEC)
    k, n = SPEC.n_tasks, SPEC.n_states
    g, a, b = torch.zeros(k, n, n), torch.zeros(k, n), torch.zeros(k, n)
    a[:, 0] = 1
    b[:, 0] = 1
    net.set_masks(g, a, b)
    save_checkpoint(tmp_path / "c.safetensors", network_tensors(net), SPEC, "finetune")
    ck = load_checkpoint(tmp_path / "c.safetensors")
    assert ck.reduced and ck.tensors["mask.alpha"].dtype == torch.uint8
    assert network_from_checkpoint(ck).hard


def test_missing_truncated_foreign_and_future_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope.safetensors")
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, network_tensors(CentralNetwork(SPEC)), SPEC, "init")
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(CheckpointError, match="truncated or not a safetensors"):
        load_checkpoint(tmp_path / "text.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"), metadata={"x": "y"})
    with pytest.raises(CheckpointError, match="not a dagc checkpoint"):
        load_checkpoint(tmp_path / "foreign.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "v9.safetensors"),
              metadata={"format": FORMAT, "format_version": "9", "spec": SPEC.to_json(), "stage": "init"})
    with pytest.raises(CheckpointError, match="version '9'"):
        load_checkpoint(tmp_path / "v9.safetensors")


def test_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"theta.x": torch.ones(3)}, SPEC, "init")
    before = path.read_bytes()
    shared = torch.ones(3)
    # safetensors refuses two names for one storage: the write fails after the temporary exists.
    with pytest.raises(RuntimeError, match="share memory"):
        save_checkpoint(path, {"theta.x": shared, "theta.y": shared}, SPEC, "init")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors"]

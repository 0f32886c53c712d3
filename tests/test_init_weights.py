"""Starting weights, `dagc train --init SOURCE` (`dagc.trainer.init_weights`): from a previous run
and from a torchvision VGG-16 state_dict in safetensors; refusals are one line, exit code 2, and
write nothing. The tests write their own files (no torchvision: it is not installed)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dagc.blocks import BN_BUFFERS
from dagc.checkpoint import load_checkpoint
from dagc.errors import CheckpointError, ConfigError
from dagc.spec import TaskSpec, preset
from dagc.tools.cli import main
from dagc.trainer.batches import build_spec, load_data
from dagc.trainer.init_weights import VGG16_CONVS, VGG16_LEFT_OUT, VGG16_MAP, apply_init
from dagc.trainer.network import CentralNetwork
from dagc.trainer.state import new_run
from dagc.trainer.train import TrainConfig, train

SHORT = dict(warmup_iters=2, search_iters=2, finetune_iters=2, batch_size=4, n_train=16, n_test=8, stats_batches=2)
CLI_SHORT = ["--warmup-iters", "2", "--search-iters", "2", "--finetune-iters", "2", "--batch-size", "4",
             "--stats-batches", "2", "--quiet"]
CPU = torch.device("cpu")
# torchvision's vgg16().features: (in, out) channels of the conv at each index (3x3, with bias).
VGG16_CHANNELS = dict(zip(VGG16_CONVS, [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256),
                                        (256, 256), (256, 512), (512, 512), (512, 512), (512, 512),
                                        (512, 512), (512, 512)]))


def _run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _one_error_line(err, *words):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dagc: error: --init"), err
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A short finished run of the tiny preset (all four synthetic tasks)."""
    out = tmp_path_factory.mktemp("init") / "source"
    train(TrainConfig(**SHORT, seed=7), out, progress=False)
    return out


def _started(cfg):
    return new_run(cfg, build_spec(cfg, load_data(cfg)), CPU)


def _fresh_statistics(net):
    for name, buf in net.named_buffers():
        if name.rsplit(".", 1)[-1] in BN_BUFFERS:
            fresh = torch.ones_like(buf) if name.endswith("running_var") else torch.zeros_like(buf)
            assert torch.equal(buf, fresh), name


def test_init_from_a_run_loads_every_named_tensor_and_keeps_statistics_fresh(source_run):
    src = load_checkpoint(source_run / "checkpoint.safetensors").tensors
    run = _started(TrainConfig(**SHORT, tasks=("depth", "segmentation"), init=str(source_run)))
    state = run.net.state_dict()
    report = run.init_report
    theta = {f"theta.{k}" for k, _ in run.net.named_parameters() if not k.startswith("arch_")}
    assert set(report["loaded"]) == theta and report["left"] == []  # same network, the two tasks' heads too
    for name in report["loaded"]:
        assert torch.equal(state[name.removeprefix("theta.")], src[name]), name
    # The run's batch-norm statistics differ from the fresh ones; none arrive, nor logits or masks.
    assert any(bool(v.any()) for k, v in src.items() if k.endswith("running_mean"))
    _fresh_statistics(run.net)
    assert not run.net.hard and all(torch.equal(p, torch.zeros_like(p)) for p in run.net.arch_parameters())
    assert report["batch_norm_statistics"] == "fresh"
    assert {n.split(".")[2] for n in report["unused"]} == {"edge", "normal"}  # the heads of tasks not trained


def test_init_from_a_run_of_another_flow_constant_leaves_the_new_edges(source_run):
    run = _started(TrainConfig(**SHORT, flow_constant=4, init=str(source_run / "checkpoint.safetensors")))
    left = run.init_report["left"]
    assert "theta.edges.0_4.conv.weight" in left and "theta.edges.0_1.conv.weight" in run.init_report["loaded"]
    torch.manual_seed(SHORT.get("seed", 0))
    fresh = CentralNetwork(run.spec).state_dict()
    for name in left:
        assert torch.equal(run.net.state_dict()[name.removeprefix("theta.")], fresh[name.removeprefix("theta.")])


def test_a_wrong_shape_is_one_error_and_a_head_of_another_shape_stays(source_run, tmp_path):
    tensors = dict(load_checkpoint(source_run / "checkpoint.safetensors").tensors)
    head = "theta.heads.segmentation.branches.0.6.weight"
    tensors[head] = tensors[head][:3].clone()  # the same task with 3 classes: its last layer stays
    save_file(tensors, tmp_path / "heads.safetensors")
    run = _started(TrainConfig(**SHORT, init=str(tmp_path / "heads.safetensors")))
    assert head in run.init_report["left"] and any(k.startswith(head) for k in run.init_report["heads_kept"])

    tensors["theta.edges.0_1.conv.weight"] = torch.zeros(16, 8, 3, 3)
    save_file(tensors, tmp_path / "bad.safetensors")
    cfg = TrainConfig(**SHORT, init=str(tmp_path / "bad.safetensors"))
    spec = build_spec(cfg, load_data(cfg))
    net = CentralNetwork(spec)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        apply_init(net, cfg.init)
    msg = str(e.value)
    assert "theta.edges.0_1.conv.weight" in msg and "(16, 8, 3, 3)" in msg and "\n" not in msg
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # nothing changed


def _vgg16_file(path, **replace):
    """torchvision's VGG-16 features (random values, their names and shapes) as safetensors. The
    classifier (124 M parameters, never loaded) is left out but one small tensor of it."""
    torch.manual_seed(1)
    tensors = {"classifier.6.bias": torch.randn(1000)}
    for idx, (cin, cout) in VGG16_CHANNELS.items():
        tensors[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3)
        tensors[f"features.{idx}.bias"] = torch.randn(cout)
    tensors.update(replace)
    save_file(tensors, path)
    return tensors


def test_init_from_vgg16_maps_every_conv_onto_its_chain_edge(tmp_path):
    tensors = _vgg16_file(tmp_path / "vgg16.safetensors")
    cfg = TrainConfig(preset="vgg16", flow_constant=1, init=str(tmp_path / "vgg16.safetensors"))
    spec = preset("vgg16", [TaskSpec("depth", "depth")], flow_constant=1, input_size=(32, 32))
    run = new_run(cfg, spec, CPU)
    state = run.net.state_dict()
    assert len(VGG16_MAP) == 12 and run.init_report["layout"] == "vgg16"
    assert set(run.init_report["loaded"]) == set(VGG16_MAP.values())
    assert state["read_in.0.conv.weight"].shape == (64, 3, 3, 3)
    for src, dst in VGG16_MAP.items():
        assert torch.equal(state[dst.removeprefix("theta.")], tensors[src]), (src, dst)
        assert run.init_report["from"][dst] == src
    assert VGG16_MAP["features.2.weight"] == "theta.edges.0_1.conv.weight"
    assert VGG16_MAP["features.26.weight"] == "theta.edges.10_11.conv.weight"
    # conv5_3 and every bias (no place before a batch norm) are not used; BN affine starts at 1 / 0.
    assert VGG16_LEFT_OUT in run.init_report["unused"] and "features.0.bias" in run.init_report["unused"]
    for i in range(11):
        assert torch.equal(state[f"edges.{i}_{i + 1}.bn.weight"], torch.ones(spec.states[i + 1].channels))
        assert torch.equal(state[f"edges.{i}_{i + 1}.bn.bias"], torch.zeros(spec.states[i + 1].channels))
    _fresh_statistics(run.net)
    assert "theta.read_in.1.conv.weight" in run.init_report["left"]


def test_vgg16_of_a_wrong_shape_or_onto_another_network_is_one_error(tmp_path):
    _vgg16_file(tmp_path / "bad.safetensors", **{"features.5.weight": torch.randn(128, 32, 3, 3)})
    spec = preset("vgg16", [TaskSpec("depth", "depth")], flow_constant=1, input_size=(32, 32))
    with pytest.raises(CheckpointError) as e:
        apply_init(CentralNetwork(spec), tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "features.5.weight" in msg and "(128, 32, 3, 3)" in msg and "(128, 64, 3, 3)" in msg
    assert "theta.edges.1_2.conv.weight" in msg and "\n" not in msg
    _vgg16_file(tmp_path / "vgg16.safetensors")
    tiny = preset("tiny", [TaskSpec("depth", "depth")])
    with pytest.raises(CheckpointError, match="vgg16 preset"):
        apply_init(CentralNetwork(tiny), tmp_path / "vgg16.safetensors")


def test_cli_wrong_shape_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    _vgg16_file(tmp_path / "bad.safetensors", **{"features.0.weight": torch.randn(64, 1, 3, 3)})
    out = tmp_path / "run"
    code, _, err = _run_cli(["train", "--out", str(out), "--preset", "vgg16", "--flow-constant", "1",
                             "--init", str(tmp_path / "bad.safetensors"), *CLI_SHORT], capsys)
    assert code == 2 and not out.exists()
    _one_error_line(err, "features.0.weight", "(64, 1, 3, 3)", "(64, 3, 3, 3)")


@pytest.mark.parametrize("name, content, words", [
    ("w.pth", b"PK\x03\x04 a torch.save zip", ("pickle", "save_file", "torch.load", "w.safetensors")),
    ("w.pt", b"\x80\x02}q\x00.", ("pickle", "save_file")),
    ("w.safetensors", b"PK\x03\x04 a torch.save zip under another name", ("pickle", "save_file")),
    ("missing.safetensors", None, ("no such file",)),
    ("short.safetensors", b"\x01\x02", ("not a safetensors file",)),
    ("other.safetensors", {"encoder.weight": torch.ones(2)}, ("no tensor in it matches",)),
    ("nan.safetensors", {"theta.edges.0_1.conv.weight": torch.full((16, 16, 3, 3), float("nan"))}, ("NaN",)),
    ("rundir", "dir", ("no checkpoint.safetensors",)),
])
def test_unusable_sources_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, name, content, words):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        save_file(content, path)
    elif content == "dir":
        path.mkdir()
    out = tmp_path / "run"
    code, _, err = _run_cli(["train", "--out", str(out), "--init", str(path), *CLI_SHORT], capsys)
    assert code == 2 and not out.exists()
    _one_error_line(err, *words)


def test_cli_init_end_to_end_report_and_resume_never_rereads(source_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(source_run, copy)
    out = tmp_path / "run"
    code, stdout, err = _run_cli(["train", "--out", str(out), "--tasks", "depth", "--init", str(copy),
                                  "--save-every", "1", *CLI_SHORT], capsys)
    assert code == 0, err
    assert "init: loaded" in stdout and "batch-norm running statistics start fresh" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["init"] == str(copy)
    assert metrics["init"]["source"] == str(copy / "checkpoint.safetensors")
    assert "theta.heads.depth.branches.0.0.weight" in metrics["init"]["loaded"]
    assert "init: loaded" in (out / "train.log").read_text()
    # A resumed run continues from its own state: the source may be gone.
    shutil.rmtree(copy)
    state = load_checkpoint(out / "state.safetensors")
    assert state.json("init") == metrics["init"]
    resumed = train(None, out, resume=True, progress=False)  # a finished run: nothing left but the report
    assert resumed["init"] == metrics["init"]


def test_the_configuration_records_init_as_text(tmp_path):
    cfg = TrainConfig(init=tmp_path / "w.safetensors")  # a path is stored as text; the file is read at the start
    assert cfg.init == str(tmp_path / "w.safetensors") and TrainConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ("", 3):
        with pytest.raises(ConfigError, match="init must be"):
            TrainConfig(init=bad)

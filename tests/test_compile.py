"""`dagc compile` end to end: verified artifacts, minimal MACs, determinism, refusals."""

import json
import os

import numpy as np
import onnx
import pytest
import torch
from compiler_cases import random_reduced_net
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from dagc.artifact import read_manifest
from dagc.checkpoint import save_checkpoint
from dagc.compiler.compile import compile_checkpoint, load_graph
from dagc.compiler.flops import graph_costs
from dagc.compiler.ir import CompileError
from dagc.compiler.lower import lower
from dagc.compiler.onnx_export import conv_macs
from dagc.errors import CheckpointError
from dagc.spec import TaskSpec, preset
from dagc.tools.cli import main
from dagc.trainer.network import network_tensors
from dagc.trainer.train import TrainConfig, train

DENSE = [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth"), TaskSpec("normal", "normal")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(TrainConfig(warmup_iters=3, search_iters=6, finetune_iters=3, batch_size=4, n_train=16, n_test=8),
          run, progress=False)
    return run / "checkpoint.safetensors"


def _ckpt(tmp_path, spec, seed, **kw):
    net = random_reduced_net(spec, seed, **kw)
    path = tmp_path / f"c{seed}.safetensors"
    save_checkpoint(path, network_tensors(net), spec, "finetune")
    return path


def test_compile_trained_checkpoint_writes_a_verified_artifact(trained, tmp_path):
    manifest = compile_checkpoint(trained, tmp_path / "art")
    art = tmp_path / "art"
    on_disk = read_manifest(art)  # checks every file's sha256
    assert on_disk["models"].keys() == manifest["models"].keys()
    names = {"model.onnx", *(f"task_{t}.onnx" for t in ("segmentation", "depth", "normal", "edge"))}
    assert names <= set(os.listdir(art)) and {"manifest.json", "report.md"} <= set(os.listdir(art))
    for name in names:
        model = onnx.load(str(art / name))
        onnx.checker.check_model(model, full_check=True)
        assert manifest["models"][name]["verified_max_rel_error"] <= 1e-4
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert len(onnx.load(str(art / "model.onnx")).graph.output) == 4
    assert manifest["input"]["preprocessing"]["formula"].startswith("(raw - mean)")
    assert all(len(v["masks"]["alpha"]) == 6 for v in manifest["tasks"].values())
    assert manifest["costs"]["shared"]["flops"] < manifest["costs"]["supernet"]["flops"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_compiling_twice_gives_byte_identical_models(tmp_path):
    path = _ckpt(tmp_path, preset("tiny", DENSE, input_size=(16, 16)), 1)
    compile_checkpoint(path, tmp_path / "a")
    compile_checkpoint(path, tmp_path / "b")
    for name in os.listdir(tmp_path / "a"):
        if name.endswith(".onnx") or name.endswith(".svg"):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_shared_model_macs_are_the_analytic_minimum(tmp_path, seed):
    spec = preset("tiny", DENSE, input_size=(16, 16), flow_constant=4)
    path = _ckpt(tmp_path, spec, seed, same=seed == 2)
    manifest = compile_checkpoint(path, tmp_path / "art")
    _, _, raw, graph = load_graph(path)
    model = onnx.load(str(tmp_path / "art" / "model.onnx"))
    minimum = graph_costs(graph)["macs"]  # every distinct instance's edges once, plus the heads
    assert conv_macs(model, spec.input_size) == minimum == manifest["costs"]["shared"]["macs"]
    assert minimum <= graph_costs(raw)["macs"]
    if seed == 2:  # identical masks: everything but the heads is shared
        assert minimum < graph_costs(raw)["macs"]


def test_flops_agree_with_torch_flop_counter_on_the_lowered_module(tmp_path):
    spec = preset("tiny", DENSE + [TaskSpec("cls", "classification", 5)], input_size=(16, 16))
    _, _, _, graph = load_graph(_ckpt(tmp_path, spec, 7))
    model = lower(graph)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 16, 16))
    assert counter.get_total_flops() == graph_costs(graph)["flops"]


def test_per_task_inputs_compile_to_one_input_per_task(tmp_path):
    spec = preset("omniglot", [TaskSpec("a", "classification", 3), TaskSpec("b", "classification", 4)],
                  in_channels=1, shared_input=False)
    compile_checkpoint(_ckpt(tmp_path, spec, 5), tmp_path / "art")
    shared = onnx.load(str(tmp_path / "art" / "model.onnx"))
    assert [i.name for i in shared.graph.input] == ["image_a", "image_b"]
    assert [i.name for i in onnx.load(str(tmp_path / "art" / "task_b.onnx")).graph.input] == ["image_b"]


def test_bad_checkpoints_are_refused_and_leave_nothing(tmp_path):
    spec = preset("tiny", DENSE, input_size=(16, 16))
    net = random_reduced_net(spec, 9)
    tensors = network_tensors(net)
    unreduced = {k: v for k, v in tensors.items() if not k.startswith("mask.")}
    save_checkpoint(tmp_path / "unreduced.safetensors", unreduced, spec, "search")
    with pytest.raises(CompileError, match="dagc train"):
        compile_checkpoint(tmp_path / "unreduced.safetensors", tmp_path / "out")
    cut = dict(tensors)
    cut["mask.beta"] = tensors["mask.beta"].clone()
    cut["mask.beta"][1] = 0
    save_checkpoint(tmp_path / "cut.safetensors", cut, spec, "finetune")
    with pytest.raises(CompileError, match="'depth'"):
        compile_checkpoint(tmp_path / "cut.safetensors", tmp_path / "out")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not a dagc checkpoint"):
        compile_checkpoint(tmp_path / "foreign.safetensors", tmp_path / "out")
    with pytest.raises(CompileError, match="unknown target"):
        compile_checkpoint(tmp_path / "cut.safetensors", tmp_path / "out", target="tflite")
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_existing_output_needs_force(tmp_path):
    path = _ckpt(tmp_path, preset("tiny", DENSE[:1], input_size=(16, 16)), 11)
    compile_checkpoint(path, tmp_path / "art")
    with pytest.raises(CompileError, match="--force"):
        compile_checkpoint(path, tmp_path / "art")
    compile_checkpoint(path, tmp_path / "art", force=True)
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["format"] == "dagc.artifact"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cli_tensorrt_without_gpu_and_inspect(tmp_path, capsys):
    path = _ckpt(tmp_path, preset("tiny", DENSE[:2], input_size=(16, 16)), 12)
    with pytest.raises(SystemExit) as e:
        main(["compile", str(path), "--target", "tensorrt", "--out", str(tmp_path / "trt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "CUDA GPU" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "trt").exists()
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(path)])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "seg" in out and "vs supernet" in out


def test_verification_refuses_a_model_that_disagrees(tmp_path, monkeypatch):
    """A compiled model that disagrees with the supernet (here: a deliberately wrong fold) is
    not written; the error names the task."""
    import dagc.compiler.passes as passes

    path = _ckpt(tmp_path, preset("tiny", DENSE[:2], input_size=(16, 16)), 13)
    real = passes._folded

    def wrong(params, block, task, scale):
        w, b = real(params, block, task, scale)
        return w, b + np.float32(0.5)

    monkeypatch.setattr(passes, "_folded", wrong)
    with pytest.raises(CompileError, match="differs from the masked supernet"):
        compile_checkpoint(path, tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_cli_bad_inputs_are_one_line_exit_2_and_leave_nothing(tmp_path, capsys):
    spec = preset("tiny", DENSE[:2], input_size=(16, 16))
    good = _ckpt(tmp_path, spec, 14)
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 3])
    unreduced = {k: v for k, v in network_tensors(random_reduced_net(spec, 14)).items() if not k.startswith("mask.")}
    save_checkpoint(tmp_path / "unreduced.safetensors", unreduced, spec, "search")
    cases = [
        ([str(tmp_path / "missing.safetensors")], "no checkpoint"),
        ([str(tmp_path / "trunc.safetensors")], "truncated"),
        ([str(tmp_path / "unreduced.safetensors")], "not been reduced"),
        ([str(good), "--target", "tflite"], "unknown target"),
        ([str(good), "--batch", "1,x"], "--batch"),
    ]
    for args, words in cases:
        with pytest.raises(SystemExit) as e:
            main(["compile", *args, "--out", str(tmp_path / "art")])
        err = capsys.readouterr().err
        assert e.value.code == 2, args
        assert len(err.strip().splitlines()) == 1 and words in err and "Traceback" not in err, err
        assert not (tmp_path / "art").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]

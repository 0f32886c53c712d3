"""`dagc bench`: every variant measured, FLOPs consistent, files written; no timing thresholds."""

import json

import pytest
from compiler_cases import random_reduced_net
from PIL import Image

from dagc.checkpoint import save_checkpoint
from dagc.cli import main
from dagc.compiler.compile import compile_checkpoint
from dagc.runtime.bench import BenchError, benchmark
from dagc.spec import TaskSpec, preset
from dagc.trainer.network import network_tensors

DENSE = [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth")]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    spec = preset("tiny", DENSE, input_size=(16, 16))
    save_checkpoint(tmp / "c.safetensors", network_tensors(random_reduced_net(spec, 21)), spec, "finetune")
    compile_checkpoint(tmp / "c.safetensors", tmp / "art")
    return tmp


def test_benchmark_measures_every_variant_with_consistent_flops(artifact):
    result = benchmark(artifact / "art", artifact / "c.safetensors", batches=(1, 4), warmup=1, min_reps=3,
                       min_seconds=0.0)
    assert set(result["batches"]) == {"1", "4"}
    for block in result["batches"].values():
        v = block["variants"]
        assert {"supernet", "masked", "naive_onnx", "compiled", "task:seg", "task:depth", "raw:seg"} <= set(v)
        assert all(s["p50_ms"] > 0 and s["reps"] >= 3 and s["p99_ms"] >= s["p50_ms"] for s in v.values())
        assert v["supernet"]["flops_per_image"] > v["masked"]["flops_per_image"] >= v["compiled"]["flops_per_image"]
        assert v["task:seg"]["flops_per_image"] <= v["compiled"]["flops_per_image"]
        r = block["ratios"]["compiled_vs_masked"]
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["flops_ratio"])


def test_cli_writes_json_and_plot(artifact, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", str(artifact / "art"), "--checkpoint", str(artifact / "c.safetensors"), "--batch", "2",
              "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    assert e.value.code == 0
    assert "compiled_vs_naive_onnx" in capsys.readouterr().out
    assert json.loads((tmp_path / "b.json").read_text())["config"]["batches"] == [2]
    assert Image.open(tmp_path / "b.png").size[0] > 100


def test_checkpoint_from_another_network_is_refused(artifact, tmp_path):
    other = preset("tiny", DENSE[:1], input_size=(16, 16))
    save_checkpoint(tmp_path / "o.safetensors", network_tensors(random_reduced_net(other, 3)), other, "finetune")
    with pytest.raises(BenchError, match="not the checkpoint"):
        benchmark(artifact / "art", tmp_path / "o.safetensors", batches=(1,), min_reps=1, min_seconds=0.0)

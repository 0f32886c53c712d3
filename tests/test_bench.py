"""`dagc.tools.bench`: every variant measured, FLOPs consistent, the naive export checked, files
written, mismatched inputs refused. No timing thresholds."""

import copy
import json

import pytest
import torch
from compiler_cases import random_reduced_net
from PIL import Image

from dagc.checkpoint import save_checkpoint
from dagc.compiler.compile import compile_checkpoint
from dagc.errors import DagcError
from dagc.spec import TaskSpec, preset
from dagc.tools import bench
from dagc.tools.bench import BenchError, benchmark, format_table, plot, write_json
from dagc.trainer.network import network_tensors

DENSE = [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth"), TaskSpec("normal", "normal")]
FAST = dict(warmup=1, min_reps=2, min_seconds=0.0)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    spec = preset("tiny", DENSE, input_size=(16, 16))
    save_checkpoint(tmp / "c.safetensors", network_tensors(random_reduced_net(spec, 21)), spec, "finetune")
    compile_checkpoint(tmp / "c.safetensors", tmp / "art")
    return tmp


@pytest.fixture(scope="module")
def result(artifact):
    return benchmark(artifact / "art", artifact / "c.safetensors", batches=(1, 3), threads=1, **FAST)


def test_every_variant_at_every_batch_with_consistent_flops(result):
    tasks = [t.name for t in DENSE]
    names = {"supernet", "masked", "naive_onnx", "shared", *(f"{k}:{t}" for t in tasks for k in ("task", "bare", "unchecked"))}
    assert names == set(result["variants"]) - {"bare:shared", "openvino"}  # openvino: tools/bench_precision.py
    v = result["variants"]
    assert v["supernet"]["flops"] > v["masked"]["flops"] >= v["shared"]["flops"]
    assert v["naive_onnx"]["flops"] == v["masked"]["flops"]
    for t in tasks:
        assert 0 < v[f"task:{t}"]["flops"] <= v["shared"]["flops"]
    assert set(result["batches"]) == {"1", "3"}
    for b, entry in result["batches"].items():
        assert set(entry["variants"]) == set(v)
        for s in entry["variants"].values():
            assert s["p50_ms"] > 0 and s["reps"] >= 2 and s["p99_ms"] >= s["p50_ms"]
            assert s["throughput_ips"] == pytest.approx(int(b) / (s["p50_ms"] / 1e3))
            assert s["peak_rss_mb"] >= 0 or result["config"]["memory_method"].startswith("growth")
        for x in ("supernet", "masked", "naive_onnx"):
            r = entry["ratios"][f"shared_vs_{x}"]
            assert r["speedup"] == pytest.approx(entry["variants"][x]["p50_ms"] / entry["variants"]["shared"]["p50_ms"])
            assert r["flops_ratio"] == pytest.approx(v[x]["flops"] / v["shared"]["flops"])
            assert r["efficiency"] == pytest.approx(r["speedup"] / r["flops_ratio"])
        assert set(entry["ratios"]["per_task"]) == set(tasks)
        for t, r in entry["ratios"]["per_task"].items():
            assert r["unchecked_vs_bare"] == pytest.approx(
                entry["variants"][f"unchecked:{t}"]["p50_ms"] / entry["variants"][f"bare:{t}"]["p50_ms"])
    exp = result["naive_export"]
    assert exp["export_seconds"] > 0
    assert all(e <= 1e-4 for e in exp["verified_max_rel_error"].values())
    assert set(exp["verified_max_rel_error"]) == {"1", "3"}
    assert result["config"]["threads"] == 1 and result["machine"]["torch"] == torch.__version__
    json.dumps(result, allow_nan=False)  # JSON-able


def test_table_json_and_plot_written(result, tmp_path):
    text = format_table(result)
    assert "batch 3" in text and "naive_onnx" in text and "eff." in text
    write_json(result, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["config"]["batches"] == [1, 3]
    plot(result, tmp_path / "r.png")
    with Image.open(tmp_path / "r.png") as img:
        assert img.format == "PNG" and img.size[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]  # no temporary files left


def test_naive_export_that_disagrees_is_refused(artifact, monkeypatch):
    original = bench.naive_export

    def perturbed(net, batch, **kw):
        other = copy.deepcopy(net)
        with torch.no_grad():
            for head in other.heads.values():
                head.branches[0][-1].bias.add_(0.5)
        return original(other, batch, **kw)

    monkeypatch.setattr(bench, "naive_export", perturbed)
    with pytest.raises(BenchError, match="naive ONNX export"):
        benchmark(artifact / "art", artifact / "c.safetensors", batches=(1,), bare=False, **FAST)


def test_mismatched_checkpoint_and_bad_backend_are_refused(artifact, tmp_path):
    other = preset("tiny", DENSE[:2], input_size=(16, 16))
    save_checkpoint(tmp_path / "o.safetensors", network_tensors(random_reduced_net(other, 3)), other, "finetune")
    with pytest.raises(BenchError, match="does not belong to artifact .*specs differ"):
        benchmark(artifact / "art", tmp_path / "o.safetensors", batches=(1,), **FAST)
    # Same spec, other masks: also not the checkpoint the artifact was compiled from.
    spec = preset("tiny", DENSE, input_size=(16, 16))
    save_checkpoint(tmp_path / "m.safetensors", network_tensors(random_reduced_net(spec, 22)), spec, "finetune")
    with pytest.raises(BenchError, match="other masks"):
        benchmark(artifact / "art", tmp_path / "m.safetensors", batches=(1,), **FAST)
    with pytest.raises(BenchError, match="unknown backend 'fastest'") as e:
        benchmark(artifact / "art", artifact / "c.safetensors", backend="fastest", batches=(1,), **FAST)
    assert isinstance(e.value, DagcError)
    with pytest.raises(BenchError, match="batch sizes"):
        benchmark(artifact / "art", artifact / "c.safetensors", batches=(0,), **FAST)


def test_cli_bench_writes_json_and_plot(artifact, tmp_path, capsys):
    from dagc.tools.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", str(artifact / "art"), "--checkpoint", str(artifact / "c.safetensors"), "--batch", "2",
              "--threads", "1", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    assert e.value.code == 0
    assert "shared model vs" in capsys.readouterr().out
    assert json.loads((tmp_path / "b.json").read_text())["config"]["batches"] == [2]
    with Image.open(tmp_path / "b.png") as img:
        assert img.format == "PNG"

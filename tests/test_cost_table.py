"""Cost tables and latency budgets (`dagc.cost_table`, `dagc.compiler.measure`, issue 21): the file
round trip and its validation, the cache, the measurement, latency budgets in the configuration,
and a short latency-budgeted run with what it records."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dagc.blocks import blocks
from dagc.checkpoint import load_checkpoint
from dagc.compiler.budget_report import budget_report, predicted_costs
from dagc.compiler.compile import preview_manifest, summary
from dagc.compiler.ir import build_graph
from dagc.compiler.measure import measure_table
from dagc.compiler.passes import optimize
from dagc.cost_table import (
    CostTable,
    cache_dir,
    cache_path,
    cached_table,
    flops_table,
    load_table,
    network_fingerprint,
    write_table,
)
from dagc.costs import block_flops, head_costs
from dagc.errors import ConfigError, CostTableError
from dagc.spec import TaskSpec, preset
from dagc.tools.cli import main
from dagc.trainer.budget import LATENCY_LOSS_UNIT, fits, loss_costs, read_budget, task_budgets
from dagc.trainer.train import TrainConfig, train

SPEC = preset("tiny", (TaskSpec("seg", "segmentation", 3), TaskSpec("cls", "classification", 4)), in_channels=1)
OTHER = preset("tiny", (TaskSpec("seg", "segmentation", 3),), in_channels=1)
FAST = dict(warmup_iters=2, search_iters=4, finetune_iters=2, batch_size=4, n_train=16, n_test=8, stats_batches=1,
            val_fraction=0.0)


def _latency(spec=SPEC, batch=2, threads=1, scale=0.01) -> CostTable:
    """A latency table made up from the FLOPs (no timing): deterministic, for the tests that do not measure."""
    f = flops_table(spec)
    return CostTable(network_fingerprint(spec), "onnxruntime-cpu", batch, threads, "ms",
                     {k: v / 1e6 * scale * batch for k, v in f.blocks.items()},
                     {k: v / 1e6 * scale * batch for k, v in f.heads.items()}, 0.01, {"cpu": "test"}, {"dagc": "x"})


class Counter:
    """A `Measure` that makes up a table and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, spec, target, batch, threads):
        self.calls += 1
        return _latency(spec, batch, threads)


def test_a_table_round_trips_through_its_file_and_keeps_its_digest(tmp_path):
    for table in (flops_table(SPEC), _latency()):
        path = write_table(table, tmp_path / f"{table.target}.json")
        back = load_table(path)
        assert back == table and back.digest == table.digest and back.to_dict() == table.to_dict()
        back.check(SPEC, table.target, table.batch, table.threads)
        assert not list(tmp_path.glob("*.tmp"))  # written atomically: no temporary left
    g, a, b = flops_table(SPEC).mask_layout(SPEC)
    for x, y in zip((g, a, b), block_flops(SPEC)):
        np.testing.assert_array_equal(x, y)
    assert flops_table(SPEC).fixed("seg") == head_costs(SPEC, "seg")["flops"]


def _edit(table, **changes):
    d = table.to_dict()
    for k, v in changes.items():
        if v is None:
            del d[k]
        else:
            d[k] = v
    return d


@pytest.mark.parametrize("changes, words", [
    ({"format": "x"}, "not a dagc cost table"),
    ({"version": 9}, "version 9 is not one this dagc reads"),
    ({"network": "abc"}, "sha256 fingerprint"),
    ({"target": "tpu"}, "unknown cost target 'tpu'"),
    ({"batch": 0}, "batch must be a positive integer"),
    ({"threads": None}, "threads must be a positive integer"),
    ({"unit": "FLOPs"}, "\"unit\" must be 'ms'"),
    ({"blocks": {"edges.0_1": -1.0}}, "finite costs >= 0"),
    ({"blocks": {"edges.0_1": float("nan")}}, "finite costs >= 0"),
    ({"blocks": {"bogus": 1.0}}, "is not a block name"),
    ({"heads": None}, "\"heads\" must map names"),
    ({"call": "fast"}, "\"call\" must be a finite cost"),
    ({"machine": []}, "\"machine\" must be a JSON object"),
])
def test_a_bad_table_file_is_one_clear_error(tmp_path, changes, words):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_edit(_latency(), **changes)))
    with pytest.raises(CostTableError, match=words) as e:
        load_table(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_an_unreadable_or_non_json_table_is_one_clear_error(tmp_path):
    (tmp_path / "t.json").write_text("{not json")
    for path, words in ((tmp_path / "t.json", "is not valid JSON"), (tmp_path / "none.json", "cannot read cost table")):
        with pytest.raises(CostTableError, match=words) as e:
            load_table(path)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec, target, batch, threads, words", [
    (OTHER, "onnxruntime-cpu", 2, 1, "measured for another network"),
    (SPEC, "openvino-cpu", 2, 1, "prices onnxruntime-cpu at batch 2, 1 thread, not openvino-cpu"),
    (SPEC, "onnxruntime-cpu", 8, 1, "not onnxruntime-cpu at batch 8, 1 thread"),
    (SPEC, "onnxruntime-cpu", 2, 4, "not onnxruntime-cpu at batch 2, 4 threads"),
])
def test_a_table_for_another_network_target_batch_or_threads_is_refused(spec, target, batch, threads, words):
    with pytest.raises(CostTableError, match=words) as e:
        _latency().check(spec, target, batch, threads, source="t.json")
    assert "\n" not in str(e.value)
    short = CostTable.from_dict(_edit(_latency(), blocks={"edges.0_1": 1.0}))
    with pytest.raises(CostTableError, match="does not price exactly this network's blocks"):
        short.check(SPEC, "onnxruntime-cpu", 2, 1)


def test_the_cache_measures_once_per_network_target_batch_and_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGC_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    measure = Counter()
    first = cached_table(SPEC, "onnxruntime-cpu", 2, 1, measure=measure)
    path = cache_path(SPEC, "onnxruntime-cpu", 2, 1)
    assert path.parent == tmp_path / "c" / "cost_tables" and path.exists() and measure.calls == 1
    stamp = path.stat().st_mtime_ns
    again = cached_table(SPEC, "onnxruntime-cpu", 2, 1, measure=measure)
    assert again == first and measure.calls == 1 and path.stat().st_mtime_ns == stamp  # a hit: not re-measured
    assert cached_table(SPEC, "onnxruntime-cpu", 2, 1) == first  # a hit needs no measuring function
    cached_table(SPEC, "onnxruntime-cpu", 8, 1, measure=measure)
    cached_table(OTHER, "onnxruntime-cpu", 2, 1, measure=measure)
    assert measure.calls == 3 and len(list(path.parent.iterdir())) == 3
    cached_table(SPEC, "onnxruntime-cpu", 2, 1, measure=measure, refresh=True)
    assert measure.calls == 4
    assert cached_table(SPEC, "flops") == flops_table(SPEC) and measure.calls == 4  # counted, never cached
    with pytest.raises(CostTableError, match="no cost table for this network on onnxruntime-cpu at batch 4"):
        cached_table(SPEC, "onnxruntime-cpu", 4, 1)
    path.write_text("[]")
    with pytest.raises(CostTableError, match="cost table .*cost_tables.*: not a dagc cost table.*--remeasure"):
        cached_table(SPEC, "onnxruntime-cpu", 2, 1, measure=measure)
    for home, want in (({"XDG_CACHE_HOME": str(tmp_path / "x")}, tmp_path / "x" / "dagc"), ({}, None)):
        monkeypatch.delenv("DAGC_CACHE_DIR")
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        for k, v in home.items():
            monkeypatch.setenv(k, v)
        assert cache_dir() == (want or cache_dir().home() / ".cache" / "dagc")
        monkeypatch.setenv("DAGC_CACHE_DIR", str(tmp_path / "c"))


def test_a_measured_table_prices_every_block_and_predicts_a_compiled_model():
    table = measure_table(SPEC, "onnxruntime-cpu", 2, 1, warmup=1, repeats=3)
    table.check(SPEC, "onnxruntime-cpu", 2, 1)
    assert set(table.blocks) == {b.key for b in blocks(SPEC)} and table.call > 0
    assert all(v >= 0 for v in table.blocks.values()) and all(v > 0 for v in table.heads.values())
    assert table.machine["cores"] and table.versions["onnxruntime"] and table.method["rounds"] == 3
    assert CostTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    with pytest.raises(CostTableError, match="torch-cuda.*(needs a CUDA GPU|not built yet)"):
        measure_table(SPEC, "torch-cuda", 1, 1)
    with pytest.raises(CostTableError, match="counted, not measured"):
        measure_table(SPEC, "flops", 1, None)


@pytest.mark.parametrize("text, value, unit", [("2ms", 2.0, "ms"), ("500us", 0.5, "ms"), ("0.01 s", 10.0, "ms"),
                                               ("30MFLOPs", 30e6, "FLOPs")])
def test_latency_budgets_parse_in_ms(text, value, unit):
    b = read_budget(text)
    assert b.value == pytest.approx(value) and b.unit == unit


@pytest.mark.parametrize("kw, words", [
    ({"budget": "2ms"}, "is a latency: it needs a latency --cost-target"),
    ({"budget": "30MFLOPs", "cost_target": "onnxruntime-cpu"}, "counts FLOPs"),
    ({"cost_target": "onnxruntime-cpu"}, "prices a --budget"),
    ({"budget": "2ms", "cost_target": "gpu"}, "unknown cost target 'gpu'"),
    ({"budget": "2ms", "cost_target": "onnxruntime-cpu", "cost_batch": 0}, "cost_batch must be a positive integer"),
    ({"budget": "2ms", "cost_target": "onnxruntime-cpu", "cost_threads": True}, "cost_threads must be a positive"),
    ({"budget": "30MFLOPs", "cost_threads": 2}, "FLOPs are counted per sample"),
    ({"budget": "2 hours", "cost_target": "onnxruntime-cpu"}, "a number and a unit"),
])
def test_a_latency_budget_and_its_target_must_agree(kw, words):
    with pytest.raises(ConfigError, match=words):
        TrainConfig(**kw)


def test_latency_costs_keep_the_loss_scale_and_the_reduction_stops_in_the_tables_unit():
    cfg = TrainConfig(budget="2ms", cost_target="onnxruntime-cpu")
    assert (cfg.cost_batch, cfg.cost_threads, cfg.budget_value) == (1, 1, 2.0)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    table = _latency(batch=2)
    g, a, b, budgets = loss_costs(SPEC, 2.0, "cpu", table)
    g_ms = table.mask_layout(SPEC)[0]
    torch.testing.assert_close(g, torch.as_tensor(g_ms / (2 * LATENCY_LOSS_UNIT), dtype=torch.float32))
    np.testing.assert_allclose(budgets.numpy(), task_budgets(SPEC, 2.0, table) / (2 * LATENCY_LOSS_UNIT), rtol=1e-6)
    assert task_budgets(SPEC, 2.0, table)[0] == pytest.approx(2.0 - table.heads["seg"] - table.call)
    with pytest.raises(ConfigError, match="below task 'seg''s head and one call alone on onnxruntime-cpu"):
        task_budgets(SPEC, table.call, table)
    full = _full()
    assert fits(SPEC, "seg", 1e9, table)(*full) and not fits(SPEC, "seg", table.fixed("seg"), table)(*full)


def _full():
    n = SPEC.n_states
    band = np.zeros((n, n), np.int64)
    for blk in blocks(SPEC):
        if blk.src is not None and blk.dst is not None:
            band[blk.src, blk.dst] = 1
    return band, np.ones(n, np.int64), np.ones(n, np.int64)


def test_a_latency_budgeted_run_records_its_budget_target_and_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    cfg = TrainConfig(budget="50ms", cost_target="onnxruntime-cpu", cost_batch=2, cost_threads=1, **FAST)
    train(cfg, out, progress=False, measure_costs=measure_table)  # what dagc train passes
    ckpt = out / "checkpoint.safetensors"
    ck = load_checkpoint(ckpt)
    config = ck.json("config")
    assert (config["budget"], config["cost_target"], config["cost_batch"], config["cost_threads"]) == \
        ("50ms", "onnxruntime-cpu", 2, 1)
    table = CostTable.from_dict(ck.json("cost_table"))
    table.check(ck.spec, "onnxruntime-cpu", 2, 1)
    assert table == load_table(cache_path(ck.spec, "onnxruntime-cpu", 2, 1))  # measured once, cached
    recorded = json.loads((out / "metrics.json").read_text())["cost_table"]
    assert recorded == {"target": "onnxruntime-cpu", "batch": 2, "threads": 1, "unit": "ms",
                        "network": network_fingerprint(ck.spec), "sha256": table.digest}
    # every task model fits the budget by the table's own prediction, and compile/inspect say so
    report = budget_report(ckpt)
    predicted = predicted_costs(optimize(build_graph(ck.spec, ck.tensors)), table)
    assert report.predicted == predicted and all(predicted[t] <= 50 for t in ck.spec.task_names)
    counted = predicted_costs(optimize(build_graph(ck.spec, ck.tensors)), flops_table(ck.spec))
    costs = preview_manifest(ckpt).costs  # a FLOPs table predicts exactly the manifest's FLOPs
    assert counted == {"shared": costs.shared.flops, **{t: c.flops for t, c in costs.per_task.items()}}
    line = [x for x in summary(preview_manifest(ckpt), report).splitlines() if x.startswith("budget:")][0]
    assert "50 ms per task model" in line and "onnxruntime-cpu at batch 2, 1 thread" in line and "(fits)" in line
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["inspect", str(ckpt), "--costs", "onnxruntime-cpu"])
    shown = capsys.readouterr().out
    assert "onnxruntime-cpu at batch 2, 1 thread" in shown and "recorded in the checkpoint" in shown
    assert all(b.key in shown for b in blocks(ck.spec)) and "shared model" in shown


def test_a_resumed_latency_run_prices_with_its_own_table(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGC_CACHE_DIR", str(tmp_path / "cache"))
    cfg = TrainConfig(budget="50ms", cost_target="onnxruntime-cpu", **FAST)

    class Stop(Exception):
        pass

    def stop(run):
        if run.stage == "search" and run.step == 2:
            raise Stop

    measure = Counter()
    with pytest.raises(Stop):
        train(cfg, tmp_path / "r", progress=False, on_step=stop, measure_costs=measure)
    assert measure.calls == 1
    for f in (tmp_path / "cache").rglob("*.json"):
        os.remove(f)  # the cache is gone: the state's own table is used

    def refuse(*args):
        raise AssertionError("a resumed run must not measure")

    train(None, tmp_path / "r", resume=True, progress=False, measure_costs=refuse)
    ck = load_checkpoint(tmp_path / "r" / "checkpoint.safetensors")
    assert CostTable.from_dict(ck.json("cost_table")) == _latency(ck.spec, 1, 1)


def test_a_latency_budget_without_a_way_to_measure_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGC_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(CostTableError, match="no cost table for this network on onnxruntime-cpu"):
        train(TrainConfig(budget="2ms", cost_target="onnxruntime-cpu", **FAST), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_the_costs_command_line_in_its_own_process(tmp_path):
    env = {**os.environ, "DAGC_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "dagc", "train", "--out", str(tmp_path / "r"), "--budget", "2ms",
                        "--cost-target", "openvino-cpu", "--cost-threads", "0"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cost_threads must be a positive" in r.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "cache").exists()

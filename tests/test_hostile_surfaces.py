"""Hostile input on the surfaces added after issue 13 (issue 23): the reduced-precision options of
compile and bench, the checkpoint metadata the accuracy check reads, the manifest's ``accuracy``
record the runtime acts on, symbolic link loops, serve's --host, and one hostile case for every
option of compile, bench, run, serve and export. Each refusal keeps the contract: from the CLI one
``dagc: error:`` line, exit 2, no traceback, nothing written; from the API the documented error."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from dagc.compiler.compile import compile_artifact
from dagc.errors import ArtifactError, BenchError, CompileError, DagcError, DataError, ServeError
from dagc.modelcheck import verify_artifact
from dagc.network_file import preset_path
from dagc.runtime import load
from dagc.tools.bench import benchmark
from dagc.tools.cli import main
from dagc.tools.serve import ServeConfig
from dagc.trainer.recalibrate import recalibrate_checkpoint
from dagc.trainer.train import TrainConfig, train

# an address no machine has (TEST-NET-1, RFC 5737)
NOT_HERE = "192.0.2.1"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths of a trained tiny run's checkpoint, its fp32 and fp32+int8 artifacts, an input array
    and a symbolic link loop."""
    root = tmp_path_factory.mktemp("surfaces")
    train(TrainConfig(warmup_iters=3, search_iters=6, finetune_iters=3, batch_size=4, n_train=32, n_test=8),
          root / "run", progress=False)
    ckpt = root / "run" / "checkpoint.safetensors"
    compile_artifact(ckpt, root / "art")
    compile_artifact(ckpt, root / "art8", precisions="fp32,int8", calibration_batches=2)
    np.save(root / "img.npy", np.zeros((3, 32, 32), np.float32))
    os.symlink(root / "loop2", root / "loop1")
    os.symlink(root / "loop1", root / "loop2")
    v2 = json.loads(preset_path("tiny-v2").read_text())
    (root / "down.json").write_text(json.dumps({**v2, "downsample": "average"}))
    (root / "refine.json").write_text(json.dumps({**v2, "refine_channels": -16}))
    return {"ckpt": ckpt, "art": root / "art", "art8": root / "art8", "img": root / "img.npy",
            "loop": root / "loop1", "down": root / "down.json", "refine": root / "refine.json", "root": root}


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


def _one_error(code, err, fragment):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("dagc: error: "), err
    assert "Traceback" not in err
    assert fragment in lines[0], lines[0]


# (command and arguments, fragment of the one error line); {ckpt} {art} {art8} {img} {loop} {out}
# are the fixture's paths, {out} a path that must still not exist afterwards.
OPTIONS = [
    # compile
    ("compile {loop} --out {out}", "symbolic link loop"),
    ("compile {ckpt} --out {out} --target tpu", "unknown target"),
    ("compile {ckpt} --out {ckpt}", "writing there would destroy it"),
    ("compile {ckpt} --out {loop}", "exists; pass --force"),
    ("compile {ckpt} --out {art} --force --fp16", "--fp16 makes TensorRT fp16 plans"),
    ("compile {ckpt} --out {out} --fp16", "for fp16 ONNX models use --precision fp32,fp16"),
    ("compile {ckpt} --out {out} --bf16", "--bf16 adds bf16 AOTInductor packages"),
    ("compile {ckpt} --out {out} --device cuda", "--target onnx builds for cpu"),
    ("compile {ckpt} --out {out} --target tensorrt --device cpu", "builds for cuda"),
    ("compile {ckpt} --out {out} --batch 0", "--batch takes positive integers"),
    ("compile {ckpt} --out {out} --batch x", "--batch takes comma-separated integers"),
    ("compile {ckpt} --out {out} --precision int4", "unknown precision 'int4'"),
    ("compile {ckpt} --out {out} --precision int8 --calibration-seed -1", "--calibration-seed must be a non-negative"),
    ("compile {ckpt} --out {out} --precision int8 --calibration-seed 1.5", "'1.5' is not a valid integer"),
    ("compile {ckpt} --out {out} --precision int8 --calibration-batches 0", "--calibration-batches must be a positive"),
    ("compile {ckpt} --out {out} --precision int8 --calibration-batches 9", "more than the training split of"),
    ("compile {ckpt} --out {out} --calibration-batches 2", "add int8 to --precision"),
    ("compile {ckpt} --out {out} --precision fp16 --calibration-seed 3", "add int8 to --precision"),
    ("compile {ckpt} --out {out} --precision int8 --calibration kl", "--calibration must be one of ['minmax',"),
    ("compile {ckpt} --out {out} --calibration entropy", "add int8 to --precision"),
    ("compile {ckpt} --out {out} --max-metric-drop 0.5", "--max-metric-drop bounds the accuracy check"),
    ("compile {ckpt} --out {out} --precision int8 --max-metric-drop 1", "a fraction in [0, 1)"),
    ("compile {ckpt} --out {out} --precision int8 --max-metric-drop nan", "a fraction in [0, 1)"),
    ("compile {ckpt} --out {out} --precision int8 --data-root {loop}", "data_root is only for the on-disk"),
    # bench
    ("bench {art} --checkpoint {loop}", "symbolic link loop"),
    ("bench {loop} --checkpoint {ckpt}", "Too many levels of symbolic links"),
    ("bench {art} --checkpoint {ckpt} --batch 1,1", "distinct positive integers"),
    ("bench {art} --checkpoint {ckpt} --backend tpu", "unknown backend"),
    ("bench {art} --checkpoint {ckpt} --threads 0", "--threads must be a positive integer"),
    ("bench {art} --checkpoint {ckpt} --json {loop}", "symbolic link loop"),
    ("bench {art} --checkpoint {ckpt} --plot {ckpt}", "writing there would destroy it"),
    ("bench {art} --checkpoint {ckpt} --precision int4", "unknown precision 'int4'"),
    ("bench {art} --checkpoint {ckpt} --precision int8", "has no int8 models"),
    ("bench {art} --checkpoint {ckpt} --precision bf16", "no passed bf16 accuracy check"),
    ("bench {art8} --checkpoint {ckpt} --precision int8 --backend torch", "not backend 'torch'"),
    # run
    ("run {loop} {img} --out {out}", "Too many levels of symbolic links"),
    ("run {art} {loop} --out {out}", "no such image file"),
    ("run {art} {img} --out {out} --tasks sky", "unknown task 'sky'"),
    ("run {art} {img} --out {out} --backend tpu", "unknown backend"),
    ("run {art} {img} --out {out} --precision int8", "has no int8 models"),
    ("run {art8} {img} --out {out} --precision bf16 --backend onnxruntime", "runs on backend 'openvino'"),
    ("run {art} {img} --out {loop}", "symbolic link loop"),
    # serve (every case is refused before a server is looked for)
    ("serve {loop}", "Too many levels of symbolic links"),
    (f"serve {{art}} --host {NOT_HERE}", "is not an address of this machine"),
    ("serve {art} --host localhost", "--host takes an IPv4 address"),
    ("serve {art} --http-port 70000", "--http-port must be a port number"),
    ("serve {art} --grpc-port -1", "--grpc-port must be a port number"),
    ("serve {art} --metrics-port 8000", "must differ"),
    ("serve {art} --no-metrics=yes", "does not take a value"),
    ("serve {art} --name a/b", "model name prefix"),
    ("serve {art} --max-batch 0", "max_batch_size must be an integer >= 1"),
    ("serve {art} --instances 0", "instances must be an integer >= 1"),
    ("serve {art} --max-queue-delay-us -1", "max_queue_delay_us must be an integer >= 0"),
    ("serve {art} --threads -1", "intra_op_threads must be an integer >= 0"),
    ("serve {art} --server-log {loop}", "symbolic link loop"),
    # export triton
    ("export triton {loop} --out {out}", "Too many levels of symbolic links"),
    ("export triton {art} --out {art} --force", "writing there would destroy it"),
    ("export triton {art} --out {ckpt}", "exists; pass --force"),
    ("export triton {art} --out {out} --name -x", "model name prefix"),
    ("export triton {art} --out {out} --max-batch 0", "max_batch_size must be an integer >= 1"),
    ("export triton {art} --out {out} --instances 0", "instances must be an integer >= 1"),
    ("export triton {art} --out {out} --max-queue-delay-us -5", "max_queue_delay_us must be an integer >= 0"),
    ("export triton {art} --out {out} --no-ensembles=1", "does not take a value"),
    ("export triton {art} --out {out} --backend tf", "triton backend 'tf'"),
    ("export triton {art} --out {out} --threads -2", "intra_op_threads must be an integer >= 0"),
    ("export triton {art} --out {out} --threads 4", "add --backend python or drop --threads"),
    # the landed surfaces of the other issues: folder datasets, network files, --init
    ("train --out {out} --dataset folder --data-root {loop}", "is not a directory"),
    ("train --out {out} --network {loop}", "not a network file"),
    ("train --out {out} --init {loop}", "no such file"),
    # the network options of issue 27 (downsample, refine_channels)
    ("train --out {out} --network {down}", "downsample must be one of ['max_pool_after', 'average_before']"),
    ("train --out {out} --network {refine}", "refine_channels must be an integer >= 0"),
    ("train --out {out} --preset tiny-v3", "unknown preset 'tiny-v3'"),
    # budgets (issue 21)
    ("train --out {out} --budget 2ms", "is a latency: it needs a latency --cost-target"),
    ("train --out {out} --budget 2ms --cost-target tpu", "unknown cost target 'tpu'"),
    ("train --out {out} --budget 30MFLOPs --cost-target onnxruntime-cpu", "counts FLOPs"),
    ("train --out {out} --cost-target onnxruntime-cpu", "prices a --budget"),
    ("train --out {out} --budget 2ms --cost-target onnxruntime-cpu --cost-batch 0", "cost_batch must be a positive"),
    ("train --out {out} --budget 2ms --cost-target onnxruntime-cpu --cost-threads -1", "cost_threads must be a positive"),
    ("train --out {out} --budget 2ms --cost-target onnxruntime-cpu --cost-threads x", "'x' is not a valid integer"),
    ("train --out {out} --budget 30MFLOPs --cost-batch 8", "FLOPs are counted per sample"),
    ("train --out {out} --budget 1e-9ms --cost-target onnxruntime-cpu", "head and one call alone"),
    ("train --out {out} --budget 30MFLOPs --budget-scope all", "budget_scope must be one of"),
    ("train --out {out} --budget-scope shared", "says what a --budget prices"),
    ("train --out {out} --budget 1KFLOPs --budget-scope shared", "heads of all tasks and one call alone"),
    # cost tables (issue 21)
    ("inspect {ckpt} --costs tpu", "unknown cost target 'tpu'"),
    ("inspect {art} --costs flops", "not the directory"),
    ("inspect {ckpt} --cost-batch 8", "add --costs"),
    ("inspect {ckpt} --remeasure", "add --costs"),
    ("inspect {ckpt} --costs flops --cost-threads 2", "FLOPs are counted per sample"),
    ("inspect {ckpt} --costs onnxruntime-cpu --cost-batch 0", "the cost batch must be a positive integer"),
    ("inspect {ckpt} --costs onnxruntime-cpu --cost-threads 0", "the cost threads must be a positive integer"),
    ("inspect --network {down} --costs flops", "give the checkpoint as PATH"),
    ("inspect {loop} --costs flops", "symbolic link loop"),
    ("train --out {out} --budget 30MFLOPs --target-sparsity 0.5", "drop --target-sparsity"),
    ("train --out {out} --budget 1e400MFLOPs", "positive and finite"),
    ("train --out {out} --select-weight -1", "select_weight must be a number >= 0"),
    ("train --out {out} --select-weight nan", "select_weight must be a number >= 0"),
    ("train --out {out} --select-after 1", "select_after must be a fraction of the search"),
]


@pytest.mark.parametrize("line, fragment", OPTIONS, ids=[line for line, _ in OPTIONS])
def test_every_option_refuses_a_hostile_value_in_one_line(files, tmp_path, capsys, line, fragment):
    out = tmp_path / "out"
    before = sorted(p.name for p in files["root"].iterdir())
    argv = [a.format(out=out, **{k: v for k, v in files.items() if k != "root"}) for a in line.split()]
    _one_error(*_cli(argv, capsys), fragment)
    assert not out.exists() and not os.path.lexists(out)
    assert sorted(p.name for p in files["root"].iterdir()) == before


@pytest.mark.parametrize("line, fragment", [
    ("compile {ckpt} --out {out} --precision int8 --calibration-seed -1", "--calibration-seed"),
    ("compile {ckpt} --out {out} --fp16", "--fp16"),
    ("compile {loop} --out {out}", "symbolic link loop"),
    (f"serve {{art}} --host {NOT_HERE}", "not an address of this machine"),
])
def test_the_issues_cases_in_their_own_process(files, tmp_path, line, fragment):
    out = tmp_path / "out"
    argv = [a.format(out=out, **{k: v for k, v in files.items() if k != "root"}) for a in line.split()]
    r = subprocess.run([sys.executable, "-m", "dagc", *argv], capture_output=True, text=True, timeout=300)
    _one_error(r.returncode, r.stderr, fragment)
    assert not out.exists()


# --------------------------------------------------------------------------------------------- compile


def test_precision_options_are_checked_in_the_api_before_any_work(files, tmp_path):
    for kw, error, words in [({"precisions": "fp32,int8", "calibration_seed": -1}, CompileError, "calibration-seed"),
                             ({"precisions": "fp32,int8", "calibration_batches": True}, CompileError, "positive"),
                             ({"fp16": True}, CompileError, "--precision fp32,fp16"),
                             ({"calibration_batches": 4}, CompileError, "add int8"),
                             ({"max_metric_drop": 0.2}, CompileError, "add one to --precision")]:
        with pytest.raises(error, match=words):
            compile_artifact(files["ckpt"], tmp_path / "a", **kw)
    assert not (tmp_path / "a").exists()


def test_a_huge_calibration_count_is_refused_against_the_split_not_by_running_out_of_memory(files, tmp_path):
    with pytest.raises(DataError, match=r"training split of synthetic fills \(32 samples, 16 a batch\); give at most 8"):
        compile_artifact(files["ckpt"], tmp_path / "a", precisions="fp32,int8", calibration_batches=10 ** 11)
    assert not (tmp_path / "a").exists()


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    meta["config"] = json.dumps({**json.loads(meta["config"]), **changes})
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("changes, words", [
    ({"input_size": [16, 16]}, "its inputs are 3x16x16, the network takes 3x32x32"),
    ({"tasks": ["segmentation", "depth"]}, "it has no task 'normal'"),
])
def test_edited_checkpoint_metadata_is_refused_before_calibration(files, tmp_path, capsys, changes, words):
    ckpt = _edit_config(files["ckpt"], tmp_path / "edited.safetensors", **changes)
    code, err = _cli(["compile", ckpt, "--out", tmp_path / "a", "--precision", "int8", "--calibration-batches", "2"],
                     capsys)
    _one_error(code, err, words)
    assert not (tmp_path / "a").exists()
    with pytest.raises(DataError, match="does not fit its network"):
        recalibrate_checkpoint(ckpt, tmp_path / "r.safetensors")
    assert not (tmp_path / "r.safetensors").exists()


def test_a_reordered_task_list_still_compiles(files, tmp_path):
    ckpt = _edit_config(files["ckpt"], tmp_path / "edited.safetensors",
                        tasks=["edge", "normal", "depth", "segmentation"])
    m = compile_artifact(ckpt, tmp_path / "a", precisions="fp32,int8", calibration_batches=2)
    assert m.accuracy.passed("int8")


# --------------------------------------------------------------------------------------------- bench


def test_bench_refuses_a_precision_the_artifact_does_not_have_before_timing(files):
    with pytest.raises(BenchError, match=r"--precision int8: .* has no int8 models"):
        benchmark(files["art"], files["ckpt"], batches=[1], precisions=["int8"], min_seconds=0, min_reps=1)


# --------------------------------------------------------------------------------------------- accuracy record


def _check(m):
    return m["accuracy"]["precisions"]["int8"]["models"]["model.onnx"]


def _drop_50(m):
    _check(m)["drop"]["depth"] = 0.5


def _metrics_edited(m):
    _check(m)["metrics"]["depth"]["abs_err"] *= 2


def _allowance_raised(m):
    m["accuracy"]["max_metric_drop"] = 5


def _negative_allowance(m):
    m["accuracy"]["max_metric_drop"] = -0.1


def _drop_removed(m):
    del _check(m)["drop"]["depth"]


def _record_removed(m):
    del m["accuracy"]


def _check_removed(m):
    del m["accuracy"]["precisions"]["int8"]


RECORDS = {"a drop of 50% against an allowance of 1%": (_drop_50, "more than the allowed 1.00%"),
           "metrics that do not give the recorded drop": (_metrics_edited, "is not the drop of its metrics"),
           "an allowance above 1": (_allowance_raised, "max_metric_drop must be a fraction in [0, 1)"),
           "a negative allowance": (_negative_allowance, "max_metric_drop must be a fraction in [0, 1)"),
           "a task's drop removed": (_drop_removed, "drop['depth'] is missing"),
           "no accuracy record": (_record_removed, "records no passed check"),
           "no int8 check": (_check_removed, "records no passed check")}


@pytest.mark.parametrize("case", sorted(RECORDS))
def test_int8_models_whose_check_record_did_not_pass_are_refused(files, tmp_path, capsys, case):
    edit, words = RECORDS[case]
    art = tmp_path / "art"
    shutil.copytree(files["art8"], art)
    manifest = json.loads((art / "manifest.json").read_text())
    edit(manifest)
    (art / "manifest.json").write_text(json.dumps(manifest))
    for call in (lambda: load(art, precision="int8"), lambda: load(art), lambda: verify_artifact(art)):
        with pytest.raises(ArtifactError, match="accuracy|records no passed check") as e:
            call()
        assert words in str(e.value)
    code, err = _cli(["run", art, files["img"], "--out", tmp_path / "o", "--precision", "int8"], capsys)
    _one_error(code, err, words)
    assert not (tmp_path / "o").exists()


def test_the_intact_int8_record_loads(files):
    assert load(files["art8"], precision="int8").models_for() == ("model.int8.onnx",)


# --------------------------------------------------------------------------------------------- serve


def test_a_host_that_is_not_this_machines_is_named_not_the_port():
    with pytest.raises(ServeError, match=f"--host '{NOT_HERE}' is not an address of this machine"):
        ServeConfig(host=NOT_HERE)
    ServeConfig(host="127.0.0.1", http_port=0, grpc_port=0, metrics_port=0)


def test_every_refusal_here_is_a_dagc_error():
    for error in (ArtifactError, BenchError, CompileError, DataError, ServeError):
        assert issubclass(error, DagcError)

"""Runtime backends are records (`dagc.runtime.backends.Backend`): a second ONNX Runtime
configuration (graph optimizations off) is added as a record, without touching the engine, and
`dagc.runtime.load`, ``dagc run`` and ``dagc bench`` run it (real ONNX Runtime sessions)."""

import numpy as np
import onnxruntime as ort
import pytest
from compiler_cases import random_reduced_net

from dagc.checkpoint import save_checkpoint
from dagc.compiler.compile import compile_checkpoint
from dagc.errors import InputError
from dagc.precision_table import BF16, FP16, INT8, REFERENCE
from dagc.runners import OrtRunner, relative_error
from dagc.runtime import ArtifactError, backends, load
from dagc.spec import TaskSpec, preset
from dagc.tools.bench import benchmark
from dagc.tools.cli import main
from dagc.trainer.network import network_tensors

NAME = "onnxruntime-noopt"
TASKS = [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth"), TaskSpec("cls", "classification", 4)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("backends")
    spec = preset("tiny", TASKS, input_size=(16, 16))
    save_checkpoint(root / "c.safetensors", network_tensors(random_reduced_net(spec, 3)), spec, "finetune")
    compile_checkpoint(root / "c.safetensors", root / "art")
    return root


@pytest.fixture
def noopt():
    """The record, registered for one test; the sessions it made, to look at their options."""
    made = []

    def off(options) -> None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def make(data, name, info, threads, precision):
        made.append(OrtRunner(data, threads=threads, device="cpu", configure=off))
        return made[-1]

    backends.register(backends.Backend(NAME, ("onnx",), (REFERENCE, INT8, FP16), ("cpu",), lambda p: None, make,
                                       label="ONNX Runtime, no graph optimizations"))
    try:
        yield made
    finally:
        backends.unregister(NAME)
    assert NAME not in backends.known()


def test_a_record_adds_a_backend_that_the_engine_runs(run, noopt):
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    engine = load(run / "art", backend=NAME, threads=1)
    assert engine.backend == NAME and engine.models_for() == ("model.onnx",)
    got = engine.run(x)
    assert noopt and all(r.session.get_session_options().graph_optimization_level
                         == ort.GraphOptimizationLevel.ORT_DISABLE_ALL for r in noopt)
    ref = load(run / "art", backend="onnxruntime", threads=1).run(x)
    assert set(got) == {t.name for t in TASKS}
    for t in got:  # the same model, unoptimized: equal up to float32 rounding
        assert relative_error(got[t], ref[t]) <= 1e-5


def test_dagc_run_and_bench_take_the_registered_backend(run, noopt, tmp_path):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "a.npy", rng.random((3, 16, 16)).astype(np.float32))
    with pytest.raises(SystemExit) as e:
        main(["run", str(run / "art"), str(tmp_path / "a.npy"), "--out", str(tmp_path / "out"), "--backend", NAME])
    assert e.value.code in (None, 0)
    assert noopt  # the CLI's engine made its sessions through the record
    written = np.load(tmp_path / "out" / "a_depth.npy")
    ref = load(run / "art", backend="onnxruntime").run(np.load(tmp_path / "a.npy")[None])["depth"][0]
    assert relative_error(written, ref) <= 1e-5  # no preprocessing recorded: the raw values are the input

    result = benchmark(run / "art", run / "c.safetensors", batches=(2,), backend=NAME, threads=1, warmup=0,
                       min_reps=1, min_seconds=0.0)
    assert result["config"]["backend_resolved"] == NAME
    assert {"shared", "task:depth"} <= set(result["variants"])
    assert not any(k.startswith("bare:") for k in result["variants"])  # bare sessions: beside ONNX Runtime's engines


def test_registered_names_are_checked(run, noopt):
    with pytest.raises(InputError, match="already registered"):
        backends.register(backends.backend(NAME))
    with pytest.raises(InputError, match="built in"):
        backends.unregister("onnxruntime")
    with pytest.raises(InputError, match=f"unknown backend 'nope'; choose one of .*{NAME}"):
        load(run / "art", backend="nope")
    only_plans = backends.Backend("plans-only", ("tensorrt",), (REFERENCE,), ("cuda",), lambda p: None,
                                  lambda *a: None, missing="{dir} has no plans for this test backend")
    backends.register(only_plans)
    try:
        with pytest.raises(ArtifactError, match="has no plans for this test backend"):
            load(run / "art", backend="plans-only")
    finally:
        backends.unregister("plans-only")


def test_a_backend_runs_only_the_precisions_its_record_declares(run, noopt):
    with pytest.raises(ArtifactError, match="precision 'int8' runs on backend 'onnxruntime' or .*, not 'torch'"):
        load(run / "art", backend="torch", precision=INT8)
    with pytest.raises(ArtifactError, match=f"precision '{BF16}' runs on backend 'openvino', not '{NAME}'"):
        load(run / "art", backend=NAME, precision=BF16)

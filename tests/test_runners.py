"""One `Runner` protocol for every way of executing a model and one comparison for every
verification: the runners agree with each other, and `compare` measures and refuses as documented."""

import numpy as np
import pytest
from compiler_cases import random_reduced_net

from dagc.compiler import aoti, tensorrt
from dagc.compiler.ir import build_graph
from dagc.compiler.lower import lower
from dagc.compiler.onnx_export import to_onnx
from dagc.compiler.passes import optimize
from dagc.compiler.runners import AotiRunner, LoweredRunner, SupernetRunner
from dagc.errors import BenchError, CompileError
from dagc.runners import OrtRunner, Runner, TrtRunner, compare, ort_providers, relative_error
from dagc.runtime.torch_backend import TorchRunner
from dagc.spec import TaskSpec, preset
from dagc.trainer.network import network_tensors

TASKS = [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth"), TaskSpec("cls", "classification", 4)]


@pytest.fixture(scope="module")
def shared():
    spec = preset("tiny", TASKS, input_size=(16, 16))
    net = random_reduced_net(spec, 11)
    return net, optimize(build_graph(spec, network_tensors(net)))


@pytest.fixture(scope="module")
def per_task():
    spec = preset("omniglot", [TaskSpec("a", "classification", 5), TaskSpec("b", "classification", 3)],
                  in_channels=1, shared_input=False, input_size=(8, 8))
    net = random_reduced_net(spec, 12)
    return net, optimize(build_graph(spec, network_tensors(net)))


def _feeds(names, batch, shape, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((batch, *shape)).astype(np.float32) for n in names}


def test_every_runner_follows_the_protocol_and_agrees_with_the_masked_supernet(shared):
    net, graph = shared
    onnx_bytes = to_onnx(graph).SerializeToString()
    runners = {"lowered": LoweredRunner(lower(graph)), "onnxruntime": OrtRunner(onnx_bytes, device="cpu"),
               "torch interpreter": TorchRunner(onnx_bytes, "model.onnx")}
    reference = SupernetRunner(net)
    assert reference.inputs == ("image",) and reference.outputs == ("seg", "depth", "cls")
    feeds = [_feeds(["image"], b, (3, 16, 16), seed=b) for b in (1, 3)]
    for what, runner in runners.items():
        assert isinstance(runner, Runner), what
        assert runner.inputs == ("image",) and runner.outputs == reference.outputs, what
        errors = compare(runner, reference, feeds, rtol=1e-4, what=what)
        assert set(errors) == set(reference.outputs) and max(errors.values()) < 1e-5, what
        one = runner.run(dict(feeds[0]), ["cls"])  # a subset of the outputs, in the order asked
        assert list(one) == ["cls"] and one["cls"].shape == (1, 4)
        both = runner.run(dict(feeds[1]), ["cls", "seg"])
        assert list(both) == ["cls", "seg"]


def test_supernet_runner_with_per_task_inputs_runs_the_tasks_it_is_fed(per_task):
    net, graph = per_task
    reference = SupernetRunner(net)
    assert reference.inputs == ("image_a", "image_b")
    feeds = _feeds(["image_b"], 2, (1, 8, 8))
    got = reference.run(feeds)
    assert list(got) == ["b"] and got["b"].shape == (2, 3)
    np.testing.assert_array_equal(reference(feeds)["b"], got["b"])  # calling it is run(feeds)
    with pytest.raises(CompileError, match="no per-task input"):
        reference.run({"image": feeds["image_b"]})
    model = OrtRunner(to_onnx(graph, ["b"]).SerializeToString(), device="cpu")
    assert model.inputs == ("image_b",)
    assert compare(model, reference, [feeds], rtol=1e-4, what="per-task model")["b"] < 1e-5


def test_a_training_network_is_run_in_eval_mode_and_left_training(shared):
    net, graph = shared
    feeds = _feeds(["image"], 2, (3, 16, 16))
    want = SupernetRunner(net).run(feeds)
    net.train()
    try:
        got = SupernetRunner(net).run(feeds)
        assert net.training
    finally:
        net.eval()
    for t in want:
        np.testing.assert_array_equal(got[t], want[t])


def test_compare_refuses_naming_the_task_and_raises_the_callers_error(shared):
    net, graph = shared
    runner = LoweredRunner(lower(graph, ["seg", "depth"]))
    other = random_reduced_net(net.spec, 13)
    feeds = [_feeds(["image"], 2, (3, 16, 16))]
    with pytest.raises(CompileError, match=r"task 'seg': the lowered module differs from the masked supernet "
                                           r"by .*tolerance 1e-04\); nothing was written"):
        compare(runner, SupernetRunner(other), feeds, rtol=1e-4, what="lowered module")
    with pytest.raises(BenchError, match=r"task 'depth': the export differs from it by .*tolerance 1e-04\)$"):
        compare(runner, SupernetRunner(other), feeds, ["depth"], rtol=1e-4, what="export", against="it",
                error=BenchError, consequence="")
    with pytest.raises(CompileError, match=r"task 'depth': ONNX Runtime computes no output for it \(it has \['seg'\]\)"):
        seg_only = OrtRunner(to_onnx(graph, ["seg"]).SerializeToString(), device="cpu")
        compare(runner, seg_only, feeds, rtol=1e-4, what="lowered module", against="ONNX Runtime")
    # The errors returned are the worst over the feeds, so a loose tolerance passes with them.
    errors = compare(runner, SupernetRunner(other), feeds, rtol=10.0, what="lowered module")
    assert 1e-4 < max(errors.values()) <= 10.0


def test_relative_error_and_providers():
    ref = np.array([[2.0, -4.0]], np.float32)
    assert relative_error(ref, ref) == 0.0
    assert relative_error(ref + 0.5, ref) == pytest.approx(0.5 / 4)
    assert relative_error(np.full_like(ref, 0.5), np.zeros_like(ref)) == pytest.approx(0.5)  # scale at least 1
    assert relative_error(ref[:, :1], ref) == float("inf")
    assert relative_error(np.array([[np.nan, 1.0]]), ref) == float("inf")
    assert ort_providers("cpu") == ["CPUExecutionProvider"]
    assert ort_providers()[-1] == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="unknown ONNX Runtime device"):
        ort_providers("tpu")


@pytest.mark.slow
def test_aoti_package_is_a_runner_verified_through_compare(shared):
    if aoti.unavailable_reason():
        pytest.skip(aoti.unavailable_reason())
    net, graph = shared
    data, inputs, outputs = aoti.build_package(graph, ["seg"])
    runner = AotiRunner(data, inputs, outputs)
    assert isinstance(runner, Runner) and runner.inputs == ("image",) and runner.outputs == ("seg",)
    assert aoti.verify_package(data, inputs, outputs, SupernetRunner(net), graph)["seg"] < 1e-5
    with pytest.raises(CompileError, match="task 'seg': the AOTInductor package differs from the masked supernet"):
        aoti.verify_package(data, inputs, outputs, SupernetRunner(random_reduced_net(net.spec, 13)), graph)


@pytest.mark.gpu
def test_tensorrt_plan_verification_refuses_a_plan_of_another_model(shared):
    """`verify_plan` runs the plan (TrtRunner) against ONNX Runtime through `compare`."""
    pytest.importorskip("tensorrt")
    net, graph = shared
    shape = (3, 16, 16)
    model = to_onnx(graph).SerializeToString()
    plan = tensorrt.build_plan(model, {"image": shape}, (1, 4))
    errors = tensorrt.verify_plan(plan, model, "model.onnx", (1, 4), shape=shape)
    assert set(errors) == {"seg", "depth", "cls"} and max(errors.values()) <= tensorrt.TOLERANCE["fp32"]
    other = random_reduced_net(net.spec, 14)
    other_model = to_onnx(optimize(build_graph(net.spec, network_tensors(other)))).SerializeToString()
    with pytest.raises(CompileError, match="TensorRT plan of other.onnx differs from ONNX Runtime"):
        tensorrt.verify_plan(plan, other_model, "other.onnx", (1, 4), shape=shape)
    got = TrtRunner(plan, (1, 4)).run({"image": np.zeros((2, *shape), np.float32)})
    assert set(got) == {"seg", "depth", "cls"}

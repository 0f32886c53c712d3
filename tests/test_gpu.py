"""The GPU paths: CUDA training, AOTInductor packages for CUDA, the torch backend on CUDA and
TensorRT plans (TensorRT 10 and 11, strongly typed; fp32, fp16 from the fp16-converted ONNX model,
int8 from a QDQ model). Tests marked ``gpu`` run on a machine with CUDA (skipped elsewhere), never
faked; the others check on any machine what can be checked without a GPU: the ONNX side of the
TensorRT path (fp16 conversion, Q/DQ detection, network flags per version) and the one-line
refusals."""

import copy

import numpy as np
import onnx
import pytest
import torch
from compiler_cases import compiled_artifact, random_graph, random_reduced_net

from dagc.compiler import aoti, tensorrt
from dagc.compiler.compile import compile_checkpoint
from dagc.compiler.lower import lower
from dagc.compiler.passes import optimize
from dagc.compiler.runners import AotiRunner, ModuleRunner, SupernetRunner
from dagc.errors import ArtifactError, CompileError
from dagc.runners import OrtRunner, TrtRunner, compare
from dagc.runtime.torch_backend import TorchRunner
from dagc.spec import TaskSpec, preset
from dagc.tools.cli import main
from dagc.trainer.network import CentralNetwork
from dagc.trainer.train import TrainConfig, train

SPEC = preset("tiny", [TaskSpec("s", "segmentation", 4), TaskSpec("d", "depth"), TaskSpec("c", "classification", 5)],
              input_size=(16, 16))


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """An ONNX artifact of a random reduced network (checkpoint at ``art.parent / "c.safetensors"``)."""
    return compiled_artifact(tmp_path_factory.mktemp("gpu"), SPEC, 3)


def _x(batch=4, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, 16, 16)).astype(np.float32)


def _calibration(inputs, batches=4):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{i: _x(2, k) for i in inputs} for k in range(batches)])

        def get_next(self):
            return next(self.feeds, None)

    return Reader()


def _qdq_model(src, dst, symmetric=True):
    """A QDQ model of an ONNX file by ONNX Runtime's static quantisation (as the int8 work does):
    symmetric signed int8, as TensorRT needs, or ONNX Runtime's default (asymmetric uint8
    activations)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    inputs = [i.name for i in onnx.load(str(src)).graph.input]
    kw = dict(activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
              extra_options=tensorrt.TRT_QDQ_OPTIONS) if symmetric else {}
    quantize_static(str(src), str(dst), _calibration(inputs), quant_format=QuantFormat.QDQ, **kw)
    return dst.read_bytes()


# ------------------------------------------------------------------------- anywhere (no GPU needed)


def test_network_flags_per_tensorrt_version():
    assert tensorrt.creation_flags("10.9.0.34", 1) == 2  # 10.x opts into strong typing with the flag
    assert tensorrt.creation_flags("11.4.1", None) == 0  # 11.x types every network strongly
    with pytest.raises(CompileError, match="TensorRT 8.6.1 is too old"):
        tensorrt.creation_flags("8.6.1", 1)
    with pytest.raises(CompileError, match="no strongly typed networks"):
        tensorrt.creation_flags("10.0.0", None)


def test_fp16_model_keeps_float32_io_and_runs_in_onnxruntime(art):
    pytest.importorskip("onnxconverter_common")
    fp32 = (art / "model.onnx").read_bytes()
    fp16 = tensorrt.prepare(art / "model.onnx", "fp16")  # from a file, as a user's model would come
    proto = onnx.load_from_string(fp16)
    f32 = onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [f32]
    assert [o.type.tensor_type.elem_type for o in proto.graph.output] == [f32] * 3
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert tensorrt.plan_precision(fp16) == "fp16" and tensorrt.plan_precision(fp32) == "fp32"
    assert tensorrt.prepare(fp32, "fp32") == fp32
    runner, ref = OrtRunner(fp16, device="cpu"), OrtRunner(fp32, device="cpu")
    assert {k: v.dtype for k, v in runner.run({"image": _x()}).items()} == dict.fromkeys("sdc", np.float32)
    errors = compare(runner, ref, [{"image": _x(4, s)} for s in range(2)], rtol=tensorrt.TOLERANCE["fp16"],
                     what="fp16 model", against="the fp32 model")
    assert 0 < max(errors.values()) < 1e-2


def test_qdq_models_are_int8_and_plain_models_cannot_be(art, tmp_path):
    qdq = _qdq_model(art / "model.onnx", tmp_path / "model.int8.onnx")
    assert tensorrt.has_qdq(qdq) and tensorrt.plan_precision(qdq) == "int8"
    assert tensorrt.prepare(qdq, "int8") == qdq and tensorrt.prepare(qdq, "fp16") == qdq
    assert tensorrt.qdq_problem(qdq) is None
    errors = compare(OrtRunner(qdq, device="cpu"), OrtRunner((art / "model.onnx").read_bytes(), device="cpu"),
                     [{"image": _x()}], rtol=tensorrt.TOLERANCE["int8"], what="int8 model", against="fp32")
    assert max(errors.values()) > 0
    asymmetric = _qdq_model(art / "model.onnx", tmp_path / "model.u8.onnx", symmetric=False)
    assert tensorrt.qdq_problem(asymmetric) is not None  # uint8 zero points and int32 biases
    with pytest.raises(CompileError, match="TensorRT cannot build this Q/DQ model: .*; quantize it with"):
        tensorrt.prepare(asymmetric, "int8")
    assert not tensorrt.has_qdq((art / "model.onnx").read_bytes())
    with pytest.raises(CompileError, match="int8 plans are built from ONNX models with QuantizeLinear"):
        tensorrt.prepare(art / "model.onnx", "int8")
    with pytest.raises(CompileError, match="unknown TensorRT precision 'fp8'"):
        tensorrt.prepare(qdq, "fp8")
    with pytest.raises(CompileError, match="cannot read the ONNX model"):
        tensorrt.prepare(tmp_path / "missing.onnx", "fp32")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_module_keeps_float32_io_within_its_tolerance(precision):
    """The module an fp16/bf16 package compiles (float32 in and out), run eagerly on the CPU, is
    within the tolerance its packages are verified at."""
    net, graph = random_graph(SPEC, 5)
    lowered = lower(optimize(graph))
    module = aoti._Float32IO(copy.deepcopy(lowered), aoti.DTYPES[precision]).eval()
    runner = ModuleRunner(module, lowered.inputs, lowered.tasks)
    assert runner.run({"image": _x(2)})["d"].dtype == np.float32
    errors = compare(runner, SupernetRunner(net), [{"image": _x(3, 1)}], rtol=aoti.RTOL[precision],
                     what=f"{precision} module")
    assert 0 < max(errors.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without a GPU")
def test_cuda_targets_without_a_gpu_are_one_line(art, tmp_path, capsys):
    ckpt = art.parent / "c.safetensors"
    for args, message in ((["--target", "aoti", "--device", "cuda"], "--device cuda needs a CUDA GPU"),
                          (["--target", "aoti", "--bf16"], "add --device cuda"),
                          (["--target", "onnx", "--device", "cuda"], "--device is an option of --target aoti")):
        with pytest.raises(SystemExit) as e:
            main(["compile", str(ckpt), "--out", str(tmp_path / "a"), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("dagc: error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a").exists()
    with pytest.raises(ArtifactError, match="needs a CUDA GPU"):
        TorchRunner((art / "model.onnx").read_bytes(), "model.onnx", device="cuda")


def test_torch_backend_refuses_an_unknown_device(art):
    with pytest.raises(ArtifactError, match="unknown device 'tpu'"):
        TorchRunner((art / "model.onnx").read_bytes(), "model.onnx", device="tpu")


# ---------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_stacked_equals_one_by_one_on_cuda():
    spec = preset("tiny", [TaskSpec("s", "segmentation", 4), TaskSpec("d", "depth")], input_size=(16, 16))
    torch.manual_seed(0)
    a = CentralNetwork(spec).cuda().double()
    with torch.no_grad():
        for p in a.arch_parameters():
            p.normal_()
    b = copy.deepcopy(a)
    x = torch.randn(3, 3, 16, 16, device="cuda", dtype=torch.double)
    out_a = a(x)
    sum(v.pow(2).mean() for v in out_a.values()).backward()
    for t in spec.task_names:
        y = b(x, tasks=[t])[t]
        torch.testing.assert_close(y, out_a[t])
        y.pow(2).mean().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=n)


@pytest.mark.gpu
def test_short_training_run_on_cuda(tmp_path):
    cfg = TrainConfig(warmup_iters=3, search_iters=3, finetune_iters=3, batch_size=4, n_train=16, n_test=8,
                      device="cuda")
    metrics = train(cfg, tmp_path / "run", progress=False)
    assert set(metrics["final"]) == {"segmentation", "depth", "normal", "edge"}


@pytest.mark.gpu
def test_torch_backend_on_cuda_equals_cpu(art):
    data = (art / "model.onnx").read_bytes()
    cuda, cpu = TorchRunner(data, "model.onnx", device="cuda"), TorchRunner(data, "model.onnx")
    errors = compare(cuda, cpu, [{"image": _x(b, b)} for b in (1, 5)], rtol=1e-3, what="torch backend on cuda",
                     against="the torch backend on the CPU")
    assert set(errors) == {"s", "d", "c"}


@pytest.mark.gpu
def test_aoti_cuda_packages_fp32_and_fp16(tmp_path):
    """`--target aoti --device cuda --fp16`: packages for the GPU in fp32 and fp16, each verified
    against the masked supernet on the GPU; the routes keep to the fp32 packages. One task keeps
    it to four CUDA compiles (bf16 packages are built and verified by the GPU table)."""
    reason = aoti.unavailable_reason("cuda")  # a GPU machine without g++ or triton: say so, not fail
    if reason:
        pytest.skip(reason)
    spec = preset("tiny", [TaskSpec("d", "depth")], input_size=(16, 16))
    compiled_artifact(tmp_path, spec, 4)
    manifest = compile_checkpoint(tmp_path / "c.safetensors", tmp_path / "cuda", target="aoti", device="cuda",
                                  fp16=True)
    packages = {n: m for n, m in manifest["models"].items() if m["format"] == "aoti"}
    assert set(packages) == {"model.pt2", "task_d.pt2", "model.fp16.pt2", "task_d.fp16.pt2"}
    assert all(m["device"] == "cuda" for m in packages.values())
    for name, m in packages.items():
        assert m["verified_max_rel_error"] <= aoti.RTOL[m.get("precision", "fp32")], name
    assert all(set(r) <= {"model.pt2", "task_d.pt2"} for r in manifest["routes"]["aoti"].values())
    entry = packages["model.fp16.pt2"]
    runner = AotiRunner((tmp_path / "cuda" / "model.fp16.pt2").read_bytes(), entry["inputs"], entry["outputs"], "cuda")
    net = random_reduced_net(spec, 4).cuda()
    errors = compare(runner, SupernetRunner(net), [{"image": _x(7)}], rtol=aoti.RTOL["fp16"], what="fp16 package")
    assert set(errors) == {"d"}


@pytest.mark.gpu
def test_tensorrt_plans_fp32_fp16_int8(art, tmp_path):
    """Strongly typed plans in the three precisions, each verified against ONNX Runtime running
    the model it was built from; the compile writes fp16 plans from the fp16 conversion."""
    pytest.importorskip("tensorrt")
    shape = (3, 16, 16)
    qdq = _qdq_model(art / "model.onnx", tmp_path / "model.int8.onnx")
    for precision, model in (("fp32", art / "model.onnx"), ("fp16", art / "model.onnx"), ("int8", qdq)):
        source = tensorrt.prepare(model, precision)
        plan = tensorrt.build_plan(source, {"image": shape}, (1, 4, 8))
        errors = tensorrt.verify_plan(plan, source, "model.onnx", (1, 4, 8), precision=precision, shape=shape)
        assert max(errors.values()) <= tensorrt.TOLERANCE[precision]
        assert TrtRunner(plan, (1, 4, 8)).run({"image": _x(9)})["d"].dtype == np.float32
    manifest = compile_checkpoint(art.parent / "c.safetensors", tmp_path / "trt", target="tensorrt", fp16=True,
                                  batches=(1, 4, 8))
    plans = [m for m in manifest["models"].values() if m["format"] == "tensorrt"]
    assert len(plans) == 4 and all(m["precision"] == "fp16" for m in plans)


def test_cuda_package_entries_validate_and_routes_keep_to_fp32():
    """What a `--device cuda --fp16` compile records: device and precision on aoti entries, and
    routes over the fp32 packages only (a TensorRT artifact with only fp16 plans is routed over
    them)."""
    from dagc.manifest import ModelInfo
    from dagc.precisions import routable as _routed

    def entry(name, fmt="aoti", tasks=("s",), **extra):
        base = {"tasks": list(tasks), "format": fmt, "inputs": ["image"], "outputs": list(tasks),
                "verified_max_rel_error": 1e-3, "macs": 1, "flops": 2, "params": 3, "built_from": "model.onnx"}
        if fmt == "aoti":
            base.update(torch_version=torch.__version__, batch={"min": 1, "max": 8})
        return ModelInfo.from_dict(name, {**base, **extra})

    fp16 = entry("task_s.fp16.pt2", device="cuda", precision="fp16")
    assert fp16.problem(["s"], ["image"]) is None and fp16.to_dict()["device"] == "cuda"
    with pytest.raises(ArtifactError, match="device"):
        entry("task_s.pt2", device="tpu")
    plans = [entry("task_s.plan", "tensorrt", precision="fp16", batches=[1, 8])]
    packages = [entry("task_s.pt2", device="cuda"), fp16, entry("task_s.bf16.pt2", device="cuda", precision="bf16")]
    assert [m.name for m in _routed(packages + plans)] == ["task_s.pt2", "task_s.plan"]

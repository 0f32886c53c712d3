"""ONNX emission of the IR (`dagc.compiler.onnx_export`) and its verification (`dagc.compiler.verify`).

Checkpoints are built without training: random weights, random batch-norm statistics (so BN is not
the identity) and random closed masks; every emitted model must pass the ONNX checker and compute
what the masked supernet computes, through ONNX Runtime.
"""

from __future__ import annotations

import importlib
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from compiler_cases import random_masks
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from dagc.compiler.ir import CompileError, Edge, Graph, Node, build_graph
from dagc.compiler.onnx_export import check, conv_macs, to_onnx
from dagc.compiler.verify import supernet_reference, verify
from dagc.spec import Spec, StateSpec, TaskSpec, preset
from dagc.trainer.network import CentralNetwork, TaskBatchNorm, network_tensors

DENSE = [TaskSpec("seg", "segmentation", classes=4), TaskSpec("depth", "depth"), TaskSpec("normal", "normal")]
MIXED = [*DENSE, TaskSpec("cls", "classification", classes=5)]


# ---------------------------------------------------------------------------------------- helpers
def _randomise(net: CentralNetwork, seed: int) -> None:
    """Random weights and random BN affine / running statistics, deterministically from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(net.named_parameters()):
            if not name.startswith("arch_"):
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 1 else 1.0 / max(1, p[0].numel()) ** 0.5))
        for m in net.modules():
            if isinstance(m, TaskBatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.25)


def _checkpoint(spec: Spec, seed: int = 0) -> tuple[CentralNetwork, Graph]:
    torch.manual_seed(seed)
    net = CentralNetwork(spec)
    _randomise(net, seed)
    net.set_masks(*random_masks(spec, np.random.default_rng(seed)))
    net.eval()
    return net, build_graph(spec, network_tensors(net))


def _folded_variants(graph: Graph) -> list[Graph]:
    """The graph itself, plus the optimised (shared, folded) graph once dagc.compiler.passes has it."""
    try:
        passes = importlib.import_module("dagc.compiler.passes")
    except ImportError:
        return [graph]
    out = [graph]
    if hasattr(passes, "optimize"):
        out.append(passes.optimize(graph))
    elif hasattr(passes, "fold"):
        out.append(passes.fold(graph))
    return out


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _dims(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def _assert_model_signature(model: onnx.ModelProto, spec: Spec, tasks, inputs) -> None:
    h, w = spec.input_size
    assert [i.name for i in model.graph.input] == list(inputs)
    for i in model.graph.input:
        assert i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert _dims(i) == ["batch", spec.in_channels, h, w]
    assert [o.name for o in model.graph.output] == list(tasks)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    for o in inferred.graph.output:
        t = spec.task(o.name)
        want = ["batch", t.out_channels, h, w] if t.dense else ["batch", t.out_channels]
        assert _dims(o) == want, o.name
        assert o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


# ---------------------------------------------------------------------------------------- tests
def test_shared_and_per_task_models_match_the_masked_supernet():
    spec = preset("tiny", MIXED, input_size=(16, 16))
    net, graph = _checkpoint(spec, seed=1)
    ref = supernet_reference(net)
    for g in _folded_variants(graph):
        shared = to_onnx(g)
        check(shared)
        _assert_model_signature(shared, spec, spec.task_names, ["image"])
        errs = verify(shared, ref, g)
        assert set(errs) == set(spec.task_names) and max(errs.values()) < 1e-5
        for t in spec.task_names:
            model = to_onnx(g, [t])
            check(model)
            _assert_model_signature(model, spec, [t], ["image"])
            assert set(verify(model, ref, g)) == {t}
        # Per-task models hold only what their head needs: no other head's parameters.
        one = to_onnx(g, ["depth"])
        names = {i.name for i in one.graph.initializer}
        assert not any(n.startswith(("heads.seg.", "heads.normal.", "heads.cls.")) for n in names)
        assert len(one.graph.node) < len(shared.graph.node)


def test_folded_graph_emits_no_batchnorm_and_no_scale():
    passes = pytest.importorskip("dagc.compiler.passes")
    if not hasattr(passes, "fold"):
        pytest.skip("dagc.compiler.passes.fold is not there yet")
    spec = preset("tiny", DENSE, input_size=(16, 16))
    net, graph = _checkpoint(spec, seed=2)
    folded = passes.fold(graph)
    model = to_onnx(folded)
    check(model)
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops and "Mul" not in ops
    verify(model, supernet_reference(net), folded)
    unfolded_ops = [n.op_type for n in to_onnx(graph).graph.node]
    assert "BatchNormalization" in unfolded_ops


def test_dynamic_batch_runs_batch_1_and_5():
    spec = preset("tiny", DENSE, input_size=(16, 16))
    net, graph = _checkpoint(spec, seed=3)
    model = to_onnx(graph)
    ref = supernet_reference(net)
    for batch in (1, 5):
        verify(model, ref, graph, batch=batch, n_inputs=1)
    sess = _session(model)
    out = sess.run(None, {"image": np.zeros((5, 3, 16, 16), np.float32)})
    assert [o.shape for o in out] == [(5, 4, 16, 16), (5, 1, 16, 16), (5, 3, 16, 16)]


def test_per_task_inputs_have_one_input_per_task():
    tasks = [TaskSpec("alpha", "classification", classes=3), TaskSpec("beta", "classification", classes=7)]
    spec = preset("omniglot", tasks, in_channels=1, shared_input=False)
    assert spec.input_size == (8, 8)
    net, graph = _checkpoint(spec, seed=4)
    ref = supernet_reference(net)
    for g in _folded_variants(graph):
        shared = to_onnx(g)
        check(shared)
        _assert_model_signature(shared, spec, ["alpha", "beta"], ["image_alpha", "image_beta"])
        verify(shared, ref, g, batch=3)
        for t in ("alpha", "beta"):
            model = to_onnx(g, [t])
            check(model)
            _assert_model_signature(model, spec, [t], [f"image_{t}"])
            assert set(verify(model, ref, g)) == {t}


def test_normals_have_unit_length():
    spec = preset("tiny", [TaskSpec("normal", "normal")], input_size=(16, 16))
    _, graph = _checkpoint(spec, seed=5)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    (y,) = _session(to_onnx(graph)).run(["normal"], {"image": x})
    assert y.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)


def test_readout_upsampling_and_stride_1_readout():
    # Read-out stride below the deepest state: read-outs from stride 4 upsample (Resize).
    spec = Spec(states=(StateSpec(4, 1), StateSpec(6, 2), StateSpec(5, 4)), readout=StateSpec(4, 2),
                flow_constant=2, tasks=(TaskSpec("d", "depth"), TaskSpec("n", "normal")), input_size=(8, 8),
                head_channels=6, aspp_rates=(1, 2))
    for seed in range(4):
        net, graph = _checkpoint(spec, seed=seed)
        for g in _folded_variants(graph):
            model = to_onnx(g)
            check(model)
            verify(model, supernet_reference(net), g)
    # Everything at stride 1: no pooling and no resize anywhere.
    spec = Spec(states=(StateSpec(3, 1), StateSpec(3, 1)), readout=StateSpec(4, 1), flow_constant=1,
                tasks=(TaskSpec("s", "saliency"),), input_size=(4, 4), head_channels=4, aspp_rates=(1,))
    net, graph = _checkpoint(spec, seed=0)
    model = to_onnx(graph)
    check(model)
    assert not {"Resize", "AveragePool", "MaxPool"} & {n.op_type for n in model.graph.node}
    verify(model, supernet_reference(net), graph)


def test_bytes_are_deterministic_and_names_are_clean():
    spec = preset("tiny", MIXED, input_size=(16, 16))
    _, graph = _checkpoint(spec, seed=6)
    for g in _folded_variants(graph):
        for tasks in (None, ["depth"], ["cls", "seg"]):
            a, b = to_onnx(g, tasks), to_onnx(g, tasks)
            assert a.SerializeToString() == b.SerializeToString()
    # A graph rebuilt from the same tensors gives the same bytes too.
    net, g1 = _checkpoint(spec, seed=6)
    g2 = build_graph(spec, network_tensors(net))
    assert to_onnx(g1).SerializeToString() == to_onnx(g2).SerializeToString()

    model = to_onnx(graph)
    names = [n.name for n in model.graph.node]
    values = [v for n in model.graph.node for v in (*n.input, *n.output)]
    assert len(set(names)) == len(names)
    assert not any(":" in s or "+" in s for s in (*names, *values))
    inits = [i.name for i in model.graph.initializer]
    assert len(set(inits)) == len(inits)
    assert all(i.data_type == onnx.TensorProto.FLOAT for i in model.graph.initializer if not i.name.startswith("const."))
    # Initializers are the IR's parameters under their own keys (a conv's live taps, `Conv.live`,
    # under its weight's key and ".liveHxW"); node names follow the IR's ids.
    keys = {re.sub(r"\.live\d+x\d+$", "", i) for i in inits if not i.startswith("const.")}
    assert keys <= set(graph.params)
    first = graph.nodes[0]
    assert any(n.startswith(f"{first.id.replace(':', '_').replace('+', '_')}/{first.edges[0].block}/conv")
               for n in names)


def test_shared_parameters_are_emitted_once():
    # Two tasks with identical masks and a shared image use the same blocks: each weight once.
    spec = preset("tiny", [TaskSpec("a", "depth"), TaskSpec("b", "edge")], input_size=(16, 16))
    net = CentralNetwork(spec)
    _randomise(net, 7)
    g, a, b = random_masks(preset("tiny", [TaskSpec("a", "depth")], input_size=(16, 16)),
                            np.random.default_rng(7))
    net.set_masks(g.repeat(2, 1, 1), a.repeat(2, 1), b.repeat(2, 1))
    graph = build_graph(spec, network_tensors(net))
    model = to_onnx(graph)
    check(model)
    inits = [i.name for i in model.graph.initializer]
    assert len(set(inits)) == len(inits)
    convs = [n for n in model.graph.node if n.op_type == "Conv" and not n.name.startswith("heads.")]
    assert len({n.input[1] for n in convs}) == len(convs) // 2  # every trunk weight read by both tasks
    verify(model, supernet_reference(net), graph)


def test_conv_macs_on_a_hand_built_graph():
    spec = Spec(states=(StateSpec(2, 1), StateSpec(4, 2)), readout=StateSpec(3, 2), flow_constant=1,
                tasks=(TaskSpec("d", "depth"), TaskSpec("c", "classification", classes=3)),
                in_channels=1, input_size=(4, 4), head_channels=5, aspp_rates=(1, 2))
    net = CentralNetwork(spec)
    _randomise(net, 8)
    gamma = torch.tensor([[[0, 1], [0, 0]], [[0, 0], [0, 0]]])
    net.set_masks(gamma, torch.tensor([[1, 1], [1, 0]]), torch.tensor([[1, 1], [1, 0]]))
    params = build_graph(spec, network_tensors(net)).params  # the theta tensors, statistics split per task
    nodes = (
        Node("v0:d", 0, ("d",), (Edge("read_in.0", "input:image", stats="d"),)),
        Node("v0:c", 0, ("c",), (Edge("read_in.0", "input:image", stats="c"),)),
        Node("v1:d", 1, ("d",), (Edge("read_in.1", "input:image", 0.5, stats="d"),
                                 Edge("edges.0_1", "v0:d", 0.5, stats="d"))),
        Node("L:d", -1, ("d",), (Edge("read_out.0", "v0:d", stats="d"), Edge("read_out.1", "v1:d", stats="d"))),
        Node("L:c", -1, ("c",), (Edge("read_out.0", "v0:c", stats="c"),)),
    )
    graph = Graph(spec, ("image",), nodes, (("d", "L:d"), ("c", "L:c")), params)
    assert graph.dump() == build_graph(spec, network_tensors(net)).dump()
    # By hand, per sample (C_out * C_in * kH * kW * H_out * W_out):
    read_in_0 = 2 * 1 * 9 * 16       # 3x3, 1 -> 2 at 4x4
    read_in_1 = 4 * 1 * 9 * 4        # avg-pooled to 2x2, 3x3, 1 -> 4
    edge_0_1 = 4 * 2 * 9 * 16        # 3x3, 2 -> 4 at 4x4, then max-pooled
    read_out_0 = 3 * 2 * 1 * 4       # avg-pooled to 2x2, 1x1, 2 -> 3
    read_out_1 = 3 * 4 * 1 * 4       # 1x1, 4 -> 3 at 2x2
    # two rates at 2x2: rate 2's 3x3 conv reads data at its centre tap only (Conv.live)
    aspp = (5 * 3 * 9 * 4 + 5 * 5 * 4 + 1 * 5 * 4) + (5 * 3 * 1 * 4 + 5 * 5 * 4 + 1 * 5 * 4)
    gemm = 3 * 3                     # 3 features -> 3 classes
    d = read_in_0 + read_in_1 + edge_0_1 + read_out_0 + read_out_1 + aspp
    c = read_in_0 + read_out_0 + gemm
    assert conv_macs(to_onnx(graph, ["d"]), (4, 4)) == d == 2496
    assert conv_macs(to_onnx(graph, ["c"]), (4, 4)) == c == 321
    model = to_onnx(graph)
    assert conv_macs(model, (4, 4)) == d + c
    # Folding changes no MAC count; the model still matches the supernet.
    for g in _folded_variants(graph):
        assert conv_macs(to_onnx(g, ["d"]), (4, 4)) == d
        verify(to_onnx(g), supernet_reference(net), g)


def test_verify_names_the_task_that_differs():
    spec = preset("tiny", DENSE, input_size=(16, 16))
    net, graph = _checkpoint(spec, seed=9)
    model = to_onnx(graph)
    ref = supernet_reference(net)
    verify(model, ref, graph)
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    for i, init in enumerate(bad.graph.initializer):
        if init.name == "heads.depth.branches.0.6.bias":
            arr = numpy_helper.to_array(init) + 0.5
            bad.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr.astype(np.float32), init.name))
            break
    else:
        raise AssertionError("depth head bias not found")
    with pytest.raises(CompileError, match=r"task 'depth': the compiled model differs from the masked supernet by \d\.\de-\d\d .*"
                                           r"tolerance 1e-04\); nothing was written"):
        verify(bad, ref, graph)
    # The other tasks still pass on their own.
    errs = verify(bad, ref, graph, rtol=1.0)
    assert errs["depth"] > 0.1 and errs["seg"] < 1e-5 and errs["normal"] < 1e-5


def test_unknown_task_is_a_compile_error():
    spec = preset("tiny", DENSE, input_size=(16, 16))
    _, graph = _checkpoint(spec, seed=10)
    with pytest.raises(CompileError, match="'nope'"):
        to_onnx(graph, ["nope"])


def test_opset_18_reduce_l2_axes_as_input():
    spec = preset("tiny", [TaskSpec("normal", "normal"), TaskSpec("d", "depth")], input_size=(16, 16))
    net, graph = _checkpoint(spec, seed=11)
    model = to_onnx(graph, opset=18)
    check(model)
    verify(model, supernet_reference(net), graph, n_inputs=1)


KINDS = st.sampled_from(["segmentation", "depth", "normal", "edge", "saliency"])


@settings(max_examples=25, deadline=None)
@given(kinds=st.lists(KINDS, min_size=1, max_size=3), m=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_random_specs_and_masks_match_the_supernet_through_onnx_runtime(kinds, m, seed):
    tasks = [TaskSpec(f"t{i}_{k}", k, classes=3 if k == "segmentation" else None) for i, k in enumerate(kinds)]
    spec = preset("tiny", tasks, input_size=(16, 16), flow_constant=m)
    net, graph = _checkpoint(spec, seed=seed % 10_000)
    ref = supernet_reference(net)
    for g in _folded_variants(graph):
        model = to_onnx(g)
        check(model)
        errs = verify(model, ref, g, n_inputs=1)
        assert set(errs) == set(spec.task_names)
    last = spec.task_names[-1]
    model = to_onnx(graph, [last])
    check(model)
    verify(model, ref, graph, n_inputs=1)


def test_a_rate_beyond_the_read_out_emits_its_centre_tap_only():
    from dataclasses import replace

    spec = replace(preset("tiny", DENSE, input_size=(16, 16)), aspp_rates=(1, 12))
    net, graph = _checkpoint(spec, seed=3)
    model = to_onnx(graph)
    check(model)
    kernels = {n.name: [list(a.ints) for a in n.attribute if a.name == "kernel_shape"][0]
               for n in model.graph.node if n.op_type == "Conv" and "conv3x3" in n.name}
    assert kernels and all(k == ([3, 3] if "branches.0/" in name else [1, 1]) for name, k in kernels.items())
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    centre = inits["heads.seg.branches.1.0.weight.live1x1"]
    np.testing.assert_array_equal(centre, graph.params["heads.seg.branches.1.0.weight"][:, :, 1:2, 1:2])
    assert "heads.seg.branches.1.0.weight" not in inits  # the full 3x3 weight is not carried along
    assert max(verify(model, supernet_reference(net), graph).values()) < 1e-5

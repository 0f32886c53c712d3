"""The network options beyond the paper, each defined once in `dagc.blocks` and honoured by the
network, the compiler, the runtime and the cost counter: ``downsample`` (where a hidden edge into
a state of larger stride downsamples: the paper's max-pool after the conv, or an average pool
before it) and ``refine_channels`` (the dense heads' refinement with the input image)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from compiler_cases import compiled_artifact, random_reduced_net

from dagc.blocks import block, blocks, head
from dagc.compiler.ir import build_graph, input_name
from dagc.compiler.lower import lower
from dagc.costs import head_costs, supernet_costs
from dagc.errors import SpecError
from dagc.network_file import DOWNSAMPLES, Network, preset_network
from dagc.runtime import load
from dagc.spec import Spec, TaskSpec, preset
from dagc.trainer.network import CentralNetwork, network_tensors
from dagc.trainer.stages import make_optimizer, warmup_step

TASKS = (TaskSpec("seg", "segmentation", 3), TaskSpec("cls", "classification", 4))


def _spec(downsample, **kw):
    return dataclasses.replace(preset("tiny", TASKS, in_channels=1, **kw), downsample=downsample)


def test_a_stride_raising_edge_convolves_at_the_destination_resolution_when_averaging_before():
    paper, avg = _spec("max_pool_after"), _spec("average_before")
    p, a = block(paper, "edges.1_2"), block(avg, "edges.1_2")  # stride 1 -> 2
    assert (p.from_stride, p.to_stride, p.pool) == (1, 1, 2)
    assert (a.from_stride, a.to_stride, a.pool) == (1, 2, 1)
    assert p.conv.macs == 4 * a.conv.macs
    assert block(avg, "edges.1_4").conv.macs * 16 == block(paper, "edges.1_4").conv.macs  # stride 1 -> 4
    # Edges within one stride, read-ins and read-outs are the same blocks either way.
    same = [b.key for b in blocks(paper) if b.from_stride == b.to_stride and b.pool == 1 or b.kind != "edges"]
    assert same and all(block(paper, n) == block(avg, n) for n in same)
    assert supernet_costs(avg)["macs"] < 0.5 * supernet_costs(paper)["macs"]


def test_the_network_runs_what_the_definition_says():
    """An average_before edge equals avg-pool -> conv -> BN -> ReLU on its own tensors."""
    spec = _spec("average_before")
    net = random_reduced_net(spec, seed=3)
    blk = net.edges["1_2"]
    x = torch.randn(2, blk.conv.in_channels, 32, 32)
    with torch.no_grad():
        got = blk(x, [[0]])
        pooled = torch.nn.functional.avg_pool2d(x, blk.defn.to_stride // blk.defn.from_stride) \
            if blk.defn.to_stride > blk.defn.from_stride else x
        want = torch.relu(blk.bn(blk.conv(pooled), [[0]]))
    assert torch.allclose(got, want, atol=1e-6)


def test_the_compiled_model_matches_the_supernet_with_average_before(tmp_path):
    """compile_checkpoint verifies every ONNX model against the masked supernet (it raises
    otherwise); the runtime's outputs agree with the supernet on fresh inputs too."""
    spec = _spec("average_before")
    art = compiled_artifact(tmp_path, spec, seed=5)
    net = random_reduced_net(spec, seed=5)
    x = np.random.default_rng(0).normal(size=(2, 1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x))
    got = load(art, backend="onnxruntime").run(x)
    for t in spec.task_names:
        np.testing.assert_allclose(got[t], ref[t].numpy(), rtol=1e-4, atol=1e-4)
    assert json.loads((art / "manifest.json").read_text())["spec"]["downsample"] == "average_before"


def test_specs_store_the_option_only_when_it_is_not_the_papers():
    paper, avg = _spec("max_pool_after"), _spec("average_before")
    assert "downsample" not in paper.to_dict()  # specs stored before the option read the same
    assert Spec.from_json(paper.to_json()) == paper and Spec.from_json(avg.to_json()) == avg
    assert avg.to_dict()["downsample"] == "average_before"
    with pytest.raises(SpecError, match="spec.downsample must be one of"):
        _spec("maxpool")


def test_network_files_take_the_option_and_refuse_other_values(tmp_path):
    d = preset_network("tiny").to_dict()
    assert "downsample" not in d and Network.from_dict(d).downsample == DOWNSAMPLES[0]
    net = Network.from_dict({**d, "downsample": "average_before"})
    assert net.to_dict()["downsample"] == "average_before"
    for bad in ("average", None, 1):
        with pytest.raises(SpecError, match=r"net.json: downsample must be one of \['max_pool_after', 'average_before'\]"):
            Network.from_dict({**d, "downsample": bad}, source="net.json")
    v2 = preset_network("tiny-v2")
    assert v2 == dataclasses.replace(preset_network("tiny"), downsample="average_before", refine_channels=16,
                                     name="tiny-v2", description=v2.description)


# ------------------------------------------------------------------------------------------ refine
DENSE = (TaskSpec("seg", "segmentation", 3), TaskSpec("nrm", "normal"), TaskSpec("cls", "classification", 4))


def _refined(shared=True, rc=8):
    return dataclasses.replace(preset("tiny-v2", DENSE, in_channels=1, shared_input=shared), refine_channels=rc)


def test_a_refining_head_adds_two_convs_at_the_input_resolution():
    spec, plain = _refined(), _refined(rc=0)
    hd = head(spec, "seg")
    a, b = hd.refine
    assert (a.cin, a.cout, a.kernel, a.hw) == (3 + 1, 8, 3, (32, 32)) and (b.cin, b.cout) == (8, 3)
    assert (a.weight, b.bias) == ("heads.seg.refine.0.weight", "heads.seg.refine.2.bias")
    assert head_costs(spec, "seg")["macs"] - head_costs(plain, "seg")["macs"] == (4 * 8 + 8 * 3) * 9 * 32 * 32
    assert head(spec, "cls").refine == () and head(plain, "seg").refine == ()


def test_the_refinement_is_what_the_definition_says_and_trains():
    spec = _refined()
    torch.manual_seed(0)
    net = CentralNetwork(spec).eval()
    x, feat = torch.randn(2, 1, 32, 32), torch.randn(2, 32, 8, 8)
    h = net.heads["seg"]
    with torch.no_grad():
        y = torch.nn.functional.interpolate(sum(b(feat) for b in h.branches), size=(32, 32), mode="bilinear",
                                            align_corners=False)
        want = y + h.refine[2](torch.relu(h.refine[0](torch.cat([y, x], 1))))
        assert torch.allclose(h(feat, (32, 32), x), want, atol=1e-6)
        assert torch.allclose(net.heads["nrm"](feat, (32, 32), x).norm(dim=1), torch.ones(2, 32, 32), atol=1e-5)
        assert net(x)["seg"].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="refines with the input image"):
        h(feat, (32, 32))
    net.train()
    before = h.refine[0].weight.detach().clone()
    targets = {"seg": torch.randint(0, 3, (2, 32, 32)), "cls": torch.randint(0, 4, (2,)),
               "nrm": torch.nn.functional.normalize(torch.randn(2, 3, 32, 32), dim=1)}
    warmup_step(net, make_optimizer(net, "warmup", 1e-2, 0.1), x, targets)
    assert not torch.equal(before, h.refine[0].weight)


@pytest.mark.parametrize("shared", [True, False])
def test_the_compiled_refining_heads_match_the_supernet(tmp_path, shared):
    spec = _refined(shared)
    art = compiled_artifact(tmp_path, spec, seed=5)  # verified against the masked supernet, or raises
    net = random_reduced_net(spec, seed=5)
    x = np.random.default_rng(0).normal(size=(2, 1, 32, 32)).astype(np.float32)
    feeds = x if shared else {t: x + i for i, t in enumerate(spec.task_names)}
    with torch.no_grad():
        ref = net(torch.from_numpy(x)) if shared else net({t: torch.from_numpy(v) for t, v in feeds.items()})
    got = load(art, backend="onnxruntime").run(feeds)
    lowered = lower(build_graph(spec, network_tensors(net)))  # the torch lowering (AOTInductor's source)
    with torch.no_grad():
        by_input = {input_name(None): x} if shared else {input_name(t): v for t, v in feeds.items()}
        ins = {i: torch.from_numpy(by_input[i]) for i in lowered.inputs}
        low = lowered.run(ins)
    for t in spec.task_names:
        np.testing.assert_allclose(got[t], ref[t].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(low[t].numpy(), ref[t].numpy(), rtol=1e-4, atol=1e-4)
    assert json.loads((art / "manifest.json").read_text())["spec"]["refine_channels"] == 8


def test_refine_channels_is_stored_only_when_set_and_validated():
    assert "refine_channels" not in _refined(rc=0).to_dict()
    assert Spec.from_json(_refined().to_json()) == _refined()
    d = preset_network("tiny").to_dict()
    assert Network.from_dict({**d, "refine_channels": 16}).to_dict()["refine_channels"] == 16
    for bad in (-1, True, 1.5, None, "8"):
        with pytest.raises(SpecError, match=r"net.json: refine_channels must be an integer >= 0"):
            Network.from_dict({**d, "refine_channels": bad}, source="net.json")
        with pytest.raises(SpecError, match=r"spec.refine_channels must be an integer >= 0"):
            _refined(rc=bad)

"""The network option ``downsample``: where a hidden edge into a state of larger stride
downsamples (the paper's max-pool after the conv, or an average pool before it), defined once in
`dagc.blocks` and honoured by the network, the compiler, the runtime and the cost counter."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from compiler_cases import compiled_artifact, random_reduced_net

from dagc.blocks import block, blocks
from dagc.costs import supernet_costs
from dagc.errors import SpecError
from dagc.network_file import DOWNSAMPLES, Network, preset_network
from dagc.runtime import load
from dagc.spec import Spec, TaskSpec, preset

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
    assert preset_network("tiny-avgpool") == dataclasses.replace(preset_network("tiny"), downsample="average_before",
                                                                 name="tiny-avgpool",
                                                                 description=preset_network("tiny-avgpool").description)

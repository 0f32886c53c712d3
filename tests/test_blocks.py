"""Block and head definitions (`dagc.blocks`) and the core cost counter (`dagc.costs`): one
definition that the network's modules, parameter names and the counts all agree with."""

import numpy as np
import pytest
import torch
from torch import nn

from dagc.blocks import (
    ASPP_CONVS,
    BN_EPS,
    HIDDEN,
    READ_IN,
    READ_OUT,
    BlockKey,
    block,
    blocks,
    head,
    heads,
    parse_key,
)
from dagc.costs import masked_parameters, network_costs, supernet_costs
from dagc.errors import SpecError
from dagc.spec import Spec, StateSpec, TaskSpec, preset
from dagc.trainer.baselines import full_masks
from dagc.trainer.network import CentralNetwork, network_tensors

# v0 (2 ch, stride 1), v1 (4 ch, stride 2), v2 (4 ch, stride 4); read-out 3 ch at stride 2 (so the
# read-out of v2 upsamples); input 1 x 8 x 8.
HAND = Spec(
    states=(StateSpec(2, 1), StateSpec(4, 2), StateSpec(4, 4)), readout=StateSpec(3, 2), flow_constant=2,
    tasks=(TaskSpec("c", "classification", 2), TaskSpec("n", "normal")),
    in_channels=1, input_size=(8, 8), head_channels=5, aspp_rates=(1, 2),
)
SPECS = [HAND, preset("tiny", [TaskSpec("s", "segmentation", 3), TaskSpec("d", "depth")], input_size=(16, 16)),
         preset("omniglot", [TaskSpec("a", "classification", 3)], in_channels=1, shared_input=False)]


def test_keys_parse_once_and_round_trip():
    assert parse_key("edges.2_4") == BlockKey(HIDDEN, 2, 4)
    assert parse_key("read_in.3") == BlockKey(READ_IN, None, 3)
    assert parse_key("read_out.0") == BlockKey(READ_OUT, 0, None)
    for key in ("edges.2_4", "read_in.3", "read_out.10"):
        assert str(parse_key(key)) == key
    assert parse_key("edges.2_4").name == "2_4" and parse_key("read_in.3").name == "3"
    for bad in ("edges.2", "edges.01_2", "read_in.-1", "read_in.x", "heads.seg", "read_out", "edges.1_2.conv"):
        with pytest.raises(SpecError, match="is not a block name"):
            parse_key(bad)


def test_block_definitions_of_a_hand_spec():
    b = block(HAND, "read_in.2")  # the input average-pooled by 4, conv3x3 1 -> 4 at 2x2
    assert (b.kind, b.src, b.dst, b.cin, b.cout, b.conv.kernel, b.conv.padding) == (READ_IN, None, 2, 1, 4, 3, 1)
    assert (b.from_stride, b.to_stride, b.downsample, b.upsample, b.pool, b.conv.hw) == (1, 4, 4, 1, 1, (2, 2))
    b = block(HAND, "edges.0_2")  # conv3x3 2 -> 4 at 8x8, then max-pooled by 4
    assert (b.cin, b.cout, b.pool, b.downsample, b.upsample, b.conv.hw) == (2, 4, 4, 1, 1, (8, 8))
    assert b.macs == 4 * 2 * 9 * 64 and b.n_params() == 72 + 8 and b.n_params(folded=True) == 72 + 4
    b = block(HAND, "read_out.2")  # stride 4 -> 2: upsampled, conv1x1 4 -> 3 at 4x4
    assert (b.cin, b.cout, b.conv.kernel, b.conv.padding, b.upsample, b.downsample, b.conv.hw) == (4, 3, 1, 0, 2, 1, (4, 4))
    assert b.bn_eps == BN_EPS and b.conv.weight == "read_out.2.conv.weight" and b.conv.bias is None
    assert b.tensors == ("read_out.2.conv.weight", "read_out.2.bn.weight", "read_out.2.bn.bias",
                         "read_out.2.bn.running_mean", "read_out.2.bn.running_var", "read_out.2.bn.num_batches_tracked")
    assert [x.key for x in blocks(HAND, HIDDEN)] == ["edges.0_1", "edges.0_2", "edges.1_2"]
    assert block(HAND, BlockKey(HIDDEN, 1, 2)) is block(HAND, "edges.1_2")
    for bad in ("edges.0_3", "read_in.3", "edges.2_1", "read_out.x"):
        with pytest.raises(SpecError, match=f"'{bad}' is not a block of this network"):
            block(HAND, bad)


def test_head_definitions():
    c, n = heads(HAND)
    assert (c.kind, c.cin, c.out, c.fc.weight, c.fc.bias, c.macs, c.n_params) == (
        "linear", 3, 2, "heads.c.fc.weight", "heads.c.fc.bias", 6, 8)
    assert (n.kind, n.out, n.rates, n.normalize, n.upsample, n.feature_hw, n.size) == (
        "aspp", 3, (1, 2), True, 2, (4, 4), (8, 8))
    assert [[conv.name for conv in b] for b in n.branches] == [
        [f"heads.n.branches.{r}.{p}" for p in ASPP_CONVS] for r in range(2)]
    first = n.branches[1][0]
    assert (first.kernel, first.dilation, first.padding, first.cin, first.cout) == (3, 2, 2, 3, 5)
    assert n.macs == 2 * (5 * 3 * 9 + 5 * 5 + 3 * 5) * 16
    assert head(HAND, "n") == n
    with pytest.raises(SpecError, match="unknown task"):
        head(HAND, "nope")


@pytest.mark.parametrize("spec", SPECS, ids=["hand", "tiny", "omniglot"])
def test_the_network_is_built_from_the_definitions(spec):
    torch.manual_seed(0)
    net = CentralNetwork(spec)
    theta = {k[len("theta."):] for k in network_tensors(net) if k.startswith("theta.")}
    defined = {n for b in blocks(spec) for n in b.tensors} | {n for h in heads(spec) for n in h.tensors}
    assert theta == defined
    modules = dict(net.named_modules())
    for b in blocks(spec):
        m = modules[b.key]
        assert m.defn is b and m.pool == b.pool and m.bn.eps == b.bn_eps
        assert (m.conv.in_channels, m.conv.out_channels, m.conv.kernel_size, m.conv.padding) == (
            b.cin, b.cout, (b.conv.kernel,) * 2, (b.conv.padding,) * 2)
    for h in heads(spec):
        for layer in h.layers:
            m = modules[layer.name]
            if isinstance(m, nn.Conv2d):
                assert (m.weight.shape, m.dilation, m.padding) == (
                    (layer.cout, layer.cin, layer.kernel, layer.kernel), (layer.dilation,) * 2, (layer.padding,) * 2)
            else:
                assert m.weight.shape == (layer.cout, layer.cin)
    # The counter's parameters are the network's (less the architecture logits and BN buffers).
    n_arch = sum(p.numel() for p in net.arch_parameters())
    assert supernet_costs(spec)["params"] == sum(p.numel() for p in net.parameters()) - n_arch
    assert masked_parameters(spec, *full_masks(spec)) == supernet_costs(spec)["params"]


def test_network_costs_count_each_stored_tensor_once():
    b = block(HAND, "edges.0_1")
    one = network_costs(HAND, [(b, None)], [])
    assert one == {"macs": b.macs, "flops": 2 * b.macs, "params": b.n_params()}
    # Applied twice, unfolded: MACs twice, parameters once; folded under two keys: two tensors.
    assert network_costs(HAND, [(b, None), (b, None)], []) == {**one, "macs": 2 * b.macs, "flops": 4 * b.macs}
    two = network_costs(HAND, [(b, "edges.0_1.s1"), (b, "edges.0_1.s2")], [])
    assert two["params"] == 2 * b.n_params(folded=True)
    with_heads = network_costs(HAND, [], ["c", "n"])
    assert with_heads["params"] == sum(h.n_params for h in heads(HAND))
    gamma = np.zeros((2, 3, 3), np.int64)
    alpha, beta = np.array([[1, 0, 0], [0, 0, 0]]), np.array([[1, 0, 0], [0, 0, 0]])
    assert masked_parameters(HAND, gamma, alpha, beta) == (
        block(HAND, "read_in.0").n_params() + block(HAND, "read_out.0").n_params() + with_heads["params"])


@pytest.mark.parametrize("hw, kernel, dilation, reach", [
    ((4, 4), 3, 6, (0, 0)), ((4, 4), 3, 4, (0, 0)), ((4, 4), 3, 3, (1, 1)), ((1, 5), 3, 1, (0, 1)),
    ((2, 7), 5, 2, (0, 2)), ((8, 8), 3, 1, (1, 1)), ((4, 4), 1, 1, (0, 0)),
])
def test_live_taps_compute_the_full_conv_and_its_gradients(hw, kernel, dilation, reach):
    import torch.nn.functional as F

    from dagc.blocks import Conv, live_reach
    from dagc.trainer.block import LiveConv2d

    conv = Conv("c", 3, 4, kernel, hw, dilation)
    assert conv.live == reach == tuple(live_reach(kernel, dilation, n) for n in hw)
    assert conv.macs == 4 * 3 * (2 * reach[0] + 1) * (2 * reach[1] + 1) * hw[0] * hw[1]
    torch.manual_seed(0)
    live = LiveConv2d(3, 4, kernel, padding=conv.padding, dilation=dilation)
    full = nn.Conv2d(3, 4, kernel, padding=conv.padding, dilation=dilation)
    full.load_state_dict(live.state_dict())
    x = torch.randn(2, 3, *hw)
    ya, yb = live(x), full(x)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    (ya * yb.detach()).sum().backward()
    (yb * yb.detach()).sum().backward()
    torch.testing.assert_close(live.weight.grad, full.weight.grad, rtol=1e-4, atol=1e-4)
    c = kernel // 2
    dead = torch.ones_like(full.weight.grad, dtype=torch.bool)
    dead[:, :, c - reach[0]:c + reach[0] + 1, c - reach[1]:c + reach[1] + 1] = False
    assert not live.weight.grad[dead].any()  # what only padding reads learns nothing either way
    assert F.conv2d(x, live.weight, live.bias, padding=conv.padding, dilation=dilation).shape == ya.shape

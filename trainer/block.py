"""One block of the central network (`dagc.blocks.BlockDef`) as a module, and the resize between
strides that every block and head uses."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from dagc.blocks import BlockDef, live_reach
from dagc.trainer.batchnorm import TaskBatchNorm

__all__ = ["Block", "LiveConv2d", "live_conv2d", "resize"]


def live_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, dilation: int = 1, groups: int = 1) -> Tensor:
    """A stride-1, 'same'-padded conv of ``x`` (odd square kernel) over the taps that read data on
    ``x``'s map (`dagc.blocks.live_reach`): the full conv's result without its products with padding."""
    k = weight.shape[-1]
    c = k // 2
    rh, rw = (live_reach(k, dilation, int(n)) for n in x.shape[-2:])
    if (rh, rw) != (c, c):
        weight = weight[:, :, c - rh:c + rh + 1, c - rw:c + rw + 1]
    return F.conv2d(x, weight, bias, padding=(dilation * rh, dilation * rw), dilation=dilation, groups=groups)


class LiveConv2d(nn.Conv2d):
    """`nn.Conv2d` (stride 1, 'same' padding) that computes only the live taps (`live_conv2d`);
    parameters, names and initialisation are nn.Conv2d's."""

    def forward(self, x: Tensor) -> Tensor:
        return live_conv2d(x, self.weight, self.bias, self.dilation[0], self.groups)


class Block(nn.Module):
    """One block of the central network, as its `dagc.blocks.BlockDef` says: resize(from_stride ->
    to_stride) → conv (no bias) → TaskBatchNorm → ReLU → MaxPool(pool) when pool > 1 (appendix
    Table 8)."""

    def __init__(self, defn: BlockDef, tasks: int = 1) -> None:
        super().__init__()
        self.defn = defn
        self.conv = LiveConv2d(defn.cin, defn.cout, defn.conv.kernel, padding=defn.conv.padding, bias=False)
        self.bn = TaskBatchNorm(defn.cout, tasks, eps=defn.bn_eps)
        self.pool = defn.pool

    def forward(self, x: Tensor, lanes: Sequence[Sequence[int]] | None = None) -> Tensor:
        """The block on a stacked batch (B*len(lanes), ...); ``lanes`` as in `TaskBatchNorm`."""
        return self._after_conv(self.conv(resize(x, self.defn.from_stride, self.defn.to_stride)), lanes)

    def shared(self, x: Tensor, lanes: Sequence[Sequence[int]]) -> Tensor:
        """The block on one input (B, ...) that every lane reads; returns (B, len(lanes), ...).

        The conv runs once. Batch statistics are those of every lane, so in training it is normalised
        once for all of the lanes' tasks; with running statistics each lane is normalised with its
        own task's, which need not agree (a task updates only the statistics of blocks it uses)."""
        y = self.conv(resize(x, self.defn.from_stride, self.defn.to_stride))
        if self.bn.per_lane_running and len(lanes) > 1:
            b, g = y.shape[0], len(lanes)
            y = self._after_conv(y.unsqueeze(1).expand(b, g, *y.shape[1:]).reshape(b * g, *y.shape[1:]), lanes)
            return y.view(b, g, *y.shape[1:])
        y = self._after_conv(y, [[t for lane in lanes for t in lane]])
        return y.unsqueeze(1).expand(y.shape[0], len(lanes), *y.shape[1:])

    def _after_conv(self, y: Tensor, lanes: Sequence[Sequence[int]] | None) -> Tensor:
        y = F.relu(self.bn(y, lanes))
        return F.max_pool2d(y, self.pool) if self.pool > 1 else y


def resize(x: Tensor, from_stride: int, to_stride: int) -> Tensor:
    """Resize a feature map between strides: average pooling down (area resampling, exact for the
    integer ratios a valid spec has), bilinear interpolation up."""
    if to_stride == from_stride:
        return x
    if to_stride > from_stride:
        return F.avg_pool2d(x, to_stride // from_stride)
    return F.interpolate(x, scale_factor=from_stride // to_stride, mode="bilinear",
                         align_corners=False)

"""One block of the central network (`dagc.blocks.BlockDef`) as a module, and the resize between
strides that every block and head uses."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from dagc.blocks import BlockDef
from dagc.trainer.batchnorm import TaskBatchNorm

__all__ = ["Block", "resize"]


class Block(nn.Module):
    """One block of the central network, as its `dagc.blocks.BlockDef` says: resize(from_stride ->
    to_stride) → conv (no bias) → TaskBatchNorm → ReLU → MaxPool(pool) when pool > 1 (appendix
    Table 8)."""

    def __init__(self, defn: BlockDef, tasks: int = 1) -> None:
        super().__init__()
        self.defn = defn
        self.conv = nn.Conv2d(defn.cin, defn.cout, defn.conv.kernel, padding=defn.conv.padding, bias=False)
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

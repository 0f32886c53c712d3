"""The task heads of the central network, built from their definitions (`dagc.blocks.HeadDef`):
DeepLab-v2 ASPP for dense tasks, global-average-pooled linear for classification."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dagc.blocks import ASPP_BRANCH, ASPP_CONVS, REFINE, Conv, HeadDef, head
from dagc.spec import Spec, TaskSpec
from dagc.trainer.block import LiveConv2d, live_conv2d

__all__ = ["ASPPHead", "LinearHead", "make_head", "aspp_stacked"]


def _branch(convs: Sequence[Conv], dropout: float, layout: Sequence[str] = ASPP_BRANCH) -> nn.Sequential:
    """One ASPP branch (or the refinement, ``layout`` `REFINE`) laid out as ``layout``, so that module
    positions match parameter names."""
    layers: list[nn.Module] = []
    todo = iter(convs)
    for op in layout:
        if op == "conv":
            c = next(todo)
            layers.append(LiveConv2d(c.cin, c.cout, c.kernel, padding=c.padding, dilation=c.dilation))
        else:
            layers.append(nn.ReLU() if op == "relu" else nn.Dropout(dropout))
    return nn.Sequential(*layers)


class ASPPHead(nn.Module):
    """DeepLab-v2 ASPP of an "aspp" `HeadDef`: per rate, conv3x3(dilation r) → ReLU → Dropout →
    conv1x1 → ReLU → Dropout → conv1x1(out); branches summed and bilinearly upsampled to the input
    size, refined with the input image when the definition has a refinement (`dagc.blocks.REFINE`).
    Normal predictions are L2-normalised to unit vectors."""

    def __init__(self, defn: HeadDef) -> None:
        super().__init__()
        self.defn = defn
        self.branches = nn.ModuleList(_branch(convs, defn.dropout) for convs in defn.branches)
        if defn.refine:
            self.refine = _branch(defn.refine, 0.0, REFINE)
        self.normalize = defn.normalize

    def forward(self, x: Tensor, size: tuple[int, int], image: Tensor | None = None) -> Tensor:
        """Takes v_L, the output size and the input image (B, C_in, H, W) (needed with a refinement)."""
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y = y + branch(x)
        return self.finish(F.interpolate(y, size=size, mode="bilinear", align_corners=False), image)

    def finish(self, y: Tensor, image: Tensor | None) -> Tensor:
        """The upsampled prediction ``y`` refined with ``image`` (when the head refines) and normalised
        (normals)."""
        if self.defn.refine:
            if image is None:
                raise ValueError(f"head {self.defn.task!r} refines with the input image; pass it")
            y = y + self.refine(torch.cat([y, image.to(y.dtype)], 1))
        return F.normalize(y, dim=1, eps=self.defn.norm_eps) if self.normalize else y


class LinearHead(nn.Module):
    """Global average pooling → linear layer (classification), of a "linear" `HeadDef`."""

    def __init__(self, defn: HeadDef) -> None:
        super().__init__()
        self.defn = defn
        self.fc = nn.Linear(defn.fc.cin, defn.fc.cout)

    def forward(self, x: Tensor, size: tuple[int, int], image: Tensor | None = None) -> Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def make_head(task: TaskSpec, spec: Spec) -> nn.Module:
    """The head module of ``task`` (`ASPPHead` or `LinearHead`), freshly initialised."""
    defn = head(spec, task)
    return LinearHead(defn) if defn.kind == "linear" else ASPPHead(defn)


def _cat_padded(convs: Sequence[nn.Conv2d], outs: Sequence[int], width: int) -> tuple[Tensor, Tensor]:
    """Weights and biases of ``convs`` concatenated, each padded with zero filters to ``width``
    outputs (output widths differ per task; the caller slices after). Concatenation rather than
    F.pad so the TorchScript ONNX exporter can infer the shape."""
    ws, bs = [], []
    for c, o in zip(convs, outs):
        ws.append(c.weight)
        bs.append(c.bias)
        if o < width:
            ws.append(c.weight.new_zeros(width - o, *c.weight.shape[1:]))
            bs.append(c.bias.new_zeros(width - o))
    return torch.cat(ws), torch.cat(bs)


def aspp_stacked(heads: Sequence[ASPPHead], x: Tensor, size: tuple[int, int], shared: bool,
                 images: Sequence[Tensor | None] | None = None) -> list[Tensor]:
    """Run K ASPP heads at once as grouped convolutions (same result as calling each head).

    Takes the heads, their features — (B, K*C, H, W) with task k's channels in block k (the free
    view of a sample-major lane tensor), or (B, C, H, W) read by all heads when ``shared`` — and
    the output size, and each head's input image (needed by heads that refine). Returns each head's
    prediction. Heads have their own weights; concatenating
    them per call makes one conv call per layer instead of K, which is what matters when per-call
    overhead dominates (small maps, CPU).
    """
    k = len(heads)
    defs = [h.defn for h in heads]
    outs = [d.out for d in defs]
    width = max(outs)
    p, training = defs[0].dropout, heads[0].training
    total = None
    for r, (first, _, _) in enumerate(defs[0].branches):
        c1, c2, c3 = ([h.branches[r][pos] for h in heads] for pos in ASPP_CONVS)
        y = live_conv2d(x, torch.cat([c.weight for c in c1]), torch.cat([c.bias for c in c1]), first.dilation,
                        groups=1 if shared else k)
        y = F.dropout(F.relu(y), p, training)
        y = F.conv2d(y, torch.cat([c.weight for c in c2]), torch.cat([c.bias for c in c2]), groups=k)
        y = F.dropout(F.relu(y), p, training)
        y = F.conv2d(y, *_cat_padded(c3, outs, width), groups=k)
        total = y if total is None else total + y
    total = F.interpolate(total, size=size, mode="bilinear", align_corners=False)
    total = total.view(total.shape[0], k, width, *size)
    images = images if images is not None else [None] * k
    return [h.finish(total[:, i, :o], image) for i, (h, o, image) in enumerate(zip(heads, outs, images))]

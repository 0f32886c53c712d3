"""Task losses (paper Sec. 4.1) and the squeeze loss (Eq. 9)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dagc.spec import TaskSpec

# Label value that segmentation losses and metrics skip (unlabelled pixels in real datasets).
IGNORE_INDEX = -1
DENSE_LOSSES = ("l2", "l1")


def task_loss(task: TaskSpec, pred: Tensor, target: Tensor, dense_loss: str = "l2") -> Tensor:
    """Loss of one task: cross-entropy for segmentation and classification; L2 (or L1 when
    ``dense_loss="l1"``) for depth, normals, edges and the other dense regression tasks."""
    if task.kind in ("segmentation", "classification"):
        return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX)
    if dense_loss == "l2":
        return F.mse_loss(pred, target)
    if dense_loss == "l1":
        return F.l1_loss(pred, target)
    raise ValueError(f"dense_loss must be one of {DENSE_LOSSES}, got {dense_loss!r}")


def squeeze_loss(arch_gamma: Tensor, band: Tensor, kappa: float) -> Tensor:
    """Eq. 9: Σ_k max(Σ_ij σ(γ^k_ij) − κ, 0) over each task's flow-band edges.

    Takes logits (K, N, N), the 0/1 band (N, N) and the budget κ; returns a scalar.
    """
    per_task = (torch.sigmoid(arch_gamma) * band).sum(dim=(1, 2))
    return torch.clamp(per_task - kappa, min=0).sum()

"""Task losses (paper Sec. 4.1) and the squeeze loss (Eq. 9)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dagc.errors import ConfigError
from dagc.spec import TaskSpec

# Label value that segmentation losses and metrics skip (unlabelled pixels in real datasets).
IGNORE_INDEX = -1
DENSE_LOSSES = ("l2", "l1")


def valid_pixels(task: TaskSpec, target: Tensor) -> Tensor | None:
    """Which target pixels carry a label for a dense regression task.

    Takes the task and its target (B, C, H, W); returns a bool tensor broadcastable to the target
    ((B, 1, H, W) for normals), or None for kinds without invalid pixels. Real datasets mark
    missing depth with 0 and missing normals with the zero vector; `dagc.trainer.metrics` skips
    the same pixels.
    """
    if task.kind == "depth":
        return target > 0
    if task.kind == "normal":
        return (target != 0).any(dim=1, keepdim=True)
    return None


def task_loss(task: TaskSpec, pred: Tensor, target: Tensor, dense_loss: str = "l2") -> Tensor:
    """Loss of one task, a scalar tensor.

    Cross-entropy for segmentation and classification (labels ``IGNORE_INDEX`` skipped); L2
    (or L1 when ``dense_loss="l1"``) regression for depth, normals, edges and saliency (the
    last two on their {0, 1} maps). Depth pixels with target <= 0 and normal pixels whose target
    is the zero vector are invalid: when a batch has any, the loss is the mean over the valid
    elements only (zero, with a graph, when none is valid); a batch without any gives exactly
    the plain mean over all elements. Raises ConfigError for an unknown ``dense_loss``.
    """
    if task.kind in ("segmentation", "classification"):
        return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX)
    if dense_loss not in DENSE_LOSSES:
        raise ConfigError(f"dense_loss must be one of {list(DENSE_LOSSES)}, got {dense_loss!r}")
    loss = F.mse_loss if dense_loss == "l2" else F.l1_loss
    valid = valid_pixels(task, target)
    # The all-valid case takes the unmasked path so that synthetic data (always valid) trains
    # bit for bit as before; the check costs one sync, like the float() of every logged loss.
    if valid is None or bool(valid.all()):
        return loss(pred, target)
    # Select before computing: an invalid target may be NaN or inf, and even a masked-out
    # NaN element would turn the gradient into NaN (0 * NaN).
    keep = valid.expand_as(target)
    if not bool(keep.any()):
        return pred.sum() * 0.0
    return loss(pred[keep], target[keep])


def squeeze_loss(arch_gamma: Tensor, band: Tensor, kappa: float) -> Tensor:
    """Eq. 9: Σ_k max(Σ_ij σ(γ^k_ij) − κ, 0) over each task's flow-band edges.

    Takes logits (K, N, N), the 0/1 band (N, N) and the budget κ; returns a scalar.
    """
    per_task = (torch.sigmoid(arch_gamma) * band).sum(dim=(1, 2))
    return torch.clamp(per_task - kappa, min=0).sum()

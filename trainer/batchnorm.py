"""Batch norm shared by all tasks that normalises each task's lane of a stacked batch on its own
(README, "Training", and FORMAT.md, "Semantics": one set of parameters and running statistics per edge;
running the K tasks stacked equals running them one after another)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dagc.blocks import BN_EPS

__all__ = ["TaskBatchNorm"]


class TaskBatchNorm(nn.Module):
    """BatchNorm2d over a batch made of ``groups`` lanes, each lane normalised on its own.

    The batch is laid out sample-major, (B, groups) flattened: sample b of lane g is row
    ``b * groups + g``. Viewed as (B, groups*C, H, W), per-lane statistics are plain per-channel
    statistics, so one fused native batch-norm call serves all lanes. Parameters and running
    statistics are shared by all lanes. In training each lane uses its own batch statistics, and the
    running statistics are updated once per lane, in lane order; a lane may stand for several
    identical tasks (``repeats``) and is then applied that many times. With one lane this is exactly
    ``nn.BatchNorm2d``. In eval mode the running statistics serve every lane.
    """

    def __init__(self, channels: int, eps: float = BN_EPS, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor, groups: int = 1, repeats: Sequence[int] | None = None) -> Tensor:
        """Normalise ``x`` of shape (B*groups, C, H, W); ``repeats[g]`` counts lane g's tasks.

        Half-precision inputs (autocast's conv outputs) are normalised in float32, so statistics
        accumulate in the precision of the float32 running statistics."""
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        reps = list(repeats) if repeats is not None else [1] * groups
        if groups == 1 and reps == [1]:
            self.num_batches_tracked.add_(1)
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                True, self.momentum, self.eps)
        n, c, h, w = x.shape
        count = (n // groups) * h * w
        if count < 2:
            raise ValueError(f"batch norm needs more than 1 value per channel and task, got {count}")
        # Normalise without affine (the affine is shared, so it is applied once on (n, c, h, w)
        # rather than repeated per lane): fewer calls, which is what small maps are bound by.
        # reshape, not view: a channels-last batch cannot be viewed lane-major (reshape copies it).
        y, mean, invstd = torch.native_batch_norm(
            x.reshape(n // groups, groups * c, h, w), None, None, None, None, True, 0.0, self.eps)
        with torch.no_grad():
            var = invstd.pow(-2).sub_(self.eps).mul_(count / (count - 1))  # unbiased, as BatchNorm2d
            self._update_running(mean.view(groups, c), var.view(groups, c), reps)
        return torch.addcmul(self.bias.view(1, c, 1, 1), y.reshape(n, c, h, w), self.weight.view(1, c, 1, 1))

    def _update_running(self, means: Tensor, vars_: Tensor, reps: list[int]) -> None:
        # Applying r <- (1-m) r + m s once per task in order has the closed form
        # r_T = (1-m)^T r_0 + sum_t m (1-m)^(T-t) s_t: one weighted sum instead of T small updates.
        keep, coef = _running_coefficients(tuple(reps), self.momentum, means.dtype, means.device)
        self.running_mean.addmv_(means.t(), coef, beta=keep)
        self.running_var.addmv_(vars_.t(), coef, beta=keep)
        self.num_batches_tracked.add_(sum(reps))


@functools.lru_cache(maxsize=256)
def _running_coefficients(reps: tuple[int, ...], m: float, dtype: torch.dtype,
                          device: torch.device) -> tuple[float, Tensor]:
    """(1-m)^T and each lane's summed weight m (1-m)^(T-t) over the positions t it occupies."""
    total = sum(reps)
    weights, pos = [], 0
    for r in reps:
        weights.append(sum(m * (1 - m) ** (total - 1 - t) for t in range(pos, pos + r)))
        pos += r
    return (1 - m) ** total, torch.tensor(weights, dtype=dtype, device=device)

"""Batch norm with shared affine parameters and running statistics per task (README, "Training", and
FORMAT.md, "Semantics").

A hidden state's input depends on the task's own sub-network, so one blend of every task's
statistics is right for none of them once the sub-networks differ: on a real shared-input problem
(two overlapping handwritten digits, issue 26) the deployed ``left`` classifier scored 0.42 with
shared statistics and 0.86 with its own. The affine parameters are θ and stay shared, as in the
paper.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dagc.blocks import BN_EPS

__all__ = ["TaskBatchNorm", "batch_statistics", "task_batchnorms"]


class TaskBatchNorm(nn.Module):
    """BatchNorm2d over a batch made of lanes, each lane normalised with its own task's statistics.

    The batch is laid out sample-major, (B, lanes) flattened: sample b of lane g is row
    ``b * len(lanes) + g``. Viewed as (B, lanes*C, H, W), per-lane statistics are plain per-channel
    statistics, so one fused native batch-norm call serves all lanes. ``lanes[g]`` lists the task
    indices (in the spec's order) that lane g stands for; a lane stands for several tasks only when
    they see the same values (a shared input, or the warm-up's identical tasks).

    Buffers ``running_mean`` / ``running_var`` are (tasks, C), ``num_batches_tracked`` (tasks,).
    In training each lane is normalised with its batch statistics and every task of the lane updates
    its own running statistics with them (momentum ``momentum``; None: a cumulative average, as
    ``nn.BatchNorm2d``, used to re-estimate statistics). In eval mode each lane is normalised with
    the running statistics of its first task; with ``use_batch_stats`` set (`batch_statistics`) eval
    mode normalises with batch statistics instead and updates nothing. With one task and one lane
    this is exactly ``nn.BatchNorm2d``.
    """

    def __init__(self, channels: int, tasks: int = 1, eps: float = BN_EPS, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum, self.tasks = eps, momentum, tasks
        self.use_batch_stats = False
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(tasks, channels))
        self.register_buffer("running_var", torch.ones(tasks, channels))
        self.register_buffer("num_batches_tracked", torch.zeros(tasks, dtype=torch.long))

    @property
    def per_lane_running(self) -> bool:
        """True when a forward normalises with running statistics (eval mode, not `batch_statistics`)."""
        return not self.training and not self.use_batch_stats

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def forward(self, x: Tensor, lanes: Sequence[Sequence[int]] | None = None) -> Tensor:
        """Normalise ``x`` of shape (B*len(lanes), C, H, W); ``lanes`` default: one lane for every task.

        Half-precision inputs (autocast's conv outputs) are normalised in float32, so statistics
        accumulate in the precision of the float32 running statistics. Raises ValueError when a
        lane has a single value per channel in training."""
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        lanes = [range(self.tasks)] if lanes is None else lanes
        groups = len(lanes)
        n, c, h, w = x.shape
        if self.per_lane_running:
            first = [lane[0] for lane in lanes]
            if groups == 1:
                return F.batch_norm(x, self.running_mean[first[0]], self.running_var[first[0]], self.weight,
                                    self.bias, False, 0.0, self.eps)
            mean, var = self.running_mean[first].reshape(-1), self.running_var[first].reshape(-1)
            y = F.batch_norm(x.reshape(n // groups, groups * c, h, w), mean, var, self.weight.repeat(groups),
                             self.bias.repeat(groups), False, 0.0, self.eps)
            return y.reshape(n, c, h, w)
        count = (n // groups) * h * w
        if count < 2:
            raise ValueError(f"batch norm needs more than 1 value per channel and task, got {count}")
        # Normalise without affine (the affine is shared, so it is applied once on (n, c, h, w)
        # rather than repeated per lane): fewer calls, which is what small maps are bound by.
        # reshape, not view: a channels-last batch cannot be viewed lane-major (reshape copies it).
        y, mean, invstd = torch.native_batch_norm(
            x.reshape(n // groups, groups * c, h, w), None, None, None, None, True, 0.0, self.eps)
        if self.training:
            with torch.no_grad():
                var = invstd.pow(-2).sub_(self.eps).mul_(count / (count - 1))  # unbiased, as BatchNorm2d
                self._update_running(mean.view(groups, c), var.view(groups, c), lanes)
        return torch.addcmul(self.bias.view(1, c, 1, 1), y.reshape(n, c, h, w), self.weight.view(1, c, 1, 1))

    def _update_running(self, means: Tensor, vars_: Tensor, lanes: Sequence[Sequence[int]]) -> None:
        tasks, src = _lane_index(tuple(tuple(lane) for lane in lanes), means.device)
        self.num_batches_tracked.index_add_(0, tasks, torch.ones_like(tasks))
        if self.momentum is None:  # cumulative average: the k-th batch of a task weighs 1/k
            f = 1.0 / self.num_batches_tracked[tasks].to(means.dtype).unsqueeze(1)
        else:
            f = torch.full((len(tasks), 1), float(self.momentum), dtype=means.dtype, device=means.device)
        for buf, new in ((self.running_mean, means), (self.running_var, vars_)):
            buf.index_copy_(0, tasks, (1 - f) * buf[tasks] + f * new[src])


@functools.lru_cache(maxsize=1024)
def _lane_index(lanes: tuple[tuple[int, ...], ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """(every task of the lanes, the lane each one is in), as index tensors on ``device``."""
    tasks = [t for lane in lanes for t in lane]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"a task stands in more than one lane: {lanes}")
    src = [g for g, lane in enumerate(lanes) for _ in lane]
    return (torch.tensor(tasks, dtype=torch.long, device=device),
            torch.tensor(src, dtype=torch.long, device=device))


def task_batchnorms(module: nn.Module) -> list[TaskBatchNorm]:
    """Every `TaskBatchNorm` inside ``module``."""
    return [m for m in module.modules() if isinstance(m, TaskBatchNorm)]


@contextlib.contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """Within the block, every `TaskBatchNorm` of ``module`` normalises each lane with its batch
    statistics even in eval mode (and updates no running statistics): what the network computed
    during training, for comparing with what it computes deployed."""
    bns = task_batchnorms(module)
    saved = [bn.use_batch_stats for bn in bns]
    for bn in bns:
        bn.use_batch_stats = True
    try:
        yield
    finally:
        for bn, s in zip(bns, saved):
            bn.use_batch_stats = s

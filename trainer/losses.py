"""Task losses (paper Sec. 4.1) and the squeeze loss (Eq. 9).

Which loss a task kind trains with is the kind table's (`dagc.trainer.kinds`); this module holds
the losses themselves and the rules for invalid pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dagc.errors import ConfigError
from dagc.trainer.data import IGNORE_INDEX

DENSE_LOSSES = ("l2", "l1")
# Which target pixels of a regression task carry a value: a bool tensor broadcastable to the target.
ValidPixels = Callable[[Tensor], Tensor]

__all__ = ["DENSE_LOSSES", "IGNORE_INDEX", "cross_entropy_loss", "regression_loss", "squeeze_loss", "shared_squeeze_loss",
           "valid_depth", "valid_normal"]


def valid_depth(target: Tensor) -> Tensor:
    """Depth pixels with a measurement: real datasets mark missing depth with 0 (target (B, 1, H, W))."""
    return target > 0


def valid_normal(target: Tensor) -> Tensor:
    """Normal pixels with a direction: real datasets mark missing normals with the zero vector.
    Takes (B, 3, H, W); returns (B, 1, H, W). `dagc.trainer.metrics` skips the same pixels."""
    return (target != 0).any(dim=1, keepdim=True)


def cross_entropy_loss(pred: Tensor, target: Tensor, dense_loss: str = "l2",
                       valid: ValidPixels | None = None) -> Tensor:
    """Cross-entropy of logits (B, classes[, H, W]) against labels (B[, H, W]), labels
    ``IGNORE_INDEX`` skipped; a scalar. ``dense_loss`` and ``valid`` are the regression losses'
    options (the kind table calls every loss alike): labels have one loss and mark their own
    unlabelled pixels."""
    return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX)


def regression_loss(pred: Tensor, target: Tensor, dense_loss: str = "l2",
                    valid: ValidPixels | None = None) -> Tensor:
    """L2 (or L1 when ``dense_loss="l1"``) regression of a dense map (B, C, H, W); a scalar.

    ``valid`` picks the target pixels that carry a value (None: all do). When a batch has invalid
    pixels the loss is the mean over the valid elements only (zero, with a graph, when none is
    valid); a batch without any gives exactly the plain mean over all elements. Raises
    ConfigError for an unknown ``dense_loss``.
    """
    if dense_loss not in DENSE_LOSSES:
        raise ConfigError(f"dense_loss must be one of {list(DENSE_LOSSES)}, got {dense_loss!r}")
    loss = F.mse_loss if dense_loss == "l2" else F.l1_loss
    mask = valid(target) if valid is not None else None
    # The all-valid case takes the unmasked path so that synthetic data (always valid) trains
    # bit for bit as before; the check costs one sync, like the float() of every logged loss.
    if mask is None or bool(mask.all()):
        return loss(pred, target)
    # Select before computing: an invalid target may be NaN or inf, and even a masked-out
    # NaN element would turn the gradient into NaN (0 * NaN).
    keep = mask.expand_as(target)
    if not bool(keep.any()):
        return pred.sum() * 0.0
    return loss(pred[keep], target[keep])


def squeeze_loss(arch_gamma: Tensor, band: Tensor, kappa: float | Tensor,
                 read: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Eq. 9: Σ_k max(Σ_ij σ(γ^k_ij) − κ, 0) over each task's flow-band edges; with costs, the
    cost-aware squeeze of a budget: Σ_k max(Σ_ij c_ij σ(γ^k_ij) + Σ_i c_i σ(α^k_i) + Σ_i c'_i σ(β^k_i) − κ_k, 0).

    Takes logits (K, N, N); ``band``, the 0/1 band (N, N) or each hidden edge's cost (zero off the
    band); the budget κ, a number or one per task (K,); and ``read``, (α logits (K, N), read-in
    costs (N,), β logits (K, N), read-out costs (N,)) or None (Eq. 9 prices hidden edges only).
    Returns a scalar.
    """
    per_task = (torch.sigmoid(arch_gamma) * band).sum(dim=(1, 2))
    if read is not None:
        alpha, alpha_costs, beta, beta_costs = read
        per_task = per_task + (torch.sigmoid(alpha) * alpha_costs).sum(dim=1) + (torch.sigmoid(beta) * beta_costs).sum(dim=1)
    return torch.clamp(per_task - kappa, min=0).sum()


def shared_squeeze_loss(arch_gamma: Tensor, costs: Tensor, budget: float | Tensor,
                        read: tuple[Tensor, Tensor, Tensor, Tensor], union: bool = True) -> Tensor:
    """The cost-aware squeeze of a budget for the compiled shared model (``--budget-scope shared``):
    max(Σ_ij c_ij u(γ_ij) + Σ_i c_i u(α_i) + Σ_i c'_i u(β_i) − budget, 0) with, for one input shared
    by all tasks (``union``), u(x) = 1 − Π_k (1 − σ(x^k)), the chance that some task applies the
    block, and for an input per task u(x) = Σ_k σ(x^k) (nothing is shared: `dagc.sharing`).

    Not in the paper (Eq. 9 is per task). The compiler computes a block once for several tasks
    only when their whole upstream is the same (`dagc.sharing`); the union prices a block once as
    soon as any task applies it, so it is a lower bound of the exact shared cost that rewards tasks
    for using the same blocks, and the reduction (`dagc.trainer.budget_reduction`) then meets the
    budget on the exact cost. Measured on the reduced masks of the nine per-task-budget runs of
    benchmarks/budget_fight.py (synthetic, seeds 0-2, ORT CPU table at batch 8): the union of the
    tasks' blocks, heads and call included, is 1-14% below the exact shared cost (median 5%), the
    per-task sum 0-26% above it (median 2%, over 14% on three runs). With one task it is the
    per-task squeeze (a test).

    Takes logits (K, N, N), each hidden edge's cost (N, N) (zero off the band), the budget for the
    blocks (a number or a one-element tensor) and ``read`` = (α logits (K, N), read-in costs (N,),
    β logits (K, N), read-out costs (N,)). Returns a scalar."""
    def used(x: Tensor) -> Tensor:
        p = torch.sigmoid(x)
        return 1 - torch.prod(1 - p, dim=0) if union else p.sum(dim=0)

    alpha, alpha_costs, beta, beta_costs = read
    total = (used(arch_gamma) * costs).sum() + (used(alpha) * alpha_costs).sum() + (used(beta) * beta_costs).sum()
    return torch.clamp(total - budget, min=0).sum()


def select_loss(arch_alpha: Tensor, arch_beta: Tensor) -> Tensor:
    """The one-read-in, one-read-out squeeze: Σ_k (Σ_i σ(α^k_i) − max_i σ(α^k_i)) + (Σ_i σ(β^k_i) − max_i σ(β^k_i)),
    the weight on every read-in and read-out but the leading one.

    Takes the read-in and read-out logits (K, N) each; returns a scalar. Not in the paper: Algorithm 1
    deploys argmax A and argmax B only, but nothing in Eq. 8 stops several read-outs saturating
    together (runner-up σ(B) 0.99+ on every seed, RESULTS "Search decisiveness"), which leaves the
    argmax a tie. Measured forms (synthetic, seed 0, RESULTS "A search that decides"): a cap
    max(Σσ − 1, 0) and a soft leader (τ·logsumexp) push every gate down alike under Adam and decide
    1 and 0 of 4 tasks; the hard leader decides 4 of 4."""
    a, b = torch.sigmoid(arch_alpha), torch.sigmoid(arch_beta)
    return ((a.sum(dim=1) - a.max(dim=1).values) + (b.sum(dim=1) - b.max(dim=1).values)).sum()

"""The three training stages of the paper (Sec. 3.2), as plain functions over explicit state.

    warm-up    θ only, Γ/A/B frozen at 0 (σ = 0.5)            `warmup_step`
    search     θ and Γ/A/B with Adam, task loss + λ_sq·L_sq    `search_step`
    reduction  per task, Algorithm 1 on σ(Γ/A/B), then closed  `reduce_network`
    rewind     θ back to the end of warm-up                    `rewind`
    fine-tune  θ only, binary masks, no sigmoid               `finetune_step`
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dagc.cost_table import CostTable
from dagc.errors import ConfigError
from dagc.precision_table import BF16, FP16
from dagc.trainer.baselines import full_masks
from dagc.trainer.budget import SHARED, TASK
from dagc.trainer.budget_reduction import reduce_shared, reduce_task
from dagc.trainer.kinds import task_loss
from dagc.trainer.losses import select_loss, shared_squeeze_loss, squeeze_loss
from dagc.trainer.network import CentralNetwork
from dagc.trainer.reduction import flow_based_reduction, random_reduction, threshold_reduction
from dagc.trainer.topology import close_masks, topology_metrics

# Each reduction as (gamma, alpha, beta, seed, target_sparsity, fits) -> binary (gamma, alpha, beta);
# only the random one uses the seed.
_REDUCE = {
    "fbr": lambda g, a, b, seed, target, fits: flow_based_reduction(g, a, b, target_sparsity=target, fits=fits),
    "threshold": lambda g, a, b, seed, target, fits: threshold_reduction(g, a, b, target_sparsity=target, fits=fits),
    "random": lambda g, a, b, seed, target, fits: random_reduction(g, a, b, seed=seed, target_sparsity=target, fits=fits),
}
REDUCTIONS = tuple(_REDUCE)
AMP_MODES = ("none", BF16, FP16)  # autocast dtypes, named as the precisions are


@dataclass
class Precision:
    """How a training step computes: autocast to ``dtype`` on ``device_type`` (None: float32
    throughout, the default), and for fp16 a gradient scaler against underflow."""

    dtype: torch.dtype | None = None
    device_type: str = "cpu"
    scaler: torch.amp.GradScaler | None = None

    def autocast(self):
        """The autocast context of the forward pass (a null context in float32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward_step(self, loss: Tensor, opt: torch.optim.Optimizer) -> None:
        """Backward and optimizer step, through the scaler when there is one."""
        if self.scaler is None:
            loss.backward()
            opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()


def make_precision(amp: str, device: torch.device) -> Precision:
    """The `Precision` of an ``amp`` mode ('none', 'bf16', 'fp16') on ``device``.

    Raises ConfigError for an unknown mode or fp16 off CUDA (TrainConfig reports both earlier).
    """
    if amp not in AMP_MODES:
        raise ConfigError(f"amp must be one of {list(AMP_MODES)}, got {amp!r}")
    if amp == "none":
        return Precision()
    if amp == FP16:
        if device.type != "cuda":
            raise ConfigError("amp 'fp16' needs a CUDA device (gradient scaling)")
        return Precision(torch.float16, "cuda", torch.amp.GradScaler("cuda"))
    return Precision(torch.bfloat16, device.type)


def make_optimizer(net: CentralNetwork, stage: str, weight_lr: float, arch_lr: float,
                   frozen: Sequence[str] = ()) -> torch.optim.Adam:
    """Adam for a stage: θ alone in warm-up and fine-tune; θ and the logits (own lr) in search,
    except the logits named in ``frozen`` (e.g. ``("arch_alpha", "arch_beta")`` for an ablation
    that fixes the read-in/out), which never train.

    Also sets which parameters need gradients, so frozen logits cost nothing.
    """
    train_arch = stage == "search"
    searched = [p for name, p in zip(("arch_gamma", "arch_alpha", "arch_beta"), net.arch_parameters())
                if name not in frozen]
    for p in net.arch_parameters():
        p.requires_grad_(train_arch and any(p is q for q in searched))
    groups = [{"params": net.weight_parameters(), "lr": weight_lr}]
    if train_arch and searched:
        groups.append({"params": searched, "lr": arch_lr})
    # fused: one kernel for all parameters instead of ~10 small ops each (CPU and CUDA).
    return torch.optim.Adam(groups, fused=True)


def total_task_loss(net: CentralNetwork, x: Tensor, targets: Mapping[str, Tensor],
                    dense_loss: str, *, model: Callable | None = None,
                    precision: Precision | None = None) -> tuple[Tensor, dict[str, float]]:
    """Eq. 7: the sum of the task losses, all tasks run stacked; also each task's value.

    ``model`` runs the forward pass instead of ``net`` (a DistributedDataParallel and/or
    torch.compile wrapper of it); ``precision`` sets autocast. Losses are computed in float32.
    """
    precision = precision or Precision()
    with precision.autocast():
        out = (model if model is not None else net)(x)
    losses = {t.name: task_loss(t, out[t.name].float(), targets[t.name], dense_loss) for t in net.spec.tasks}
    return sum(losses.values()), {k: float(v.detach()) for k, v in losses.items()}


def warmup_step(net: CentralNetwork, opt: torch.optim.Optimizer, x: Tensor,
                targets: Mapping[str, Tensor], dense_loss: str = "l2", *, model: Callable | None = None,
                precision: Precision | None = None) -> dict[str, float]:
    """One warm-up iteration (θ only). ``model`` / ``precision`` as in `total_task_loss`.
    Returns the losses."""
    net.train()
    loss, parts = total_task_loss(net, x, targets, dense_loss, model=model, precision=precision)
    opt.zero_grad(set_to_none=True)
    (precision or Precision()).backward_step(loss, opt)
    return {"loss": float(loss.detach()), **parts}


def search_step(net: CentralNetwork, opt: torch.optim.Optimizer, x: Tensor,
                targets: Mapping[str, Tensor], squeeze_weight: float, kappa: float,
                dense_loss: str = "l2", *, model: Callable | None = None,
                precision: Precision | None = None, costs: tuple[Tensor, ...] | None = None,
                select_weight: float = 0.0, shared: bool = False) -> dict[str, float]:
    """One search iteration: Eq. 8, L_task + λ_sq·L_sq, on θ and Γ/A/B together, plus
    ``select_weight`` times `select_loss` (0: the paper's).
    ``model`` / ``precision`` as in `total_task_loss`; ``costs`` (`dagc.trainer.budget.loss_costs`)
    makes L_sq the cost-aware squeeze of a budget instead of Eq. 9 with ``kappa``: per task, or with
    ``shared`` of the shared model (`dagc.trainer.losses.shared_squeeze_loss`). Returns the losses."""
    net.train()
    loss, parts = total_task_loss(net, x, targets, dense_loss, model=model, precision=precision)
    # Outside the wrapper's forward, but arch_gamma is also used inside it, so its gradient
    # (both terms summed) is all-reduced once under DDP; the squeeze term is equal on every rank.
    if costs is None:
        sq = squeeze_loss(net.arch_gamma, net.band, kappa)
    else:
        g_cost, a_cost, b_cost, budgets = costs
        read = (net.arch_alpha, a_cost, net.arch_beta, b_cost)
        sq = shared_squeeze_loss(net.arch_gamma, g_cost, budgets, read, union=net.spec.shared_input) if shared \
            else squeeze_loss(net.arch_gamma, g_cost, budgets, read)
    total = loss + squeeze_weight * sq
    extra = {}
    if select_weight:
        sel = select_loss(net.arch_alpha, net.arch_beta)
        total = total + select_weight * sel
        extra["select"] = float(sel.detach())
    opt.zero_grad(set_to_none=True)
    (precision or Precision()).backward_step(total, opt)
    return {"loss": float(total.detach()), "squeeze": float(sq.detach()), **extra, **parts}


finetune_step = warmup_step  # same update; the network is in hard mode by then


def reduce_network(net: CentralNetwork, method: str = "fbr", *, seed: int = 0,
                   target_sparsity: float | None = None, budget: float | None = None,
                   table: CostTable | None = None, scope: str = TASK) -> dict[str, dict[str, float]]:
    """Discretise every task's σ(Γ, A, B) (Algorithm 1, threshold or random reduction, or ``none``:
    keep every edge), close the masks, and switch the network to hard mode; with ``budget`` (in the
    unit of ``table``, `dagc.cost_table`; default FLOPs) a reduction stops as soon as the task's
    sub-network fits it (``scope`` task) or all tasks' reductions together stop as soon as the
    shared model fits it (``shared``), other read-ins/read-outs tried when the set-up's cannot fit
    (`dagc.trainer.budget_reduction`). Returns
    the topology (D, W, S) of each task's sub-network. The random reduction of task k draws from ``seed + k``.
    Raises ConfigError for an unknown method or target."""
    if method not in (*REDUCTIONS, "none"):
        raise ConfigError(f"unknown reduction {method!r}; choose one of {[*REDUCTIONS, 'none']}")
    band = net.band.cpu().numpy()
    with torch.no_grad():
        gam = (torch.sigmoid(net.arch_gamma) * net.band).cpu().double().numpy()
        alp = torch.sigmoid(net.arch_alpha).cpu().double().numpy()
        bet = torch.sigmoid(net.arch_beta).cpu().double().numpy()
    masks, topo = [], {}
    keep_all = full_masks(net.spec) if method == "none" else None
    joint = None
    if budget is not None and scope == SHARED and method != "none":
        joint, _ = reduce_shared(net.spec, list(zip(gam, alp, bet)), method, seed, budget, table)
    for k, task in enumerate(net.spec.tasks):
        if method == "none":  # the no-fbr ablation: every edge stays
            g, a, b = (m[k] for m in keep_all)
        elif joint is not None:
            g, a, b = joint[k]
        elif budget is not None:
            (g, a, b), _ = reduce_task(net.spec, task.name, (gam[k], alp[k], bet[k]), method, seed + k, budget, table)
        else:
            g, a, b = _REDUCE[method](gam[k], alp[k], bet[k], seed + k, target_sparsity, None)
        g, a, b = close_masks(g, a, b)
        masks.append((g, a, b))
        topo[task.name] = topology_metrics(g, a, b, band)
    stacked = [torch.from_numpy(np.stack([m[i] for m in masks])) for i in range(3)]
    net.set_masks(*stacked)
    return topo


def rewind(net: CentralNetwork, snapshot: Mapping[str, Tensor]) -> None:
    """Load θ (weights and batch-norm statistics) saved at the end of warm-up; the logits and the
    masks are kept."""
    arch = {"arch_gamma", "arch_alpha", "arch_beta"}
    state = net.state_dict()
    with torch.no_grad():
        for k, v in snapshot.items():
            if k not in arch:
                state[k].copy_(v)


def theta_snapshot(net: CentralNetwork) -> dict[str, Tensor]:
    """A detached copy of θ (everything in the state_dict but the logits)."""
    arch = {"arch_gamma", "arch_alpha", "arch_beta"}
    return {k: v.detach().clone() for k, v in net.state_dict().items() if k not in arch}

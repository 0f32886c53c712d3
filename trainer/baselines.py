"""The paper's baselines and ablations (Sec. 4.1 "Competitive methods", Sec. 4.5 / Table 6) as
choices of masks and search space over the same central network, backbone and heads.

Baselines (no search, no reduction; every iteration trains θ with fixed binary masks):

``single-task``
    each task alone on its own copy of the backbone: K separate runs of one task each, every one
    a *chain* (input -> v_1 -> v_2 -> ... -> v_N -> read-out), the plain backbone.
``shared-bottom``
    all tasks on one chain: one shared encoder, task-specific heads (hard parameter sharing).

Ablations of Table 6 (each drops one component of the method; they combine):

``no-flow-restriction``
    the complete DAG: the flow constant M is raised to N - 1, so every i -> j (i < j) exists.
``no-read-in-out``
    the input feeds only v_1 and only v_N feeds the read-out: the read-in/read-out logits are
    fixed (A = e_1, B = e_N, σ saturated) and not searched, as a plain DAG network would be.
``no-fbr``
    no flow-based reduction: after the search every edge is kept (binary masks of ones, so the
    fine-tuned network is the whole central network, the paper's "never pruned" variant).
``no-squeeze``
    λ_sq = 0: no squeeze loss in the search.

A baseline's parameters are counted relative to one backbone (`parameter_ratio`), as the paper's
"#Params" column: 1.00 for shared-bottom, K for single-task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch

from dagc.costs import masked_parameters
from dagc.errors import ConfigError, SpecError
from dagc.spec import Spec

BASELINES = ("single-task", "shared-bottom")
ABLATIONS = ("no-flow-restriction", "no-read-in-out", "no-fbr", "no-squeeze")
# A baseline's iteration budget. "finetune": the paper's protocol (Sec. 4.1, "we train all
# baselines with the same number of fine-tuning iterations"), finetune_iters; "total": as many
# iterations as the whole search run (warmup + search + finetune), the reading that gives the
# baseline the most training. Both are offered and metrics.json records which one ran.
BASELINE_PROTOCOLS = ("finetune", "total")
# σ(±30) is 1 - 1e-13 and 1e-13: read-in/out weights that are 0/1 to float32 precision.
_SATURATED = 30.0


def chain_masks(spec: Spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plain backbone for every task: input -> v_1 -> ... -> v_N -> read-out.

    Takes a spec; returns 0/1 float32 masks of shapes (K, N, N), (K, N), (K, N) (closed and
    connected, ready for `CentralNetwork.set_masks`).
    """
    k, n = spec.n_tasks, spec.n_states
    gamma = np.zeros((k, n, n), np.float32)
    idx = np.arange(n - 1)
    gamma[:, idx, idx + 1] = 1.0
    alpha = np.zeros((k, n), np.float32)
    alpha[:, 0] = 1.0
    beta = np.zeros((k, n), np.float32)
    beta[:, n - 1] = 1.0
    return gamma, alpha, beta


def full_masks(spec: Spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every edge of the central network for every task (the ``no-fbr`` ablation): the band,
    all read-ins and all read-outs. Returns masks shaped as `chain_masks`."""
    k, n = spec.n_tasks, spec.n_states
    band = np.zeros((n, n), np.float32)
    for i, j in spec.hidden_edges():
        band[i, j] = 1.0
    return (np.broadcast_to(band, (k, n, n)).copy(), np.ones((k, n), np.float32), np.ones((k, n), np.float32))


def complete_dag(spec: Spec) -> Spec:
    """The ``no-flow-restriction`` search space: the same spec with M = N - 1 (every i < j)."""
    return replace(spec, flow_constant=max(1, spec.n_states - 1))


def fix_read_in_out(net: torch.nn.Module) -> None:
    """The ``no-read-in-out`` ablation: saturate the read-in logits to e_1 and the read-out
    logits to e_N for every task. The caller keeps them out of the search
    (`TrainConfig.frozen_logits`)."""
    with torch.no_grad():
        net.arch_alpha.fill_(-_SATURATED)
        net.arch_alpha[:, 0] = _SATURATED
        net.arch_beta.fill_(-_SATURATED)
        net.arch_beta[:, -1] = _SATURATED


def parameter_ratio(spec: Spec, tensors: Mapping[str, object]) -> float:
    """Parameters of a reduced network relative to one backbone.

    Counts (with the core's analytic counter, `dagc.costs.masked_parameters`) the parameters that
    every task's active edges and heads use (conv weights and batch-norm affine parameters; running
    statistics are buffers), each block once, and divides by the same count for the chain backbone
    of `chain_masks` with the same heads. Takes the spec and the checkpoint tensors (with masks);
    raises SpecError if they are not reduced.
    """
    if "mask.gamma" not in tensors:
        raise SpecError("parameter_ratio needs a reduced network (its checkpoint tensors have no masks)")
    masks = tuple(np.asarray(tensors[f"mask.{n}"], dtype=np.int64) for n in ("gamma", "alpha", "beta"))
    return masked_parameters(spec, *masks) / masked_parameters(spec, *chain_masks(spec))


def check_protocol(cfg) -> None:
    """Raise ConfigError naming the first invalid field among a `dagc.trainer.config.TrainConfig`'s
    baseline, baseline protocol and ablations (and what they exclude)."""
    if cfg.baseline is not None and cfg.baseline not in BASELINES:
        raise ConfigError(f"baseline must be one of {list(BASELINES)}, got {cfg.baseline!r}")
    if cfg.baseline_protocol not in BASELINE_PROTOCOLS:
        raise ConfigError(f"baseline_protocol must be one of {list(BASELINE_PROTOCOLS)}, "
                          f"got {cfg.baseline_protocol!r}")
    if not isinstance(cfg.ablations, tuple) or not all(isinstance(a, str) for a in cfg.ablations):
        raise ConfigError(f"ablations must be a list of names from {list(ABLATIONS)}, got {cfg.ablations!r}")
    bad = [a for a in cfg.ablations if a not in ABLATIONS]
    if bad:
        raise ConfigError(f"unknown ablation(s) {bad}; choose from {list(ABLATIONS)}")
    if len(set(cfg.ablations)) != len(cfg.ablations):
        raise ConfigError(f"ablations: name each at most once, got {list(cfg.ablations)}")
    if cfg.baseline is not None and cfg.ablations:
        raise ConfigError(f"baseline {cfg.baseline!r} has no search to ablate; drop the ablations "
                          f"{list(cfg.ablations)} or the baseline")
    if cfg.baseline is not None and (cfg.reduction != "fbr" or cfg.target_sparsity is not None):
        raise ConfigError(f"baseline {cfg.baseline!r} is not reduced; drop --reduction/--target-sparsity")
    if "no-fbr" in cfg.ablations and (cfg.reduction != "fbr" or cfg.target_sparsity is not None):
        raise ConfigError("ablation 'no-fbr' keeps every edge; drop --reduction/--target-sparsity")
    if "no-flow-restriction" in cfg.ablations and cfg.flow_constant is not None:
        raise ConfigError("ablation 'no-flow-restriction' searches the complete DAG (M = N - 1); "
                          "drop --flow-constant")

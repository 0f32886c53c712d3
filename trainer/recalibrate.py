"""Each task's batch-norm statistics once the structure is final (FORMAT.md, "Semantics").

    re-estimate   each task's running statistics, the cumulative average of its batch statistics
                  over batches of the training split, the network in its deployed (eval-mode)
                  structure                                                `reestimate_statistics`
    check         each task's eval-mode metric against its batch-statistics metric on a training
                  slice: a gap means the deployed model computes something training never saw
                                                                           `statistics_check`
    recalibrate   both for a checkpoint file, including a version-1 one (one set of statistics for
                  every task), written as a current checkpoint             `recalibrate_checkpoint`

Weight-sharing NAS systems re-estimate each sub-network's statistics the same way before they
evaluate it (a supernet's running statistics are a blend of every path's). Tasks are re-estimated
one after another, never stacked, so tasks whose active upstream is identical compute bit-identical
statistics and the compiler can compute their states once (it compares them before it does).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dagc.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from dagc.errors import CheckpointError, ConfigError, DataError
from dagc.spec import Spec
from dagc.trainer.batches import run_data
from dagc.trainer.batchnorm import batch_statistics, task_batchnorms
from dagc.trainer.config import TrainConfig
from dagc.trainer.data import Split
from dagc.trainer.evaluation import evaluate
from dagc.trainer.kinds import primary_metric
from dagc.trainer.network import CentralNetwork, network_from_checkpoint, network_tensors

__all__ = ["STATS_BATCHES", "STATS_TOLERANCE", "CHECK_SAMPLES", "statistics_batches", "reestimate_statistics",
           "statistics_check", "failed_checks", "recalibrate_checkpoint"]

STATS_BATCHES = TrainConfig.stats_batches  # batches of the training split the statistics average over
STATS_TOLERANCE = TrainConfig.stats_tolerance  # the gap of a primary metric that the check reports
CHECK_SAMPLES = 512  # training samples (per task) the check scores
# Batch statistics of a handful of samples are noisy on their own (and training saw them only as
# noise around the population's): the check's batches are at least this large.
CHECK_BATCH = 64


def statistics_batches(split: Split, spec: Spec, batch_size: int, n_batches: int, seed: int = 0,
                       device: torch.device | str = "cpu") -> Iterator[Tensor]:
    """``n_batches`` batches of ``split``'s inputs in a seeded order without repetition (the split
    is walked again only when it is smaller than ``n_batches * batch_size``). Shared input: each
    batch (B, C, H, W); per-task inputs: (K, B, C, H, W), each task's own samples. Raises DataError
    for a count or size below 1, or a task with fewer than 2 samples."""
    if n_batches < 1 or batch_size < 2:
        raise DataError(f"re-estimating statistics needs at least 1 batch of at least 2 samples, got "
                        f"{n_batches} of {batch_size}")
    rng = np.random.default_rng([seed, 0x57A75])
    names = spec.task_names[:1] if spec.shared_input else spec.task_names
    orders = {}
    for t in names:
        n = split.size(t)
        if n < 2:
            raise DataError(f"task {t!r} has {n} training sample(s); re-estimating statistics needs at least 2")
        reps = -(-n_batches * batch_size // n)
        orders[t] = np.concatenate([rng.permutation(n) for _ in range(reps)])
    for b in range(n_batches):
        take = slice(b * batch_size, (b + 1) * batch_size)
        if spec.shared_input:
            x = torch.from_numpy(np.ascontiguousarray(split.inputs[orders[names[0]][take]]))
        else:
            x = torch.stack([torch.from_numpy(np.ascontiguousarray(split.inputs[t][orders[t][take]]))
                             for t in names])
        yield x.to(device)


@torch.no_grad()
def reestimate_statistics(net: CentralNetwork, batches: Iterable[Tensor]) -> int:
    """Replace every task's batch-norm running statistics by the cumulative average of its batch
    statistics over ``batches`` (inputs as the network takes them), each task run on its own in the
    network's current structure (hard masks once reduced), dropout off. Affine parameters and
    weights are untouched; a task updates only the blocks it uses (the others keep zeros and ones,
    and nothing reads them). Takes the network and the batches; returns how many batches were
    used. Raises DataError when there are none. The network is left in eval mode."""
    bns = task_batchnorms(net)
    momenta = [bn.momentum for bn in bns]
    net.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    used = 0
    try:
        for x in batches:
            for k, t in enumerate(net.spec.task_names):
                net(x if net.spec.shared_input else x[k:k + 1], tasks=[t])
            used += 1
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
            bn.eval()
    if used == 0:
        raise DataError("no batches to re-estimate the batch-norm statistics on")
    return used


def _training_slice(split: Split, spec: Spec, n: int, seed: int) -> Split:
    """Up to ``n`` samples per task of ``split``, drawn at random (a file's order may be sorted by
    class, and batch statistics of one class are no one's)."""
    rng = np.random.default_rng([seed, 0xC4EC])

    def pick(size: int) -> np.ndarray:
        return np.sort(rng.choice(size, min(n, size), replace=False))

    if spec.shared_input:
        idx = pick(split.size(spec.task_names[0]))
        return Split(split.inputs[idx], {t: split.targets[t][idx] for t in spec.task_names})
    picks = {t: pick(split.size(t)) for t in spec.task_names}
    return Split({t: split.inputs[t][picks[t]] for t in spec.task_names},
                 {t: split.targets[t][picks[t]] for t in spec.task_names})


@torch.no_grad()
def statistics_check(net: CentralNetwork, split: Split, batch_size: int, *, tolerance: float = STATS_TOLERANCE,
                     samples: int = CHECK_SAMPLES, seed: int = 0,
                     device: torch.device | str = "cpu") -> dict[str, dict[str, Any]]:
    """Each task's primary metric on a slice of ``split`` (the training split) twice: in eval mode
    (running statistics, as deployed) and with each batch's own statistics (as in training, batches
    of ``batch_size`` or `CHECK_BATCH`, whichever is larger). Returns task -> {metric, eval,
    batch_statistics, gap, tolerance, ok}: the gap is the difference of a score in [0, 1] (the
    primary metrics where higher is better) and the difference relative to the batch-statistics
    value of an error. Raises DataError when a task has nothing to score."""
    part = _training_slice(split, net.spec, samples, seed)
    size = max(batch_size, CHECK_BATCH)
    deployed = evaluate(net, part, size, device)
    with batch_statistics(net):
        trained = evaluate(net, part, size, device)
    out = {}
    for t in net.spec.tasks:
        metric, higher_is_better = primary_metric(t.kind)
        e, b = float(deployed[t.name][metric]), float(trained[t.name][metric])
        gap = abs(e - b) if higher_is_better else abs(e - b) / max(abs(b), 1e-8)
        out[t.name] = {"metric": metric, "eval": e, "batch_statistics": b, "gap": gap, "tolerance": tolerance,
                       "ok": gap <= tolerance}
    return out


def failed_checks(check: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per task of a `statistics_check` result whose gap exceeds its tolerance."""
    return [f"task {t!r}: {c['metric']} {c['eval']:.4g} with running statistics (deployed) but "
            f"{c['batch_statistics']:.4g} with batch statistics (as trained), a gap of {c['gap']:.3g} "
            f"(tolerance {c['tolerance']:.3g}); re-estimate with more --stats-batches, or look for a "
            "data or model problem" for t, c in check.items() if not c["ok"]]


def recalibrate_checkpoint(path: str | os.PathLike, out: str | os.PathLike, *, data_root: str | None = None,
                           batches: int = STATS_BATCHES, batch_size: int | None = None,
                           device: str = "cpu") -> dict[str, Any]:
    """Re-estimate each task's batch-norm statistics of a checkpoint (the current format, or a
    version-1 one, migrated) on the training split of the data it was trained on, check them
    (`statistics_check`) and write the result atomically to ``out`` (a new file; ``path`` itself is
    never replaced). Takes the checkpoint, the output path, ``data_root`` for an on-disk dataset,
    the number of batches and their size (default: the run's). Returns {"batches", "migrated_from",
    "check"}. Raises CheckpointError (unreadable checkpoint, or ``out`` exists or is ``path``),
    ConfigError / DataError (the data cannot be rebuilt)."""
    src, dst = Path(path), Path(out)
    if dst.exists() or dst.is_symlink() or (src.exists() and os.path.realpath(dst) == os.path.realpath(src)):
        raise CheckpointError(f"{dst} exists; give a new --out path (dagc recalibrate never replaces a file)")
    if not dst.parent.is_dir():
        raise CheckpointError(f"{dst.parent} is not a directory; create it or give another --out")
    ck = load_checkpoint(src, migrate=True)
    if ck.meta.get("progress") is not None:
        raise CheckpointError(f"{src} is a run's resumable state, not a checkpoint; recalibrate the run's "
                              "checkpoint.safetensors")
    data = run_data(ck, data_root)
    cfg = ck.json("config", {}) or {}
    size = batch_size if batch_size is not None else int(cfg.get("batch_size", 16))
    if size < 2:
        raise ConfigError(f"--batch-size must be at least 2, got {size}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    net = network_from_checkpoint(ck).to(device)
    used = reestimate_statistics(net, statistics_batches(data.train, ck.spec, size, batches,
                                                         int(cfg.get("seed", 0)), device))
    check = statistics_check(net, data.train, size, device=device)
    final = evaluate(net, data.test, device=device)
    save_checkpoint(dst, network_tensors(net), ck.spec, ck.stage, **_metadata(ck, check, final))
    return {"batches": used, "migrated_from": ck.migrated_from, "check": check, "final": final}


def _metadata(ck: Checkpoint, check: Mapping[str, Any], final: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's own metadata (decoded) with the held-out metrics of the new statistics as
    ``final`` (the old ones kept as ``final_before_recalibration``) and the statistics check."""
    meta = {}
    for k in ck.meta:
        try:
            meta[k] = ck.json(k)
        except CheckpointError:
            continue
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    if "final" in metrics:
        metrics["final_before_recalibration"] = metrics["final"]
    meta["metrics"] = {**metrics, "final": dict(final), "statistics_check": dict(check)}
    return meta

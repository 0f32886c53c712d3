"""The one training loop: a stage of a run, from where it stands to its last iteration.

`dagc train` (`dagc.trainer.train`) runs it for every stage; the reduction study
(``benchmarks/reduction_study.py``) calls it too, so that both train exactly alike.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dagc.errors import ConfigError
from dagc.trainer import distributed
from dagc.trainer.batches import batch_at
from dagc.trainer.budget import SHARED, loss_costs
from dagc.trainer.datasets import MultiTaskData
from dagc.trainer.network import CentralNetwork, network_tensors
from dagc.trainer.recalibrate import reestimate_statistics, statistics_batches
from dagc.trainer.recipes import lr_factor
from dagc.trainer.stages import finetune_step, search_step, warmup_step
from dagc.trainer.state import Run

log = logging.getLogger("dagc.train")


def run_stage(run: Run, data: MultiTaskData, device: torch.device, *, save: Callable[[Run], None] | None = None,
              progress: bool = False, on_step: Callable[[Run], None] | None = None,
              validate: Callable[[Run], None] | None = None) -> None:
    """Train ``run.stage`` from ``run.step`` to its last iteration (`TrainConfig.iters`), in place,
    or until early stopping sets ``run.validation.stopped_early_at``.

    Takes the run, its data and device; ``save`` writes the resumable state every
    ``cfg.save_every`` iterations (None: never); ``progress`` shows a bar; ``on_step`` is called
    after every iteration; ``validate`` too, before the state is saved (early stopping,
    `dagc.trainer.validation.early_stopping`: it may end the stage). Losses are logged (and kept
    in ``run.history``) every ``cfg.log_every`` iterations and at the stage end. Under torchrun
    every rank runs it on its own batch slice; at the end all ranks hold the same model
    (`sync_replicas`). Raises ConfigError if a loss becomes non-finite.
    """
    cfg, stage = run.cfg, run.stage
    rank, world = distributed.rank(), distributed.world_size()
    model = training_model(run.net, device, cfg.compile)
    n_iters = cfg.iters(stage)
    bar = _progress(stage, n_iters, run.step, progress and distributed.is_main())
    t0 = time.perf_counter()
    acc: dict[str, float] = {}
    n_acc = 0  # iterations in acc (after a resume, not necessarily log_every)
    try:
        while run.step < n_iters and run.validation.stopped_early_at is None:
            x, targets = batch_at(data.train, run.spec, cfg.batch_size, cfg.seed, stage, run.step, device,
                                  rank=rank, world=world)
            # θ is the optimizer's first group (`make_optimizer`); a pure function of the step, so a
            # resumed run follows the same schedule.
            run.opt.param_groups[0]["lr"] = cfg.weight_lr * lr_factor(cfg.lr_schedule, stage, run.step, n_iters)
            losses = stage_step(run, model, x, targets)
            run.step += 1
            for k, v in losses.items():
                acc[k] = acc.get(k, 0.0) + v
            n_acc += 1
            if validate is not None:
                validate(run)
            last = run.step == n_iters or run.validation.stopped_early_at is not None
            if run.step % cfg.log_every == 0 or last:
                entry = {"step": run.step, **{k: v / n_acc for k, v in acc.items()}}
                run.history.setdefault(stage, []).append(entry)
                log.info("%s %s", stage, json.dumps(entry))
                acc, n_acc = {}, 0
                if bar is not None:
                    bar.set_postfix(loss=f"{entry['loss']:.4f}")
            if bar is not None:
                bar.update(1)
            if save is not None and run.step % cfg.save_every == 0 and not last:
                run.seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                save(run)
            if on_step is not None:
                on_step(run)
    finally:
        if bar is not None:
            bar.close()
    run.seconds += time.perf_counter() - t0
    sync_replicas(run)


def settle_statistics(run: Run, data: MultiTaskData, device: torch.device) -> None:
    """After the last stage: each task's batch-norm statistics re-estimated in its final structure
    over ``cfg.stats_batches`` training batches (`reestimate_statistics`; none when 0), on every
    rank alike (the same batches, not sharded), then rank 0's for certain (`sync_replicas`)."""
    cfg = run.cfg
    if cfg.stats_batches:
        reestimate_statistics(run.net, statistics_batches(data.train, run.spec, cfg.batch_size, cfg.stats_batches,
                                                          cfg.seed, device))
        sync_replicas(run)


def stage_step(run: Run, model: Callable, x: Tensor, targets: dict[str, Tensor]) -> dict[str, float]:
    """One iteration of the run's stage; returns the global batch's losses (the mean over ranks,
    so every rank logs and checks the same). Raises ConfigError for a non-finite loss."""
    cfg, stage = run.cfg, run.stage
    if cfg.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    kw = {"model": model, "precision": run.precision}
    if stage == "search":
        kappa = cfg.squeeze_budget(run.spec.n_states)
        costs = None if cfg.budget is None else loss_costs(run.spec, cfg.budget_value, x.device, run.cost_table,
                                                           cfg.budget_scope)  # cached
        losses = search_step(run.net, run.opt, x, targets, cfg.search_squeeze_weight, kappa, cfg.dense_loss, costs=costs,
                             select_weight=cfg.search_select_weight(run.step), shared=cfg.budget_scope == SHARED, **kw)
    elif stage == "warmup":
        losses = warmup_step(run.net, run.opt, x, targets, cfg.dense_loss, **kw)
    else:
        losses = finetune_step(run.net, run.opt, x, targets, cfg.dense_loss, **kw)
    losses = distributed.all_reduce_mean(losses)
    if not math.isfinite(losses["loss"]):
        raise ConfigError(f"{stage} loss became {losses['loss']} at step {run.step}; lower the learning rates")
    return losses


def training_model(net: CentralNetwork, device: torch.device, use_compile: bool) -> Callable:
    """The callable that runs a stage's forward pass: ``net`` itself for one process; under
    torchrun a DistributedDataParallel replica of it, built anew at every stage start because DDP
    registers the parameters that need gradients when it is built (`make_optimizer` switches the
    logits on for search only); after reduction, edges that a task switches off get no gradient,
    hence ``find_unused_parameters`` in fine-tuning. ``use_compile`` wraps the result in
    torch.compile."""
    model = net
    if distributed.world_size() > 1:
        model = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None,
                                        find_unused_parameters=net.hard)
    if use_compile:
        model = torch.compile(model)
    return model


def sync_replicas(run: Run) -> None:
    """Make every rank hold the same model at a stage end (no-op for one process).

    Batch-norm running statistics legitimately differ (each rank updates them from its own
    shard): rank 0's are broadcast. Parameters, logits and masks must already agree (averaged
    gradients, deterministic updates); the ranks compare digests, and a mismatch is logged and
    repaired from rank 0 so that reduction and the saved model never depend on the rank.
    """
    if distributed.world_size() == 1:
        return
    distributed.broadcast_tensors(list(run.net.buffers()))
    mine = bytes.fromhex(distributed.tensor_digest(network_tensors(run.net)))
    digests = [d.hex() for d in distributed.all_gather_bytes(mine)]
    run.replica_digests = digests
    if len(set(digests)) > 1:
        log.warning("%s: the replicas' parameters differ across ranks (digests %s); continuing with rank 0's",
                    run.stage, digests)
        distributed.broadcast_tensors(list(run.net.parameters()))
        run.resynced.append(run.stage)


def _progress(stage: str, total: int, initial: int, enabled: bool):
    """A tqdm bar for a stage, or None when disabled."""
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, desc=f"{stage:>8}", unit="it", dynamic_ncols=True, leave=True)

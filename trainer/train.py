"""`dagc train`: the whole search of one run — warm-up, search, reduction, rewind, fine-tune —
with resumable checkpoints, held-out evaluation and a metrics report.

A run directory holds:
    state.safetensors       resumable training state (model, optimizer, rewind snapshot, progress),
                            rewritten atomically every `save_every` iterations and at stage ends
    warmup.safetensors      the model at the end of warm-up
    search.safetensors      the searched supernet (soft, before reduction)
    checkpoint.safetensors  the final reduced and fine-tuned model (the compiler's input)
    metrics.json            losses per stage, held-out metrics, constant baselines, topology,
                            the batch-norm statistics check, the validation slice's metrics after
                            each stage (`dagc.trainer.report`, `dagc.trainer.validation`)
    train.log               a line per logged iteration

The pieces, in the order a run uses them: `dagc.trainer.config` (TrainConfig), `.batches` (data,
spec, batches), `.state` (the run's state, its stage transitions, saving and resuming), `.loop`
(the one training loop of a stage), `.validation` (the validation slice's metrics after each
stage, early stopping of fine-tuning), `.evaluation` and `.report` (held-out metrics and
metrics.json); `.single_task` trains the single-task baseline as one run per task.

Under torchrun (``torchrun --nproc-per-node N -m dagc train ...``) every process trains one
DistributedDataParallel replica (`dagc.trainer.distributed`): each rank takes its own slice of
every batch (``batch_size`` is per process; the global batch is ``batch_size * world size``),
gradients are averaged over ranks, and only rank 0 writes the run directory. Batch norm uses each
rank's own batch statistics (no SyncBatchNorm: a lane's statistics come from that rank's shard);
its running statistics are rank 0's: DDP broadcasts buffers from rank 0 before every forward and
every stage end broadcasts them once more, so all ranks save, evaluate and reduce the same model.
At every stage end the ranks also compare a digest of their parameters, logits and masks; a
mismatch (which would be a bug) is logged and repaired by broadcasting rank 0's values, so the
ranks can never drift apart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from dagc.checkpoint import save_checkpoint
from dagc.cost_table import CostTable, Measure
from dagc.errors import CheckpointError, ConfigError
from dagc.trainer import distributed, single_task
from dagc.trainer.batches import build_spec, load_data, split_validation, training_size
from dagc.trainer.budget import SHARED, cost_table_for, shared_budget, task_budgets
from dagc.trainer.config import TrainConfig
from dagc.trainer.datasets import MultiTaskData, Split
from dagc.trainer.estimate import estimate_seconds, format_estimate
from dagc.trainer.evaluation import constant_baselines, evaluate
from dagc.trainer.init_weights import report_lines
from dagc.trainer.loop import run_stage, settle_statistics
from dagc.trainer.network import network_tensors
from dagc.trainer.recalibrate import failed_checks, statistics_check
from dagc.trainer.report import METRICS_FILE, run_metrics, write_json
from dagc.trainer.state import (
    STATE_FILE,
    Run,
    advance,
    new_run,
    reduce_and_rewind,
    resume_hint,
    resume_run,
    save_state,
    training_device,
    writable_dir,
)
from dagc.trainer.validation import early_stopping, score_reduced, score_stage, validation_report

__all__ = ["TrainConfig", "train"]
log = logging.getLogger("dagc.train")


def _log_start(run: Run, resume: bool) -> None:
    cfg = run.cfg
    log.info("run %s: %s", "resumed" if resume else "started", json.dumps(cfg.to_dict()))
    if run.cost_table is not None:
        log.info("budget %s priced on %s (cost table sha256 %s)", cfg.budget, run.cost_table.key,
                 run.cost_table.digest[:16])
    if run.init_report is not None and not resume:
        for line in report_lines(run.init_report):
            log.info("%s", line)
    if distributed.world_size() > 1:
        log.info("distributed: %d processes, backend %s, batch_size %d per process",
                 distributed.world_size(), distributed.backend(), cfg.batch_size)


# Long on purpose: the whole run, stage by stage, in the order it happens, like a training script.
def train(cfg: TrainConfig | None, out_dir: str | os.PathLike, *, resume: bool = False,
          progress: bool = True, on_step: Callable[[Run], None] | None = None,
          announce: Callable[[str], None] | None = None, measure_costs: Measure | None = None) -> dict[str, Any]:
    """Run (or resume) the three-stage search and write the run directory.

    Takes: the configuration (when resuming, only its device is used: the run's own configuration
    holds), the run directory, ``resume`` to continue ``out_dir/state.safetensors``, ``progress``
    for progress bars, an optional callback after every iteration (tests use it to interrupt), and
    ``announce``, which (when given) first times a few iterations of every stage on a copy of the
    network (`dagc.trainer.estimate`) and is called with the expected wall time, one line.
    ``measure_costs`` measures a cost table (`dagc.cost_table.Measure`; the compiler's
    `dagc.compiler.measure.measure_table`, which the trainer does not import) when a latency budget
    finds none in the cache (`dagc.cost_table.cached_table`); without it such a run needs a cached table.
    Returns the metrics written to metrics.json.
    Raises ConfigError (bad configuration or unwritable directory), DataError, CheckpointError,
    CostTableError (a latency budget's table cannot be had).

    Under torchrun (more than one process; `dagc.trainer.distributed`) every rank calls this with
    the same arguments: it joins the process group unless already joined (`distributed.init`),
    trains a DistributedDataParallel replica on its slice of each batch, and only rank 0 writes
    files, logs and shows progress. Every rank returns rank 0's metrics, which then also hold
    ``distributed``: world size, backend, and each rank's digest of its final tensors
    (`distributed.tensor_digest` of `network_tensors`; equal on all ranks, and equal to the digest
    of checkpoint.safetensors). ``--resume`` reads ``out_dir`` on every rank (on several nodes it
    must be on a shared filesystem or copied to each).
    """
    out = Path(out_dir)
    main = distributed.is_main()  # only rank 0 writes files
    if single_task.applies(cfg, out, resume):  # one run per task, each trained by this function
        return single_task.train_each_task(cfg, out, resume=resume,
                                           train_run=partial(train, progress=progress, on_step=on_step,
                                                             announce=announce, measure_costs=measure_costs))

    # The configuration: a new run's, or the interrupted run's own (only the device may change).
    run: Run | None = None
    if resume:
        run = _resumed(out, cfg)
        cfg = run.cfg
    else:
        _check_new(out, cfg)
    device = training_device(cfg.device)

    # The data, and the network that fits it; the validation slice out of the training split.
    data, val = split_validation(load_data(cfg), cfg.val_fraction, cfg.seed)
    if run is None:  # the recipe's epochs become iterations for this (reduced) training split
        cfg = cfg.resolved(training_size(data))
    spec = build_spec(cfg, data)
    table = None
    if cfg.budget is not None and run is None:  # before anything is written: the table, and a head alone may not fit
        table = cost_table_for(spec, cfg.cost_target, cfg.cost_batch, cfg.cost_threads, measure_costs)
        (shared_budget if cfg.budget_scope == SHARED else task_budgets)(spec, cfg.budget_value, table)
    if run is None:  # before anything is written: --init may refuse its file
        run = new_run(cfg, spec, device)
        run.cost_table = table
    elif run.spec != spec:
        raise CheckpointError(f"{out}/{STATE_FILE} does not match its own configuration's spec")
    if main:  # on one filesystem, two probes would race
        writable_dir(out)

    distributed.init(device)
    if run.cost_table is not None and distributed.world_size() > 1:  # every rank prices with rank 0's measurement
        run.cost_table = CostTable.from_dict(distributed.broadcast_json(run.cost_table.to_dict()))
    with _train_log(out, main):
        _log_start(run, resume)
        save = partial(save_state, out=out) if main else None
        if announce is not None:
            line = format_estimate(estimate_seconds(run, data, device), run)
            log.info("%s", line)
            if main:
                announce(line)

        # The stages, each from where the run stands: reduce (scored on the validation slice) and
        # rewind before fine-tuning, then the loop (fine-tuning's may stop early), then the stage's
        # validation scores and checkpoint (fine-tuning's are the final ones, below).
        while run.stage != "done":
            if run.stage == "finetune" and not run.net.hard:
                reduce_and_rewind(run, score_reduced(data, val, device))
                log.info("reduced: %s", json.dumps(run.topology))
                if save is not None:
                    save(run)
            validate = early_stopping(run, data, val, device) if run.stage == "finetune" else None
            run_stage(run, data, device, save=save, progress=progress, on_step=on_step, validate=validate)
            if run.stage != "finetune":
                score_stage(run, val, run.stage, device)
            if main and run.stage != "finetune":
                save_checkpoint(out / f"{run.stage}.safetensors", network_tensors(run.net), run.spec, run.stage,
                                then=resume_hint(out), config=cfg.to_dict(), **_table_meta(run))
            advance(run)
            if save is not None:
                save(run)

        settle_statistics(run, data, device)  # each task's batch-norm statistics in its final structure
        score_stage(run, val, "finetune", device)
        metrics = _finish(run, data, val, out, device)
        log.info("run finished: %s", json.dumps(metrics["final"]))
        return metrics


def _check_new(out: Path, cfg: TrainConfig | None) -> None:
    """Check that a new run with ``cfg`` can start in ``out``; ConfigError if not."""
    if cfg is None:
        raise ConfigError("a configuration is needed to start a run")
    if (out / STATE_FILE).exists():
        raise ConfigError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")


def _resumed(out: Path, cfg: TrainConfig | None) -> Run:
    """The interrupted run in ``out``, on ``cfg``'s device if given; CheckpointError if none."""
    if not out.is_dir():
        raise CheckpointError(f"{out} is not a run directory; give the --out of an earlier dagc train")
    return resume_run(out, device=cfg.device if cfg is not None else None)


class _LogFile(logging.FileHandler):
    """train.log. A line it cannot write (a full device) is lost quietly, not printed with a
    traceback: the next checkpoint write fails with one line and the run resumes from its state."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


@contextlib.contextmanager
def _train_log(out: Path, main: bool) -> Iterator[None]:
    """Log the run to ``out/train.log`` (rank 0 only) for the duration of the block."""
    handler = None
    if main:
        handler = _LogFile(out / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _table_meta(run: Run) -> dict[str, Any]:
    """A checkpoint's ``cost_table`` metadata: the table a budget priced blocks with (none without)."""
    return {} if run.cost_table is None else {"cost_table": run.cost_table.to_dict()}


def _finish(run: Run, data: MultiTaskData, val: Split | None, out: Path, device: torch.device) -> dict[str, Any]:
    """Evaluate the fine-tuned model on the test split (the one place that reads it), write
    checkpoint.safetensors and metrics.json (rank 0) and return the metrics (rank 0's, on every
    rank)."""
    if not distributed.is_main():  # rank 0 evaluates and writes; the others wait for its metrics
        return distributed.broadcast_json(None)
    check = statistics_check(run.net, data.train, run.cfg.batch_size, tolerance=run.cfg.stats_tolerance,
                             seed=run.cfg.seed, device=device)
    for line in failed_checks(check):
        log.warning("batch-norm statistics: %s", line)
    final = evaluate(run.net, data.test, device=device)
    validation = validation_report(run, val)
    metrics = {**run_metrics(run, data, final, constant_baselines(run.spec, data)), "statistics_check": check,
               **validation}
    save_checkpoint(out / "checkpoint.safetensors", network_tensors(run.net), run.spec, "finetune",
                    then=resume_hint(out), config=run.cfg.to_dict(), metrics={"final": final, "topology": run.topology, "statistics_check": check,
                                                       "validation": validation["validation"]},
                    preprocessing=data.preprocessing, **_table_meta(run))
    write_json(out / METRICS_FILE, metrics, then=resume_hint(out))
    return distributed.broadcast_json(metrics)

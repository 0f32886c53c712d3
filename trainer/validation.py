"""Per-stage metrics on a validation slice of the training split, and early stopping of
fine-tuning on them (``TrainConfig.val_fraction``, ``patience``, ``val_every``).

The slice (`dagc.trainer.batches.split_validation`) is never in a training batch, and the test
split is read by the final report alone. It is scored, the network in eval mode (`evaluate`):

    warmup    the soft supernet at the end of warm-up
    search    the soft supernet under its searched Γ/A/B
    reduced   the reduced hard network with the searched θ, before rewinding
    finetune  the final network, its statistics settled

so a user sees where accuracy is gained or lost. The scores live in the run's state
(`dagc.trainer.state.Validation`), so a resumed run keeps them. Under torchrun rank 0 scores and
broadcasts: every rank records the same numbers and stops at the same step.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from dagc.trainer import distributed
from dagc.trainer.datasets import MultiTaskData, Split
from dagc.trainer.evaluation import evaluate
from dagc.trainer.kinds import kind_training
from dagc.trainer.loop import settle_statistics
from dagc.trainer.state import VALIDATION_STAGES, Run

__all__ = ["score_stage", "score_reduced", "early_stopping", "improvement", "validation_interval",
           "validation_report", "stage_lines", "MIN_IMPROVEMENT"]

log = logging.getLogger("dagc.train")
# The mean relative change of the tasks' primary metrics that counts as an improvement: less is
# noise of a small slice, not progress.
MIN_IMPROVEMENT = 1e-3


def _scores(run: Run, val: Split, device: torch.device) -> dict[str, dict[str, float]]:
    """Every task's metrics on ``val``, scored by rank 0 and the same on every rank."""
    scores = evaluate(run.net, val, device=device) if distributed.is_main() else None
    return distributed.broadcast_json(scores)


def score_stage(run: Run, val: Split | None, stage: str, device: torch.device) -> None:
    """Score ``val`` after ``stage`` (one of `VALIDATION_STAGES`) and record and log it in
    ``run.validation``; nothing without a slice (``val`` None). Raises DataError when a task has
    nothing valid to score."""
    if val is None:
        return
    run.validation.stages[stage] = _scores(run, val, device)
    log.info("validation after %s: %s", stage, json.dumps(run.validation.stages[stage]))


def score_reduced(data: MultiTaskData, val: Split | None, device: torch.device) -> Callable[[Run], None] | None:
    """The callback of `dagc.trainer.state.reduce_and_rewind` that scores the reduced network with
    the searched θ (None without a slice). Each task's batch-norm statistics are first
    re-estimated for its reduced structure (`settle_statistics`; the supernet's are a blend of
    every path's): harmless, since rewinding then reloads θ and the statistics from the warm-up
    snapshot."""
    if val is None:
        return None

    def on_reduced(run: Run) -> None:
        settle_statistics(run, data, device)
        score_stage(run, val, "reduced", device)

    return on_reduced


def improvement(scores: Mapping[str, Mapping[str, float]], best: Mapping[str, float], tasks: Sequence) -> float:
    """The mean over ``tasks`` (`TaskSpec`) of the signed relative change of each task's primary
    metric in ``scores`` against its value in ``best``: positive when better (higher or lower,
    as the task's kind says)."""
    changes = []
    for t in tasks:
        kind = kind_training(t)
        new, old = scores[t.name][kind.primary], best[t.name]
        sign = 1.0 if kind.higher_is_better else -1.0
        changes.append(sign * (new - old) / max(abs(old), 1e-8))
    return sum(changes) / len(changes)


def validation_interval(run: Run, train: Split) -> int:
    """Fine-tune iterations between validation evaluations: ``cfg.val_every``, else one epoch of
    the largest task's training split in global batches (at least 1)."""
    cfg = run.cfg
    if cfg.val_every is not None:
        return cfg.val_every
    n = max(train.size(t) for t in run.spec.task_names)
    return max(1, math.ceil(n / (cfg.batch_size * distributed.world_size())))


def early_stopping(run: Run, data: MultiTaskData, val: Split | None,
                   device: torch.device) -> Callable[[Run], None] | None:
    """The ``validate`` callback of `dagc.trainer.loop.run_stage` in fine-tuning: every
    `validation_interval` iterations it scores ``val``; after ``cfg.patience`` scores without an
    `improvement` of more than `MIN_IMPROVEMENT` over each task's best so far it sets
    ``run.validation.stopped_early_at``, which ends the stage. None without a slice or patience.

    The final model is the one at the stop, not the best one seen: the slice is small and its best
    score partly luck, and restoring would need a second θ (with its statistics) in the resumable
    state. (Under the cosine schedule an early stop also ends before the rate has decayed.) The best scores and the count since the last improvement are in the state,
    so a resumed run stops where an uninterrupted one would."""
    if val is None or run.cfg.patience == 0:
        return None
    every = validation_interval(run, data.train)

    def check(run: Run) -> None:
        if run.step % every:
            return
        scores = _scores(run, val, device)
        state = run.validation
        primary = {t.name: scores[t.name][kind_training(t).primary] for t in run.spec.tasks}
        if state.best is None or improvement(scores, state.best, run.spec.tasks) > MIN_IMPROVEMENT:
            state.stale = 0
        else:
            state.stale += 1
        state.best = primary if state.best is None else {
            t.name: (max if kind_training(t).higher_is_better else min)(state.best[t.name], primary[t.name])
            for t in run.spec.tasks}
        log.info("finetune validation at step %d: %s (%d without improvement)", run.step, json.dumps(primary),
                 state.stale)
        if state.stale >= run.cfg.patience:
            state.stopped_early_at = run.step
            log.info("fine-tuning stopped early at step %d: no validation improvement in %d evaluations",
                     run.step, state.stale)

    return check


def validation_report(run: Run, val: Split | None) -> dict[str, Any]:
    """The keys of metrics.json that report the slice (`dagc.trainer.report`): ``validation``
    (stage -> task -> metric -> value; empty without a slice), ``validation_samples`` (per task;
    empty without a slice) and ``stopped_early_at`` (the fine-tuning step, or None)."""
    samples = {} if val is None else {t: val.size(t) for t in run.spec.task_names}
    stages = {s: run.validation.stages[s] for s in VALIDATION_STAGES if s in run.validation.stages}
    return {"validation": stages, "validation_samples": samples,
            "stopped_early_at": run.validation.stopped_early_at}


def stage_lines(validation: Any, primary: Mapping[str, str]) -> list[str]:
    """A compact table of the stage metrics (``validation`` as in metrics.json, stage -> task ->
    metric -> value): a header, then one line per stage with each task's primary metric
    (``primary``: task -> metric name), ``-`` where one is missing or malformed (the table also
    shows what a checkpoint file claims). No lines when there are no stage metrics."""
    if not isinstance(validation, Mapping) or not validation:
        return []
    heads = {t: f"{t} {m}" for t, m in primary.items()}
    widths = {t: max(10, len(h) + 2) for t, h in heads.items()}
    lines = ["validation (a slice of the training split) after each stage:",
             f"  {'stage':<10}" + "".join(f"{heads[t]:>{widths[t]}}" for t in primary)]
    for stage in VALIDATION_STAGES:
        if stage in validation:
            cells = [_cell(validation, stage, t, m, widths[t]) for t, m in primary.items()]
            lines.append(f"  {stage:<10}" + "".join(cells))
    return lines


def _cell(validation: Mapping, stage: str, task: str, metric: str, width: int) -> str:
    """One value of the `stage_lines` table, right-aligned in ``width``; ``-`` if absent."""
    try:
        value = validation[stage][task][metric]
    except (KeyError, TypeError, IndexError):
        value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{'-':>{width}}"
    return f"{value:>{width}.4f}"

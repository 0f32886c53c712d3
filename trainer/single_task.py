"""The single-task baseline (``--baseline single-task``): one run of one task each, in
``RUN_DIR/<task>/``, then one aggregate ``metrics.json`` in ``RUN_DIR`` (the tasks' metrics side
by side; parameters add up). ``RUN_DIR/single_task.json`` holds the baseline's configuration, so
that resuming finishes the unfinished task runs and skips the finished ones."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from dagc.errors import CheckpointError, ConfigError
from dagc.trainer import datasets, distributed
from dagc.trainer.config import TrainConfig
from dagc.trainer.report import METRICS_FILE, single_task_metrics, write_json
from dagc.trainer.state import STATE_FILE, writable_dir

SINGLE_TASK_FILE = "single_task.json"
# Trains or resumes one run, called as ``train_run(config, run_dir, resume=...)``; returns its metrics.
TrainRun = Callable[..., dict[str, Any]]


def applies(cfg: TrainConfig | None, out: Path, resume: bool) -> bool:
    """Whether a `dagc.trainer.train.train` call is the single-task baseline of several tasks: a
    new run so configured, or the resumption of one (its directory holds `SINGLE_TASK_FILE`). With
    one task the baseline is a plain run."""
    if resume:
        return (out / SINGLE_TASK_FILE).is_file()
    if cfg is None or cfg.baseline != "single-task":
        return False
    return len(cfg.tasks or datasets.task_names(cfg.dataset, cfg.data_root)) > 1


def train_each_task(cfg: TrainConfig | None, out: Path, *, resume: bool, train_run: TrainRun) -> dict[str, Any]:
    """Train (or resume) the single-task baseline in ``out``: ``train_run`` trains each task's run
    (`dagc.trainer.train.train`). Takes the configuration (when resuming, only its device is used),
    the directory and ``resume``. Returns the aggregate metrics written to ``out/metrics.json``.
    Raises ConfigError for a directory that already holds a run, CheckpointError for an
    unreadable `SINGLE_TASK_FILE`."""
    cfg = _resumed_config(out, cfg) if resume else _start(cfg, out)
    runs: dict[str, dict[str, Any]] = {}
    for task in cfg.tasks or datasets.task_names(cfg.dataset, cfg.data_root):
        sub = out / task  # task names are letters, digits, '_' and '-' (the spec checks)
        if (sub / METRICS_FILE).is_file():
            runs[task] = json.loads((sub / METRICS_FILE).read_text())
        else:
            runs[task] = train_run(replace(cfg, tasks=(task,)), sub, resume=(sub / STATE_FILE).is_file())
    metrics = single_task_metrics(cfg, runs)
    if distributed.is_main():
        write_json(out / METRICS_FILE, metrics)
    return metrics


def _start(cfg: TrainConfig, out: Path) -> TrainConfig:
    """Record a new baseline's configuration in ``out``; ConfigError if ``out`` holds a run."""
    if (out / SINGLE_TASK_FILE).exists() or (out / STATE_FILE).exists():
        raise ConfigError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
    if distributed.is_main():
        writable_dir(out)
        write_json(out / SINGLE_TASK_FILE, {"config": cfg.to_dict()}, sort_keys=False)
    return cfg


def _resumed_config(out: Path, given: TrainConfig | None) -> TrainConfig:
    """The baseline's own configuration, on ``given``'s device if given."""
    try:
        cfg = TrainConfig.from_stored(json.loads((out / SINGLE_TASK_FILE).read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{out / SINGLE_TASK_FILE} is unreadable ({e}); start the baseline again "
                              "with another --out") from None
    return replace(cfg, device=given.device) if given is not None else cfg


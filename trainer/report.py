"""``metrics.json``: the report of a finished run, its schema defined once (`metrics`).

Keys: ``config`` (the `TrainConfig`), ``spec`` (the network spec; for the single-task baseline
only ``tasks``), ``final`` (held-out metrics, task -> metric -> value), ``constant_baseline`` (the
same for each task's best constant predictor), ``primary`` (per task: the kind's primary metric,
whether higher is better, the model's and the constant's value), ``topology`` (per task D, W, S
of the reduced network; None or empty for a baseline), ``parameters`` (``supernet``: θ's size;
``relative_to_backbone``: the deployed parameters over one backbone's), ``train_seconds``,
``decisiveness`` (per task, how decisively the search chose its structure,
`dagc.trainer.decisiveness`; None for a baseline, which does not search), ``baseline_protocol``
(a baseline's iteration budget: ``finetune`` or ``total``; None for a search); then
per run ``losses`` (per stage, one entry per logged iteration), ``init`` (what ``--init`` loaded
and left at its initial value, `dagc.trainer.init_weights.apply_init`; None without it),
``test_samples`` (per task), ``statistics_check`` (per task, eval-mode against batch-statistics
metric on a training slice, `dagc.trainer.recalibrate.statistics_check`), ``validation`` (stage ->
task -> metric -> value on the validation slice of the training split, `dagc.trainer.validation`;
the stages warmup, search, reduced and finetune that the run has: a baseline has finetune only;
empty with ``val_fraction`` 0), ``validation_samples`` (per task; empty without a slice) and
``stopped_early_at`` (the fine-tuning step early stopping ended at, else None), with a budget
``budget`` (the reduced models' cost against it, `dagc.trainer.budget.budget_outcome`),
under torchrun ``distributed`` (world size, backend, global batch size, each rank's digest, the
stages whose end found the ranks apart); for the single-task baseline ``runs`` (task -> its run
directory under the baseline's) and ``validation`` (its runs', stage -> task -> metrics).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dagc.errors import ConfigError
from dagc.spec import TaskSpec
from dagc.trainer import distributed
from dagc.trainer.baselines import parameter_ratio
from dagc.trainer.budget import budget_outcome
from dagc.trainer.config import TrainConfig
from dagc.trainer.datasets import MultiTaskData
from dagc.trainer.decisiveness import network_decisiveness
from dagc.trainer.kinds import kind_training
from dagc.trainer.network import count_parameters, network_tensors
from dagc.trainer.state import Run
from dagc.writing import write_atomic

METRICS_FILE = "metrics.json"
Scores = Mapping[str, Mapping[str, float]]  # task -> metric -> value


def metrics(cfg: TrainConfig, spec: dict[str, Any], tasks: Sequence[TaskSpec], final: Scores, constant: Scores,
            topology: Any, parameters: dict[str, float], seconds: float, decisiveness: Any = None,
            **extra: Any) -> dict[str, Any]:
    """The report of a run (see the module doc for the keys); ``extra`` adds the keys that only
    some runs have. Takes the configuration, the spec as JSON data, the tasks, the held-out and
    constant-predictor metrics, the topology, the parameter counts, the training time and the
    search's decisiveness (None without a search)."""
    primary = {}
    for t in tasks:
        kind = kind_training(t)
        primary[t.name] = {"metric": kind.primary, "higher_is_better": kind.higher_is_better,
                           "model": final[t.name][kind.primary], "constant": constant[t.name][kind.primary]}
    return {"config": cfg.to_dict(), "spec": spec, "final": final, "constant_baseline": constant,
            "primary": primary, "topology": topology, "parameters": parameters, "train_seconds": seconds,
            "decisiveness": decisiveness, "baseline_protocol": cfg.baseline_protocol if cfg.baseline else None,
            **extra}


def run_metrics(run: Run, data: MultiTaskData, final: Scores, constant: Scores) -> dict[str, Any]:
    """The report of one finished run, from its state, its data and its held-out metrics."""
    net, spec = run.net, run.spec
    parameters = {"supernet": count_parameters(net) - sum(p.numel() for p in net.arch_parameters()),
                  "relative_to_backbone": parameter_ratio(spec, network_tensors(net))}
    extra: dict[str, Any] = {"losses": run.history, "init": run.init_report,
                             "test_samples": {t.name: data.test.size(t.name) for t in spec.tasks}}
    if distributed.world_size() > 1:
        extra["distributed"] = {"world_size": distributed.world_size(), "backend": distributed.backend(),
                                "global_batch_size": run.cfg.batch_size * distributed.world_size(),
                                "replica_digests": run.replica_digests, "resynced": run.resynced}
    if run.cost_table is not None:  # what the budget priced blocks with (the checkpoint holds the table)
        t = run.cost_table
        extra["cost_table"] = {"target": t.target, "batch": t.batch, "threads": t.threads, "unit": t.unit,
                               "network": t.network, "sha256": t.digest}
    if run.cfg.budget is not None and net.hard:  # what the reduced models cost against the budget
        extra["budget"] = budget_outcome(spec, run.cfg.budget, run.cfg.budget_scope,
                                         (net.mask_gamma.cpu(), net.mask_alpha.cpu(), net.mask_beta.cpu()), run.cost_table)
    decisiveness = None if run.cfg.baseline is not None else network_decisiveness(net)
    return metrics(run.cfg, spec.to_dict(), spec.tasks, final, constant, run.topology, parameters, run.seconds,
                   decisiveness, **extra)


def single_task_metrics(cfg: TrainConfig, runs: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The single-task baseline's report: its per-task runs' reports (task -> report) side by
    side (``validation`` too: stage -> task -> metrics); parameters and training time add up."""
    spec_tasks = [m["spec"]["tasks"][0] for m in runs.values()]
    parameters = {"supernet": sum(m["parameters"]["supernet"] for m in runs.values()),
                  "relative_to_backbone": sum(m["parameters"]["relative_to_backbone"] for m in runs.values())}
    validation: dict[str, dict[str, Any]] = {}
    for t, m in runs.items():
        for stage, scores in (m.get("validation") or {}).items():
            validation.setdefault(stage, {})[t] = scores[t]
    return metrics(cfg, {"tasks": spec_tasks}, [TaskSpec(**t) for t in spec_tasks],
                   {t: m["final"][t] for t, m in runs.items()},
                   {t: m["constant_baseline"][t] for t, m in runs.items()},
                   {t: (m.get("topology") or {}).get(t, {}) for t, m in runs.items()}, parameters,
                   sum(m["train_seconds"] for m in runs.values()), runs={t: t for t in runs}, validation=validation)


# A deployed task that closes less than this share of the gap between its constant predictor and a
# perfect score has lost what it needs: digits, seed 1, budget 1.3 ms, parity 0.549 against the
# constant's 0.504 (9% of the gap) with a chain reading in at the 1x1 state (RESULTS "A budget for
# the shared model"). The other 157 task results of the 2026-12-07 fights and runs closed 24.8% or
# more (the hardest: synthetic edge F, 24.8-35%, shared-bottom's included).
NEAR_CONSTANT = 0.15


def near_constant_line(primary: Mapping[str, Mapping[str, Any]] | None) -> str | None:
    """One warning line naming the tasks whose deployed model scores close to their best constant
    predictor (closing less than `NEAR_CONSTANT` of the gap to a perfect score: 1 for a
    higher-is-better metric in [0, 1], 0 for a lower-is-better one that is non-negative; other
    metrics are not judged), or None. Takes ``metrics.json``'s ``primary``."""
    weak = []
    for task, p in (primary or {}).items():
        model, constant = float(p["model"]), float(p["constant"])
        ideal = 1.0 if p["higher_is_better"] else 0.0
        bounded = 0.0 <= constant <= 1.0 and 0.0 <= model <= 1.0 if p["higher_is_better"] else min(model, constant) >= 0.0
        if bounded and constant != ideal and (model - constant) / (ideal - constant) < NEAR_CONSTANT:
            weak.append(f"{task} {p['metric']} {model:.3g} (constant predictor {constant:.3g})")
    if not weak:
        return None
    return (f"warning: held out, {'; '.join(weak)}: the deployed sub-network scores close to a constant "
            "predictor; see its read-in and depth in metrics.json's topology, and retrain without --budget "
            "or with a larger one, or with more --search-iters")


def write_json(path: Path, value: Any, sort_keys: bool = True, then: str = "run the command again") -> None:
    """Write ``value`` as indented JSON to ``path``, atomically. Raises ConfigError (one line, the
    path; ``then``: what to do once fixed) when the system fails the write, e.g. a full device."""
    text = json.dumps(value, indent=2, sort_keys=sort_keys)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text), error=ConfigError, then=then)

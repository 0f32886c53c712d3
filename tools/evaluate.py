"""`dagc evaluate`: the paper-style table of a finished run (Tables 1-4 and 6): absolute metrics
per task, the relative performance Δ_Ti of Eq. 10 against a baseline run, Δ_T of Eq. 11, and the
parameters relative to one backbone; `train_summary`, the screen `dagc train` ends with; and
`checkpoint_stages`, the validation metrics per stage that `dagc inspect CHECKPOINT` shows.

A run is a directory written by `dagc train` (its ``metrics.json``), including baseline runs
(``--baseline single-task`` writes one aggregate ``metrics.json`` over its per-task runs).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from dagc.checkpoint import load_checkpoint
from dagc.errors import ConfigError
from dagc.trainer.kinds import delta_metrics, primary_metric
from dagc.trainer.metrics import LOWER_IS_BETTER, delta_t, relative_performance
from dagc.trainer.validation import stage_lines


def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a finished run's ``metrics.json``.

    Returns ``{"dir", "label", "tasks" (name -> kind), "final" (task -> metric -> value),
    "params_ratio" (float or None)}``. Raises ConfigError when the directory holds no finished
    run or its metrics.json is unreadable.
    """
    d = Path(run_dir)
    path = d / "metrics.json"
    if not path.is_file():
        hint = (f"; it is unfinished: continue it with dagc train --resume {d}"
                if (d / "state.safetensors").exists() else "; give the --out of a finished dagc train")
        raise ConfigError(f"{d} holds no finished run (no metrics.json){hint}")
    try:
        m = json.loads(path.read_text())
        tasks = {t["name"]: t["kind"] for t in m["spec"]["tasks"]}
        final = {t: {k: float(v) for k, v in m["final"][t].items()} for t in tasks}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a dagc metrics file ({type(e).__name__}: {e}); "
                          "was it written by dagc train?") from None
    cfg = m.get("config", {})
    return {"dir": str(d), "label": run_label(cfg), "tasks": tasks, "final": final,
            "params_ratio": (m.get("parameters") or {}).get("relative_to_backbone")}


def run_label(cfg: dict[str, Any]) -> str:
    """A short name of what a run trained: ``dagc (M=3)``, ``shared-bottom``, ``dagc -no-fbr``..."""
    if cfg.get("baseline"):
        return str(cfg["baseline"])
    m = cfg.get("flow_constant")
    label = "dagc" + (f" (M={m})" if m else "")
    for a in cfg.get("ablations") or ():
        label += f" -{a}"
    if cfg.get("reduction") not in (None, "fbr"):
        label += f" [{cfg['reduction']}]"
    return label


def compare(run: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Δ_Ti per task (Eq. 10, over the task kind's `DELTA_METRICS` that both runs report and
    whose baseline value is non-zero) and Δ_T (Eq. 11).

    Returns ``{"per_task": task -> Δ_Ti, "delta_t": Δ_T, "metrics": task -> the metrics used}``.
    Raises ConfigError when the runs share no task or a task's kinds differ.
    """
    common = [t for t in run["tasks"] if t in baseline["tasks"]]
    if not common:
        raise ConfigError(f"{run['dir']} and {baseline['dir']} share no task; compare runs of the same dataset")
    per_task, used = {}, {}
    for t in common:
        if run["tasks"][t] != baseline["tasks"][t]:
            raise ConfigError(f"task {t!r} is {run['tasks'][t]} in {run['dir']} but {baseline['tasks'][t]} in "
                              f"{baseline['dir']}; compare runs of the same dataset")
        keys = [k for k in delta_metrics(run["tasks"][t])
                if k in run["final"][t] and k in baseline["final"][t]
                and baseline["final"][t][k] != 0 and math.isfinite(baseline["final"][t][k])]
        if not keys:
            continue
        per_task[t] = relative_performance({k: run["final"][t][k] for k in keys}, baseline["final"][t],
                                           LOWER_IS_BETTER)
        used[t] = keys
    if not per_task:
        raise ConfigError(f"no metric of {run['dir']} can be compared with {baseline['dir']}")
    return {"per_task": per_task, "delta_t": delta_t(per_task), "metrics": used}


def format_table(run: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    """The paper-style table as text: one block per task with its metrics (and the baseline's
    values and Δ_Ti when given), then Δ_T and the parameters relative to one backbone."""
    cmp = compare(run, baseline) if baseline is not None else None
    lines = [f"run: {run['dir']} ({run['label']})"]
    if baseline is not None:
        lines.append(f"against: {baseline['dir']} ({baseline['label']})")
    head = f"{'task':<14}{'metric':<14}{'value':>10}"
    if baseline is not None:
        head += f"{'baseline':>10}"
    lines += ["", head]
    for t, kind in run["tasks"].items():
        keys = [k for k in delta_metrics(kind) if k in run["final"][t]]
        keys += [k for k in run["final"][t] if k not in keys]
        for i, k in enumerate(keys):
            arrow = "↓" if k in LOWER_IS_BETTER else "↑"
            row = f"{t if i == 0 else '':<14}{k + ' ' + arrow:<14}{run['final'][t][k]:>10.4f}"
            if baseline is not None and t in baseline["final"] and k in baseline["final"][t]:
                row += f"{baseline['final'][t][k]:>10.4f}"
            lines.append(row)
        if cmp is not None and t in cmp["per_task"]:
            lines.append(f"{'':<14}{'Δ (%)':<14}{cmp['per_task'][t]:>+10.2f}")
    lines.append("")
    if cmp is not None:
        lines.append(f"Δ_T (%): {cmp['delta_t']:+.2f} (mean of the tasks' Δ, Eq. 10-11; positive = better)")
    ratio = run["params_ratio"]
    row = f"parameters relative to one backbone: {ratio:.2f}" if ratio is not None else \
        "parameters relative to one backbone: - (not recorded by this run)"
    if baseline is not None and baseline["params_ratio"] is not None:
        row += f" (baseline {baseline['params_ratio']:.2f})"
    lines.append(row)
    return "\n".join(lines)


def train_summary(metrics: dict, out: Path) -> str:
    """A one-screen summary of a finished run."""
    ratio = metrics["parameters"].get("relative_to_backbone")
    lines = [f"run: {out}", f"train time: {metrics['train_seconds']:.1f} s, supernet parameters: "
             f"{metrics['parameters']['supernet']:,}"
             + (f", deployed parameters relative to one backbone: {ratio:.2f}" if ratio is not None else ""), "",
             f"{'task':<14}{'metric':<12}{'model':>10}{'constant':>10}   D  W      S"
             f"  A-margin B-margin decided-edges"]
    topo = metrics.get("topology") or {}
    decisive = metrics.get("decisiveness") or {}
    for task, p in metrics["primary"].items():
        t, d = topo.get(task, {}), decisive.get(task)
        lines.append(f"{task:<14}{p['metric']:<12}{p['model']:>10.4f}{p['constant']:>10.4f}"
                     f"  {t.get('D', '-'):>2} {t.get('W', '-'):>2} "
                     + (f"{t['S']:>6.3f}" if "S" in t else f"{'-':>6}")
                     + (f"  {d['alpha_margin']:>8.3f} {d['beta_margin']:>8.3f} {d['decided_edges']:>13.2f}"
                        + ("  near-tie" if d["near_tie"] else "") if d else ""))
    stages = stage_lines(metrics.get("validation"), {t: p["metric"] for t, p in metrics["primary"].items()})
    lines += ["", *stages] if stages else []
    if metrics.get("stopped_early_at") is not None:
        lines.append(f"fine-tuning stopped early at step {metrics['stopped_early_at']} (--patience)")
    if "runs" in metrics:  # the single-task baseline: one run per task
        lines += ["", f"wrote {out}/<task>/ (one run each: {', '.join(metrics['runs'])}) and {out / 'metrics.json'}"]
    else:
        lines += ["", f"wrote {out / 'checkpoint.safetensors'}, {out / 'metrics.json'}, {out / 'train.log'}"]
    return "\n".join(lines)


def checkpoint_stages(path: str | os.PathLike) -> str:
    """The validation metrics per stage that a checkpoint's ``metrics`` metadata records, as text
    to follow a summary: a blank line and `dagc.trainer.validation.stage_lines`, or "" when it
    records none. Raises CheckpointError for an unreadable checkpoint."""
    ck = load_checkpoint(path)
    recorded = ck.json("metrics", None)
    validation = recorded.get("validation") if isinstance(recorded, dict) else None
    lines = stage_lines(validation, {t.name: primary_metric(t.kind)[0] for t in ck.spec.tasks})
    return "\n".join(["", "", *lines]) if lines else ""

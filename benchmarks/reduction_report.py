"""The reduction study's aggregation and output (`benchmarks/reduction_study.py` runs the study):
mean ± std over seeds, the machine it ran on, the JSON, the markdown table and the plot."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dagc.checkpoint import write_atomic

VARIANTS = ("soft", "hard", "hard_bn", "finetune")


def _target_key(target: float | None) -> str:
    return "auto" if target is None else f"{target:g}"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN entries are ignored."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return float(statistics.fmean(vals)), float(statistics.stdev(vals)) if len(vals) > 1 else 0.0


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """dataset -> variant -> method -> target key -> mean ± std over seeds of the task-mean retained
    performance and achieved sparsity (draws averaged within a seed first), plus per-task means."""
    groups: dict[tuple, dict[int, list[dict]]] = {}
    for run in runs:
        for r in run["records"]:
            key = (run["dataset"], r["variant"], r["method"], _target_key(r["target"]))
            groups.setdefault(key, {}).setdefault(run["seed"], []).append(r)
    out: dict[str, Any] = {}
    for (dataset, variant, method, tkey), by_seed in groups.items():
        per_seed_ret = [statistics.fmean(r["retained_mean"] for r in rs) for rs in by_seed.values()]
        per_seed_s = [statistics.fmean(r["sparsity_mean"] for r in rs) for rs in by_seed.values()]
        tasks = next(iter(by_seed.values()))[0]["retained"].keys()
        ret_m, ret_s = _mean_std(per_seed_ret)
        s_m, s_s = _mean_std(per_seed_s)
        out.setdefault(dataset, {}).setdefault(variant, {}).setdefault(method, {})[tkey] = {
            "retained_mean": ret_m, "retained_std": ret_s, "sparsity_mean": s_m, "sparsity_std": s_s,
            "seeds": len(by_seed),
            "retained_per_task": {t: _mean_std([statistics.fmean(r["retained"][t] for r in rs)
                                                for rs in by_seed.values()])[0] for t in tasks},
        }
    return out


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import matplotlib

    return {
        "machine": {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "matplotlib": matplotlib.__version__},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------------- output
METHOD_STYLE = {"fbr": ("tab:red", "o", "flow-based (FBR)"), "threshold": ("tab:blue", "s", "threshold"),
                "random": ("tab:grey", "^", "random")}


def plot(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Retained performance vs achieved sparsity: one column per dataset, one row per variant, one
    line per method over the targets (mean ± std over seeds), each method's automatic stop as a
    star. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    datasets = list(summary)
    variants = [v for v in VARIANTS if any(v in summary[d] for d in datasets)]
    fig, axes = plt.subplots(len(variants), len(datasets), figsize=(5.2 * len(datasets), 3.8 * len(variants)),
                             squeeze=False)
    titles = {"soft": "kept edges, searched σ weights", "hard": "binary masks, no fine-tuning",
              "hard_bn": "binary masks, BN statistics re-estimated", "finetune": "binary masks, rewound + fine-tuned"}
    for r, variant in enumerate(variants):
        for c, dataset in enumerate(datasets):
            ax = axes[r][c]
            for method, by_target in summary[dataset].get(variant, {}).items():
                color, marker, label = METHOD_STYLE[method]
                pts = sorted((v["sparsity_mean"], v["retained_mean"], v["sparsity_std"], v["retained_std"])
                             for k, v in by_target.items() if k != "auto")
                if pts:
                    xs, ys, xe, ye = map(np.array, zip(*pts))
                    ax.errorbar(xs, ys, yerr=ye, xerr=xe, color=color, marker=marker, ms=4, capsize=2, lw=1.3,
                                label=label)
                if "auto" in by_target:
                    a = by_target["auto"]
                    ax.errorbar([a["sparsity_mean"]], [a["retained_mean"]], yerr=[a["retained_std"]],
                                xerr=[a["sparsity_std"]], color=color, marker="*", ms=13, mec="black", capsize=2,
                                ls="none", label=f"{label}, own stop")
            ax.axhline(1.0, color="black", lw=0.7, ls=":")
            preset = result.get("presets", {}).get(dataset, "")
            ax.set_title(f"{dataset} ({preset}): {titles[variant]}", fontsize=9)
            ax.set_xlabel("achieved sparsity S (active / all edges)")
            ax.set_ylabel("retained performance (pruned vs unreduced)")
            ax.set_xlim(0, 1.05)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    n_seeds = len(result["config"]["seeds"])
    fig.suptitle(f"Reduction study (paper Fig. 5): mean ± std over {n_seeds} seed(s)", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the result as indented JSON, atomically (NaN written as null)."""
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    text = json.dumps(clean(result), indent=1)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def table(result: dict[str, Any], variant: str = "soft") -> str:
    """A markdown table per dataset: rows method, columns target, cells mean ± std retained
    performance (mean achieved S underneath)."""
    lines = []
    for dataset, by_variant in result["summary"].items():
        by_method = by_variant.get(variant)
        if not by_method:
            continue
        keys = sorted({k for v in by_method.values() for k in v if k != "auto"}, key=float) + ["auto"]
        lines += [f"**{dataset}** ({variant})", "",
                  "| method | " + " | ".join(f"target {k}" for k in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for method, by_target in by_method.items():
            cells = []
            for k in keys:
                v = by_target.get(k)
                cells.append("" if v is None else
                             f"{v['retained_mean']:.3f} ± {v['retained_std']:.3f} (S {v['sparsity_mean']:.2f})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)

"""`dagc bench`'s output: the one-screen table, the JSON file and the latency plot of a result of
`dagc.tools.bench.benchmark`."""

from __future__ import annotations

import json
import os
from typing import Any

from dagc.errors import BenchError
from dagc.tools.bench_precision import table_lines
from dagc.writing import write_atomic

__all__ = ["format_table", "write_json", "plot"]


def format_table(result: dict[str, Any]) -> str:
    """One screen: per batch each variant's p50/p90 ms, throughput, MFLOPs per image and peak
    memory; then the ratios of the shared model over (a), (b), (c) and of each task's model."""
    m, cfg = result["machine"], result["config"]
    lines = [f"{m['cpu'] or m['platform']}, {m['usable_cpus']} CPUs, threads {cfg['threads'] or 'default'}; "
             f"torch {m['torch']}, onnxruntime {m['onnxruntime']}; backend {cfg['backend_resolved']}, "
             f"device {cfg['device']}; input {'x'.join(map(str, cfg['input']['shape']))}"]
    variants = result["variants"]
    for b, entry in result["batches"].items():
        lines += ["", f"batch {b}",
                  f"  {'variant':<22}{'p50 ms':>10}{'p90 ms':>10}{'img/s':>10}{'MFLOPs':>11}{'peak MB':>9}"]
        for k, s in entry["variants"].items():
            lines.append(f"  {k:<22}{s['p50_ms']:>10.3f}{s['p90_ms']:>10.3f}{s['throughput_ips']:>10.1f}"
                         f"{variants[k]['flops'] / 1e6:>11.2f}{s['peak_rss_mb']:>9.1f}")
        r = entry["ratios"]
        parts = [f"{x[len('shared_vs_'):]} {v['speedup']:.2f}x (FLOPs {v['flops_ratio']:.2f}x, eff. "
                 f"{v['efficiency']:.2f})" for x, v in r.items() if x.startswith("shared_vs_") and isinstance(v, dict)]
        lines.append("  shared model vs " + "; ".join(parts))
        task_parts = []
        for t, v in r["per_task"].items():
            s = f"{t} {v['latency_vs_shared']:.2f} of shared"
            if "latency_vs_bare" in v:
                s += f", {v['latency_vs_bare']:.2f} of bare ({v['unchecked_vs_bare']:.2f} unchecked)"
            task_parts.append(s)
        lines.append("  one task via runtime: " + "; ".join(task_parts))
        lines += table_lines(result, r)
    return "\n".join(lines + table_lines(result))


def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``result`` as indented JSON, atomically. Raises BenchError (one line naming the path)
    when the system fails the write, e.g. a full device."""
    text = json.dumps(result, indent=1, allow_nan=False) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # the temporary is private (0600); results are meant to be read

    write_atomic(path, write, error=BenchError, then="run dagc bench again")


def plot(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Latency (p50, ms, log scale) against batch size, one line per variant; PNG, written
    atomically. Raises BenchError as `write_json` does."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported: no display needed
    import matplotlib.pyplot as plt

    batches = [int(b) for b in result["batches"]]
    fig, ax = plt.subplots(figsize=(9.5, 4.8), dpi=110)
    colors = plt.get_cmap("tab20").colors
    for i, (k, info) in enumerate(result["variants"].items()):
        ys = [result["batches"][str(b)]["variants"][k]["p50_ms"] for b in batches]
        style = "--" if k.startswith("bare:") else ":" if k.startswith("task:") else "-"
        ax.plot(batches, ys, style, marker="o", color=colors[i % len(colors)], label=k if k.startswith(("task:", "bare:")) else info["label"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("latency per batch, p50 (ms)")
    cfg = result["config"]
    ax.set_title(f"{cfg.get('preset') or 'model'} {'x'.join(map(str, cfg['input']['shape'][1:]))}, "
                 f"{cfg['device']}, backend {cfg['backend_resolved']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, 0o644)

    try:
        write_atomic(path, write, error=BenchError, then="run dagc bench again")
    finally:
        plt.close(fig)

"""The closing summary of ``make demo``: what the run, the compile and the benchmark produced.

    python -m dagc.tools.demo RUN_DIR ARTIFACT_DIR BENCH_JSON

Prints, in one screen: each task's primary metric at fp32 and int8 (the compile's accuracy check
on the held-out split), the shared model's speed at the benchmark's batch size against the
unpruned and masked supernets and at int8 against fp32, and where the report, the graphs and the
plot are. Exit code 2 with one line when a file is missing or unreadable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from dagc.artifact import load_manifest
from dagc.errors import DagcError
from dagc.precision_table import REFERENCE

__all__ = ["summary", "main"]


def summary(run_dir: Path, artifact_dir: Path, bench: dict[str, Any]) -> str:
    """The summary text; raises DagcError (ArtifactError) for an unreadable artifact."""
    manifest = load_manifest(artifact_dir)
    lines = [f"run {run_dir} -> artifact {artifact_dir}", ""]
    acc = manifest.accuracy
    if acc is not None:
        ref = acc.precisions[REFERENCE].models["model.onnx"].metrics
        lines.append(f"task metrics, shared model, {acc.dataset} held-out split ({min(acc.samples.values())} samples):")
        others = list(acc.reduced())
        lines.append(f"  {'task':<14}{'metric':<12}{REFERENCE:>9}" + "".join(f"{p:>{max(9, len(p) + 1)}}{'drop':>8}"
                                                                       for p in others))
        for t, (key, higher) in acc.primary.items():  # spec order
            row = f"  {t:<14}{key + (' ↑' if higher else ' ↓'):<12}{ref[t][key]:>9.4f}"
            for p in others:
                c = acc.precisions[p].models["model.onnx"]
                row += f"{c.metrics[t][key]:>{max(9, len(p) + 1)}.4f}{c.drop[t]:>+8.2%}"
            lines.append(row)
        lines.append("")
    for b, entry in bench["batches"].items():
        v, r = entry["variants"], entry["ratios"]
        lines.append(f"batch {b}, {bench['config']['threads'] or 'default'} threads, p50 per batch:")
        lines.append(f"  compiled shared model fp32 {v['shared']['p50_ms']:.2f} ms: "
                     f"{r['shared_vs_supernet']['speedup']:.1f}x faster than the unpruned supernet "
                     f"({v['supernet']['p50_ms']:.2f} ms), {r['shared_vs_masked']['speedup']:.1f}x than the masked "
                     f"supernet in PyTorch ({v['masked']['p50_ms']:.2f} ms)")
        for key, s in (r.get("precisions") or {}).items():
            lines.append(f"  {key}: {v[key]['p50_ms']:.2f} ms, {s['speedup_vs_fp32']:.2f}x the fp32 shared model")
    lines += ["", f"report: {artifact_dir / 'report.md'}",
              f"graphs: {', '.join(str(artifact_dir / f'graph_{t}.svg') for t in manifest.spec.task_names)}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point (see the module docstring)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m dagc.tools.demo RUN_DIR ARTIFACT_DIR BENCH_JSON", file=sys.stderr)
        sys.exit(2)
    run_dir, artifact_dir, bench_path = map(Path, args)
    try:
        bench = json.loads(bench_path.read_text())
        print(summary(run_dir, artifact_dir, bench))
    except (OSError, ValueError, KeyError) as e:
        print(f"dagc: error: cannot summarise the demo ({type(e).__name__}: {e}); run make demo again", file=sys.stderr)
        sys.exit(2)
    except DagcError as e:
        print(f"dagc: error: {e}", file=sys.stderr)
        sys.exit(2)
    plot = bench_path.with_suffix(".png")
    if plot.exists():
        print(f"plot: {plot}")


if __name__ == "__main__":
    main()

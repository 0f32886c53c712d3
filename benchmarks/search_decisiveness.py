"""Decisiveness of finished (or searched) runs, one line per task: the configuration that differs
from the defaults, the A/B margins, the decided-edge fraction, near-ties, the reduced topology
and, once fine-tuned, the held-out primary metric (issue 12's sweep of search settings).

    python benchmarks/search_decisiveness.py RUN_DIR [RUN_DIR ...] [--against SHARED_BOTTOM_RUN]

Reads ``search.safetensors`` (written at the end of the search, so a run can be inspected before
fine-tuning finishes) and ``metrics.json`` when present; ``--against`` adds Δ_T against that run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dagc.checkpoint import load_checkpoint
from dagc.tools.evaluate import compare, load_run
from dagc.trainer.config import TrainConfig
from dagc.trainer.decisiveness import network_decisiveness
from dagc.trainer.network import network_from_checkpoint


def describe(run_dir: Path, against: Path | None) -> list[str]:
    """The report lines of one run directory."""
    ckpt = load_checkpoint(run_dir / "search.safetensors")
    decisive = network_decisiveness(network_from_checkpoint(ckpt))
    cfg = ckpt.json("config", {})
    default = TrainConfig(recipe="paper").to_dict()  # the defaults it was measured against
    changed = {k: v for k, v in cfg.items() if k in default and v != default[k] and k not in ("preset",)}
    metrics_path = run_dir / "metrics.json"
    m = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    head = f"{run_dir.name}: {json.dumps(changed)}"
    if m is not None and against is not None:
        head += f"  Δ_T vs {against.name}: {compare(load_run(run_dir), load_run(against))['delta_t']:+.2f}%"
    lines = [head]
    for task, d in decisive.items():
        gaps = [r["relative_gap"] for r in d["first_removals"]]
        line = (f"  {task:<13} A {d['alpha_margin']:.3f}  B {d['beta_margin']:.3f}  edges {d['decided_edges']:.2f}"
                f"  gaps {['-' if g is None else round(g, 3) for g in gaps]}  {'decided' if d['decided'] else 'UNDECIDED'}")
        if m is not None:
            t, p = m["topology"][task], m["primary"][task]
            line += f"  D={t['D']} W={t['W']} S={t['S']:.3f}  {p['metric']}={p['model']:.4f}"
        lines.append(line)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--against", type=Path, default=None)
    args = ap.parse_args()
    for r in args.runs:
        print("\n".join(describe(r, args.against)))


if __name__ == "__main__":
    main()

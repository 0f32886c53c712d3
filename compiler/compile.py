"""`dagc compile`: reduced checkpoint -> IR -> passes -> verified ONNX (and TensorRT) -> artifact.

Every emitted model is verified against the masked supernet (PyTorch, eval mode) before anything
is written; a model that disagrees aborts the compile and leaves no artifact behind.

Targets are records, registered in one place (`dagc.compiler.targets.REGISTRY`: ``--target`` name
-> `Target`, what it emits at which precisions and tolerances). What a compile is asked is one
validated record (`dagc.compiler.options.CompileOptions`); the checkpoint is read once
(`dagc.compiler.pipeline.Source`) and the stages after the IR are a checked list
(`dagc.compiler.pipeline.STAGES`), the last building the typed manifest (`dagc.manifest.Manifest`)
with the task-subset routes computed once from the compiled models (`dagc.routes.compute_routes`);
every reader uses the recorded routes.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from dagc import manifest as mf
from dagc.artifact import check_out_dir
from dagc.checkpoint import load_checkpoint
from dagc.compiler import precision
from dagc.compiler.artifact import write_artifact
from dagc.compiler.budget_report import BudgetReport, budget_lines, budget_of
from dagc.compiler.mixed_precision import fp32_nodes_text
from dagc.compiler.options import CompileOptions
from dagc.compiler.pipeline import ONNX_RTOL, Source, State, manifest_of, read_source, run_stages
from dagc.compiler.targets import model_file
from dagc.modelcheck import verify_artifact
from dagc.trainer.budget import parse_budget

__all__ = ["CompileOptions", "ONNX_RTOL", "SHARED_MODEL", "model_file", "load_graph", "compile_artifact", "compile_checkpoint",
           "compile_summary", "inspect_checkpoint", "preview_manifest", "inspect_summary", "run_budget", "summary"]

SHARED_MODEL = "model.onnx"


def load_graph(ckpt_path: str | Path):
    """Load a reduced checkpoint: (checkpoint, masked supernet, unoptimised IR, optimised IR), the
    parts of its `Source` (`dagc.compiler.pipeline.read_source`, which raises)."""
    s = read_source(ckpt_path)
    return s.ck, s.net, s.raw, s.graph


def compile_artifact(ckpt_path: str | Path, out_dir: str | Path, options: CompileOptions | None = None,
                     **keywords: Any) -> mf.Manifest:
    """Compile a reduced checkpoint into an artifact directory; returns its `Manifest`, read back
    from the directory (`dagc.modelcheck.verify_artifact`, so every file is checked once more).

    ``options``: a `dagc.compiler.options.CompileOptions`, or its fields as keywords (``target``,
    ``force``, ``batches``, ``opset``, ``device``, ``precisions``, ``data_root``,
    ``calibration_batches``, ``calibration_seed``, ``calibration``, ``max_metric_drop``, ``fp16``,
    ``bf16``; `CompileOptions.of`), checked before any work.

    ``precisions`` beyond fp32 (int8, bf16, fp16) add reduced-precision models checked on the
    tasks' held-out metrics (`dagc.compiler.precision.check_precisions`, which the other
    precision options configure): a precision whose primary metric drops by more than
    ``max_metric_drop`` (relative; None: `precision.MAX_METRIC_DROP`) on a task, after the int8
    fallbacks, is refused (CompileError). ``calibration_batches`` / ``calibration_seed`` (None: 8
    and 0) and ``calibration`` (minmax, entropy or percentile; None: minmax) configure int8 and are
    refused without it (`precision.check_options`). A listed precision the target builds files
    at on the device also gets those files: fp16 TensorRT plans, fp16 / bf16 AOTInductor packages
    on ``device="cuda"`` (``device``: what ``aoti`` packages are compiled for, ``cpu`` (default) or
    ``cuda``). ``fp16`` / ``bf16`` ask for those target files alone, without the checked ONNX
    models (the older spelling; `dagc.compiler.options`).

    The stages after the IR are `dagc.compiler.pipeline.STAGES`, each checked.

    Raises CompileError (unknown target, a device or precision the target does not take, no GPU
    for TensorRT or aoti on cuda, no C++ compiler for aoti, existing --out without force,
    an --out that cannot be written, is not a directory dagc wrote or holds the checkpoint,
    unreduced checkpoint, a task without a path, a model that fails verification) and
    CheckpointError (missing, truncated, foreign or unknown-version file, invalid preprocessing
    record). Nothing is written unless everything verified.
    """
    return _compile(ckpt_path, out_dir, CompileOptions.resolve(options, keywords))[0]


def compile_checkpoint(ckpt_path: str | Path, out_dir: str | Path, options: CompileOptions | None = None,
                       **keywords: Any) -> dict[str, Any]:
    """`compile_artifact`, returning the manifest as the JSON ``manifest.json`` holds
    (`Manifest.to_dict`). Raises as `compile_artifact`."""
    return compile_artifact(ckpt_path, out_dir, options, **keywords).to_dict()


def compile_summary(ckpt_path: str | Path, out_dir: str | Path, options: CompileOptions | None = None,
                    **keywords: Any) -> tuple[mf.Manifest, str]:
    """`compile_artifact` and the `summary` of its manifest, with the run's budget report
    (`dagc.compiler.budget_report.budget_of` of the checkpoint the compile read). Raises as
    `compile_artifact`."""
    manifest, source = _compile(ckpt_path, out_dir, CompileOptions.resolve(options, keywords))
    return manifest, summary(manifest, budget_of(source.ck, source.graph))


def _compile(ckpt_path: str | Path, out_dir: str | Path, options: CompileOptions) -> tuple[mf.Manifest, Source]:
    out = check_out_dir(out_dir, force=options.force, inputs=[ckpt_path])  # before any work
    t0 = time.perf_counter()
    source = read_source(ckpt_path, options.data_root)
    state = run_stages(State.start(source, options))
    manifest = replace(state.manifest, compile_seconds=round(time.perf_counter() - t0, 3))
    write_artifact(out, state.build.files, manifest, force=options.force, inputs=[ckpt_path])
    return verify_artifact(out), source


def inspect_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """What a compile would produce, without compiling: the manifest's costs, sharing and topology
    (no model files), as the JSON of `preview_manifest`. Raises like `compile_checkpoint`."""
    return preview_manifest(ckpt_path).to_dict()


def preview_manifest(ckpt_path: str | Path) -> mf.Manifest:
    """The `Manifest` a compile would write, without models (target ``"none"``). Raises like
    `compile_checkpoint`."""
    return manifest_of(read_source(ckpt_path), None, None)


def inspect_summary(ckpt_path: str | Path) -> str:
    """The `summary` of `preview_manifest`, with the run's budget report, reading the checkpoint
    once. Raises like `compile_checkpoint`."""
    source = read_source(ckpt_path)
    return summary(manifest_of(source, None, None), budget_of(source.ck, source.graph))


def run_budget(ckpt_path: str | Path) -> float | None:
    """The budget the checkpoint's run searched for (`dagc.trainer.budget`: FLOPs, or ms for a
    latency), or None (no budget, or a checkpoint without a run configuration); `dagc.compiler.
    budget_report.budget_report` has its unit, table and predictions. Raises like `load_checkpoint`."""
    config = load_checkpoint(ckpt_path).json("config") or {}
    return parse_budget(config["budget"]) if isinstance(config, dict) and config.get("budget") else None


def summary(manifest: mf.Manifest, budget: float | BudgetReport | None = None) -> str:
    """A one-screen text summary of a manifest: per-task FLOPs against the supernet (and against
    ``budget`` when the run had one: FLOPs per task model, or a `BudgetReport`, the cost table's
    prediction of each model against the budget in its unit), topology, models and sharing."""
    costs = manifest.costs
    sup = costs.supernet.flops
    lines = [f"{'task':<14}{'MFLOPs':>10}{'vs supernet':>13}{'params':>11}   D  W      S"]
    for task, c in costs.per_task.items():  # spec order
        topo = manifest.topology[task]
        lines.append(f"{task:<14}{c.flops / 1e6:>10.2f}{c.flops / sup:>12.1%} {c.params:>11,}"
                     f"  {topo.D:>2} {topo.W:>2} {topo.S:>6.3f}")
    sh, un = costs.shared, costs.unshared
    lines += ["", f"shared model: {sh.flops / 1e6:.2f} MFLOPs ({sh.flops / sup:.1%} of the unpruned supernet's "
              f"{sup / 1e6:.2f}; {un.flops / 1e6:.2f} without cross-task sharing), {sh.params:,} parameters"]
    if isinstance(budget, BudgetReport):
        lines += budget_lines(budget)
    elif budget is not None:
        fit = [f"{t} {c.flops / 1e6:.2f} ({'fits' if c.flops <= budget else f'{c.flops / budget - 1:+.0%} over'})"
               for t, c in costs.per_task.items()]
        lines.append(f"budget: {budget / 1e6:g} MFLOPs per task model: {', '.join(fit)}")
    shared_rows = [r for r in manifest.sharing if len(r.tasks) > 1]
    lines.append(f"state instances: {len(manifest.sharing)}, shared by several tasks: {len(shared_rows)}")
    for r in shared_rows:
        lines.append(f"  {r.id}")
    if manifest.models:
        width = max(24, 2 + max(map(len, manifest.models)))
        lines += ["", f"{'model':<{width}}{'MFLOPs':>10}{'max rel err':>13}"]
        for name, m in manifest.models.items():
            lines.append(f"{name:<{width}}{m.flops / 1e6:>10.2f}{m.verified_max_rel_error:>13.1e}")
    if manifest.accuracy is not None:
        lines += ["", precision.accuracy_table(manifest.accuracy)]
        kept = fp32_nodes_text(manifest.accuracy)
        lines += [kept] if kept else []
    return "\n".join(lines)

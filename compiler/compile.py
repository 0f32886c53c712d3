"""`dagc compile`: reduced checkpoint -> IR -> passes -> verified ONNX (and TensorRT) -> artifact.

Every emitted model is verified against the masked supernet (PyTorch, eval mode) before anything
is written; a model that disagrees aborts the compile and leaves no artifact behind.

Targets are records, registered in one place (`dagc.compiler.targets.REGISTRY`: ``--target`` name
-> `Target`, what it emits at which precisions and tolerances). The typed manifest (`dagc.manifest.Manifest`) is
built here, with the task-subset routes computed once from the compiled models
(`dagc.routes.compute_routes`); every reader uses the recorded routes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

import dagc
from dagc import manifest as mf
from dagc.artifact import check_out_dir
from dagc.checkpoint import load_checkpoint
from dagc.compiler import onnx_export, precision, report, targets, verify
from dagc.compiler.artifact import write_artifact
from dagc.compiler.budget_report import BudgetReport, budget_lines
from dagc.compiler.flops import graph_costs, supernet_costs
from dagc.compiler.ir import CompileError, Graph, build_graph, masks_of
from dagc.compiler.mixed_precision import fp32_nodes_text
from dagc.compiler.passes import optimize
from dagc.compiler.targets import REGISTRY, Build, Target, model_file
from dagc.errors import CheckpointError, DataError, SpecError
from dagc.modelcheck import verify_artifact
from dagc.precision_table import REFERENCE
from dagc.precisions import routable
from dagc.preprocessing import Preprocessing
from dagc.routes import compute_routes
from dagc.trainer.budget import parse_budget
from dagc.trainer.network import network_from_checkpoint

SHARED_MODEL = "model.onnx"
ONNX_RTOL = REGISTRY["onnx"].tolerances[REFERENCE]


def load_graph(ckpt_path: str | Path):
    """Load a reduced checkpoint: (checkpoint, masked supernet, unoptimised IR, optimised IR).

    Raises CheckpointError for a missing/truncated/foreign file and CompileError if it is not
    reduced, a task's masks leave it no path, or it is a run's resumable training state.
    """
    ck = load_checkpoint(ckpt_path)
    if "progress" in ck.meta:
        # A state.safetensors holds the model mid-training and no preprocessing record: its
        # artifact would take un-normalised pixels without a word. The run's model is its checkpoint.
        progress = ck.json("progress")
        where = (f" (stage {progress.get('stage')!r}, step {progress.get('step')!r})"
                 if isinstance(progress, dict) else "")
        raise CompileError(f"{ckpt_path} is a run's resumable training state{where}, not a model checkpoint; "
                           "use the run's checkpoint.safetensors, written when dagc train finishes "
                           "(continue an interrupted run with dagc train --resume RUN_DIR)")
    masks_of(ck.tensors, ck.spec)  # refuses an unreduced checkpoint with the command to run
    try:
        net = network_from_checkpoint(ck).eval()
    except (SpecError, CheckpointError) as e:
        raise CompileError(str(e)) from None
    raw = build_graph(ck.spec, ck.tensors)
    return ck, net, raw, optimize(raw)


def compile_artifact(ckpt_path: str | Path, out_dir: str | Path, *, target: str = "onnx", force: bool = False,
                     fp16: bool = False, batches: Sequence[int] = (1, 8, 32), opset: int = 17,
                     device: str | None = None, bf16: bool = False, precisions: str | Sequence[str] = (REFERENCE,),
                     data_root: str | None = None, calibration_batches: int | None = None,
                     calibration_seed: int | None = None, max_metric_drop: float | None = None,
                     calibration: str | None = None) -> mf.Manifest:
    """Compile a reduced checkpoint into an artifact directory; returns its `Manifest`, read back
    from the directory (`dagc.modelcheck.verify_artifact`, so every file is checked once more).

    ``fp16``: TensorRT plans in fp16 (from the fp16-converted ONNX models), or with ``aoti`` on
    ``device="cuda"`` fp16 packages beside the fp32 ones; ``bf16`` likewise bf16 packages (aoti,
    cuda). ``device``: what ``aoti`` packages are compiled for, ``cpu`` (default) or ``cuda``.

    ``precisions`` beyond fp32 (int8, bf16, fp16) add reduced-precision models checked on the
    tasks' held-out metrics (`dagc.compiler.precision.check_precisions`, which the other
    precision options configure): a precision whose primary metric drops by more than
    ``max_metric_drop`` (relative; None: `precision.MAX_METRIC_DROP`) on a task, after the int8
    fallbacks, is refused (CompileError). ``calibration_batches`` / ``calibration_seed`` (None: 8
    and 0) and ``calibration`` (minmax, entropy or percentile; None: minmax) configure int8 and are
    refused without it (`precision.check_options`).


    Raises CompileError (unknown target, a device or precision the target does not take, no GPU
    for TensorRT or aoti on cuda, no C++ compiler for aoti, existing --out without force,
    an --out that cannot be written, is not a directory dagc wrote or holds the checkpoint,
    unreduced checkpoint, a task without a path, a model that fails verification) and
    CheckpointError (missing, truncated, foreign or unknown-version file, invalid preprocessing
    record). Nothing is written unless everything verified.
    """
    asked = targets.requested(fp16, bf16)
    chosen, device = targets.choose(target, device, asked)
    precisions = precision.parse_precisions(precisions)
    settings, max_metric_drop = precision.check_options(precisions, calibration_batches=calibration_batches,
                                                        calibration_seed=calibration_seed,
                                                        max_metric_drop=max_metric_drop, calibration=calibration)
    settings = chosen.calibration(settings)  # e.g. TensorRT imports only signed symmetric Q/DQ
    if not batches or any(b < 1 for b in batches):
        raise CompileError(f"batch sizes must be positive integers, got {list(batches)}")
    out = check_out_dir(out_dir, force=force, inputs=[ckpt_path])  # before any work
    t0 = time.perf_counter()
    ck, net, raw, graph = load_graph(ckpt_path)
    build = Build({}, {}, graph, verify.supernet_reference(net), batches, asked, device)
    _onnx_models(build, opset)
    accuracy = precision.check_precisions(build.files, build.models, ck, graph, precisions, data_root=data_root,
                                          settings=settings, max_drop=max_metric_drop)
    chosen.add(build)
    manifest = _manifest(ck, raw, graph, build, chosen, accuracy)
    manifest = replace(manifest, compile_seconds=round(time.perf_counter() - t0, 3))
    spec = ck.spec
    for t in spec.task_names:
        build.files[report.picture_file(t)] = report.render_task_svg(spec, _task_masks(ck, spec, t), t).encode()
    write_artifact(out, build.files, manifest, force=force, inputs=[ckpt_path])
    return verify_artifact(out)


def compile_checkpoint(ckpt_path: str | Path, out_dir: str | Path, *, target: str = "onnx", force: bool = False,
                       fp16: bool = False, batches: Sequence[int] = (1, 8, 32), opset: int = 17,
                       device: str | None = None, bf16: bool = False, **precision_options: Any) -> dict[str, Any]:
    """`compile_artifact`, returning the manifest as the JSON ``manifest.json`` holds
    (`Manifest.to_dict`). Raises as `compile_artifact`."""
    return compile_artifact(ckpt_path, out_dir, target=target, force=force, fp16=fp16, batches=batches,
                            opset=opset, device=device, bf16=bf16, **precision_options).to_dict()


def _onnx_models(b: Build, opset: int) -> None:
    """The shared and per-task ONNX models, each verified against the reference, into ``b``."""
    graph = b.graph
    spec = graph.spec
    for task in (None, *spec.task_names):
        tasks = None if task is None else [task]
        model = onnx_export.to_onnx(graph, tasks, opset=opset)
        onnx_export.check(model)
        name = model_file(task)
        errors = verify.verify(model, b.reference, graph, rtol=ONNX_RTOL)
        b.files[name] = model.SerializeToString()
        costs = graph_costs(graph, tasks)
        b.models[name] = {"tasks": list(spec.task_names) if task is None else [task], "format": "onnx",
                          "opset": opset, "inputs": _inputs_of(graph, tasks), "outputs": tasks or list(spec.task_names),
                          "verified_max_rel_error": max(errors.values()), **costs}


def _inputs_of(graph: Graph, tasks: Sequence[str] | None) -> list[str]:
    if tasks is None or graph.spec.shared_input:
        return list(graph.inputs)
    return [graph.task_input(t) for t in tasks]


def _task_masks(ck, spec, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = spec.task_names.index(task)
    return tuple(m[k] for m in masks_of(ck.tensors, spec))


def _preprocessing(ck) -> Preprocessing | None:
    """The checkpoint's preprocessing record, either form (`Preprocessing.from_record`), with one
    mean and std per input channel (or one for all)."""
    record = ck.json("preprocessing", None)
    try:
        pre = None if record is None else Preprocessing.from_record(record)
    except DataError as e:
        raise CheckpointError(f"the checkpoint's metadata: {e}; retrain or fix the checkpoint") from None
    if pre is not None and pre.channels not in (1, ck.spec.in_channels):
        raise CheckpointError(f"{ck.source}: metadata 'preprocessing' has {pre.channels} means and stds for "
                              f"{ck.spec.in_channels}-channel inputs; retrain or fix the checkpoint")
    return pre


def _tasks(ck, graph: Graph) -> dict[str, mf.TaskInfo]:
    spec = ck.spec
    gamma, alpha, beta = masks_of(ck.tensors, spec)
    return {t.name: mf.TaskInfo(t.name, t.kind, t.classes, t.name, graph.task_input(t.name),
                                (t.out_channels, *spec.input_size) if t.dense else (t.out_channels,), model_file(t.name),
                                mf.TaskMasks.of(gamma[k], alpha[k], beta[k]))
            for k, t in enumerate(spec.tasks)}


def _manifest(ck, raw: Graph, graph: Graph, build: Build | None, target: Target | None,
              accuracy: mf.Accuracy | None = None) -> mf.Manifest:
    """The manifest of a compile of ``target`` (None, with no build: the preview of
    `inspect_checkpoint`, no models), with the routes computed here, once, from the models."""
    spec = ck.spec
    models = {} if build is None else build.models
    typed = {n: mf.ModelInfo.from_dict(n, m, source="compiled models") for n, m in models.items()}
    tasks = _tasks(ck, graph)
    recorded = {} if build is None or target is None else target.records(build)
    return mf.Manifest(
        dagc_version=dagc.__version__, target=mf.PREVIEW if target is None else target.name, spec=spec,
        input=mf.InputInfo(tuple(graph.inputs), (spec.in_channels, *spec.input_size), "float32", _preprocessing(ck)),
        tasks=tasks, models=typed,
        routes=compute_routes(spec.task_names, {t: i.input for t, i in tasks.items()}, routable(typed.values())),
        costs=mf.Costs(mf.Cost(**supernet_costs(spec)), mf.Cost(**graph_costs(raw)), mf.Cost(**graph_costs(graph)),
                       {t: mf.Cost(**graph_costs(graph, [t])) for t in spec.task_names}),
        sharing=tuple(mf.SharingRow(r["id"], r["state"], tuple(r["tasks"]), r["edges"])
                      for r in report.sharing_table(graph)),
        topology={t: mf.Topology(**m) for t, m in report.task_topology(ck.tensors, spec).items()},
        verification=mf.Verification("masked supernet, PyTorch eval mode, float32",
                                     "max |model - reference| / max(1, max |reference|)", ONNX_RTOL,
                                     recorded.get("aoti_rtol")),
        tensorrt=recorded.get("tensorrt"), accuracy=accuracy)


def inspect_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """What a compile would produce, without compiling: the manifest's costs, sharing and topology
    (no model files), as the JSON of `preview_manifest`. Raises like `compile_checkpoint`."""
    return preview_manifest(ckpt_path).to_dict()


def preview_manifest(ckpt_path: str | Path) -> mf.Manifest:
    """The `Manifest` a compile would write, without models (target ``"none"``). Raises like
    `compile_checkpoint`."""
    ck, _, raw, graph = load_graph(ckpt_path)
    return _manifest(ck, raw, graph, None, None)


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

"""`dagc compile`: reduced checkpoint -> IR -> passes -> verified ONNX (and TensorRT) -> artifact.

Every emitted model is verified against the masked supernet (PyTorch, eval mode) before anything
is written; a model that disagrees aborts the compile and leaves no artifact behind.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import dagc
from dagc.checkpoint import load_checkpoint
from dagc.compiler import aoti, onnx_export, report, tensorrt, verify
from dagc.compiler.artifact import write_artifact
from dagc.compiler.flops import graph_costs, supernet_costs
from dagc.compiler.ir import CompileError, Graph, build_graph, masks_of
from dagc.compiler.passes import optimize
from dagc.errors import SpecError
from dagc.trainer.network import network_from_checkpoint

TARGETS = ("onnx", "tensorrt", "aoti")
SHARED_MODEL = "model.onnx"
ONNX_RTOL = 1e-4


def model_file(task: str | None, ext: str = "onnx") -> str:
    """File name of the shared model (task None) or of a task's model."""
    return f"model.{ext}" if task is None else f"task_{task}.{ext}"


def load_graph(ckpt_path: str | Path):
    """Load a reduced checkpoint: (checkpoint, masked supernet, unoptimised IR, optimised IR).

    Raises CheckpointError for a missing/truncated/foreign file and CompileError if it is not
    reduced or a task's masks leave it no path.
    """
    ck = load_checkpoint(ckpt_path)
    masks_of(ck.tensors, ck.spec)  # refuses an unreduced checkpoint with the command to run
    try:
        net = network_from_checkpoint(ck).eval()
    except SpecError as e:
        raise CompileError(str(e)) from None
    except dagc.errors.CheckpointError as e:
        raise CompileError(str(e)) from None
    raw = build_graph(ck.spec, ck.tensors)
    return ck, net, raw, optimize(raw)


def compile_checkpoint(ckpt_path: str | Path, out_dir: str | Path, *, target: str = "onnx", force: bool = False,
                       fp16: bool = False, batches: Sequence[int] = (1, 8, 32), opset: int = 17) -> dict[str, Any]:
    """Compile a reduced checkpoint into an artifact directory; returns its manifest.

    Raises CompileError (unknown target, no GPU for TensorRT, no C++ compiler for aoti, existing --out without force,
    unreduced checkpoint, a task without a path, a model that fails verification) and
    CheckpointError (missing, truncated, foreign or unknown-version file). Nothing is written
    unless everything verified.
    """
    if target not in TARGETS:
        raise CompileError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    if target == "tensorrt":
        reason = tensorrt.unavailable_reason()
        if reason:
            raise CompileError(reason)
    if target == "aoti":
        reason = aoti.unavailable_reason()
        if reason:
            raise CompileError(reason)
    if not batches or any(b < 1 for b in batches):
        raise CompileError(f"batch sizes must be positive integers, got {list(batches)}")
    out = Path(out_dir)
    if out.exists() and not force:
        raise CompileError(f"{out} exists; pass --force to replace it")
    t0 = time.perf_counter()
    ck, net, raw, graph = load_graph(ckpt_path)
    spec = ck.spec
    reference = verify.supernet_reference(net)

    files: dict[str, bytes] = {}
    models: dict[str, dict[str, Any]] = {}
    errors: dict[str, dict[str, float]] = {}
    for task in (None, *spec.task_names):
        tasks = None if task is None else [task]
        model = onnx_export.to_onnx(graph, tasks, opset=opset)
        onnx_export.check(model)
        errors[model_file(task)] = verify.verify(model, reference, graph, rtol=ONNX_RTOL)
        name = model_file(task)
        files[name] = model.SerializeToString()
        costs = graph_costs(graph, tasks)
        models[name] = {"tasks": list(spec.task_names) if task is None else [task], "format": "onnx",
                        "opset": opset, "inputs": _inputs_of(graph, tasks), "outputs": tasks or list(spec.task_names),
                        "verified_max_rel_error": max(errors[name].values()), **costs}
    if target == "tensorrt":
        _tensorrt_plans(files, models, graph, spec, batches, fp16)
    if target == "aoti":
        aoti.add_packages(files, models, graph, reference, model_file)

    manifest = _manifest(ck, raw, graph, models, batches if target == "tensorrt" else None, fp16, target)
    manifest["compile_seconds"] = round(time.perf_counter() - t0, 3)
    for t in spec.task_names:
        files[f"graph_{t}.svg"] = report.render_task_svg(spec, _task_masks(ck, spec, t), t).encode()
    write_artifact(out, files, manifest, force=force)
    return manifest


def _inputs_of(graph: Graph, tasks: Sequence[str] | None) -> list[str]:
    if tasks is None or graph.spec.shared_input:
        return list(graph.inputs)
    return [graph.task_input(t) for t in tasks]


def _task_masks(ck, spec, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = spec.task_names.index(task)
    return tuple(m[k] for m in masks_of(ck.tensors, spec))


def _tensorrt_plans(files, models, graph, spec, batches, fp16) -> None:
    """Build one plan per ONNX model and verify it against ONNX Runtime (`tensorrt.verify_plan`)."""
    shape = (spec.in_channels, *spec.input_size)
    for name in [n for n in list(files) if n.endswith(".onnx")]:
        info = models[name]
        plan = tensorrt.build_plan(files[name], {i: shape for i in info["inputs"]}, batches, fp16)
        errors = tensorrt.verify_plan(plan, files[name], name, batches, fp16=fp16, shape=shape)
        plan_name = name[: -len(".onnx")] + ".plan"
        files[plan_name] = plan
        models[plan_name] = {**info, "format": "tensorrt", "precision": "fp16" if fp16 else "fp32",
                             "batches": list(batches), "verified_max_rel_error": max(errors.values()),
                             "built_from": name}


def _manifest(ck, raw: Graph, graph: Graph, models, batches, fp16, target) -> dict[str, Any]:
    spec = ck.spec
    gamma, alpha, beta = masks_of(ck.tensors, spec)
    per_task = {t: graph_costs(graph, [t]) for t in spec.task_names}
    return {
        "dagc_version": dagc.__version__,
        "target": target,
        "spec": spec.to_dict(),
        "input": {"names": list(graph.inputs), "shape": ["batch", spec.in_channels, *spec.input_size],
                  "dtype": "float32", "preprocessing": ck.json("preprocessing", None)},
        "tasks": {t.name: {"kind": t.kind, "classes": t.classes, "output": t.name, "input": graph.task_input(t.name),
                           "output_shape": ["batch", t.out_channels, *spec.input_size] if t.dense
                           else ["batch", t.classes], "model": model_file(t.name),
                           "masks": {"gamma": gamma[k].tolist(), "alpha": alpha[k].tolist(), "beta": beta[k].tolist()}}
                  for k, t in enumerate(spec.tasks)},
        "models": models,
        "costs": {"supernet": supernet_costs(spec), "shared": graph_costs(graph), "per_task": per_task,
                  "unshared": graph_costs(raw)},
        "sharing": report.sharing_table(graph),
        "topology": report.task_topology(ck.tensors, spec),
        "verification": {"reference": "masked supernet, PyTorch eval mode, float32",
                         "onnx_rtol": ONNX_RTOL, "metric": "max |model - reference| / max(1, max |reference|)",
                         **({"aoti_rtol": aoti.AOTI_RTOL} if target == "aoti" else {})},
        "tensorrt": None if batches is None else {"batches": list(batches), "precision": "fp16" if fp16 else "fp32"},
    }


def inspect_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """What a compile would produce, without compiling: the manifest's costs, sharing and topology
    (no model files). Raises like `compile_checkpoint`."""
    ck, _, raw, graph = load_graph(ckpt_path)
    return _manifest(ck, raw, graph, {}, None, False, "none")


def summary(manifest: dict[str, Any]) -> str:
    """A one-screen text summary of a manifest: per-task FLOPs against the supernet, topology,
    models and sharing."""
    costs = manifest["costs"]
    sup = costs["supernet"]["flops"]
    lines = [f"{'task':<14}{'MFLOPs':>10}{'vs supernet':>13}{'params':>11}   D  W      S"]
    for task in (t["name"] for t in manifest["spec"]["tasks"]):  # spec order; JSON sorts keys
        c = costs["per_task"][task]
        topo = manifest["topology"].get(task, {})
        lines.append(f"{task:<14}{c['flops'] / 1e6:>10.2f}{c['flops'] / sup:>12.1%} {c['params']:>11,}"
                     f"  {topo.get('D', '-'):>2} {topo.get('W', '-'):>2} {topo.get('S', float('nan')):>6.3f}")
    sh, un = costs["shared"], costs["unshared"]
    lines += ["", f"shared model: {sh['flops'] / 1e6:.2f} MFLOPs ({sh['flops'] / sup:.1%} of the unpruned supernet's "
              f"{sup / 1e6:.2f}; {un['flops'] / 1e6:.2f} without cross-task sharing), {sh['params']:,} parameters"]
    shared_rows = [r for r in manifest["sharing"] if len(r["tasks"]) > 1]
    lines.append(f"state instances: {len(manifest['sharing'])}, shared by several tasks: {len(shared_rows)}")
    for r in shared_rows:
        lines.append(f"  {r['id']}")
    if manifest.get("models"):
        lines += ["", f"{'model':<24}{'MFLOPs':>10}{'max rel err':>13}"]
        for name, m in manifest["models"].items():
            lines.append(f"{name:<24}{m['flops'] / 1e6:>10.2f}{m['verified_max_rel_error']:>13.1e}")
    return "\n".join(lines)

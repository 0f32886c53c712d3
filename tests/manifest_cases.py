"""Typed manifests built directly (no compile) for tests of the artifact contract, the report and
the routes: the compile's shape, with made-up model files."""

from dagc.compiler.flops import cost_summary
from dagc.compiler.ir import masks_of
from dagc.compiler.report import sharing_table, task_topology
from dagc.manifest import (
    Cost,
    Costs,
    InputInfo,
    Manifest,
    ModelInfo,
    SharingRow,
    TaskInfo,
    TaskMasks,
    Topology,
    Verification,
)
from dagc.routes import compute_routes


def _model(name, tasks, cost):
    return ModelInfo(name, "onnx", tuple(tasks), ("image",), tuple(tasks), Cost(**cost), 1e-6, opset=17)


def typed_manifest(spec, tensors, graph) -> Manifest:
    """A manifest of the compile's shape for ``graph`` (shared input), with models model.onnx (all
    tasks) and model_<task>.onnx (one task each) and the routes over them; the unshared cost is
    the graph's own."""
    costs = cost_summary(graph)
    gamma, alpha, beta = masks_of(tensors, spec)
    c, h, w = spec.in_channels, *spec.input_size
    tasks = {t.name: TaskInfo(t.name, t.kind, t.classes, t.name, "image",
                              (t.out_channels, h, w) if t.dense else (t.classes,), f"model_{t.name}.onnx",
                              TaskMasks.of(gamma[k], alpha[k], beta[k]))
             for k, t in enumerate(spec.tasks)}
    models = {"model.onnx": _model("model.onnx", spec.task_names, costs["shared"])}
    models.update({f"model_{t}.onnx": _model(f"model_{t}.onnx", [t], costs["tasks"][t]) for t in spec.task_names})
    shared = Cost(**costs["shared"])
    return Manifest(
        dagc_version="test", target="onnx", spec=spec, input=InputInfo(("image",), (c, h, w)), tasks=tasks,
        models=models, routes=compute_routes(spec.task_names, dict.fromkeys(spec.task_names, "image"), models.values()),
        costs=Costs(Cost(**costs["supernet"]), shared, shared, {t: Cost(**v) for t, v in costs["tasks"].items()}),
        sharing=tuple(SharingRow(r["id"], r["state"], tuple(r["tasks"]), r["edges"]) for r in sharing_table(graph)),
        topology={t: Topology(**m) for t, m in task_topology(tensors, spec).items()},
        verification=Verification("masked supernet", "max relative error", 1e-4))

"""The compile after the IR (issue 22): a `Source` read once, and the stages after emission as a
named list (`STAGES`) over one typed build state, with a consistency check after each, as the IR
passes are checked (`dagc.compiler.passes`).

`read_source` reads the checkpoint once: the masked supernet (the verification reference), the
raw and optimised IR, the masks (`masks_of`, once per compile), the preprocessing record and
where the run's data is. Every stage reads it instead of the checkpoint.

The stages, in order: ``onnx models`` (the shared and per-task ONNX models, verified), ``precisions``
(the checked reduced-precision models, `dagc.compiler.precision`), ``target files`` (the target
record's own files, `dagc.compiler.targets`), ``pictures`` (one SVG per task) and ``manifest``
(the typed `dagc.manifest.Manifest`). Model entries are `dagc.manifest.ModelInfo` from the
moment a model is made. After each stage `problem` checks the state (every model entry has its
file and every file is a model or a picture, names are valid and distinct even where case does
not count, the shared and every task's model are there, what a model is built from is a model,
every file the accuracy record names exists, plus the stage's own postcondition); a violation is a
bug in dagc and stops the compile with a CompileError naming the stage, before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import dagc
from dagc import manifest as mf
from dagc.artifact import check_name
from dagc.checkpoint import Checkpoint, load_checkpoint
from dagc.compiler import onnx_export, precision, report, verify
from dagc.compiler.flops import graph_costs, supernet_costs
from dagc.compiler.ir import CompileError, Graph, build_graph, masks_of
from dagc.compiler.options import CompileOptions
from dagc.compiler.passes import optimize
from dagc.compiler.targets import REGISTRY, Build, Target, model_file
from dagc.errors import CheckpointError, DagcError, DataError, SpecError
from dagc.precision_table import REFERENCE
from dagc.precisions import routable
from dagc.preprocessing import Preprocessing
from dagc.routes import compute_routes
from dagc.spec import Spec
from dagc.trainer.network import CentralNetwork, network_from_checkpoint

__all__ = ["Source", "State", "Stage", "STAGES", "ONNX_RTOL", "read_source", "run_stages", "problem", "manifest_of"]

ONNX_RTOL = REGISTRY["onnx"].tolerances[REFERENCE]


@dataclass(frozen=True)
class Source:
    """What a compile reads of its checkpoint, once: the checkpoint, the masked supernet (eval
    mode), the unoptimised and optimised IR, the (gamma, alpha, beta) masks, the preprocessing
    record (None: none recorded) and ``data_root`` (with the checkpoint's recorded configuration:
    where the run's data is; None: the recorded root)."""

    ck: Checkpoint
    net: CentralNetwork
    raw: Graph
    graph: Graph
    masks: tuple[np.ndarray, np.ndarray, np.ndarray]
    preprocessing: Preprocessing | None
    data_root: str | None = None

    @property
    def spec(self) -> Spec:
        return self.ck.spec

    def task_masks(self, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = self.spec.task_names.index(task)
        return tuple(m[k] for m in self.masks)


def read_source(ckpt_path: str | Path, data_root: str | None = None) -> Source:
    """Read a reduced checkpoint into a `Source`. Raises CheckpointError for a missing, truncated
    or foreign file or an invalid preprocessing record, and CompileError if it is not reduced, a
    task's masks leave it no path, or it is a run's resumable training state."""
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
    masks = masks_of(ck.tensors, ck.spec)  # refuses an unreduced checkpoint with the command to run
    try:
        net = network_from_checkpoint(ck).eval()
    except (SpecError, CheckpointError) as e:
        raise CompileError(str(e)) from None
    raw = build_graph(ck.spec, ck.tensors, masks=masks)
    return Source(ck, net, raw, optimize(raw), masks, _preprocessing(ck), data_root)


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


@dataclass
class State:
    """One compile's build state, filled by the stages: the source, the options, the files and
    model entries (`Build`), the accuracy record (precisions) and the manifest (last stage)."""

    source: Source
    options: CompileOptions
    build: Build
    accuracy: mf.Accuracy | None = None
    manifest: mf.Manifest | None = None
    done: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, source: Source, options: CompileOptions) -> State:
        return cls(source, options, Build({}, {}, source.graph, verify.supernet_reference(source.net),
                                          options.batches, options.own, options.device))


@dataclass(frozen=True)
class Stage:
    """A named step after emission: ``run`` fills the state; ``holds`` (optional) is what must be
    true of the state after it (None if it is, else why not)."""

    name: str
    run: Callable[[State], None]
    holds: Callable[[State], str | None] = lambda state: None


def _onnx_models(s: State) -> None:
    """The shared and per-task ONNX models, each verified against the reference."""
    b, graph = s.build, s.build.graph
    spec = graph.spec
    for task in (None, *spec.task_names):
        tasks = None if task is None else [task]
        model = onnx_export.to_onnx(graph, tasks, opset=s.options.opset)
        onnx_export.check(model)
        name = model_file(task)
        errors = verify.verify(model, b.reference, graph, rtol=ONNX_RTOL)
        b.files[name] = model.SerializeToString()
        outputs = tuple(tasks or spec.task_names)
        b.models[name] = mf.ModelInfo(name, "onnx", outputs, tuple(_inputs_of(graph, tasks)), outputs,
                                      mf.Cost(**graph_costs(graph, tasks)), max(errors.values()), opset=s.options.opset)


def _inputs_of(graph: Graph, tasks: Sequence[str] | None) -> list[str]:
    if tasks is None or graph.spec.shared_input:
        return list(graph.inputs)
    return [graph.task_input(t) for t in tasks]


def _precisions(s: State) -> None:
    o = s.options
    s.accuracy = precision.check_precisions(s.build.files, s.build.models, s.source.ck, s.source.graph, o.precisions,
                                            data_root=s.source.data_root, settings=o.settings, max_drop=o.max_drop)


def _pictures(s: State) -> None:
    spec = s.source.spec
    for t in spec.task_names:
        s.build.files[report.picture_file(t)] = report.render_task_svg(spec, s.source.task_masks(t), t).encode()


def _every_picture(s: State) -> str | None:
    missing = [report.picture_file(t) for t in s.source.spec.task_names if report.picture_file(t) not in s.build.files]
    return f"no picture {missing}" if missing else None


def _manifest(s: State) -> None:
    s.manifest = manifest_of(s.source, s.build, s.options.chosen, s.accuracy)


def _the_models(s: State) -> str | None:
    if s.manifest is None:
        return "no manifest"
    if dict(s.manifest.models) != s.build.models:
        return f"the manifest's models {sorted(s.manifest.models)} are not the built {sorted(s.build.models)}"
    return None


STAGES: tuple[Stage, ...] = (
    Stage("onnx models", _onnx_models),
    Stage("precisions", _precisions),
    Stage("target files", lambda s: s.options.chosen.add(s.build)),
    Stage("pictures", _pictures, _every_picture),
    Stage("manifest", _manifest, _the_models),
)


def run_stages(state: State, stages: Sequence[Stage] = STAGES) -> State:
    """Run ``stages`` in order on ``state``, checking it after each (`problem`, the stage's own
    ``holds``); CompileError naming the stage on a violation."""
    for stage in stages:
        stage.run(state)
        state.done.append(stage.name)
        why = problem(state) or stage.holds(state)
        if why:
            raise CompileError(f"compile stage {stage.name!r} left an inconsistent build: {why}; nothing was "
                               "written (a bug in dagc: please report it)")
    return state


def problem(state: State) -> str | None:
    """What is inconsistent in the state's files, model entries and accuracy record (module
    docstring), or None."""
    b, spec = state.build, state.source.spec
    pictures = {report.picture_file(t) for t in spec.task_names}
    folded: dict[str, str] = {}
    for n in b.files:
        try:
            check_name(n)
        except DagcError as e:
            return str(e)
        if n not in b.models and n not in pictures:
            return f"file {n!r} is neither a model nor a task's picture"
        if folded.setdefault(n.casefold(), n) != n:
            return f"file names {folded[n.casefold()]!r} and {n!r} differ only in case"
    for n, m in b.models.items():
        why = (f"model {n!r} has no file" if n not in b.files else
               f"model entry {m.name!r} is filed as {n!r}" if m.name != n else
               f"model {n!r} is built from {m.built_from!r}, which is no model" if m.built_from not in (None, *b.models)
               else m.problem(spec.task_names, b.graph.inputs))
        if why:
            return why if why.startswith("model") else f"model {n!r}: {why}"
    missing = [m for m in (model_file(None), *map(model_file, spec.task_names)) if m not in b.models]
    if state.done and missing:
        return f"no model for {missing} (the shared model and every task's)"
    recorded = {} if state.accuracy is None else state.accuracy.precisions
    for p, check in recorded.items():
        lost = [c.file for c in check.models.values() if c.file not in b.files]
        if lost:
            return f"the {p} accuracy check records {lost}, which have no file"
    return None


def _tasks(source: Source, graph: Graph) -> dict[str, mf.TaskInfo]:
    spec = source.spec
    gamma, alpha, beta = source.masks
    return {t.name: mf.TaskInfo(t.name, t.kind, t.classes, t.name, graph.task_input(t.name),
                                (t.out_channels, *spec.input_size) if t.dense else (t.out_channels,), model_file(t.name),
                                mf.TaskMasks.of(gamma[k], alpha[k], beta[k]))
            for k, t in enumerate(spec.tasks)}


def manifest_of(source: Source, build: Build | None, target: Target | None,
                accuracy: mf.Accuracy | None = None) -> mf.Manifest:
    """The manifest of a compile of ``target`` (None, with no build: the preview of
    `dagc.compiler.compile.preview_manifest`, no models), with the routes computed here, once,
    from the models."""
    spec, raw, graph = source.spec, source.raw, source.graph
    models: Mapping[str, mf.ModelInfo] = {} if build is None else dict(build.models)
    tasks = _tasks(source, graph)
    recorded = {} if build is None or target is None else target.records(build)
    return mf.Manifest(
        dagc_version=dagc.__version__, target=mf.PREVIEW if target is None else target.name, spec=spec,
        input=mf.InputInfo(tuple(graph.inputs), (spec.in_channels, *spec.input_size), "float32", source.preprocessing),
        tasks=tasks, models=models,
        routes=compute_routes(spec.task_names, {t: i.input for t, i in tasks.items()}, routable(models.values())),
        costs=mf.Costs(mf.Cost(**supernet_costs(spec)), mf.Cost(**graph_costs(raw)), mf.Cost(**graph_costs(graph)),
                       {t: mf.Cost(**graph_costs(graph, [t])) for t in spec.task_names}),
        sharing=tuple(mf.SharingRow(r["id"], r["state"], tuple(r["tasks"]), r["edges"])
                      for r in report.sharing_table(graph)),
        topology={t: mf.Topology(**m) for t, m in report.task_topology(source.masks, spec).items()},
        verification=mf.Verification("masked supernet, PyTorch eval mode, float32",
                                     "max |model - reference| / max(1, max |reference|)", ONNX_RTOL,
                                     recorded.get("aoti_rtol")),
        tensorrt=recorded.get("tensorrt"), accuracy=accuracy)

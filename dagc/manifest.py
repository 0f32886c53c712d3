"""The artifact manifest (``manifest.json``) as typed, validated data, like `dagc.spec.Spec`.

`Manifest.from_dict` / `from_json` read it (version 3; version 2, written before the int8 checks
recorded their ``fp32_nodes``; and version 1 as written before routes and numeric preprocessing
existed), validating every field: an ArtifactError names the field. `Manifest.to_dict` /
`to_json` write version 3. FORMAT.md ("Artifact directory") lists every key;
in short::

    format, format_version, dagc_version, target ("onnx" | "tensorrt" | "aoti"; "none" for the
        preview of `dagc inspect CHECKPOINT`, which has no models), compile_seconds
    spec                      `Spec.to_dict`
    input                     names, shape ["batch", C, H, W], dtype, preprocessing (`Preprocessing`)
    tasks                     name -> kind, classes, output, input, output_shape, model, masks
    models                    file -> tasks, format, inputs, outputs, macs, flops, params,
                              verified_max_rel_error; onnx: opset; tensorrt: precision, batches,
                              built_from; aoti: torch_version, batch {min, max}, built_from
    routes                    format -> "task1,task2" -> model files covering them most cheaply
                              (`dagc.routes`; version 2 only: computed when a version 1 is read)
    files                     file -> sha256, bytes
    costs, sharing, topology, verification, tensorrt

The directory reader is `dagc.artifact.load_manifest`, which also checks every file's sha256.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from dagc.errors import ArtifactError, DagcError
from dagc.jsonfields import Fields
from dagc.manifest_parts import (
    PREVIEW,
    Cost,
    Costs,
    FileEntry,
    InputInfo,
    ModelInfo,
    SharingRow,
    TaskInfo,
    TaskMasks,
    TensorRTSettings,
    Topology,
    Verification,
    spec_order,
)
from dagc.precisions import Accuracy, read_accuracy, routable, unchecked_file
from dagc.routes import ROUTE_MAX_TASKS, cheapest_cover, compute_routes, parse_route_key, route_key
from dagc.spec import Spec

__all__ = ["Manifest", "FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "MODEL_FORMATS", "PREVIEW", "Cost",
           "Costs", "FileEntry", "InputInfo", "ModelInfo", "SharingRow", "TaskInfo", "TaskMasks", "TensorRTSettings",
           "Topology", "Verification", "Routes"]

FORMAT = "dagc.artifact"
FORMAT_VERSION = 3  # 3: accuracy's int8 checks record fp32_nodes
READABLE_VERSIONS = (1, 2, 3)
MODEL_FORMATS = ("onnx", "tensorrt", "aoti")
HINT = "; recompile the artifact"
_KEYS = ("format", "format_version", "dagc_version", "target", "spec", "input", "tasks", "models", "routes",
         "files", "costs", "sharing", "topology", "verification", "tensorrt", "compile_seconds",
         "accuracy")

Routes = Mapping[str, Mapping[tuple[str, ...], tuple[str, ...]]]


def _frozen(d: Mapping) -> Mapping:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class Manifest:
    """An artifact's manifest; every field as the module docstring lists it.

    ``tasks``, ``topology`` and ``costs.per_task`` are keyed (and ordered) by the spec's tasks;
    ``routes`` maps a model format to subset (task tuple in spec order) -> model names; ``files``
    is empty until `dagc.compiler.artifact.write_artifact` lists them. ``source`` names the file
    in error messages. Mappings are read-only. Raises ArtifactError naming the field when fields
    disagree (a model of an unknown task, a route to a missing model, ...).
    """

    dagc_version: str
    target: str
    spec: Spec
    input: InputInfo
    tasks: Mapping[str, TaskInfo]
    models: Mapping[str, ModelInfo]
    routes: Routes
    costs: Costs
    sharing: tuple[SharingRow, ...]
    topology: Mapping[str, Topology]
    verification: Verification
    tensorrt: TensorRTSettings | None = None
    files: Mapping[str, FileEntry] = field(default_factory=dict)
    compile_seconds: float | None = None
    accuracy: Accuracy | None = None
    source: str = field(default="manifest", compare=False, repr=False)

    def __post_init__(self) -> None:
        # models and files by name, as manifest.json (sorted keys) has them; tasks in spec order
        object.__setattr__(self, "models", _frozen(dict(sorted(self.models.items()))))
        object.__setattr__(self, "files", _frozen(dict(sorted(self.files.items()))))
        for name in ("tasks", "topology"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        object.__setattr__(self, "routes", _frozen({f: _frozen(r) for f, r in self.routes.items()}))
        object.__setattr__(self, "sharing", tuple(self.sharing))
        problem = self._tasks_problem() or self._models_problem() or self._routes_problem()
        if problem is None and self.accuracy is not None:
            object.__setattr__(self, "accuracy", self.accuracy.in_order(self.spec.task_names))
            problem = self.accuracy.problem(self.spec.task_names, self.models)
            problem = problem and f"accuracy.{problem}"
        problem = problem or unchecked_file(self.accuracy, self.models)
        if problem:
            raise ArtifactError(f"{self.source}: {problem}{HINT}")

    # ------------------------------------------------------------------ validation
    def _tasks_problem(self) -> str | None:
        spec, names = self.spec, self.spec.task_names
        if self.target not in (*MODEL_FORMATS, PREVIEW):
            return f"target must be one of {[*MODEL_FORMATS, PREVIEW]}, got {self.target!r}"
        keyed = {"tasks": self.tasks, "topology": self.topology, "costs.per_task": self.costs.per_task}
        for what, keys in keyed.items():
            if tuple(keys) != names:
                return f"{what} must list the spec's tasks {list(names)} in order, got {list(keys)}"
        if self.input.shape != (spec.in_channels, *spec.input_size):
            return f"input.shape {list(self.input.shape)} does not match the spec's input"
        if len(self.input.names) != (1 if spec.shared_input else len(names)):
            return f"input.names {list(self.input.names)}: expected one per task unless the input is shared"
        pre = self.input.preprocessing
        if pre is not None and pre.channels not in (1, spec.in_channels):
            return (f"input.preprocessing has {pre.channels} means and stds for {spec.in_channels}-channel "
                    "inputs")
        for t, info in self.tasks.items():
            problem = info.problem(spec, self.input.names) if info.name == t else f"name {info.name!r} differs"
            if problem:
                return f"tasks[{t!r}] {problem}"
        return None

    def _models_problem(self) -> str | None:
        if self.target == PREVIEW and self.models:
            return f"target {PREVIEW!r} (a preview) has no models, got {sorted(self.models)}"
        for name, m in self.models.items():
            where = f"models[{name!r}]"
            if m.name != name:
                return f"{where} is named {m.name!r}"
            if m.format not in MODEL_FORMATS:
                return f"{where}.format must be one of {list(MODEL_FORMATS)}, got {m.format!r}"
            problem = m.problem(self.spec.task_names, self.input.names)
            if problem:
                return f"{where} {problem}"
            if m.built_from is not None and m.built_from not in self.models:
                return f"{where}.built_from names {m.built_from!r}, which is not a model of the manifest"
            if self.files and name not in self.files:
                return f"model {name!r} is not listed with a sha256 in files"
        if self.target != PREVIEW:
            for t, info in self.tasks.items():
                if info.model not in self.models:
                    return f"tasks[{t!r}].model names {info.model!r}, which is not a model of the manifest"
        return None

    def _routes_problem(self) -> str | None:
        order = {t: i for i, t in enumerate(self.spec.task_names)}
        for fmt, routes in self.routes.items():
            if fmt not in MODEL_FORMATS:
                return f"routes has unknown model format {fmt!r}"
            for subset, chosen in routes.items():
                where = f"routes[{fmt!r}][{route_key(subset)!r}]"
                if not subset or any(t not in order for t in subset) or list(subset) != sorted(subset, key=order.get):
                    return f"{where}: the key must name distinct tasks of the spec in spec order"
                if not chosen or any(c not in self.models or self.models[c].format != fmt for c in chosen):
                    return f"{where} must name {fmt} models of the manifest, got {list(chosen)}"
                if not set(subset) <= {t for c in chosen for t in self.models[c].tasks}:
                    return f"{where}: models {list(chosen)} do not compute every task of the subset"
        return None

    # ------------------------------------------------------------------ use
    def task_inputs(self) -> dict[str, str]:
        """Task -> the model input it reads."""
        return {t: info.input for t, info in self.tasks.items()}

    def route(self, fmt: str, tasks: Iterable[str]) -> tuple[str, ...]:
        """The model files (format ``fmt``) that cover ``tasks`` most cheaply, as recorded. A subset
        that is not recorded because the spec has more than `ROUTE_MAX_TASKS` tasks is covered by
        the same rule now (`dagc.routes.cheapest_cover`). Raises ArtifactError if no model of that
        format computes them, or a task is unknown."""
        want = set(tasks)
        unknown = sorted(want - set(self.spec.task_names))
        if unknown or not want:
            raise ArtifactError(f"tasks {unknown or []} are not tasks of this artifact ({list(self.spec.task_names)})")
        key = tuple(t for t in self.spec.task_names if t in want)
        found = self.routes.get(fmt, {}).get(key)
        if found is None and len(self.spec.task_names) > ROUTE_MAX_TASKS and 1 < len(key) < len(self.tasks):
            found = cheapest_cover(key, [m for m in routable(self.models.values()) if m.format == fmt],
                                   self.spec.task_names, self.task_inputs())
        if found is None:
            raise ArtifactError(f"no {fmt} model of the artifact computes tasks {list(key)}{HINT}")
        return found

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """The version-3 JSON form (module docstring); `from_dict` reads it back."""
        d: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dagc_version": self.dagc_version,
            "target": self.target, "spec": json.loads(json.dumps(self.spec.to_dict())), "input": self.input.to_dict(),
            "tasks": {t: info.to_dict() for t, info in self.tasks.items()},
            "models": {n: m.to_dict() for n, m in self.models.items()},
            "routes": {f: {route_key(s): list(c) for s, c in r.items()} for f, r in self.routes.items()},
            "files": {n: f.to_dict() for n, f in self.files.items()}, "costs": self.costs.to_dict(),
            "sharing": [r.to_dict() for r in self.sharing],
            "topology": {t: m.to_dict() for t, m in self.topology.items()},
            "verification": self.verification.to_dict(),
            "tensorrt": None if self.tensorrt is None else self.tensorrt.to_dict()}
        if self.compile_seconds is not None:
            d["compile_seconds"] = self.compile_seconds
        if self.accuracy is not None:
            d["accuracy"] = self.accuracy.to_dict()
        return d

    def to_json(self) -> str:
        """`to_dict` as the text of ``manifest.json`` (sorted keys, indent 2, final newline)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "manifest") -> Manifest:
        """Read a manifest of a version in `READABLE_VERSIONS`. Takes the decoded JSON and a name
        for messages (the file's path). Returns the Manifest; a version-1 manifest gets its
        routes computed (`dagc.routes.compute_routes`) and its prose preprocessing converted
        (`Preprocessing.from_legacy`). Raises ArtifactError naming the first invalid field."""
        o = Fields(d, "", source, ArtifactError, HINT)
        o.only(*_KEYS)
        if o.get("format") != FORMAT:
            raise ArtifactError(f"{source}: not a dagc artifact manifest (format {o.get('format')!r}, expected "
                                f"{FORMAT!r})")
        version = o.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ArtifactError(f"{source}: artifact format version {version!r} is not supported (this dagc "
                                f"reads versions {list(READABLE_VERSIONS)}); recompile the checkpoint with this "
                                "version of dagc")
        try:
            spec = Spec.from_dict(o.get("spec"))
        except DagcError as e:
            raise ArtifactError(f"{source}: spec: {e}{HINT}") from None
        names = spec.task_names
        models = {n: ModelInfo.read(n, f) for n, f in o.children("models").items()}
        tasks = spec_order({t: TaskInfo.read(t, f) for t, f in o.children("tasks").items()}, names)
        if version == 1:  # written before routes were recorded: the same rule, once, here
            routes = compute_routes(spec.task_names, {t: i.input for t, i in tasks.items()}, models.values())
        else:
            routes = {fmt: {parse_route_key(k): f.strings(k) for k in f.d} for fmt, f in o.children("routes").items()}
        return cls(
            dagc_version=o.string("dagc_version"), target=o.string("target"), spec=spec,
            input=InputInfo.read(o.child("input"), legacy=version == 1), tasks=tasks, models=models,
            routes=routes, costs=Costs.read(o.child("costs"), names),
            sharing=tuple(SharingRow.read(Fields(r, f"sharing[{i}]", source, ArtifactError, HINT))
                          for i, r in enumerate(_list(o, "sharing"))),
            topology=spec_order({t: Topology.read(f) for t, f in o.children("topology").items()}, names),
            verification=Verification.read(o.child("verification")),
            tensorrt=o.optional("tensorrt", lambda k: TensorRTSettings.read(o.child(k))),
            files={n: FileEntry.read(f) for n, f in o.children("files").items()},
            compile_seconds=o.optional("compile_seconds", o.number), accuracy=read_accuracy(o, "accuracy"),
            source=source)

    @classmethod
    def from_json(cls, text: str, source: str = "manifest") -> Manifest:
        """`from_dict` of JSON text; raises ArtifactError for text that is not JSON."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{source} is not valid JSON ({e})") from None
        return cls.from_dict(d, source)


def _list(o: Fields, key: str) -> list:
    v = o.get(key)
    if not isinstance(v, list):
        raise o.fail(key, "a list", v)
    return v


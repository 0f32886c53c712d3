"""`dagc export triton`: a compiled artifact -> a Triton Inference Server model repository.

Layout written (``<p>`` is `TritonConfig.name`, default ``dagc``)::

    REPO/
        <p>/config.pbtxt, <p>/1/model.onnx                  model.onnx: all tasks (platform onnxruntime_onnx)
        <p>_<task>/config.pbtxt, <p>_<task>/1/model.onnx    task_<task>.onnx: one task
        <p>_trt/..., <p>_<task>_trt/...  1/model.plan       the artifact's TensorRT plans (tensorrt_plan), if any
        <p>_<t1>.<t2>/config.pbtxt, <p>_<t1>.<t2>/1/        ensembles for task subsets (platform ensemble)
        routing.json                                        task subset -> model to call and outputs to ask for;
                                                            ``files``: every file written (what --force may replace)

With ``backend="python"`` (`dagc serve`, or a Triton without the onnxruntime backend) the same
models, under the same names, with the same inputs, outputs, batching, instance groups, ensembles
and routes, run on Triton's Python backend instead: ``<m>/1/model.onnx`` plus ``<m>/1/model.py``
(`dagc.tools.triton_model`, which runs it with ONNX Runtime), ``backend: "python"`` and the
model's sha256 and ONNX Runtime thread count as config parameters. TensorRT plans are left out
(listed in routing.json's ``skipped``).

Every config has ``max_batch_size`` (dynamic batch; ``dims`` without the batch axis), inputs and
outputs with their data types and shapes from the manifest, ``dynamic_batching`` and
``instance_group``. Triton takes every sub-directory of the repository as a model and ignores
plain files, so ``routing.json`` does not disturb it.

Routing: the routes the compiler recorded in the manifest (`dagc.manifest.Manifest.route`, which
`dagc.runtime.Engine.models_for` reads too: the cheapest cover by FLOPs): one task -> its own
model; all tasks -> the shared model; any other subset -> the shared model (ask only for the
subset's outputs) when that is cheapest, else an ensemble of the per-task models, generated when
the spec has at most `TritonConfig.max_ensemble_tasks` tasks (2^K subsets). Beyond that, call the
per-task models one by one, or the shared model, as ``routing.json`` records.

Every model file's sha256 is checked against the manifest before it is copied (one snapshot of the
artifact, `dagc.artifact.load_artifact`), and the repository is written by `dagc.artifact.write_tree`:
built in a temporary sibling and swapped into place atomically, so a failed or killed export leaves
nothing behind. ``force`` replaces only a repository dagc wrote (``routing.json`` lists its files)
or an artifact, never the artifact exported or a directory holding it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagc.artifact import check_out_dir, write_tree
from dagc.errors import ArtifactError, CompileError, ConfigError
from dagc.manifest import Manifest, ModelInfo
from dagc.modelcheck import load_checked
from dagc.writing import check_name_fits

__all__ = ["TritonConfig", "export_triton", "ROUTING", "DEFAULT_MAX_BATCH", "BACKENDS", "LIMITS"]

ROUTING = "routing.json"
DEFAULT_MAX_BATCH = 32


@dataclass(frozen=True)
class _Format:
    """How Triton serves one model format of the artifact: its platform, the file name in the
    model's version folder, the suffix of its model names, and whether it is a plan (fixed batch
    sizes, on the GPU, not runnable by the Python backend)."""

    platform: str
    file: str
    suffix: str = ""
    plan: bool = False


FORMATS = {"onnx": _Format("onnxruntime_onnx", "model.onnx"),
           "tensorrt": _Format("tensorrt_plan", "model.plan", "_trt", plan=True)}
PLATFORMS = {f: (r.platform, r.file) for f, r in FORMATS.items()}
# model formats dagc writes that no standard Triton backend loads as they are (AOTInductor packages
# are for C++ embedding); they are left out of the repository, and listed in routing.json
SKIPPED_FORMATS = ("aoti",)
# the Triton backends a repository is written for: onnxruntime (with tensorrt for plans) or python
BACKENDS = ("onnxruntime", "python")
DATA_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}
# the Python backend's model.py; read, not imported (it imports the stub's triton_python_backend_utils)
MODEL_PY = Path(__file__).with_name("triton_model.py")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z")
_INT32, _UINT64 = 2**31 - 1, 2**64 - 1
# each option -> the range Triton's ModelConfig (model_config.proto) takes in the field it is written
# to: max_batch_size and instance_group.count are int32, max_queue_delay_microseconds uint64; the
# Python backend's thread count becomes ONNX Runtime's intra_op_num_threads, an int; the ensemble
# bound is dagc's own (2^K subsets), kept to what a 64-bit count of subsets holds
LIMITS = {"max_batch_size": (1, _INT32), "instances": (1, _INT32), "max_queue_delay_us": (0, _UINT64),
          "max_ensemble_tasks": (0, 62), "intra_op_threads": (0, _INT32)}
OPTIONS = {"max_batch_size": "--max-batch, an int32 in Triton's config", "instances": "--instances, an int32",
           "max_queue_delay_us": "--max-queue-delay-us, a uint64", "max_ensemble_tasks": "2^K task subsets",
           "intra_op_threads": "--threads, an int in ONNX Runtime"}


@dataclass(frozen=True)
class TritonConfig:
    """How the repository is generated.

    name: prefix of every model name (letters, digits, '_', '-'); several artifacts can then share
        one repository.
    max_batch_size: the ONNX models' (and ensembles') ``max_batch_size``; None: the largest batch of
        the artifact's TensorRT profile if it has plans, else `DEFAULT_MAX_BATCH`. Plans always get
        their profile's largest batch (Triton refuses more).
    instances: model instances per device (``instance_group.count``).
    max_queue_delay_us: how long the dynamic batcher waits to fill a batch.
    ensembles: generate ensembles for task subsets that are cheapest as per-task models.
    max_ensemble_tasks: no ensembles when the spec has more tasks than this (2^K subsets).
    backend: "onnxruntime" (platforms onnxruntime_onnx and tensorrt_plan, what the NGC container
        serves) or "python" (Triton's Python backend running the ONNX models with ONNX Runtime).
    intra_op_threads: Python backend: ONNX Runtime's intra-op threads per model instance; 0: its
        default (one per core).
    """

    name: str = "dagc"
    max_batch_size: int | None = None
    instances: int = 1
    max_queue_delay_us: int = 100
    ensembles: bool = True
    max_ensemble_tasks: int = 6
    backend: str = "onnxruntime"
    intra_op_threads: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"triton model name prefix {self.name!r} must start with a letter or digit and hold "
                              "only letters, digits, '_' or '-'")
        if self.backend not in BACKENDS:
            raise ConfigError(f"triton backend {self.backend!r} is not one of {list(BACKENDS)}")
        for field, (low, high) in LIMITS.items():
            v = getattr(self, field)
            if field == "max_batch_size" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                raise ConfigError(f"TritonConfig.{field} must be an integer >= {low} and <= {high} ({OPTIONS[field]}; "
                                  f"the range of the field it is written to), got {v!r}")
        if not isinstance(self.ensembles, bool):
            raise ConfigError(f"TritonConfig.ensembles must be true or false, got {self.ensembles!r}")
        if self.intra_op_threads and self.backend != "python":  # no field of those models would carry it
            raise ConfigError(f"--threads ({self.intra_op_threads}) sets the ONNX Runtime threads of --backend python "
                              f"models; the {self.backend} backend's models take none: add --backend python or drop "
                              "--threads")


def export_triton(artifact_dir: str | os.PathLike, out_dir: str | os.PathLike, config: TritonConfig | None = None,
                  *, force: bool = False) -> dict[str, Any]:
    """Write a Triton model repository for a compiled artifact; returns the routing table (what
    ``routing.json`` holds: ``models`` Triton name -> {platform, tasks, source, ...}, ``routes``
    format -> "task1,task2" -> {model, outputs}, ``files`` the repository's files).

    Takes the artifact directory (``dagc compile --out``), the repository directory to create and a
    `TritonConfig`. Raises ArtifactError (not an artifact, unknown format version, missing or
    tampered file, an invalid manifest or one with models this export does not know),
    CompileError (``out_dir`` exists without ``force``, is not a directory dagc wrote, is, holds or
    lies inside the artifact, cannot be written, the device fills up; model names that collide) and
    ConfigError (bad config: an option outside the range of the Triton field it is written to,
    `LIMITS`; a --name whose model directories are too long a name for the file system). Nothing
    is written unless everything checked out.
    """
    config = TritonConfig() if config is None else config
    if not isinstance(config, TritonConfig):
        raise ConfigError(f"config must be a TritonConfig, got {type(config).__name__}")
    art = Path(artifact_dir)
    out = check_out_dir(out_dir, force=force, inputs=[art], what="artifact")  # before any work
    # one snapshot: format, version, every field, every file's sha256 and bytes, every model file
    # against its manifest entry (the bytes copied are the bytes checked, even during a replace)
    manifest, contents = load_checked(art)
    plan = _plan(manifest, config)
    shown = config.name if len(config.name) <= 40 else f"{config.name[:40]}..."
    for name in plan["models"]:  # a model is a directory: its name must fit the file system
        check_name_fits(out / name, what=f"--name {shown} gives the Triton model directory", error=ConfigError)
    files: dict[str, bytes] = {}
    model_py = MODEL_PY.read_bytes()
    for name, model in plan["models"].items():
        files[f"{name}/config.pbtxt"] = model.pop("config").encode("utf-8")
        if model["source"] is not None:
            files[f"{name}/1/{PLATFORMS[model['format']][1]}"] = contents[model["source"]]
            if config.backend == "python":
                files[f"{name}/1/model.py"] = model_py
    routing = {"format": "dagc.triton_routing", "format_version": 1, "artifact": str(art), "backend": config.backend,
               "dagc_version": manifest.dagc_version, "input": plan["input"],
               "models": plan["models"], "routes": plan["routes"], "skipped": plan["skipped"],
               "files": sorted(files)}  # what --force may delete later (dagc.outputs.check_replaceable)
    files[ROUTING] = (json.dumps(routing, indent=2, sort_keys=True) + "\n").encode("utf-8")
    # An ensemble's version directory exists but is empty.
    write_tree(out, files, force=force, dirs=[f"{m}/1" for m in sorted(plan["models"])], inputs=[art])
    return routing


# ---------------------------------------------------------------------------------------------------
# what to generate


def _plan(manifest: Manifest, config: TritonConfig) -> dict[str, Any]:
    """What to write: ``models`` (Triton name -> entry with its ``config`` text), ``routes``,
    ``skipped`` and ``input``. Raises ArtifactError for a model format it does not know."""
    tasks = list(manifest.spec.task_names)
    dtype = DATA_TYPES[manifest.input.dtype]
    in_dims = list(manifest.input.shape)
    out_dims = {t: list(info.output_shape) for t, info in manifest.tasks.items()}
    by_format: dict[str, dict[str, ModelInfo]] = {f: {} for f in FORMATS}
    skipped = []
    # Triton names a model by its tasks, so only the files the manifest's routes run are exported:
    # a reduced-precision variant (never routed) or, with one task, the task's model beside the
    # shared one would clash with the routed model's name
    routed = {n for by_subset in manifest.routes.values() for r in by_subset.values() for n in r}
    for fname, info in manifest.models.items():
        if (info.format in SKIPPED_FORMATS or (config.backend == "python" and info.format in FORMATS
                                               and FORMATS[info.format].plan)
                or fname not in routed):
            skipped.append(fname)
        elif info.format not in PLATFORMS:
            raise ArtifactError(f"model {fname!r} has format {info.format!r}, which the Triton export does not "
                                f"know (it takes {sorted(PLATFORMS)}); update dagc or recompile the artifact")
        else:
            by_format[info.format][fname] = info
    plan_batches = sorted({b for f, infos in by_format.items() if FORMATS[f].plan for info in infos.values()
                           for b in info.batches})
    onnx_max = config.max_batch_size or (max(plan_batches) if plan_batches else DEFAULT_MAX_BATCH)

    models: dict[str, dict[str, Any]] = {}
    triton_of: dict[str, str] = {}  # artifact file -> Triton model name
    for fmt, infos in by_format.items():
        for fname, info in sorted(infos.items()):
            model_tasks = [t for t in tasks if t in info.tasks]
            name = _model_name(config.name, model_tasks, tasks, fmt)
            if FORMATS[fmt].plan:
                max_batch, kind, batches = max(info.batches), "KIND_GPU", list(info.batches)
                preferred = sorted({b for b in batches if 1 < b <= max_batch})
            else:
                max_batch, preferred, kind, batches = onnx_max, [], "KIND_AUTO", None
            sha = manifest.files[fname].sha256
            platform = "python" if config.backend == "python" else PLATFORMS[fmt][0]
            text = _config_text(f"# {name}: {fname} of a dagc artifact (sha256 {sha}), tasks {', '.join(model_tasks)}",
                                name, platform, max_batch, [(i, dtype, in_dims) for i in info.inputs],
                                [(t, "TYPE_FP32", out_dims[t]) for t in info.outputs],
                                dynamic=(config.max_queue_delay_us, preferred), instances=(config.instances, kind),
                                parameters={"sha256": sha, "intra_op_threads": str(config.intra_op_threads)})
            _add(models, name, {"platform": platform, "format": fmt, "tasks": model_tasks, "source": fname,
                                "sha256": sha, "max_batch_size": max_batch,
                                "min_batch_size": min(batches) if batches else 1,
                                "inputs": list(info.inputs), "outputs": list(info.outputs), "config": text})
            triton_of[fname] = name
    routes = {fmt: _routes(manifest, config, fmt, models, triton_of, (dtype, in_dims, out_dims))
              for fmt, infos in by_format.items() if infos}
    pre = manifest.input.preprocessing
    return {"models": models, "routes": routes, "skipped": sorted(skipped),
            "input": {"names": list(manifest.input.names), "dims": in_dims, "data_type": dtype,
                      "preprocessing": None if pre is None else pre.to_dict(), "task_inputs": manifest.task_inputs()}}


def _routes(manifest: Manifest, config: TritonConfig, fmt: str, models: dict[str, dict[str, Any]],
            triton_of: dict[str, str], dims) -> dict[str, dict[str, Any]]:
    """``routing.json``'s routes of one model format, from the manifest's recorded routes; adds the
    ensembles they need to ``models``."""
    dtype, in_dims, out_dims = dims
    tasks = list(manifest.spec.task_names)
    subsets = [s for k in range(1, len(tasks) + 1) for s in itertools.combinations(tasks, k)]
    if len(tasks) > config.max_ensemble_tasks:  # 2^K subsets: route only one task and all tasks
        subsets = [(t,) for t in tasks] + [tuple(tasks)]
    out: dict[str, dict[str, Any]] = {}
    for subset in subsets:
        try:
            chosen = manifest.route(fmt, subset)
        except ArtifactError:  # no model of this format covers the subset: no route for it
            continue
        key = ",".join(subset)
        if len(chosen) == 1:
            out[key] = {"model": triton_of[chosen[0]], "outputs": list(subset)}
            continue
        if not config.ensembles or len(tasks) > config.max_ensemble_tasks:
            out[key] = {"models": [triton_of[c] for c in chosen], "outputs": list(subset)}
            continue
        name = _model_name(config.name, list(subset), tasks, fmt)
        steps = [(triton_of[c], list(manifest.models[c].inputs), [t for t in manifest.models[c].outputs if t in subset])
                 for c in chosen]
        max_batch = min(models[s[0]]["max_batch_size"] for s in steps)
        ens_inputs = list(dict.fromkeys(i for _, ins, _ in steps for i in ins))
        text = _ensemble_text(f"# {name}: ensemble of {', '.join(s[0] for s in steps)} for tasks {key}", name,
                              max_batch, [(i, dtype, in_dims) for i in ens_inputs],
                              [(t, "TYPE_FP32", out_dims[t]) for t in subset], steps)
        _add(models, name, {"platform": "ensemble", "format": fmt, "tasks": list(subset), "source": None,
                            "steps": [s[0] for s in steps], "max_batch_size": max_batch,
                            "min_batch_size": max(models[s[0]]["min_batch_size"] for s in steps),
                            "inputs": ens_inputs, "outputs": list(subset), "config": text})
        out[key] = {"model": name, "outputs": list(subset)}
    return out


def _model_name(prefix: str, model_tasks: Sequence[str], all_tasks: Sequence[str], fmt: str) -> str:
    # '.' cannot occur in task names (letters, digits, '_', '-'), so a joined subset is unambiguous
    base = prefix if list(model_tasks) == list(all_tasks) else f"{prefix}_{'.'.join(model_tasks)}"
    return base + FORMATS[fmt].suffix


def _add(models: dict[str, dict[str, Any]], name: str, model: dict[str, Any]) -> None:
    if name in models:
        raise CompileError(f"two Triton models would both be named {name!r} (task names clash with the '_trt' "
                           "suffix); rename the task or export with another --name")
    models[name] = model


# ---------------------------------------------------------------------------------------------------
# config.pbtxt text (protobuf text format of inference.ModelConfig)


def _q(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid protobuf text string here


def _tensors(field: str, tensors) -> list[str]:
    lines = [f"{field} ["]
    for k, (name, dtype, dims) in enumerate(tensors):
        sep = "," if k < len(tensors) - 1 else ""
        lines.append(f"  {{ name: {_q(name)} data_type: {dtype} dims: [ {', '.join(map(str, dims))} ] }}{sep}")
    lines.append("]")
    return lines


def _config_text(header: str, name: str, platform: str, max_batch: int, inputs, outputs, *,
                 dynamic: tuple[int, Sequence[int]], instances: tuple[int, str], parameters: dict[str, str]) -> str:
    """A model's config; ``platform`` "python" is written as ``backend: "python"`` with
    ``parameters`` (the other platforms take none)."""
    delay, preferred = dynamic
    kind = f"backend: {_q(platform)}" if platform == "python" else f"platform: {_q(platform)}"
    lines = [header, f"name: {_q(name)}", kind, f"max_batch_size: {max_batch}",
             *_tensors("input", inputs), *_tensors("output", outputs), "dynamic_batching {"]
    if preferred:
        lines.append(f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]")
    lines += [f"  max_queue_delay_microseconds: {delay}", "}",
              f"instance_group [ {{ count: {instances[0]} kind: {instances[1]} }} ]"]
    if platform == "python":
        lines += [f"parameters {{ key: {_q(k)} value: {{ string_value: {_q(v)} }} }}" for k, v in parameters.items()]
    return "\n".join(lines) + "\n"


def _ensemble_text(header: str, name: str, max_batch: int, inputs, outputs, steps) -> str:
    lines = [header, f"name: {_q(name)}", 'platform: "ensemble"', f"max_batch_size: {max_batch}",
             *_tensors("input", inputs), *_tensors("output", outputs), "ensemble_scheduling {", "  step ["]
    for k, (model, ins, outs) in enumerate(steps):
        lines += ["    {", f"      model_name: {_q(model)}", "      model_version: -1"]
        lines += [f"      input_map {{ key: {_q(i)} value: {_q(i)} }}" for i in ins]
        lines += [f"      output_map {{ key: {_q(t)} value: {_q(t)} }}" for t in outs]
        lines.append("    }" + ("," if k < len(steps) - 1 else ""))
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# writing

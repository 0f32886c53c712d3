"""Reduced precisions at compile time, checked on the tasks (``dagc compile --precision``).

fp32 is always built: it is the reference. For each other precision every fp32 ONNX model of the
artifact (the shared model and each task's) gets its reduced form, which is run on the run's
held-out split and scored with the project's metrics (`dagc.trainer.evaluation.score`, the loop
`dagc train` evaluates with) next to the fp32 model on ONNX Runtime:

``int8``  QDQ ONNX files (`dagc.compiler.quantize`), calibrated on the run's training data; if a
          task's primary metric drops by more than ``max_drop`` (relative), the fewest of the
          most sensitive convs are kept in fp32 (`dagc.compiler.mixed_precision`), then the fixed
          fallbacks (`dagc.compiler.quantize.FALLBACKS`); the first that passes is kept and recorded.
``bf16``  no files: OpenVINO running the fp32 ONNX files with bf16 inference precision.
``fp16``  fp16 ONNX files (onnxconverter-common, float32 inputs and outputs), for TensorRT / CUDA;
          checked with ONNX Runtime on the CPU.

When OpenVINO is installed the int8 files are also scored on it (``int8-openvino``); that check
is recorded only if it passes, and the runtime runs int8 on OpenVINO only then.

A precision that fails every attempt stops the compile with a CompileError naming the task, the
metric and the drop, before anything is written. The checks become the manifest's ``accuracy``
(`dagc.precisions.Accuracy`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import onnx

from dagc.compiler.mixed_precision import choose_int8
from dagc.compiler.quantize import (
    CALIBRATIONS,
    INT8,
    Int8Settings,
    calibration_feeds,
    load_run_data,
    with_settings,
)
from dagc.compiler.tensorrt import fp16_model
from dagc.errors import CompileError, DataError, RunnerError
from dagc.precisions import (
    OPENVINO,
    PRECISIONS,
    REFERENCE,
    Accuracy,
    Calibration,
    ModelCheck,
    PrecisionCheck,
    relative_drop,
    variant_file,
)
from dagc.runners import OrtRunner, OvRunner, Runner, openvino_unavailable, relative_error
from dagc.trainer.evaluation import score
from dagc.trainer.kinds import primary_metric

__all__ = ["MAX_METRIC_DROP", "parse_precisions", "check_options", "check_precisions", "accuracy_table"]

MAX_METRIC_DROP = 0.01  # relative, per task's primary metric


def parse_precisions(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"fp32,int8"`` (or a sequence) -> the precisions in `PRECISIONS` order, fp32 always
    included. Raises CompileError for an unknown one."""
    names = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    unknown = [p for p in names if p not in PRECISIONS]
    if unknown:
        raise CompileError(f"unknown precision {unknown[0]!r}; --precision takes a comma-separated list of "
                           f"{list(PRECISIONS)}")
    return tuple(p for p in PRECISIONS if p == REFERENCE or p in names)


def check_options(precisions: Sequence[str], *, calibration_batches: int | None = None,
                  calibration_seed: int | None = None, max_metric_drop: float | None = None,
                  settings: Int8Settings = INT8, calibration: str | None = None) -> tuple[Int8Settings, float]:
    """The int8 settings (``settings`` with the calibration batches, seed and method given) and the
    allowed drop for a compile of ``precisions`` (`parse_precisions`); None: the default. Checked
    before any work: raises CompileError for a value out of range or of the wrong type, and for
    an option that configures a precision not asked for (it would be ignored without a word)."""
    reduced = [p for p in precisions if p != REFERENCE]
    calibrating = {k: v for k, v in (("--calibration-batches", calibration_batches),
                                     ("--calibration-seed", calibration_seed), ("--calibration", calibration))
                   if v is not None}
    if calibrating and "int8" not in precisions:
        verb, them = ("configure", "them") if len(calibrating) > 1 else ("configures", "it")
        raise CompileError(f"{' and '.join(calibrating)} {verb} the int8 calibration; add int8 to --precision "
                           f"(e.g. --precision fp32,int8) or drop {them}")
    if max_metric_drop is not None and not reduced:
        raise CompileError("--max-metric-drop bounds the accuracy check of reduced precisions; add one to "
                           "--precision (e.g. --precision fp32,int8) or drop it")
    drop = MAX_METRIC_DROP if max_metric_drop is None else max_metric_drop
    if isinstance(drop, bool) or not (isinstance(drop, (int, float)) and 0 <= drop < 1):
        raise CompileError(f"--max-metric-drop must be a fraction in [0, 1), got {drop!r}")
    try:
        settings = with_settings(settings, **({} if calibration_batches is None else {"batches": calibration_batches}),
                                 **({} if calibration_seed is None else {"seed": calibration_seed}),
                                 **({} if calibration is None else
                                    {"method": CALIBRATIONS.get(calibration, calibration) if isinstance(calibration, str)
                                     else calibration}))
    except DataError as e:
        raise CompileError(str(e)) from None
    return settings, float(drop)


def check_calibration(settings: Int8Settings, data, task_inputs: Mapping[str, str]) -> None:
    """Refuse (DataError) more calibration batches than the training split fills, before any is
    drawn: each batch is a copy of its samples, so an unbounded count only exhausts memory. Up to
    the default count is always allowed (a small split then repeats samples across batches)."""
    train = data.train
    sizes = ([len(train.inputs)] if isinstance(train.inputs, np.ndarray)
             else [len(train.inputs[t]) for t in task_inputs if t in train.inputs])
    n = min(sizes) if sizes else 0
    most = max(INT8.batches, -(-n // settings.batch_size))
    if settings.batches > most:
        raise DataError(f"--calibration-batches {settings.batches} is more than the training split of {data.name} "
                        f"fills ({n} samples, {settings.batch_size} a batch); give at most {most}")


class _Scored:
    """A model run over the held-out split: its metrics, and its worst relative error against a
    reference runner on the same batches (when given)."""

    def __init__(self, spec, split, runner: Runner, tasks: Sequence[str], reference: Runner | None = None) -> None:
        self.max_rel_error = 0.0

        def predict(names: Sequence[str], x: np.ndarray) -> dict[str, np.ndarray]:
            feeds = {i: x for i in runner.inputs}  # other tasks' inputs only feed outputs not read
            out = runner.run(feeds, list(names))
            if reference is not None:
                ref = reference.run(feeds, list(names))
                self.max_rel_error = max(self.max_rel_error, *(relative_error(out[t], ref[t]) for t in names))
            return out

        raw = score(spec, split, predict, tasks=tasks, batch_size=64)
        # JSON has no NaN: a metric with nothing to average (no valid pixel) is left out
        self.metrics = {t: {k: float(v) for k, v in m.items() if math.isfinite(v)} for t, m in raw.items()}


def _drops(metrics: Mapping[str, Mapping[str, float]], ref: Mapping[str, Mapping[str, float]],
           primary: Mapping[str, tuple[str, bool]]) -> dict[str, float]:
    out = {}
    for t, m in metrics.items():
        key, higher = primary[t]
        if key in m and key in ref[t]:
            out[t] = relative_drop(ref[t][key], m[key], higher)
    return out


def _worst(drop: Mapping[str, float]) -> tuple[str, float]:
    return max(drop.items(), key=lambda kv: kv[1]) if drop else ("", -math.inf)


def check_precisions(files: dict[str, bytes], models: dict[str, dict[str, Any]], ck, graph,
                     precisions: Sequence[str], *, data_root: str | None = None, settings: Int8Settings = INT8,
                     max_drop: float = MAX_METRIC_DROP) -> Accuracy | None:
    """Add the reduced-precision forms of the fp32 ONNX models in ``files`` / ``models`` (model
    file -> manifest entry, JSON form) and return the accuracy record (None when only fp32 is
    asked for: no data is read then).

    Takes the checkpoint (its recorded configuration names the data; ``data_root`` replaces the
    recorded root of an on-disk dataset), the optimised IR, the precisions (`parse_precisions`),
    the int8 settings and the allowed relative drop of each task's primary metric. Raises
    CompileError when a precision fails its check (after the int8 fallbacks) or cannot run here,
    ConfigError / DataError when the data cannot be read.
    """
    wanted = [p for p in parse_precisions(precisions) if p != REFERENCE]
    if not wanted:
        return None
    settings, max_drop = check_options(wanted, max_metric_drop=max_drop, settings=settings)
    if "bf16" in wanted:
        reason = openvino_unavailable("bf16")
        if reason:
            raise CompileError(f"--precision bf16: {reason}")
    data = load_run_data(ck, data_root)
    if "int8" in wanted:
        check_calibration(settings, data, {t: graph.task_input(t) for t in ck.spec.task_names})
    spec = ck.spec
    split = data.test
    primary = {t.name: primary_metric(t.kind) for t in spec.tasks}
    fp32_names = [n for n, m in models.items() if m["format"] == "onnx"]
    runners = {n: OrtRunner(files[n], device="cpu") for n in fp32_names}
    ref = {n: _Scored(spec, split, runners[n], models[n]["tasks"]).metrics for n in fp32_names}
    checks = {REFERENCE: PrecisionCheck("onnxruntime", {n: ModelCheck(n, ref[n], {}) for n in fp32_names})}
    for p in wanted:
        if p == "int8":
            checks[p] = _int8(files, models, fp32_names, runners, ref, data, graph, settings, max_drop, primary)
            on_ov = _on_openvino(files, models, checks[p], runners, ref, split, spec, max_drop, primary)
            if on_ov is not None:
                checks[p + OPENVINO] = on_ov
        elif p == "bf16":
            checks[p] = _bf16(files, models, fp32_names, runners, ref, split, spec, max_drop, primary)
        else:
            checks[p] = _fp16(files, models, fp32_names, runners, ref, split, spec, max_drop, primary)
    return Accuracy(data.name, "test", {t: split.size(t) for t in spec.task_names}, primary, float(max_drop), checks)


def _refuse(p: str, name: str, metrics, ref, drop, primary, max_drop: float, tried: str) -> CompileError:
    task, d = _worst(drop)
    key = primary[task][0]
    return CompileError(f"{p}: task {task!r}: {key} drops {d:.2%} relative on {name} (fp32 {ref[name][task][key]:.4g}, "
                        f"{p} {metrics[task][key]:.4g}; allowed {max_drop:.2%}){tried}; nothing was written: raise "
                        f"--max-metric-drop or compile without {p}")


def _add(files, models, name: str, p: str, data: bytes, err: float) -> str:
    out = variant_file(name, p)
    opset = next((o.version for o in onnx.load_from_string(data).opset_import if o.domain in ("", "ai.onnx")),
                 models[name].get("opset"))
    files[out] = data
    models[out] = {**models[name], "precision": p, "built_from": name, "verified_max_rel_error": err, "opset": opset}
    return out


def _int8(files, models, fp32_names, runners, ref, data, graph, settings, max_drop, primary) -> PrecisionCheck:
    spec = graph.spec
    feeds = calibration_feeds(data, list(graph.inputs), {t: graph.task_input(t) for t in spec.task_names}, settings)
    out = {}
    for name in fp32_names:
        def check(q: bytes, name=name):
            scored = _Scored(spec, data.test, OrtRunner(q, device="cpu"), models[name]["tasks"], runners[name])
            return scored, _drops(scored.metrics, ref[name], primary)

        best, tried = choose_int8(files[name], feeds, settings, check, max_drop)
        scored, drop = best.scored, dict(best.drop)
        if _worst(drop)[1] > max_drop:
            raise _refuse("int8", name, scored.metrics, ref, drop, primary, max_drop,
                          f" with every fallback ({', '.join(tried)}; best: {best.fallback})")
        file = _add(files, models, name, "int8", best.model, scored.max_rel_error)
        out[name] = ModelCheck(file, scored.metrics, drop, scored.max_rel_error, best.fallback, best.fp32_nodes)
    return PrecisionCheck("onnxruntime", out, Calibration(**asdict(settings)))


def _on_openvino(files, models, check: PrecisionCheck, runners, ref, split, spec, max_drop,
                 primary) -> PrecisionCheck | None:
    """``check``'s files scored on OpenVINO (f32 inference precision); None when OpenVINO is not
    installed or a task's metric drops too much there (the runtime then refuses that pairing)."""
    if openvino_unavailable() is not None:
        return None
    out = {}
    for name, c in check.models.items():
        try:
            runner = OvRunner(files[c.file])
        except RunnerError:
            return None
        scored = _Scored(spec, split, runner, models[name]["tasks"], runners[name])
        drop = _drops(scored.metrics, ref[name], primary)
        if _worst(drop)[1] > max_drop:
            return None
        out[name] = ModelCheck(c.file, scored.metrics, drop, scored.max_rel_error, c.fallback, c.fp32_nodes)
    return PrecisionCheck("openvino", out, check.calibration)


def _bf16(files, models, fp32_names, runners, ref, split, spec, max_drop, primary) -> PrecisionCheck:
    out = {}
    for name in fp32_names:
        try:
            runner = OvRunner(files[name], precision="bf16")
        except RunnerError as e:
            raise CompileError(f"bf16: {name}: {e}") from None
        scored = _Scored(spec, split, runner, models[name]["tasks"], runners[name])
        drop = _drops(scored.metrics, ref[name], primary)
        if _worst(drop)[1] > max_drop:
            raise _refuse("bf16", name, scored.metrics, ref, drop, primary, max_drop, " (OpenVINO bf16)")
        out[name] = ModelCheck(name, scored.metrics, drop, scored.max_rel_error)
    return PrecisionCheck("openvino", out)


def _fp16(files, models, fp32_names, runners, ref, split, spec, max_drop, primary) -> PrecisionCheck:
    out = {}
    for name in fp32_names:
        half = fp16_model(files[name])
        scored = _Scored(spec, split, OrtRunner(half, device="cpu"), models[name]["tasks"], runners[name])
        drop = _drops(scored.metrics, ref[name], primary)
        if _worst(drop)[1] > max_drop:
            raise _refuse("fp16", name, scored.metrics, ref, drop, primary, max_drop, " (ONNX Runtime, CPU)")
        file = _add(files, models, name, "fp16", half, scored.max_rel_error)
        out[name] = ModelCheck(file, scored.metrics, drop, scored.max_rel_error)
    return PrecisionCheck("onnxruntime", out)


def accuracy_table(accuracy: Accuracy) -> str:
    """The accuracy check as text: per reduced precision and model, each task's primary metric
    at fp32 and at that precision, the relative drop and the fallback used."""
    ref = accuracy.precisions[REFERENCE].models
    lines = [f"accuracy on the tasks ({accuracy.dataset}, {accuracy.split} split; allowed drop "
             f"{accuracy.max_metric_drop:.1%} relative)",
             f"{'precision':<15}{'model':<28}{'task':<14}{'metric':<12}{'fp32':>9}{'value':>9}{'drop':>8}  fallback"]
    for p, check in accuracy.precisions.items():
        if p == REFERENCE:
            continue
        for name, c in check.models.items():
            for t, d in c.drop.items():
                key = accuracy.primary[t][0]
                lines.append(f"{p:<15}{c.file:<28}{t:<14}{key:<12}{ref[name].metrics[t][key]:>9.4f}"
                             f"{c.metrics[t][key]:>9.4f}{d:>+8.2%}  {c.fallback or '-'}")
    return "\n".join(lines)

"""Reduced precisions at compile time, checked on the tasks (``dagc compile --precision``).

fp32 is always built: it is the reference. For each other precision every fp32 ONNX model of the
artifact (the shared model and each task's) gets its reduced form, which is run on the run's
held-out split and scored with the project's metrics (`dagc.trainer.evaluation.score`, the loop
`dagc train` evaluates with) next to the fp32 model on ONNX Runtime:

``int8``  QDQ ONNX files (`dagc.compiler.quantize`), calibrated on the run's training data; if a
          task's primary metric drops by more than ``max_drop`` (relative), the fewest of the
          most sensitive convs are kept in fp32 (`dagc.compiler.mixed_precision`), then the fixed
          fallbacks (`PrecisionSpec.fallbacks`); the first that passes is kept and recorded.
``bf16``  no files: OpenVINO running the fp32 ONNX files with bf16 inference precision.
``fp16``  fp16 ONNX files (onnxconverter-common, float32 inputs and outputs), for TensorRT / CUDA;
          checked with ONNX Runtime on the CPU.

When OpenVINO is installed the int8 files are also scored on it (``int8-openvino``); that check
is recorded only if it passes, and the runtime runs int8 on OpenVINO only then.

Each precision is one record of `dagc.precision_table` (how its files are made, which backend
checks it, its fallbacks) and one function checks them all (`check_precision`).

A precision that fails every attempt stops the compile with a CompileError naming the task, the
metric and the drop, before anything is written. The checks become the manifest's ``accuracy``
(`dagc.precisions.Accuracy`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from dagc.compiler.half import fp16_model
from dagc.compiler.mixed_precision import Attempt, choose_int8
from dagc.compiler.quantize import (
    CALIBRATIONS,
    INT8,
    calibration_feeds,
    load_run_data,
    with_settings,
)
from dagc.errors import CompileError, DataError, RunnerError
from dagc.manifest import ModelInfo
from dagc.precision_table import TABLE, Files, PrecisionSpec, spec_of
from dagc.precisions import (
    PRECISIONS,
    REFERENCE,
    Accuracy,
    Calibration,
    ModelCheck,
    PrecisionCheck,
    check_name,
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
    return tuple(p for p in PRECISIONS if TABLE[p].reference or p in names)


def check_options(precisions: Sequence[str], *, calibration_batches: int | None = None,
                  calibration_seed: int | None = None, max_metric_drop: float | None = None,
                  settings: Calibration = INT8, calibration: str | None = None) -> tuple[Calibration, float]:
    """The int8 settings (``settings`` with the calibration batches, seed and method given) and the
    allowed drop for a compile of ``precisions`` (`parse_precisions`); None: the default. Checked
    before any work: raises CompileError for a value out of range or of the wrong type, and for
    an option that configures a precision not asked for (it would be ignored without a word)."""
    reduced = [p for p in precisions if not TABLE[p].reference]
    calibrating = {k: v for k, v in (("--calibration-batches", calibration_batches),
                                     ("--calibration-seed", calibration_seed), ("--calibration", calibration))
                   if v is not None}
    quantized = [p.name for p in TABLE.values() if p.files is Files.QUANTIZED]
    if calibrating and not set(quantized) & set(precisions):
        verb, them = ("configure", "them") if len(calibrating) > 1 else ("configures", "it")
        q = quantized[0]
        raise CompileError(f"{' and '.join(calibrating)} {verb} the {q} calibration; add {q} to --precision "
                           f"(e.g. --precision {REFERENCE},{q}) or drop {them}")
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


def check_calibration(settings: Calibration, data, task_inputs: Mapping[str, str]) -> None:
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


# How each kind of files is made (`dagc.precision_table.Files`): (check, fp32 model file, score) ->
# the attempt to keep (the first that passes, else the best: the caller refuses it) and the names
# of the fallbacks tried. ``score`` runs model bytes on the record's backend: (scored, drops).
def _quantized(c: _Check, name: str, score: Callable) -> tuple[Attempt, list[str]]:
    return choose_int8(c.files[name], c.feeds(), c.settings, score, c.max_drop)


def _converted(c: _Check, name: str, score: Callable) -> tuple[Attempt, list[str]]:
    return _once(fp16_model(c.files[name]), score), []


def _shared(c: _Check, name: str, score: Callable) -> tuple[Attempt, list[str]]:
    return _once(c.files[name], score), []


def _once(data: bytes, score: Callable) -> Attempt:
    scored, drop = score(data)
    return Attempt(data, scored, dict(drop), None)


_MAKE = {Files.QUANTIZED: _quantized, Files.CONVERTED: _converted, Files.SHARED: _shared}
# The backends a precision is checked on (`PrecisionSpec.checked_on`): why not here, its runner of
# a model file at a precision, and its name in messages. The runtime's backends are not importable
# from the compiler (layers); these are the same runners, on the CPU.
_CHECK_RUNNERS = {
    "onnxruntime": (lambda p: None, lambda data, p: OrtRunner(data, device="cpu"), "ONNX Runtime, CPU"),
    "openvino": (openvino_unavailable, lambda data, p: OvRunner(data, precision=p), "OpenVINO"),
}


@dataclass
class _Check:
    """What one precision's check reads: the fp32 files and entries, their runners and metrics."""

    spec: PrecisionSpec
    files: dict[str, bytes]
    models: dict[str, ModelInfo]
    runners: dict[str, Runner]
    ref: dict[str, dict[str, dict[str, float]]]
    data: Any
    graph: Any
    settings: Calibration
    max_drop: float
    primary: dict[str, tuple[str, bool]]
    _feeds: list | None = None

    def feeds(self) -> list:
        """The calibration feeds, drawn once (`calibration_feeds`)."""
        if self._feeds is None:
            g = self.graph
            self._feeds = calibration_feeds(self.data, list(g.inputs), {t: g.task_input(t) for t in g.spec.task_names},
                                            self.settings)
        return self._feeds

    def score(self, data: bytes, backend: str, name: str) -> tuple[_Scored, dict[str, float]]:
        """Model bytes ``data`` (a form of fp32 file ``name``) run on ``backend`` over the held-out
        split: (scored, each task's drop against the fp32 file)."""
        try:
            runner = _CHECK_RUNNERS[backend][1](data, self.spec.name)
        except RunnerError as e:
            raise CompileError(f"{self.spec.name}: {name}: {e}") from None
        scored = _Scored(self.graph.spec, self.data.test, runner, self.models[name].tasks, self.runners[name])
        return scored, _drops(scored.metrics, self.ref[name], self.primary)


def check_precisions(files: dict[str, bytes], models: dict[str, ModelInfo], ck, graph,
                     precisions: Sequence[str], *, data_root: str | None = None, settings: Calibration = INT8,
                     max_drop: float = MAX_METRIC_DROP) -> Accuracy | None:
    """Add the reduced-precision forms of the fp32 ONNX models in ``files`` / ``models`` (model
    file -> `ModelInfo`) and return the accuracy record (None when only fp32 is
    asked for: no data is read then).

    Takes the checkpoint (its recorded configuration names the data; ``data_root`` replaces the
    recorded root of an on-disk dataset), the optimised IR, the precisions (`parse_precisions`),
    the int8 settings and the allowed relative drop of each task's primary metric. Every precision
    is checked the same way, by its record (`dagc.precision_table`, `check_precision`). Raises
    CompileError when a precision fails its check (after its fallbacks) or cannot run here,
    ConfigError / DataError when the data cannot be read.
    """
    wanted = [TABLE[p] for p in parse_precisions(precisions) if not TABLE[p].reference]
    if not wanted:
        return None
    settings, max_drop = check_options([s.name for s in wanted], max_metric_drop=max_drop, settings=settings)
    for s in wanted:
        reason = _CHECK_RUNNERS[s.checked_on][0](s.name)
        if reason:
            raise CompileError(f"--precision {s.name}: {reason}")
    data = load_run_data(ck, data_root)
    if any(s.files is Files.QUANTIZED for s in wanted):
        check_calibration(settings, data, {t: graph.task_input(t) for t in ck.spec.task_names})
    spec = ck.spec
    split = data.test
    primary = {t.name: primary_metric(t.kind) for t in spec.tasks}
    fp32_names = [n for n, m in models.items() if spec_of(m.precision).reference]
    runners = {n: OrtRunner(files[n], device="cpu") for n in fp32_names}
    ref = {n: _Scored(spec, split, runners[n], models[n].tasks).metrics for n in fp32_names}
    checks = {REFERENCE: PrecisionCheck(TABLE[REFERENCE].checked_on,
                                        {n: ModelCheck(n, ref[n], {}) for n in fp32_names})}
    for s in wanted:
        c = _Check(s, files, models, runners, ref, data, graph, settings, max_drop, primary)
        checks[s.name] = check_precision(c, fp32_names)
        for backend in s.also_checked_on:
            also = _check_also(c, checks[s.name], backend)
            if also is not None:
                checks[check_name(s.name, backend)] = also
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
                 models[name].opset)
    files[out] = data
    models[out] = replace(models[name], name=out, precision=p, built_from=name, verified_max_rel_error=err, opset=opset)
    return out


def check_precision(c: _Check, fp32_names: Sequence[str]) -> PrecisionCheck:
    """The check of one precision (its record ``c.spec``) on every fp32 model: the attempts its
    files' kind makes (`_MAKE`; for int8 whole-model, the mixed-precision search, then the
    fallbacks) are scored on the record's backend, the first within the allowed drop is kept (its
    files added to ``c.files`` / ``c.models`` when the precision has files of its own). Raises
    CompileError naming the task, the metric and the drop of the best attempt when none passes."""
    s = c.spec
    out = {}
    for name in fp32_names:
        best, tried = _MAKE[s.files](c, name, lambda data, name=name: c.score(data, s.checked_on, name))
        scored, drop = best.scored, dict(best.drop)
        if best.worst > c.max_drop:
            how = (f" with every fallback ({', '.join(tried)}; best: {best.fallback})" if s.fallbacks
                   else f" ({_CHECK_RUNNERS[s.checked_on][2]})")
            raise _refuse(s.name, name, scored.metrics, c.ref, drop, c.primary, c.max_drop, how)
        file = _add(c.files, c.models, name, s.name, best.model, scored.max_rel_error) if s.own_files else name
        out[name] = ModelCheck(file, scored.metrics, drop, scored.max_rel_error, best.fallback, best.fp32_nodes)
    return PrecisionCheck(s.checked_on, out, c.settings if s.files is Files.QUANTIZED else None)


def _check_also(c: _Check, check: PrecisionCheck, backend: str) -> PrecisionCheck | None:
    """``check``'s files scored on another ``backend`` (`PrecisionSpec.also_checked_on`); None when
    it is not installed or a task's metric drops too much there (the runtime then refuses that
    pairing)."""
    if _CHECK_RUNNERS[backend][0](c.spec.name) is not None:
        return None
    out = {}
    for name, m in check.models.items():
        try:
            scored, drop = c.score(c.files[m.file], backend, name)
        except CompileError:
            return None
        if _worst(drop)[1] > c.max_drop:
            return None
        out[name] = ModelCheck(m.file, scored.metrics, drop, scored.max_rel_error, m.fallback, m.fp32_nodes)
    return PrecisionCheck(backend, out, check.calibration)


def accuracy_table(accuracy: Accuracy) -> str:
    """The accuracy check as text: per reduced precision and model, each task's primary metric
    at fp32 and at that precision, the relative drop and the fallback used."""
    ref = accuracy.precisions[REFERENCE].models
    lines = [f"accuracy on the tasks ({accuracy.dataset}, {accuracy.split} split; allowed drop "
             f"{accuracy.max_metric_drop:.1%} relative)",
             f"{'precision':<15}{'model':<28}{'task':<14}{'metric':<12}{REFERENCE:>9}{'value':>9}{'drop':>8}  fallback"]
    for p, check in accuracy.reduced().items():
        for name, c in check.models.items():
            for t, d in c.drop.items():
                key = accuracy.primary[t][0]
                lines.append(f"{p:<15}{c.file:<28}{t:<14}{key:<12}{ref[name].metrics[t][key]:>9.4f}"
                             f"{c.metrics[t][key]:>9.4f}{d:>+8.2%}  {c.fallback or '-'}")
    return "\n".join(lines)

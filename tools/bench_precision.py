"""`dagc bench`'s reduced-precision variants: the shared model at each precision the artifact
holds, and on OpenVINO, timed with the other variants and shown with the task metrics' deltas
that the compile's accuracy check recorded (`dagc.precisions.Accuracy`).

Variants (added only when the engine's backend is ONNX Runtime and the artifact has them):

``shared:int8``, ``shared:fp16``
    the shared model's int8 QDQ / fp16 file through the runtime (``load(..., precision=p)``).
``openvino``, ``openvino:int8``, ``openvino:bf16``
    the shared model on OpenVINO (backend ``openvino``): the fp32 file at f32 inference
    precision, the int8 QDQ file, and the fp32 file at bf16 (only with a passed bf16 check).

Ratios (``ratios["precisions"]``): ``speedup_vs_fp32`` = p50(shared) / p50(variant).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dagc.errors import ArtifactError, BenchError
from dagc.manifest import Manifest
from dagc.precisions import FILE_PRECISIONS, OPENVINO, PRECISIONS, REFERENCE, check_loadable, precision_of
from dagc.runners import Runner, openvino_unavailable
from dagc.runtime import Engine, load

__all__ = ["check_requested", "variants", "ratios", "metric_deltas", "table_lines"]

# variant key -> (backend, precision)
_VARIANTS = {"shared:int8": ("onnxruntime", "int8"), "shared:fp16": ("onnxruntime", "fp16"),
             "openvino": ("openvino", "fp32"), "openvino:int8": ("openvino", "int8"),
             "openvino:bf16": ("openvino", "bf16")}


def variants(manifest: Manifest, resolved_backend: str) -> dict[str, tuple[str, str]]:
    """The variants this artifact and machine can run: key -> (backend, precision)."""
    if resolved_backend != "onnxruntime":
        return {}
    have = {precision_of(m) for m in manifest.models.values() if m.format == "onnx"}
    acc = manifest.accuracy
    if acc is not None and acc.passed("bf16"):
        have.add("bf16")
    out = {}
    for key, (backend, p) in _VARIANTS.items():
        if p not in have or (backend == "onnxruntime" and p == "bf16"):
            continue
        if backend == "openvino" and p in FILE_PRECISIONS and (acc is None or not acc.passed(p + OPENVINO)):
            continue
        if backend == "openvino" and openvino_unavailable(p) is not None:
            continue
        out[key] = (backend, p)
    return out


def check_requested(manifest: Manifest, precisions: Sequence[str] | None, backend: str, where: Any) -> None:
    """Refuse (BenchError, before anything is timed) a precision asked for by name that this
    benchmark would not time: an unknown one, one the artifact has no models or passed check of
    (`dagc.precisions.check_loadable`), or any reduced one when the engines' ``backend`` (``auto``
    before it is resolved) is not ONNX Runtime (the variants run beside its engine only)."""
    unknown = sorted(set(precisions or ()) - set(PRECISIONS))
    if unknown:
        raise BenchError(f"unknown precision {unknown[0]!r}; --precision takes a comma-separated list of "
                         f"{list(PRECISIONS)}")
    reduced = [p for p in precisions or () if p != REFERENCE]
    if reduced and backend not in ("auto", "onnxruntime"):
        raise BenchError(f"--precision {','.join(reduced)} is timed beside the onnxruntime engines, not backend "
                         f"{backend!r}; use --backend onnxruntime (or drop --precision)")
    for p in reduced:
        try:
            check_loadable(manifest.accuracy, manifest.models, p, "openvino" if p == "bf16" else "onnxruntime",
                           f"artifact {where}")
        except ArtifactError as e:
            raise BenchError(f"--precision {p}: {e}") from None
        if p == "bf16" and openvino_unavailable(p) is not None:
            raise BenchError(f"--precision bf16: {openvino_unavailable(p)}")


def add_variants(bench: Any, engine_runner: Callable[[Engine, None], Runner], costs: dict[str, Any],
                 precisions: Sequence[str] | None = None) -> None:
    """Add the variants to a running `dagc.tools.bench` benchmark (``bench.add``, like the other
    variants); ``engine_runner(engine, None)`` wraps an engine as the runner of all its tasks.
    ``precisions``: only the variants of these (None: all). Raises BenchError for an unknown one."""
    check_requested(bench.manifest, precisions, bench.engines[None].backend, bench.artifact_dir)
    found = variants(bench.manifest, bench.engines[None].backend)
    for key, (backend, p) in found.items():
        if precisions is not None and p not in precisions:
            continue
        def build(backend: str = backend, p: str = p) -> tuple[Runner, int]:
            eng = load(bench.artifact_dir, backend, threads=bench.threads, precision=p)
            entry = bench.manifest.models.get(eng.model_for(None))
            return engine_runner(eng, None), 0 if entry is None else entry.cost.params

        label = f"compiled shared model, {p}, {'OpenVINO' if backend == 'openvino' else 'runtime'}"
        bench.add(key, label, build, costs)


def ratios(stats: dict[str, dict]) -> dict[str, Any]:
    """``{"precisions": key -> {"speedup_vs_fp32"}}`` for the variants present in ``stats``."""
    d = stats["shared"]["p50_ms"]
    found = {k: {"speedup_vs_fp32": d / stats[k]["p50_ms"]} for k in _VARIANTS if k in stats}
    return {"precisions": found} if found else {}


def metric_deltas(manifest: Manifest) -> dict[str, Any]:
    """The shared model's primary metric per task at fp32 and at each checked precision, with the
    relative drop, from the manifest's accuracy check: precision -> task -> {metric, fp32, value,
    drop}. Empty when the artifact has no check."""
    acc = manifest.accuracy
    if acc is None:
        return {}
    shared = next(n for n, m in manifest.models.items() if m.format == "onnx" and precision_of(m) == REFERENCE
                  and set(m.tasks) == set(manifest.spec.task_names) and n in acc.precisions[REFERENCE].models)
    ref = acc.precisions[REFERENCE].models[shared].metrics
    out: dict[str, Any] = {}
    for p, check in acc.precisions.items():
        if p == REFERENCE or shared not in check.models:
            continue
        c = check.models[shared]
        out[p] = {t: {"metric": acc.primary[t][0], "fp32": ref[t][acc.primary[t][0]],
                      "value": c.metrics[t][acc.primary[t][0]], "drop": c.drop[t], "fallback": c.fallback}
                  for t in c.drop}
    return out


def table_lines(result: dict[str, Any], ratios_of_batch: dict[str, Any] | None = None) -> list[str]:
    """Lines for `dagc.tools.bench_report.format_table`: with ``ratios_of_batch``, the batch's
    speed-ups over the fp32 shared model; without, the recorded metric deltas."""
    if ratios_of_batch is not None:
        found = ratios_of_batch.get("precisions")
        if not found:
            return []
        return ["  vs fp32 shared model: " + "; ".join(f"{k} {v['speedup_vs_fp32']:.2f}x" for k, v in found.items())]
    deltas = result.get("precision_metrics") or {}
    if not deltas:
        return []
    lines = ["", "task metrics of the shared model (held-out split, from the compile's accuracy check)",
             f"  {'precision':<15}{'task':<14}{'metric':<12}{'fp32':>10}{'value':>10}{'drop':>9}"]
    for p, tasks in deltas.items():
        for t, row in tasks.items():
            lines.append(f"  {p:<15}{t:<14}{row['metric']:<12}{row['fp32']:>10.4f}{row['value']:>10.4f}"
                         f"{row['drop']:>+9.2%}")
    return lines

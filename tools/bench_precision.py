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
from dagc.precision_table import TABLE
from dagc.precisions import PRECISIONS, REDUCED, REFERENCE, check_loadable
from dagc.runners import Runner
from dagc.runtime import Engine, backends, load

__all__ = ["engine_backends", "check_requested", "variants", "ratios", "metric_deltas", "table_lines"]


def engine_backends() -> tuple[str, ...]:
    """The backends whose engines are benchmarked: every runtime backend but those timed beside
    the engines (OpenVINO: `dagc.tools.bench_precision`), registered ones included."""
    return tuple(b for b in backends.known() if b not in backends.REGISTRY or not backends.REGISTRY[b].beside)


def _candidates(host: backends.Backend) -> dict[str, tuple[str, str]]:
    """Every variant beside engines of backend ``host``: key -> (backend, precision): the host's
    own reduced precisions (``shared:int8``) and each ``beside`` backend's precisions
    (``openvino``, ``openvino:bf16``)."""
    out = {f"shared:{p}": (host.name, p) for p in host.precisions if not TABLE[p].reference}
    for b in backends.REGISTRY.values():
        if b.beside:
            out.update({b.name if TABLE[p].reference else f"{b.name}:{p}": (b.name, p) for p in b.precisions})
    return out


def _runs(manifest: Manifest, backend: str, precision: str) -> str | None:
    """Why ``backend`` cannot run the artifact's models at ``precision`` here, or None."""
    try:
        check_loadable(manifest.accuracy, manifest.models, precision, backend, "the artifact")
    except ArtifactError as e:
        return str(e)
    return backends.REGISTRY[backend].unavailable(precision)


def variants(manifest: Manifest, resolved_backend: str) -> dict[str, tuple[str, str]]:
    """The variants this artifact and machine can run: key -> (backend, precision)."""
    host = backends.backend(resolved_backend)
    if not host.bench_host:
        return {}
    return {k: v for k, v in _candidates(host).items() if _runs(manifest, *v) is None}


def check_requested(manifest: Manifest, precisions: Sequence[str] | None, backend: str, where: Any) -> None:
    """Refuse (BenchError, before anything is timed) a precision asked for by name that this
    benchmark would not time: an unknown one, one the artifact has no models or passed check of
    (`dagc.precisions.check_loadable`), or any reduced one when the engines' ``backend`` (``auto``
    before it is resolved: any it may resolve to) times no variants beside it."""
    unknown = sorted(set(precisions or ()) - set(PRECISIONS))
    if unknown:
        raise BenchError(f"unknown precision {unknown[0]!r}; --precision takes a comma-separated list of "
                         f"{list(PRECISIONS)}")
    reduced = [p for p in precisions or () if p in REDUCED]
    hosts = [b for b in backends.candidates(backend) if b.bench_host]
    if reduced and not hosts:
        named = " or ".join(b.name for b in backends.REGISTRY.values() if b.bench_host)
        raise BenchError(f"--precision {','.join(reduced)} is timed beside the {named} engines, not backend "
                         f"{backend!r}; use --backend {named} (or drop --precision)")
    for p in reduced:
        on = [v for v in _candidates(hosts[0]).values() if v[1] == p]
        why = [_runs(manifest, *v) for v in on]
        if on and all(why):
            raise BenchError(f"--precision {p}: {why[0].replace('the artifact', f'artifact {where}', 1)}")


def add_variants(bench: Any, engine_runner: Callable[[Engine, None], Runner], costs: dict[str, Any],
                 precisions: Sequence[str] | None = None) -> None:
    """Add the variants to a running `dagc.tools.bench` benchmark (``bench.add``, like the other
    variants); ``engine_runner(engine, None)`` wraps an engine as the runner of all its tasks.
    ``precisions``: only the variants of these (None: all). Raises BenchError for an unknown one."""
    host = bench.engines[None].backend
    check_requested(bench.manifest, precisions, host, bench.artifact_dir)
    found = variants(bench.manifest, host)
    for key, (backend, p) in found.items():
        if precisions is not None and p not in precisions:
            continue
        def build(backend: str = backend, p: str = p) -> tuple[Runner, int]:
            eng = load(bench.artifact_dir, backend, threads=bench.threads, precision=p)
            entry = bench.manifest.models.get(eng.model_for(None))
            return engine_runner(eng, None), 0 if entry is None else entry.cost.params

        where = "runtime" if backend == host else backends.REGISTRY[backend].label
        bench.add(key, f"compiled shared model, {p}, {where}", build, costs)


def ratios(stats: dict[str, dict]) -> dict[str, Any]:
    """``{"precisions": key -> {"speedup_vs_fp32"}}`` for the variants present in ``stats``."""
    d = stats["shared"]["p50_ms"]
    keys = {k for host in backends.REGISTRY.values() if host.bench_host for k in _candidates(host)}
    found = {k: {"speedup_vs_fp32": d / stats[k]["p50_ms"]} for k in stats if k in keys}
    return {"precisions": found} if found else {}


def metric_deltas(manifest: Manifest) -> dict[str, Any]:
    """The shared model's primary metric per task at fp32 and at each checked precision, with the
    relative drop, from the manifest's accuracy check: precision -> task -> {metric, fp32, value,
    drop}. Empty when the artifact has no check."""
    acc = manifest.accuracy
    if acc is None:
        return {}
    shared = next(n for n, m in manifest.models.items() if n in acc.precisions[REFERENCE].models
                  and set(m.tasks) == set(manifest.spec.task_names))
    ref = acc.precisions[REFERENCE].models[shared].metrics
    out: dict[str, Any] = {}
    for p, check in acc.reduced().items():
        if shared not in check.models:
            continue
        c = check.models[shared]
        out[p] = {t: {"metric": acc.primary[t][0], REFERENCE: ref[t][acc.primary[t][0]],
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
             f"  {'precision':<15}{'task':<14}{'metric':<12}{REFERENCE:>10}{'value':>10}{'drop':>9}"]
    for p, tasks in deltas.items():
        for t, row in tasks.items():
            lines.append(f"  {p:<15}{t:<14}{row['metric']:<12}{row[REFERENCE]:>10.4f}{row['value']:>10.4f}"
                         f"{row['drop']:>+9.2%}")
    return lines

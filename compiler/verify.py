"""Verification of an emitted ONNX model against a reference (normally the masked supernet).

`verify` runs the model in ONNX Runtime (CPU) on seeded random inputs and compares every output
with the reference's, relative to the output scale; a compile refuses to write an artifact when the
error of any task exceeds the tolerance. `supernet_reference` wraps a `CentralNetwork` as such a
reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from dagc.compiler.ir import Graph
from dagc.errors import CompileError
from dagc.runners import session_options
from dagc.spec import Spec

Reference = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]

__all__ = ["verify", "supernet_reference", "random_inputs", "relative_error"]


def _spec_of(graph_or_spec: Graph | Spec) -> Spec:
    spec = getattr(graph_or_spec, "spec", graph_or_spec)
    if not isinstance(spec, Spec):
        raise TypeError(f"expected a dagc Graph or Spec, got {type(graph_or_spec).__name__}")
    return spec


def random_inputs(model: onnx.ModelProto, spec: Spec, *, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One float32 standard-normal array (batch, C, H, W) per model input, in the model's input order."""
    h, w = spec.input_size
    shape = (batch, spec.in_channels, h, w)
    return {vi.name: rng.standard_normal(shape).astype(np.float32) for vi in model.graph.input}


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max|got - ref| / max(1, max|ref|); inf when shapes differ or ``got`` is not finite."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape or not np.all(np.isfinite(got)):
        return float("inf")
    if got.size == 0:
        return 0.0
    return float(np.max(np.abs(got - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def verify(model: onnx.ModelProto, reference: Reference, graph_or_spec: Graph | Spec, *, n_inputs: int = 3,
           batch: int = 2, seed: int = 0, rtol: float = 1e-4) -> dict[str, float]:
    """Check that ``model`` computes what ``reference`` computes.

    Takes the ONNX model, a reference (dict input name -> array  ->  dict task -> array), the IR or
    spec (for the input shape), the number of random inputs, their batch size, the seed and the
    tolerance. Each model input gets seeded standard-normal noise; each output (named after its
    task) is compared with the reference's output of the same name. Returns task -> worst relative
    error (max|onnx - ref| / max(1, max|ref|)) over the inputs. Raises CompileError naming the
    task and its error if any error exceeds ``rtol`` (or the reference lacks a task the model has).
    """
    import onnxruntime as ort

    spec = _spec_of(graph_or_spec)
    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(seed)
    feeds = (random_inputs(model, spec, batch=batch, rng=rng) for _ in range(n_inputs))
    return compare_with_reference(lambda f: dict(zip(names, session.run(names, f))), reference, feeds, names,
                                  rtol=rtol, what="compiled model")


def compare_with_reference(run: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]], reference: Reference,
                           feeds: Iterable[dict[str, np.ndarray]], outputs: Sequence[str], *, rtol: float,
                           what: str) -> dict[str, float]:
    """Run ``run`` and ``reference`` on every feed dict and compare the ``outputs`` (task names).

    Returns task -> worst relative error (`relative_error`) over the feeds. Raises CompileError
    naming the task (and ``what`` was compared) if the reference lacks a task or an error exceeds
    ``rtol``.
    """
    worst = dict.fromkeys(outputs, 0.0)
    for f in feeds:
        got = run(f)
        ref = reference(dict(f))
        for t in outputs:
            if t not in ref:
                raise CompileError(f"task {t!r}: the reference computes no output for it (it has "
                                   f"{sorted(ref)}); nothing was written")
            worst[t] = max(worst[t], relative_error(np.asarray(got[t]), np.asarray(ref[t])))
    for t in outputs:
        if not worst[t] <= rtol:
            raise CompileError(f"task {t!r}: the {what} differs from the masked supernet by "
                               f"{worst[t]:.1e} (relative to the output scale; tolerance {rtol:.0e}); "
                               "nothing was written")
    return worst


def supernet_reference(net, tasks: Sequence[str] | None = None) -> Reference:
    """A reference that runs the masked supernet ``net`` (a `CentralNetwork`) in eval mode, float32.

    With a shared input it reads ``x["image"]``; with per-task inputs it runs the tasks whose
    ``image_<task>`` the dict holds (the inputs of the model being verified). ``tasks`` restricts
    the tasks computed (default: all that the inputs allow). Returns task -> numpy array.
    """
    import torch

    spec = net.spec

    def run(x: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        was_training = net.training
        net.eval()
        try:
            out = _forward(x)
        finally:
            net.train(was_training)
        return {t: v.detach().cpu().numpy() for t, v in out.items()}

    def _forward(x: Mapping[str, np.ndarray]):
        with torch.no_grad():
            if spec.shared_input:
                names = list(tasks) if tasks is not None else list(spec.task_names)
                out = net(torch.from_numpy(np.ascontiguousarray(x["image"], dtype=np.float32)), tasks=names)
            else:
                names = [t for t in (tasks if tasks is not None else spec.task_names) if f"image_{t}" in x]
                if not names:
                    raise CompileError(f"no per-task input among {sorted(x)} for tasks {list(spec.task_names)}")
                out = net({t: torch.from_numpy(np.ascontiguousarray(x[f"image_{t}"], dtype=np.float32))
                           for t in names}, tasks=names)
        return out

    return run

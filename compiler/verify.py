"""Verification of an emitted ONNX model against a reference (normally the masked supernet).

`verify` runs the model in ONNX Runtime (CPU) on seeded random inputs and compares every output
with the reference's through `dagc.runners.compare`, relative to the output scale; a compile
refuses to write an artifact when the error of any task exceeds the tolerance.
`supernet_reference` wraps a `CentralNetwork` as such a reference (a `Runner`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from dagc.compiler.ir import Graph
from dagc.compiler.runners import SupernetRunner
from dagc.runners import OrtRunner, Runner, compare, relative_error
from dagc.spec import Spec
from dagc.trainer.network import CentralNetwork

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


def verify(model: onnx.ModelProto, reference: Runner, graph_or_spec: Graph | Spec, *, n_inputs: int = 3,
           batch: int = 2, seed: int = 0, rtol: float = 1e-4) -> dict[str, float]:
    """Check that ``model`` computes what ``reference`` computes.

    Takes the ONNX model, a reference runner (normally `supernet_reference`), the IR or spec (for
    the input shape), the number of random inputs, their batch size, the seed and the tolerance.
    Each model input gets seeded standard-normal noise; each output (named after its task) is
    compared with the reference's output of the same name. Returns task -> worst relative error
    (max|onnx - ref| / max(1, max|ref|)) over the inputs. Raises CompileError naming the task and
    its error if any error exceeds ``rtol`` (or the reference lacks a task the model has).
    """
    spec = _spec_of(graph_or_spec)
    runner = OrtRunner(model.SerializeToString(), device="cpu")
    rng = np.random.default_rng(seed)
    feeds = (random_inputs(model, spec, batch=batch, rng=rng) for _ in range(n_inputs))
    return compare(runner, reference, feeds, rtol=rtol, what="compiled model")


def supernet_reference(net: CentralNetwork, tasks: Sequence[str] | None = None) -> SupernetRunner:
    """The masked supernet ``net`` as a reference runner (`SupernetRunner`): eval mode, float32.

    With a shared input it reads ``feeds["image"]``; with per-task inputs it runs the tasks whose
    ``image_<task>`` the feeds hold (the inputs of the model being verified). ``tasks`` restricts
    the tasks computed (default: all that the inputs allow). Calling it with a feed dict returns
    task -> numpy array.
    """
    return SupernetRunner(net, tasks)

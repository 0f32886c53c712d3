"""The compiler's `dagc.runners.Runner` implementations, all in PyTorch: the masked supernet (the
reference every emitted model is verified against), the lowered static module and AOTInductor
packages.

All run in float32 under ``torch.no_grad`` and return numpy arrays keyed by task.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from dagc.compiler.ir import input_name
from dagc.compiler.lower import LoweredModel
from dagc.errors import CompileError
from dagc.trainer.network import CentralNetwork

__all__ = ["SupernetRunner", "ModuleRunner", "LoweredRunner", "AotiRunner", "load_package"]


def _tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class SupernetRunner:
    """A `CentralNetwork` (normally the masked supernet; without masks the unpruned one) as a
    runner, in eval mode, on the device its parameters are on.

    Takes the network and the tasks it may compute (default: all). ``inputs``: ``("image",)`` with
    a shared input, else ``image_<task>`` per task; ``outputs``: the tasks. `run` computes the
    requested tasks that it may compute and, with per-task inputs, whose ``image_<task>`` the feeds
    hold (the inputs of the model being verified); it raises CompileError when that leaves none.
    Calling the runner with a feed dict is ``run(feeds)``.
    """

    def __init__(self, net: CentralNetwork, tasks: Sequence[str] | None = None) -> None:
        self.net = net
        spec = net.spec
        self.shared_input = spec.shared_input
        self.outputs = tuple(spec.task_names if tasks is None else tasks)
        self.inputs = (input_name(None),) if spec.shared_input else tuple(input_name(t) for t in self.outputs)

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run(dict(feeds))

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """See `dagc.runners.Runner.run` and the class docstring."""
        names = list(self.outputs) if outputs is None else [t for t in outputs if t in self.outputs]
        if not self.shared_input:
            names = [t for t in names if input_name(t) in feeds]
            if not names:
                raise CompileError(f"no per-task input among {sorted(feeds)} for tasks {list(self.outputs)}")
        net = self.net
        device = next(net.parameters()).device
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                if self.shared_input:
                    out = net(_tensor(feeds[input_name(None)], device), tasks=names)
                else:
                    out = net({t: _tensor(feeds[input_name(t)], device) for t in names}, tasks=names)
        finally:
            net.train(was_training)
        return {t: _numpy(out[t]) for t in names}


class ModuleRunner:
    """A PyTorch callable that takes its inputs positionally and returns one tensor per output,
    as a runner. Takes the callable, its input and output names, in its order, and the device its
    inputs go to (``cpu`` by default; the callable must compute there)."""

    def __init__(self, fn: Callable[..., Sequence[torch.Tensor]], inputs: Sequence[str], outputs: Sequence[str],
                 device: str = "cpu") -> None:
        self.fn = fn
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.device = torch.device(device)

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """See `dagc.runners.Runner.run`."""
        with torch.no_grad():
            got = dict(zip(self.outputs, self.fn(*(_tensor(feeds[i], self.device) for i in self.inputs)), strict=True))
        return {t: _numpy(got[t]) for t in (self.outputs if outputs is None else outputs)}


class LoweredRunner(ModuleRunner):
    """The lowered static module (`dagc.compiler.lower.lower`) as a runner."""

    def __init__(self, module: LoweredModel) -> None:
        super().__init__(module.eval(), module.inputs, module.tasks)


def load_package(data: bytes):
    """Load AOTInductor ``.pt2`` bytes in Python; returns a callable (*inputs) -> list of tensors."""
    import torch._inductor  # only AOTInductor needs inductor, whose import takes seconds

    with tempfile.TemporaryDirectory(prefix="dagc-aoti-") as tmp:
        path = Path(tmp) / "model.pt2"
        path.write_bytes(data)
        # The loader extracts the package into its own directory, so ours can go at once.
        return torch._inductor.aoti_load_package(str(path))


class AotiRunner(ModuleRunner):
    """An AOTInductor package as a runner. Takes the ``.pt2`` bytes, the input and output names
    in the order the package takes and returns them (`dagc.compiler.aoti.build_package`) and the
    device it was compiled for (its inputs go there)."""

    def __init__(self, data: bytes, inputs: Sequence[str], outputs: Sequence[str], device: str = "cpu") -> None:
        super().__init__(load_package(data), inputs, outputs, device)

"""The naive export that `dagc bench` measures the compiled models against: the masked supernet
exported with ``torch.onnx.export`` as a user would without dagc, and the runner of its ONNX
Runtime sessions."""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dagc.runners import OrtRunner
from dagc.trainer.network import CentralNetwork

__all__ = ["naive_export", "NaiveRunner"]


def _wrapper(net: CentralNetwork) -> torch.nn.Module:
    spec = net.spec

    class NaiveWrapper(torch.nn.Module):
        """The masked supernet with tensor inputs and a tuple of task outputs (what export needs)."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, *xs):
            if spec.shared_input:
                out = self.net(xs[0])
            else:
                out = self.net(dict(zip(spec.task_names, xs)))
            return tuple(out[t] for t in spec.task_names)

    return NaiveWrapper().eval()


def naive_export(net: CentralNetwork, batch: int, *, dynamic: bool = True) -> tuple[bytes, dict[str, Any]]:
    """Export the masked supernet ``net`` with ``torch.onnx.export``; returns (ONNX bytes, info).

    The TorchScript exporter (``dynamo=False``) traces the network, so the masks' Python branches
    are baked in: the stacked lanes, gathers and index-adds are exported as they run. Two changes
    are unavoidable: (1) the dynamo exporter (``dynamo=True``) cannot trace the network at all (its
    lane selection reads the masks with ``.tolist()``, a data-dependent branch), so the TorchScript
    exporter is used; (2) it refuses the stacked ASPP heads' zero-padded grouped-convolution weight
    (``F.pad``: "convolution for kernel of unknown shape"), so during the export the padding is done
    by concatenating zeros (same values). With ``dynamic`` the batch axis is dynamic (one export for
    every batch size); otherwise the model is exported at ``batch``.
    """
    spec = net.spec
    h, w = spec.input_size
    names = ["image"] if spec.shared_input else [f"image_{t}" for t in spec.task_names]
    example = tuple(torch.zeros(batch, spec.in_channels, h, w) for _ in names)
    buf = io.BytesIO()
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_wrapper(net), example, buf, dynamo=False, input_names=names,
                          output_names=list(spec.task_names), opset_version=17,
                          dynamic_axes={n: {0: "batch"} for n in names} if dynamic else None)
    info = {"exporter": f"torch.onnx.export(dynamo=False), torch {torch.__version__}, opset 17",
            "dynamic_batch": dynamic, "export_seconds": round(time.perf_counter() - t0, 3),
            "note": "TorchScript exporter (the dynamo exporter fails on the masks' data-dependent "
                    "lane selection)"}
    return buf.getvalue(), info


class NaiveRunner:
    """The naive export's ONNX Runtime sessions as one runner: a dynamic-batch model (key None) or
    one static model per batch size (keys: batch sizes; `run` picks the feeds' batch).

    Takes the ONNX bytes by key, the intra-op thread count and the device (``cpu`` or ``cuda``,
    see `dagc.runners.ort_providers`)."""

    def __init__(self, models: Mapping[int | None, bytes], threads: int | None, device: str) -> None:
        self.runners = {b: OrtRunner(data, threads=threads, device=device) for b, data in models.items()}
        first = next(iter(self.runners.values()))
        self.inputs, self.outputs = first.inputs, first.outputs

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """See `dagc.runners.Runner.run`."""
        batch = next(iter(feeds.values())).shape[0]
        runner = self.runners.get(batch) or self.runners[None]
        return runner.run(feeds, outputs)

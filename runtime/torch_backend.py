"""The ``torch`` backend of the runtime: a small interpreter of the ONNX operator set dagc emits
(Conv, BatchNormalization, Relu, MaxPool, AveragePool, Resize, Sum/Add/Mul/Div/Sub, ReduceL2,
Max/Min, GlobalAveragePool, Flatten, Gemm, Identity, Constant) written with
``torch.nn.functional``, reading the weights from the ONNX initializers.

An artifact holds no checkpoint, so this is how the lowered computation is reproduced in PyTorch
(the reference backend). `TorchRunner` is a `dagc.runners.Runner`: stateless, thread-safe, run
under ``torch.inference_mode``, on the CPU or, with ``device="cuda"``, on the GPU (weights moved
there once; inputs copied there and outputs back on each call). ``torch`` and ``onnx`` are imported when a runner is created, so
that importing the runtime for ONNX Runtime or TensorRT does not load them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from dagc.errors import ArtifactError, DagcError

__all__ = ["TorchRunner"]


def _ints(v, n=2):
    return [int(a) for a in v] if v is not None else None


def _pads(attrs, node) -> tuple[int, int]:
    pads = _ints(attrs.get("pads")) or [0, 0, 0, 0]
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise ArtifactError(f"node {node!r}: auto_pad is not supported by the torch backend")
    if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3]:
        raise ArtifactError(f"node {node!r}: asymmetric pads {pads} are not supported by the torch backend")
    return pads[0], pads[1]


# Each builder takes (torch, torch.nn.functional, op, attributes, node name, unsupported) and
# returns the node's function: torch is imported once, by `_compile_node`, when a torch runner is
# created (importing the runtime must not load it).
def _conv(torch, F, op, attrs, name, unsupported):
    ph, pw = _pads(attrs, name)
    stride = _ints(attrs.get("strides")) or [1, 1]
    dil = _ints(attrs.get("dilations")) or [1, 1]
    group = int(attrs.get("group", 1))
    return lambda x, w, b=None: F.conv2d(x, w, b, stride, (ph, pw), dil, group)


def _batch_norm(torch, F, op, attrs, name, unsupported):
    if attrs.get("training_mode", 0):
        raise unsupported("training mode")
    eps = float(attrs.get("epsilon", 1e-5))
    return lambda x, s, b, m, v: F.batch_norm(x, m, v, s, b, False, 0.0, eps)


def _max_pool(torch, F, op, attrs, name, unsupported):
    ph, pw = _pads(attrs, name)
    k, stride = _ints(attrs["kernel_shape"]), _ints(attrs.get("strides")) or [1, 1]
    ceil = bool(attrs.get("ceil_mode", 0))
    dil = _ints(attrs.get("dilations")) or [1, 1]
    return lambda x: F.max_pool2d(x, k, stride, (ph, pw), dil, ceil)


def _average_pool(torch, F, op, attrs, name, unsupported):
    ph, pw = _pads(attrs, name)
    k, stride = _ints(attrs["kernel_shape"]), _ints(attrs.get("strides")) or [1, 1]
    ceil, include = bool(attrs.get("ceil_mode", 0)), bool(attrs.get("count_include_pad", 0))
    return lambda x: F.avg_pool2d(x, k, stride, (ph, pw), ceil, include)


def _flatten(torch, F, op, attrs, name, unsupported):
    axis = int(attrs.get("axis", 1))

    def flatten(x):
        a = axis if axis >= 0 else axis + x.dim()
        return x.reshape(int(np.prod(x.shape[:a])), -1)

    return flatten


def _gemm(torch, F, op, attrs, name, unsupported):
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    ta, tb = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))

    def gemm(a, b, c=None):
        a = a.t() if ta else a
        if tb and alpha == 1.0 and beta == 1.0:
            return F.linear(a, b, c)
        y = alpha * (a @ (b.t() if tb else b))
        return y if c is None else y + beta * c

    return gemm


def _reduce_l2(torch, F, op, attrs, name, unsupported):
    keep = bool(attrs.get("keepdims", 1))
    axes_attr = attrs.get("axes")

    def reduce_l2(x, axes=None):
        dims = axes_attr if axes is None else axes.tolist()
        dims = tuple(int(d) for d in dims) if dims is not None and len(dims) else tuple(range(x.dim()))
        return torch.linalg.vector_norm(x, 2, dim=dims, keepdim=keep)

    return reduce_l2


def _resize(torch, F, op, attrs, name, unsupported):
    if attrs.get("mode", "nearest") != "linear":
        raise unsupported(f"mode {attrs.get('mode', 'nearest')!r}")
    ctm = attrs.get("coordinate_transformation_mode", "half_pixel")
    if ctm not in ("half_pixel", "pytorch_half_pixel"):
        raise unsupported(f"coordinate_transformation_mode {ctm!r}")
    if attrs.get("antialias", 0):
        raise unsupported("antialias")

    def resize(x, roi=None, scales=None, sizes=None):
        if sizes is not None and sizes.numel():
            return F.interpolate(x, size=[int(s) for s in sizes.tolist()[2:]], mode="bilinear", align_corners=False)
        s = [float(v) for v in scales.tolist()]
        if s[:2] != [1.0, 1.0]:
            raise DagcError(f"Resize node {name!r}: scaling batch or channels is not supported")
        return F.interpolate(x, scale_factor=s[2:], mode="bilinear", align_corners=False)

    return resize


def _elementwise(torch, F, op, attrs, name, unsupported):
    return {"Relu": F.relu, "Mul": torch.mul, "Div": torch.div, "Sub": torch.sub, "Identity": lambda x: x,
            "GlobalAveragePool": lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
            "Sum": lambda *xs: functools.reduce(torch.add, xs), "Add": lambda *xs: functools.reduce(torch.add, xs),
            "Max": lambda *xs: functools.reduce(torch.maximum, xs),
            "Min": lambda *xs: functools.reduce(torch.minimum, xs)}[op]


_BUILDERS = {"Conv": _conv, "BatchNormalization": _batch_norm, "MaxPool": _max_pool, "AveragePool": _average_pool,
             "Flatten": _flatten, "Gemm": _gemm, "ReduceL2": _reduce_l2, "Resize": _resize,
             **dict.fromkeys(("Relu", "Mul", "Div", "Sub", "Identity", "GlobalAveragePool", "Sum", "Add", "Max",
                              "Min"), _elementwise)}


def _compile_node(node):
    """(function of the input tensors) for one ONNX node; raises ArtifactError if unsupported."""
    import torch
    import torch.nn.functional as F
    from onnx import helper

    attrs = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        attrs[a.name] = v.decode() if isinstance(v, bytes) else v
    op, name = node.op_type, node.name or node.output[0]

    def unsupported(why: str):
        return ArtifactError(f"the torch backend does not support {op} node {name!r} ({why}); use backend "
                             "'onnxruntime'")

    if op not in _BUILDERS:
        raise unsupported("operator not in the set dagc emits")
    return _BUILDERS[op](torch, F, op, attrs, name, unsupported)


def _device(torch, device: str):
    """``device`` as a torch device; ArtifactError when it is unknown or has no GPU here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ArtifactError(f"unknown device {device!r} for the torch backend; use 'cpu' or 'cuda'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ArtifactError(f"unknown device {device!r} for the torch backend; use 'cpu' or 'cuda'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError("the torch backend on 'cuda' needs a CUDA GPU and a CUDA build of PyTorch; none is "
                            "available here; use device 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ArtifactError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


class TorchRunner:
    """An ONNX model dagc emitted, run with torch.nn.functional; no state is written during a run.

    Takes the model bytes, its file name (for messages) and the device (``cpu`` or ``cuda``;
    ``cuda:N`` for another GPU). ``inputs`` and ``outputs`` are the model's (initializers
    excluded). Raises ArtifactError for an unreadable model, an operator outside the set dagc
    emits, or a device that is unknown or not available here.
    """

    def __init__(self, data: bytes, name: str, device: str = "cpu") -> None:
        import onnx
        import torch
        from onnx import helper, numpy_helper

        self.device = _device(torch, device)

        try:
            model = onnx.load_from_string(data)
        except Exception as e:  # noqa: BLE001 - any parse failure means a broken file
            raise ArtifactError(f"{name}: not a readable ONNX model ({e})") from None
        g = model.graph
        self.consts: dict[str, torch.Tensor] = {
            t.name: torch.from_numpy(np.array(numpy_helper.to_array(t))) for t in g.initializer}
        self.nodes = []
        for node in g.node:
            if node.op_type == "Constant":
                value = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                if "value" not in value:
                    raise ArtifactError(f"{name}: Constant node {node.name!r} without a tensor value")
                self.consts[node.output[0]] = torch.from_numpy(np.array(numpy_helper.to_array(value["value"])))
                continue
            if len(node.output) != 1:
                raise ArtifactError(f"{name}: node {node.name!r} ({node.op_type}) has several outputs, which the "
                                    "torch backend does not support; use backend 'onnxruntime'")
            self.nodes.append((_compile_node(node), tuple(node.input), node.output[0]))
        self.consts = {k: v.to(self.device) for k, v in self.consts.items()}
        self.inputs = tuple(i.name for i in g.input if i.name not in self.consts)
        self.outputs = tuple(o.name for o in g.output)
        self._schedules: dict[tuple[str, ...], list] = {}

    def _schedule(self, outputs: tuple[str, ...]) -> list:
        """The nodes that ``outputs`` need, in graph order (cached per output tuple)."""
        sched = self._schedules.get(outputs)
        if sched is None:
            need = set(outputs)
            keep = []
            for fn, ins, out in reversed(self.nodes):
                if out in need:
                    keep.append((fn, ins, out))
                    need.update(i for i in ins if i)
            sched = keep[::-1]
            self._schedules[outputs] = sched  # idempotent; a race only computes it twice
        return sched

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """See `dagc.runners.Runner.run`."""
        import torch

        names = self.outputs if outputs is None else tuple(outputs)
        with torch.inference_mode():
            values: dict[str, Any] = dict(self.consts)
            for k, v in feeds.items():
                values[k] = torch.from_numpy(v if v.flags.writeable else v.copy()).to(self.device)
            for fn, ins, out in self._schedule(names):
                args = [values[i] if i else None for i in ins]
                while args and args[-1] is None:
                    args.pop()
                values[out] = fn(*args)
            # .cpu() of a GPU tensor waits for the kernels and is a fresh array; on the CPU copy, so
            # that no result aliases a weight or an input.
            if self.device.type == "cpu":
                return {t: values[t].contiguous().numpy().copy() for t in names}
            return {t: values[t].cpu().numpy() for t in names}

"""ONNX emission of the IR (`dagc.compiler.ir.Graph`), written directly with `onnx.helper`.

`to_onnx(graph)` emits the shared multi-output model (one output per task, named after the task);
`to_onnx(graph, ["depth"])` a per-task model holding only the instances the chosen tasks' heads
depend on and only the inputs they read. The model computes exactly the IR, in eval mode:

    read_in.j   [AveragePool(stride_j)] -> Conv3x3 -> BatchNormalization -> Relu [-> Mul(scale)]
    edges.i_j   Conv3x3 -> BatchNormalization -> Relu [-> MaxPool(stride_j/stride_i)] [-> Mul(scale)]
    read_out.i  [AveragePool | Resize linear half_pixel] -> Conv1x1 -> BatchNormalization -> Relu
    folded edge the same with the conv's weight and bias ``fold.<key>.*`` and no BN, no Mul

an instance is the Sum of its edges, and a head reads its task's read-out instance:

    aspp        per rate r: Conv3x3 (dilation r) -> Relu -> Conv1x1 -> Relu -> Conv1x1; branches
                summed; Resize linear half_pixel to the input size; normals L2-normalised
    linear      GlobalAveragePool -> Flatten -> Gemm

Every conv computes its live taps only (`dagc.blocks.Conv.live`): an ASPP rate at least the
read-out's size leaves its 3x3 conv a 1x1 one with the centre weights (``<weight>.live1x1``).

Output is deterministic: the same graph gives byte-identical ``SerializeToString()``. Names come from
the IR (instance ids, block names, parameter keys), with ':' and '+' replaced by '_'.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dagc.blocks import ASPP_BRANCH, REFINE, Conv, HeadDef, head
from dagc.compiler.ir import INPUT_PREFIX, CompileError, Edge, Graph, check_graph, edge_tensors, slice_of

PRODUCER = "dagc"

__all__ = ["to_onnx", "part_to_onnx", "part_inputs", "CALL", "check", "conv_macs", "sanitize"]


def sanitize(name: str) -> str:
    """A name ONNX tools accept everywhere: ':' and '+' (from instance ids) become '_'."""
    return name.replace(":", "_").replace("+", "_")


class _Builder:
    """Accumulates nodes and initializers; every name is unique, every initializer emitted once."""

    def __init__(self, graph: Graph, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.names: set[str] = set()

    def unique(self, base: str) -> str:
        """``base`` or, if taken, ``base_2``, ``base_3``, ... (deterministic: emission order is)."""
        name, n = base, 1
        while name in self.names:
            n += 1
            name = f"{base}_{n}"
        self.names.add(name)
        return name

    def array(self, key: str) -> np.ndarray:
        """``graph.params[key]`` as float32; CompileError when the graph lacks it."""
        if key not in self.graph.params:
            raise CompileError(f"the graph lacks parameter {key!r}")
        return np.asarray(self.graph.params[key], dtype=np.float32)

    def param(self, key: str) -> str:
        """The initializer of ``graph.params[key]`` (float32), added once; returns its name."""
        if key not in self.inits:
            self.names.add(key)
            self.inits[key] = numpy_helper.from_array(np.ascontiguousarray(self.array(key)), key)
        return key

    def const(self, name: str, value, dtype=np.float32) -> str:
        if name not in self.inits:
            self.names.add(name)
            self.inits[name] = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        return name

    def op(self, op_type: str, inputs: Sequence[str], name: str, output: str | None = None, **attrs) -> str:
        """Append one node named ``name``; its output is ``output`` or the node name."""
        node_name = self.unique(name)
        out = output if output is not None else node_name
        if output is not None:
            self.names.add(output)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=node_name, **attrs))
        return out

    def conv(self, x: str, c: Conv, weight: str, bias: str | None, name: str) -> str:
        """Emit conv ``c`` with the parameters ``weight`` (and ``bias``) over its live taps only
        (`Conv.live`: on a map smaller than its reach a dilated conv's outer taps read padding alone);
        returns the output."""
        rh, rw = c.live
        k = c.kernel // 2
        if (rh, rw) == (k, k):
            w = self.param(weight)
        else:
            cut = self.array(weight)[:, :, k - rh:k + rh + 1, k - rw:k + rw + 1]
            w = self.const(f"{weight}.live{2 * rh + 1}x{2 * rw + 1}", np.ascontiguousarray(cut))
        # A 1x1 conv needs neither padding nor dilation.
        spatial = {"pads": [c.dilation * rh, c.dilation * rw] * 2, "dilations": [c.dilation] * 2} if rh or rw else {}
        inputs = [x, w] if bias is None else [x, w, self.param(bias)]
        return self.op("Conv", inputs, name, kernel_shape=[2 * rh + 1, 2 * rw + 1], **spatial)

    # ------------------------------------------------------------------ blocks
    def resize(self, x: str, factor: int, name: str, output: str | None = None) -> str:
        """Bilinear upsampling by an integer factor, as F.interpolate(align_corners=False)."""
        scales = self.const(f"const.scales_x{factor}", [1.0, 1.0, float(factor), float(factor)])
        return self.op("Resize", [x, "", scales], name, output=output, mode="linear",
                       coordinate_transformation_mode="half_pixel")

    def edge(self, x: str, edge: Edge, prefix: str) -> str:
        """Emit ``edge.scale * block(x)`` (or its folded conv) as its `BlockDef` says; returns the output."""
        blk = self.graph.block(edge)
        pre = f"{prefix}/{edge.block}"
        if blk.upsample > 1:
            x = self.resize(x, blk.upsample, f"{pre}/resize")
        if blk.downsample > 1:
            f = blk.downsample
            x = self.op("AveragePool", [x], f"{pre}/avgpool", kernel_shape=[f] * 2, strides=[f] * 2)
        keys = edge_tensors(self.graph, edge)
        if edge.folded is not None:
            x = self.conv(x, blk.conv, keys[0], keys[1], f"{pre}/conv")
        else:
            x = self.conv(x, blk.conv, keys[0], None, f"{pre}/conv")
            x = self.op("BatchNormalization", [x, *map(self.param, keys[1:])], f"{pre}/bn", epsilon=blk.bn_eps)
        x = self.op("Relu", [x], f"{pre}/relu")
        if blk.pool > 1:
            x = self.op("MaxPool", [x], f"{pre}/maxpool", kernel_shape=[blk.pool] * 2, strides=[blk.pool] * 2)
        if edge.folded is None and edge.scale != 1.0:
            s = self.const(f"const.scale_{float(edge.scale)!r}", np.float32(edge.scale))
            x = self.op("Mul", [x, s], f"{pre}/scale")
        return x

    # Node names of an ASPP branch's convs, in order (ReLUs are relu1, relu2, ...).
    _ASPP_CONV_NODES = ("conv3x3", "conv1x1a", "conv1x1b")

    def aspp_branch(self, x: str, convs: Sequence[Conv], prefix: str, layout: Sequence[str] = ASPP_BRANCH,
                    nodes: Sequence[str] = _ASPP_CONV_NODES) -> str:
        """Emit one ASPP branch on ``x`` laid out as ``layout`` (`ASPP_BRANCH`, or `REFINE` with its
        node names); returns its output."""
        todo = iter(zip(convs, nodes))
        relus = 0
        for op in layout:  # dropout is the identity at inference
            if op == "conv":
                c, node = next(todo)
                x = self.conv(x, c, c.weight, c.bias, f"{prefix}/{node}")
            elif op == "relu":
                relus += 1
                x = self.op("Relu", [x], f"{prefix}/relu{relus}")
        return x

    def aspp(self, x: str, hd: HeadDef, out: str, image: str) -> str:
        """Emit an ASPP head on ``x`` (refining with the model input ``image`` when ``hd`` has a
        refinement) with its final output named ``out``."""
        branches = [self.aspp_branch(x, convs, hd.branch(r)) for r, convs in enumerate(hd.branches)]
        up = hd.upsample > 1
        last = None if hd.normalize else out
        y = self._sum(branches, f"{hd.prefix}/sum", output=None if up or hd.refine else last)
        # The input size is the read-out's size times its stride (a valid spec divides exactly), so
        # a constant scale gives exactly (H, W) and keeps every shape static apart from the batch.
        if up:
            y = self.resize(y, hd.upsample, f"{hd.prefix}/resize", output=None if hd.refine else last)
        if hd.refine:
            cat = self.op("Concat", [y, image], f"{hd.prefix}/refine/concat", axis=1)
            r = self.aspp_branch(cat, hd.refine, f"{hd.prefix}/refine", REFINE, ("conv_a", "conv_b"))
            y = self.op("Add", [y, r], f"{hd.prefix}/refine/add", output=last)
        if hd.normalize:
            if self.opset >= 18:
                axes = self.const("const.axes_1", [1], np.int64)
                n = self.op("ReduceL2", [y, axes], f"{hd.prefix}/norm", keepdims=1)
            else:
                n = self.op("ReduceL2", [y], f"{hd.prefix}/norm", axes=[1], keepdims=1)
            n = self.op("Max", [n, self.const("const.norm_eps", np.float32(hd.norm_eps))], f"{hd.prefix}/norm_clamp")
            return self.op("Div", [y, n], f"{hd.prefix}/normalize", output=out)
        return y

    def linear(self, x: str, hd: HeadDef, out: str) -> str:
        """Emit a linear head on ``x`` with its output named ``out``."""
        y = self.op("GlobalAveragePool", [x], f"{hd.prefix}/gap")
        y = self.op("Flatten", [y], f"{hd.prefix}/flatten", axis=1)
        return self.op("Gemm", [y, self.param(hd.fc.weight), self.param(hd.fc.bias)], f"{hd.prefix}/fc",
                       output=out, transB=1)

    def _sum(self, terms: list[str], name: str, output: str | None = None) -> str:
        if len(terms) == 1:
            return terms[0] if output is None else self.op("Identity", terms, name, output=output)
        return self.op("Sum", terms, name, output=output)


def to_onnx(graph: Graph, tasks: Sequence[str] | None = None, *, opset: int = 17) -> onnx.ModelProto:
    """The ONNX model of ``graph``: all tasks (one output per task) or the given subset.

    Takes the IR (folded or not), the tasks to emit (default: all, in the graph's head order; a
    subset is emitted in the graph's head order too) and the opset (>= 13). Returns a model (it
    passes `check`) with inputs ``graph.inputs`` that the chosen tasks read, float32 (batch, C, H, W) with a
    dynamic ``batch`` dimension, and outputs named after the tasks: (batch, out, H, W) for dense
    tasks, (batch, classes) for classification. Raises CompileError for an unknown task, a missing
    parameter or a malformed graph.
    """
    spec = graph.spec
    all_tasks = graph.tasks
    if tasks is None:
        chosen = list(all_tasks)
    else:
        unknown = [t for t in tasks if t not in all_tasks]
        if unknown or not tasks or len(set(tasks)) != len(tasks):
            raise CompileError(f"tasks must be a non-empty subset of {list(all_tasks)} without repeats, "
                               f"got {list(tasks)}")
        chosen = [t for t in all_tasks if t in tasks]
    if opset < 13:
        raise CompileError(f"opset {opset} is too old; dagc emits opset 13 or newer")
    check_graph(graph)
    part = slice_of(graph, chosen)
    b = _Builder(graph, opset)
    b.names.update(chosen)  # outputs carry the task names; nothing else may take them
    inputs = list(part.inputs)
    b.names.update(inputs)
    h, w = spec.input_size
    values: dict[str, str] = {f"{INPUT_PREFIX}{name}": name for name in inputs}
    for n in part.nodes:
        prefix = sanitize(n.id)
        terms = [b.edge(values[e.src], e, prefix) for e in n.edges]
        if len(terms) == 1:
            values[n.id] = terms[0]
        else:
            values[n.id] = b.op("Sum", terms, f"{prefix}/sum", output=b.unique(prefix))

    outputs = []
    heads = dict(graph.heads)
    for t in chosen:
        hd = head(spec, t)
        x = values[heads[t]]
        if hd.kind == "aspp":
            b.aspp(x, hd, t, values[INPUT_PREFIX + graph.task_input(t)])
            outputs.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, ["batch", hd.out, *hd.size]))
        else:
            b.linear(x, hd, t)
            outputs.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, ["batch", hd.out]))

    model_inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", spec.in_channels, h, w])
                    for name in inputs]
    name = "dagc_" + ("shared" if tasks is None else "_".join(chosen))
    g = helper.make_graph(b.nodes, name, model_inputs, outputs,
                          initializer=[b.inits[k] for k in sorted(b.inits)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name=PRODUCER)
    model.ir_version = min(model.ir_version, _IR_VERSION.get(opset, model.ir_version))
    model.doc_string = f"dagc compiled model: tasks {', '.join(chosen)}"
    return model


CALL = "call"  # `part_to_onnx`'s empty model: what one call costs without any block
HEAD_PREFIX = "head."


def part_inputs(graph: Graph, part: str) -> dict[str, tuple[int, int, int]]:
    """The inputs of `part_to_onnx`'s model of ``part``, name -> (C, H, W) of one sample."""
    spec = graph.spec
    h, w = spec.input_size
    image = {"image": (spec.in_channels, h, w)}
    if part == CALL:
        return image
    if part.startswith(HEAD_PREFIX):
        hd = head(spec, part[len(HEAD_PREFIX):])
        return {"x": (hd.cin, *hd.feature_hw), **(image if hd.refine else {})}
    blk = graph.block(part)
    return {"x": (blk.cin, h // blk.from_stride, w // blk.from_stride)}


def part_to_onnx(graph: Graph, part: str, *, opset: int = 17) -> onnx.ModelProto:
    """One part of ``graph.spec``'s network alone, emitted as `to_onnx` emits it in a compiled model
    (what a cost table times, `dagc.compiler.measure`): a block by name (``"edges.2_4"``), folded,
    with conv weight and bias ``fold.<block>.weight/bias`` from ``graph.params``, reading ``x`` at
    its source's resolution; ``"head.<task>"``, the task's head on ``x`` (the read-out state, and
    ``image`` for a refining head) with the head's own parameter names; or `CALL`, an Identity of
    ``image``. Inputs are `part_inputs` with a dynamic batch; the output is ``y``. Raises
    CompileError for an unknown part or a missing parameter."""
    b = _Builder(graph, opset)
    ins = part_inputs(graph, part)
    b.names.update([*ins, "y"])
    if part == CALL:
        b.op("Identity", ["image"], "call", output="y")
        out_shape: list = ["batch", *ins["image"]]
    elif part.startswith(HEAD_PREFIX):
        hd = head(graph.spec, part[len(HEAD_PREFIX):])
        if hd.kind == "aspp":
            b.aspp("x", hd, "y", "image")
            out_shape = ["batch", hd.out, *hd.size]
        else:
            b.linear("x", hd, "y")
            out_shape = ["batch", hd.out]
    else:
        y = b.edge("x", Edge(part, INPUT_PREFIX + "x", 1.0, folded=part), sanitize(part))
        b.op("Identity", [y], "out", output="y")
        blk = graph.block(part)
        h, w = graph.spec.input_size
        s = blk.to_stride * blk.pool
        out_shape = ["batch", blk.cout, h // s, w // s]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", *shape]) for n, shape in ins.items()]
    g = helper.make_graph(b.nodes, f"dagc_{sanitize(part)}", inputs,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                          initializer=[b.inits[k] for k in sorted(b.inits)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name=PRODUCER)
    model.ir_version = min(model.ir_version, _IR_VERSION.get(opset, model.ir_version))
    return model


# Oldest IR version that carries each opset: keeps models loadable by older runtimes.
_IR_VERSION = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}


def check(model: onnx.ModelProto) -> None:
    """`onnx.checker.check_model` with full shape checking; raises onnx's ValidationError."""
    onnx.checker.check_model(model, full_check=True)


def _dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def conv_macs(model: onnx.ModelProto, input_hw: tuple[int, int]) -> int:
    """Multiply-accumulates of all Conv and Gemm nodes for one sample, read off the ONNX graph.

    Takes a model whose inputs are (batch, C, H, W) and the input's (H, W). Shapes come from ONNX
    shape inference with a batch of 1; a conv costs C_out * C_in/group * kH * kW * H_out * W_out,
    a Gemm M * N * K. Raises CompileError if a shape cannot be inferred.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 4:
            dims[0].Clear()
            dims[0].dim_value = 1
            dims[2].Clear()
            dims[2].dim_value = int(input_hw[0])
            dims[3].Clear()
            dims[3].dim_value = int(input_hw[1])
    for vi in m.graph.output:
        vi.type.tensor_type.ClearField("shape")
    del m.graph.value_info[:]
    m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    shapes = {vi.name: _dims(vi) for vi in (*m.graph.value_info, *m.graph.input, *m.graph.output)}
    shapes.update({t.name: list(t.dims) for t in m.graph.initializer})

    def shape(name: str, node) -> list[int]:
        s = shapes.get(name)
        if s is None or any(d is None for d in s):
            raise CompileError(f"cannot infer the shape of {name!r} (node {node.name!r}) to count its MACs")
        return s

    total = 0
    for node in m.graph.node:
        if node.op_type == "Conv":
            wshape = shape(node.input[1], node)
            out = shape(node.output[0], node)
            total += int(np.prod(wshape)) * int(np.prod(out[2:]))
        elif node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            a, bm = shape(node.input[0], node), shape(node.input[1], node)
            mm, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
            n = bm[0] if attrs.get("transB", 0) else bm[1]
            total += mm * n * k
    return total

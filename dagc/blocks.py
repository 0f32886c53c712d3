"""What every block and head of a central network computes, defined once, as typed data derived
from a `Spec` (FORMAT.md, "Semantics"; the paper's appendix Tables 7 and 8).

The network (`dagc.trainer.network`), the torch lowering, the ONNX emitter and the cost counter
(`dagc.costs`) all read these definitions; none of them parses a block name or knows a shape,
stride, padding, epsilon or parameter name on its own.

A *block* is one edge of the central network, named by its key (the prefix of its parameters):

    read_in.j    the input, average-pooled to state j's stride, -> conv3x3(C_in -> C_j) -> BN -> ReLU
    edges.i_j    state i -> conv3x3(C_i -> C_j) -> BN -> ReLU -> max-pool(stride_j / stride_i) (the
                 paper's, ``downsample`` "max_pool_after"), or with ``downsample`` "average_before":
                 state i, average-pooled to state j's stride, -> conv3x3(C_i -> C_j) -> BN -> ReLU
    read_out.i   state i, resized to the read-out's stride, -> conv1x1(C_i -> C_L) -> BN -> ReLU

so every block is the same pipeline, ``resize(from_stride -> to_stride) -> conv -> BN -> ReLU ->
max-pool(pool)``, with a resize that averages down and interpolates bilinearly up (a no-op when
the strides agree) and a max-pool that is a no-op for ``pool == 1``. A *head* reads v_L:

    aspp         per rate r: conv3x3 (dilation r) -> ReLU -> Dropout -> conv1x1 -> ReLU -> Dropout ->
                 conv1x1(out); branches summed, upsampled bilinearly to the input (y); with
                 ``refine_channels`` R > 0 then y + conv3x3(R -> out)(ReLU(conv3x3(out + C_in -> R)(
                 concat(y, input)))) at the input's resolution (`REFINE`); normals L2-normalised
    linear       global average pooling -> linear(C_L -> classes)

Shapes are those of one sample at ``spec.input_size``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from dagc.errors import SpecError
from dagc.spec import Spec, TaskSpec

BN_EPS = 1e-5  # every block's batch norm (torch's BatchNorm2d default)
NORM_EPS = 1e-12  # the L2 normalisation of normals (torch.nn.functional.normalize's default)

READ_IN, HIDDEN, READ_OUT = "read_in", "edges", "read_out"
BLOCK_KINDS = (READ_IN, HIDDEN, READ_OUT)
BN_PARAMETERS = ("weight", "bias")  # trainable
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# One ASPP branch as the nn.Sequential the network builds: a conv's position in it is the index
# in its parameter names (heads.<task>.branches.<r>.<position>.weight; FORMAT.md).
ASPP_BRANCH = ("conv", "relu", "dropout", "conv", "relu", "dropout", "conv")
ASPP_CONVS = tuple(p for p, op in enumerate(ASPP_BRANCH) if op == "conv")
# A dense head's refinement (heads.<task>.refine.<position>.weight): the upsampled prediction and
# the input image, concatenated, through two 3x3 convs at the input's resolution, added to the
# prediction. Departure from the paper (its heads end at the upsampling), opt-in: on multidigits
# Algorithm 1 leaves `parts` one read-in at stride 4 (the input averaged to 8x8), and refining with
# the full-resolution input lifted its held-out mIoU from 0.903 to 0.970 (seed 0; 8 channels 0.958,
# 12 0.962, 16 0.970; benchmarks/RESULTS.md, "Defaults that train a real problem").
REFINE = ("conv", "relu", "conv")
REFINE_CONVS = tuple(p for p, op in enumerate(REFINE) if op == "conv")

__all__ = [
    "BN_EPS", "NORM_EPS", "READ_IN", "HIDDEN", "READ_OUT", "BLOCK_KINDS", "BN_PARAMETERS", "BN_BUFFERS",
    "ASPP_BRANCH", "ASPP_CONVS", "REFINE", "REFINE_CONVS", "BlockKey", "Conv", "Linear", "BlockDef", "HeadDef",
    "parse_key", "blocks", "block", "head", "heads", "live_reach",
]


@dataclass(frozen=True)
class BlockKey:
    """A block's identity: its kind and the hidden states it connects (0-based).

    ``src`` is None for a read-in (it reads the model input), ``dst`` None for a read-out (it
    writes v_L). ``str(key)`` is the block's name, e.g. ``"edges.2_4"``.
    """

    kind: str
    src: int | None
    dst: int | None

    @property
    def name(self) -> str:
        """The module name inside its container: ``"2_4"`` for a hidden edge, ``"j"``/``"i"`` else."""
        if self.kind == HIDDEN:
            return f"{self.src}_{self.dst}"
        return str(self.dst if self.kind == READ_IN else self.src)

    def __str__(self) -> str:
        return f"{self.kind}.{self.name}"


@functools.lru_cache(maxsize=4096)
def parse_key(key: str) -> BlockKey:
    """The typed form of a block name (``"read_in.j"``, ``"edges.i_j"``, ``"read_out.i"``).

    Checks the syntax only (`block` checks it against a spec). Raises SpecError for anything else,
    naming ``key``.
    """
    kind, _, rest = str(key).partition(".")
    try:
        if kind == HIDDEN:
            i, j = rest.split("_")
            parsed = BlockKey(kind, int(i), int(j))
        elif kind in (READ_IN, READ_OUT):
            v = int(rest)
            parsed = BlockKey(kind, None, v) if kind == READ_IN else BlockKey(kind, v, None)
        else:
            raise ValueError
    except ValueError:
        parsed = None
    # The round trip rejects spellings such as "edges.01_2" or "read_in.+1".
    if parsed is None or str(parsed) != key or any(v is not None and v < 0 for v in (parsed.src, parsed.dst)):
        raise SpecError(f"{key!r} is not a block name (expected read_in.j, edges.i_j or read_out.i)")
    return parsed


def live_reach(kernel: int, dilation: int, size: int) -> int:
    """How many taps either side of the centre of a stride-1, 'same'-padded conv (odd ``kernel``,
    ``dilation``) read data on a map ``size`` pixels long: tap offsets d·t with |d·t| >= size read
    only padding, for every output pixel. A conv with its weights cut to the live taps (and padding
    d·reach) computes exactly what the full one does, without the products with zero padding."""
    return min(kernel // 2, (size - 1) // dilation)


@dataclass(frozen=True)
class Conv:
    """One stride-1 convolution with 'same' padding: input and output are ``hw`` large.

    On a map smaller than its reach only the live taps (`live_reach`) read data: DeepLab's ASPP
    rates 6-24 on a 4x4 read-out (the vgg16 preset at 64x64) leave a 3x3 conv its centre tap alone.
    Every model dagc builds, trains or emits computes the live taps only (``live``), and ``macs``
    counts those. Measured on a vgg16 64x64 run's shared model (1 thread, batch 8; RESULTS "int8
    speed"): its eight dilated ASPP convs took 20 of 44 ms in fp32 and 25 of 33 ms in int8 with all taps.
    """

    name: str  # parameter prefix: ``<name>.weight`` and, with a bias, ``<name>.bias``
    cin: int
    cout: int
    kernel: int
    hw: tuple[int, int]
    dilation: int = 1
    has_bias: bool = True

    @property
    def padding(self) -> int:
        return self.dilation * (self.kernel // 2)

    @property
    def live(self) -> tuple[int, int]:
        """The live reach (`live_reach`) along height and width on ``hw``."""
        return tuple(live_reach(self.kernel, self.dilation, n) for n in self.hw)

    @property
    def weight(self) -> str:
        return f"{self.name}.weight"

    @property
    def bias(self) -> str | None:
        return f"{self.name}.bias" if self.has_bias else None

    @property
    def macs(self) -> int:
        rh, rw = self.live
        return self.cout * self.cin * (2 * rh + 1) * (2 * rw + 1) * self.hw[0] * self.hw[1]

    @property
    def n_params(self) -> int:
        return self.cout * self.cin * self.kernel * self.kernel + (self.cout if self.has_bias else 0)


@dataclass(frozen=True)
class Linear:
    """A fully connected layer ``cin -> cout`` with a bias (weight shaped (cout, cin))."""

    name: str
    cin: int
    cout: int

    @property
    def weight(self) -> str:
        return f"{self.name}.weight"

    @property
    def bias(self) -> str:
        return f"{self.name}.bias"

    @property
    def macs(self) -> int:
        return self.cin * self.cout

    @property
    def n_params(self) -> int:
        return self.cin * self.cout + self.cout


@dataclass(frozen=True)
class BlockDef:
    """One block: ``resize(from_stride -> to_stride) -> conv -> BN(bn_eps) -> ReLU -> max-pool(pool)``.

    ``key`` is its name and parameter prefix (``"edges.2_4"``); ``src``/``dst`` the hidden states
    it connects (None: the input / v_L); ``conv`` has no bias; the batch norm's tensors are
    ``<bn>.weight`` etc. (`BN_PARAMETERS`, `BN_BUFFERS`).
    """

    kind: str
    key: str
    src: int | None
    dst: int | None
    conv: Conv
    bn: str
    from_stride: int
    to_stride: int
    pool: int
    bn_eps: float = BN_EPS

    @property
    def name(self) -> str:
        """The module name inside the network's container of this kind (``"2_4"``, ``"3"``)."""
        return parse_key(self.key).name

    @property
    def cin(self) -> int:
        return self.conv.cin

    @property
    def cout(self) -> int:
        return self.conv.cout

    @property
    def downsample(self) -> int:
        """Average-pooling factor of the resize before the conv (1: none)."""
        return self.to_stride // self.from_stride if self.to_stride > self.from_stride else 1

    @property
    def upsample(self) -> int:
        """Bilinear upsampling factor of the resize before the conv (1: none)."""
        return self.from_stride // self.to_stride if self.to_stride < self.from_stride else 1

    def bn_tensor(self, which: str) -> str:
        """The name of one batch-norm tensor: ``which`` in `BN_PARAMETERS` or `BN_BUFFERS`."""
        return f"{self.bn}.{which}"

    @property
    def tensors(self) -> tuple[str, ...]:
        """Every tensor of the block (its state_dict names), parameters then buffers."""
        return (self.conv.weight, *(self.bn_tensor(w) for w in (*BN_PARAMETERS, *BN_BUFFERS)))

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one application (the conv's; at its output, before the max-pool)."""
        return self.conv.macs

    def n_params(self, folded: bool = False) -> int:
        """Trainable parameters: conv weight + BN weight and bias; folded, conv weight + a bias."""
        return self.conv.n_params + (self.cout if folded else len(BN_PARAMETERS) * self.cout)

    def mask(self, gamma, alpha, beta):
        """This block's per-task entries of stacked (K, N, N), (K, N), (K, N) masks (or logits)."""
        if self.kind == READ_IN:
            return alpha[:, self.dst]
        if self.kind == HIDDEN:
            return gamma[:, self.src, self.dst]
        return beta[:, self.src]


@dataclass(frozen=True)
class HeadDef:
    """One task's head on v_L (``cin`` = C_L channels at ``feature_hw``), ``out`` channels out.

    ``kind`` "aspp": ``branches[r]`` holds the convs of the branch of rate ``rates[r]`` (at the
    positions `ASPP_CONVS` of `ASPP_BRANCH`), ReLU and Dropout(``dropout``) between them; the sum
    is upsampled bilinearly by ``upsample`` (the read-out's stride) to ``size`` and L2-normalised
    over channels (eps ``norm_eps``) when ``normalize``; ``refine`` (empty, or the convs at the
    positions `REFINE_CONVS` of `REFINE`) refines the upsampled prediction with the input before
    the normalisation. ``kind`` "linear": global average pooling, then ``fc``.
    """

    task: str
    kind: str
    cin: int
    out: int
    feature_hw: tuple[int, int]
    size: tuple[int, int]  # the input size (a dense prediction's size)
    rates: tuple[int, ...] = ()
    branches: tuple[tuple[Conv, ...], ...] = ()
    dropout: float = 0.0
    normalize: bool = False
    upsample: int = 1
    refine: tuple[Conv, ...] = ()
    fc: Linear | None = None
    norm_eps: float = NORM_EPS

    @property
    def prefix(self) -> str:
        return f"heads.{self.task}"

    def branch(self, r: int) -> str:
        """The parameter prefix of the ASPP branch of ``rates[r]``."""
        return f"{self.prefix}.branches.{r}"

    @property
    def layers(self) -> tuple[Conv | Linear, ...]:
        return (self.fc,) if self.fc is not None else (*(c for b in self.branches for c in b), *self.refine)

    @property
    def tensors(self) -> tuple[str, ...]:
        return tuple(n for layer in self.layers for n in (layer.weight, layer.bias))

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def n_params(self) -> int:
        return sum(layer.n_params for layer in self.layers)


def _hw(spec: Spec, stride: int) -> tuple[int, int]:
    h, w = spec.input_size
    return h // stride, w // stride


def _block(spec: Spec, key: BlockKey) -> BlockDef:
    st = spec.states
    if key.kind == READ_IN:
        s = st[key.dst]
        cin, cout, kernel, from_s, to_s, pool = spec.in_channels, s.channels, 3, 1, s.stride, 1
    elif key.kind == HIDDEN:
        a, b = st[key.src], st[key.dst]
        if spec.downsample == "average_before":
            cin, cout, kernel, from_s, to_s, pool = a.channels, b.channels, 3, a.stride, b.stride, 1
        else:  # Table 8: the conv at the source resolution, then max-pool
            cin, cout, kernel, from_s, to_s, pool = a.channels, b.channels, 3, a.stride, a.stride, b.stride // a.stride
    else:
        a = st[key.src]
        cin, cout, kernel, from_s, to_s, pool = a.channels, spec.readout.channels, 1, a.stride, spec.readout.stride, 1
    name = str(key)
    conv = Conv(f"{name}.conv", cin, cout, kernel, _hw(spec, to_s), has_bias=False)
    return BlockDef(key.kind, name, key.src, key.dst, conv, f"{name}.bn", from_s, to_s, pool)


def _keys(spec: Spec) -> list[BlockKey]:
    n = range(spec.n_states)
    return ([BlockKey(HIDDEN, i, j) for i, j in spec.hidden_edges()] + [BlockKey(READ_IN, None, j) for j in n]
            + [BlockKey(READ_OUT, i, None) for i in n])


@functools.lru_cache(maxsize=64)
def _table(spec: Spec) -> dict[str, BlockDef]:
    return {str(k): _block(spec, k) for k in _keys(spec)}


def _blocks_of(spec: Spec) -> dict[str, BlockDef]:
    try:
        return _table(spec)
    except TypeError:  # a spec built by hand with a list field is not hashable: build uncached
        return {str(k): _block(spec, k) for k in _keys(spec)}


def blocks(spec: Spec, kind: str | None = None) -> tuple[BlockDef, ...]:
    """Every block of the central network of ``spec`` (or those of one ``kind``), in the order of
    the network's parameters: hidden edges (row-major), read-ins (by state), read-outs (by state)."""
    return tuple(b for b in _blocks_of(spec).values() if kind is None or b.kind == kind)


def block(spec: Spec, key: str | BlockKey) -> BlockDef:
    """The definition of one block of ``spec``, by name (``"edges.2_4"``) or `BlockKey`.

    Raises SpecError, naming the key, if it is not a block of this network (malformed, a state out
    of range, or a hidden edge outside the flow band).
    """
    found = _blocks_of(spec).get(str(key))
    if found is None:
        raise SpecError(f"{str(key)!r} is not a block of this network (expected read_in.j, edges.i_j "
                        f"with 0 < j - i <= {spec.flow_constant}, or read_out.i, 0 <= i, j < {spec.n_states})")
    return found


def head(spec: Spec, task: str | TaskSpec) -> HeadDef:
    """The definition of a task's head (by name or `TaskSpec`); raises SpecError for an unknown task."""
    t = spec.task(task) if isinstance(task, str) else task
    cl, out = spec.readout.channels, t.out_channels
    hw = _hw(spec, spec.readout.stride)
    hd = HeadDef(t.name, t.head, cl, out, hw, tuple(spec.input_size))
    if t.head == "linear":
        return replace(hd, fc=Linear(f"{hd.prefix}.fc", cl, out))
    hc = spec.head_channels
    branches = tuple(
        (Conv(f"{hd.branch(r)}.{ASPP_CONVS[0]}", cl, hc, 3, hw, dilation=rate),
         Conv(f"{hd.branch(r)}.{ASPP_CONVS[1]}", hc, hc, 1, hw),
         Conv(f"{hd.branch(r)}.{ASPP_CONVS[2]}", hc, out, 1, hw))
        for r, rate in enumerate(spec.aspp_rates)
    )
    rc, size = spec.refine_channels, tuple(spec.input_size)
    refine = (Conv(f"{hd.prefix}.refine.{REFINE_CONVS[0]}", out + spec.in_channels, rc, 3, size),
              Conv(f"{hd.prefix}.refine.{REFINE_CONVS[1]}", rc, out, 3, size)) if rc else ()
    return replace(hd, rates=tuple(spec.aspp_rates), branches=branches, dropout=float(spec.head_dropout),
                   normalize=t.kind == "normal", upsample=spec.readout.stride, refine=refine)


def heads(spec: Spec) -> tuple[HeadDef, ...]:
    """Every task's head, in the spec's task order."""
    return tuple(head(spec, t) for t in spec.tasks)

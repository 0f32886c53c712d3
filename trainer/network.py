"""The central network: a flow-restricted DAG of hidden states with read-in / read-out layers.

Semantics (FORMAT.md, "Semantics"; what each block computes is `dagc.blocks`), for task k:

* soft (search) mode: ``v_j = (1/In_j) [σ(α_j) R_j(v_0) + Σ_i σ(γ_ij) e_ij(v_i)]`` with ``In_j`` the
  structural in-degree of state j (its band edges plus the read-in edge);
  ``v_L = Σ_i σ(β_i) O_i(v_i)``; ``ŷ = H_k(v_L)``.
* hard mode (after reduction): the same with 0/1 masks instead of sigmoids and ``In_j`` the number of
  the task's active incoming edges. Edges that are off are not computed for that task at all.

Tasks run *stacked*: the batch of every state holds one *lane* of B samples per task, and each edge
is one conv call over all lanes that use it. Batch norm's affine parameters are shared by all tasks;
each lane is normalised with its own batch statistics and each task keeps its own running statistics
(`TaskBatchNorm`), so stacked execution equals running the tasks one after another.

Every block and head is built from its definition in `dagc.blocks` (shapes, strides, pooling,
resize, BN epsilon and parameter names); the blocks, the heads and `TaskBatchNorm` have their own
modules (`dagc.trainer.block`, `dagc.trainer.heads`, `dagc.trainer.batchnorm`) and are re-exported
here.

When the input is shared and every task has the same edge weights and no architecture gradient is
needed (the warm-up stage, where Γ, A, B are frozen at 0), all task states are identical: the
network then runs once, as one lane that stands for all K tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from dagc.blocks import HIDDEN, READ_IN, READ_OUT, BlockKey, blocks
from dagc.errors import CheckpointError, DataError, SpecError
from dagc.spec import Spec
from dagc.trainer.batchnorm import TaskBatchNorm
from dagc.trainer.block import Block, resize
from dagc.trainer.heads import ASPPHead, LinearHead, aspp_stacked, make_head
from dagc.trainer.topology import close_masks, is_connected

# Names other modules import from here (the blocks, heads and batch norm live in their own modules).
__all__ = [
    "CentralNetwork", "Block", "TaskBatchNorm", "ASPPHead", "LinearHead", "make_head", "aspp_stacked",
    "resize", "edge_key", "count_parameters", "network_tensors", "load_network_tensors",
    "network_from_checkpoint",
]


def edge_key(i: int, j: int) -> str:
    """Module name of hidden edge i -> j (0-based states), e.g. ``"2_4"``."""
    return BlockKey(HIDDEN, i, j).name


class CentralNetwork(nn.Module):
    """The searchable multi-task central network of a `Spec` (soft mode until masks are set).

    Attributes:
        edges: hidden edge blocks, keyed ``"i_j"``; read_in / read_out: one block per hidden state;
        heads: one head per task. arch_gamma (K, N, N), arch_alpha (K, N), arch_beta (K, N): the
        architecture logits Γ, A, B (entries of arch_gamma outside the band are unused).
        mask_gamma / mask_alpha / mask_beta: the 0/1 masks once `set_masks` was called.
    """

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        n, k = spec.n_states, spec.n_tasks
        hidden = blocks(spec, HIDDEN)
        self.edge_list = [(b.src, b.dst) for b in hidden]
        self.edges = nn.ModuleDict({b.name: Block(b, k) for b in hidden})
        self.read_in = nn.ModuleList(Block(b, k) for b in blocks(spec, READ_IN))
        self.read_out = nn.ModuleList(Block(b, k) for b in blocks(spec, READ_OUT))
        self.heads = nn.ModuleDict({t.name: make_head(t, spec) for t in spec.tasks})
        self.arch_gamma = nn.Parameter(torch.zeros(k, n, n))
        self.arch_alpha = nn.Parameter(torch.zeros(k, n))
        self.arch_beta = nn.Parameter(torch.zeros(k, n))
        band = torch.zeros(n, n)
        for i, j in self.edge_list:
            band[i, j] = 1.0
        self.register_buffer("band", band, persistent=False)
        # Structural in-degree: the band edges into j plus the read-in edge.
        self.register_buffer("in_degree", band.sum(0) + 1.0, persistent=False)
        self.register_buffer("mask_gamma", torch.zeros(0), persistent=False)
        self.register_buffer("mask_alpha", torch.zeros(0), persistent=False)
        self.register_buffer("mask_beta", torch.zeros(0), persistent=False)
        self.register_buffer("edge_src", torch.tensor([i for i, _ in self.edge_list], dtype=torch.long),
                             persistent=False)
        self.register_buffer("edge_dst", torch.tensor([j for _, j in self.edge_list], dtype=torch.long),
                             persistent=False)
        # Per state j, its incoming hidden edges as (position in edge_list, source state, module name).
        self._incoming: list[list[tuple[int, int, str]]] = [[] for _ in range(n)]
        for pos, b in enumerate(hidden):
            self._incoming[b.dst].append((pos, b.src, b.name))

    # ------------------------------------------------------------------ parameters and modes
    @property
    def hard(self) -> bool:
        """True once binary masks are set (after reduction)."""
        return self.mask_gamma.numel() > 0

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.arch_gamma, self.arch_alpha, self.arch_beta]

    def weight_parameters(self) -> list[nn.Parameter]:
        """θ: every parameter except the architecture logits (edges, read-in/out, heads)."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def set_masks(self, gamma: Tensor, alpha: Tensor, beta: Tensor) -> None:
        """Switch to hard mode with 0/1 masks of shapes (K, N, N), (K, N), (K, N).

        Raises SpecError if a shape is wrong, a mask is not 0/1, sets an edge outside the band,
        leaves a task without a path from input to read-out, or is not closed
        (`dagc.trainer.topology.close_masks`).
        """
        k, n = self.spec.n_tasks, self.spec.n_states
        gamma, alpha, beta = (torch.as_tensor(t).float().to(self.band.device) for t in (gamma, alpha, beta))
        if gamma.shape != (k, n, n) or alpha.shape != (k, n) or beta.shape != (k, n):
            raise SpecError(
                f"masks must have shapes ({k},{n},{n}), ({k},{n}), ({k},{n}); got "
                f"{tuple(gamma.shape)}, {tuple(alpha.shape)}, {tuple(beta.shape)}"
            )
        for name, t in (("gamma", gamma), ("alpha", alpha), ("beta", beta)):
            if not torch.all((t == 0) | (t == 1)):
                raise SpecError(f"mask {name} must hold only 0 and 1")
        if torch.any(gamma * (1 - self.band) != 0):
            raise SpecError("mask gamma sets an edge outside the flow-restricted band")
        for k, task in enumerate(self.spec.tasks):
            g, a, b = (t[k].cpu().numpy().astype("int64") for t in (gamma, alpha, beta))
            if not is_connected(g, a, b):
                raise SpecError(f"masks of task {task.name!r} leave no path from the input to the read-out")
            if any((x != y).any() for x, y in zip((g, a, b), close_masks(g, a, b))):
                raise SpecError(f"masks of task {task.name!r} are not closed (an active edge lies on no "
                                "input -> read-out path); close them with dagc.trainer.topology.close_masks")
        self.mask_gamma, self.mask_alpha, self.mask_beta = gamma, alpha, beta

    def edge_weights(self, task_idx: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Per-task coefficients (len(task_idx), ·): hidden edges (E), read-in (N), read-out (N).

        Soft mode: σ(logit) with the 1/In_j factor folded into hidden and read-in coefficients.
        Hard mode: the masks divided by each task's active in-degree.
        """
        idx = torch.as_tensor(list(task_idx), dtype=torch.long, device=self.band.device)
        if self.hard:
            g, a, b = self.mask_gamma[idx], self.mask_alpha[idx], self.mask_beta[idx]
            indeg = (g.sum(1) + a).clamp(min=1.0)
        else:
            g = torch.sigmoid(self.arch_gamma[idx]) * self.band
            a, b = torch.sigmoid(self.arch_alpha[idx]), torch.sigmoid(self.arch_beta[idx])
            indeg = self.in_degree.expand_as(a)
        ge = g[:, self.edge_src, self.edge_dst] / indeg[:, self.edge_dst]
        return ge, a / indeg, b

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor | Mapping[str, Tensor], tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Run the selected tasks (default: all) stacked.

        Takes: ``x`` (B, C, H, W) when the spec's input is shared; otherwise one input per task,
        as a mapping task -> (B, C, H, W) or a tensor (len(tasks), B, C, H, W) in task order.
        Returns: task -> prediction ((B, out, H, W) for dense tasks, (B, classes) for
        classification). Raises DataError for an unknown task or a malformed input.
        """
        spec = self.spec
        names = list(spec.task_names) if tasks is None else list(tasks)
        for t in names:
            if t not in spec.task_names:
                raise DataError(f"unknown task {t!r}; the model has tasks {list(spec.task_names)}")
        if len(set(names)) != len(names) or not names:
            raise DataError(f"tasks must be a non-empty list without repeats, got {names}")
        task_idx = [spec.task_names.index(t) for t in names]
        ge, ga, gb = self.edge_weights(task_idx)

        if spec.shared_input:
            x0 = self._check_input(x, per_task=None)
            # Identical weights and no architecture gradient in training: every task's states are
            # the same, so one lane stands for all of them (warm-up). Not with running statistics:
            # each task normalises with its own, and nothing guarantees they agree.
            collapse = (not self.hard and len(names) > 1 and self.training
                        and not (torch.is_grad_enabled() and self.arch_gamma.requires_grad)
                        and bool((ge == ge[:1]).all() and (ga == ga[:1]).all() and (gb == gb[:1]).all()))
            lanes = [list(range(len(names)))] if collapse else [[t] for t in range(len(names))]
            if collapse:
                ge, ga, gb = ge[:1], ga[:1], gb[:1]
        else:
            x0 = self._check_input(x, per_task=names)
            lanes = [[t] for t in range(len(names))]
        vl = self._trunk(x0, ge, ga, gb, [[task_idx[t] for t in lane] for lane in lanes])
        vl = vl.view(-1, len(lanes), *vl.shape[1:])
        images = [x0] * len(names) if spec.shared_input else list(x0)  # what a refining head reads
        return self._heads(vl, names, lanes, (int(x0.shape[-2]), int(x0.shape[-1])), images)

    def _heads(self, vl: Tensor, names: list[str], lanes: list[list[int]], size: tuple[int, int],
               images: list[Tensor]) -> dict[str, Tensor]:
        """Each task's prediction from v_L, (B, lanes, C_L, H_L, W_L), and its input image; several
        ASPP heads at once."""
        out: dict[str, Tensor] = {}
        aspp = [t for t in range(len(names)) if self.heads[names[t]].defn.kind == "aspp"]
        if len(aspp) > 1:
            heads = [self.heads[names[t]] for t in aspp]
            imgs = [images[t] for t in aspp]
            if len(lanes) == 1:
                preds = aspp_stacked(heads, vl[:, 0], size, shared=True, images=imgs)
            else:
                feat = vl if len(aspp) == len(lanes) else vl[:, aspp]
                preds = aspp_stacked(heads, feat.reshape(feat.shape[0], -1, *feat.shape[3:]), size, shared=False,
                                     images=imgs)
            out.update({names[t]: y for t, y in zip(aspp, preds)})
        for li, lane in enumerate(lanes):
            for t in lane:
                if names[t] not in out:
                    out[names[t]] = self.heads[names[t]](vl[:, li], size, images[t])
        return {t: out[t] for t in names}

    def _check_input(self, x, per_task: list[str] | None) -> Tensor:
        spec = self.spec
        if per_task is None:
            if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != spec.in_channels:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise DataError(f"input must be a tensor (B, {spec.in_channels}, H, W), got {shape}")
            x0 = x
        else:
            if isinstance(x, Mapping):
                missing = [t for t in per_task if t not in x]
                if missing:
                    raise DataError(f"this model has one input per task; missing inputs for {missing}")
                x0 = torch.stack([x[t] for t in per_task])
            else:
                x0 = x
            if not isinstance(x0, Tensor) or x0.dim() != 5 or x0.shape[0] != len(per_task) \
                    or x0.shape[2] != spec.in_channels:
                shape = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
                raise DataError(f"per-task input must be ({len(per_task)}, B, {spec.in_channels}, H, W), got {shape}")
        h, w = x0.shape[-2:]
        s = spec.max_stride()
        if h % s or w % s:
            raise DataError(f"input size {(h, w)} must be divisible by the largest stride {s}")
        return x0

    def _trunk(self, x0: Tensor, ge: Tensor, ga: Tensor, gb: Tensor, tasks: list[list[int]]) -> Tensor:
        """Compute v_L of every lane (``tasks[l]``: the spec's indices of the tasks lane l stands
        for); returns (B*lanes, C_L, H_L, W_L), sample-major."""
        shared = x0.dim() == 4
        ln = _Lanes(x0.shape[0] if shared else x0.shape[1], tasks)
        # Per-task inputs (K, B, ...) -> sample-major (B*K, ...), the layout TaskBatchNorm expects.
        flat_in = x0 if shared else x0.transpose(0, 1).reshape(-1, *x0.shape[2:])
        # Which lanes use each edge: all in soft mode; in hard mode read once from the masks
        # (one host transfer per forward, not one per edge).
        on_e, on_a, on_b = ((c != 0).T.tolist() for c in (ge, ga, gb)) if self.hard else (None, None, None)
        states: list[Tensor | None] = []  # each (B, lanes, C, H, W), zero on lanes where dead
        vl: Tensor | None = None
        for j in range(self.spec.n_states):
            acc: Tensor | None = None
            lanes = ln.active(on_a, j)
            if lanes:
                blk = self.read_in[j]
                if shared:  # one image for all lanes: the read-in's conv is computed once
                    y = blk.shared(flat_in, ln.tasks_of(lanes))
                else:
                    y = ln.view(blk(ln.gather(flat_in, lanes), ln.tasks_of(lanes)), len(lanes))
                acc = ln.add(acc, y, ga[:, j], lanes)
            for pos, i, name in self._incoming[j]:
                lanes = ln.active(on_e, pos)
                if not lanes:
                    continue
                if states[i] is None:
                    raise SpecError(f"masks are not closed: edge {i}->{j} leaves dead state {i}; "
                                    "close them with dagc.trainer.topology.close_masks")
                acc = ln.add(acc, ln.apply(self.edges[name], states[i], lanes), ge[:, pos], lanes)
            states.append(acc)
            lanes = ln.active(on_b, j)
            if lanes and acc is not None:
                vl = ln.add(vl, ln.apply(self.read_out[j], acc, lanes), gb[:, j], lanes)
        if vl is None:
            raise SpecError("no task has an active read-out: the masks leave no path to the output")
        return vl.reshape(-1, *vl.shape[2:])


class _Lanes:
    """The lane layout of one stacked forward: ``bsz`` samples per lane, lane l standing for the
    tasks ``tasks[l]`` (the spec's indices); states are (B, lanes, C, H, W), blocks run on
    sample-major (B*lanes, ...)."""

    def __init__(self, bsz: int, tasks: list[list[int]]) -> None:
        self.bsz, self.tasks, self.n = bsz, tasks, len(tasks)
        self.all = list(range(self.n))

    def active(self, on: list[list[bool]] | None, col: int) -> list[int]:
        return self.all if on is None else [li for li in self.all if on[col][li]]

    def tasks_of(self, lanes: list[int]) -> list[list[int]]:
        return [self.tasks[li] for li in lanes]

    def gather(self, t: Tensor, lanes: list[int]) -> Tensor:
        if len(lanes) == self.n:
            return t
        return t.view(self.bsz, self.n, *t.shape[1:])[:, lanes].reshape(-1, *t.shape[1:])

    def view(self, y: Tensor, n: int) -> Tensor:
        return y.view(self.bsz, n, *y.shape[1:])

    def apply(self, blk: Block, state: Tensor, lanes: list[int]) -> Tensor:
        """``blk`` on the given lanes of a state; returns (B, len(lanes), C, H, W)."""
        src = self.gather(state.reshape(-1, *state.shape[2:]), lanes)
        return self.view(blk(src, self.tasks_of(lanes)), len(lanes))

    def add(self, acc: Tensor | None, y: Tensor, coef: Tensor, lanes: list[int]) -> Tensor:
        """acc + coef[lane] * y on the given lanes; y is (B, len(lanes), C, H, W)."""
        if len(lanes) == self.n:
            c = coef.view(1, -1, 1, 1, 1)
            return y * c if acc is None else torch.addcmul(acc, y, c)
        idx = torch.tensor(lanes, device=y.device)
        y = y.new_zeros(self.bsz, self.n, *y.shape[2:]).index_add(1, idx, y * coef[idx].view(1, -1, 1, 1, 1))
        return y if acc is None else acc + y


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def network_tensors(net: CentralNetwork) -> dict[str, Tensor]:
    """The checkpoint tensors of a network: ``theta.*``, ``arch.*`` and, once reduced, ``mask.*``."""
    arch = {"arch_gamma", "arch_alpha", "arch_beta"}
    out = {f"theta.{k}": v for k, v in net.state_dict().items() if k not in arch}
    out.update({"arch.gamma": net.arch_gamma.data, "arch.alpha": net.arch_alpha.data,
                "arch.beta": net.arch_beta.data})
    if net.hard:
        out.update({"mask.gamma": net.mask_gamma.to(torch.uint8), "mask.alpha": net.mask_alpha.to(torch.uint8),
                    "mask.beta": net.mask_beta.to(torch.uint8)})
    return out


def load_network_tensors(net: CentralNetwork, tensors: Mapping[str, Tensor]) -> None:
    """Load ``theta.*``, ``arch.*`` and (if present) ``mask.*`` into ``net``.

    Raises CheckpointError when a tensor is missing or has the wrong shape or dtype for the spec.
    """
    state = {k[len("theta."):]: v for k, v in tensors.items() if k.startswith("theta.")}
    for name in ("gamma", "alpha", "beta"):
        if f"arch.{name}" not in tensors:
            raise CheckpointError(f"checkpoint lacks tensor arch.{name}")
        state[f"arch_{name}"] = tensors[f"arch.{name}"]
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match its spec: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for k, v in state.items():
        shown = f"arch.{k[len('arch_'):]}" if k.startswith("arch_") else f"theta.{k}"  # the checkpoint's name
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"tensor {shown} has shape {tuple(v.shape)}, the spec needs "
                                  f"{tuple(expected[k].shape)}")
        if v.dtype != expected[k].dtype:  # the bytes of another dtype read as this one are garbage
            raise CheckpointError(f"tensor {shown} has dtype {_dtype_name(v.dtype)}, the network stores "
                                  f"{_dtype_name(expected[k].dtype)}; the checkpoint is corrupted, re-run "
                                  "the command that wrote it")
    net.load_state_dict(state)
    if "mask.gamma" in tensors:
        try:
            net.set_masks(tensors["mask.gamma"], tensors["mask.alpha"], tensors["mask.beta"])
        except (KeyError, SpecError) as e:
            raise CheckpointError(f"checkpoint masks are invalid: {e}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def network_from_checkpoint(ckpt) -> CentralNetwork:
    """Build the (masked, if reduced) supernet of a loaded `dagc.checkpoint.Checkpoint`."""
    net = CentralNetwork(ckpt.spec)
    load_network_tensors(net, ckpt.tensors)
    return net

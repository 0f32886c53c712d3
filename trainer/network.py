"""The central network: a flow-restricted DAG of hidden states with read-in / read-out layers.

Semantics (DESIGN.md, "Central network semantics"), for task k:

* soft (search) mode: ``v_j = (1/In_j) [σ(α_j) R_j(v_0) + Σ_i σ(γ_ij) e_ij(v_i)]`` with ``In_j`` the
  structural in-degree of state j (its band edges plus the read-in edge);
  ``v_L = Σ_i σ(β_i) O_i(v_i)``; ``ŷ = H_k(v_L)``.
* hard mode (after reduction): the same with 0/1 masks instead of sigmoids and ``In_j`` the number of
  the task's active incoming edges. Edges that are off are not computed for that task at all.

Tasks run *stacked*: the batch of every state holds one *lane* of B samples per task, and each edge
is one conv call over all lanes that use it. Batch norm is shared by all tasks but normalises each
lane with its own batch statistics and updates the running statistics once per task, in task order
(`TaskBatchNorm`), so stacked execution equals running the tasks one after another.

When the input is shared and every task has the same edge weights and no architecture gradient is
needed (the warm-up stage, where Γ, A, B are frozen at 0), all task states are identical: the
network then runs once, as one lane that stands for all K tasks.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dagc.errors import DataError, SpecError
from dagc.spec import Spec, TaskSpec
from dagc.trainer.topology import close_masks, is_connected


class TaskBatchNorm(nn.Module):
    """BatchNorm2d over a batch made of ``groups`` lanes, each lane normalised on its own.

    The batch is laid out sample-major, (B, groups) flattened: sample b of lane g is row
    ``b * groups + g``. Viewed as (B, groups*C, H, W), per-lane statistics are plain per-channel
    statistics, so one fused native batch-norm call serves all lanes. Parameters and running
    statistics are shared by all lanes. In training each lane uses its own batch statistics, and the
    running statistics are updated once per lane, in lane order; a lane may stand for several
    identical tasks (``repeats``) and is then applied that many times. With one lane this is exactly
    ``nn.BatchNorm2d``. In eval mode the running statistics serve every lane.
    """

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor, groups: int = 1, repeats: Sequence[int] | None = None) -> Tensor:
        """Normalise ``x`` of shape (B*groups, C, H, W); ``repeats[g]`` counts lane g's tasks.

        Half-precision inputs (autocast's conv outputs) are normalised in float32, so statistics
        accumulate in the precision of the float32 running statistics."""
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        reps = list(repeats) if repeats is not None else [1] * groups
        if groups == 1 and reps == [1]:
            self.num_batches_tracked.add_(1)
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                True, self.momentum, self.eps)
        n, c, h, w = x.shape
        count = (n // groups) * h * w
        if count < 2:
            raise ValueError(f"batch norm needs more than 1 value per channel and task, got {count}")
        # Normalise without affine (the affine is shared, so it is applied once on (n, c, h, w)
        # rather than repeated per lane): fewer calls, which is what small maps are bound by.
        # reshape, not view: a channels-last batch cannot be viewed lane-major (reshape copies it).
        y, mean, invstd = torch.native_batch_norm(
            x.reshape(n // groups, groups * c, h, w), None, None, None, None, True, 0.0, self.eps)
        with torch.no_grad():
            var = invstd.pow(-2).sub_(self.eps).mul_(count / (count - 1))  # unbiased, as BatchNorm2d
            self._update_running(mean.view(groups, c), var.view(groups, c), reps)
        return torch.addcmul(self.bias.view(1, c, 1, 1), y.reshape(n, c, h, w), self.weight.view(1, c, 1, 1))

    def _update_running(self, means: Tensor, vars_: Tensor, reps: list[int]) -> None:
        # Applying r <- (1-m) r + m s once per task in order has the closed form
        # r_T = (1-m)^T r_0 + sum_t m (1-m)^(T-t) s_t: one weighted sum instead of T small updates.
        keep, coef = _running_coefficients(tuple(reps), self.momentum, means.dtype, means.device)
        self.running_mean.addmv_(means.t(), coef, beta=keep)
        self.running_var.addmv_(vars_.t(), coef, beta=keep)
        self.num_batches_tracked.add_(sum(reps))


@functools.lru_cache(maxsize=256)
def _running_coefficients(reps: tuple[int, ...], m: float, dtype: torch.dtype,
                          device: torch.device) -> tuple[float, Tensor]:
    """(1-m)^T and each lane's summed weight m (1-m)^(T-t) over the positions t it occupies."""
    total = sum(reps)
    weights, pos = [], 0
    for r in reps:
        weights.append(sum(m * (1 - m) ** (total - 1 - t) for t in range(pos, pos + r)))
        pos += r
    return (1 - m) ** total, torch.tensor(weights, dtype=dtype, device=device)


class Block(nn.Module):
    """conv(k×k, no bias) → TaskBatchNorm → ReLU → MaxPool(pool) when pool > 1 (appendix Table 8)."""

    def __init__(self, cin: int, cout: int, kernel: int, pool: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = TaskBatchNorm(cout)
        self.pool = pool

    def forward(self, x: Tensor, groups: int = 1, repeats: Sequence[int] | None = None) -> Tensor:
        y = F.relu(self.bn(self.conv(x), groups, repeats))
        return F.max_pool2d(y, self.pool) if self.pool > 1 else y


def resize(x: Tensor, from_stride: int, to_stride: int) -> Tensor:
    """Resize a feature map between strides: average pooling down (area resampling, exact for the
    integer ratios a valid spec has), bilinear interpolation up."""
    if to_stride == from_stride:
        return x
    if to_stride > from_stride:
        return F.avg_pool2d(x, to_stride // from_stride)
    return F.interpolate(x, scale_factor=from_stride // to_stride, mode="bilinear",
                         align_corners=False)


class ASPPHead(nn.Module):
    """DeepLab-v2 ASPP: per rate, conv3x3(dilation r) → ReLU → Dropout → conv1x1 → ReLU → Dropout →
    conv1x1(out); branches summed and bilinearly upsampled to the input size. Normal predictions
    are L2-normalised to unit vectors."""

    def __init__(self, cin: int, hidden: int, out: int, rates: Sequence[int], dropout: float,
                 normalize: bool) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(cin, hidden, 3, padding=r, dilation=r), nn.ReLU(), nn.Dropout(dropout),
                nn.Conv2d(hidden, hidden, 1), nn.ReLU(), nn.Dropout(dropout),
                nn.Conv2d(hidden, out, 1),
            )
            for r in rates
        )
        self.normalize = normalize

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y = y + branch(x)
        y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return F.normalize(y, dim=1) if self.normalize else y


def aspp_stacked(heads: Sequence[ASPPHead], x: Tensor, size: tuple[int, int], shared: bool) -> list[Tensor]:
    """Run K ASPP heads at once as grouped convolutions (same result as calling each head).

    Takes the heads, their features — (B, K*C, H, W) with task k's channels in block k (the free
    view of a sample-major lane tensor), or (B, C, H, W) read by all heads when ``shared`` — and
    the output size. Returns each head's prediction. Heads have their own weights; concatenating
    them per call makes one conv call per layer instead of K, which is what matters when per-call
    overhead dominates (small maps, CPU).
    """
    k = len(heads)
    outs = [h.branches[0][-1].out_channels for h in heads]
    width = max(outs)
    p = heads[0].branches[0][2].p
    total = None
    for r in range(len(heads[0].branches)):
        layers = [h.branches[r] for h in heads]
        c1, c2, c3 = ([b[i] for b in layers] for i in (0, 3, 6))
        rate = c1[0].dilation[0]
        y = F.conv2d(x, torch.cat([c.weight for c in c1]), torch.cat([c.bias for c in c1]),
                     padding=rate, dilation=rate, groups=1 if shared else k)
        y = F.dropout(F.relu(y), p, heads[0].training)
        y = F.conv2d(y, torch.cat([c.weight for c in c2]), torch.cat([c.bias for c in c2]), groups=k)
        y = F.dropout(F.relu(y), p, heads[0].training)
        # Output widths differ per task: append zero filters up to the widest, slice after.
        # Concatenation rather than F.pad so the TorchScript ONNX exporter can infer the shape.
        ws, bs = [], []
        for c, o in zip(c3, outs):
            ws.append(c.weight)
            bs.append(c.bias)
            if o < width:
                ws.append(c.weight.new_zeros(width - o, *c.weight.shape[1:]))
                bs.append(c.bias.new_zeros(width - o))
        w3, b3 = torch.cat(ws), torch.cat(bs)
        y = F.conv2d(y, w3, b3, groups=k)
        total = y if total is None else total + y
    total = F.interpolate(total, size=size, mode="bilinear", align_corners=False)
    total = total.view(total.shape[0], k, width, *size)
    preds = []
    for i, (h, o) in enumerate(zip(heads, outs)):
        y = total[:, i, :o]
        preds.append(F.normalize(y, dim=1) if h.normalize else y)
    return preds


class LinearHead(nn.Module):
    """Global average pooling → linear layer (classification)."""

    def __init__(self, cin: int, out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(cin, out)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def make_head(task: TaskSpec, spec: Spec) -> nn.Module:
    if task.head == "linear":
        return LinearHead(spec.readout.channels, task.out_channels)
    return ASPPHead(spec.readout.channels, spec.head_channels, task.out_channels, spec.aspp_rates,
                    spec.head_dropout, normalize=task.kind == "normal")


def edge_key(i: int, j: int) -> str:
    """Module name of hidden edge i -> j (0-based states), e.g. ``"2_4"``."""
    return f"{i}_{j}"


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
        st = spec.states
        self.edge_list = spec.hidden_edges()
        self.edges = nn.ModuleDict({
            edge_key(i, j): Block(st[i].channels, st[j].channels, 3, st[j].stride // st[i].stride)
            for i, j in self.edge_list
        })
        self.read_in = nn.ModuleList(Block(spec.in_channels, s.channels, 3) for s in st)
        self.read_out = nn.ModuleList(Block(s.channels, spec.readout.channels, 1) for s in st)
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
            # Identical weights and no architecture gradient: every task's states are the same,
            # so one lane stands for all of them (warm-up).
            collapse = (not self.hard and len(names) > 1
                        and not (torch.is_grad_enabled() and self.arch_gamma.requires_grad)
                        and bool((ge == ge[:1]).all() and (ga == ga[:1]).all() and (gb == gb[:1]).all()))
            lanes = [list(range(len(names)))] if collapse else [[t] for t in range(len(names))]
            if collapse:
                ge, ga, gb = ge[:1], ga[:1], gb[:1]
        else:
            x0 = self._check_input(x, per_task=names)
            lanes = [[t] for t in range(len(names))]
        vl = self._trunk(x0, ge, ga, gb, [len(lane) for lane in lanes])
        vl = vl.view(-1, len(lanes), *vl.shape[1:])
        out: dict[str, Tensor] = {}
        size = (int(x0.shape[-2]), int(x0.shape[-1]))
        aspp = [t for t in range(len(names)) if isinstance(self.heads[names[t]], ASPPHead)]
        if len(aspp) > 1:
            heads = [self.heads[names[t]] for t in aspp]
            if len(lanes) == 1:
                preds = aspp_stacked(heads, vl[:, 0], size, shared=True)
            else:
                feat = vl if len(aspp) == len(lanes) else vl[:, aspp]
                preds = aspp_stacked(heads, feat.reshape(feat.shape[0], -1, *feat.shape[3:]), size, shared=False)
            out.update({names[t]: y for t, y in zip(aspp, preds)})
        for li, lane in enumerate(lanes):
            for t in lane:
                if names[t] not in out:
                    out[names[t]] = self.heads[names[t]](vl[:, li], size)
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

    def _trunk(self, x0: Tensor, ge: Tensor, ga: Tensor, gb: Tensor, reps: list[int]) -> Tensor:
        """Compute v_L of every lane; returns (B*lanes, C_L, H_L, W_L), sample-major."""
        spec = self.spec
        n_lanes = len(reps)
        shared = x0.dim() == 4
        bsz = x0.shape[0] if shared else x0.shape[1]
        # Per-task inputs (K, B, ...) -> sample-major (B*K, ...), the layout TaskBatchNorm expects.
        flat_in = x0 if shared else x0.transpose(0, 1).reshape(-1, *x0.shape[2:])
        all_lanes = list(range(n_lanes))
        # Which lanes use each edge: all in soft mode; in hard mode read once from the masks
        # (one host transfer per forward, not one per edge).
        if self.hard:
            on_e, on_a, on_b = ((c != 0).T.tolist() for c in (ge, ga, gb))
        else:
            on_e = on_a = on_b = None

        def active(on: list[list[bool]] | None, col: int) -> list[int]:
            return all_lanes if on is None else [li for li in all_lanes if on[col][li]]

        def gather(t: Tensor, lanes: list[int]) -> Tensor:
            if len(lanes) == n_lanes:
                return t
            return t.view(bsz, n_lanes, *t.shape[1:])[:, lanes].reshape(-1, *t.shape[1:])

        def add(acc: Tensor | None, y: Tensor, coef: Tensor, lanes: list[int]) -> Tensor:
            """acc + coef[lane] * y on the given lanes; y is (B, len(lanes), C, H, W)."""
            if len(lanes) == n_lanes:
                c = coef.view(1, -1, 1, 1, 1)
                return y * c if acc is None else torch.addcmul(acc, y, c)
            idx = torch.tensor(lanes, device=y.device)
            y = y.new_zeros(bsz, n_lanes, *y.shape[2:]).index_add(1, idx, y * coef[idx].view(1, -1, 1, 1, 1))
            return y if acc is None else acc + y

        def lanes_view(y: Tensor, n: int) -> Tensor:
            return y.view(bsz, n, *y.shape[1:])

        states: list[Tensor | None] = []  # each (B, lanes, C, H, W), zero on lanes where dead
        edge_pos = {e: p for p, e in enumerate(self.edge_list)}
        incoming: dict[int, list[int]] = {j: [] for j in range(spec.n_states)}
        for i, j in self.edge_list:
            incoming[j].append(i)
        vl: Tensor | None = None
        for j, sj in enumerate(spec.states):
            acc: Tensor | None = None
            lanes = active(on_a, j)
            if lanes:
                blk = self.read_in[j]
                if shared:
                    # One image for all lanes: the read-in is computed once.
                    y = blk(resize(flat_in, 1, sj.stride), 1, [sum(reps[li] for li in lanes)])
                    y = y.unsqueeze(1).expand(bsz, len(lanes), *y.shape[1:])
                else:
                    y = lanes_view(blk(resize(gather(flat_in, lanes), 1, sj.stride), len(lanes),
                                       [reps[li] for li in lanes]), len(lanes))
                acc = add(acc, y, ga[:, j], lanes)
            for i in incoming[j]:
                pos = edge_pos[(i, j)]
                lanes = active(on_e, pos)
                if not lanes:
                    continue
                if states[i] is None:
                    raise SpecError(f"masks are not closed: edge {i}->{j} leaves dead state {i}; "
                                    "close them with dagc.trainer.topology.close_masks")
                src = gather(states[i].reshape(-1, *states[i].shape[2:]), lanes)
                y = self.edges[edge_key(i, j)](src, len(lanes), [reps[li] for li in lanes])
                acc = add(acc, lanes_view(y, len(lanes)), ge[:, pos], lanes)
            states.append(acc)
            lanes = active(on_b, j)
            if lanes and acc is not None:
                src = resize(gather(acc.reshape(-1, *acc.shape[2:]), lanes), sj.stride, spec.readout.stride)
                y = self.read_out[j](src, len(lanes), [reps[li] for li in lanes])
                vl = add(vl, lanes_view(y, len(lanes)), gb[:, j], lanes)
        if vl is None:
            raise SpecError("no task has an active read-out: the masks leave no path to the output")
        return vl.reshape(-1, *vl.shape[2:])


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

    Raises CheckpointError when a tensor is missing or has the wrong shape for the spec.
    """
    from dagc.errors import CheckpointError

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
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"tensor {k} has shape {tuple(v.shape)}, the spec needs "
                                  f"{tuple(expected[k].shape)}")
    net.load_state_dict(state)
    if "mask.gamma" in tensors:
        try:
            net.set_masks(tensors["mask.gamma"], tensors["mask.alpha"], tensors["mask.beta"])
        except (KeyError, SpecError) as e:
            raise CheckpointError(f"checkpoint masks are invalid: {e}") from None


def network_from_checkpoint(ckpt) -> CentralNetwork:
    """Build the (masked, if reduced) supernet of a loaded `dagc.checkpoint.Checkpoint`."""
    net = CentralNetwork(ckpt.spec)
    load_network_tensors(net, ckpt.tensors)
    return net

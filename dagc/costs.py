"""Analytic compute and size of blocks, heads, sub-networks and the unpruned supernet, read off the
block and head definitions of `dagc.blocks` (no tracing).

All counts are per sample (batch 1) at the spec's ``input_size``. Every function returns
``{"macs", "flops", "params"}``.

Conventions:

* MACs (multiply-accumulates) are counted for convolutions and linear layers only. A conv's MACs
  are ``C_out * C_in * k * k * H_out * W_out`` with ``H_out, W_out`` the conv's own output (before
  any max-pool; a dilated 3x3 conv with padding = dilation keeps its input size); a linear layer's
  are ``in * out``. Biases, batch norm, ReLU, pooling (max and average), the sums of a state's
  edges, resizes (average pooling, bilinear interpolation), the L2 normalisation of normals and
  the heads' final upsampling are *not* counted.
* FLOPs = 2 * MACs (the convention of ``torch.utils.flop_counter.FlopCounterMode``, which the
  tests check these numbers against).
* Parameters: the weights and biases of the convs and linears used, plus the batch norm's
  ``weight`` and ``bias`` for a block that is not folded. Running statistics are buffers, not
  parameters, and are not counted; neither are the architecture logits Γ, A, B or the masks. A
  folded block has a conv weight and a bias and no batch norm. A parameter tensor used by several
  applications (the same block unfolded, or the same folded key) counts once; MACs count every
  application.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence

import numpy as np

from dagc.blocks import HIDDEN, READ_IN, BlockDef, blocks, head
from dagc.spec import Spec, TaskSpec

__all__ = ["costs", "head_costs", "network_costs", "supernet_costs", "masked_parameters", "block_flops"]


def costs(macs: int, params: int) -> dict:
    """``{"macs", "flops", "params"}`` of the given MACs and parameters (FLOPs = 2 MACs)."""
    return {"macs": int(macs), "flops": 2 * int(macs), "params": int(params)}


def head_costs(spec: Spec, task: TaskSpec | str) -> dict:
    """Costs of one task's head (`dagc.blocks.head`); raises SpecError for an unknown task."""
    h = head(spec, task)
    return costs(h.macs, h.n_params)


def network_costs(spec: Spec, computed: Iterable[tuple[BlockDef, Hashable | None]],
                  tasks: Sequence[str]) -> dict:
    """Costs of a model that applies the given blocks and runs the heads of ``tasks``.

    ``computed`` holds one ``(block, folded)`` pair per block application: ``folded`` is None for
    a block with its own batch norm, else the key of the folded tensors it uses. Parameters of an
    unfolded block count once per block, those of a folded one once per folded key.
    """
    macs = 0
    stored: dict[Hashable, int] = {}
    for b, folded in computed:
        macs += b.macs
        where = b.key if folded is None else ("fold", folded)
        if where not in stored:
            stored[where] = b.n_params(folded=folded is not None)
    params = sum(stored.values())
    for t in tasks:
        h = head(spec, t)
        macs += h.macs
        params += h.n_params
    return costs(macs, params)


def supernet_costs(spec: Spec, tasks: Sequence[str] | None = None) -> dict:
    """Costs of the unpruned supernet running ``tasks`` (default: all K), as the supernet runs
    them: each task computes every block, so MACs = len(tasks) * (all read-ins + all band edges +
    all read-outs) + the tasks' heads. Parameters: every block once (unfolded) plus the tasks'
    heads. Raises SpecError for an unknown task."""
    names = list(spec.task_names) if tasks is None else list(dict.fromkeys(tasks))
    for t in names:
        spec.task(t)
    return network_costs(spec, [(b, None) for _ in names for b in blocks(spec)], names)


def masked_parameters(spec: Spec, gamma, alpha, beta) -> int:
    """Parameters of the blocks that some task's 0/1 masks switch on, each block once, plus every
    task's head. Takes stacked (K, N, N), (K, N), (K, N) masks (numpy or anything array-like)."""
    masks = tuple(np.asarray(m) for m in (gamma, alpha, beta))
    used = [(b, None) for b in blocks(spec) if np.asarray(b.mask(*masks)).any()]
    return network_costs(spec, used, spec.task_names)["params"]


def block_flops(spec: Spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FLOPs of every block of ``spec`` laid out as a task's masks (`mask_layout`). A sub-network's
    blocks cost the sum of these under its masks (its head comes on top: `head_costs`)."""
    return mask_layout(spec, lambda blk: 2 * blk.macs)


def mask_layout(spec: Spec, cost: Callable[[BlockDef], float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``cost`` of every block of ``spec`` laid out as a task's masks: hidden edges (N, N) (zero off
    the flow band), read-ins (N,) and read-outs (N,), float64."""
    n = spec.n_states
    g, a, b = np.zeros((n, n)), np.zeros(n), np.zeros(n)
    for blk in blocks(spec):
        if blk.kind == HIDDEN:
            g[blk.src, blk.dst] = cost(blk)
        elif blk.kind == READ_IN:
            a[blk.dst] = cost(blk)
        else:
            b[blk.src] = cost(blk)
    return g, a, b

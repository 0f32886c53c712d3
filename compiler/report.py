"""Human-readable reports of a compiled artifact: the sharing table, per-task topology metrics,
per-task SVG pictures of the sub-networks and ``report.md``.

`report_markdown` reads the typed `dagc.manifest.Manifest`: its models (sha256 from its files),
costs (the per-task supernet costs computed from its spec), topology, sharing, and the pictures
``graph_<task>.svg`` among its files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from dagc.compiler.flops import supernet_costs
from dagc.compiler.ir import READOUT, Graph, masks_of
from dagc.compiler.mixed_precision import fp32_nodes_text
from dagc.manifest import FORMAT, FORMAT_VERSION, Cost, Manifest
from dagc.precision_table import REFERENCE
from dagc.spec import Spec
from dagc.trainer.topology import flow_band, topology_metrics

__all__ = ["sharing_table", "task_topology", "render_task_svg", "report_markdown", "picture_file"]


# ---------------------------------------------------------------------------------- tables
def sharing_table(graph: Graph) -> list[dict]:
    """One row per node of ``graph``, in its order: ``{"id", "state", "tasks", "edges"}`` with
    ``state`` the 0-based hidden state index or ``"L"`` for a read-out, ``tasks`` the list of
    tasks the node is computed for, ``edges`` its number of incoming edges."""
    return [
        {"id": n.id, "state": "L" if n.state == READOUT else int(n.state), "tasks": list(n.tasks),
         "edges": len(n.edges)}
        for n in graph.nodes
    ]


def _task_masks(tensors_or_masks, spec: Spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(tensors_or_masks, Mapping):
        return masks_of(tensors_or_masks, spec)
    g, a, b = (np.asarray(m.detach().cpu().numpy() if hasattr(m, "detach") else m)
               for m in tensors_or_masks)
    return g, a, b


def task_topology(tensors_or_masks, spec: Spec) -> dict[str, dict]:
    """Depth D, width W and sparsity S of each task's sub-network
    (`dagc.trainer.topology.topology_metrics` on the task's masks).

    Takes the checkpoint tensors (``mask.gamma/alpha/beta``) or a (gamma, alpha, beta) triple of
    stacked (K, N, N), (K, N), (K, N) masks. Returns task -> {"D": int, "W": int, "S": float}.
    Raises CompileError if the checkpoint is not reduced."""
    gamma, alpha, beta = _task_masks(tensors_or_masks, spec)
    band = flow_band(spec.n_states, spec.flow_constant)
    out = {}
    for k, task in enumerate(spec.task_names):
        m = topology_metrics(np.asarray(gamma[k], dtype=np.int64), np.asarray(alpha[k], dtype=np.int64),
                             np.asarray(beta[k], dtype=np.int64), band)
        out[task] = {"D": int(m["D"]), "W": int(m["W"]), "S": float(m["S"])}
    return out


# ---------------------------------------------------------------------------------- picture
_STEP = 70  # horizontal distance between nodes
_Y = 150  # the line the nodes sit on
_R = 14  # node radius


def _arc(x1: float, x2: float, up: bool, lift: float) -> str:
    """A quadratic curve from node x1 to node x2, above (up) or below the line."""
    h = lift * (1 if up else -1)
    mid = (x1 + x2) / 2
    sy = _Y - _R * 0.7 if up else _Y + _R * 0.7
    return f"M {x1:.1f} {sy:.1f} Q {mid:.1f} {_Y - 2 * h:.1f} {x2:.1f} {sy:.1f}"


def render_task_svg(spec: Spec, masks_for_task, task: str) -> str:
    """An SVG picture of one task's sub-network, in the style of the paper's Fig. 3.

    The input, the N hidden states and the read-out L sit on a horizontal line; every active edge
    is one ``<path class="edge ...">``: hidden edges as arcs above the line (``edge hidden``),
    read-ins from the input (``edge read-in``) and read-outs into L (``edge read-out``) as arcs
    below it. States without an active edge are drawn grey. Deterministic text (same masks, same
    bytes).

    Takes the spec, the task's (gamma (N, N), alpha (N), beta (N)) 0/1 masks and the task's name.
    """
    g, a, b = (np.asarray(m.detach().cpu().numpy() if hasattr(m, "detach") else m) for m in masks_for_task)
    n = spec.n_states
    xs = [40 + _STEP * p for p in range(n + 2)]  # 0 = input, 1..N hidden, N+1 = read-out
    active = [bool(a[j] or g[:, j].any() or g[j, :].any() or b[j]) for j in range(n)]
    width, height = xs[-1] + 40, 320
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f"<title>{escape(f'dagc sub-network of task {task}')}</title>",
        "<style>.edge{fill:none;stroke-width:1.6}.hidden{stroke:#1f77b4}.read-in{stroke:#2ca02c}"
        ".read-out{stroke:#d62728}.dead{fill:#eeeeee;stroke:#bbbbbb}.live{fill:#ffffff;stroke:#333333}"
        ".io{fill:#333333;stroke:#333333}</style>",
        f'<text x="10" y="20" font-size="14">task {escape(task)}: '
        f"{int(np.count_nonzero(g))} hidden, {int(np.count_nonzero(a))} read-in, "
        f"{int(np.count_nonzero(b))} read-out edges</text>",
        '<g class="edges">',
    ]
    out += _svg_edges(g, a, b, xs)
    out.append("</g>")
    out.append('<g class="nodes">')
    out += _svg_nodes(spec, xs, active)
    out.append("</g>")
    out.append(f'<text x="10" y="{height - 20}" font-size="9" fill="#777777">blue: hidden edges, '
               "green: read-in, red: read-out; grey states are unused</text>")
    out.append(f'<text x="10" y="{height - 8}" font-size="9" fill="#777777">under each state: '
               "channels/stride; hidden states are 0-based (v0 is the paper's v_1)</text>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _svg_edges(g, a, b, xs: list[float]) -> list[str]:
    """One ``<path>`` per active edge: hidden edges arc above the line, read-ins and read-outs below."""
    n, out = len(a), []
    span = max(1, n + 1)
    for i in range(n):
        for j in range(i + 1, n):
            if g[i, j]:
                lift = 12 + 60 * (j - i) / span
                out.append(f'<path class="edge hidden" data-src="v{i}" data-dst="v{j}" '
                           f'd="{_arc(xs[i + 1], xs[j + 1], True, lift)}"/>')
    for j in range(n):
        if a[j]:
            lift = 10 + 45 * (j + 1) / span
            out.append(f'<path class="edge read-in" data-src="input" data-dst="v{j}" '
                       f'd="{_arc(xs[0], xs[j + 1], False, lift)}"/>')
    for i in range(n):
        if b[i]:
            lift = 10 + 45 * (n - i) / span
            out.append(f'<path class="edge read-out" data-src="v{i}" data-dst="L" '
                       f'd="{_arc(xs[i + 1], xs[-1], False, lift)}"/>')
    return out


def _svg_nodes(spec: Spec, xs: list[float], active: list[bool]) -> list[str]:
    """The input, the hidden states (grey when unused, with channels/stride) and the read-out."""
    n, out = spec.n_states, []
    labels = ["in", *(f"v{j}" for j in range(n)), "L"]
    for p, (x, label) in enumerate(zip(xs, labels)):
        if p in (0, n + 1):
            cls, fill = "io", "#ffffff"
        else:
            cls, fill = ("live", "#333333") if active[p - 1] else ("dead", "#aaaaaa")
        out.append(f'<circle class={quoteattr("node " + cls)} cx="{x}" cy="{_Y}" r="{_R}"/>')
        out.append(f'<text x="{x}" y="{_Y + 4}" text-anchor="middle" fill="{fill}">{label}</text>')
        if 0 < p <= n:
            s = spec.states[p - 1]
            out.append(f'<text x="{x}" y="{_Y + 130}" text-anchor="middle" font-size="9" fill="#777777">'
                       f"{s.channels}/{s.stride}</text>")
    return out


# ---------------------------------------------------------------------------------- markdown
def _num(v) -> str:
    """An exact integer followed by a short human form: ``12345678 (12.3 M)``."""
    if v is None:
        return "-"
    v = int(v)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v} ({v / div:.3g} {unit})"
    return str(v)


def picture_file(task: str) -> str:
    """The artifact's SVG picture of ``task``'s sub-network."""
    return f"graph_{task}.svg"


def _cell(v) -> str:
    return str(v).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _ratio_cell(cost: Cost, sup: Cost) -> str:
    ratio = cost.flops / sup.flops if sup.flops else None
    return "-" if ratio is None else f"{ratio:.3f} ({100 * ratio:.1f} %)"


def _model_rows(manifest: Manifest) -> list[list]:
    rows = []
    for name, m in manifest.models.items():
        sha = manifest.files[name].sha256 if name in manifest.files else ""
        rows.append([f"`{name}`", ", ".join(m.tasks), _num(m.cost.macs), _num(m.cost.flops), _num(m.cost.params),
                     f"`{sha[:12]}`" if sha else "-", m.format, f"{m.verified_max_rel_error:.1e}"])
    return rows


def _cost_rows(manifest: Manifest) -> list[list]:
    costs, spec = manifest.costs, manifest.spec
    rows = []
    for t, c in costs.per_task.items():
        sup = Cost(**supernet_costs(spec, [t]))
        rows.append([f"`{t}`", _num(c.flops), _num(c.params), _num(sup.flops), _ratio_cell(c, sup)])
    for label, c in (("all (shared model)", costs.shared), ("all, without cross-task sharing", costs.unshared)):
        rows.append([label, _num(c.flops), _num(c.params), _num(costs.supernet.flops), _ratio_cell(c, costs.supernet)])
    return rows


def report_markdown(manifest: Manifest) -> str:
    """``report.md`` of an artifact: the manifest's numbers as tables (models, per-task cost against
    the unpruned supernet, topology, sharing) and links to the per-task pictures. Takes the
    manifest; returns the markdown text. A manifest without models (a preview) has no models
    table, one without files no file list."""
    tasks = list(manifest.tasks)
    inp = manifest.input.to_dict()
    lines = ["# dagc artifact", "", f"Format `{FORMAT}` version {FORMAT_VERSION}.", "",
             f"Tasks: {', '.join(f'`{t}`' for t in tasks)}.", "",
             f"Input: {'; '.join(f'{k}: `{v}`' for k, v in sorted(inp.items()) if v is not None)}.", "",
             "MACs and FLOPs are per sample (batch 1), counting convolutions and linear layers "
             "only (FLOPs = 2 x MACs); parameters exclude batch-norm running statistics.", ""]
    if manifest.models:
        lines += ["## Models", ""]
        lines += _table(["file", "tasks", "MACs", "FLOPs", "params", "sha256", "format", "max rel. error vs supernet"],
                        _model_rows(manifest))
    lines += ["## Compute per task against the unpruned supernet", ""]
    lines += _table(["task", "FLOPs", "params", "supernet FLOPs", "ratio"], _cost_rows(manifest))
    sup = manifest.costs.supernet
    lines += [f"The unpruned supernet running all tasks: {_num(sup.flops)} FLOPs, {_num(sup.params)} parameters.", ""]
    lines += ["## Topology (paper Sec. 3.1)", "",
              "D: longest path in edges; W: largest out-degree of a hidden state; S: active edges "
              "/ all edges of the central network.", ""]
    lines += _table(["task", "D", "W", "S"], [[f"`{t}`", m.D, m.W, f"{m.S:.4f}"] for t, m in manifest.topology.items()])
    lines += ["## Sharing", "", "One row per computed state instance (hidden states 0-based: `v0` is the "
              "paper's v_1; `L` the read-out); an instance serving several tasks is computed once "
              "for all of them.", ""]
    lines += _table(["node", "state", "tasks", "edges"],
                    [[f"`{r.id}`", r.state, ", ".join(r.tasks), r.edges] for r in manifest.sharing])
    acc = manifest.accuracy
    if acc is not None:  # dagc compile --precision: the check of every reduced precision on the tasks
        lines += ["## Reduced precisions, checked on the tasks", "",
                  f"Primary metric of each task on the {acc.dataset} {acc.split} split, against the fp32 compiled "
                  f"model (drop relative; refused above {acc.max_metric_drop:.1%}).", ""]
        ref = acc.precisions[REFERENCE].models
        lines += _table(["precision", "file", "task", "metric", REFERENCE, "value", "drop", "fallback"],
                        [[p, f"`{c.file}`", t, acc.primary[t][0], f"{ref[n].metrics[t][acc.primary[t][0]]:.4f}",
                          f"{c.metrics[t][acc.primary[t][0]]:.4f}", f"{d:+.2%}", c.fallback or "-"]
                         for p, check in acc.reduced().items()
                         for n, c in check.models.items() for t, d in c.drop.items()])
        kept = fp32_nodes_text(acc)
        lines += [f"Nodes kept in fp32 for accuracy: {kept.replace(chr(10), '; ')}", ""] if kept else []
    pictures = [t for t in tasks if picture_file(t) in manifest.files]
    if pictures:
        lines += ["## Sub-networks", ""]
        for t in pictures:
            lines += [f"### {t}", "", f"![sub-network of task {t}]({picture_file(t)})", ""]
    if manifest.files:
        lines += ["## Files", ""]
        lines += _table(["file", "bytes", "sha256"], [[f"`{f}`", "-" if e.bytes is None else e.bytes, f"`{e.sha256}`"]
                                                      for f, e in sorted(manifest.files.items())])
    return "\n".join(lines).rstrip("\n") + "\n"

"""Human-readable reports of a compiled artifact: the sharing table, per-task topology metrics,
per-task SVG pictures of the sub-networks and ``report.md``.

Manifest keys `report_markdown` reads (each optional; a missing one drops its section):

    format, format_version      the artifact format
    input                       the input: a string or a mapping (names, shape, dtype, ...)
    tasks                       task names: a list of names or of {"name", ...} objects, or a
                                mapping name -> {...}
    models                      a list of {"file", "tasks", "macs", "flops", "params"} or a mapping
                                file -> {...} (optional "format", "verified_max_rel_error");
                                sha256 from files[file]["sha256"]
    costs                       shared, supernet, tasks (alias per_task), supernet_tasks, unshared:
                                each {"macs", "flops", "params"}, per task where named so
                                (`dagc.compiler.flops.cost_summary` gives all but unshared).
                                Without supernet_tasks, the per-task supernet cost is computed from
                                ``spec``.
    spec                        `dagc.spec.Spec.to_dict` (used only as said above)
    topology                    task -> {"D", "W", "S"} (`task_topology`)
    sharing                     `sharing_table` rows
    pictures                    task -> SVG file name; without it, a listed file named
                                ``graph_<task>.svg`` or ``<task>.svg`` is taken
    files                       name -> {"sha256", "bytes"} (written by `write_artifact`)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from dagc.compiler.flops import supernet_costs
from dagc.compiler.ir import READOUT, Graph, masks_of
from dagc.errors import DagcError
from dagc.spec import Spec
from dagc.trainer.topology import flow_band, topology_metrics

__all__ = ["sharing_table", "task_topology", "render_task_svg", "report_markdown"]


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
    out.append("</g>")
    out.append('<g class="nodes">')
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
    out.append("</g>")
    out.append(f'<text x="10" y="{height - 20}" font-size="9" fill="#777777">blue: hidden edges, '
               "green: read-in, red: read-out; grey states are unused</text>")
    out.append(f'<text x="10" y="{height - 8}" font-size="9" fill="#777777">under each state: '
               "channels/stride; hidden states are 0-based (v0 is the paper's v_1)</text>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


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


def _task_names(manifest: Mapping) -> list[str]:
    tasks = manifest.get("tasks") or []
    if isinstance(tasks, Mapping):
        return list(tasks)
    names = [t["name"] if isinstance(t, Mapping) else str(t) for t in tasks]
    if not names:
        names = list((manifest.get("costs") or {}).get("tasks", {}) or manifest.get("topology", {}) or [])
    return names


def _models(manifest: Mapping) -> list[dict]:
    models = manifest.get("models") or []
    if isinstance(models, Mapping):
        return [{"file": f, **m} for f, m in models.items()]
    return list(models)


def _supernet_tasks(manifest: Mapping, tasks: list[str]) -> dict:
    try:
        spec = Spec.from_dict(manifest["spec"])
        return {t: supernet_costs(spec, [t]) for t in tasks}
    except (KeyError, TypeError, DagcError):
        return {}


def _cell(v) -> str:
    return str(v).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def report_markdown(manifest: Mapping) -> str:
    """``report.md`` of an artifact: the manifest's numbers as tables (models, per-task cost against
    the unpruned supernet, topology, sharing) and links to the per-task pictures. See the module
    docstring for the keys read."""
    files = manifest.get("files") or {}
    tasks = _task_names(manifest)
    costs = manifest.get("costs") or {}
    lines = ["# dagc artifact", ""]
    fmt = manifest.get("format")
    if fmt:
        lines += [f"Format `{fmt}` version {manifest.get('format_version', '?')}.", ""]
    if tasks:
        lines += [f"Tasks: {', '.join(f'`{t}`' for t in tasks)}.", ""]
    inp = manifest.get("input")
    if isinstance(inp, Mapping):
        parts = [f"{k}: `{v}`" for k, v in sorted(inp.items()) if v is not None]
        lines += [f"Input: {'; '.join(parts)}.", ""]
    elif inp is not None:
        lines += [f"Input: `{inp}`.", ""]
    lines += ["MACs and FLOPs are per sample (batch 1), counting convolutions and linear layers "
              "only (FLOPs = 2 x MACs); parameters exclude batch-norm running statistics.", ""]

    models = _models(manifest)
    if models:
        extra = [k for k in ("format", "verified_max_rel_error") if any(k in m for m in models)]
        rows = []
        for m in models:
            f = m.get("file", "?")
            sha = (files.get(f) or {}).get("sha256") or m.get("sha256") or ""
            mtasks = m.get("tasks")
            row = [f"`{f}`", ", ".join(mtasks) if isinstance(mtasks, (list, tuple)) else (mtasks or "-"),
                   _num(m.get("macs")), _num(m.get("flops")), _num(m.get("params")),
                   f"`{sha[:12]}`" if sha else "-"]
            if "format" in extra:
                row.append(m.get("format", "-"))
            if "verified_max_rel_error" in extra:
                err = m.get("verified_max_rel_error")
                row.append("-" if err is None else f"{float(err):.1e}")
            rows.append(row)
        header = ["file", "tasks", "MACs", "FLOPs", "params", "sha256"]
        header += [{"format": "format", "verified_max_rel_error": "max rel. error vs supernet"}[k] for k in extra]
        lines += ["## Models", ""]
        lines += _table(header, rows)

    per_task = costs.get("tasks") or costs.get("per_task") or {}
    if per_task:
        sup_tasks = costs.get("supernet_tasks") or _supernet_tasks(manifest, list(per_task))
        rows = []
        for t in tasks or list(per_task):
            c = per_task.get(t) or {}
            s = sup_tasks.get(t) or {}
            ratio = (c.get("flops") or 0) / s["flops"] if s.get("flops") else None
            rows.append([f"`{t}`", _num(c.get("flops")), _num(c.get("params")), _num(s.get("flops")),
                         "-" if ratio is None else f"{ratio:.3f} ({100 * ratio:.1f} %)"])
        shared, sup = costs.get("shared"), costs.get("supernet")
        if shared:
            ratio = shared["flops"] / sup["flops"] if sup and sup.get("flops") else None
            rows.append(["all (shared model)", _num(shared.get("flops")), _num(shared.get("params")),
                         _num((sup or {}).get("flops")),
                         "-" if ratio is None else f"{ratio:.3f} ({100 * ratio:.1f} %)"])
        unshared = costs.get("unshared")
        if unshared:
            ratio = unshared["flops"] / sup["flops"] if sup and sup.get("flops") else None
            rows.append(["all, without cross-task sharing", _num(unshared.get("flops")),
                         _num(unshared.get("params")), _num((sup or {}).get("flops")),
                         "-" if ratio is None else f"{ratio:.3f} ({100 * ratio:.1f} %)"])
        lines += ["## Compute per task against the unpruned supernet", ""]
        lines += _table(["task", "FLOPs", "params", "supernet FLOPs", "ratio"], rows)
        if sup:
            lines += [f"The unpruned supernet running all tasks: {_num(sup.get('flops'))} FLOPs, "
                      f"{_num(sup.get('params'))} parameters.", ""]

    topo = manifest.get("topology") or {}
    if topo:
        rows = [[f"`{t}`", m.get("D"), m.get("W"), f"{float(m.get('S', 0)):.4f}"]
                for t, m in ((t, topo[t]) for t in (tasks or list(topo)) if t in topo)]
        lines += ["## Topology (paper Sec. 3.1)", "",
                  "D: longest path in edges; W: largest out-degree of a hidden state; S: active edges "
                  "/ all edges of the central network.", ""]
        lines += _table(["task", "D", "W", "S"], rows)

    sharing = manifest.get("sharing") or []
    if sharing:
        rows = [[f"`{r.get('id')}`", r.get("state"), ", ".join(r.get("tasks", [])), r.get("edges")]
                for r in sharing]
        lines += ["## Sharing", "", "One row per computed state instance (hidden states 0-based: `v0` is the "
                  "paper's v_1; `L` the read-out); an instance serving several tasks is computed once "
                  "for all of them.", ""]
        lines += _table(["node", "state", "tasks", "edges"], rows)

    pictures = manifest.get("pictures") or {
        t: f for t in tasks for f in (f"graph_{t}.svg", f"{t}.svg") if f in files}
    if pictures:
        lines += ["## Sub-networks", ""]
        for t in tasks or list(pictures):
            if t in pictures:
                lines += [f"### {t}", "", f"![sub-network of task {t}]({pictures[t]})", ""]

    if files:
        lines += ["## Files", ""]
        lines += _table(["file", "bytes", "sha256"],
                        [[f"`{f}`", (files[f] or {}).get("bytes", "-"), f"`{(files[f] or {}).get('sha256', '')}`"]
                         for f in sorted(files)])
    return "\n".join(lines).rstrip("\n") + "\n"

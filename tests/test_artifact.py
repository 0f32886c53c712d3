"""Artifact directory: atomic write, force, checksums; reports and pictures."""

import hashlib
import json
import xml.etree.ElementTree as ET
from dataclasses import replace

import numpy as np
import pytest
import torch
from manifest_cases import typed_manifest

from dagc.artifact import FORMAT_VERSION, load_manifest, read_manifest
from dagc.compiler.artifact import write_artifact
from dagc.compiler.flops import cost_summary
from dagc.compiler.ir import build_graph, masks_of
from dagc.compiler.report import render_task_svg, report_markdown, sharing_table, task_topology
from dagc.errors import ArtifactError, CompileError
from dagc.manifest import PREVIEW, Manifest
from dagc.spec import TaskSpec, preset
from dagc.trainer.network import CentralNetwork, network_tensors
from dagc.trainer.topology import close_masks, flow_band, is_connected, topology_metrics

TASKS = [TaskSpec("seg", "segmentation", 3), TaskSpec("cls", "classification", 4)]
SVG = "{http://www.w3.org/2000/svg}"


def _reduced(seed=0):
    spec = preset("tiny", TASKS, input_size=(16, 16))
    rng = np.random.default_rng(seed)
    band = flow_band(spec.n_states, spec.flow_constant)
    masks = []
    for _ in spec.tasks:
        while True:
            g = (rng.random(band.shape) < 0.5).astype(np.int64) * band
            a, b = ((rng.random(spec.n_states) < 0.5).astype(np.int64) for _ in range(2))
            if is_connected(g, a, b):
                break
        masks.append(close_masks(g, a, b))
    torch.manual_seed(seed)
    net = CentralNetwork(spec)
    net.set_masks(*(torch.from_numpy(np.stack([m[i] for m in masks])) for i in range(3)))
    return spec, network_tensors(net)


def _preview(manifest: Manifest) -> Manifest:
    """The same without models: a manifest that any set of files satisfies."""
    return replace(manifest, target=PREVIEW, models={}, routes={})


@pytest.fixture(scope="module")
def case():
    spec, tensors = _reduced()
    graph = build_graph(spec, tensors)
    gamma, alpha, beta = masks_of(tensors, spec)
    svgs = {f"graph_{t}.svg": render_task_svg(spec, (gamma[k], alpha[k], beta[k]), t).encode()
            for k, t in enumerate(spec.task_names)}
    files = {"model.onnx": b"shared model bytes", **{f"model_{t}.onnx": f"{t} bytes".encode()
                                                     for t in spec.task_names}, **svgs}
    return spec, tensors, graph, files, typed_manifest(spec, tensors, graph)


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_write_and_read(case, tmp_path):
    spec, _, _, files, manifest = case
    out = write_artifact(tmp_path / "art", files, manifest)
    assert out == tmp_path / "art"
    assert _listing(tmp_path) == ["art"]  # no temporary left next to it
    assert _listing(out) == sorted([*files, "manifest.json", "report.md"])
    m = read_manifest(out)
    assert m["format"] == "dagc.artifact" and m["format_version"] == FORMAT_VERSION == 3
    for name, data in files.items():
        assert (out / name).read_bytes() == data
        assert m["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert m["files"]["report.md"]["sha256"] == hashlib.sha256((out / "report.md").read_bytes()).hexdigest()
    assert m["costs"] == json.loads(json.dumps(manifest.costs.to_dict()))
    assert not manifest.files  # the caller's manifest is left alone
    assert load_manifest(out) == replace(manifest, files=load_manifest(out).files)  # typed round trip
    text = (out / "manifest.json").read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


def test_failed_write_leaves_nothing(case, tmp_path):
    _, _, _, files, manifest = case
    with pytest.raises(TypeError):
        write_artifact(tmp_path / "art", {**files, "bad.bin": object()}, manifest)
    assert _listing(tmp_path) == []
    # With force over an existing artifact: the old one stays untouched.
    write_artifact(tmp_path / "art", files, manifest)
    before = {p.name: p.read_bytes() for p in (tmp_path / "art").iterdir()}
    with pytest.raises(TypeError):
        write_artifact(tmp_path / "art", {"x.onnx": b"new", "bad.bin": object()}, _preview(manifest), force=True)
    assert _listing(tmp_path) == ["art"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "art").iterdir()} == before


def test_refuses_without_force_replaces_with_force(case, tmp_path):
    _, _, _, files, manifest = case
    out = write_artifact(tmp_path / "art", files, manifest)
    with pytest.raises(CompileError, match="exists; pass --force to replace it"):
        write_artifact(out, {"other.onnx": b"other"}, _preview(manifest))
    assert _listing(tmp_path) == ["art"] and (out / "model.onnx").exists()
    write_artifact(out, {"other.onnx": b"other"}, _preview(manifest), force=True)
    assert _listing(tmp_path) == ["art"]  # old one deleted, no temporaries
    assert _listing(out) == ["manifest.json", "other.onnx", "report.md"]
    assert set(read_manifest(out)["files"]) == {"other.onnx", "report.md"}


def test_bad_file_names_rejected(case, tmp_path):
    preview = _preview(case[4])
    for name in ("../x", "/abs", "manifest.json", "report.md", "a/../b", ""):
        with pytest.raises(CompileError):
            write_artifact(tmp_path / "art", {name: b"x"}, preview)
        assert _listing(tmp_path) == []
    write_artifact(tmp_path / "art", {"repo/seg/1/model.onnx": b"x"}, preview)
    assert read_manifest(tmp_path / "art")["files"]["repo/seg/1/model.onnx"]["bytes"] == 1


def test_tampering_detected(case, tmp_path):
    _, _, _, files, manifest = case
    out = write_artifact(tmp_path / "art", files, manifest)
    (out / "model_seg.onnx").write_bytes(b"seg bytez")
    with pytest.raises(ArtifactError, match="model_seg.onnx"):
        read_manifest(out)
    (out / "model_seg.onnx").write_bytes(files["model_seg.onnx"])
    read_manifest(out)
    (out / "graph_cls.svg").unlink()
    with pytest.raises(ArtifactError, match="graph_cls.svg.*missing"):
        read_manifest(out)


def test_foreign_or_unknown_version(case, tmp_path):
    out = write_artifact(tmp_path / "art", {"a.bin": b"a"}, _preview(case[4]))
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(ArtifactError, match="version 99"):
        read_manifest(out)
    (out / "manifest.json").write_text(json.dumps({**m, "format": "something"}))
    with pytest.raises(ArtifactError, match="not a dagc artifact"):
        read_manifest(out)
    (out / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json"):
        read_manifest(out)


def test_report_mentions_everything(case, tmp_path):
    spec, _, graph, files, manifest = case
    out = write_artifact(tmp_path / "art", files, manifest)
    report = (out / "report.md").read_text()
    written = load_manifest(out)
    assert report == report_markdown(replace(written, files={k: v for k, v in written.files.items()
                                                             if k != "report.md"}))
    for t in spec.task_names:
        assert f"`{t}`" in report and f"(graph_{t}.svg)" in report
        assert str(manifest.costs.per_task[t].flops) in report
    for name in files:
        assert name in report
    assert str(manifest.costs.supernet.flops) in report
    for row in sharing_table(graph):
        assert f"`{row['id']}`" in report
    preview = report_markdown(_preview(manifest))  # no models, no files: those sections are left out
    assert preview.startswith("# dagc artifact") and "## Models" not in preview and "## Files" not in preview


def test_sharing_table_and_topology(case):
    spec, tensors, graph, _, _ = case
    rows = sharing_table(graph)
    assert len(rows) == len(graph.nodes)
    assert {r["state"] for r in rows if r["id"].startswith("L:")} == {"L"}
    assert all(len(r["tasks"]) == 1 for r in rows)  # nothing shared before the passes
    topo = task_topology(tensors, spec)
    gamma, alpha, beta = masks_of(tensors, spec)
    band = flow_band(spec.n_states, spec.flow_constant)
    for k, t in enumerate(spec.task_names):
        assert topo[t] == topology_metrics(gamma[k], alpha[k], beta[k], band)
    assert task_topology((gamma, alpha, beta), spec) == topo


@pytest.mark.parametrize("seed", range(4))
def test_svg_well_formed_one_element_per_edge(seed):
    spec, tensors = _reduced(seed)
    gamma, alpha, beta = masks_of(tensors, spec)
    for k, t in enumerate(spec.task_names):
        text = render_task_svg(spec, (gamma[k], alpha[k], beta[k]), t)
        assert text == render_task_svg(spec, (gamma[k], alpha[k], beta[k]), t)  # deterministic
        root = ET.fromstring(text.encode())
        assert root.tag == f"{SVG}svg"
        edges = [e for e in root.iter() if "edge" in e.get("class", "").split()]
        assert len(edges) == int(gamma[k].sum() + alpha[k].sum() + beta[k].sum())
        assert all(e.tag == f"{SVG}path" for e in edges)
        hidden = {(e.get("data-src"), e.get("data-dst")) for e in edges if "hidden" in e.get("class")}
        assert hidden == {(f"v{i}", f"v{j}") for i, j in zip(*np.nonzero(gamma[k]))}
        nodes = [e for e in root.iter(f"{SVG}circle")]
        assert len(nodes) == spec.n_states + 2
        dead = sum("dead" in e.get("class") for e in nodes)
        used = np.zeros(spec.n_states, bool)
        used |= alpha[k].astype(bool) | beta[k].astype(bool) | gamma[k].any(0) | gamma[k].any(1)
        assert dead == int((~used).sum())


def test_report_of_compile_shaped_manifest(case, tmp_path):
    """Per-task costs against the per-task supernet (computed from the spec), pictures found by
    file name, the unshared row, the verification error and the input."""
    spec, _, graph, files, manifest = case
    costs = cost_summary(graph)
    out = write_artifact(tmp_path / "art", files, manifest)
    report = (out / "report.md").read_text()
    for t in spec.task_names:
        ratio = costs["tasks"][t]["flops"] / costs["supernet_tasks"][t]["flops"]
        assert f"{ratio:.3f}" in report
        assert f"(graph_{t}.svg)" in report
    assert "without cross-task sharing" in report and "1.0e-06" in report and "float32" in report

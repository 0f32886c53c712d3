"""Accuracy-aware mixed precision (issue 22, part 4): a --max-metric-drop that whole-model int8
breaks is met by keeping the most sensitive convs in fp32, recorded in the manifest and the
summary; --calibration picks ONNX Runtime's calibration method. No timing here: the speed of the
mixed model against fp32 is benchmarks/mixed_precision.py's."""

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import onnx
import pytest

from dagc.artifact import load_manifest, read_manifest
from dagc.compiler.calibration import ENTROPY_BINS, kl_threshold
from dagc.compiler.compile import compile_artifact
from dagc.compiler.mixed_precision import (
    MAX_EVALUATIONS,
    MIXED,
    Attempt,
    keep_fewest,
    ranked_nodes,
    sensitivities,
    upstream,
)
from dagc.compiler.precision import check_options
from dagc.compiler.quantize import CALIBRATIONS, INT8, narrow_read_ins, quantize_int8
from dagc.errors import CompileError
from dagc.manifest import Manifest
from dagc.runners import OrtRunner
from dagc.tools.cli import main


@pytest.fixture(scope="module")
def trained(short_checkpoint):
    return short_checkpoint


@pytest.fixture(scope="module")
def whole(trained, tmp_path_factory):
    """fp32 + int8 at the default allowance, where every model passes quantized whole."""
    out = tmp_path_factory.mktemp("whole") / "a"
    compile_artifact(trained, out, precisions="fp32,int8", calibration_batches=2)
    return out


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(list(map(str, args)))
    return e.value.code, capsys.readouterr()


def _fp32_convs(model: onnx.ModelProto) -> set[str]:
    """Convs whose weights are float initializers, not the output of a DequantizeLinear."""
    init = {i.name for i in model.graph.initializer}
    return {n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in init}


def test_a_tight_budget_keeps_the_fewest_sensitive_convs_in_fp32(trained, whole, tmp_path, capsys):
    checks = load_manifest(whole).accuracy.precisions["int8"].models
    assert {c.fallback for c in checks.values()} == {"none"} and all(not c.fp32_nodes for c in checks.values())
    worst = {n: max(c.drop.values()) for n, c in checks.items()}
    budget = max(worst.values()) / 2  # the worst whole-model int8 drop breaks it
    assert budget > 0
    out = tmp_path / "mixed"
    code, cap = _cli(capsys, "compile", trained, "--out", out, "--precision", "fp32,int8", "--max-metric-drop",
                     repr(budget), "--calibration-batches", "2")
    assert code in (0, None), cap.err
    m = load_manifest(out)
    acc = m.accuracy
    assert acc.max_metric_drop == budget
    mixed = {n: c for n, c in acc.precisions["int8"].models.items() if c.fallback == MIXED}
    assert mixed, {n: c.fallback for n, c in acc.precisions["int8"].models.items()}
    for name, c in acc.precisions["int8"].models.items():
        assert max(c.drop.values()) <= budget  # every task within the budget
        if worst[name] > budget:
            assert c.fallback != "none" and c.fp32_nodes
    for name, c in mixed.items():
        fp32 = onnx.load(str(out / name))
        failing = [t for t, d in checks[name].drop.items() if d > budget]
        assert set(c.fp32_nodes) <= upstream(fp32, failing)  # only nodes the failing tasks read
        q = onnx.load(str(out / c.file))
        kept = _fp32_convs(q)
        assert set(c.fp32_nodes) <= kept  # recorded nodes are fp32 convs of the int8 file
        assert kept - set(c.fp32_nodes) == set(narrow_read_ins(fp32))  # and only they beside the speed rule
        assert len(c.fp32_nodes) <= len({n.name for n in q.graph.node if n.op_type == "Conv"}) // 2
    # recorded in the manifest (version 3), read back the same, and printed by the compile
    d = read_manifest(out)
    assert d["format_version"] == 3
    assert Manifest.from_dict(d).to_dict() == d
    for name, c in mixed.items():
        assert d["accuracy"]["precisions"]["int8"]["models"][name]["fp32_nodes"] == list(c.fp32_nodes)
        assert f"int8 {c.file}: {len(c.fp32_nodes)} node(s) kept in fp32 (mixed)" in cap.out
    assert "kept in fp32 for accuracy" in (out / "report.md").read_text()


def test_version_2_artifacts_without_fp32_nodes_still_load(whole, tmp_path):
    old = tmp_path / "v2"
    shutil.copytree(whole, old)
    d = read_manifest(old)
    d["format_version"] = 2
    for check in d["accuracy"]["precisions"].values():
        for c in check["models"].values():
            del c["fp32_nodes"]
    (old / "manifest.json").write_text(json.dumps(d))
    m = load_manifest(old)
    assert all(c.fp32_nodes == () for p in m.accuracy.precisions.values() for c in p.models.values())
    assert m.accuracy.precisions["int8"].models["model.onnx"].file == "model.int8.onnx"


def _feeds(model: onnx.ModelProto, n: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    shape = [d.dim_value or 4 for d in model.graph.input[0].type.tensor_type.shape.dim]
    return [{i.name: rng.standard_normal(shape).astype(np.float32) for i in model.graph.input} for _ in range(n)]


def test_upstream_is_what_a_task_output_reads(whole):
    model = onnx.load(str(whole / "model.onnx"))
    normal, depth = upstream(model, ["normal"]), upstream(model, ["depth"])
    assert upstream(model, ["normal", "depth"]) == normal | depth
    assert any(n.startswith("heads.normal.") for n in normal) and not any(n.startswith("heads.depth.") for n in normal)
    assert upstream(model, [o.name for o in model.graph.output]) == {n.name for n in model.graph.node}
    assert upstream(model, ["nope"]) == set()


def _error(model: bytes, reference: bytes, feeds, output: str) -> float:
    got, ref = OrtRunner(model, device="cpu"), OrtRunner(reference, device="cpu")
    pairs = [(got.run(f, [output])[output], ref.run(f, [output])[output].astype(np.float64)) for f in feeds]
    return sum(float(np.sum((a - b) ** 2)) for a, b in pairs) / sum(float(np.sum(b ** 2)) for _, b in pairs)


def test_sensitivities_measure_what_each_conv_in_fp32_leaves_of_the_output_error(whole):
    data = (whole / "task_depth.onnx").read_bytes()
    model = onnx.load_from_string(data)
    feeds = _feeds(model)
    q = quantize_int8(data, feeds)
    scores = sensitivities(data, q, feeds, ["depth"])
    quantized = {n.name for n in onnx.load_from_string(q).graph.node if n.op_type == "Conv"} - _fp32_convs(
        onnx.load_from_string(q))
    assert set(scores) == quantized and quantized
    assert not set(scores) & set(narrow_read_ins(model))  # already fp32 for speed: not candidates
    assert all(math.isfinite(s) and s >= 0 for s in scores.values())
    assert sensitivities(data, q, feeds, ["depth"]) == scores
    assert set(sensitivities(data, q, feeds, ["depth"], candidates=sorted(quantized)[:2])) == set(sorted(quantized)[:2])
    ranked = ranked_nodes(scores)
    assert [scores[n] for n in ranked] == sorted(scores.values())
    whole_error = _error(q, data, feeds, "depth")
    assert scores[ranked[0]] < whole_error  # the best conv to keep in fp32 takes some error away
    # and quantizing with it excluded (ONNX Runtime's nodes_to_exclude) leaves it in fp32, with less error
    kept = quantize_int8(data, feeds, exclude=ranked[:1])
    assert ranked[0] in _fp32_convs(onnx.load_from_string(kept))
    assert _error(kept, data, feeds, "depth") < whole_error


@pytest.mark.parametrize("need, most, found", [(7, 20, 7), (1, 20, 1), (20, 20, 20), (11, 10, None)])
def test_keep_fewest_finds_the_smallest_passing_prefix_within_its_evaluations(need, most, found):
    ranked = [f"n{i}" for i in range(30)]
    calls = []

    def attempt(exclude):
        calls.append(len(exclude))
        return Attempt(b"", None, {"t": 0.0 if len(exclude) >= need else 1.0}, MIXED, exclude)

    best, made = keep_fewest(ranked, attempt, 0.5, most)
    assert (None if best is None else len(best.fp32_nodes)) == found
    assert best is None or best.fp32_nodes == tuple(ranked[:found])
    assert len(calls) == len(set(calls)) == len(made) <= MAX_EVALUATIONS
    assert max(calls) <= most


def test_kl_threshold_clips_outliers_and_keeps_a_range_without_them():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(100_000), [40.0, -40.0]]).astype(np.float32)
    lo, hi = kl_threshold(*np.histogram(x, ENTROPY_BINS, range=(-40, 40)))
    assert -8 < lo < -3 and 3 < hi < 8  # the two outliers clipped, the bulk of the normal kept
    u = rng.uniform(-1, 1, 100_000).astype(np.float32)
    lo, hi = kl_threshold(*np.histogram(u, ENTROPY_BINS, range=(-1, 1)))
    assert lo < -0.99 and hi > 0.99  # nothing to clip


def test_entropy_calibration_is_its_own_and_deterministic(whole):
    data = (whole / "task_depth.onnx").read_bytes()
    feeds = _feeds(onnx.load_from_string(data))
    entropy = replace(INT8, method="Entropy")
    q = quantize_int8(data, feeds, settings=entropy)
    assert q == quantize_int8(data, feeds, settings=entropy)
    assert q != quantize_int8(data, feeds)  # not min-max's ranges (what quantize_static's defaults give)
    assert _error(q, data, feeds, "depth") < 1


def test_calibration_methods_are_recorded_and_a_bad_one_is_refused(trained, whole, tmp_path, capsys):
    for name, method in CALIBRATIONS.items():
        assert check_options(("fp32", "int8"), calibration=name)[0].method == method
    assert load_manifest(whole).accuracy.precisions["int8"].calibration.method == INT8.method == "MinMax"
    for bad in ("kl", 3):
        with pytest.raises(CompileError, match=r"--calibration must be one of \['minmax', 'entropy', 'percentile'\]"):
            compile_artifact(trained, tmp_path / "bad", precisions="fp32,int8", calibration=bad)
    code, cap = _cli(capsys, "compile", trained, "--out", tmp_path / "p", "--precision", "fp32,int8",
                     "--calibration", "percentile", "--calibration-batches", "2")
    assert code in (0, None) and "Percentile" not in cap.out  # ONNX Runtime's progress prints stay out
    assert load_manifest(tmp_path / "p").accuracy.precisions["int8"].calibration.method == "Percentile"
    # percentile clips the activation ranges: other scales than min-max's
    assert (tmp_path / "p" / "model.int8.onnx").read_bytes() != (whole / "model.int8.onnx").read_bytes()
    assert not (tmp_path / "bad").exists()

"""The typed manifest (dagc.manifest), the task-subset routes (dagc.routes) and the typed
preprocessing (dagc.preprocessing): round trips, field-naming refusals, version-1 artifacts, and
readers that take the recorded routes."""

import json
import shutil
from dataclasses import dataclass

import numpy as np
import pytest
from compiler_cases import compiled_artifact, random_reduced_net
from manifest_cases import typed_manifest

from dagc.artifact import load_manifest
from dagc.checkpoint import save_checkpoint
from dagc.compiler.compile import compile_checkpoint
from dagc.compiler.ir import build_graph
from dagc.errors import ArtifactError, DataError
from dagc.manifest import FORMAT_VERSION, Manifest
from dagc.preprocessing import FORMULA, Preprocessing
from dagc.routes import ROUTE_MAX_TASKS, cheapest_cover, recorded_subsets
from dagc.runtime import load
from dagc.spec import TaskSpec, preset
from dagc.tools.cli import main
from dagc.tools.triton import export_triton
from dagc.trainer.network import network_tensors

SPEC = preset("tiny", [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth"),
                       TaskSpec("cls", "classification", 4)], input_size=(16, 16))
# The prose form the trainer wrote before raw_range existed (and version-1 artifacts hold).
LEGACY = {"raw": "RGB in [0, 1]", "layout": "NCHW", "dtype": "float32", "mean": [0.4, 0.5, 0.3],
          "std": [0.2, 0.25, 0.15], "formula": FORMULA}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("mf")
    save_checkpoint(root / "c.safetensors", network_tensors(random_reduced_net(SPEC, 5)), SPEC, "finetune",
                    preprocessing=LEGACY)
    compile_checkpoint(root / "c.safetensors", root / "art")
    return root / "art"


def _edited(art, tmp_path, edit, name="copy"):
    """A copy of ``art`` whose manifest.json went through ``edit(dict)`` (manifest.json is not in
    its own sha256 list, so the copy still passes the file checks)."""
    dst = tmp_path / name
    shutil.copytree(art, dst)
    d = json.loads((dst / "manifest.json").read_text())
    edit(d)
    (dst / "manifest.json").write_text(json.dumps(d))
    return dst


def _as_version_1(d):
    """What 1114379 wrote: no routes, the prose preprocessing, format_version 1 (FORMAT.md)."""
    d["format_version"] = 1
    del d["routes"]
    del d["input"]["preprocessing"]["raw_range"]


# --------------------------------------------------------------------------------------------- round trip


def test_manifest_round_trips_and_records_routes_and_numeric_preprocessing(artifact):
    m = load_manifest(artifact)
    text = (artifact / "manifest.json").read_text()
    assert m.to_json() == text and Manifest.from_json(text) == m
    assert json.loads(text)["format_version"] == FORMAT_VERSION == 3
    assert m.routes["onnx"][("seg",)] == ("task_seg.onnx",) and m.routes["onnx"][SPEC.task_names] == ("model.onnx",)
    assert len(m.routes["onnx"]) == 2 ** 3 - 1
    assert m.input.preprocessing == Preprocessing((0.0, 1.0), (0.4, 0.5, 0.3), (0.2, 0.25, 0.15),
                                                  description="RGB in [0, 1]")
    assert list(m.tasks) == list(SPEC.task_names) and m.spec == SPEC
    with pytest.raises(TypeError):
        m.models["x"] = m.models["model.onnx"]  # read-only


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["models"]["task_seg.onnx"].update(flops="x"), r"models\['task_seg.onnx'\].flops must be an integer"),
    (lambda d: d["input"].update(shape=[1, 3, 16, 16]), r"input.shape must be a shape \[\"batch\""),
    (lambda d: d["input"]["preprocessing"].update(std=[0.2, -1, 0.1]), "input.preprocessing.std must be positive"),
    (lambda d: d["input"]["preprocessing"].pop("raw_range"), "input.preprocessing.raw_range is missing"),
    (lambda d: d["routes"]["onnx"].update(seg=["nope.onnx"]), r"routes\['onnx'\]\['seg'\] must name onnx models"),
    (lambda d: d["routes"]["onnx"].update({"cls,seg": ["model.onnx"]}), "in spec order"),
    (lambda d: d["routes"]["onnx"].update(seg=["task_cls.onnx"]), "do not compute every task"),
    (lambda d: d["tasks"].pop("depth"), "tasks must list the spec's tasks"),
    (lambda d: d["tasks"]["cls"].update(output_shape=["batch", 5]), r"tasks\['cls'\] output_shape"),
    (lambda d: d["models"]["model.onnx"].update(inputs=["photo"]), r"models\['model.onnx'\] inputs"),
    (lambda d: d["models"]["model.onnx"].pop("opset"), "opset is required for format 'onnx'"),
    (lambda d: d.update(extra=1), r"unknown field\(s\) \['extra'\]"),
    (lambda d: d["sharing"][0].update(edges="x"), r"sharing\[0\].edges must be an integer"),
])
def test_invalid_fields_are_refused_naming_the_field(artifact, tmp_path, edit, words):
    with pytest.raises(ArtifactError, match=words) as e:
        load_manifest(_edited(artifact, tmp_path, edit))
    assert "manifest.json" in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------- version 1


def test_version_1_artifacts_load_run_and_export(artifact, tmp_path):
    old = _edited(artifact, tmp_path, _as_version_1, "v1")
    m1, m2 = load_manifest(old), load_manifest(artifact)
    assert m1.routes == m2.routes  # computed by the same rule the compiler recorded
    assert m1.input.preprocessing == m2.input.preprocessing  # the prose "[0, 1]" converted once
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    e1, e2 = load(old, "onnxruntime"), load(artifact, "onnxruntime")
    for tasks in (None, ["depth"], ["seg", "cls"]):
        assert e1.models_for(tasks) == e2.models_for(tasks)
        for t, v in e2.run(x, tasks).items():
            np.testing.assert_array_equal(e1.run(x, tasks)[t], v)
    assert export_triton(old, tmp_path / "repo")["routes"] == export_triton(artifact, tmp_path / "repo2")["routes"]
    with pytest.raises(SystemExit) as done:
        main(["inspect", str(old)])
    assert done.value.code == 0


def test_readers_take_the_recorded_routes(artifact, tmp_path):
    """A route rewritten in manifest.json is what the runtime and the Triton export use: neither
    recomputes the choice."""
    routed = _edited(artifact, tmp_path, lambda d: d["routes"]["onnx"].update(depth=["model.onnx"]))
    engine = load(routed, "onnxruntime")
    assert engine.models_for(["depth"]) == ("model.onnx",)
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(engine.run(x, ["depth"])["depth"], load(artifact).run(x, ["depth"])["depth"],
                               rtol=1e-5, atol=1e-5)
    routing = export_triton(routed, tmp_path / "repo")
    assert routing["routes"]["onnx"]["depth"]["model"] == "dagc"


# --------------------------------------------------------------------------------------------- the rule


@dataclass
class _M:
    name: str
    tasks: tuple
    inputs: tuple
    flops: int
    format: str = "onnx"


ORDER = ("a", "b", "c")


def test_cheapest_cover_rule():
    shared = {t: "image" for t in ORDER}
    models = [_M("model", ORDER, ("image",), 10), _M("ta", ("a",), ("image",), 4), _M("tb", ("b",), ("image",), 5),
              _M("tc", ("c",), ("image",), 6)]
    assert cheapest_cover(["a"], models, ORDER, shared) == ("ta",)
    assert cheapest_cover(["b", "a"], models, ORDER, shared) == ("ta", "tb")  # 4 + 5 < 10, spec order
    assert cheapest_cover(["c", "b"], models, ORDER, shared) == ("model",)  # 10 < 5 + 6
    models[0].flops = 9  # tie with a + b: fewer models win
    assert cheapest_cover(["a", "b"], models, ORDER, shared) == ("model",)
    models[0].flops = 100
    assert cheapest_cover(["c", "a"], models, ORDER, shared) == ("ta", "tc")  # spec order
    own = {t: f"image_{t}" for t in ORDER}  # the shared model reads every task's input
    per_task = [_M("model", ORDER, tuple(own.values()), 1), *(_M(f"t{t}", (t,), (own[t],), 5) for t in ORDER)]
    assert cheapest_cover(["a", "b"], per_task, ORDER, own) == ("ta", "tb")
    assert cheapest_cover(list(ORDER), per_task, ORDER, own) == ("model",)
    assert cheapest_cover(["a", "b"], per_task[:2], ORDER, own) is None


def test_subsets_beyond_the_cap_are_covered_on_demand():
    tasks = [TaskSpec(f"t{i}", "classification", 2) for i in range(ROUTE_MAX_TASKS + 1)]
    spec = preset("tiny", tasks, input_size=(16, 16))
    assert len(recorded_subsets(spec.task_names)) == len(spec.task_names) + 1  # each alone, and all
    tensors = network_tensors(random_reduced_net(spec, 3))
    m = typed_manifest(spec, tensors, build_graph(spec, tensors))
    assert set(m.routes["onnx"]) == {(t,) for t in spec.task_names} | {spec.task_names}
    pair = ["t3", "t1"]
    want = cheapest_cover(pair, m.models.values(), spec.task_names, m.task_inputs())
    assert m.route("onnx", pair) == want
    with pytest.raises(ArtifactError, match="no tensorrt model"):
        m.route("tensorrt", pair)
    assert len(recorded_subsets(SPEC.task_names)) == 7


def test_a_small_compiled_artifact_routes_every_subset(tmp_path):
    spec = preset("omniglot", [TaskSpec("a", "classification", 5), TaskSpec("b", "classification", 3)],
                  in_channels=1, shared_input=False, input_size=(8, 8))
    m = load_manifest(compiled_artifact(tmp_path, spec, 6))
    assert dict(m.routes["onnx"]) == {("a",): ("task_a.onnx",), ("b",): ("task_b.onnx",),
                                      ("a", "b"): ("model.onnx",)}
    assert m.input.preprocessing is None


# --------------------------------------------------------------------------------------------- preprocessing


def test_preprocessing_round_trip_legacy_form_and_refusals():
    p = Preprocessing((0.0, 255.0), (100.0,), (50.0,), description="grey levels")
    assert Preprocessing.from_dict(p.to_dict()) == p and p.to_dict()["formula"] == FORMULA
    assert Preprocessing.from_record(p.to_dict()) == p
    old = Preprocessing.from_legacy({"raw": "8-bit grey in [0, 255]", "mean": [100], "std": [50]})
    assert old.raw_range == (0.0, 255.0) and old.mean == (100.0,) and old.description == "8-bit grey in [0, 255]"
    assert Preprocessing.from_record(LEGACY).raw_range == (0.0, 1.0)
    assert Preprocessing.from_legacy({"raw": "RGB", "mean": [0.5], "std": [0.5]}).raw_range == (0.0, 1.0)
    lo, hi = p.value_bounds()
    np.testing.assert_allclose([lo[0], hi[0]], [-2.0, 3.1])
    np.testing.assert_allclose(p.normalise(np.full((1, 2, 2), 150.0, np.float32)), 1.0)
    for bad, words in [({**p.to_dict(), "std": [0]}, "std must be positive"),
                       ({**p.to_dict(), "raw_range": [1, 0]}, "raw_range must be two numbers lo < hi"),
                       ({**p.to_dict(), "mean": [0, 1]}, "one value per channel"),
                       ({**p.to_dict(), "layout": "NHWC"}, "layout must be one of"),
                       ({**p.to_dict(), "formula": "raw / 255"}, "formula 'raw / 255' is not supported"),
                       ({**p.to_dict(), "scale": 2}, "unknown field"),
                       ({**p.to_dict(), "mean": ["a"]}, r"mean\[0\] must be a finite number")]:
        with pytest.raises(DataError, match=words):
            Preprocessing.from_dict(bad)

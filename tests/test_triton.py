"""`dagc export triton`: every config.pbtxt parses with Triton's own protobuf definitions and agrees
with the ONNX model next to it, files are copied byte for byte, routes compute what the runtime
computes, and a bad artifact or an existing --out gives one line, exit 2 and nothing half-written."""

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from compiler_cases import compiled_artifact
from google.protobuf import text_format

from dagc import artifact as artifact_module
from dagc.artifact import load_manifest, read_manifest
from dagc.compiler.artifact import write_artifact
from dagc.compiler.ir import CompileError
from dagc.errors import ConfigError
from dagc.manifest import TensorRTSettings
from dagc.routes import compute_routes
from dagc.runtime import ArtifactError, load
from dagc.spec import TaskSpec, preset
from dagc.tools import triton
from dagc.tools.cli import main
from dagc.tools.triton import TritonConfig, export_triton

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="needs tritonclient[grpc] (Triton's protobuf definitions)")
DT = model_config_pb2.DataType
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: DT.TYPE_FP32, onnx.TensorProto.FLOAT16: DT.TYPE_FP16}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    spec = preset("tiny", [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth"),
                           TaskSpec("cls", "classification", 4)], input_size=(16, 16))
    return compiled_artifact(tmp_path_factory.mktemp("tr"), spec, 5)


@pytest.fixture(scope="module")
def per_task_artifact(tmp_path_factory):
    spec = preset("omniglot", [TaskSpec("a", "classification", 5), TaskSpec("b", "classification", 3),
                               TaskSpec("c", "classification", 2)], in_channels=1, shared_input=False,
                  input_size=(8, 8))
    return compiled_artifact(tmp_path_factory.mktemp("tr_pt"), spec, 6)


@pytest.fixture(scope="module")
def plan_artifact(artifact, tmp_path_factory):
    """The artifact as `--target tensorrt` lays it out: a .plan per ONNX model, listed in the
    manifest with its profile's batches. The plan bytes are opaque to the export, which only
    copies them, so this runs without a GPU."""
    manifest = load_manifest(artifact)
    files = {n: (artifact / n).read_bytes() for n in manifest.files if n != "report.md"}
    models = dict(manifest.models)
    for name, info in manifest.models.items():
        plan = name.replace(".onnx", ".plan")
        files[plan] = f"plan of {name}".encode()
        models[plan] = replace(info, name=plan, format="tensorrt", precision="fp32", batches=(1, 8, 16),
                               built_from=name)
    routes = compute_routes(manifest.spec.task_names, manifest.task_inputs(), models.values())
    out = tmp_path_factory.mktemp("tr_plan") / "art"
    write_artifact(out, files, replace(manifest, target="tensorrt", tensorrt=TensorRTSettings((1, 8, 16), "fp32"),
                                       models=models, routes=routes, files={}))
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _configs(repo: Path) -> dict:
    out = {}
    for d in sorted(p for p in repo.iterdir() if p.is_dir()):
        cfg = model_config_pb2.ModelConfig()
        text_format.Parse((d / "config.pbtxt").read_text(), cfg)
        out[d.name] = cfg
    return out


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _check_against_onnx(cfg, path: Path):
    model = onnx.load(path)
    for triton_side, onnx_side in ((cfg.input, model.graph.input), (cfg.output, model.graph.output)):
        assert [t.name for t in triton_side] == [v.name for v in onnx_side]
        for t, v in zip(triton_side, onnx_side):
            dims = _dims(v)
            assert isinstance(dims[0], str), "the batch axis of the ONNX model must be dynamic"
            assert list(t.dims) == dims[1:]  # Triton dims leave the batch axis out
            assert t.data_type == ONNX_TO_TRITON[v.type.tensor_type.elem_type]


def test_configs_parse_and_match_the_onnx_models(artifact, tmp_path):
    routing = export_triton(artifact, tmp_path / "repo")
    repo = tmp_path / "repo"
    manifest = read_manifest(artifact)
    configs = _configs(repo)
    assert set(configs) == set(routing["models"])
    onnx_models = {n: c for n, c in configs.items() if c.platform == "onnxruntime_onnx"}
    # one Triton model per compiled ONNX model, the shared one under the bare prefix
    assert sorted(routing["models"][n]["source"] for n in onnx_models) == sorted(manifest["models"])
    assert routing["models"]["dagc"]["source"] == "model.onnx"
    for name, cfg in onnx_models.items():
        assert cfg.name == name and cfg.max_batch_size == triton.DEFAULT_MAX_BATCH
        assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds == 100
        assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_AUTO)]
        copied = repo / name / "1" / "model.onnx"
        _check_against_onnx(cfg, copied)
        source = routing["models"][name]["source"]
        assert _sha(copied) == manifest["files"][source]["sha256"] == _sha(artifact / source)
        assert [o.name for o in cfg.output] == manifest["models"][source]["outputs"]
    assert json.loads((repo / triton.ROUTING).read_text()) == json.loads(json.dumps(routing))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"


def _run_route(repo: Path, configs, route, feeds):
    """Run a route the way Triton would: the model itself, or an ensemble's steps, with ONNX Runtime
    on the repository's copies."""
    cfg = configs[route["model"]]
    if cfg.platform == "ensemble":
        values = dict(feeds)
        for step in cfg.ensemble_scheduling.step:
            sess = ort.InferenceSession(str(repo / step.model_name / "1" / "model.onnx"),
                                        providers=["CPUExecutionProvider"])
            outs = list(step.output_map)
            got = sess.run(outs, {k: values[v] for k, v in step.input_map.items()})
            values.update({step.output_map[k]: v for k, v in zip(outs, got)})
        return {t: values[t] for t in route["outputs"]}
    sess = ort.InferenceSession(str(repo / route["model"] / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in cfg.input]
    return dict(zip(route["outputs"], sess.run(route["outputs"], {i: feeds[i] for i in inputs})))


@pytest.mark.parametrize("which", ["artifact", "per_task_artifact"])
def test_routes_cover_every_subset_and_compute_what_the_runtime_computes(which, request, tmp_path):
    art = request.getfixturevalue(which)
    routing = export_triton(art, tmp_path / "repo")
    repo = tmp_path / "repo"
    configs = _configs(repo)
    engine = load(art, backend="onnxruntime", threads=1)
    routes = routing["routes"]["onnx"]
    tasks = list(engine.tasks)
    assert len(routes) == 2 ** len(tasks) - 1
    for t in tasks:  # one task: its own model
        assert routing["models"][routes[t]["model"]]["source"] == f"task_{t}.onnx"
    assert routes[",".join(tasks)]["model"] == "dagc"  # all tasks: the shared model
    rng = np.random.default_rng(0)
    names = engine.input_spec["names"]
    feeds = {n: rng.standard_normal((2, *engine.input_spec["shape"][1:])).astype(np.float32) for n in names}
    for key, route in routes.items():
        subset = key.split(",")
        cfg = configs[route["model"]]
        assert set(subset) <= {o.name for o in cfg.output}
        chosen = list(engine.models_for(subset))
        if cfg.platform == "ensemble":
            steps = [s.model_name for s in cfg.ensemble_scheduling.step]
            assert [routing["models"][s]["source"] for s in steps] == chosen
            assert sorted(o.name for o in cfg.output) == sorted(subset)
            assert cfg.max_batch_size <= min(configs[s].max_batch_size for s in steps)
            assert {i.name for i in cfg.input} == {v for s in cfg.ensemble_scheduling.step for v in s.input_map.values()}
            for s in cfg.ensemble_scheduling.step:
                assert set(s.input_map) == {i.name for i in configs[s.model_name].input}
                assert set(s.output_map) <= {o.name for o in configs[s.model_name].output}
            assert (repo / route["model"] / "1").is_dir() and not any((repo / route["model"] / "1").iterdir())
        else:
            assert [routing["models"][route["model"]]["source"]] == chosen
        images = feeds[names[0]] if engine.shared_input else feeds
        want = engine.run(images, subset)
        got = _run_route(repo, configs, route, feeds)
        for t in subset:
            np.testing.assert_allclose(got[t], want[t], rtol=1e-6, atol=1e-6, err_msg=f"route {key}, task {t}")


def test_tensorrt_plans_become_tensorrt_plan_models(plan_artifact, tmp_path):
    routing = export_triton(plan_artifact, tmp_path / "repo")
    repo = tmp_path / "repo"
    configs = _configs(repo)
    manifest = read_manifest(plan_artifact)
    plans = {n: c for n, c in configs.items() if c.platform == "tensorrt_plan"}
    assert sorted(routing["models"][n]["source"] for n in plans) == sorted(
        n for n, m in manifest["models"].items() if m["format"] == "tensorrt")
    for name, cfg in plans.items():
        assert name.endswith("_trt")
        source = routing["models"][name]["source"]
        assert _sha(repo / name / "1" / "model.plan") == manifest["files"][source]["sha256"]
        assert cfg.max_batch_size == 16 and list(cfg.dynamic_batching.preferred_batch_size) == [8, 16]
        assert [g.kind for g in cfg.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
        twin = configs[name[: -len("_trt")]]  # the ONNX model the plan was built from
        assert routing["models"][name[: -len("_trt")]]["source"] == manifest["models"][source]["built_from"]
        assert [(t.name, list(t.dims), t.data_type) for t in cfg.input] == [
            (t.name, list(t.dims), t.data_type) for t in twin.input]
        assert [(t.name, list(t.dims)) for t in cfg.output] == [(t.name, list(t.dims)) for t in twin.output]
    # ONNX models follow the plans' largest batch so both kinds accept the same requests
    assert configs["dagc"].max_batch_size == 16
    trt_routes = routing["routes"]["tensorrt"]
    assert trt_routes["seg"]["model"] == "dagc_seg_trt" and trt_routes["seg,depth,cls"]["model"] == "dagc_trt"
    for route in trt_routes.values():
        cfg = configs[route["model"]]
        if cfg.platform == "ensemble":
            assert all(configs[s.model_name].platform == "tensorrt_plan" for s in cfg.ensemble_scheduling.step)


def test_options_reach_the_configs(artifact, tmp_path):
    config = TritonConfig(name="net-a", max_batch_size=4, instances=3, max_queue_delay_us=0, ensembles=False)
    routing = export_triton(artifact, tmp_path / "repo", config)
    configs = _configs(tmp_path / "repo")
    assert all(c.platform != "ensemble" for c in configs.values())
    assert set(configs) == {"net-a", "net-a_seg", "net-a_depth", "net-a_cls"}
    for cfg in configs.values():
        assert cfg.max_batch_size == 4 and cfg.dynamic_batching.max_queue_delay_microseconds == 0
        assert [g.count for g in cfg.instance_group] == [3]
    for key, route in routing["routes"]["onnx"].items():  # subsets without an ensemble list the models to call
        assert ("model" in route) != ("models" in route)
        if "models" in route:
            assert set(route["models"]) <= set(configs) and route["outputs"] == key.split(",")


@pytest.mark.parametrize("kw, field", [({"name": "a/b"}, "prefix"), ({"name": ""}, "prefix"),
                                       ({"max_batch_size": 0}, "max_batch_size"), ({"instances": 0}, "instances"),
                                       ({"max_queue_delay_us": -1}, "max_queue_delay_us"),
                                       ({"ensembles": "yes"}, "ensembles"), ({"instances": True}, "instances")])
def test_config_is_validated(kw, field):
    with pytest.raises(ConfigError, match=field):
        TritonConfig(**kw)


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _tamper_version(art):
    m = json.loads((art / "manifest.json").read_text())
    m["format_version"] = 99
    (art / "manifest.json").write_text(json.dumps(m))


def _tamper_format(art):
    m = json.loads((art / "manifest.json").read_text())
    m["models"]["task_seg.onnx"]["format"] = "openvino"
    (art / "manifest.json").write_text(json.dumps(m))


def _tamper_bytes(art):
    with open(art / "task_depth.onnx", "ab") as f:
        f.write(b"\0")


def _not_json(art):
    (art / "manifest.json").write_text("{ nope")


@pytest.mark.parametrize("damage, words", [
    (lambda art: shutil.rmtree(art), "does not exist"),
    (lambda art: (art / "manifest.json").unlink(), "not a dagc artifact"),
    (_not_json, "not valid JSON"),
    (_tamper_version, "format version 99"),
    (lambda art: (art / "task_cls.onnx").unlink(), "missing"),
    (_tamper_bytes, "sha256"),
    (_tamper_format, "'openvino'"),
], ids=["no-dir", "no-manifest", "bad-json", "version", "missing-file", "tampered", "unknown-format"])
def test_cli_refuses_bad_artifacts_with_one_line_and_writes_nothing(artifact, tmp_path, capsys, damage, words):
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    damage(art)
    code, out, err = _cli(["export", "triton", str(art), "--out", str(tmp_path / "repo")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dagc: error:") and words in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["art"] if art.exists() else [])


def test_cli_existing_out_needs_force_and_force_replaces_only_a_repository(artifact, tmp_path, capsys):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "keep.txt").write_text("mine")
    code, _, err = _cli(["export", "triton", str(artifact), "--out", str(repo)], capsys)
    assert code == 2 and err.count("\n") == 1 and "--force" in err
    assert [p.name for p in repo.iterdir()] == ["keep.txt"]
    # --force deletes only what dagc wrote: a directory of the user's is refused, kept as it was
    code, _, err = _cli(["export", "triton", str(artifact), "--out", str(repo), "--force"], capsys)
    assert code == 2 and err.count("\n") == 1 and "not a dagc artifact or Triton repository" in err, err
    assert [p.name for p in repo.iterdir()] == ["keep.txt"]
    (repo / "keep.txt").unlink()
    repo.rmdir()
    assert _cli(["export", "triton", str(artifact), "--out", str(repo)], capsys)[0] == 0
    code, out, err = _cli(["export", "triton", str(artifact), "--out", str(repo), "--force", "--max-batch", "8"],
                          capsys)
    assert code == 0, err
    assert "dagc_seg" in out and "routing.json" in out
    assert _configs(repo)["dagc"].max_batch_size == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


@pytest.mark.parametrize("args, words", [(["--max-batch", "0"], "max_batch_size"), (["--name", "a b"], "prefix"),
                                         (["--instances", "-1"], "instances")])
def test_cli_bad_options_are_one_line(artifact, tmp_path, capsys, args, words):
    code, _, err = _cli(["export", "triton", str(artifact), "--out", str(tmp_path / "repo"), *args], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not list(tmp_path.iterdir())


def test_out_inside_the_artifact_is_refused(artifact):
    with pytest.raises(CompileError, match="inside the artifact"):
        export_triton(artifact, artifact / "repo")
    assert not (artifact / "repo").exists()


def test_a_failed_write_leaves_nothing_and_keeps_the_old_repository(artifact, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    export_triton(artifact, repo)
    before = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    calls = []

    def failing_write(path, data):  # the disk fills up after a few files
        calls.append(path)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    monkeypatch.setattr(artifact_module, "_write", failing_write)  # the shared atomic directory writer
    with pytest.raises(CompileError, match=f"cannot write {repo}: the device is full.*the existing one is unchanged"):
        export_triton(artifact, repo, TritonConfig(max_batch_size=2), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before


def test_engine_refusals_are_dagc_errors(tmp_path):
    with pytest.raises(ArtifactError):
        export_triton(tmp_path / "missing", tmp_path / "repo")


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_one_task_artifact_exports_its_model_once(tmp_path, backend):
    # one task: the shared model and the task's model compute the same set; Triton names a model
    # by its tasks, so only the routed one is exported and the other is listed as skipped
    spec = preset("tiny", [TaskSpec("depth", "depth")], input_size=(16, 16))
    art = compiled_artifact(tmp_path, spec, 3)
    routing = export_triton(art, tmp_path / "repo", TritonConfig(backend=backend))
    m = load_manifest(art)
    onnx_files = sorted(n for n, i in m.models.items() if i.format == "onnx")
    assert len(onnx_files) == 2
    exported = [e["source"] for e in routing["models"].values() if e["source"] is not None]
    assert exported == list(m.route("onnx", ["depth"]))
    assert set(onnx_files) - set(exported) <= set(routing["skipped"])
    assert routing["routes"]["onnx"]["depth"]["model"] == "dagc"

"""`dagc serve` and the Python-backend repository on a real Triton Inference Server (the binary of
the nvidia-pytriton wheel), on loopback: every task-subset route answers what `Engine.run` does
over HTTP and gRPC, metadata and configs follow the manifest, concurrent clients are batched,
malformed requests are refused while serving goes on, and shutdown leaves no process behind."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from compiler_cases import compiled_artifact
from serve_cases import needs_server, server_missing
from test_triton import plan_artifact  # noqa: F401 - the fixture: an artifact with TensorRT plans

from dagc.artifact import load_manifest
from dagc.errors import ServeError
from dagc.runners import relative_error
from dagc.runtime import load
from dagc.spec import TaskSpec, preset
from dagc.tools.cli import main
from dagc.tools.serve import ServeConfig, TritonServer, find_server
from dagc.tools.triton import DEFAULT_MAX_BATCH, TritonConfig, export_triton

httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the serve extra)")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (the serve extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

# a longer batching window than the default, so that 8 clients on a busy 2-core machine still meet
BATCHING = TritonConfig(backend="python", max_queue_delay_us=2000, intra_op_threads=1)


def _config(**kw):
    return ServeConfig(**{"http_port": 0, "grpc_port": 0, "metrics_port": 0, "triton": BATCHING, **kw})


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    spec = preset("tiny", [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth"),
                           TaskSpec("cls", "classification", 4)], input_size=(16, 16))
    return compiled_artifact(tmp_path_factory.mktemp("serve"), spec, 5)


@pytest.fixture(scope="module")
def per_task_artifact(tmp_path_factory):
    spec = preset("omniglot", [TaskSpec("a", "classification", 5), TaskSpec("b", "classification", 3),
                               TaskSpec("c", "classification", 2)],
                  in_channels=1, shared_input=False, input_size=(8, 8))
    return compiled_artifact(tmp_path_factory.mktemp("serve_pt"), spec, 6)


@pytest.fixture(scope="module")
def server(artifact):
    if server_missing():
        pytest.skip(server_missing())
    s = TritonServer(artifact, _config()).start()
    yield s
    s.stop()


def _feeds(engine, batch, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((batch, *engine.input_spec["shape"][1:])).astype(np.float32)
            for n in engine.input_spec["names"]}


def _infer(client, module, model, feeds, outputs):
    inputs = []
    for name, x in feeds.items():
        i = module.InferInput(name, list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        inputs.append(i)
    result = client.infer(model, inputs, outputs=[module.InferRequestedOutput(t) for t in outputs])
    return {t: result.as_numpy(t) for t in outputs}, result.get_response()


def _output_names(response):
    """The output names of a response: a dict over HTTP, a ModelInferResponse over gRPC."""
    if isinstance(response, dict):
        return sorted(o["name"] for o in response["outputs"])
    return sorted(o.name for o in response.outputs)


def _check_routes(server, art):
    engine = load(art, backend="onnxruntime", threads=1)
    rtol = load_manifest(art).verification.onnx_rtol
    routes = server.routing["routes"]["onnx"]
    assert len(routes) == 2 ** len(engine.tasks) - 1
    assert any(server.routing["models"][r["model"]]["platform"] == "ensemble" for r in routes.values())
    clients = [(httpclient.InferenceServerClient(server.url("http")), httpclient),
               (grpcclient.InferenceServerClient(server.url("grpc")), grpcclient)]
    for seed, (key, route) in enumerate(routes.items()):
        subset = key.split(",")
        feeds = _feeds(engine, 3, seed)
        model_inputs = server.routing["models"][route["model"]]["inputs"]
        want = engine.run(feeds[engine.input_spec["names"][0]] if engine.shared_input else feeds, subset)
        for client, module in clients:
            got, response = _infer(client, module, route["model"], {n: feeds[n] for n in model_inputs}, subset)
            assert _output_names(response) == sorted(subset), f"{key}: only the outputs asked for"
            for t in subset:
                assert relative_error(got[t], want[t]) <= rtol, f"route {key}, task {t}, {module.__name__}"


@needs_server
def test_every_route_answers_what_the_engine_computes_over_http_and_grpc(server, artifact):
    _check_routes(server, artifact)


@needs_server
def test_routes_of_an_artifact_whose_tasks_have_their_own_inputs(per_task_artifact):
    with TritonServer(per_task_artifact, _config(metrics_port=None)) as s:
        assert "metrics" not in s.ports
        _check_routes(s, per_task_artifact)


@needs_server
def test_metadata_and_configs_follow_the_manifest(server, artifact):
    manifest = load_manifest(artifact)
    http = httpclient.InferenceServerClient(server.url("http"))
    grpc = grpcclient.InferenceServerClient(server.url("grpc"))
    in_dims = list(manifest.input.shape)
    assert sorted(m["name"] for m in http.get_model_repository_index()) == sorted(server.routing["models"])
    for name, info in server.routing["models"].items():
        want_in = [(i, "FP32", [-1, *in_dims]) for i in info["inputs"]]
        want_out = [(t, "FP32", [-1, *manifest.tasks[t].output_shape]) for t in info["outputs"]]
        for meta in (http.get_model_metadata(name), grpc.get_model_metadata(name, as_json=True)):
            assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == want_in
            assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]] == want_out
        cfg = http.get_model_config(name)
        assert cfg["max_batch_size"] == DEFAULT_MAX_BATCH
        if info["platform"] == "ensemble":
            steps = [s["model_name"] for s in cfg["ensemble_scheduling"]["step"]]
            assert [server.routing["models"][s]["source"] for s in steps] == list(manifest.route("onnx", info["tasks"]))
            continue
        source = manifest.models[info["source"]]
        assert cfg["backend"] == "python" and list(source.tasks) == info["tasks"]
        assert [i["name"] for i in cfg["input"]] == list(source.inputs)
        assert [o["name"] for o in cfg["output"]] == list(source.outputs)
        assert cfg["parameters"]["sha256"]["string_value"] == manifest.files[info["source"]].sha256
        assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == BATCHING.max_queue_delay_us
        # KIND_AUTO in the file: the server resolves it (CPU here, GPU where it has one)
        assert [g["count"] for g in cfg["instance_group"]] == [1]
        assert cfg["instance_group"][0]["kind"] in ("KIND_CPU", "KIND_GPU")


def test_python_repository_mirrors_the_onnxruntime_one(artifact, tmp_path):
    """Same models, tensors, batching, instances, ensembles and routes; only the backend, the
    model.py next to each ONNX file and the two parameters differ. Needs no server."""
    pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    ort_routing = export_triton(artifact, tmp_path / "ort")
    py_routing = export_triton(artifact, tmp_path / "py", TritonConfig(backend="python", intra_op_threads=2))
    assert py_routing["routes"] == ort_routing["routes"] and py_routing["backend"] == "python"
    assert sorted(py_routing["models"]) == sorted(ort_routing["models"])
    model_py = (Path(__file__).parents[1] / "tools" / "triton_model.py").read_bytes()
    for name, info in py_routing["models"].items():
        ort_cfg, py_cfg = pb2.ModelConfig(), pb2.ModelConfig()
        text_format.Parse((tmp_path / "ort" / name / "config.pbtxt").read_text(), ort_cfg)
        text_format.Parse((tmp_path / "py" / name / "config.pbtxt").read_text(), py_cfg)
        if info["platform"] == "ensemble":
            assert py_cfg == ort_cfg
            continue
        assert py_cfg.backend == "python" and not py_cfg.platform and ort_cfg.platform == "onnxruntime_onnx"
        assert dict(py_cfg.parameters)["sha256"].string_value == info["sha256"]
        assert dict(py_cfg.parameters)["intra_op_threads"].string_value == "2"
        py_cfg.ClearField("backend"), py_cfg.ClearField("parameters"), ort_cfg.ClearField("platform")
        assert py_cfg == ort_cfg
        version = tmp_path / "py" / name / "1"
        assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.py"]
        assert (version / "model.py").read_bytes() == model_py
        assert (version / "model.onnx").read_bytes() == (tmp_path / "ort" / name / "1" / "model.onnx").read_bytes()


def test_python_repository_leaves_tensorrt_plans_out(plan_artifact, tmp_path):  # noqa: F811 - the fixture
    routing = export_triton(plan_artifact, tmp_path / "py", TritonConfig(backend="python"))
    assert list(routing["routes"]) == ["onnx"] and not any(n.endswith("_trt") for n in routing["models"])
    assert sorted(routing["skipped"]) == ["model.plan", "task_cls.plan", "task_depth.plan", "task_seg.plan"]
    assert not list((tmp_path / "py").rglob("model.plan"))


def test_export_backend_is_checked(artifact, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "triton", str(artifact), "--out", str(tmp_path / "repo"), "--backend", "tensorflow"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "'tensorflow'" in err, err
    assert not list(tmp_path.iterdir())


def _stats(client, model):
    s = client.get_inference_statistics(model)["model_stats"][0]
    return int(s["inference_count"]), int(s["execution_count"])


@needs_server
def test_concurrent_clients_get_right_answers_and_are_batched(server, artifact):
    engine = load(artifact, backend="onnxruntime", threads=1)
    rtol = load_manifest(artifact).verification.onnx_rtol
    probe = httpclient.InferenceServerClient(server.url("http"))
    before = _stats(probe, "dagc")
    errors, done = [], []

    def client(k):
        c = httpclient.InferenceServerClient(server.url("http"))
        for j in range(50):
            x = _feeds(engine, 1, 1000 * k + j)["image"]
            try:
                got, _ = _infer(c, httpclient, "dagc", {"image": x}, list(engine.tasks))
                want = engine.run(x)
                bad = [t for t in engine.tasks if not relative_error(got[t], want[t]) <= rtol]
                (errors.append(f"client {k} request {j}: {bad}") if bad else done.append(1))
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                errors.append(f"client {k} request {j}: {e}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(done) == 400, errors[:3]
    inferences, executions = (a - b for a, b in zip(_stats(probe, "dagc"), before))
    assert inferences == 400 and executions < inferences, "the dynamic batcher never joined two requests"


@needs_server
@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_malformed_requests_are_refused_and_serving_goes_on(server, artifact, module):
    client = module.InferenceServerClient(server.url(module.__name__.rsplit(".", 1)[1]))
    good = np.zeros((1, *load_manifest(artifact).input.shape), np.float32)

    def request(name="image", x=good, dtype="FP32", outputs=("seg",), model="dagc_seg"):
        inputs = [] if name is None else [module.InferInput(name, list(x.shape), dtype)]
        if inputs:
            inputs[0].set_data_from_numpy(x)
        return client.infer(model, inputs, outputs=[module.InferRequestedOutput(t) for t in outputs])

    bad = {"wrong shape": dict(x=np.zeros((1, 3, 8, 8), np.float32)),
           "wrong dtype": dict(x=good.astype(np.float64), dtype="FP64"),
           "unknown output": dict(outputs=("nope",)),
           "output of another task": dict(outputs=("depth",)),
           "missing input": dict(name=None),
           "unknown input": dict(name="picture"),
           "batch over max_batch_size": dict(x=np.zeros((33, *good.shape[1:]), np.float32)),
           "unknown model": dict(model="dagc_nope")}
    for what, kw in bad.items():
        with pytest.raises(InferenceServerException):
            request(**kw)
        assert server.process.poll() is None, f"the server died on: {what}"
    assert request().as_numpy("seg").shape[0] == 1


@needs_server
def test_a_port_taken_is_one_line_and_starts_nothing(artifact, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            main(["serve", str(artifact), "--http-port", "0", "--grpc-port", str(port), "--metrics-port", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("dagc: error:") and f"port {port}" in err and "--grpc-port" in err


def test_a_missing_server_is_one_clear_error(artifact, tmp_path):
    with pytest.raises(ServeError, match="does not exist; install it with: pip install") as e:
        TritonServer(artifact, _config(), server_dir=tmp_path / "nowhere").start()
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


def _broken_install(tmp_path, broken):
    """A copy of the installed server (links to the real binary, libraries, backend and stubs)
    with one part replaced: ``backend`` (a Python backend library that is not one) or ``stub``
    (a stub for this Python that exits at once)."""
    real = find_server()
    root = tmp_path / "site" / "pytriton" / "tritonserver"
    root.mkdir(parents=True)
    (tmp_path / "site" / "nvidia_pytriton.libs").symlink_to(real.libs)
    (root / "bin").symlink_to(real.binary.parent)
    if broken == "backend":
        (root / "python_backend_stubs").symlink_to(real.stub.parent.parent)
        (root / "backends" / "python").mkdir(parents=True)
        (root / "backends" / "python" / "libtriton_python.so").write_bytes(b"not a shared library")
    else:
        (root / "backends").symlink_to(real.python_backend.parent)
        stub = root / "python_backend_stubs" / real.stub.parent.name / real.stub.name
        stub.parent.mkdir(parents=True)
        stub.write_text("#!/bin/sh\nexit 3\n")
        stub.chmod(0o755)
    return root


@needs_server
@pytest.mark.parametrize("broken, timeout, words", [
    ("backend", 120.0, r"tritonserver exited with code \d+ while starting: .*libtriton_python\.so"),
    ("stub", 3.0, r"tritonserver was not ready after 3 s")])
def test_a_server_that_fails_to_start_is_reported_and_leaves_nothing(artifact, tmp_path, broken, timeout, words):
    """A broken install of the real server: it exits while loading the models (a Python backend
    library that is not one), or never gets ready (a stub that exits at once); the error quotes
    its log and nothing is left running or written."""
    root = _broken_install(tmp_path, broken)
    s = TritonServer(artifact, _config(metrics_port=None, startup_timeout_s=timeout), server_dir=root)
    with pytest.raises(ServeError, match=words):
        s.start()
    assert s.process.poll() is not None and not _group_alive(s.process.pid) and s._tmp is None
    shm = re.search(r"shm-region-prefix-name=(\S+)", " ".join(s.process.args)).group(1)
    assert not list(Path("/dev/shm").glob(f"{shm}*")), "shared-memory regions left behind"


@pytest.mark.parametrize("kw, words", [({"host": "localhost"}, "IPv4 address"), ({"host": "::1"}, "IPv4 address"),
                                       ({"http_port": 9000, "grpc_port": 9000}, "must differ"),
                                       ({"grpc_port": 70000}, "--grpc-port must be a port number")])
def test_serve_config_is_checked(kw, words):
    with pytest.raises(ServeError, match=words):
        ServeConfig(**kw)


def _group_alive(group):
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@needs_server
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_serves_until_a_signal_and_leaves_nothing(artifact, tmp_path, sig):
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dagc", "serve", str(artifact), "--http-port", "0",
                             "--grpc-port", "0", "--no-metrics", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Ctrl-C"):
            break
    text = "".join(lines)
    assert "seg,depth" in text and "dagc_seg.depth  (ensemble of dagc_seg, dagc_depth)" in text, text
    http = int(re.search(r"HTTP +http://127\.0\.0\.1:(\d+)", text).group(1))
    group = int(re.search(r"process group (\d+)", text).group(1))
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
    assert client.is_server_ready() and client.is_model_ready("dagc")
    client.close()  # the server waits for open connections at shutdown (up to its exit timeout)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopping" in out and not _group_alive(group)
    assert not list(tmp_path.iterdir()), "the temporary repository was left behind"


@needs_server
def test_stop_ends_every_process_and_removes_what_it_wrote(artifact):
    s = TritonServer(artifact, _config(metrics_port=None)).start()
    tmp, group = Path(s._tmp), s.process.pid
    shm = re.search(r"shm-region-prefix-name=(\S+)", " ".join(s.process.args)).group(1)
    assert list(Path("/dev/shm").glob(f"{shm}*")), "each model instance has a region with the server's prefix"
    stubs = subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True).stdout.split()
    assert len(stubs) > 1, "the server and its Python backend stubs share the process group"
    s.stop()
    assert s.process.returncode is not None and not _group_alive(group) and not tmp.exists()
    assert not list(Path("/dev/shm").glob(f"{shm}*"))
    s.stop()  # a second stop does nothing

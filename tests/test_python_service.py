"""examples/python_service: the HTTP endpoint answers exactly what `Engine.run` computes, under
concurrent load, refuses every kind of bad request with a 4xx and a one-line reason, keeps serving
afterwards, and its command line starts, answers and shuts down cleanly."""

import base64
import http.client
import importlib.util
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from compiler_cases import compiled_artifact

from dagc.errors import ConfigError
from dagc.runtime import ArtifactError, load
from dagc.spec import TaskSpec, preset

ROOT = Path(__file__).resolve().parents[1]
SERVER_PY = ROOT / "examples" / "python_service" / "server.py"
LIMIT = 256 * 1024  # max_body_bytes of the test server: a few images fit, 2 x LIMIT does not


def _import_server():
    spec = importlib.util.spec_from_file_location("dagc_python_service", SERVER_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


service = _import_server()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    spec = preset("tiny", [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth"),
                           TaskSpec("cls", "classification", 4)], input_size=(16, 16))
    return compiled_artifact(tmp_path_factory.mktemp("svc"), spec, 5)


@pytest.fixture(scope="module")
def per_task_artifact(tmp_path_factory):
    spec = preset("omniglot", [TaskSpec("a", "classification", 5), TaskSpec("b", "classification", 3)],
                  in_channels=1, shared_input=False, input_size=(8, 8))
    return compiled_artifact(tmp_path_factory.mktemp("svc_pt"), spec, 6)


def _start(art, request_timeout_s=1.0):
    config = service.ServiceConfig(max_body_bytes=LIMIT, request_timeout_s=request_timeout_s, max_inflight=4)
    server = service.make_server(art, "127.0.0.1", 0, backend="onnxruntime", threads=1, config=config)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def _stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(10)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(artifact):
    srv, thread = _start(artifact)
    yield srv
    _stop(srv, thread)


@pytest.fixture(scope="module")
def reference(artifact):
    return load(artifact, backend="onnxruntime", threads=1)


def _request(server, method, path, body=None, headers=None, timeout=20):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, dict(resp.getheaders()), json.loads(data) if data else None
    finally:
        conn.close()


def _raw(server, data: bytes, timeout=10):
    """Send raw bytes (for what http.client will not send) and return (status, JSON body)."""
    with socket.create_connection(server.server_address[:2], timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    data = b"".join(chunks)
    if not data.startswith(b"HTTP/"):  # http.server answers an unparsable request line HTTP/0.9 style
        return json.loads(data)["status"], json.loads(data)
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def _x(batch, seed, shape=(3, 16, 16)):
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)


def _npy(arr) -> str:
    buf = io.BytesIO()
    np.save(buf, arr)
    return base64.b64encode(buf.getvalue()).decode()


def _decode(out):
    if "npy_base64" in out:
        arr = np.load(io.BytesIO(base64.b64decode(out["npy_base64"])), allow_pickle=False)
    else:
        arr = np.asarray(out["data"], dtype=np.float32)
    assert list(arr.shape) == out["shape"] and out["dtype"] == "float32"
    return arr


def _assert_good(server, reference, seed=0):
    x = _x(1, seed)
    status, _, body = _request(server, "POST", "/infer", {"inputs": x.tolist(), "tasks": ["depth"]})
    assert status == 200, body
    np.testing.assert_array_equal(_decode(body["outputs"]["depth"]), reference.run(x, ["depth"])["depth"])


def test_health_reports_tasks_and_input_spec(server, reference):
    status, headers, body = _request(server, "GET", "/health")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body["status"] == "ok" and body["tasks"] == ["seg", "depth", "cls"]
    assert body["input"]["names"] == ["image"] and body["input"]["shape"] == ["batch", 3, 16, 16]
    assert body["input"]["dtype"] == "float32"
    assert body["outputs"] == {"seg": ["batch", 3, 16, 16], "depth": ["batch", 1, 16, 16], "cls": ["batch", 4]}
    assert body["max_body_bytes"] == LIMIT and body["backend"] == "onnxruntime"


def test_concurrent_requests_equal_direct_engine_runs(server, reference):
    subsets = [None, ["seg"], ["depth"], ["cls"], ["cls", "seg"], ["seg", "depth", "cls"]]

    def one(i):
        x = _x(1 + i % 3, i)
        tasks = subsets[i % len(subsets)]
        req = {"inputs": x.tolist()} if i % 2 else {"inputs_npy": _npy(x)}
        if tasks is not None:
            req["tasks"] = tasks
        if i % 4 == 0:
            req["output_encoding"] = "npy"
        status, _, body = _request(server, "POST", "/infer", req)
        return i, x, tasks, status, body

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(80), timeout=120))
    assert len(results) == 80
    for i, x, tasks, status, body in results:
        assert status == 200, (i, body)
        want = reference.run(x, tasks)
        assert body["tasks"] == list(want)
        assert body["models"] == list(reference.models_for(tasks))
        for t, v in want.items():
            np.testing.assert_array_equal(_decode(body["outputs"][t]), v, err_msg=f"request {i}, task {t}")


def _pickled_npy() -> str:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return base64.b64encode(buf.getvalue()).decode()


GOOD = _x(1, 1).tolist()
BAD_REQUESTS = [
    ("GET", "/nope", None, 404, "no endpoint"),
    ("POST", "/health", {"inputs": GOOD}, 405, "not allowed"),
    ("GET", "/infer", None, 405, "POST"),
    ("DELETE", "/infer", None, 405, "not allowed"),
    ("BREW", "/infer", None, 405, "not allowed"),
    ("POST", "/infer", b'{"inputs": [1, 2', 400, "not valid JSON"),
    ("POST", "/infer", b'{"inputs": "\xff"}', 400, "UTF-8"),
    ("POST", "/infer", b'{"inputs": [NaN]}', 400, "NaN"),
    ("POST", "/infer", [1, 2], 400, "JSON object"),
    ("POST", "/infer", {"input": GOOD}, 400, "unknown field"),
    ("POST", "/infer", {"tasks": ["seg"]}, 400, "exactly one"),
    ("POST", "/infer", {"inputs": GOOD, "inputs_npy": _npy(np.zeros((1, 3, 16, 16), np.float32))}, 400,
     "exactly one"),
    ("POST", "/infer", {"inputs": [[[[1.0, 2.0], [3.0]]]]}, 400, "ragged"),
    ("POST", "/infer", {"inputs": [[[["a"]]]]}, 400, "numbers only"),
    ("POST", "/infer", {"inputs": [[[[True]]]]}, 400, "numbers only"),
    ("POST", "/infer", {"inputs": {"x": 1}}, 400, "nested list"),
    ("POST", "/infer", {"inputs": {"x": GOOD}}, 400, "one input shared by all tasks"),
    ("POST", "/infer", {"inputs": _x(1, 0, (3, 8, 8)).tolist()}, 400, "8x8"),
    ("POST", "/infer", {"inputs": _x(1, 0)[0].tolist()}, 400, "4 dimensions"),
    ("POST", "/infer", {"inputs": _x(1, 0, (16, 16, 3)).tolist()}, 400, "channels"),
    ("POST", "/infer", {"inputs": []}, 400, "4 dimensions"),
    ("POST", "/infer", {"inputs_npy": _npy(np.zeros((1, 3, 16, 16), np.int32))}, 400, "integer dtype"),
    ("POST", "/infer", {"inputs_npy": "not base64!"}, 400, "base64"),
    ("POST", "/infer", {"inputs_npy": base64.b64encode(b"hello").decode()}, 400, "not a valid .npy"),
    ("POST", "/infer", {"inputs_npy": _pickled_npy()}, 400, "Python objects"),
    ("POST", "/infer", {"inputs_npy": _npy(GOOD)[:60]}, 400, "truncated"),
    ("POST", "/infer", {"inputs": GOOD, "tasks": ["seg", "colour"]}, 400, "unknown task 'colour'"),
    ("POST", "/infer", {"inputs": GOOD, "tasks": []}, 400, "empty"),
    ("POST", "/infer", {"inputs": GOOD, "tasks": 3}, 400, "list of task names"),
    ("POST", "/infer", {"inputs": GOOD, "output_encoding": "xml"}, 400, "output_encoding"),
    ("POST", "/infer", {"inputs": (_x(1, 0).astype(np.float64) * 1e300).tolist()}, 400, "NaN or infinite"),
    ("POST", "/infer", {"inputs": _x(2 * LIMIT // 30000 + 8, 0).tolist()}, 413, "over the limit"),
]


@pytest.mark.parametrize("method, path, body, status, words", BAD_REQUESTS,
                         ids=[f"{c[3]}-{c[4]}" for c in BAD_REQUESTS])
def test_bad_requests_get_4xx_with_one_line_and_service_goes_on(server, reference, method, path, body, status, words):
    headers = {"Content-Type": "application/json"} if isinstance(body, bytes) else None
    got, resp_headers, answer = _request(server, method, path, body, headers)
    assert got == status, answer
    assert answer["status"] == status and words in answer["error"], answer
    assert "\n" not in answer["error"]
    if status == 405:
        assert resp_headers["Allow"] in ("GET", "POST")
    _assert_good(server, reference)


RAW_REQUESTS = [
    (b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n{}", 411, "Content-Length"),
    (b"POST /infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411, "chunked"),
    (b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n{}", 413, "over the limit"),
    (b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400, "Content-Length"),
    (b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}", 415, "application/json"),
    (b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"inputs\"", 408, "did not arrive"),
    (b"THIS IS NOT HTTP\r\n\r\n", 400, "bad request"),
    (b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", 431, "line too long"),
]


@pytest.mark.parametrize("data, status, words", RAW_REQUESTS, ids=[f"{c[1]}-{c[2]}" for c in RAW_REQUESTS])
def test_broken_http_gets_4xx_with_one_line(server, reference, data, status, words):
    got, answer = _raw(server, data)
    assert got == status and answer["status"] == status, answer
    assert words.lower() in answer["error"].lower() and "\n" not in answer["error"], answer
    _assert_good(server, reference)


def test_shutdown_finishes_the_request_in_flight(artifact, reference):
    srv, thread = _start(artifact, request_timeout_s=30.0)
    x = _x(1, 7)
    body = json.dumps({"inputs": x.tolist(), "tasks": ["cls"]}).encode()
    head = (f"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    before = set(threading.enumerate())
    with socket.create_connection(srv.server_address[:2], timeout=10) as s:
        s.sendall(head + body[:100])
        deadline = time.monotonic() + 10
        while not any("process_request_thread" in t.name for t in set(threading.enumerate()) - before):
            assert time.monotonic() < deadline, "the server never picked the request up"
            time.sleep(0.01)
        # the handler is now waiting for the rest of the body
        srv.shutdown()  # stop accepting; serve_forever returns
        closer = threading.Thread(target=srv.server_close)
        closer.start()
        time.sleep(0.2)
        assert closer.is_alive(), "server_close must wait for the request in flight"
        s.sendall(body[100:])
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    closer.join(10)
    thread.join(10)
    assert not closer.is_alive() and not thread.is_alive()
    assert data.startswith(b"HTTP/1.0 200")
    answer = json.loads(data.partition(b"\r\n\r\n")[2])
    np.testing.assert_array_equal(_decode(answer["outputs"]["cls"]), reference.run(x, ["cls"])["cls"])


def test_per_task_inputs_take_an_object(per_task_artifact):
    srv, thread = _start(per_task_artifact)
    try:
        ref = load(per_task_artifact, backend="onnxruntime", threads=1)
        xa, xb = _x(2, 3, (1, 8, 8)), _x(2, 4, (1, 8, 8))
        status, _, body = _request(srv, "POST", "/infer", {"inputs": {"a": xa.tolist(), "image_b": xb.tolist()}})
        assert status == 200, body
        want = ref.run({"a": xa, "b": xb})
        for t in ("a", "b"):
            np.testing.assert_array_equal(_decode(body["outputs"][t]), want[t])
        status, _, body = _request(srv, "POST", "/infer", {"inputs_npy": {"b": _npy(xb)}, "tasks": ["b"]})
        assert status == 200 and body["models"] == ["task_b.onnx"]
        np.testing.assert_array_equal(_decode(body["outputs"]["b"]), want["b"])
        status, _, body = _request(srv, "POST", "/infer", {"inputs": xa.tolist()})
        assert status == 400 and "one input per task" in body["error"]
    finally:
        _stop(srv, thread)


@pytest.mark.parametrize("kw", [{"max_body_bytes": 0}, {"max_inflight": -1}, {"request_timeout_s": 0},
                                {"queue_timeout_s": "1"}, {"max_body_bytes": True}])
def test_service_config_is_validated(kw):
    with pytest.raises(ConfigError, match=next(iter(kw))):
        service.ServiceConfig(**kw)


def test_make_server_refuses_a_missing_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        service.make_server(tmp_path / "nothing", "127.0.0.1", 0)


def test_command_line_serves_and_shuts_down_gracefully(artifact):
    proc = subprocess.Popen([sys.executable, str(SERVER_PY), "--artifact", str(artifact), "--port", "0",
                             "--backend", "onnxruntime", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" on ")[-1].strip()
        host, port = url.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=20)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err


def test_command_line_bad_artifact_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(SERVER_PY), "--artifact", str(tmp_path), "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("server: error:") and "manifest.json" in lines[0], proc.stderr

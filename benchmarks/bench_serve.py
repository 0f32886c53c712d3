"""`dagc serve` (Triton, Python backend) against the stdlib HTTP example, under the same load.

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py [--clients 8] [--requests 100] [--out serve.json]

One artifact (a random reduced network of the `tiny` preset, 3 tasks, 32x32; the weights do not
change the cost) served by each server in its own process on loopback, one at a time, each model
with one ONNX Runtime intra-op thread:

- ``triton-http`` / ``triton-grpc``: ``dagc serve ART`` (Triton 2.51, dynamic batching with the
  default 100 µs window), called with tritonclient's HTTP (binary tensors) and gRPC clients;
- ``stdlib``: ``examples/python_service/server.py --backend onnxruntime`` (ThreadingHTTPServer,
  `Engine.run` per request, at most 4 in flight), called with ``.npy`` bodies over http.client.

Load: ``--clients`` threads in this process, each sending ``--requests`` batch-1 requests for all
tasks back to back after 10 warm-up requests; throughput is requests / wall time of the timed part,
latency is per request. Prints a Markdown table and writes ``benchmarks/serve.json`` (or --out).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from dagc.spec import TaskSpec, preset
from dagc.tools.serve import find_server

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
from compiler_cases import compiled_artifact  # noqa: E402


def _start(cmd: list[str], ready: str, env: dict) -> tuple[subprocess.Popen, str]:
    """Start a server and read its output until a line holds ``ready``; returns (process, the
    output so far)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if ready in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, "".join(lines)
    raise RuntimeError(f"{cmd[:3]} exited before it was ready (code {proc.wait()}): {''.join(lines)[-500:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _triton_call(module, port: int, x: np.ndarray, tasks: list[str]):
    client = module.InferenceServerClient(f"127.0.0.1:{port}")
    inp = module.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    outs = [module.InferRequestedOutput(t) for t in tasks]

    def call():
        r = client.infer("dagc", [inp], outputs=outs)
        return {t: r.as_numpy(t) for t in tasks}
    return call


def _npy(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a)
    return base64.b64encode(buf.getvalue()).decode()


def _stdlib_call(port: int, x: np.ndarray, tasks: list[str]):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"inputs_npy": _npy(x), "output_encoding": "npy"}).encode()

    def call():
        conn.request("POST", "/infer", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(data)
        out = data["outputs"]
        return {t: np.load(io.BytesIO(base64.b64decode(out[t]["npy_base64"])), allow_pickle=False) for t in tasks}
    return call


def load_test(make_call, clients: int, requests: int) -> dict:
    """``clients`` threads, each with its own connection (``make_call()``), ``requests`` calls
    each after 10 warm-up calls; returns throughput, p50/p99 latency and the error count."""
    latencies: list[float] = []
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)
    lock = threading.Lock()

    def worker():
        call = make_call()
        for _ in range(10):
            call()
        barrier.wait()
        mine = []
        for _ in range(requests):
            t0 = time.perf_counter()
            try:
                call()
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(str(e))
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1e3
    return {"requests": len(latencies), "errors": len(errors), "wall_s": round(wall, 3),
            "throughput_rps": round(len(latencies) / wall, 1), "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--out", type=Path, default=HERE / "serve.json")
    args = ap.parse_args()
    find_server()  # fails with the install line when the serve extra is missing
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = preset("tiny", [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth"),
                               TaskSpec("cls", "classification", 4)], input_size=(32, 32))
        art = compiled_artifact(Path(tmp), spec, 5)
        tasks = [t.name for t in spec.tasks]
        x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
        answers = {}
        proc, text = _start([sys.executable, "-m", "dagc", "serve", str(art), "--http-port", "0", "--grpc-port", "0",
                             "--no-metrics", "--threads", "1"], "Ctrl-C", env)
        try:
            ports = {"http": int(re.search(r"HTTP +http://127\.0\.0\.1:(\d+)", text).group(1)),
                     "grpc": int(re.search(r"gRPC +127\.0\.0\.1:(\d+)", text).group(1))}
            http = httpclient.InferenceServerClient(f"127.0.0.1:{ports['http']}")
            for name, module in (("http", httpclient), ("grpc", grpcclient)):
                before = http.get_inference_statistics("dagc")["model_stats"][0]
                r = results[f"triton-{name}"] = load_test(lambda m=module, n=name: _triton_call(m, ports[n], x, tasks),
                                                          args.clients, args.requests)
                after = http.get_inference_statistics("dagc")["model_stats"][0]
                runs, inferences = (int(after[k]) - int(before[k]) for k in ("execution_count", "inference_count"))
                r["mean_batch"] = round(inferences / runs, 2)
            answers["triton"] = _triton_call(httpclient, ports["http"], x, tasks)()
        finally:
            _stop(proc)
        proc, text = _start([sys.executable, str(ROOT / "examples" / "python_service" / "server.py"), "--artifact",
                             str(art), "--port", "0", "--backend", "onnxruntime", "--threads", "1", "--quiet"],
                            "serving", env)
        port = int(re.search(r"127\.0\.0\.1:(\d+)", text).group(1))
        try:
            results["stdlib"] = load_test(lambda: _stdlib_call(port, x, tasks), args.clients, args.requests)
            answers["stdlib"] = _stdlib_call(port, x, tasks)()
        finally:
            _stop(proc)
    agree = max(float(np.abs(answers["triton"][t] - answers["stdlib"][t]).max()) for t in tasks)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
              "clients": args.clients, "requests_per_client": args.requests, "max_abs_difference": agree,
              "results": results}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print("| server | requests | errors | throughput (req/s) | p50 ms | p99 ms | mean batch |\n|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['requests']} | {r['errors']} | {r['throughput_rps']} | {r['p50_ms']} | {r['p99_ms']} "
              f"| {r.get('mean_batch', 1)} |")
    print(f"wrote {args.out}; outputs of the two servers differ by at most {agree:.1e}")


if __name__ == "__main__":
    main()

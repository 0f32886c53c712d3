"""An HTTP inference endpoint for a compiled dagc artifact (Python standard library + dagc only).

    python examples/python_service/server.py --artifact art/a --host 127.0.0.1 --port 8000

API (JSON in, JSON out; every error is ``{"error": "<one line>", "status": <code>}``):

``GET /health``
    200 ``{"status": "ok", "tasks": [...], "input": {"names", "shape", "dtype", "preprocessing",
    "task_inputs"}, "outputs": {task: shape}, "backend": ..., "max_body_bytes": ...}``.
``POST /infer`` (``Content-Type: application/json``)
    ``{"inputs": <nested list (batch, C, H, W)>, "tasks": ["seg", ...], "output_encoding": "list"}``

    - ``inputs``: the preprocessed images as nested lists of numbers (taken as float32), or
      ``inputs_npy`` instead: a base64-encoded ``.npy`` file (any float dtype; no pickled objects).
      An artifact whose tasks have their own inputs takes an object ``{task or input name: array}``
      in either field.
    - ``tasks`` (optional, default all): task names; one task runs its own small model.
    - ``output_encoding`` (optional): ``"list"`` (default, nested lists) or ``"npy"`` (base64 ``.npy``).

    200 ``{"tasks": [...], "models": [...], "outputs": {task: {"shape", "dtype", "data" | "npy_base64"}}}``.

Status codes: 400 malformed JSON or a request the model cannot take (shape, dtype, unknown task; the
reason comes from `dagc.runtime.Engine.run`), 404 unknown path, 405 wrong method (with ``Allow``),
408 body not received in time, 411 no ``Content-Length``, 413 body over the limit, 415 not JSON,
503 too many requests waiting; 500 only for faults of the server itself (e.g. a model file changed
on disk). The server keeps serving after any of them.

`make_server` builds a server without starting it (tests run ``serve_forever`` in a thread);
`main` is the command line. SIGINT / SIGTERM stop accepting connections, finish the requests in
flight and exit 0.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import logging
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from dagc.errors import ConfigError, DagcError
from dagc.runtime import BACKENDS, Engine, InputError, load

__all__ = ["ServiceConfig", "InferenceServer", "make_server", "serve", "main"]

log = logging.getLogger("dagc.service")

ROUTES = {"/health": ("GET",), "/infer": ("POST",)}
REQUEST_FIELDS = ("inputs", "inputs_npy", "tasks", "output_encoding")
ENCODINGS = ("list", "npy")


@dataclass(frozen=True)
class ServiceConfig:
    """Limits of the service.

    max_body_bytes: largest request body accepted (413 above it).
    request_timeout_s: socket timeout while reading a request (408 when the body stalls).
    max_inflight: inference calls running at once; further requests wait for a slot.
    queue_timeout_s: how long a request waits for a slot before 503.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    request_timeout_s: float = 30.0
    max_inflight: int = 4
    queue_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_inflight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"ServiceConfig.{name} must be a positive integer, got {v!r}")
        for name in ("request_timeout_s", "queue_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"ServiceConfig.{name} must be a positive number of seconds, got {v!r}")


class _HttpError(Exception):
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())  # one line, whatever the source said
        self.headers = dict(headers or {})


class InferenceServer(ThreadingHTTPServer):
    """A `ThreadingHTTPServer` that answers with one loaded `Engine` (``.engine``).

    Request threads are not daemons, so `server_close` waits for the requests in flight: that is
    what makes shutdown graceful.
    """

    daemon_threads = False
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], engine: Engine, config: ServiceConfig) -> None:
        self.engine = engine
        self.config = config
        self.slots = threading.BoundedSemaphore(config.max_inflight)
        outputs = {t: engine.manifest.tasks[t].batch_shape() for t in engine.tasks}
        self.health = {"status": "ok", "tasks": list(engine.tasks), "input": engine.input_spec,
                       "outputs": outputs, "backend": engine.backend, "max_body_bytes": config.max_body_bytes}
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver prints a traceback to stderr for anything a request raised: a client that
        hung up (while http.server read its request line, say) is one log line instead, and any
        other fault goes to the log with its traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.info("%s: client went away", client_address[0])
        else:
            log.exception("error while serving %s", client_address[0])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(artifact: str | Path, host: str = "127.0.0.1", port: int = 8000, *, backend: str = "auto",
                threads: int | None = None, config: ServiceConfig | None = None) -> InferenceServer:
    """Load ``artifact`` and bind an `InferenceServer` to ``host:port`` (port 0: any free port).

    Takes the artifact directory, the address, the runtime backend (`dagc.runtime.BACKENDS`), the
    intra-op threads per model and the `ServiceConfig`. Returns the bound server, not yet serving
    (call ``serve_forever``, or `serve`). Raises `dagc.runtime.ArtifactError` (missing, tampered or
    unknown artifact; backend unavailable), `dagc.runtime.InputError` (bad backend or threads),
    ConfigError (bad config) and OSError when the address cannot be bound.
    """
    config = ServiceConfig() if config is None else config
    if not isinstance(config, ServiceConfig):
        raise ConfigError(f"config must be a ServiceConfig, got {type(config).__name__}")
    engine = load(artifact, backend=backend, threads=threads)
    return InferenceServer((host, port), engine, config)


def serve(server: InferenceServer) -> None:
    """Serve until SIGINT or SIGTERM, then finish the requests in flight and close the socket.
    Must run in the main thread (signal handlers)."""

    def stop(signum, frame):
        log.info("received %s; finishing requests in flight", signal.Signals(signum).name)
        # shutdown() waits for serve_forever to return, so it cannot run in serve_forever's thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.serve_forever()
    finally:
        server.server_close()  # joins the non-daemon request threads
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------------
# request decoding


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise _HttpError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError:
        raise _HttpError(400, "request body is not UTF-8 encoded JSON") from None
    except RecursionError:
        raise _HttpError(400, "request body is nested too deeply") from None
    except ValueError as e:
        raise _HttpError(400, f"request body is not valid JSON: {e}") from None


def _array_from_list(value: Any, label: str) -> np.ndarray:
    if not isinstance(value, list):
        raise _HttpError(400, f"{label} must be a nested list of numbers (batch, channels, height, width), got "
                              f"{_json_type(value)}")
    try:
        arr = np.asarray(value)
    except (ValueError, RecursionError):
        raise _HttpError(400, f"{label} is ragged: its nested lists must all have the same length at each "
                              "depth (batch, channels, height, width)") from None
    if arr.dtype.kind not in "iuf":
        what = "true/false" if arr.dtype.kind == "b" else "non-numbers (strings, null or objects)"
        raise _HttpError(400, f"{label} contains {what}; send numbers only")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, which Engine.run refuses
        return arr.astype(np.float32)  # JSON has no float32; every number is taken as one


def _array_from_npy(value: Any, label: str) -> np.ndarray:
    if not isinstance(value, str):
        raise _HttpError(400, f"{label} must be a base64 string of a .npy file, got {_json_type(value)}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _HttpError(400, f"{label} is not valid base64") from None
    if raw.startswith(b"PK\x03\x04"):
        raise _HttpError(400, f"{label} is an .npz archive; send a single array saved with numpy.save")
    if not raw.startswith(b"\x93NUMPY"):
        raise _HttpError(400, f"{label} is not a valid .npy file (no .npy header); send numpy.save output")
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises several types for a foreign or truncated file
        reason = "it holds Python objects" if "allow_pickle" in str(e) else "truncated or corrupt"
        raise _HttpError(400, f"{label} cannot be read as a numpy array ({reason}); send numpy.save output") from None


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _decode_inputs(value: Any, field: str, convert) -> Any:
    if isinstance(value, dict):
        return {str(k): convert(v, f"{field}[{k!r}]") for k, v in value.items()}
    return convert(value, field)


def _parse_infer_request(req: Any) -> tuple[Any, Sequence[str] | str | None, str]:
    """(images for `Engine.run`, tasks, output encoding) from a decoded ``/infer`` body; raises
    `_HttpError` 400 with the reason."""
    if not isinstance(req, dict):
        raise _HttpError(400, 'the request body must be a JSON object such as {"inputs": [[[[...]]]], '
                              f'"tasks": ["..."]}}, got {_json_type(req)}')
    unknown = sorted(set(req) - set(REQUEST_FIELDS))
    if unknown:
        raise _HttpError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; allowed fields: "
                              f"{', '.join(REQUEST_FIELDS)}")
    if ("inputs" in req) == ("inputs_npy" in req):
        raise _HttpError(400, "give exactly one of 'inputs' (nested lists) or 'inputs_npy' (base64 .npy)")
    if "inputs" in req:
        images = _decode_inputs(req["inputs"], "inputs", _array_from_list)
    else:
        images = _decode_inputs(req["inputs_npy"], "inputs_npy", _array_from_npy)
    tasks = req.get("tasks")
    if tasks is not None and not (isinstance(tasks, str) or
                                  (isinstance(tasks, list) and all(isinstance(t, str) for t in tasks))):
        raise _HttpError(400, f"'tasks' must be a list of task names, got {_json_type(tasks)}")
    encoding = req.get("output_encoding", "list")
    if encoding not in ENCODINGS:
        raise _HttpError(400, f"'output_encoding' must be one of {list(ENCODINGS)}, got {encoding!r}")
    return images, tasks, encoding


def _encode_output(arr: np.ndarray, encoding: str) -> dict[str, Any]:
    out: dict[str, Any] = {"shape": list(arr.shape), "dtype": str(arr.dtype)}
    if encoding == "npy":
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        out["npy_base64"] = base64.b64encode(buf.getvalue()).decode("ascii")
    else:
        out["data"] = arr.tolist()  # float32 -> float is exact, so the client gets the same values back
    return out


# ---------------------------------------------------------------------------------------------------
# HTTP handler


class _Handler(BaseHTTPRequestHandler):
    server: InferenceServer
    server_version = "dagc-service/1"
    # HTTP/1.0: one request per connection, so an unread body can never be taken for the next request
    protocol_version = "HTTP/1.0"

    def setup(self) -> None:
        self.timeout = self.server.config.request_timeout_s
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def __getattr__(self, name: str):
        # http.server answers 501 for a method without a do_<METHOD>; we answer 404/405 instead
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        log.info("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, header too long, ...) as one-line JSON too."""
        try:
            self._send_json(code, {"error": " ".join((message or self.responses.get(code, ("error",))[0]).split()),
                                   "status": code}, {"Connection": "close"})
        except OSError:
            pass
        self.close_connection = True

    # ------------------------------------------------------------------ plumbing
    def _dispatch(self) -> None:
        try:
            path = urlsplit(self.path).path
            allowed = ROUTES.get(path)
            if allowed is None:
                self._discard_body()
                raise _HttpError(404, f"no endpoint {path!r}; use GET /health or POST /infer")
            if self.command not in allowed:
                self._discard_body()
                raise _HttpError(405, f"{self.command} is not allowed on {path}; use {' or '.join(allowed)}",
                                 {"Allow": ", ".join(allowed)})
            if path == "/health":
                self._send_json(200, self.server.health)
            else:
                self._infer()
        except _HttpError as e:
            self._send_json(e.status, {"error": e.message, "status": e.status}, e.headers)
        except ConnectionError:  # reading the request: the client hung up
            self._gone()
        except Exception:  # noqa: BLE001 - a server fault must not stop the service
            log.exception("internal error on %s %s", self.command, self.path)
            self._send_json(500, {"error": "internal server error; see the server log", "status": 500})

    def _gone(self) -> None:
        log.info("%s: client went away before the answer was sent", self.address_string())
        self.close_connection = True

    def _send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        """Answer; a client that hung up (broken pipe, reset) is one log line, not an error."""
        body = (json.dumps(payload, allow_nan=False) + "\n").encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if getattr(self, "command", None) != "HEAD":
                self.wfile.write(body)
        except ConnectionError:
            self._gone()

    def _content_length(self) -> int | None:
        text = self.headers.get("Content-Length")
        if text is None:
            return None
        try:
            n = int(text)
        except ValueError:
            n = -1
        if n < 0:
            raise _HttpError(400, f"Content-Length {text!r} is not a non-negative integer")
        return n

    def _discard_body(self) -> None:
        """Read and drop a body of moderate size, so the client, still sending, reads our answer
        instead of a connection reset. Bigger bodies are left unread (the connection closes)."""
        try:
            n = self._content_length() or 0
        except _HttpError:
            return
        limit = 4 * self.server.config.max_body_bytes
        if n > limit:
            return
        try:
            while n > 0:
                chunk = self.rfile.read(min(n, 1 << 16))
                if not chunk:
                    break
                n -= len(chunk)
        except OSError:
            pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise _HttpError(411, "chunked transfer encoding is not supported; send the body with a Content-Length")
        n = self._content_length()
        if n is None:
            raise _HttpError(411, "the request has no Content-Length; send the JSON body with a Content-Length header")
        limit = self.server.config.max_body_bytes
        if n > limit:
            self._discard_body()
            raise _HttpError(413, f"request body is {n} bytes, over the limit of {limit} bytes; send fewer images "
                                  "per request (or use inputs_npy, about 4 bytes per value)")
        ctype = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip().lower()
        if ctype != "application/json":
            self._discard_body()
            raise _HttpError(415, f"Content-Type {ctype!r} is not supported; send the body as application/json")
        try:
            body = self.rfile.read(n)
        except TimeoutError:
            raise _HttpError(408, f"the request body did not arrive within {self.server.config.request_timeout_s:g} s "
                                  f"(Content-Length {n})") from None
        if len(body) < n:
            raise _HttpError(400, f"the request body ended after {len(body)} of {n} bytes (Content-Length)")
        return body

    def _infer(self) -> None:
        images, tasks, encoding = _parse_infer_request(_parse_json(self._read_body()))
        engine = self.server.engine
        if not self.server.slots.acquire(timeout=self.server.config.queue_timeout_s):
            raise _HttpError(503, "the server is busy (all inference slots taken); retry later", {"Retry-After": "1"})
        try:
            outputs = engine.run(images, tasks)
            models = engine.models_for(list(outputs))
        except InputError as e:
            raise _HttpError(400, str(e)) from None
        finally:
            self.server.slots.release()
        if not all(np.isfinite(v).all() for v in outputs.values()):
            raise RuntimeError("the model produced non-finite outputs")
        self._send_json(200, {"tasks": list(outputs), "models": list(models),
                              "outputs": {t: _encode_output(v, encoding) for t, v in outputs.items()}})


# ---------------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: parse ``--artifact/--host/--port/--backend/...``, serve until SIGINT/SIGTERM.
    Returns the exit code: 0 after a clean shutdown, 2 for a bad artifact or argument (one line on
    stderr)."""
    p = argparse.ArgumentParser(prog="python examples/python_service/server.py",
                                description="HTTP inference endpoint for a compiled dagc artifact.")
    p.add_argument("--artifact", required=True, type=Path, help="artifact directory written by dagc compile")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", default=8000, type=int, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="dagc.runtime backend (default auto)")
    p.add_argument("--threads", default=None, type=int, help="intra-op threads per model")
    p.add_argument("--max-body-mb", default=16.0, type=float, help="largest request body in MiB (default 16)")
    p.add_argument("--max-inflight", default=4, type=int, help="inference calls at once (default 4)")
    p.add_argument("--quiet", action="store_true", help="no request log")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = ServiceConfig(max_body_bytes=max(1, int(args.max_body_mb * 1024 * 1024)),
                               max_inflight=args.max_inflight)
        server = make_server(args.artifact, args.host, args.port, backend=args.backend, threads=args.threads,
                             config=config)
    except DagcError as e:
        print(f"server: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"server: error: cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another "
              "--port or --host", file=sys.stderr)
        return 2
    print(f"serving {args.artifact} (tasks {', '.join(server.engine.tasks)}, backend {server.engine.backend}) "
          f"on {server.url}", flush=True)
    serve(server)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
